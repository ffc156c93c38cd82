"""Data the monitor is fed in the unit tests: a replied batch with given timings, and a stall candidate a
side thread's pinned allocation explains (a worker's telemetry sends the same shapes)."""

from __future__ import annotations

import time

from workers.pipeline import Batch, Request

US = 1000  # ns


def batch(latency_us: float, enqueue_us: float = 20.0, n: int = 2) -> Batch:
    """A replied batch of n 2-row requests whose oldest arrived `latency_us` ago."""
    now = time.monotonic_ns()
    t_launch = now - int(latency_us * US) // 2
    parts = [(Request(None, i, {}, 2, now - int(latency_us * US)), 2 * i) for i in range(n)]
    b = Batch(None, parts, 2 * n, 2 * n)  # type: ignore[arg-type]
    b.t_launch_ns, b.t_enqueued_ns, b.t_done_ns = t_launch, t_launch + int(enqueue_us * US), now
    return b


def driver_lock_stall(now: int) -> dict:
    """A 19 ms launch of worker w0 overlapped by a journaled 64 MiB pinned allocation on another thread."""
    return {
        "worker_id": "w0",
        "pid": 4321,
        "kind": ["enqueue"],
        "t0_ns": now - 20_000_000,
        "t1_ns": now,
        "launch_t0_ns": now - 20_000_000,
        "launch_t1_ns": now - 1_000_000,
        "timings_us": {"enqueue": 19000.0, "latency": 20000.0},
        "baseline_us": {"enqueue": 20.0},
        "journal": [
            {
                "seq": 3,
                "op": "pinned_alloc",
                "t0_ns": now - 19_500_000,
                "t1_ns": now - 1_200_000,
                "detail": "64 MiB",
                "thread": "inject",
                "fault": True,
            }
        ],
    }
