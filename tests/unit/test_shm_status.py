"""Shared-memory observability: the heartbeat's `shm` entry in `status --json`, the live view's shm column
and the Prometheus families. No processes: heartbeats are maps decoded by the supervisor's inbox decoder and
fed to a WorkerHandle and a Monitor."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from orchestrator.cli import status_view
from orchestrator.common import messages
from orchestrator.common.config import Config
from orchestrator.common.rundir import RunDir
from orchestrator.supervisor.core import Supervisor
from orchestrator.supervisor.devices import WorkerPlan
from orchestrator.supervisor.monitor.metrics import make_registry
from orchestrator.supervisor.monitor.monitor import Monitor
from orchestrator.supervisor.worker_handle import WorkerHandle, shm_status

OFF = {"enabled": False, "arena_bytes": 0, "free_bytes": 0, "leases": 0, "requests": 0, "bytes": 0}


def shm(requests: int, nbytes: int, leases: int = 2, free: int = 48 << 20) -> dict:
    return {
        "arena_bytes": 64 << 20,
        "free_bytes": free,
        "leases": leases,
        "requests": requests,
        "bytes": nbytes,
        "path": "/dev/shm/orchestrator-prod-w0",
        "registered": True,
        "refused": 0,
    }


PID = 4321  # the worker process of handle()


def hb(requests: int, shm_entry: dict | None = None) -> messages.Heartbeat:
    """A heartbeat as the supervisor has it: a worker's map through the inbox decoder."""
    msg = {
        "kind": "hb",
        "v": messages.VERSION,
        "id": "w0",
        "pid": PID,
        "t_ns": time.monotonic_ns(),
        "progress": requests,
        "requests": requests,
        "queued": 0,
        "inflight": 0,
        "faults": 0,
        "errors": {},
        "dropped": 0,
        "host_ns": 0,
    }
    if shm_entry is not None:
        msg["shm"] = shm_entry
    out = messages.WORKER_MESSAGES.decode(msgpack.packb(msg))
    assert isinstance(out, messages.Heartbeat)
    return out


def handle(tmp_path: Path) -> WorkerHandle:
    w = WorkerHandle(
        WorkerPlan("w0", "gpu:0", "ipc://w0", None, gpu_uuid="GPU-a"), Config(), RunDir(tmp_path)
    )
    w.proc = SimpleNamespace(pid=PID)  # type: ignore[assignment]  # spawned, as far as the messages go
    return w


# --- status --json ---------------------------------------------------------------------------------------


def test_status_shm_is_always_present(tmp_path: Path) -> None:
    w = handle(tmp_path)
    assert w.describe(time.monotonic())["shm"] == OFF  # no heartbeat yet
    w.on_heartbeat(hb(10), time.monotonic())  # transport.shm_mb = 0: no `shm` entry
    assert w.describe(time.monotonic())["shm"] == OFF
    beat = hb(10)
    beat.shm = None  # or a null one
    w.on_heartbeat(beat, time.monotonic())
    assert w.describe(time.monotonic())["shm"] == OFF


def test_status_shm_from_heartbeat(tmp_path: Path) -> None:
    w = handle(tmp_path)
    w.on_heartbeat(hb(100, shm(87, 87 * 4096)), time.monotonic())
    desc = w.describe(time.monotonic())
    assert desc["shm"] == {**shm(87, 87 * 4096), "enabled": True}
    assert desc["requests"] == 100  # all requests, both paths
    out = json.loads(json.dumps(desc))  # what `status --json` prints (it crosses the control socket first)
    assert msgpack.unpackb(msgpack.packb(out))["shm"]["requests"] == 87
    assert isinstance(out["shm"]["requests"], int) and out["shm"]["enabled"] is True


@pytest.mark.parametrize(
    ("key", "value"), [("requests", 3.5), ("bytes", None), ("leases", "2"), ("arena_bytes", "x")]
)
def test_a_heartbeat_with_counts_that_are_not_integers_is_refused(key: str, value: object) -> None:
    """The status counts are integers because the inbox decoder refuses anything else (with a reason)."""
    with pytest.raises(messages.MessageError, match=f"shm.{key}"):
        hb(1, shm(1, 1) | {key: value})


def test_shm_status_counts_are_integers() -> None:
    s = shm_status(hb(1, shm(3, 4096)).shm)
    assert s == {**shm(3, 4096), "enabled": True}
    assert all(type(s[k]) is int for k in ("requests", "bytes", "leases", "arena_bytes", "free_bytes"))
    assert shm_status(None) == OFF


# --- live view -------------------------------------------------------------------------------------------


