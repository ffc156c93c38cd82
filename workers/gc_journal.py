"""Python's garbage collections in a worker process: kept small at READY, journaled after it.

A full (generation 2) collection walks every tracked object in the process. A worker holds tens of
thousands of them after importing numpy, ZeroMQ, cuda-bindings and an engine, so a full collection that
happens to start on the serving thread stalls a launch for milliseconds, and one on another thread holds
the GIL the serving thread needs. `freeze()` runs once before READY: it collects, then moves every
surviving object into the permanent generation (`gc.freeze()`), so later collections walk only what was
made since. The journal records each collection (start and end on time.monotonic_ns(), the telemetry's
clock; generation; thread) from `gc.callbacks`, so stall attribution can name a collection that overlapped
a stall (cause `python_gc`).
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

#: Collections kept for stall windows. A stall looks back a few milliseconds, and steady serving makes few
#: collections (9 of 50 us or more in a bert-tiny run on the H200), so this covers far more than that.
KEEP = 512
#: Collections shorter than this cannot explain a stall (stall_min_us is larger); they are not kept.
MIN_US = 50


@dataclass(frozen=True, slots=True)
class Collection:
    t0_ns: int
    t1_ns: int
    generation: int
    thread: str
    collected: int


class GcJournal:
    """The process's collections of MIN_US or longer, newest last; thread-safe under the GIL."""

    def __init__(self, keep: int = KEEP, min_us: int = MIN_US) -> None:
        self._kept: deque[Collection] = deque(maxlen=keep)
        self._min_ns = min_us * 1000
        self._t0 = 0
        self.count = 0  # every collection seen, kept or not
        self.slow = 0  # collections of MIN_US or longer
        self.longest_us = 0.0
        self.frozen = 0  # objects moved to the permanent generation by freeze()
        self.full_us_before = self.full_us_after = 0.0
        self._on = False

    def _callback(self, phase: str, info: dict) -> None:
        # Runs inside the collector with the GIL held; collections never overlap, so one start slot is enough.
        if phase == "start":
            self._t0 = time.monotonic_ns()
            return
        t1 = time.monotonic_ns()
        self.count += 1
        if t1 - self._t0 >= self._min_ns:
            self.slow += 1
            self.longest_us = max(self.longest_us, (t1 - self._t0) / 1e3)
            self._kept.append(
                Collection(
                    self._t0, t1, info["generation"], threading.current_thread().name, info["collected"]
                )
            )

    def start(self) -> None:
        if not self._on:
            gc.callbacks.append(self._callback)
            self._on = True

    def stop(self) -> None:
        if self._on:
            gc.callbacks.remove(self._callback)
            self._on = False

    def freeze(self) -> None:
        """Collect, then freeze what survived; records how long a full collection took before and after."""
        t = time.perf_counter_ns()
        gc.collect()
        self.full_us_before = (time.perf_counter_ns() - t) / 1e3
        gc.freeze()
        self.frozen = gc.get_freeze_count()
        t = time.perf_counter_ns()
        gc.collect()
        self.full_us_after = (time.perf_counter_ns() - t) / 1e3

    def overlapping(self, t0: int, t1: int) -> list[Collection]:
        """Kept collections that overlap [t0, t1] (monotonic ns), oldest first."""
        out = []
        for c in reversed(self._kept):
            if c.t1_ns < t0:
                break
            if c.t0_ns <= t1:
                out.append(c)
        out.reverse()
        return out

    def stats(self) -> dict:
        """For the telemetry report: collections per generation since start-up (cumulative), the ones that
        took MIN_US or more since READY and the longest of them, and what freezing did."""
        return {
            "collections": [g["collections"] for g in gc.get_stats()],
            "since_ready": self.count,
            "slow": self.slow,
            "longest_us": round(self.longest_us, 1),
            "frozen": self.frozen,
            "full_us_before": round(self.full_us_before, 1),
            "full_us_after": round(self.full_us_after, 1),
        }

    def describe(self) -> str:
        """One line for the worker's log at READY: what freezing did."""
        return (
            f"{self.frozen:,} objects frozen; a full collection took {self.full_us_before / 1e3:.1f} ms "
            f"before, {self.full_us_after / 1e3:.2f} ms after"
        )


def entry(c: Collection) -> dict:
    """A collection as it travels in a stall candidate: its fields by name."""
    return asdict(c)
