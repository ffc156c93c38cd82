"""The rich status view: worker rows with GPU columns, the host line, latest stalls, and the live loop
surviving fetch errors. Rendered into a recording Console, no terminal needed."""

from __future__ import annotations

import io
import time
from pathlib import Path

from rich.console import Console

from orchestrator.cli import status_view
from orchestrator.common.config import Config
from orchestrator.supervisor.monitor.monitor import Monitor
from workers.driver_journal import DriverJournal
from workers.pipeline import Batch, Request
from workers.telemetry import WorkerTelemetry


def text_of(renderable: object, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def gpu_status() -> dict:
    stall = {
        "time": time.time(),
        "worker_id": "w1",
        "gpu_index": 1,
        "kind": ["enqueue"],
        "enqueue_us": 31200.0,
        "latency_us": 31900.0,
        "cause": "driver_lock",
        "causes": [
            {
                "cause": "driver_lock",
                "score": 0.95,
                "evidence": {
                    "ops": [{"op": "pinned_alloc", "detail": "64 MiB", "dur_us": 30100.0}],
                    "n_ops": 1,
                    "coverage": 0.97,
                },
            },
            {"cause": "lock_wait", "score": 0.74, "evidence": {"blocked_us": 30000.0, "vcsw": 3}},
        ],
    }
    gpu = {
        "index": 0,
        "uuid": "GPU-a",
        "name": "H200",
        "sm_clock_mhz": 1410,
        "sm_clock_max_mhz": 1980,
        "power_w": 693.4,
        "power_limit_w": 700.0,
        "temp_c": 71,
        "temp_slowdown_c": 89,
        "util_pct": 99,
        "mem_used_bytes": 1 << 34,
        "throttle_reasons": ["sw_power_cap"],
        "foreign_pids": [],
    }
    return {
        "name": "prod",
        "pid": 4242,
        "run_dir": "/run/user/0/orchestrator/prod",
        "uptime_s": 3725.0,
        "mps": None,
        "workers": [
            {
                "id": "w0",
                "device": "gpu:0",
                "gpu_uuid": "GPU-a",
                "pid": 5001,
                "state": "ready",
                "restarts": 0,
                "endpoint": "ipc://x",
                "uptime_s": 3700.0,
                "cpu_affinity": [0, 1],
                "module_loading": "EAGER",
                "faults": 0,
                "queued": 4,
                "inflight": 2,
            },
            {
                "id": "w1",
                "device": "gpu:1",
                "gpu_uuid": "GPU-b",
                "pid": None,
                "state": "quarantined",
                "restarts": 5,
                "endpoint": "ipc://y",
                "uptime_s": None,
                "cpu_affinity": None,
                "module_loading": "EAGER",
                "faults": 3,
                "queued": None,
                "inflight": None,
            },
        ],
        "monitor": {
            "nvml": True,
            "gpus": [
                gpu,
                {
                    **gpu,
                    "index": 1,
                    "uuid": "GPU-b",
                    "throttle_reasons": ["hw_thermal"],
                    "foreign_pids": [777],
                },
            ],
            "workers": {
                "w0": {
                    "requests_per_s": 12345.0,
                    "items_per_s": 98760.0,
                    "latency_p50_ms": 0.84,
                    "latency_p99_ms": 2.5,
                    "gpu_busy_pct": 93.7,
                    "stalls": 0,
                    "last_stall_cause": None,
                },
                "w1": {"stalls": 7, "last_stall_cause": "driver_lock"},
            },
            "stalls": [stall],
            "stall_counts": {"driver_lock": 7, "unknown": 0},
            "host": {"cpu_pct": 41.0, "mem_pct": 12.5, "load1": 3.2, "ncpu": 16, "psi_cpu_some_avg10": 1.5},
        },
    }


def test_worker_rows_show_serving_and_gpu_columns() -> None:
    out = text_of(status_view.render(gpu_status()))
    row0 = next(line for line in out.splitlines() if line.lstrip().startswith("w0"))
    for piece in (
        "gpu:0",
        "ready",
        "5001",
        "12.3k",
        "98.8k",
        "840us",
        "2.5ms",
        "4/2",
        "94%",
        "1410/1980",
        "693/700W",
        "71C",
        "sw_power_cap",
    ):
        assert piece in row0, (piece, row0)
    row1 = next(line for line in out.splitlines() if line.lstrip().startswith("w1"))
    assert "quarantined" in row1 and "hw_thermal" in row1 and "+1 foreign" in row1 and "7 driver_lock" in row1
    assert "1h02m" in out and "prod" in out


def test_host_line_and_stalls() -> None:
    out = text_of(status_view.render(gpu_status()))
    host = next(line for line in out.splitlines() if line.startswith("host"))
    assert "CPU 41%" in host and "mem 12%" in host and "load 3.20/16" in host and "MPS off" in host
    assert "NVML on" in host
    assert "latest stalls" in out and "pinned_alloc 64 MiB 30.1 ms" in out and "driver_lock 0.95" in out
    assert "lock_wait 0.74" in out and "31.2ms" in out
    assert "stalls by cause: driver_lock 7" in out
    assert "steal" not in host  # shown only when the hypervisor took time
    stolen = gpu_status()
    stolen["monitor"]["host"]["steal_pct"] = 2.5
    host = next(line for line in text_of(status_view.render(stolen)).splitlines() if line.startswith("host"))
    assert "steal 2.5%" in host


def test_renders_a_real_monitor_snapshot(tmp_path: Path) -> None:
    """Shapes must agree: the view is fed with what Monitor.snapshot() really returns (CPU mode)."""
    mon = Monitor(Config(), tmp_path)
    mon.start([])
    mon.set_worker("w0", 321, None)
    tel = WorkerTelemetry("w0", mon.cfg.monitor, DriverJournal(), "spin")
    now = time.monotonic_ns()
    for i in range(50):
        b = Batch(None, [(Request(None, i, {}, 8, now - 700_000), 0)], 8, 8)  # type: ignore[arg-type]
        b.t_launch_ns, b.t_enqueued_ns, b.t_done_ns = now - 400_000, now - 300_000, now
        tel.on_batch(b, None)
    mon.on_report("w0", tel.report())
    status = {
        "name": "cpu",
        "pid": 1,
        "run_dir": str(tmp_path),
        "uptime_s": 5.0,
        "mps": None,
        "workers": [
            {
                "id": "w0",
                "device": "cpu",
                "gpu_uuid": None,
                "pid": 321,
                "state": "ready",
                "restarts": 0,
                "endpoint": "ipc://z",
                "uptime_s": 5.0,
                "cpu_affinity": [0],
                "module_loading": None,
                "faults": 0,
                "queued": 0,
                "inflight": 0,
            }
        ],
        "monitor": mon.snapshot(),
    }
    mon.stop()
    out = text_of(status_view.render(status))
    row = next(line for line in out.splitlines() if line.lstrip().startswith("w0"))
    assert "cpu" in row and "ready" in row and "321" in row
    assert "NVML off (no GPU workers)" in out


def test_renders_with_missing_sections() -> None:
    out = text_of(status_view.render({"name": "x"}))
    assert "orchestrator x" in out and "host" in out


def test_live_shows_unreachable_supervisor_and_stops_on_ctrl_c() -> None:
    calls = {"n": 0}

    def fetch() -> dict:
        calls["n"] += 1
        if calls["n"] == 1:
            return gpu_status()
        if calls["n"] == 2:
            raise ConnectionRefusedError("control socket gone")
        raise KeyboardInterrupt

    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=False, record=True)
    status_view.live(fetch, refresh_hz=50, console=console)
    out = console.export_text()
    assert calls["n"] == 3
    assert "supervisor not answering" in out and "control socket gone" in out
    assert "last known state" in out