def text_of(renderable: object, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def two_workers() -> dict:
    w = {
        "device": "gpu:0",
        "gpu_uuid": "GPU-a",
        "pid": 5001,
        "state": "ready",
        "restarts": 0,
        "uptime_s": 60.0,
        "faults": 0,
        "queued": 0,
        "inflight": 0,
    }
    return {
        "name": "prod",
        "pid": 4242,
        "run_dir": "/tmp/x",
        "uptime_s": 61.0,
        "mps": None,
        "workers": [{**w, "id": "w0"}, {**w, "id": "w1", "device": "gpu:1", "pid": 5002}],
        "monitor": {"workers": {"w0": {"requests_per_s": 12345.0}, "w1": {}}},
    }


def _row(out: str, wid: str) -> str:
    return next(line for line in out.splitlines() if line.lstrip().startswith(wid))


def test_live_view_shm_column() -> None:
    status = two_workers()
    w0, w1 = status["workers"]
    w0.update(requests=1000, shm={**shm(875, 1 << 30), "enabled": True})
    w1.update(requests=0, shm=dict(OFF))
    out = text_of(status_view.render(status))
    header = next(line for line in out.splitlines() if line.lstrip().startswith("worker"))
    assert " shm " in header
    assert "87%" in _row(out, "w0")
    assert " off " in _row(out, "w1")
    assert max(len(line.rstrip()) for line in out.splitlines()[:4]) <= 200


def test_live_view_shm_share_edges() -> None:
    def cell(w: dict) -> str:
        return status_view._shm(w).plain

    on = {"enabled": True}
    assert cell({"requests": 0, "shm": {**on, "requests": 0}}) == "-"  # nothing served yet
    assert cell({"requests": 400, "shm": {**on, "requests": 400}}) == "100%"
    assert cell({"requests": 1000, "shm": {**on, "requests": 999}}) == "99%"  # 100% means all of them
    assert cell({"requests": 1000, "shm": {**on, "requests": 1}}) == "<1%"
    assert cell({"requests": 1000, "shm": {**on, "requests": 0}}) == "0%"
    assert cell({"requests": 5, "shm": dict(OFF)}) == "off"
    assert cell({"requests": 5}) == "-"  # a supervisor that predates the shm status


# --- Prometheus ------------------------------------------------------------------------------------------


def _samples(mon: Monitor) -> dict[tuple[str, str], float]:
    text = generate_latest(make_registry(mon.metrics_data)).decode()
    return {
        (s.name, s.labels.get("worker", "")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("orchestrator_shm")
    }


def test_metrics_per_worker_and_across_restarts(tmp_path: Path) -> None:
    mon = Monitor(Config(), tmp_path)
    mon.start([])
    try:
        mon.set_worker("w0", 100, None)
        mon.set_worker("w1", 101, None)
        mon.on_shm("w0", shm_status(messages.ShmStats(**shm(10, 1000))))
        mon.on_shm("w0", shm_status(messages.ShmStats(**shm(30, 3000, leases=3, free=32 << 20))))
        mon.on_shm("w1", shm_status(None))  # shared memory off: no shm series for w1
        got = _samples(mon)
        assert got[("orchestrator_shm_requests_total", "w0")] == 30
        assert got[("orchestrator_shm_bytes_total", "w0")] == 3000
        assert got[("orchestrator_shm_leases", "w0")] == 3
        assert got[("orchestrator_shm_arena_bytes", "w0")] == 64 << 20
        assert got[("orchestrator_shm_free_bytes", "w0")] == 32 << 20
        assert not any(wid == "w1" for _, wid in got)

        # a restart: the new process counts from 0, the counters keep growing, gauges wait for its arena
        mon.set_worker("w0", 200, None)
        got = _samples(mon)
        assert got[("orchestrator_shm_requests_total", "w0")] == 30
        assert (
            got[("orchestrator_shm_leases", "w0")] == 0 and got[("orchestrator_shm_arena_bytes", "w0")] == 0
        )
        mon.on_shm("w0", shm_status(messages.ShmStats(**shm(5, 500, leases=1))))
        got = _samples(mon)
        assert got[("orchestrator_shm_requests_total", "w0")] == 35
        assert got[("orchestrator_shm_bytes_total", "w0")] == 3500
        assert got[("orchestrator_shm_leases", "w0")] == 1
    finally:
        mon.stop()


def test_metric_families_are_typed() -> None:
    data = {
        "workers": {
            "w0": {
                "up": True,
                "shm": {
                    "requests_total": 7,
                    "bytes_total": 70,
                    "leases": 1,
                    "arena_bytes": 1 << 20,
                    "free_bytes": 1 << 19,
                },
            }
        },
        "gpus": [],
        "stall_counts": {},
    }
    fams = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest(make_registry(lambda: data)).decode())
    }
    assert fams["orchestrator_shm_requests"].type == "counter"
    assert fams["orchestrator_shm_bytes"].type == "counter"
    for name in ("orchestrator_shm_leases", "orchestrator_shm_arena_bytes", "orchestrator_shm_free_bytes"):
        assert fams[name].type == "gauge"


def test_supervisor_passes_heartbeat_shm_to_status_and_monitor(tmp_path: Path) -> None:
    """The supervisor's inbox handler, on a stand-in supervisor: one heartbeat feeds both views."""
    mon = Monitor(Config(), tmp_path)
    mon.start([])
    w = handle(tmp_path)
    fake = SimpleNamespace(workers={"w0": w}, monitor=mon)
    try:
        mon.set_worker("w0", 100, "GPU-a")
        Supervisor._on_inbox(fake, hb(50, shm(40, 4096)))  # type: ignore[arg-type]
        assert w.describe(time.monotonic())["shm"]["requests"] == 40
        assert _samples(mon)[("orchestrator_shm_requests_total", "w0")] == 40
    finally:
        mon.stop()
