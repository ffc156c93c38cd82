"""Worker telemetry: a per-thread scheduling probe, per-batch timings, stall candidates and reports.

Runs in a worker process, on its serving thread only (hence no locks): the pipeline snaps the probe around
engine.launch, the worker loop calls on_batch() after replying to a batch and report() a few times a second.
"""

from __future__ import annotations

import logging
import os
import time
from bisect import bisect_left
from collections import deque
from statistics import median_low
from typing import Any

from orchestrator.common.config import MonitorSection
from orchestrator.common.histogram import BOUNDS_US, Histogram
from workers.driver_journal import DriverJournal, DriverOp
from workers.gc_journal import GcJournal
from workers.gc_journal import entry as gc_entry

log = logging.getLogger(__name__)

try:  # RUSAGE_THREAD is Linux-only; without it the probe reports no context switches
    import resource

    _RUSAGE_THREAD: int | None = resource.RUSAGE_THREAD
except (ImportError, AttributeError):  # pragma: no cover - non-Linux
    resource = None  # type: ignore[assignment]
    _RUSAGE_THREAD = None

_SCHEDSTAT = "/proc/thread-self/schedstat"
REPORT_VERSION = 1
#: Journal entries carried per report at most; the rest are counted as dropped (faults are counted anyway).
MAX_JOURNAL_PER_REPORT = 32


class ThreadProbe:
    """Scheduling counters of ONE thread: construct it and call snap() in the thread to be measured.

    On-CPU time is thread_time_ns (CLOCK_THREAD_CPUTIME_ID), which brings the running thread's count up to
    date. schedstat's first field does not: for the reading thread it stands at the last tick or switch, so
    a launch that spun 1 ms on a CPU read 3-630 us there (8 tries, this machine) and looked blocked. The
    run-queue wait (schedstat's second field) is exact: it is settled when the thread gets a CPU.
    /proc/thread-self resolves to the opening thread, and the kept descriptor is re-read with pread (about
    1 us instead of 10 us for open+read). Without /proc the run-queue wait reads 0 (`schedstat` is False).
    """

    __slots__ = ("_fd", "schedstat", "rusage")

    def __init__(self) -> None:
        try:
            self._fd = os.open(_SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.info("[telemetry] %s unavailable (%s): run-queue wait will read 0", _SCHEDSTAT, exc)
            self._fd = -1
        self.schedstat = self._fd >= 0
        self.rusage = _RUSAGE_THREAD is not None

    def snap(self) -> tuple[int, int, int, int, int]:
        """(monotonic ns, on-CPU ns, run-queue wait ns, voluntary switches, involuntary switches)."""
        t = time.monotonic_ns()
        oncpu = time.thread_time_ns()
        runq = int(os.pread(self._fd, 64, 0).split()[1]) if self._fd >= 0 else 0
        if _RUSAGE_THREAD is not None:
            ru = resource.getrusage(_RUSAGE_THREAD)
            return t, oncpu, runq, ru.ru_nvcsw, ru.ru_nivcsw
        return t, oncpu, runq, 0, 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def probe_delta(a: tuple | None, b: tuple | None) -> dict | None:
    """What happened to the thread between two snaps. blocked = wall - on CPU - waiting for a CPU."""
    if a is None or b is None:
        return None
    wall, cpu, rq = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    return {
        "wall_us": wall / 1e3,
        "oncpu_us": cpu / 1e3,
        "runq_us": rq / 1e3,
        "blocked_us": max(0, wall - cpu - rq) / 1e3,
        "vcsw": b[3] - a[3],
        "ivcsw": b[4] - a[4],
    }


def journal_entry(op: DriverOp) -> dict:
    return {
        "seq": op.seq,
        "op": op.op,
        "t0_ns": op.t0_ns,
        "t1_ns": op.t1_ns,
        "detail": op.detail,
        "thread": op.thread,
        "fault": op.fault,
        "api": op.api,
        "source": op.source,
        "library": op.library,
    }


class _Counters:
    """Counters for one reporting interval (also used for the cumulative totals)."""

    # The plain sums (add() adds them up), then the per-code failures and the histograms.
    SUMS = (
        "requests",
        "batches",
        "rows",
        "padded_rows",
        "gpu_batches",
        "vcsw",
        "ivcsw",
        "runq_ns",
        "stalls",
        "knock_on",
        "suppressed",
        "enqueue_over_1ms",
        "gpu_busy_ns",
        "gpu_time_us",
    )
    __slots__ = (*SUMS, "failures", "latency", "queue", "enqueue", "gpu")

    def __init__(self) -> None:
        self.requests = self.batches = self.rows = self.padded_rows = self.gpu_batches = 0
        self.vcsw = self.ivcsw = self.runq_ns = self.stalls = self.knock_on = self.suppressed = 0
        self.enqueue_over_1ms = 0  # exact count of launches slower than 1 ms (the stall-detection yardstick)
        self.gpu_busy_ns = 0  # union of batch spans on the device: overlapping batches counted once
        self.gpu_time_us = 0.0
        self.failures: dict[int, int] = {}
        self.latency = Histogram()  # end-to-end per request: receive -> reply sent
        self.queue = Histogram()  # per request: receive -> staging started
        self.enqueue = Histogram()  # per batch: staging + engine.launch on the host
        self.gpu = Histogram()  # per batch: device time from events

    def add(self, o: _Counters) -> None:
        for name in self.SUMS:
            setattr(self, name, getattr(self, name) + getattr(o, name))
        for code, n in o.failures.items():
            self.failures[code] = self.failures.get(code, 0) + n
        self.latency.merge(o.latency)
        self.queue.merge(o.queue)
        self.enqueue.merge(o.enqueue)
        self.gpu.merge(o.gpu)

    def to_wire(self, hists: tuple[str, ...]) -> dict:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "rows": self.rows,
            "padded_rows": self.padded_rows,
            "gpu_time_us": self.gpu_time_us,
            "gpu_batches": self.gpu_batches,
            "launch_vcsw": self.vcsw,
            "launch_ivcsw": self.ivcsw,
            "launch_runq_us": self.runq_ns / 1e3,
            "stalls": self.stalls,
            "knock_on": self.knock_on,
            "suppressed": self.suppressed,
            "enqueue_over_1ms": self.enqueue_over_1ms,
            "gpu_busy_ns": self.gpu_busy_ns,
            "failures": {str(c): n for c, n in self.failures.items()},
            "hist": {f"{h}_us": getattr(self, h).to_wire() for h in hists},
        }