def test_engine_line_says_which_driver_journal_runs_and_why_not_cupti() -> None:
    def worker(wid: str, journal: dict) -> dict:
        eng = {"kind": "synthetic", "device": "H200", "cuda_graphs": True, "module_loading": "EAGER"}
        return {"id": wid, "engine": {**eng, "driver_journal": journal}}

    status = {
        "workers": [
            worker("w0", {"mode": "cupti", "note": None, "records": 19}),
            worker("w1", {"mode": "own", "note": "CUPTI not used: cupti-python is not installed"}),
        ],
        "monitor": {"stall_counts": {"driver_lock": 3}, "stall_driver_ops": {"cuMemHostRegister_v2": 3}},
    }
    out = text_of(status_view.render(status))
    assert "on w0: graphs on  module loading EAGER  driver journal cupti" in out
    assert "on w1: graphs on  module loading EAGER  driver journal own (CUPTI not used: cupti-python" in out
    assert "driver_lock by operation: cuMemHostRegister_v2 3" in out
    # The worker's reports say what the journal is now (on demand, CUPTI is armed mid-run)
    armed = "CUPTI armed at 22:47:03 by a launch blocked 4.0 ms; it stays armed"
    status["monitor"]["workers"] = {"w0": {"journal_mode": "cupti", "journal_note": armed}}  # type: ignore[index]
    out = text_of(status_view.render(status))
    assert f"on w0: graphs on  module loading EAGER  driver journal cupti ({armed})" in out
