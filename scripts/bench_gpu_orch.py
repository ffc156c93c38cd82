"""Part B of the GPU benchmark: the whole orchestrator (CLI start, supervisor, GPU worker) driven by N
client processes that each keep K requests in flight through Client.submit(). Imported by
scripts/bench_gpu.py; the client processes are started with multiprocessing "spawn".
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from scripts.benchlib import cli
from scripts.benchlib import status_json as status

ROOT = Path(__file__).resolve().parent.parent


def _split_cores() -> tuple[list[int], list[int]]:
    """(worker cores, client cores): on hosts with 8+ cores the worker gets the first 4 and the client
    processes the rest, as a deployment keeps a GPU worker's cores to itself; on small hosts, no split."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 8:
        return [], []
    return cores[:4], cores[4:]


def write_config(directory: Path, name: str, rows: int, item: int, work: int, depth: int, graphs: bool,
                 sync: str, device: str = "gpu", io_threads: int = 1) -> Path:
    """A benchmark config; device = "cpu" (no graphs) is a smoke test of this script on any host."""
    worker_cores = _split_cores()[0]
    affinity = f"[{worker_cores}]" if worker_cores else '"auto"'
    text = f"""[orchestrator]
name = "{name}"
run_dir = "{directory / 'run'}"
startup_timeout_s = 120

[workers]
device = "{device}"
cpu_affinity = {affinity}

[model]
kind = "synthetic"
item_shape = [{item}]
work = {work}
max_batch = {rows}

[pipeline]
depth = {depth}
cuda_graphs = {"true" if graphs and device == "gpu" else "false"}
buckets = [{rows}]
sync = "{sync}"
max_queue = 4096
max_queue_delay_us = 0

[transport]
io_threads = {io_threads}
"""
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path






def _client_proc(config: str, rows: int, item: int, work: int, in_flight: int, seconds: float, check: bool,
                 start: Any, q: Any) -> None:
    """One client process: warm up, wait for the common start, then keep `in_flight` requests going."""
    sys.path.insert(0, str(ROOT))
    clients_cores = _split_cores()[1]
    if clients_cores:  # keep the load generator off the worker's cores (see write_config)
        os.sched_setaffinity(0, clients_cores)
    from orchestrator.client import Client
    from workers.engines import synthetic_math

    x = np.random.default_rng().random((rows, item), dtype=np.float32)
    with Client(config, max_in_flight=in_flight, timeout=60) as c:
        first = c.infer({"x": x})
        ok = True
        if check:  # one row against the numpy reference (the whole batch would take seconds at large work)
            ok = bool(np.array_equal(first["y"][:1], synthetic_math.reference(x[:1], work), equal_nan=True))
        for _ in range(20):
            c.infer({"x": x})
        q.put(("ready", ok))
        start.wait()
        lat: list[float] = []
        window: deque = deque()
        end = time.perf_counter() + seconds
        while True:
            while len(window) < in_flight and time.perf_counter() < end:
                window.append((time.perf_counter(), c.submit({"x": x})))
            if not window:
                break
            t0, fut = window.popleft()
            fut.result(60)
            lat.append(time.perf_counter() - t0)
        q.put(("done", np.asarray(lat, dtype=np.float64).tobytes()))


def _gpu_busy(before: dict, after: dict, wall_s: float, gpu_us_per_batch: float) -> tuple[float, str, int]:
    """GPU busy over the run: the increase of the workers' cumulative `gpu_busy_ns_total` (the union of
    their batches' event spans) over wall time. Without it (older workers), an estimate from the batch
    count and Part A's GPU time per batch at the same work, labelled so."""
    def total(st: dict) -> float | None:
        views = (st.get("monitor") or {}).get("workers") or {}
        vals = [v.get("gpu_busy_ns_total") for v in views.values()]
        return float(sum(vals)) if vals and all(v is not None for v in vals) else None

    def count(st: dict) -> int:  # heartbeat progress: cumulative batches completed per worker
        return sum(int(w.get("batches", 0)) for w in st.get("workers", []))

    batches = count(after) - count(before)
    g0, g1 = total(before), total(after)
    if g0 is not None and g1 is not None and g1 > g0:
        return (g1 - g0) / (wall_s * 1e9), "events (union of batch spans)", batches
    return batches * gpu_us_per_batch / (wall_s * 1e6), "estimated: batches x Part A GPU time", batches


