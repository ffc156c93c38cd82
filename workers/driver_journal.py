"""Journal of every driver-lock-taking operation in a worker process, and the post-READY fault guard.

One instance per worker process (JOURNAL), written from any thread and read by the serving thread's
telemetry. Two sources feed it:
- "own": the orchestrator's CUDA layer (workers/cuda/) times each of its own lock-taking calls;
- "cupti": workers/cupti_journal.py adds what CUPTI saw in the whole process (any thread, any library),
  delivered when the serving thread flushes (sync()). A CUPTI record of a call the CUDA layer already
  journaled is merged into that entry (it gains the API name) rather than counted twice.
Timestamps are time.monotonic_ns(), which is CLOCK_MONOTONIC and so shared by every process on the host:
the supervisor can line them up with NVML samples and other workers' records.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

# Operations that take the driver's write lock and stall launches in the same process (FACTS.md).
OPS = (
    "device_alloc",
    "device_free",
    "pinned_alloc",
    "pinned_free",
    "host_register",
    "host_unregister",
    "module_load",
    "module_unload",
    "graph_instantiate",
    "graph_destroy",
    "engine_load",
    "context_create",
    "context_destroy",
    "stream_create",
    "stream_destroy",
    "lazy_load",  # a kernel's code loaded at its first launch (CUDA_MODULE_LOADING=LAZY)
)
#: A CUPTI record and an own entry of the same thread are one call when one lies inside the other to
#: within this much (the two clocks are lined up to a few microseconds).
MERGE_SLACK_NS = 20_000
#: How many recent entries a merge looks back through.
MERGE_WINDOW = 64


@dataclass(frozen=True)
class DriverOp:
    seq: int
    op: str
    t0_ns: int
    t1_ns: int
    detail: str
    thread: str
    fault: bool  # happened after READY
    api: str = ""  # the driver or runtime function, where CUPTI named it (cuMemHostRegister_v2...)
    tid: int = 0  # the calling thread's kernel id (gettid)
    source: str = "own"  # "own" (workers/cuda), "cupti", or "own+cupti" (both saw the call)
    library: str = ""  # the library that made the call, where CUPTI's callback could tell

    @property
    def name(self) -> str:
        """What a person reads: the API function when known, else the operation."""
        return self.api or self.op


def _nested(a0: int, a1: int, b0: int, b1: int) -> bool:
    """One interval lies inside the other (within MERGE_SLACK_NS), their midpoints overlapping."""
    s = MERGE_SLACK_NS
    inside = (a0 - s <= b0 and b1 <= a1 + s) or (b0 - s <= a0 and a1 <= b1 + s)
    return inside and (a0 <= (b0 + b1) // 2 <= a1 or b0 <= (a0 + a1) // 2 <= b1)


def _merge(e: DriverOp, n: DriverOp) -> DriverOp:
    """One entry for one call seen twice: the own entry keeps its operation and detail; the API name is
    the driver function's where both a runtime and a driver record name one (cudaMalloc -> cuMemAlloc)."""
    own, other = (e, n) if e.source != "cupti" else (n, e)
    apis = [a for a in (e.api, n.api) if a]
    driver = [a for a in apis if not a.startswith("cuda")]
    api = (driver or apis or [""])[0]
    detail = own.detail or " -> ".join(a for a in apis if a != api)
    source = "own+cupti" if "own" in (e.source + n.source) else "cupti"
    return replace(
        e,
        op=own.op,
        t0_ns=min(e.t0_ns, n.t0_ns),
        t1_ns=max(e.t1_ns, n.t1_ns),
        detail=detail,
        thread=own.thread or other.thread,
        api=api,
        tid=e.tid or n.tid,
        source=source,
        library=_caller(e, n),
    )


def _caller(e: DriverOp, n: DriverOp) -> str:
    """The calling library of one call seen twice: the outer call's (a runtime call's caller, not the
    runtime that made the driver call inside it)."""
    outer, inner = (e, n) if (e.t0_ns, -e.t1_ns) <= (n.t0_ns, -n.t1_ns) else (n, e)
    return outer.library or inner.library


