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
from collections.abc import Callable
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


def write_config(
    directory: Path,
    name: str,
    rows: int,
    item: int,
    work: int,
    depth: int,
    graphs: bool,
    sync: str,
    device: str = "gpu",
    io_threads: int = 1,
) -> Path:
    """A benchmark config; device = "cpu" (no graphs) is a smoke test of this script on any host."""
    worker_cores = _split_cores()[0]
    affinity = f"[{worker_cores}]" if worker_cores else '"auto"'
    text = f"""[orchestrator]
name = "{name}"
run_dir = "{directory / "run"}"
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


def closed_loop(
    c: Any,
    inputs: Any,
    in_flight: int,
    seconds: float,
    start_at: float | None = None,
    check: Callable[[dict], bool] | None = None,
) -> dict[str, Any]:
    """Drive Client `c` with `inputs` for `seconds` from `start_at` (a time.monotonic() value, the same clock in
    every process; default now): `in_flight` requests kept going through c.submit(), or with in_flight 1
    back-to-back c.infer() calls (the synchronous path). `check` judges each result. Returns the window
    (t0, t1), every answered request's latency (s), the number of wrong results and the errors by type."""
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.monotonic()))
    lat: list[float] = []
    errors: dict[str, int] = {}
    wrong = 0

    def finish(t_sub: float, call: Callable, *args: Any) -> None:
        nonlocal wrong
        try:
            out = call(*args)
        except Exception as exc:  # counted, never fatal: the caller reports them
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        lat.append(time.monotonic() - t_sub)
        if check is not None and not check(out):
            wrong += 1

    window: deque = deque()
    t0 = time.monotonic()
    end = t0 + seconds
    while True:
        now = time.monotonic()
        if in_flight == 1 and now < end:
            finish(now, c.infer, inputs, 60)
        elif in_flight > 1 and now < end and len(window) < in_flight:
            try:
                window.append((now, c.submit(inputs, 60)))
            except Exception as exc:  # e.g. no ready worker: counted like a failed request
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        elif window:
            t_sub, fut = window.popleft()
            finish(t_sub, fut.result, 60)
        else:
            break
    return {"t0": t0, "t1": time.monotonic(), "lat": lat, "wrong": wrong, "errors": errors}


def _client_proc(
    config: str,
    rows: int,
    item: int,
    work: int,
    in_flight: int,
    seconds: float,
    check: bool,
    start: Any,
    q: Any,
    shm: bool | str = "auto",
) -> None:
    """One client process: warm up, wait for the common start, then keep `in_flight` requests going."""
    sys.path.insert(0, str(ROOT))
    clients_cores = _split_cores()[1]
    if clients_cores:  # keep the load generator off the worker's cores (see write_config)
        os.sched_setaffinity(0, clients_cores)
    from orchestrator.client import Client
    from workers.engines import synthetic_math

    x = np.random.default_rng().random((rows, item), dtype=np.float32)
    with Client(config, max_in_flight=in_flight, timeout=60, shm=shm) as c:
        first = c.infer({"x": x})
        ok = True
        if check:  # one row against the numpy reference (the whole batch would take seconds at large work)
            ok = bool(np.array_equal(first["y"][:1], synthetic_math.reference(x[:1], work), equal_nan=True))
        for _ in range(20):
            c.infer({"x": x})
        q.put(("ready", ok))
        start.wait()
        res = closed_loop(c, {"x": x}, in_flight, seconds)
        q.put(("done", np.asarray(res["lat"], dtype=np.float64).tobytes(), res["errors"]))


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


def run(
    label: str,
    config: Path,
    clients: int,
    in_flight: int,
    seconds: float,
    rows: int,
    item: int,
    work: int,
    gpu_us_per_batch: float,
    log: Any,
    shm: bool | str = "auto",
) -> dict[str, Any]:
    """Start `config`, drive it with `clients` processes x `in_flight` requests for `seconds` (their Clients
    get `shm`: "auto", True or False), stop it; throughput, GPU busy, host time per batch, latency."""
    proc = cli("start", str(config), "--detach")
    if proc.returncode != 0:
        raise RuntimeError(
            f"orchestrator start failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1500:]}"
        )
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = ctx.Event()
    procs = [
        ctx.Process(
            target=_client_proc,
            args=(str(config), rows, item, work, in_flight, seconds, i == 0, start, q, shm),
        )
        for i in range(clients)
    ]
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
        done = [q.get(timeout=seconds + 120) for _ in procs]
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
    lat = np.concatenate([np.frombuffer(d[1], dtype=np.float64) for d in done]) * 1e6
    errors: dict[str, int] = {}
    for d in done:
        for name, n in d[2].items():
            errors[name] = errors.get(name, 0) + n
    busy, source, batches = _gpu_busy(before, after, wall, gpu_us_per_batch)
    estimate = None
    if source.startswith("estimated") and nvml_util is not None:
        # Overlapping batches on slot streams make batches x isolated GPU time overcount; NVML measures.
        estimate, busy, source = busy, nvml_util, "NVML utilization (sampled every 50 ms)"
    workers = after.get("workers", [])
    views = list(((after.get("monitor") or {}).get("workers") or {}).values())
    # Serving-thread working time per batch (receive, stage + launch, reply + account; no waits, no spin).
    delta = {k: v - totals(before)[k] for k, v in totals(after).items()}
    host_us = delta["host_ns"] / batches / 1e3 if batches and delta["host_ns"] > 0 else None
    cpu_us = (cpu1 - cpu0) / batches * 1e6 if batches and cpu0 is not None and cpu1 is not None else None
    return {
        "label": label,
        "clients": clients,
        "in_flight_per_client": in_flight,
        "seconds": round(wall, 3),
        "requests": int(lat.size),
        "batches": batches,
        "batches_per_s": lat.size / wall,
        "items_per_s": lat.size * rows / wall,
        "gpu_busy": busy,
        "gpu_busy_source": source,
        "gpu_busy_estimate": estimate,
        "nvml_util": nvml_util,
        "latency_us_p50": float(np.percentile(lat, 50)),
        "latency_us_p99": float(np.percentile(lat, 99)),
        "faults": sum(int(w.get("faults", 0)) for w in workers),
        "result_check": all(ok for _, ok in oks),
        "errors": errors,
        "shm": shm,
        "via_shm": delta["shm_requests"] / delta["requests"] if delta["requests"] else None,
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


def totals(st: dict) -> dict[str, int]:
    """The cumulative counters of one `orchestrator status --json`, summed over the workers: requests and
    batches served, serving-thread working time (host_ns), driver faults since READY, the shared-memory
    counters (requests, bytes, leases, free and arena bytes); from the monitor: rows, GPU busy ns (union of
    batch spans) and launches over 1 ms."""
    workers = st.get("workers", [])
    shm = [w.get("shm") or {} for w in workers]
    views = list(((st.get("monitor") or {}).get("workers") or {}).values())

    def add(items: list[dict], key: str) -> int:
        return sum(int(x.get(key) or 0) for x in items)

    return {
        "requests": add(workers, "requests"),
        "batches": add(workers, "batches"),
        "host_ns": add(workers, "host_ns"),
        "faults": add(workers, "faults"),
        "shm_requests": add(shm, "requests"),
        "shm_bytes": add(shm, "bytes"),
        "leases": add(shm, "leases"),
        "free_bytes": add(shm, "free_bytes"),
        "arena_bytes": add(shm, "arena_bytes"),
        "rows": add(views, "items_total"),
        "gpu_busy_ns": add(views, "gpu_busy_ns_total"),
        "launches_over_1ms": add(views, "enqueue_over_1ms_total"),
    }
