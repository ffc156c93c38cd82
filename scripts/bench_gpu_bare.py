"""Part A of the GPU benchmark: the bare limit (Pipeline + SyntheticGpuEngine in one process, no ZeroMQ)
and the calibration of `work` to target GPU times per batch. Imported by scripts/bench_gpu.py; runs in
the benchmark process, on its main thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.common.config import Config, parse_config
from workers.driver_journal import JOURNAL
from workers.pipeline import Batch, Pipeline, Request


@dataclass(frozen=True)
class Shape:
    rows: int  # rows per batch (every batch is full: one 64-row request = one batch)
    item: int  # float32 elements per row

    @property
    def batch_bytes(self) -> int:
        return self.rows * self.item * 4


def make_config(shape: Shape, work: int, depth: int, graphs: bool, sync: str) -> Config:
    return parse_config(
        {
            "workers": {"device": "gpu"},
            "model": {"kind": "synthetic", "work": work, "item_shape": [shape.item], "max_batch": shape.rows},
            "pipeline": {"depth": depth, "cuda_graphs": graphs, "sync": sync, "buckets": [shape.rows]},
        },
        check_files=False,
    )


def _build(shape: Shape, work: int, depth: int, graphs: bool, sync: str) -> tuple[Any, Pipeline]:
    from workers.engines.synthetic_gpu import SyntheticGpuEngine

    cfg = make_config(shape, work, depth, graphs, sync)
    eng = SyntheticGpuEngine(cfg)
    pipe = Pipeline(eng, depth, max_queue=depth + 1, max_queue_delay_us=0, buckets=(shape.rows,))
    eng.warmup(pipe.slots, pipe.buckets)
    eng.mark_ready()
    return eng, pipe


def _loop(
    pipe: Pipeline, x: np.ndarray, seconds: float, complete: Callable[[Batch], None]
) -> tuple[int, int, int]:
    """Keep every slot busy for `seconds`; wait only on the oldest batch when no slot is free.
    Returns (batches, wall ns, ns spent blocked in wait)."""
    rows = x.shape[0]
    wait_ns = 0
    n = 0
    t0 = time.monotonic_ns()
    end = t0 + int(seconds * 1e9)
    while True:
        now = time.monotonic_ns()
        if pipe.free and now < end:
            pipe.offer(Request(None, n, {"x": x}, rows, now))
            pipe.launch_next(now, lambda r: None)
            n += 1
            continue
        if not pipe.inflight:
            break
        tw = time.monotonic_ns()
        pipe.wait_oldest()
        wait_ns += time.monotonic_ns() - tw
        pipe.complete_oldest(complete)
    return n, time.monotonic_ns() - t0, wait_ns


def union_length(spans: Any) -> float:
    """Total length of the union of [start, stop] intervals (an (n, 2) array or pairs): batches on
    different slot streams overlap."""
    total, cur0, cur1 = 0.0, None, None
    for s0, s1 in sorted((float(a), float(b)) for a, b in spans):
        if cur1 is None or s0 > cur1:
            if cur1 is not None:
                total += cur1 - cur0
            cur0, cur1 = s0, s1
        else:
            cur1 = max(cur1, s1)
    if cur1 is not None:
        total += cur1 - cur0
    return float(total)


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else float("nan")


def bare_run(shape: Shape, work: int, depth: int, graphs: bool, sync: str, seconds: float) -> dict[str, Any]:
    """One bare-limit run. GPU time per batch is its stream span (H2D start to D2H end, from events)."""
    from workers.cuda.stream import Event

    eng, pipe = _build(shape, work, depth, graphs, sync)
    try:
        x = np.random.default_rng(0).random((shape.rows, shape.item), dtype=np.float32)
        launch = eng.launch
        enqueue_ns: list[int] = []

        def timed_launch(slot: Any, rows: int) -> None:  # engine.launch alone: the enqueue time
            t = time.perf_counter_ns()
            launch(slot, rows)
            enqueue_ns.append(time.perf_counter_ns() - t)

        eng.launch = timed_launch  # type: ignore[method-assign]
        recs: list[tuple[int, int, float, float]] = []
        ref = Event(timing=True)

        def complete(batch: Batch) -> None:
            batch.slot.outputs["y"][: batch.rows].copy()  # the copy a server makes for its reply
            s0, s1 = eng.timeline_us(batch.slot, ref)
            recs.append(
                (batch.t_done_ns - batch.t_launch_ns, batch.t_enqueued_ns - batch.t_launch_ns, s0, s1)
            )

        ref.record(pipe.slots[0].stream)
        _loop(pipe, x, 0.3, complete)  # warm the loop itself (clocks, caches)
        recs.clear()
        enqueue_ns.clear()
        faults0 = JOURNAL.faults
        ref.record(pipe.slots[0].stream)
        n, wall_ns, wait_ns = _loop(pipe, x, seconds, complete)
        faults = JOURNAL.faults - faults0
        ref.destroy()
    finally:
        eng.close()
    r = np.array(recs, dtype=np.float64)
    spans = r[:, 2:4]
    gpu = spans[:, 1] - spans[:, 0]
    enq = np.array(enqueue_ns, dtype=np.float64) / 1e3
    wall_us = wall_ns / 1e3
    return {
        "work": work,
        "depth": depth,
        "cuda_graphs": graphs,
        "sync": sync,
        "seconds": round(wall_ns / 1e9, 3),
        "batches": n,
        "batches_per_s": n / (wall_ns / 1e9),
        "items_per_s": n * shape.rows / (wall_ns / 1e9),
        "gpu_time_us_p50": _pct(gpu, 50),
        "gpu_busy": union_length(spans) / wall_us,
        "gpu_busy_sum": float(gpu.sum()) / wall_us,
        "host_us_per_batch": (wall_ns - wait_ns) / 1e3 / n,
        "enqueue_us_p50": _pct(enq, 50),
        "enqueue_us_p99": _pct(enq, 99),
        "enqueue_us_max": float(enq.max()),
        "stage_enqueue_us_p50": _pct(r[:, 1] / 1e3, 50),
        "latency_us_p50": _pct(r[:, 0] / 1e3, 50),
        "latency_us_p99": _pct(r[:, 0] / 1e3, 99),
        "launches_over_1ms": int((enq > 1000).sum()),
        "faults": faults,
    }


def serial_batches(
    shape: Shape, work: int, batches: int = 1 << 30, seconds: float = float("inf"), reps: int = 1
) -> list[dict[str, Any]]:
    """`reps` runs of one batch at a time (depth 1, graphs, spin) on one engine, each of `batches` batches or
    `seconds`, whichever ends first: per batch, the latency from staging the input to the copied-out result
    (the bare loop at concurrency 1) and the GPU time. The first fifth of each run is dropped (warm-up)."""
    eng, pipe = _build(shape, work, 1, True, "spin")
    lat: list[int] = []
    gpu: list[float] = []

    def complete(batch: Batch) -> None:
        batch.slot.outputs["y"][: batch.rows].copy()  # the copy a server makes for its reply
        gpu.append(eng.gpu_time_us(batch.slot))

    runs = []
    try:
        x = np.random.default_rng(1).random((shape.rows, shape.item), dtype=np.float32)
        for _ in range(reps):
            lat.clear()
            gpu.clear()
            end = time.monotonic_ns() + min(seconds, 1e6) * 1e9
            while len(lat) < batches and time.monotonic_ns() < end:
                t0 = time.monotonic_ns()
                pipe.offer(Request(None, len(lat), {"x": x}, shape.rows, t0))
                pipe.launch_next(t0, lambda r: None)
                pipe.wait_oldest()
                pipe.complete_oldest(complete)
                lat.append(time.monotonic_ns() - t0)
            k = len(lat) // 5
            lat_us = np.array(lat[k:], dtype=np.float64) / 1e3
            runs.append(
                {
                    "work": work,
                    "batches": len(lat) - k,
                    "latency_us_p50": _pct(lat_us, 50),
                    "latency_us_p99": _pct(lat_us, 99),
                    "gpu_time_us": float(np.median(gpu[k:])),
                }
            )
    finally:
        eng.close()
    return runs


def measure_gpu_us(shape: Shape, work: int, batches: int = 300) -> float:
    """Median GPU time per batch at `work`, one batch at a time (depth 1, graphs on)."""
    return serial_batches(shape, work, batches)[0]["gpu_time_us"]


def calibrate(shape: Shape, target_us: float, log: Callable[[str], None], steps: int = 8) -> dict[str, Any]:
    """Find `work` giving about `target_us` of GPU time per batch. GPU time only grows with work, so the
    search brackets the target (x4 steps from 1000), then narrows the bracket by interpolation, falling
    back to bisection when interpolation lands outside it (the response is not linear at small work)."""
    pts = {0: measure_gpu_us(shape, 0)}
    if pts[0] >= target_us:  # the copies alone already take longer: report the floor
        log(f"calibrated {target_us:g} us: work 0 -> {pts[0]:.1f} us (the floor at this batch size)")
        return {"target_us": target_us, "work": 0, "gpu_time_us": pts[0], "overhead_us": pts[0]}
    hi = 1000
    pts[hi] = measure_gpu_us(shape, hi)
    while pts[hi] < target_us and hi < (1 << 24):
        hi *= 4
        pts[hi] = measure_gpu_us(shape, hi)
    lo = max(w for w, t in pts.items() if t < target_us)
    for _ in range(steps):
        if min(abs(pts[lo] - target_us), abs(pts[hi] - target_us)) <= 0.03 * target_us or hi - lo <= 1:
            break
        w = lo + round((target_us - pts[lo]) * (hi - lo) / (pts[hi] - pts[lo]))
        if not lo < w < hi:
            w = (lo + hi) // 2
        pts[w] = measure_gpu_us(shape, w)
        lo, hi = (w, hi) if pts[w] < target_us else (lo, w)
    work = min(pts, key=lambda w: abs(pts[w] - target_us))
    log(
        f"calibrated {target_us:g} us: work {work} -> {pts[work]:.1f} us (work 0: {pts[0]:.1f} us; "
        f"measured {', '.join(f'{w}: {t:.1f}' for w, t in sorted(pts.items()))})"
    )
    return {
        "target_us": target_us,
        "work": work,
        "gpu_time_us": pts[work],
        "overhead_us": pts[0],
        "points": {str(w): t for w, t in sorted(pts.items())},
    }