class DriverJournal:
    """Bounded, thread-safe record of driver operations; counts those after READY as faults."""

    def __init__(self, capacity: int = 4096) -> None:
        self._entries: deque[DriverOp] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self.ready = False
        self.ready_ns = 0
        self.faults = 0
        self.total = 0
        #: "own" or "cupti", and why when CUPTI is not in use (status shows both).
        self.mode = "own"
        self.note: str | None = None
        self._flush: Callable[[], None] | None = None

    def mark_ready(self) -> None:
        self.sync()  # what CUPTI saw before READY is not a fault
        self.ready_ns = time.monotonic_ns()
        self.ready = True

    def attach(self, mode: str, flush: Callable[[], None] | None, note: str | None = None) -> None:
        """Say which source feeds the journal; `flush` delivers CUPTI's pending records (sync())."""
        self.mode, self._flush, self.note = mode, flush, note

    def sync(self) -> None:
        """Bring in what CUPTI has recorded so far (nothing to do for the own journal). Serving thread."""
        if self._flush is not None:
            self._flush()

    def record(self, op: str, t0_ns: int, t1_ns: int, detail: str = "") -> DriverOp:
        fault = self.ready
        entry = DriverOp(
            next(self._seq),
            op,
            t0_ns,
            t1_ns,
            detail,
            threading.current_thread().name,
            fault,
            tid=threading.get_native_id(),
        )
        with self._lock:
            if self._merge_locked(entry):
                return entry
            self._entries.append(entry)
            self.total += 1
            if fault:
                self.faults += 1
        if fault:
            self._warn(entry)
        return entry

    def add_foreign(self, entries: Iterable[DriverOp]) -> int:
        """Add CUPTI's entries (seq and fault are set here); returns how many were new calls."""
        new: list[DriverOp] = []
        with self._lock:
            for e in entries:
                e = replace(e, seq=next(self._seq), fault=self.ready and e.t0_ns >= self.ready_ns)
                if self._merge_locked(e):
                    continue
                self._entries.append(e)
                self.total += 1
                if e.fault:
                    self.faults += 1
                    new.append(e)
        for e in new:
            self._warn(e)
        return len(new)

    def _merge_locked(self, n: DriverOp) -> bool:
        """Fold `n` into a recent entry of the same thread that is the same call; True if it was."""
        if not n.tid:
            return False
        entries = self._entries
        for i in range(len(entries) - 1, max(-1, len(entries) - 1 - MERGE_WINDOW), -1):
            e = entries[i]
            # own vs CUPTI, or a runtime call vs the driver call inside it; never two own entries
            if (
                e.tid == n.tid
                and (e.source != n.source or e.api != n.api)
                and _nested(e.t0_ns, e.t1_ns, n.t0_ns, n.t1_ns)
            ):
                entries[i] = _merge(e, n)
                return True
        return False

    @staticmethod
    def _warn(entry: DriverOp) -> None:
        log.warning(
            "[fault] %s after READY (%s%s, %.1f us, thread %s%s)",
            entry.name,
            entry.op if entry.api else "",
            f" {entry.detail}" if entry.detail else "",
            (entry.t1_ns - entry.t0_ns) / 1e3,
            entry.thread,
            f", from {entry.library}" if entry.library else "",
        )

    @contextmanager
    def timed(self, op: str, detail: str = "") -> Iterator[None]:
        t0 = time.monotonic_ns()
        try:
            yield
        finally:
            self.record(op, t0, time.monotonic_ns(), detail)

    def since(self, seq: int) -> list[DriverOp]:
        """Entries with a sequence number above `seq` (still in the ring)."""
        with self._lock:
            return [e for e in self._entries if e.seq > seq]

    def overlapping(self, t0_ns: int, t1_ns: int, slack_ns: int = 0) -> list[DriverOp]:
        with self._lock:
            return [e for e in self._entries if e.t0_ns <= t1_ns + slack_ns and e.t1_ns >= t0_ns - slack_ns]


JOURNAL = DriverJournal()
