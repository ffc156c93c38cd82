"""The monitor facade without NVML (reports in, snapshot out, stalls logged) and its Prometheus
exposition, parsed with prometheus_client's own text parser."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.common.config import Config
from orchestrator.common.histogram import Histogram
from orchestrator.supervisor.monitor.http import start_http_server
from orchestrator.supervisor.monitor.metrics import make_registry
from orchestrator.supervisor.monitor.monitor import Monitor
from orchestrator.supervisor.monitor.stalls import CAUSES
from tests.unit.monitor_data import batch, driver_lock_stall
from workers.driver_journal import DriverJournal
from workers.telemetry import WorkerTelemetry


def fed_monitor(tmp_path: Path, cfg: Config | None = None) -> tuple[Monitor, WorkerTelemetry]:
    mon = Monitor(cfg or Config(), tmp_path)
    mon.start([])
    mon.set_worker("w0", 4321, None)
    tel = WorkerTelemetry("w0", mon.cfg.monitor, DriverJournal(), "blocking")
    for i in range(200):
        tel.on_batch(batch(500.0 if i % 10 else 5000.0), 150.0)
    tel.note_failure(20)
    tel.note_queue(3, 1)
    mon.on_report("w0", tel.report())
    return mon, tel


def test_snapshot_after_reports(tmp_path: Path) -> None:
    mon, tel = fed_monitor(tmp_path)
    try:
        snap = mon.snapshot()
        w = snap["workers"]["w0"]
        assert snap["nvml"] is False and snap["gpus"] == []
        assert w["requests_total"] == 400 and w["items_total"] == 800 and w["failures_total"] == 1
        assert w["requests_per_s"] > 0 and w["items_per_s"] == pytest.approx(2 * w["requests_per_s"])
        assert 0.45 <= w["latency_p50_ms"] <= 0.6 and 4.8 <= w["latency_p99_ms"] <= 5.8  # bucket resolution
        assert (w["queued"], w["inflight"], w["pid"]) == (3, 1, 4321)
        assert w["gpu_busy_pct"] is not None and w["stalls"] == 0
        assert w["journal_mode"] == "own"  # what the worker's last report said
        assert set(snap["host"]) >= {"cpu_pct", "mem_pct", "load1"}
        assert set(snap["stall_counts"]) == set(CAUSES)
        # counters survive a worker restart: a new pid starts its own counts from zero
        mon.set_worker("w0", 9999, None)
        tel2 = WorkerTelemetry("w0", mon.cfg.monitor, DriverJournal(), "blocking")
        tel2.pid = 9999
        tel2.on_batch(batch(500.0), 150.0)
        mon.on_report("w0", tel2.report())
        assert mon.snapshot()["workers"]["w0"]["requests_total"] == 402
    finally:
        mon.stop()


def test_on_stall_logs_and_counts(tmp_path: Path) -> None:
    mon, _ = fed_monitor(tmp_path)
    try:
        now = time.monotonic_ns()
        cand = driver_lock_stall(now)
        rec = mon.on_stall("w0", cand)
        snap = mon.snapshot()
    finally:
        mon.stop()
    assert rec["cause"] == "driver_lock" and "pinned_alloc" in rec["summary"]
    assert snap["stall_counts"]["driver_lock"] == 1
    assert snap["workers"]["w0"]["stalls"] == 1 and snap["workers"]["w0"]["last_stall_cause"] == "driver_lock"
    assert "candidate" not in snap["stalls"][0]  # status carries the brief form
    assert json.loads(json.dumps(snap))["stall_counts"]["driver_lock"] == 1  # status --json
    assert msgpack.unpackb(msgpack.packb(snap))["workers"]["w0"]["stalls"] == 1  # control socket
    assert (tmp_path / "stalls.jsonl").read_text().count("pinned_alloc") >= 1


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_exposition_parses_with_units_and_labels(tmp_path: Path) -> None:
    mon, _ = fed_monitor(tmp_path)
    data = mon.metrics_data()
    data["nvml"] = True
    data["gpus"] = [
        {
            "index": 0,
            "uuid": "GPU-1",
            "sm_clock_mhz": 1410,
            "sm_clock_max_mhz": 1980,
            "power_w": 693.0,
            "power_limit_w": 700.0,
            "temp_c": 71,
            "util_pct": 98,
            "mem_used_bytes": 1 << 30,
            "throttle_reasons": ["sw_power_cap"],
            "foreign_pids": [77],
            "supported_reasons": ["gpu_idle", "sw_power_cap", "hw_thermal"],
            "reason_counters_ns": {"sw_power_cap": 4_848_582_848},
        }
    ]
    data["stall_counts"] = {"driver_lock": 2, "unknown": 0}
    mon.stop()
    text = generate_latest(make_registry(lambda: data)).decode()
    fams = _families(text)
    assert all(name.startswith("orchestrator_") for name in fams)

    def value(fam: str, sample: str, **labels: str) -> float:
        return next(
            s.value
            for s in fams[fam].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("orchestrator_requests", "orchestrator_requests_total", worker="w0") == 400
    assert (
        value("orchestrator_request_failures", "orchestrator_request_failures_total", worker="w0", code="20")
        == 1
    )
    lat = [s for s in fams["orchestrator_request_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert lat[-1].labels["le"] == "+Inf" and lat[-1].value == 400
    assert value("orchestrator_request_latency_seconds", "orchestrator_request_latency_seconds_count") == 400
    le_ms = next(s.value for s in lat if s.labels["le"] == "0.001024")  # 1024 us edge
    assert le_ms == 360  # the 500 us requests, not the 5 ms ones
    assert value("orchestrator_gpu_sm_clock_hertz", "orchestrator_gpu_sm_clock_hertz", gpu="0") == 1410e6
    assert value("orchestrator_gpu_power_limit_watts", "orchestrator_gpu_power_limit_watts") == 700.0
    assert value("orchestrator_gpu_utilization_ratio", "orchestrator_gpu_utilization_ratio") == pytest.approx(
        0.98
    )
    assert (
        value(
            "orchestrator_gpu_clock_event_reason",
            "orchestrator_gpu_clock_event_reason",
            reason="sw_power_cap",
        )
        == 1.0
    )
    assert (
        value(
            "orchestrator_gpu_clock_event_reason", "orchestrator_gpu_clock_event_reason", reason="hw_thermal"
        )
        == 0.0
    )
    assert value(
        "orchestrator_gpu_clock_event_seconds",
        "orchestrator_gpu_clock_event_seconds_total",
        reason="sw_power_cap",
    ) == pytest.approx(4.848582848)
    assert value("orchestrator_gpu_foreign_processes", "orchestrator_gpu_foreign_processes") == 1
    assert value("orchestrator_stalls", "orchestrator_stalls_total", cause="driver_lock") == 2
    assert value("orchestrator_nvml_available", "orchestrator_nvml_available") == 1.0
    assert value("orchestrator_queued_requests", "orchestrator_queued_requests", worker="w0") == 3
    for fam in fams.values():
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name


def test_histogram_buckets_are_cumulative_in_seconds() -> None:
    h = Histogram()
    for v in (10.0, 100.0, 1000.0):
        h.record(v)
    data = {"workers": {"w0": {"hists": {"latency": h}, "up": True}}, "gpus": [], "stall_counts": {}}
    fams = _families(generate_latest(make_registry(lambda: data)).decode())
    buckets = [
        (s.labels["le"], s.value)
        for s in fams["orchestrator_request_latency_seconds"].samples
        if s.name.endswith("_bucket")
    ]
    assert ("1.6e-05", 1.0) in buckets and ("0.000128", 2.0) in buckets and ("0.001024", 3.0) in buckets
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_monitor_serves_metrics_on_loopback(tmp_path: Path) -> None:
    port = _free_port()
    cfg = dataclasses.replace(Config(), monitor=dataclasses.replace(Config().monitor, metrics_port=port))
    mon, _ = fed_monitor(tmp_path, cfg)
    try:
        assert mon.metrics_server is not None and mon.metrics_server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        mon.stop()
    assert 'orchestrator_requests_total{worker="w0"} 400.0' in text
    assert "orchestrator_nvml_available 0.0" in text


def test_port_in_use_leaves_the_monitor_running(tmp_path: Path) -> None:
    blocker = start_http_server("127.0.0.1", 0, dict, dict)
    port = blocker.server_address[1]
    cfg = dataclasses.replace(Config(), monitor=dataclasses.replace(Config().monitor, metrics_port=port))
    try:
        mon, _ = fed_monitor(tmp_path, cfg)
        assert mon.metrics_server is None and "cannot listen" in (mon.snapshot()["metrics_error"] or "")
        mon.stop()
    finally:
        blocker.shutdown()
        blocker.server_close()
