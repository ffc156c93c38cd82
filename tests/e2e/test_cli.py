"""The CLI as a user runs it: validate, start (foreground and --detach), status, stop, and the clear
errors for user mistakes (never a traceback)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.common.errors import ConfigError
from tests.conftest import DEMO_MODEL, ROOT, cli, write_config

pytestmark = pytest.mark.timeout(120)


def cpu_config(tmp, **extra):
    sections = {"workers": {"count": 2}, "model": {"kind": "onnx", "path": str(DEMO_MODEL), "max_batch": 64}}
    sections.update(extra)
    return write_config(tmp, sections)


def test_validate_ok_and_errors(short_tmp) -> None:
    ok = cli("validate", str(ROOT / "configs" / "cpu.toml"))
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = write_config(
        short_tmp,
        {"model": {"max_batch": "big", "kind": "onnx", "path": "missing.onnx"}, "workers": {"count": 0}},
    )
    p = cli("validate", str(bad))
    assert p.returncode == 2
    assert 'model.max_batch: expected a positive integer, got "big"' in p.stderr
    assert "workers.count: expected an integer from 1 to 256, got 0" in p.stderr
    assert "model.path: file not found" in p.stderr
    assert "Traceback" not in p.stderr
    p = cli("validate", str(short_tmp / "nope.toml"))
    assert p.returncode == 2 and "config file not found" in p.stderr and "Traceback" not in p.stderr


def test_nothing_running(short_tmp) -> None:
    cfg = cpu_config(short_tmp)
    for args in (
        ("status", str(cfg), "--once", "--json"),
        ("stop", str(cfg)),
        ("status", str(cfg), "--once"),
    ):
        p = cli(*args)
        assert p.returncode == 1 and "no orchestrator is running" in p.stderr and "Traceback" not in p.stderr


def test_gpu_config_refused_on_a_host_without_gpus() -> None:
    p = cli("start", str(ROOT / "configs" / "4gpu-synthetic.toml"))
    assert p.returncode == 2, p.stderr
    assert 'workers.device = "gpu" needs' in p.stderr and "Traceback" not in p.stderr


def test_detach_status_stop_and_refuse_second_start(short_tmp) -> None:
    cfg = cpu_config(short_tmp)
    p = cli("start", str(cfg), "--detach")
    assert p.returncode == 0, p.stderr
    try:
        st = json.loads(cli("status", str(cfg), "--once", "--json", check=True).stdout)
        assert isinstance(st["pid"], int) and len(st["workers"]) == 2
        for w in st["workers"]:
            assert w["state"] == "ready" and w["restarts"] == 0 and w["endpoint"].startswith("ipc://")
            assert {"id", "device", "pid"} <= set(w)
        again = cli("start", str(cfg), "--detach")
        assert again.returncode == 1 and "already running" in again.stderr
        text = cli("status", str(cfg), "--once", check=True).stdout
        assert "w0" in text and "w1" in text and "ready" in text
    finally:
        t0 = time.monotonic()
        stop = cli("stop", str(cfg))
        elapsed = time.monotonic() - t0
    assert stop.returncode == 0, stop.stderr
    assert elapsed < 10
    run = short_tmp / "run"
    assert not list(run.glob("*.sock")) and not (run / "supervisor.pid").exists()


def test_detach_reports_a_worker_that_cannot_start(short_tmp) -> None:
    cfg = cpu_config(short_tmp, debug={"inject": "crash_on_start"}, restart={"flap_max_crashes": 1})
    p = cli("start", str(cfg), "--detach")
    assert p.returncode == 1
    assert "injected start-up crash" in p.stderr and "Traceback" not in p.stderr.split("failed")[0]


def test_foreground_start_and_ctrl_c(short_tmp) -> None:
    cfg = cpu_config(short_tmp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "start", str(cfg)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = cli("status", str(cfg), "--once", "--json")
            if st.returncode == 0 and all(w["state"] == "ready" for w in json.loads(st.stdout)["workers"]):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "[shutdown]" in err and "Traceback" not in err


def test_arenas_that_do_not_fit_in_shared_memory_are_a_config_error(short_tmp) -> None:
    import os

    from orchestrator.common.shm import arena_dir

    probe = arena_dir(short_tmp / "run")
    while not probe.exists():
        probe = probe.parent
    st = os.statvfs(probe)
    too_big = (st.f_bavail * st.f_frsize >> 20) + 1  # one MiB more than is free, per worker
    cfg = write_config(
        short_tmp,
        {"workers": {"device": "cpu", "count": 2}, "transport": {"shm_mb": too_big, "shm_max_lease_mb": 1}},
    )
    for cmd in ("validate", "start"):
        proc = cli(cmd, str(cfg))
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        assert "transport.shm_mb: 2 worker(s)" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("run_dir", "message"),
    [
        ("/proc/orchestrator-test/run", "cannot be created or used"),
        ("{tmp}/file/run", "is not a directory"),
    ],
)
def test_unusable_run_dir_is_one_line_at_validate_and_start(short_tmp, run_dir: str, message: str) -> None:
    (short_tmp / "file").write_text("a file, not a directory")
    cfg = write_config(
        short_tmp, {"orchestrator": {"run_dir": run_dir.format(tmp=short_tmp)}, "workers": {"count": 1}}
    )
    for cmd in ("validate", "start"):
        proc = cli(cmd, str(cfg))
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert (
            f"orchestrator.run_dir: {run_dir.format(tmp=short_tmp)}" in proc.stderr and message in proc.stderr
        )
        assert "Traceback" not in proc.stderr
    assert not (short_tmp / "file").is_dir() and not any(
        p.name.startswith(".orchestrator-check") for p in short_tmp.iterdir()
    )


def test_gpu_config_without_a_gpu_fails_validate_as_it_fails_start(short_tmp) -> None:
    from orchestrator.supervisor.devices import discover_or_explain

    cfg = write_config(short_tmp, {"workers": {"device": "gpu"}})
    try:
        from orchestrator.common.config import load_config

        discover_or_explain(load_config(cfg))
        pytest.skip("this host has a GPU")
    except ConfigError:
        pass
    for cmd in ("validate", "start"):
        proc = cli(cmd, str(cfg))
        assert proc.returncode == 2 and 'workers.device = "gpu" needs' in proc.stderr, (cmd, proc.stderr)
        assert "Traceback" not in proc.stderr
