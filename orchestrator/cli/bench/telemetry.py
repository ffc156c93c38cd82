"""The workers' telemetry over a benchmark point: two `status` snapshots from the supervisor's control
socket (as `orchestrator status --json` gets them), their cumulative counters differenced.

Runs in the CLI process. Where each figure comes from (the worker's per-batch accounting in
workers/telemetry.py, summed by the supervisor's monitor in orchestrator/supervisor/monitor/monitor.py, which
keeps per-worker totals across restarts):

- GPU busy: the union of the worker's batch spans on the device (`gpu_busy_ns_total`), per second of
  reporting (`reported_s_total`); engines that cannot place batches on the host clock: the sum of batch
  GPU times (`hist_total.gpu_us`). The mean over workers. None on CPU engines (no device time).
- GPU time per batch: the mean of the batches' device times (`hist_total.gpu_us`). None on CPU engines.
- host time per batch: the serving thread's working time (receive, stage + launch, reply + account; no
  waits, no spinning: the heartbeat's `host_ns`) per batch the worker served (its `batches`). Both count
  from the worker process's start, so a worker restarted during the point is left out.
- enqueue time (trtexec's term): staging + launch on the host per batch (`hist_total.enqueue_us`).
- batch fill: rows per batch (`items_total` / `batches_total`).
- queue time: per request, from its receipt to the staging of its batch (`hist_total.queue_us`).
- stalls by cause: the monitor's attributed stalls (`stall_causes`); launches over 1 ms
  (`enqueue_over_1ms_total`): an exact count, not sampled.

Workers report with every heartbeat (every `workers.heartbeat_interval_ms`). The window is the reports
received between the two snapshots: the first snapshot is taken as the point's measured window opens,
the second once every ready worker has reported after it closed, with the load still running, so the
telemetry covers the measured window plus at most one heartbeat interval of the same load at each end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from orchestrator.client.control import ControlClient
from orchestrator.common.errors import ErrorCode
from orchestrator.common.histogram import Histogram
from orchestrator.common.security import ClientKeys

#: How long to wait for every worker to report after a point's window closed (heartbeats come every
#: 200 ms by default); past it the figures cover what was reported and the point says so.
FRESH_TIMEOUT_S = 3.0
_POLL_S = 0.05


@dataclass
class Snapshot:
    t_sent: float  # monotonic time the status request was sent
    status: dict[str, Any]

    @property
    def workers(self) -> dict[str, dict[str, Any]]:
        return {w["id"]: w for w in self.status.get("workers") or []}

    @property
    def views(self) -> dict[str, dict[str, Any]]:
        return (self.status.get("monitor") or {}).get("workers") or {}


class Telemetry:
    """Status snapshots from one orchestrator's control endpoint."""

    def __init__(self, endpoint: str, keys: ClientKeys | None = None, timeout_s: float = 5.0) -> None:
        self.ctl = ControlClient(endpoint, timeout_s=timeout_s, keys=keys)

    def snapshot(self) -> Snapshot:
        t = time.monotonic()
        return Snapshot(t, self.ctl.call("status"))

    def snapshot_after(self, t: float, timeout_s: float = FRESH_TIMEOUT_S) -> tuple[Snapshot, bool]:
        """The first snapshot in which every ready worker's latest report arrived after monotonic time `t`
        (False with the last one taken when that did not happen within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            snap = self.snapshot()
            if fresh(snap, t):
                return snap, True
            if time.monotonic() > deadline:
                return snap, False
            time.sleep(_POLL_S)  # reports arrive with heartbeats; status is the only way to see them

    def close(self) -> None:
        self.ctl.close()


def fresh(snap: Snapshot, t: float) -> bool:
    """Has every ready worker reported after `t`? The supervisor gives each report's age when it answered,
    which was after the request was sent: so the report arrived after t_sent - age (any clock offset)."""
    views = snap.views
    for wid, w in snap.workers.items():
        if w.get("state") != "ready":
            continue
        age = (views.get(wid) or {}).get("report_age_s")
        if age is None or snap.t_sent - age <= t:
            return False
    return True


def _hist(view: dict[str, Any], name: str) -> Histogram:
    return Histogram.from_wire((view.get("hist_total") or {}).get(f"{name}_us"))


def hist_delta(before: Histogram, after: Histogram) -> Histogram:
    """The samples recorded between two cumulative histograms."""
    h = Histogram()
    h.counts = [max(0, b - a) for a, b in zip(before.counts, after.counts, strict=True)]
    h.count = max(0, after.count - before.count)
    h.sum_us = max(0.0, after.sum_us - before.sum_us)
    return h


def _counts_delta(before: dict | None, after: dict | None) -> dict[str, int]:
    out = {}
    for k, v in (after or {}).items():
        d = int(v) - int((before or {}).get(k, 0))
        if d > 0:
            out[str(k)] = d
    return out


def _code_name(code: str) -> str:
    try:
        return ErrorCode(int(code)).name
    except ValueError:
        return f"code {code}"


def _pcts(h: Histogram, mean: bool = False) -> dict[str, float | None] | None:
    if not h.count:
        return None
    out: dict[str, float | None] = {"p50": h.quantile(0.5), "p99": h.quantile(0.99)}
    if mean:
        out = {"mean": h.mean(), **out}
    return out


def host_delta(h0: dict[str, Any], h1: dict[str, Any]) -> tuple[int, int] | None:
    """(batches, serving-thread host ns) between two heartbeats of one worker (`batches`, `host_ns`: both
    counted from the worker process's start), or None when the process changed in between."""
    if h0.get("pid") is None or h0.get("pid") != h1.get("pid"):
        return None
    return (
        int(h1.get("batches") or 0) - int(h0.get("batches") or 0),
        int(h1.get("host_ns") or 0) - int(h0.get("host_ns") or 0),
    )


def window(before: Snapshot, after: Snapshot, complete: bool = True) -> dict[str, Any]:
    """The telemetry figures of a point (see the module docstring); None where not measured."""
    hb0, hb1 = before.workers, after.workers
    v0, v1 = before.views, after.views
    per_worker: dict[str, dict[str, Any]] = {}
    busy: list[float] = []
    spans: list[float] = []
    gpu, enq, que, lat = Histogram(), Histogram(), Histogram(), Histogram()
    batches = rows = over_1ms = host_ns = host_batches = 0
    stalls: dict[str, int] = {}
    failures: dict[str, int] = {}
    restarted: list[str] = []
    for wid, a in v1.items():
        b = v0.get(wid) or {}

        def d(key: str, a: dict = a, b: dict = b) -> float:
            return (a.get(key) or 0) - (b.get(key) or 0)

        span = d("reported_s_total")
        w_batches, w_rows = int(d("batches_total")), int(d("items_total"))
        w_gpu = hist_delta(_hist(b, "gpu"), _hist(a, "gpu"))
        busy_ns = d("gpu_busy_ns_total")
        w_busy = None
        if span > 0 and busy_ns > 0:
            w_busy = busy_ns / (span * 1e9)
        elif span > 0 and w_gpu.count:
            w_busy = w_gpu.sum_us / (span * 1e6)
        if w_busy is not None:
            busy.append(w_busy)
        if span > 0:
            spans.append(span)
        gpu.merge(w_gpu)
        enq.merge(hist_delta(_hist(b, "enqueue"), _hist(a, "enqueue")))
        que.merge(hist_delta(_hist(b, "queue"), _hist(a, "queue")))
        lat.merge(hist_delta(_hist(b, "latency"), _hist(a, "latency")))
        batches += w_batches
        rows += w_rows
        over_1ms += int(d("enqueue_over_1ms_total"))
        for cause, n in _counts_delta(b.get("stall_causes"), a.get("stall_causes")).items():
            stalls[cause] = stalls.get(cause, 0) + n
        for code, n in _counts_delta(b.get("failures_by_code"), a.get("failures_by_code")).items():
            failures[_code_name(code)] = failures.get(_code_name(code), 0) + n
        w_host = None
        served = host_delta(hb0.get(wid) or {}, hb1.get(wid) or {})
        if served is not None:
            nb, ns = served
            if nb > 0 and ns >= 0:
                host_ns += ns
                host_batches += nb
                w_host = ns / nb / 1e3
        elif w_batches:
            restarted.append(wid)
        per_worker[wid] = {
            "requests": int(d("requests_total")),
            "batches": w_batches,
            "gpu_busy": w_busy,
            "rows_per_batch": w_rows / w_batches if w_batches else None,
            "host_us_per_batch": w_host,
        }
    return {
        "gpu_busy": sum(busy) / len(busy) if busy else None,
        "gpu_us_per_batch": gpu.mean(),
        "host_us_per_batch": host_ns / host_batches / 1e3 if host_batches else None,
        "enqueue_us": _pcts(enq),
        "rows_per_batch": rows / batches if batches else None,
        "batches": batches,
        "queue_us": _pcts(que, mean=True),
        "server_latency_us": _pcts(lat),
        "stalls": stalls,
        "launches_over_1ms": over_1ms if v1 else None,
        "worker_failures": failures,
        "telemetry": {
            "window_s": sum(spans) / len(spans) if spans else None,
            "complete": complete,
            "restarted": restarted,
            "workers": per_worker,
        },
    }
