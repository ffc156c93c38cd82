"""MpsDaemon against a stand-in `nvidia-cuda-mps-control` (a small Python program written to a temp dir)
that daemonizes on `-d`, answers get_server_list / get_client_list / start_server / quit on a Unix socket in
its pipe directory, and records what it was asked. Runs in the pytest process; no GPU, no NVML.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator.common.config import parse_config
from orchestrator.supervisor import mps

UUIDS = ["GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000"]

FAKE = r"""
import json, os, signal, socket, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
PIPE = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
SOCK = os.path.join(PIPE, "control")


def behavior():  # read at every use: a test may change it while the daemon runs
    try:
        with open(os.path.join(HERE, "behavior.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def record(**kw):
    with open(os.path.join(HERE, "record.jsonl"), "a") as f:
        f.write(json.dumps(dict(kw, pid=os.getpid(), pipe=PIPE)) + "\n")


def client():
    commands = sys.stdin.read()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(SOCK)
    except OSError:
        print("Cannot find MPS control daemon process", file=sys.stderr)
        sys.exit(1)
    s.sendall(commands.encode())
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    sys.stdout.write(reply.decode())


def serve(srv, servers):
    while True:
        conn, _ = srv.accept()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        out, quit_ = [], False
        for cmd in data.decode().splitlines():
            record(event="command", command=cmd)
            if cmd == "get_server_list":
                out += [str(p.pid) for p in servers]
            elif cmd.startswith("get_client_list"):
                out.append(str(behavior().get("client_pid", "")))
            elif cmd.startswith("start_server"):
                servers.append(subprocess.Popen(["bash", "-c", "exec -a nvidia-cuda-mps-server sleep 600"]))
            elif cmd == "quit" and not behavior().get("ignore_quit"):
                quit_ = True
        conn.sendall(("\n".join(out) + "\n").encode() if out else b"")
        conn.close()
        if quit_:
            for p in servers:
                p.kill()
                p.wait()
            os.unlink(SOCK)
            os.unlink(os.path.join(PIPE, "nvidia-cuda-mps-control.pid"))
            record(event="exit")
            os._exit(0)


def daemon():
    if behavior().get("fail_start"):
        print("fake: cannot start: " + behavior()["fail_start"])
        sys.exit(3)
    os.makedirs(PIPE, exist_ok=True)
    r, w = os.pipe()
    if os.fork():  # the launcher returns once the daemon listens, like the real -d
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.setsid()
    if behavior().get("die_at_start"):  # the launcher succeeds, the daemon is gone at once
        os.write(w, b"1")
        os._exit(0)
    if behavior().get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(SOCK):
        os.unlink(SOCK)
    srv.bind(SOCK)
    srv.listen(8)
    with open(os.path.join(PIPE, "nvidia-cuda-mps-control.pid"), "w") as f:
        f.write(f"{os.getpid()}\n")
    log_dir = os.environ.get("CUDA_MPS_LOG_DIRECTORY")
    if log_dir:
        with open(os.path.join(log_dir, "control.log"), "a") as f:
            f.write("fake control daemon started\n")
    record(event="daemon", visible=os.environ.get("CUDA_VISIBLE_DEVICES"), log_dir=log_dir)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.write(w, b"1")
    serve(srv, [])


daemon() if sys.argv[1:2] == ["-d"] else client()
"""


class FakeMps:
    """The stand-in program, its behaviour switches and its record; ends what it started."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "fakebin"
        self.dir.mkdir()
        (self.dir / "fake_mps.py").write_text(FAKE)
        # argv[0] = the real name, so process lookups (by argv[0]) see it as the MPS control daemon.
        self.binary = self.dir / mps.CONTROL
        self.binary.write_text(
            f'#!/bin/bash\nexec -a {mps.CONTROL} {sys.executable} {self.dir / "fake_mps.py"} "$@"\n'
        )
        self.binary.chmod(0o755)
        self.root = root

    def behave(self, **kw: Any) -> None:
        (self.dir / "behavior.json").write_text(json.dumps(kw))

    def records(self, event: str | None = None) -> list[dict]:
        path = self.dir / "record.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [r for r in rows if event is None or r["event"] == event]

    def commands(self, pipe: Path) -> list[str]:
        return [r["command"] for r in self.records("command") if r["pipe"] == str(pipe)]

    def run(self, pipe: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
        env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(pipe))
        return subprocess.run(
            [str(self.binary), *args], input=stdin, env=env, capture_output=True, text=True, timeout=10
        )

    def start_foreign(self, pipe: Path) -> int:
        """A daemon this orchestrator did not start (someone else's `nvidia-cuda-mps-control -d`)."""
        pipe.mkdir(parents=True, exist_ok=True)
        assert self.run(pipe, "-d").returncode == 0
        return int((pipe / mps.PID_FILE).read_text())

    def leftovers(self) -> list[mps.MpsProcess]:
        return [p for p in mps.list_mps_processes() if p.pipe_dir and p.pipe_dir.startswith(str(self.root))]

    def cleanup(self) -> None:
        for p in self.leftovers():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def fake(tmp_path: Path) -> Any:
    f = FakeMps(tmp_path)
    yield f
    left = f.leftovers()
    f.cleanup()
    assert not left, f"MPS processes left running: {left}"


def cfg(**mps_keys: Any) -> Any:
    return parse_config(
        {"workers": {"device": "gpu", "per_gpu": 2}, "mps": {"enabled": True, **mps_keys}}, check_files=False
    )


class FakeNvml:
    """pynvml stand-in: nvmlInit/Shutdown, handles by UUID, compute modes."""

    def __init__(self, modes: dict[str, int]) -> None:
        self.modes = modes

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return uuid

    def nvmlDeviceGetComputeMode(self, handle: str) -> int:
        if handle not in self.modes:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return self.modes[handle]


def daemon_for(fake: FakeMps, run_dir: Path, config: Any = None, **kw: Any) -> mps.MpsDaemon:
    kw.setdefault("nvml", FakeNvml(dict.fromkeys(UUIDS, 0)))
    kw.setdefault("default_pipe_dir", str(fake.root / "default-pipe"))
    return mps.MpsDaemon(
        config or cfg(), run_dir, UUIDS, binary=str(fake.binary), timeout_s=5.0, quit_timeout_s=2.0, **kw
    )


def test_start_and_stop_lifecycle(fake: FakeMps, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    d = daemon_for(fake, run_dir, cfg(active_thread_percentage=50))
    env = d.start()
    pipe, logs = run_dir / "mps" / "pipe", run_dir / "mps" / "log"
    assert env == {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
    assert d.worker_env(1) == {**env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}
    assert d.ours and d.pid is not None and mps._alive(d.pid)
    assert (pipe / "control").exists() and pipe.stat().st_mode & 0o777 == 0o700
    started = fake.records("daemon")
    assert [r["visible"] for r in started] == [",".join(UUIDS)]  # the server sees only our GPUs, by UUID
    assert started[0]["log_dir"] == str(logs)
    st = d.status()
    assert st["daemon_alive"] and st["ours"] and st["pipe_dir"] == str(pipe) and st["servers"] == []
    assert st["compute_modes"] == dict.fromkeys(UUIDS, "default")
    pid = d.pid
    d.stop()
    assert not mps._alive(pid)
    assert fake.commands(pipe)[-1] == "quit"
    assert not pipe.exists() and (logs / "control.log").exists()  # sockets gone, logs kept
    n = len(fake.records())
    d.stop()  # idempotent: no second quit, no error
    assert len(fake.records()) == n
    assert d.status()["daemon_alive"] is False


def test_worker_env_without_thread_percentage_and_before_start(fake: FakeMps, tmp_path: Path) -> None:
    d = daemon_for(fake, tmp_path / "run")
    with pytest.raises(RuntimeError):
        d.worker_env(0)
    env = d.start()
    try:
        assert d.worker_env(0) == env and "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env
        assert d.start() == env  # a second start() changes nothing
        assert len(fake.records("daemon")) == 1
    finally:
        d.stop()


def test_foreign_daemon_is_refused_and_left_running(fake: FakeMps, tmp_path: Path) -> None:
    other = tmp_path / "other-pipe"
    pid = fake.start_foreign(other)
    d = daemon_for(fake, tmp_path / "run")
    with pytest.raises(mps.MpsError) as err:
        d.start()
    text = str(err.value)
    assert f"pid {pid}" in text and str(other) in text and "use_existing" in text
    d.stop()
    assert mps._alive(pid) and "quit" not in fake.commands(other)
    assert fake.records("daemon")[-1]["pid"] == pid  # ours never launched
    fake.run(other, stdin="quit\n")


def test_use_existing_adopts_and_never_stops_it(fake: FakeMps, tmp_path: Path) -> None:
    other = tmp_path / "other-pipe"
    pid = fake.start_foreign(other)
    d = daemon_for(fake, tmp_path / "run", cfg(use_existing=True))
    env = d.start()
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(other) and not d.ours and d.pid == pid
    assert d.status()["ours"] is False and d.status()["daemon_alive"]
    d.stop()
    assert mps._alive(pid) and "quit" not in fake.commands(other)
    assert len(fake.records("daemon")) == 1
    fake.run(other, stdin="quit\n")


def test_use_existing_without_a_daemon_starts_ours(fake: FakeMps, tmp_path: Path) -> None:
    d = daemon_for(fake, tmp_path / "run", cfg(use_existing=True))
    d.start()
    assert d.ours
    d.stop()
    assert not mps._alive(d.pid)


def test_daemon_in_default_pipe_dir_is_found_without_process_lookup(fake: FakeMps, tmp_path: Path) -> None:
    default = tmp_path / "default-pipe"
    pid = fake.start_foreign(default)
    # Another PID namespace: no process is visible, but the default pipe directory answers.
    d = daemon_for(fake, tmp_path / "run", list_processes=lambda: [])
    with pytest.raises(mps.MpsError, match=f"pid {pid} with pipe directory {default}"):
        d.start()
    fake.run(default, stdin="quit\n")


def test_unreadable_foreign_daemon_is_reported(fake: FakeMps, tmp_path: Path) -> None:
    other_user = mps.MpsProcess(pid=4242, role=mps.CONTROL, ppid=1, pipe_dir=None)
    d = daemon_for(fake, tmp_path / "run", list_processes=lambda: [other_user])
    with pytest.raises(mps.MpsError, match="pid 4242 with pipe directory unknown"):
        d.check()


def test_missing_binary_error_text(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mps, "SEARCH_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(mps.MpsError) as err:
        mps.MpsDaemon(cfg(), tmp_path / "run", UUIDS, nvml=FakeNvml({})).start()
    assert str(err.value) == (
        f"mps.enabled = true but nvidia-cuda-mps-control was not found on PATH or in "
        f"{tmp_path / 'nowhere'}: install the NVIDIA driver's compute utilities, or set "
        "mps.enabled = false"
    )
    with pytest.raises(mps.MpsError, match="is not an executable file"):
        mps.find_binary(str(tmp_path / "nvidia-cuda-mps-control"))


def test_binary_found_in_search_dirs(monkeypatch: pytest.MonkeyPatch, fake: FakeMps, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(mps, "SEARCH_DIRS", (str(tmp_path / "nowhere"), str(fake.dir)))
    assert mps.find_binary() == str(fake.binary)


def test_compute_modes(fake: FakeMps, tmp_path: Path) -> None:
    ok = daemon_for(fake, tmp_path / "run", nvml=FakeNvml({UUIDS[0]: 3, UUIDS[1]: 0}))
    ok.check()
    assert ok.compute_modes == {UUIDS[0]: "exclusive_process", UUIDS[1]: "default"}
    unknown = daemon_for(fake, tmp_path / "run", nvml=FakeNvml({UUIDS[0]: 0}))
    unknown.check()
    assert unknown.compute_modes == {UUIDS[0]: "default", UUIDS[1]: "unknown"}
    bad = daemon_for(fake, tmp_path / "run", nvml=FakeNvml({UUIDS[0]: 0, UUIDS[1]: 2}))
    with pytest.raises(mps.MpsError, match=f"GPU {UUIDS[1]} is in compute mode PROHIBITED"):
        bad.start()
    assert not fake.records("daemon")


def test_stop_after_a_worker_crash_ends_daemon_and_server(fake: FakeMps, tmp_path: Path) -> None:
    d = daemon_for(fake, tmp_path / "run")
    env = d.start()
    # A client makes the daemon start a server; then the "worker" dies by SIGKILL, as a crashed one would.
    worker = subprocess.Popen(["sleep", "600"], env=dict(os.environ, **d.worker_env(0)))
    fake.behave(client_pid=worker.pid)
    assert fake.run(Path(env["CUDA_MPS_PIPE_DIRECTORY"]), stdin="start_server -uid 0\n").returncode == 0
    d._servers = None
    st = d.status()
    assert len(st["servers"]) == 1 and st["clients"] == {str(st["servers"][0]): [worker.pid]}
    server = st["servers"][0]
    worker.kill()
    worker.wait()
    d.stop()
    assert not mps._alive(d.pid) and not mps._alive(server)


def test_stop_escalates_when_the_daemon_ignores_quit_and_sigterm(
    fake: FakeMps, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.behave(ignore_quit=True, ignore_term=True)
    d = daemon_for(fake, tmp_path / "run")
    d.start()
    pid = d.pid
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="orchestrator.supervisor.mps"):
        d.stop()
    assert not mps._alive(pid)
    assert time.monotonic() - t0 < 2.0 + 3.0 + 2.0 + 2.0
    assert "quit, then SIGKILL" in caplog.text and not (tmp_path / "run" / "mps" / "pipe").exists()


def test_stop_when_the_daemon_already_died(fake: FakeMps, tmp_path: Path) -> None:
    d = daemon_for(fake, tmp_path / "run")
    d.start()
    os.kill(d.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while mps._alive(d.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    d.stop()  # quit finds no daemon; stop still cleans up without raising
    assert not (tmp_path / "run" / "mps" / "pipe").exists()


def test_stale_daemon_of_this_run_dir_is_replaced(fake: FakeMps, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stale = fake.start_foreign(run_dir / "mps" / "pipe")  # left by a supervisor that was SIGKILLed
    d = daemon_for(fake, run_dir)
    d.start()
    try:
        assert d.pid != stale and not mps._alive(stale)
        assert "quit" in [r["command"] for r in fake.records("command") if r["pid"] == stale]
    finally:
        d.stop()


def test_launch_failure_names_the_reason(fake: FakeMps, tmp_path: Path) -> None:
    fake.behave(fail_start="no GPU for MPS")
    d = daemon_for(fake, tmp_path / "run")
    with pytest.raises(mps.MpsError, match="exited with code 3: fake: cannot start: no GPU for MPS"):
        d.start()
    d.stop()  # safe after a failed start


def test_daemon_that_never_answers_times_out_with_its_log(fake: FakeMps, tmp_path: Path) -> None:
    fake.behave(die_at_start=True)
    d = mps.MpsDaemon(
        cfg(),
        tmp_path / "run",
        UUIDS,
        binary=str(fake.binary),
        nvml=FakeNvml(dict.fromkeys(UUIDS, 0)),
        default_pipe_dir=str(tmp_path / "default-pipe"),
        timeout_s=1.0,
    )
    t0 = time.monotonic()
    with pytest.raises(mps.MpsError, match="did not answer within 1s; no log output"):
        d.start()
    assert time.monotonic() - t0 < 5
    d.stop()


def test_list_mps_processes_sees_the_daemon_and_its_pipe_dir(fake: FakeMps, tmp_path: Path) -> None:
    pipe = tmp_path / "p"
    pid = fake.start_foreign(pipe)
    found = [p for p in mps.list_mps_processes() if p.pid == pid]
    assert found == [mps.MpsProcess(pid, mps.CONTROL, psutil.Process(pid).ppid(), str(pipe))]
    fake.run(pipe, stdin="quit\n")


@pytest.mark.parametrize(
    ("workers", "mps_keys", "expect"),
    [
        ({"per_gpu": 2}, {}, ["workers.per_gpu = 2 without MPS"]),
        ({"per_gpu": 1}, {"enabled": True}, ["gains nothing from MPS"]),
        ({"per_gpu": 2}, {"active_thread_percentage": 50}, ["without MPS", "have no effect unless"]),
        (
            {"per_gpu": 2},
            {"enabled": True, "active_thread_percentage": 40},
            ["leaves part of each GPU's SMs unused"],
        ),
        ({"per_gpu": 2}, {"enabled": True, "active_thread_percentage": 50}, []),
    ],
)
def test_config_warnings(workers: dict, mps_keys: dict, expect: list[str]) -> None:
    c = parse_config({"workers": {"device": "gpu", **workers}, "mps": mps_keys}, check_files=False)
    got = mps.config_warnings(c)
    assert len(got) == len(expect) and all(e in g for e, g in zip(expect, got, strict=True))


def test_supervisor_starts_mps_before_workers_and_stops_it(
    fake: FakeMps, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor's side (issue 6 integration): plan -> daemon -> worker env -> status -> teardown."""
    from orchestrator.supervisor import core as supervisor

    c = parse_config(
        {
            "orchestrator": {"run_dir": str(tmp_path / "run")},
            "workers": {"device": "gpu", "per_gpu": 2},
            "mps": {"enabled": True, "active_thread_percentage": 50},
        },
        check_files=False,
    )
    sup = supervisor.Supervisor(c)
    if not hasattr(sup, "mps"):
        pytest.skip("the supervisor does not manage MPS yet (issue 6 integration pending)")
    gpu = {"index": 0, "uuid": UUIDS[0], "name": "fake GPU", "pci_bus_id": "0", "cpu_affinity": []}
    monkeypatch.setattr(supervisor, "discover_or_explain", lambda cfg: [gpu])
    monkeypatch.setattr(mps, "check_compute_modes", lambda uuids, nvml=None: dict.fromkeys(uuids, "default"))
    monkeypatch.setenv("PATH", f"{fake.dir}{os.pathsep}{os.environ['PATH']}")
    lock = sup.rundir.acquire()
    try:
        sup._plan()
        pipe = str(tmp_path / "run" / "mps" / "pipe")
        envs = [w.plan.env for w in sup.workers.values()]
        assert len(envs) == 2 and all(
            e["CUDA_MPS_PIPE_DIRECTORY"] == pipe
            and e["CUDA_VISIBLE_DEVICES"] == UUIDS[0]
            and e["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
            for e in envs
        )
        st = sup.status()["mps"]
        assert st["daemon_alive"] and st["ours"] and st["pipe_dir"] == pipe
        pid = st["daemon_pid"]
    finally:
        sup._teardown()
        os.close(lock)
    assert not mps._alive(pid) and fake.commands(Path(pipe))[-1] == "quit"