class NvmlUtil:
    """Samples NVML's GPU utilization (share of time a kernel was running) on a side thread during a run:
    a real but coarse measure of GPU busy, used when the workers' status has no event-measured GPU time."""

    def __init__(self, period_s: float = 0.05) -> None:
        self.samples: list[int] = []
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no NVML here (CPU smoke runs)
            self._nvml = None

    def start(self) -> None:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, name="nvml-util", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(max(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles))

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


def run(label: str, config: Path, clients: int, in_flight: int, seconds: float, rows: int, item: int,
        work: int, gpu_us_per_batch: float, log: Any) -> dict[str, Any]:
    proc = cli("start", str(config), "--detach")
    if proc.returncode != 0:
        raise RuntimeError(f"orchestrator start failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1500:]}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = ctx.Event()
    procs = [ctx.Process(target=_client_proc, args=(str(config), rows, item, work, in_flight, seconds, i == 0, start, q))
             for i in range(clients)]
    try:
        for p in procs:
            p.start()
        oks = [q.get(timeout=120) for _ in procs]
        before = status(config)
        cpu0 = _worker_cpu_s(before)
        util = NvmlUtil()
        t0 = time.perf_counter()
        start.set()
        util.start()
        lats = [np.frombuffer(q.get(timeout=seconds + 120)[1], dtype=np.float64) for _ in procs]
        wall = time.perf_counter() - t0
        nvml_util = util.stop()
        cpu1 = _worker_cpu_s(after := status(config))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        stop = cli("stop", str(config), timeout=120)
        if stop.returncode != 0:
            log(f"orchestrator stop: {stop.stderr.strip()[-300:]}")
    lat = np.concatenate(lats) * 1e6
    busy, source, batches = _gpu_busy(before, after, wall, gpu_us_per_batch)
    estimate = None
    if source.startswith("estimated") and nvml_util is not None:
        # Overlapping batches on slot streams make batches x isolated GPU time overcount; NVML measures.
        estimate, busy, source = busy, nvml_util, "NVML utilization (sampled every 50 ms)"
    workers = after.get("workers", [])
    views = list(((after.get("monitor") or {}).get("workers") or {}).values())
    # Serving-thread working time per batch (receive, stage + launch, reply + account; no waits, no spin).
    h0 = sum(int(w.get("host_ns", 0)) for w in before.get("workers", []))
    h1 = sum(int(w.get("host_ns", 0)) for w in workers)
    host_us = (h1 - h0) / batches / 1e3 if batches and h1 > h0 else None
    cpu_us = (cpu1 - cpu0) / batches * 1e6 if batches and cpu0 is not None and cpu1 is not None else None
    return {
        "label": label, "clients": clients, "in_flight_per_client": in_flight, "seconds": round(wall, 3),
        "requests": int(lat.size), "batches": batches, "batches_per_s": lat.size / wall,
        "items_per_s": lat.size * rows / wall, "gpu_busy": busy, "gpu_busy_source": source,
        "gpu_busy_estimate": estimate, "nvml_util": nvml_util,
        "latency_us_p50": float(np.percentile(lat, 50)), "latency_us_p99": float(np.percentile(lat, 99)),
        "faults": sum(int(w.get("faults", 0)) for w in workers),
        "result_check": all(ok for _, ok in oks),
        "module_loading": [w.get("module_loading") for w in workers],
        "host_us_per_batch": host_us,
        "worker_cpu_us_per_batch": cpu_us,  # all threads, spinning included
        "enqueue_us_p50": max((v.get("enqueue_p50_us") or 0) for v in views) if views else None,
        "enqueue_us_p99": max((v.get("enqueue_p99_us") or 0) for v in views) if views else None,
    }


def _worker_cpu_s(st: dict) -> float | None:
    """CPU seconds (user + system, every thread) used so far by the worker processes in `st`."""
    import psutil

    total = 0.0
    for w in st.get("workers", []):
        try:
            t = psutil.Process(w["pid"]).cpu_times()
        except (psutil.Error, KeyError, TypeError):
            return None
        total += t.user + t.system
    return total
