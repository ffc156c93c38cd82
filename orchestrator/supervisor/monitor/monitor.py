"""The monitor facade the supervisor uses: worker reports, stall attribution, GPU and host sampling.

Runs in the supervisor. on_report/on_shm/on_stall are called from the thread that receives worker
telemetry, snapshot() from the control and metrics threads; the NVML and host samplers have their own threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from orchestrator.common.config import Config
from orchestrator.common.histogram import Histogram
from orchestrator.supervisor.monitor.host import HostSampler
from orchestrator.supervisor.monitor.nvml_sampler import NvmlSampler
from orchestrator.supervisor.monitor.stalls import CAUSES, StallLog, attribute, build_record

log = logging.getLogger(__name__)

HISTS = ("latency", "queue", "enqueue", "gpu")
RATE_WINDOW_S = 2.0  # requests/s, items/s and GPU busy are averaged over this much recent reporting
PCT_WINDOW_S = 10.0  # latency percentiles cover this much recent reporting
SNAPSHOT_STALLS = 10
_GPU_KEYS = (
    "index",
    "uuid",
    "name",
    "sm_clock_mhz",
    "sm_clock_max_mhz",
    "mem_clock_mhz",
    "power_w",
    "power_limit_w",
    "temp_c",
    "temp_slowdown_c",
    "mem_temp_c",
    "util_pct",
    "mem_used_bytes",
    "throttle_reasons",
    "foreign_pids",
)


class _Worker:
    """What the monitor knows about one worker slot; it outlives restarts (counters keep growing)."""

    def __init__(self, worker_id: str) -> None:
        self.id = worker_id
        self.pid: int | None = None
        self.gpu_uuid: str | None = None
        self.reports: deque[tuple[int, dict]] = deque(maxlen=128)  # (receive time ns, interval part)
        self.last: dict = {}
        self.last_rx_ns = 0
        self.requests = self.batches = self.rows = self.enqueue_over_1ms = self.gpu_busy_ns = 0
        self.reported_s = 0.0  # the reports' intervals added up: the time the counters above cover
        self.failures: dict[str, int] = {}
        self.hists = {h: Histogram() for h in HISTS}
        self.faults_total = 0
        self._faults_seen = 0
        self._report_pid: int | None = None
        self.spawns = 0
        self.stalls = 0
        self.stall_causes: dict[str, int] = {}
        self.last_stall_cause: str | None = None
        self.journal: deque[dict] = deque(maxlen=20)
        # shared memory: the running process's latest counters (None while it reports none) and slot totals
        self.shm: dict | None = None
        self.shm_used = False  # some process of this slot served with shared memory on
        self.shm_requests = self.shm_bytes = 0
        self._shm_seen = (0, 0)
        self._shm_pid: int | None = None

    def add_report(self, rep: dict, now: int) -> None:
        iv = {**(rep.get("interval") or {}), "interval_s": rep.get("interval_s", 0.0)}
        if rep.get("pid") != self._report_pid:  # a new process: its journal counts start again at 0
            self._report_pid = rep.get("pid")
            self._faults_seen = 0
        self.reports.append((now, iv))
        self.last = rep
        self.last_rx_ns = now
        self.requests += iv.get("requests", 0)
        self.batches += iv.get("batches", 0)
        self.rows += iv.get("rows", 0)
        self.enqueue_over_1ms += iv.get("enqueue_over_1ms", 0)
        self.gpu_busy_ns += iv.get("gpu_busy_ns", 0)
        self.reported_s += iv.get("interval_s", 0.0)
        for code, n in (iv.get("failures") or {}).items():
            self.failures[str(code)] = self.failures.get(str(code), 0) + n
        for h in HISTS:
            self.hists[h].merge(Histogram.from_wire((iv.get("hist") or {}).get(f"{h}_us")))
        journal = rep.get("journal") or {}
        faults = journal.get("faults", 0)
        self.faults_total += max(0, faults - self._faults_seen)
        self._faults_seen = max(self._faults_seen, faults)
        self.journal.extend(journal.get("entries") or ())

    def add_shm(self, shm: dict) -> None:
        """One heartbeat's `shm` status (worker_handle.shm_status form); per-process counts feed the totals."""
        if not shm.get("enabled"):
            self.shm = None
            return
        req, nbytes = shm.get("requests", 0), shm.get("bytes", 0)
        seen_req, seen_bytes = self._shm_seen
        if self.pid != self._shm_pid or req < seen_req or nbytes < seen_bytes:  # a new process counts from 0
            self._shm_pid = self.pid
            seen_req = seen_bytes = 0
        self.shm_requests += req - seen_req
        self.shm_bytes += nbytes - seen_bytes
        self._shm_seen = (req, nbytes)
        self.shm = shm
        self.shm_used = True

    def shm_metrics(self) -> dict | None:
        """Prometheus values; None if shared memory was never on here. Gauges read 0 while no arena is up."""
        if not self.shm_used:
            return None
        cur = self.shm or {}
        return {
            "requests_total": self.shm_requests,
            "bytes_total": self.shm_bytes,
            "leases": cur.get("leases", 0),
            "arena_bytes": cur.get("arena_bytes", 0),
            "free_bytes": cur.get("free_bytes", 0),
        }

    def _recent(self, now: int, window_s: float) -> list[dict]:
        cut = now - int(window_s * 1e9)
        return [iv for t, iv in self.reports if t >= cut]

    def view(self, now: int) -> dict:
        rate = self._recent(now, RATE_WINDOW_S)
        span = sum(iv.get("interval_s", 0.0) for iv in rate) or None
        # Prefer the union of batch spans (exact when batches overlap); the sum of per-batch times is the
        # fallback for engines that cannot place their batches on the host clock.
        busy_ns = sum(iv.get("gpu_busy_ns", 0) for iv in rate)
        gpu_us = busy_ns / 1e3 if busy_ns else sum(iv.get("gpu_time_us", 0.0) for iv in rate)
        lat = Histogram()
        for iv in self._recent(now, PCT_WINDOW_S):
            lat.merge(Histogram.from_wire((iv.get("hist") or {}).get("latency_us")))
        enq = Histogram()
        for iv in rate:
            enq.merge(Histogram.from_wire((iv.get("hist") or {}).get("enqueue_us")))
        p50, p99 = lat.quantile(0.5), lat.quantile(0.99)
        last = self.last
        return {
            "pid": self.pid,
            "gpu_uuid": self.gpu_uuid,
            "requests_per_s": sum(iv.get("requests", 0) for iv in rate) / span if span else 0.0,
            "items_per_s": sum(iv.get("rows", 0) for iv in rate) / span if span else 0.0,
            "batches_per_s": sum(iv.get("batches", 0) for iv in rate) / span if span else 0.0,
            "latency_p50_ms": p50 / 1e3 if p50 is not None else None,
            "latency_p99_ms": p99 / 1e3 if p99 is not None else None,
            "enqueue_p50_us": enq.quantile(0.5),
            "enqueue_p99_us": enq.quantile(0.99),
            "queued": last.get("queued"),
            "inflight": last.get("inflight"),
            "gpu_busy_pct": (100.0 * gpu_us / (span * 1e6))
            if span and any(iv.get("gpu_batches") for iv in rate)
            else None,
            "faults": (last.get("journal") or {}).get("faults"),
            "journal_mode": (last.get("journal") or {}).get("mode"),
            "journal_note": (last.get("journal") or {}).get("note"),
            "gc": last.get("gc"),  # the worker's garbage collections (workers/gc_journal.py)
            "faults_total": self.faults_total,
            "stalls": self.stalls,
            "last_stall_cause": self.last_stall_cause,
            "stall_causes": dict(self.stall_causes),
            "requests_total": self.requests,
            "items_total": self.rows,
            "batches_total": self.batches,
            "enqueue_over_1ms_total": self.enqueue_over_1ms,
            "gpu_busy_ns_total": self.gpu_busy_ns,
            "reported_s_total": self.reported_s,
            # Every report's histograms merged (wire form): `orchestrator bench` differences two snapshots.
            "hist_total": {f"{h}_us": self.hists[h].to_wire() for h in HISTS},
            "failures_total": sum(self.failures.values()),
            "failures_by_code": dict(self.failures),
            "baseline_us": last.get("baseline_us"),
            "sync_mode": last.get("sync_mode"),
            "report_age_s": (now - self.last_rx_ns) / 1e9 if self.last_rx_ns else None,
            "journal_recent": list(self.journal)[-5:],
        }