class _Baseline:
    """Windowed median of recent values, refreshed every `every` samples (amortises the sort)."""

    __slots__ = ("values", "every", "pending", "median")

    def __init__(self, window: int, every: int) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.every = every
        self.pending = 0
        self.median: float | None = None

    def add(self, v: float) -> bool:
        """Append; True when the median was just recomputed."""
        self.values.append(v)
        self.pending += 1
        if self.pending >= self.every:
            self.pending = 0
            self.median = median_low(self.values)
            return True
        return False


class WorkerTelemetry:
    """Per-batch accounting and stall detection for one worker. Construct it ON the serving thread (its
    ThreadProbe measures the constructing thread) and call every method from there.

    A batch is a stall candidate when its host enqueue time, or its oldest request's end-to-end latency,
    exceeds max(stall_factor x the windowed median of recent batches, stall_min_us). Candidates go to the
    supervisor at once (rate-limited); latency-only candidates whose requests arrived during an already
    reported stall are counted as knock-on effects instead of being reported again.
    """

    def __init__(
        self,
        worker_id: str,
        monitor: MonitorSection,
        journal: DriverJournal,
        sync_mode: str,
        *,
        collections: GcJournal | None = None,
        warmup_batches: int = 64,
        window: int = 256,
        refresh_every: int = 32,
        max_candidates_per_s: float = 50.0,
        journal_slack_us: int = 50,
    ) -> None:
        self.worker_id = worker_id
        self.pid = os.getpid()
        self.journal = journal
        self.collections = collections
        self.sync_mode = sync_mode
        self.factor = float(monitor.stall_factor)
        self.min_us = float(monitor.stall_min_us)
        self.warmup_batches = warmup_batches
        self.probe: ThreadProbe | None = ThreadProbe()
        self._enq_base = _Baseline(window, refresh_every)
        self._lat_base = _Baseline(window, refresh_every)
        self._gpu_base = _Baseline(window, refresh_every)
        self._thr_enq = float("inf")  # no detection until the first baseline exists
        self._thr_lat = float("inf")
        self._n = 0
        self._iv = _Counters()
        self._total = _Counters()
        self._t_start = self._iv_t0 = time.monotonic_ns()
        self._seq = 0
        self._cand_seq = 0
        self._last_stall_t1 = 0
        self._rate = max_candidates_per_s
        self._tokens = max_candidates_per_s
        self._t_tokens = self._t_start
        self._slack_ns = journal_slack_us * 1000
        self._journal_seq = 0
        self.queued = self.inflight = self._max_queued = 0
        # Recent launch snapshots: a latency stall's probe window starts at the last one before its oldest
        # request arrived, so run-queue waits between receive and launch are seen too.
        self._snaps: deque[tuple] = deque(maxlen=64)
        self._busy_until = 0  # end of the GPU-busy union so far (host monotonic ns)

    # --- per batch ------------------------------------------------------------------------------

    def on_batch(
        self, batch: Any, gpu_time_us: float | None, gpu_span: tuple[int, int] | None = None
    ) -> dict | None:
        """Account one replied batch; return a stall candidate to push to the supervisor, or None.
        `gpu_span` is the batch's (start, stop) on the device in host monotonic ns, for GPU-busy time."""
        now = time.monotonic_ns()
        t_launch = batch.t_launch_ns
        enqueue_us = (batch.t_enqueued_ns - t_launch) / 1e3
        iv = self._iv
        lat_h, queue_h = iv.latency, iv.queue
        lat_c, queue_c = lat_h.counts, queue_h.counts
        oldest = t_launch
        lat_sum = queue_sum = 0.0
        parts = batch.parts
        for req, _offset in parts:  # Histogram.record inlined: this loop runs per request
            r = req.t_recv_ns
            if r < oldest:
                oldest = r
            v = (now - r) / 1e3
            lat_c[bisect_left(BOUNDS_US, v)] += 1
            lat_sum += v
            v = (t_launch - r) / 1e3
            queue_c[bisect_left(BOUNDS_US, v)] += 1
            queue_sum += v
        n = len(parts)
        lat_h.count += n
        lat_h.sum_us += lat_sum
        queue_h.count += n
        queue_h.sum_us += queue_sum
        latency_us = (now - oldest) / 1e3
        iv.requests += n
        iv.batches += 1
        iv.rows += batch.rows
        iv.padded_rows += batch.padded
        iv.enqueue.record(enqueue_us)
        if enqueue_us > 1000.0:
            iv.enqueue_over_1ms += 1
        if gpu_span is not None:  # batches finish in submission order: a running union of their spans
            start, stop = gpu_span
            if stop > self._busy_until:
                iv.gpu_busy_ns += stop - max(start, self._busy_until)
                self._busy_until = stop
        if gpu_time_us is not None:
            iv.gpu_time_us += gpu_time_us
            iv.gpu_batches += 1
            iv.gpu.record(gpu_time_us)
            self._gpu_base.add(gpu_time_us)
        p0, p1 = batch.probe0, batch.probe1
        if p0 is not None and p1 is not None:
            self._snaps.append(p0)
            iv.vcsw += p1[3] - p0[3]
            iv.ivcsw += p1[4] - p0[4]
            iv.runq_ns += p1[2] - p0[2]
        self._n += 1
        stall_enq = enqueue_us > self._thr_enq
        stall_lat = latency_us > self._thr_lat
        refreshed = self._enq_base.add(enqueue_us)
        self._lat_base.add(latency_us)
        if refreshed:
            self._refresh_thresholds()
        if not (stall_enq or stall_lat) or self._n <= self.warmup_batches:
            return None
        return self._candidate(batch, now, oldest, enqueue_us, latency_us, gpu_time_us, stall_enq, stall_lat)

    def _refresh_thresholds(self) -> None:
        enq, lat = self._enq_base.median, self._lat_base.median
        self._thr_enq = max(self.factor * enq, self.min_us, 1.0) if enq is not None else float("inf")
        self._thr_lat = max(self.factor * lat, self.min_us, 1.0) if lat is not None else float("inf")

    def _take_token(self, now: int) -> bool:
        self._tokens = min(self._rate, self._tokens + (now - self._t_tokens) / 1e9 * self._rate)
        self._t_tokens = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _candidate(
        self,
        batch: Any,
        now: int,
        oldest: int,
        enqueue_us: float,
        latency_us: float,
        gpu_time_us: float | None,
        stall_enq: bool,
        stall_lat: bool,
    ) -> dict | None:
        iv = self._iv
        if not stall_enq and oldest < self._last_stall_t1:
            iv.knock_on += 1  # queued behind a stall already reported: same incident
            return None
        if not self._take_token(now):
            iv.suppressed += 1
            return None
        iv.stalls += 1
        self._cand_seq += 1
        self._last_stall_t1 = now
        t0 = batch.t_launch_ns if not stall_lat else oldest
        p0, p1 = batch.probe0, batch.probe1
        probe = self.probe
        p_end = probe.snap() if (probe is not None and p0 is not None) else None
        self.journal.sync()  # CUPTI's records of what other threads did during the stall
        ops = self.journal.overlapping(t0, now, self._slack_ns)
        cand = {
            "v": REPORT_VERSION,
            "worker_id": self.worker_id,
            "pid": self.pid,
            "seq": self._cand_seq,
            "kind": [k for k, on in (("enqueue", stall_enq), ("latency", stall_lat)) if on],
            "sync_mode": self.sync_mode,
            "t0_ns": t0,
            "t1_ns": now,
            "launch_t0_ns": batch.t_launch_ns,
            "launch_t1_ns": batch.t_enqueued_ns,
            "requests": len(batch.parts),
            "rows": batch.rows,
            "padded": batch.padded,
            "timings_us": self._phases(batch, now, oldest, enqueue_us, latency_us, gpu_time_us),
            "baseline_us": {
                "enqueue": self._enq_base.median,
                "latency": self._lat_base.median,
                "gpu": self._gpu_base.median,
            },
            "threshold_us": {"enqueue": self._thr_enq, "latency": self._thr_lat},
            "probe_launch": probe_delta(p0, p1),
            "probe_batch": probe_delta(p0, p_end),
            "probe_request": probe_delta(self._snap_before(oldest), p_end) if stall_lat else None,
            "schedstat": bool(probe is not None and probe.schedstat),
            "journal": [journal_entry(op) for op in ops[-MAX_JOURNAL_PER_REPORT:]],
            "journal_faults": self.journal.faults,
            "gc": [gc_entry(c) for c in self.collections.overlapping(t0, now)] if self.collections else [],
        }
        log.debug(
            "[stall] candidate %s: enqueue %.0f us, latency %.0f us, %d driver op(s)",
            cand["kind"],
            enqueue_us,
            latency_us,
            len(ops),
        )
        return cand

    def _snap_before(self, t_ns: int) -> tuple | None:
        """The latest kept launch snapshot taken at or before `t_ns` (else the oldest one kept)."""
        best = None
        for snap in reversed(self._snaps):
            best = snap
            if snap[0] <= t_ns:
                break
        return best

    @staticmethod
    def _phases(
        batch: Any, now: int, oldest: int, enqueue_us: float, latency_us: float, gpu_time_us: float | None
    ) -> dict:
        """Where the oldest request's time went, in microseconds."""
        p0, p1 = batch.probe0, batch.probe1
        has_probe = p0 is not None and p1 is not None
        return {
            "queue_wait": (batch.t_launch_ns - oldest) / 1e3,
            "stage": (p0[0] - batch.t_launch_ns) / 1e3 if has_probe else None,
            "launch": (p1[0] - p0[0]) / 1e3 if has_probe else None,
            "enqueue": enqueue_us,
            "complete_wait": (batch.t_done_ns - batch.t_enqueued_ns) / 1e3 if batch.t_done_ns else None,
            "gpu": gpu_time_us,
            "reply": (now - batch.t_done_ns) / 1e3 if batch.t_done_ns else None,
            "latency": latency_us,
        }

    # --- other events -----------------------------------------------------------------------------

    def note_failure(self, code: int) -> None:
        """A request answered with an error code (overloaded, invalid input, deadline, internal...)."""
        f = self._iv.failures
        f[code] = f.get(code, 0) + 1

    def note_queue(self, queued: int, inflight: int) -> None:
        self.queued = queued
        self.inflight = inflight
        if queued > self._max_queued:
            self._max_queued = queued

    # --- periodic report --------------------------------------------------------------------------

    def report(self) -> dict:
        """Aggregate since the previous report plus cumulative totals (msgpack-able; str keys only)."""
        now = time.monotonic_ns()
        iv = self._iv
        interval_s = max(1e-9, (now - self._iv_t0) / 1e9)
        self._total.add(iv)
        self._seq += 1
        self.journal.sync()
        entries = self.journal.since(self._journal_seq)
        if entries:
            self._journal_seq = entries[-1].seq
        shipped = entries[-MAX_JOURNAL_PER_REPORT:]
        interval = iv.to_wire(("latency", "queue", "enqueue", "gpu"))
        interval["gpu_busy_pct"] = (
            (100.0 * iv.gpu_busy_ns / (interval_s * 1e9))
            if iv.gpu_busy_ns
            else (100.0 * iv.gpu_time_us / (interval_s * 1e6))
            if iv.gpu_batches
            else None
        )
        total = self._total.to_wire(("latency", "enqueue"))
        rep = {
            "v": REPORT_VERSION,
            "worker_id": self.worker_id,
            "pid": self.pid,
            "seq": self._seq,
            "t_ns": now,
            "interval_s": interval_s,
            "uptime_s": (now - self._t_start) / 1e9,
            "sync_mode": self.sync_mode,
            "interval": interval,
            "total": total,
            "queued": self.queued,
            "inflight": self.inflight,
            "max_queued": self._max_queued,
            "baseline_us": {
                "enqueue": self._enq_base.median,
                "latency": self._lat_base.median,
                "gpu": self._gpu_base.median,
            },
            "journal": {
                "mode": self.journal.mode,  # live: "auto" arms CUPTI mid-run and says so in the note
                "note": self.journal.note,
                "faults": self.journal.faults,
                "total": self.journal.total,
                "entries": [journal_entry(e) for e in shipped],
                "dropped": len(entries) - len(shipped),
            },
            "gc": self.collections.stats() if self.collections else None,
        }
        self._iv = _Counters()
        self._iv_t0 = now
        self._max_queued = self.queued
        return rep

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
