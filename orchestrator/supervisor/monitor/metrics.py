"""Prometheus exposition of the monitor: a custom collector over a snapshot taken at scrape time.

Runs in the supervisor: the HTTP server thread (orchestrator/supervisor/monitor/http.py) calls collect(),
which reads Monitor.metrics_data() (thread-safe) and builds metric families; nothing is kept between scrapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from orchestrator.common.histogram import Histogram
from orchestrator.supervisor.monitor.nvml_sampler import REASON_NAMES

log = logging.getLogger(__name__)

_WORKER_HISTS = (
    (
        "latency",
        "orchestrator_request_latency_seconds",
        "End-to-end request latency in the worker (receive to reply)",
    ),
    ("queue", "orchestrator_queue_wait_seconds", "Time a request waited in the worker queue before staging"),
    ("enqueue", "orchestrator_enqueue_seconds", "Host time to stage and launch one batch"),
    ("gpu", "orchestrator_gpu_time_seconds", "Device time of one batch, from CUDA events"),
)
# (key in the worker's "shm" entry, metric name, help, family); only for workers that had shared memory on
_SHM_METRICS = (
    (
        "requests_total",
        "orchestrator_shm_requests",
        "Requests served through shared memory",
        CounterMetricFamily,
    ),
    (
        "bytes_total",
        "orchestrator_shm_bytes",
        "Payload bytes (inputs and outputs) through shared memory",
        CounterMetricFamily,
    ),
    (
        "leases",
        "orchestrator_shm_leases",
        "Client leases currently held on the worker's arena",
        GaugeMetricFamily,
    ),
    (
        "arena_bytes",
        "orchestrator_shm_arena_bytes",
        "Size of the worker's shared-memory arena",
        GaugeMetricFamily,
    ),
    (
        "free_bytes",
        "orchestrator_shm_free_bytes",
        "Free bytes in the worker's shared-memory arena",
        GaugeMetricFamily,
    ),
)
# (sample key, metric name, help, scale to base units)
_GPU_GAUGES = (
    ("sm_clock_mhz", "orchestrator_gpu_sm_clock_hertz", "Current SM clock", 1e6),
    ("sm_clock_max_mhz", "orchestrator_gpu_sm_clock_max_hertz", "Maximum SM clock", 1e6),
    ("mem_clock_mhz", "orchestrator_gpu_memory_clock_hertz", "Current memory clock", 1e6),
    (
        "power_w",
        "orchestrator_gpu_power_watts",
        "Power draw (NVML averages over 1 s on Ampere and newer)",
        1.0,
    ),
    ("power_limit_w", "orchestrator_gpu_power_limit_watts", "Enforced power limit", 1.0),
    ("temp_c", "orchestrator_gpu_temperature_celsius", "GPU temperature", 1.0),
    ("mem_temp_c", "orchestrator_gpu_memory_temperature_celsius", "Memory (HBM) temperature", 1.0),
    (
        "temp_slowdown_c",
        "orchestrator_gpu_slowdown_temperature_celsius",
        "Temperature at which the GPU slows down",
        1.0,
    ),
    ("util_pct", "orchestrator_gpu_utilization_ratio", "Fraction of time a kernel was running (NVML)", 0.01),
    ("mem_used_bytes", "orchestrator_gpu_memory_used_bytes", "Device memory in use", 1.0),
)


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = [(repr(edge / 1e6), float(n)) for edge, n in h.cumulative()]
    out.append(("+Inf", float(h.count)))
    return out


class MonitorCollector:
    """Builds every metric family from one `data()` call per scrape."""

    def __init__(self, data: Callable[[], dict]) -> None:
        self._data = data

    def collect(self) -> Iterator[Metric]:
        d = self._data()
        yield from self._workers(d.get("workers") or {})
        yield from self._gpus(d.get("gpus") or [])
        stalls = CounterMetricFamily("orchestrator_stalls", "Stalls by top-ranked cause", labels=["cause"])
        for cause, n in sorted((d.get("stall_counts") or {}).items()):
            stalls.add_metric([cause], n)
        yield stalls
        ops = CounterMetricFamily(
            "orchestrator_stall_driver_ops",
            "Stalls ranked driver_lock first, by the driver operation blamed (CUDA function or our own op)",
            labels=["operation"],
        )
        for name, n in sorted((d.get("stall_driver_ops") or {}).items()):
            ops.add_metric([name], n)
        yield ops
        yield GaugeMetricFamily(
            "orchestrator_nvml_available",
            "1 when GPU telemetry from NVML is on",
            value=1.0 if d.get("nvml") else 0.0,
        )

    def _workers(self, workers: dict[str, dict]) -> Iterator[Metric]:
        L = ["worker"]
        fams: dict[str, Any] = {
            "up": GaugeMetricFamily(
                "orchestrator_worker_up", "1 while the worker process is running", labels=L
            ),
            "info": GaugeMetricFamily(
                "orchestrator_worker_info",
                "1 per worker: the GPU it runs on (uuid, as on "
                "the orchestrator_gpu_* series; empty on CPU workers)",
                labels=L + ["uuid"],
            ),
            "rst": CounterMetricFamily(
                "orchestrator_worker_restarts",
                "Times the worker slot was started again after its process ended (crash, hang, kill)",
                labels=L,
            ),
            "req": CounterMetricFamily("orchestrator_requests", "Requests completed", labels=L),
            "bat": CounterMetricFamily("orchestrator_batches", "Batches completed", labels=L),
            "itm": CounterMetricFamily("orchestrator_items", "Items (batch rows) completed", labels=L),
            "fail": CounterMetricFamily(
                "orchestrator_request_failures", "Requests answered with an error", labels=["worker", "code"]
            ),
            "queued": GaugeMetricFamily(
                "orchestrator_queued_requests", "Requests waiting in the worker queue", labels=L
            ),
            "infl": GaugeMetricFamily(
                "orchestrator_inflight_batches", "Batches launched and not yet completed", labels=L
            ),
            "busy": GaugeMetricFamily(
                "orchestrator_gpu_busy_ratio",
                "Fraction of wall time the GPU ran this worker's batches (union of their event spans)",
                labels=L,
            ),
            "faults": CounterMetricFamily(
                "orchestrator_driver_faults",
                "Driver-lock operations (allocation, module load...) after READY",
                labels=L,
            ),
            "stalls": CounterMetricFamily(
                "orchestrator_worker_stalls",
                "Stalls by worker and top-ranked cause",
                labels=["worker", "cause"],
            ),
        }
        hists = {k: HistogramMetricFamily(name, doc, labels=L) for k, name, doc in _WORKER_HISTS}
        shm = {k: cls(name, doc, labels=L) for k, name, doc, cls in _SHM_METRICS}
        for wid, w in sorted(workers.items()):
            fams["up"].add_metric([wid], 1.0 if w.get("up") else 0.0)
            fams["info"].add_metric([wid, w.get("gpu_uuid") or ""], 1.0)
            fams["rst"].add_metric([wid], w.get("restarts_total", 0))
            fams["req"].add_metric([wid], w.get("requests_total", 0))
            fams["bat"].add_metric([wid], w.get("batches_total", 0))
            fams["itm"].add_metric([wid], w.get("items_total", 0))
            for code, n in sorted((w.get("failures") or {}).items()):
                fams["fail"].add_metric([wid, str(code)], n)
            if w.get("queued") is not None:
                fams["queued"].add_metric([wid], w["queued"])
            if w.get("inflight") is not None:
                fams["infl"].add_metric([wid], w["inflight"])
            if w.get("gpu_busy_pct") is not None:
                fams["busy"].add_metric([wid], w["gpu_busy_pct"] / 100.0)
            fams["faults"].add_metric([wid], w.get("faults_total", 0))
            for cause, n in sorted((w.get("stall_causes") or {}).items()):
                fams["stalls"].add_metric([wid, cause], n)
            for key, _, _ in _WORKER_HISTS:
                h = (w.get("hists") or {}).get(key)
                if h is not None and h.count:
                    hists[key].add_metric([wid], _buckets(h), h.sum_us / 1e6)
            if w.get("shm"):
                for key, fam in shm.items():
                    fam.add_metric([wid], w["shm"].get(key, 0))
        yield from fams.values()
        yield from hists.values()
        yield from shm.values()

    def _gpus(self, gpus: list[dict]) -> Iterator[Metric]:
        L = ["gpu", "uuid"]
        gauges = {
            key: (GaugeMetricFamily(name, doc, labels=L), scale) for key, name, doc, scale in _GPU_GAUGES
        }
        reason = GaugeMetricFamily(
            "orchestrator_gpu_clock_event_reason",
            "1 while this clock-event (throttle) reason is active",
            labels=L + ["reason"],
        )
        counters = CounterMetricFamily(
            "orchestrator_gpu_clock_event",
            "Cumulative time the clocks were held back for this reason (seconds)",
            labels=L + ["reason"],
            unit="seconds",
        )
        foreign = GaugeMetricFamily(
            "orchestrator_gpu_foreign_processes",
            "Compute processes on the GPU that are not this orchestrator's",
            labels=L,
        )
        for g in gpus:
            labels = [str(g.get("index")), str(g.get("uuid"))]
            for key, (fam, scale) in gauges.items():
                if g.get(key) is not None:
                    fam.add_metric(labels, g[key] * scale)
            active = set(g.get("throttle_reasons") or ())
            for name in g.get("supported_reasons") or REASON_NAMES:
                reason.add_metric(labels + [name], 1.0 if name in active else 0.0)
            for name, ns in sorted((g.get("reason_counters_ns") or {}).items()):
                counters.add_metric(labels + [name], ns / 1e9)
            foreign.add_metric(labels, len(g.get("foreign_pids") or ()))
        yield from (fam for fam, _ in gauges.values())
        yield reason
        yield counters
        yield foreign


def make_registry(data: Callable[[], dict]) -> CollectorRegistry:
    """A registry holding only our collector (no default process/platform collectors)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MonitorCollector(data))
    return reg
