"""Closed-loop load for the benchmark scripts (bench_cpu, bench_mps, bench_scaling, bench_stalls): N client
processes keeping K requests in flight each for a fixed time. The loop itself is `orchestrator bench`'s
(orchestrator/cli/bench/load.py); this keeps the scripts' call and result shape.

Runs in the benchmark's process; the client processes are spawned by orchestrator.cli.bench.load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.cli.bench.load import run_load as bench_load


@dataclass
class LoadResult:
    requests: int = 0  # replies received in the window (results and errors)
    ok: int = 0
    rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    latencies_us: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def pct(self, p: float) -> float | None:
        return float(np.percentile(self.latencies_us, p)) if self.latencies_us.size else None

    def figures(self) -> dict[str, object]:
        """What the benchmark tables report of a run: batches/s, items/s, p50/p99 (us), requests, errors."""
        return {
            "batches_per_s": self.throughput,
            "items_per_s": self.rows / self.wall_s if self.wall_s else 0.0,
            "latency_us_p50": self.pct(50),
            "latency_us_p99": self.pct(99),
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.wall_s, 2),
        }


def run_load(
    config: str | Path,
    shape: tuple[int, ...],
    procs: int,
    in_flight: int,
    seconds: float,
    dtype: str = "float32",
    cpus: list[int] | None = None,
) -> LoadResult:
    """Drive the orchestrator behind `config` (a one-input model) with `procs` client processes x
    `in_flight` requests each, optionally pinned to `cpus`, for `seconds`."""
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    load = bench_load(
        config, [x], concurrency=procs * in_flight, duration=seconds, processes=procs, cpus=cpus
    )
    return LoadResult(
        requests=load.ok + sum(load.errors.values()),
        ok=load.ok,
        rows=load.rows,
        errors=load.errors,
        wall_s=load.seconds,
        latencies_us=load.latencies_us,
    )
