"""Closed-loop load generator shared by the benchmark and soak scripts: N client processes, each keeping
K requests in flight through orchestrator.client.Client.submit() for a fixed time.

Runs in the benchmark's process (which only collects results) and in spawned client processes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class LoadResult:
    requests: int = 0  # replies received (results and errors)
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


def _client_proc(
    config: str,
    shape: tuple[int, ...],
    dtype: str,
    seconds: float,
    in_flight: int,
    sample_every: int,
    q: Any,
    cpus: list[int] | None = None,
) -> None:
    from orchestrator.client import Client

    if cpus:  # keep the load generator off the workers' cores
        os.sched_setaffinity(0, cpus)

    rng = np.random.default_rng(os.getpid())
    x = rng.standard_normal(shape).astype(dtype)
    lat: list[float] = []
    errors: dict[str, int] = {}
    ok = n = 0
    window: deque = deque()
    with Client(config, max_in_flight=in_flight + 1) as c:
        t0 = time.perf_counter()
        t_end = t0 + seconds
        while True:
            now = time.perf_counter()
            if now < t_end and len(window) < in_flight:
                window.append((now, c.submit(x)))
                continue
            if not window:
                break
            t_sub, fut = window.popleft()
            exc = fut.exception(timeout=60)
            n += 1
            if exc is None:
                ok += 1
                if n % sample_every == 0:
                    lat.append((time.perf_counter() - t_sub) * 1e6)
            else:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        wall = time.perf_counter() - t0
    q.put({"n": n, "ok": ok, "rows": ok * shape[0], "errors": errors, "wall": wall, "lat": lat})


def run_load(
    config: str | Path,
    shape: tuple[int, ...],
    procs: int,
    in_flight: int,
    seconds: float,
    dtype: str = "float32",
    sample_every: int = 1,
    cpus: list[int] | None = None,
) -> LoadResult:
    """Drive the orchestrator behind `config` with `procs` client processes x `in_flight` requests each,
    optionally pinned to `cpus`."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [
        ctx.Process(
            target=_client_proc, args=(str(config), shape, dtype, seconds, in_flight, sample_every, q, cpus)
        )
        for _ in range(procs)
    ]
    for p in ps:
        p.start()
    parts = [q.get(timeout=seconds + 120) for _ in ps]
    for p in ps:
        p.join(30)
    res = LoadResult(wall_s=max(r["wall"] for r in parts))
    for r in parts:
        res.requests += r["n"]
        res.ok += r["ok"]
        res.rows += r["rows"]
        for k, v in r["errors"].items():
            res.errors[k] = res.errors.get(k, 0) + v
    res.latencies_us = np.array([v for r in parts for v in r["lat"]])
    return res