def _brief(record: dict) -> dict:
    """A stall record without the bulky inputs, for status."""
    return {k: v for k, v in record.items() if k not in ("candidate", "gpu_samples")}


class Monitor:
    """Owns the samplers, the stall log and the metrics endpoint; every public method is thread-safe."""

    def __init__(self, cfg: Config, run_dir: Path, health: Any = None) -> None:
        self.cfg = cfg
        # The supervisor's probe verdict (/livez, /readyz, /startupz on the HTTP server); none in tests.
        self.health = health or (lambda: {"live": True, "ready": True, "started": True})
        self.run_dir = Path(run_dir)
        self.stall_log = StallLog(self.run_dir / "stalls.jsonl")
        self.host = HostSampler()
        self.sampler: NvmlSampler | None = None
        self.nvml_reason: str | None = None
        self.metrics_server: Any = None
        self.metrics_error: str | None = None
        self._gpus: list[dict] = []
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._nvml_module: Any = None  # tests inject a stand-in for pynvml here

    def start(self, gpus: list[dict]) -> None:
        self._gpus = [dict(g) for g in gpus]
        self.host.start()
        if gpus:
            sampler = NvmlSampler(gpus, self.cfg.monitor.interval_ms, self._own_pids, self._nvml_module)
            if sampler.start():
                self.sampler = sampler
            else:
                self.nvml_reason = sampler.unavailable_reason
        else:
            self.nvml_reason = "no GPU workers"
        port, host = self.cfg.monitor.metrics_port, self.cfg.monitor.http_host
        if port > 0:
            from orchestrator.supervisor.monitor.http import start_http_server

            try:
                self.metrics_server = start_http_server(host, port, self.health, self.metrics_data)
            except OSError as exc:  # serving goes on without the endpoint; status says why
                self.metrics_error = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                log.error("[monitor] HTTP endpoints (metrics, probes) off: %s", self.metrics_error)

    def stop(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        if self.sampler is not None:
            self.sampler.stop()
        self.host.stop()
        self.stall_log.close()

    def _own_pids(self) -> set[int]:
        with self._lock:
            return {w.pid for w in self._workers.values() if w.pid}

    def _worker(self, worker_id: str) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            w = self._workers[worker_id] = _Worker(worker_id)
        return w

    def set_worker(self, worker_id: str, pid: int | None, gpu_uuid: str | None) -> None:
        """A worker slot was (re)spawned (pid set) or died (pid None)."""
        with self._lock:
            w = self._worker(worker_id)
            if pid != w.pid:
                w.shm = None  # the old process's arena is gone; the new one reports its own
                if pid is not None:
                    w.spawns += 1  # every start after the first is a restart
            w.pid = pid
            w.gpu_uuid = gpu_uuid

    def on_report(self, worker_id: str, report: dict) -> None:
        now = time.monotonic_ns()
        with self._lock:
            self._worker(worker_id).add_report(report, now)

    def on_shm(self, worker_id: str, shm: dict) -> None:
        """A heartbeat's shared-memory counters, in status form (called on the supervisor's main thread)."""
        with self._lock:
            self._worker(worker_id).add_shm(shm)

    def on_stall(self, worker_id: str, candidate: dict) -> dict:
        """Attribute one stall candidate, log it to stalls.jsonl and return the record."""
        with self._lock:
            w = self._worker(worker_id)
            uuid = w.gpu_uuid
        samples: list[dict] = []
        foreign: list[dict] = []
        if self.sampler is not None and uuid:
            pad = int(self.sampler.interval_s * 1e9)
            samples = self.sampler.window(
                uuid, candidate.get("t0_ns", 0) - pad, candidate.get("t1_ns", 0) + pad
            )
            foreign = self.sampler.foreign(uuid)
        causes = attribute(candidate, samples, self.host.latest(), foreign)
        gpu = next((g for g in self._gpus if g.get("uuid") == uuid), None)
        record = build_record({**candidate, "worker_id": worker_id}, causes, gpu)
        record["gpu_samples"] = samples
        self.stall_log.write(record)
        with self._lock:
            w.stalls += 1
            w.stall_causes[record["cause"]] = w.stall_causes.get(record["cause"], 0) + 1
            w.last_stall_cause = record["cause"]
        log.debug("[stall] %s: %s", worker_id, record["summary"])  # the caller logs it at its own level
        return record

    def _gpu_views(self) -> list[dict]:
        if self.sampler is None:
            return [
                {k: g.get(k) for k in _GPU_KEYS} | {"throttle_reasons": [], "foreign_pids": []}
                for g in self._gpus
            ]
        return [
            {k: v.get(k) for k in _GPU_KEYS}
            | {
                "throttle_reasons": v.get("throttle_reasons") or [],
                "foreign_pids": v.get("foreign_pids") or [],
                "supported_reasons": v.get("supported_reasons"),
                "reason_counters_ns": v.get("reason_counters_ns") or {},
                "processes": v.get("processes") or [],
                "lost": v.get("lost", False),
            }
            for v in self.sampler.view()
        ]

    def snapshot(self) -> dict:
        now = time.monotonic_ns()
        with self._lock:
            workers = {wid: w.view(now) for wid, w in self._workers.items()}
        return {
            "nvml": self.sampler is not None,
            "nvml_reason": self.nvml_reason,
            "gpus": self._gpu_views(),
            "workers": workers,
            "stalls": [_brief(r) for r in self.stall_log.latest(SNAPSHOT_STALLS)],
            "stall_counts": self.stall_log.snapshot_counts(),
            "stall_driver_ops": self.stall_log.snapshot_op_counts(),
            "host": self.host.latest(),
            "metrics_port": self.cfg.monitor.metrics_port or None,
            "http_host": self.cfg.monitor.http_host,
            "metrics_error": self.metrics_error,
        }

    def metrics_data(self) -> dict:
        """Cumulative data for the Prometheus collector (called on the scrape thread)."""
        now = time.monotonic_ns()
        with self._lock:
            workers = {}
            for wid, w in self._workers.items():
                h = {}
                for name in HISTS:
                    h[name] = Histogram()
                    h[name].merge(w.hists[name])
                view = w.view(now)
                workers[wid] = {
                    "gpu_uuid": w.gpu_uuid,
                    "requests_total": w.requests,
                    "batches_total": w.batches,
                    "items_total": w.rows,
                    "failures": dict(w.failures),
                    "hists": h,
                    "queued": view["queued"],
                    "inflight": view["inflight"],
                    "gpu_busy_pct": view["gpu_busy_pct"],
                    "faults_total": w.faults_total,
                    "stall_causes": dict(w.stall_causes),
                    "up": w.pid is not None,
                    "restarts_total": max(0, w.spawns - 1),
                    "shm": w.shm_metrics(),
                }
        return {
            "nvml": self.sampler is not None,
            "gpus": self._gpu_views(),
            "workers": workers,
            "stall_counts": self.stall_log.snapshot_counts(),
            "stall_driver_ops": self.stall_log.snapshot_op_counts(),
            "causes": CAUSES,
        }
