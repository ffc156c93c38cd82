"""Journal of every driver-lock-taking operation a worker performs, and the post-READY fault guard.

One instance per worker process (JOURNAL), written from any thread (the serving thread, or a stall-
injection thread) and read by the serving thread's telemetry. Timestamps are time.monotonic_ns(), which
is CLOCK_MONOTONIC and so shared by every process on the host: the supervisor can line them up with NVML
samples and other workers' records.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
    "engine_load",
    "context_create",
)


@dataclass(frozen=True)
class DriverOp:
    seq: int
    op: str
    t0_ns: int
    t1_ns: int
    detail: str
    thread: str
    fault: bool  # happened after READY


class DriverJournal:
    """Bounded, thread-safe record of driver operations; counts those after READY as faults."""

    def __init__(self, capacity: int = 4096) -> None:
        self._entries: deque[DriverOp] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self.ready = False
        self.faults = 0
        self.total = 0

    def mark_ready(self) -> None:
        self.ready = True

    def record(self, op: str, t0_ns: int, t1_ns: int, detail: str = "") -> DriverOp:
        fault = self.ready
        entry = DriverOp(next(self._seq), op, t0_ns, t1_ns, detail, threading.current_thread().name, fault)
        with self._lock:
            self._entries.append(entry)
            self.total += 1
            if fault:
                self.faults += 1
        if fault:
            log.warning(
                "[fault] %s after READY (%s, %.1f us, thread %s)",
                op,
                detail,
                (t1_ns - t0_ns) / 1e3,
                entry.thread,
            )
        return entry

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
