"""Shared-memory data path benchmark (issue 9, item 8): the issue-3 table (64 x 512 float32 = 128 KiB in and
out; ~30 us, ~110 us and ~1 ms of GPU time per batch) for the bare limit and the orchestrator's frames and
shared-memory paths, one worker and two workers on the GPU under MPS; many small (1-row) requests on both
paths; latency at concurrency 1 against the bare loop; a steady run with clients attaching and detaching.

    python scripts/bench_shm.py --out benchmarks/results/shm-h200/run1             # everything (~8 min)
    python scripts/bench_shm.py --parts table,small --out ...                       # bash scripts/device_run.sh shm
    python scripts/bench_shm.py --parts latency,steady --out ...                    # bash scripts/device_run.sh shm2
    python scripts/bench_shm.py --device cpu --works 0,2 --seconds 1 --reps 1 --steady-seconds 5 --out /tmp/s

Each orchestrator is started once, from configs/gpu-shm.toml (one worker) or configs/gpu-shm-mps.toml (two
workers under MPS) with only its name, run directory, model.work and worker cores overridden. A pool of client
processes then makes every measurement on it: each holds a frames client (shm=False) and a shared-memory
client (shm=True), and the paths alternate within each of the --reps repetitions. Every row gives the median
over the repetitions and their spread (min-max). Writes OUT.md (one table per measurement) and OUT.json.

Runs in this process (orchestration and `orchestrator status` readings), in one child process for the bare
loop (it holds a CUDA context, which must be gone before an MPS daemon starts) and in spawned client processes.
With --device cpu the same flow runs on CPU workers (no bare loop, no graphs, no MPS): a smoke test.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault(
    "CUDA_MODULE_LOADING", "EAGER"
)  # read by cuInit in the bare child: set before it starts

from orchestrator.common.config import load_config  # noqa: E402
from scripts.bench_gpu_bare import Shape  # noqa: E402
from scripts.bench_gpu_orch import NvmlUtil, closed_loop, totals  # noqa: E402
from scripts.bench_mps import cell, fmt, mps_evidence, mps_leftovers, same_bits, stop  # noqa: E402
from scripts.benchlib import ClientPool, copy_logs, machine_info, pinning, start_or_record, status_json  # noqa: E402

log = logging.getLogger("bench_shm")

CONFIGS = {1: ROOT / "configs" / "gpu-shm.toml", 2: ROOT / "configs" / "gpu-shm-mps.toml"}
ROWS = 64
PATHS = ("frames", "shm")
C1_PATHS = (
    ("frames", False),
    ("shm", False),
    ("shm", True),
)  # (path, inputs built in the lease with c.empty)
SETTLE_S = 0.45  # longer than a heartbeat (200 ms): the status counters are current when read
MAX_IN_FLIGHT = 64  # each pool client's bound (Client max_in_flight)


def say(msg: str) -> None:
    print(msg, flush=True)


def host_facts() -> dict[str, Any]:
    """CPU model and kernel (the orchestrator's figures depend on the host far more than the bare loop's),
    and the room in /dev/shm, where arenas live unless the run directory is on tmpfs."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    facts: dict[str, Any] = {"cpu_model": model, "kernel": platform.release()}
    try:
        st = os.statvfs("/dev/shm")
        facts["dev_shm_free_mib"] = st.f_bavail * st.f_frsize >> 20
    except OSError:
        facts["dev_shm_free_mib"] = None
    return facts


# --- plan --------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One session (one orchestrator) per work and worker count, with the parts it hosts: the table on all,
    small requests at the first work (~30 us), latency with one worker at the first two works (~30 and
    ~110 us), the steady run with one worker at the second."""
    steady_at = min(1, len(args.work_list) - 1)

    def hosts(part: str, i: int, workers: int) -> bool:
        return {
            "table": True,
            "small": i == 0,
            "latency": workers == 1 and i < 2,
            "steady": workers == 1 and i == steady_at,
        }[part]

    sessions = []
    for i, work in enumerate(args.work_list):
        for workers in (1, 2):
            parts = [p for p in args.part_list if hosts(p, i, workers)]
            if parts:
                sessions.append(
                    {"work": work, "workers": workers, "parts": parts, "label": f"w{work}-{workers}w"}
                )
    return sessions


def phases(args: argparse.Namespace, parts: list[str]) -> list[dict[str, Any]]:
    """The pool measurements of one session in the order they run, the paths alternating in each repetition:
    (kind, rows per request, requests in flight per client, seconds, [(path, zero-copy inputs)])."""
    kinds = [
        ("table", ROWS, args.in_flight, args.seconds, [(p, False) for p in PATHS]),
        ("small", 1, args.small_in_flight, args.seconds, [(p, False) for p in PATHS]),
        ("latency", ROWS, 1, args.c1_seconds, C1_PATHS),
    ]
    return [
        {
            "kind": kind,
            "rep": rep,
            "path": path,
            "zero_copy": zero_copy,
            "rows": rows,
            "in_flight": in_flight,
            "seconds": seconds,
            "clients": 1 if in_flight == 1 else None,
        }
        for kind, rows, in_flight, seconds, paths in kinds
        if kind in parts
        for rep in range(args.reps)
        for path, zero_copy in paths
    ]


def estimate_s(args: argparse.Namespace, session: dict[str, Any]) -> float:
    """Rough wall time of a session: start, pool, each measurement plus its status reading, stop."""
    est = 15.0 + sum(ph["seconds"] + 1.3 for ph in phases(args, session["parts"]))
    return est + (args.steady_seconds + 20 if "steady" in session["parts"] else 0.0)


# --- client processes --------------------------------------------------------------------------------


def _pool_proc(
    config: str,
    index: int,
    work: int,
    item: int,
    lease_mb: int,
    steady: bool,
    cpus: list[int] | None,
    cmd_q: Any,
    res_q: Any,
) -> None:
    """One client process. Pool: a frames and a shared-memory client, warmed up and checked against the numpy
    reference, then one measurement per command. Steady: inputs and their references, then one attach/detach
    run per command."""
    clients: dict[str, Any] = {}
    made: dict[tuple, Any] = {}  # zero-copy inputs, built once in the lease
    try:
        if cpus:  # keep the load generator off the workers' cores
            os.sched_setaffinity(0, cpus)
        from orchestrator.client import Client
        from workers.engines.synthetic_math import reference

        rng = np.random.default_rng(
            1000 + index
        )  # inputs differ per process: a mix-up shows as a wrong result
        xs = [rng.random((ROWS, item), dtype=np.float32) for _ in range(2 if steady else 1)]
        refs = [reference(x, work) for x in xs]
        checks = {}
        if not steady:
            clients = {
                "frames": Client(config, shm=False, max_in_flight=MAX_IN_FLIGHT, timeout=60),
                "shm": Client(
                    config, shm=True, shm_lease_mb=lease_mb, max_in_flight=MAX_IN_FLIGHT, timeout=60
                ),
            }
            for path, c in clients.items():
                for _ in range(20):  # sockets, lease, caches
                    c.infer(xs[0])
                checks[path] = same_bits(c.infer(xs[0])["y"], refs[0]) and same_bits(
                    c.infer(xs[0][:1])["y"], refs[0][:1]
                )
        res_q.put({"index": index, "checks": checks})
        while (cmd := cmd_q.get()) is not None:
            if cmd["kind"] == "churn":
                res_q.put({"index": index, **_churn(config, cmd, xs, refs, lease_mb)})
                continue
            c = clients[cmd["path"]]
            inputs = xs[0][: cmd["rows"]]
            if cmd.get("zero_copy"):
                key = (cmd["path"], cmd["rows"])
                if key not in made:
                    made[key] = c.empty(inputs.shape, inputs.dtype)
                    made[key][...] = inputs
                inputs = made[key]
            r = closed_loop(c, inputs, cmd["in_flight"], cmd["seconds"], cmd["start_at"])
            res_q.put({"index": index, **r, "lat": np.asarray(r["lat"], dtype=np.float64).tobytes()})
    except BaseException as exc:  # reported to the coordinator, which fails the session with it
        res_q.put({"index": index, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        made.clear()  # no view of a lease may outlive its client
        for c in clients.values():
            c.close()


def _churn(
    config: str, cmd: dict[str, Any], xs: list[np.ndarray], refs: list[np.ndarray], lease_mb: int
) -> dict:
    """Attach (a new shared-memory Client), keep `in_flight` requests going for `attach_s`, checking every
    result bit for bit, detach; again until the end. Every other attachment builds its input in the lease."""
    from orchestrator.client import Client

    time.sleep(max(0.0, cmd["start_at"] - time.monotonic()))
    end = cmd["start_at"] + cmd["seconds"]
    total: dict[str, Any] = {
        "t0": time.monotonic(),
        "lat": [],
        "wrong": 0,
        "errors": {},
        "attaches": 0,
        "attach_ms": [],
    }
    k = 0
    while time.monotonic() < end - 0.05:
        x, ref = xs[k % len(xs)], refs[k % len(xs)]
        t_attach = time.monotonic()
        try:
            with Client(
                config, shm=True, shm_lease_mb=lease_mb, max_in_flight=cmd["in_flight"], timeout=30
            ) as c:
                total["attach_ms"].append((time.monotonic() - t_attach) * 1e3)
                inputs = x
                if k % 2:
                    inputs = c.empty(x.shape, x.dtype)
                    inputs[...] = x
                r = closed_loop(
                    c,
                    inputs,
                    cmd["in_flight"],
                    max(0.0, min(cmd["attach_s"], end - time.monotonic())),
                    check=lambda out, ref=ref: same_bits(out["y"], ref),
                )
                del inputs  # no view of the lease may outlive the client
        except Exception as exc:  # an attach or detach that fails is counted like a failed request
            r = {"lat": [], "wrong": 0, "errors": {f"attach/detach {type(exc).__name__}": 1}}
            time.sleep(0.05)
        total["attaches"] += 1
        total["lat"] += r["lat"]
        total["wrong"] += r["wrong"]
        for name, n in r["errors"].items():
            total["errors"][name] = total["errors"].get(name, 0) + n
        k += 1
    total["t1"] = time.monotonic()
    total["lat"] = np.asarray(total["lat"], dtype=np.float64).tobytes()
    return total


# --- measurements --------------------------------------------------------------------------------------


def settled_status(config: Path) -> dict[str, Any]:
    time.sleep(SETTLE_S)
    return status_json(config)


def deltas(before: dict, after: dict) -> dict[str, int]:
    t0, t1 = totals(before), totals(after)
    return {k: t1[k] - t0[k] for k in t1}


def merge_errors(results: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        for name, n in r["errors"].items():
            out[name] = out.get(name, 0) + n
    return out


def load_stats(results: list[dict[str, Any]], d: dict[str, int], workers: int) -> dict[str, Any]:
    """Client-side throughput and latency of one measurement, and the workers' counters over it (`d`)."""
    lat = np.concatenate([np.frombuffer(r["lat"], dtype=np.float64) for r in results]) * 1e6
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    return {
        "requests": int(lat.size),
        "seconds": round(wall, 3),
        "requests_per_s": lat.size / wall,
        "per_worker_per_s": lat.size / wall / workers,
        "latency_us_p50": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_us_p99": float(np.percentile(lat, 99)) if lat.size else None,
        "gpu_busy": d["gpu_busy_ns"] / (wall * 1e9) if d["gpu_busy_ns"] else None,
        "host_us_per_batch": d["host_ns"] / d["batches"] / 1e3 if d["batches"] else None,
        "rows_per_batch": d["rows"] / d["batches"] if d["batches"] else None,
        "via_shm": d["shm_requests"] / d["requests"] if d["requests"] else None,
        "faults": d["faults"],
        "launches_over_1ms": d["launches_over_1ms"],
        "wrong": sum(r["wrong"] for r in results),
        "errors": merge_errors(results),
        "counters": d,
    }


def shm_pool(
    config: Path,
    n: int,
    work: int,
    item: int,
    lease_mb: int,
    cpus: list[int] | None,
    steady: bool = False,
) -> ClientPool:
    """`n` client processes of _pool_proc; each first reports its check of the first replies ("checks")."""
    return ClientPool(_pool_proc, [(str(config), i, work, item, lease_mb, steady, cpus) for i in range(n)])


def run_phases(args: argparse.Namespace, config: Path, pool: ClientPool, session: dict[str, Any]) -> None:
    before = settled_status(config)
    for ph in phases(args, session["parts"]):
        util = NvmlUtil()
        util.start()
        results = pool.run(ph)
        nvml = util.stop()
        after = settled_status(config)
        r = {**ph, **load_stats(results, deltas(before, after), session["workers"]), "nvml_util": nvml}
        session["phases"].append(r)
        say(
            f"  [{session['label']}] {ph['kind']} {ph['path']}{' zero-copy' if ph.get('zero_copy') else ''} "
            f"rep {ph['rep']}: {r['requests_per_s']:,.0f} req/s, p50 {fmt(r['latency_us_p50'])} us, host "
            f"{fmt(r['host_us_per_batch'], '{:.1f}')} us/batch, via shm {fmt(r['via_shm'], '{:.0%}')}, "
            f"errors {r['errors'] or 'none'}"
        )
        before = after


def steady(args: argparse.Namespace, config: Path, session: dict[str, Any], cpus: list[int] | None) -> dict:
    """--steady-clients processes attaching, sending checked requests and detaching every --attach-s for
    --steady-seconds on the shared-memory path; the workers' faults and launches over 1 ms over the window."""
    pool = shm_pool(config, args.steady_clients, session["work"], args.item, args.lease_mb, cpus, steady=True)
    try:
        before = settled_status(config)
        results = pool.run(
            {
                "kind": "churn",
                "seconds": args.steady_seconds,
                "in_flight": args.steady_in_flight,
                "attach_s": args.attach_s,
            }
        )
    finally:
        pool.close()
    time.sleep(1.0)  # the last detaches land before the reading
    after = settled_status(config)
    d = deltas(before, after)
    t_after = totals(after)
    attach_ms = np.array([ms for r in results for ms in r["attach_ms"]])
    return {
        **load_stats(results, d, session["workers"]),
        "clients": args.steady_clients,
        "in_flight_per_client": args.steady_in_flight,
        "attach_s": args.attach_s,
        "attaches": sum(r["attaches"] for r in results),
        "attach_ms_p50": float(np.median(attach_ms)) if attach_ms.size else None,
        "attach_ms_max": float(attach_ms.max()) if attach_ms.size else None,
        "faults_after_ready": t_after["faults"],
        "leases_before": totals(before)["leases"],
        "leases_after": t_after["leases"],
        "free_bytes_after": t_after["free_bytes"],
        "arena_bytes": t_after["arena_bytes"],
    }


def session_config(
    args: argparse.Namespace, tmp: Path, s: dict[str, Any]
) -> tuple[Path, Path, list[int] | None]:
    """The shipped config with its own name and run directory, the session's work, 4 cores of its own per
    worker and the clients on the rest (where the host has the cores); with --device cpu, CPU workers."""
    doc = tomllib.loads(CONFIGS[s["workers"]].read_text())
    run_dir = tmp / f"r-{s['label']}"
    doc["orchestrator"].update(name=f"bench-shm-{s['label']}", run_dir=str(run_dir))
    doc["model"].update(work=s["work"], item_shape=[args.item])
    worker_cores, client_cores = pinning(s["workers"], 2)
    if worker_cores:
        doc["workers"]["cpu_affinity"] = worker_cores
    if args.device == "gpu":
        doc["workers"]["gpus"] = [0]
    else:
        doc["workers"].update(device="cpu", count=s["workers"], per_gpu=1)
        doc["pipeline"]["cuda_graphs"] = False
        doc.pop("mps", None)
    s["config"] = doc
    path = tmp / f"{s['label']}.toml"
    path.write_text(tomli_w.dumps(doc))
    load_config(path)  # a mistake names its key before anything starts
    return path, run_dir, client_cores


def run_session(args: argparse.Namespace, tmp: Path, s: dict[str, Any]) -> None:
    config, run_dir, client_cores = session_config(args, tmp, s)
    s.update(phases=[], client_cores=client_cores, mps=bool(s["config"].get("mps", {}).get("enabled")))
    logs = args.logs / s["label"] if args.logs else None
    t0 = time.monotonic()
    say(
        f"== {s['label']}: work {s['work']}, {s['workers']} worker(s), parts {s['parts']} (~{estimate_s(args, s):.0f} s)"
    )
    if not start_or_record(config, run_dir, s, logs):
        say(f"  [{s['label']}] {s['error']}")
        return
    try:
        first = status_json(config)
        s["workers_status"] = [
            {k: w.get(k) for k in ("id", "pid", "state", "cpu_affinity", "shm", "faults", "shares_gpu_with")}
            for w in first.get("workers", [])
        ]
        s["mps_status"] = first.get("mps")
        if s["mps"]:
            s["mps_during"] = mps_leftovers(run_dir)
        if {"table", "small", "latency"} & set(s["parts"]):
            pool = shm_pool(config, args.clients, s["work"], args.item, args.lease_mb, client_cores)
            try:
                s["checks"] = [r["checks"] for r in pool.ready]
                run_phases(args, config, pool, s)
            finally:
                pool.close()
        if "steady" in s["parts"]:
            s["steady"] = steady(args, config, s, client_cores)
            st = s["steady"]
            say(
                f"  [{s['label']}] steady: {st['requests']:,} requests, wrong {st['wrong']}, errors "
                f"{st['errors'] or 'none'}, faults {st['faults']}, launches >1 ms {st['launches_over_1ms']}"
            )
    except Exception as exc:  # one session's failure must not lose the others
        log.exception("%s failed", s["label"])
        s["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        ok, text = stop(config)
        s["stop"] = "ok" if ok else f"failed: {text}"
        if s["mps"]:
            time.sleep(0.5)  # the daemon's exit after `quit` is asynchronous
            s["mps_after_stop"] = mps_leftovers(None, args.mps_before)
            s["mps_pipe_dir_left"] = (run_dir / "mps" / "pipe").exists()
        copy_logs(run_dir, logs)
        s["elapsed_s"] = round(time.monotonic() - t0, 1)
        say(f"  [{s['label']}] done in {s['elapsed_s']} s")


# --- the bare loop (child process) ----------------------------------------------------------------------


def _bare_proc(
    jobs: list[dict[str, Any]],
    item: int,
    seconds: float,
    c1_seconds: float,
    reps: int,
    depth: int,
    cpus: list[int] | None,
    q: Any,
) -> None:
    """Per work: one batch at a time (GPU time per batch; latency at concurrency 1) and, for the table, the
    pipelined bare limit (depth `depth`, graphs, spin), each `reps` times. Runs in a child process."""
    try:
        if cpus:  # the worker's cores, as the orchestrator's worker gets them
            os.sched_setaffinity(0, cpus)
        from scripts import bench_gpu_bare as bare

        shape = Shape(ROWS, item)
        out = []
        for job in jobs:
            serial = bare.serial_batches(
                shape, job["work"], seconds=c1_seconds if job["c1"] else 0.5, reps=reps if job["c1"] else 1
            )
            limit = [
                bare.bare_run(shape, job["work"], depth, True, "spin", seconds)
                for _ in range(reps if job["table"] else 0)
            ]
            out.append(
                {
                    **job,
                    "gpu_time_us": statistics.median(r["gpu_time_us"] for r in serial),
                    "serial": serial,
                    "limit": limit,
                }
            )
            say(
                f"  bare work {job['work']}: {out[-1]['gpu_time_us']:.1f} us per batch; limit "
                f"{[round(r['batches_per_s']) for r in limit]}/s; c1 p50 {[round(r['latency_us_p50']) for r in serial]} us"
            )
        q.put(out)
    except BaseException as exc:
        q.put({"error": f"{type(exc).__name__}: {exc}"})


def run_bare(args: argparse.Namespace, sessions: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    jobs = []
    for work in args.work_list:
        parts = {p for s in sessions if s["work"] == work for p in s["parts"]}
        if {"table", "latency"} & parts:
            jobs.append({"work": work, "table": "table" in parts, "c1": "latency" in parts})
    if not jobs or args.device != "gpu":
        return {}
    say(f"== bare loop: {jobs}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    worker_cores = pinning(1, 2)[0]
    p = ctx.Process(
        target=_bare_proc,
        args=(
            jobs,
            args.item,
            args.seconds,
            args.c1_seconds,
            args.reps,
            args.bare_depth,
            worker_cores[0] if worker_cores else None,
            q,
        ),
    )
    p.start()
    try:
        out = q.get(timeout=min(600.0, args.budget_s))
    except queue.Empty:
        p.kill()
        raise RuntimeError("the bare loop did not finish in time") from None
    finally:
        p.join(60)
    if isinstance(out, dict):
        raise RuntimeError(f"bare loop failed: {out['error']}")
    return {b["work"]: b for b in out}


# --- report --------------------------------------------------------------------------------------------


def _med(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def spread(values: list[float], spec: str = "{:,.0f}") -> str:
    """median (min-max) of the repetitions."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return spec.format(vals[0])
    return f"{spec.format(statistics.median(vals))} ({spec.format(min(vals))}-{spec.format(max(vals))})"


def header(head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]


def select(s: dict[str, Any], kind: str, path: str, zero_copy: bool = False) -> list[dict[str, Any]]:
    return [
        p
        for p in s["phases"]
        if p["kind"] == kind and p["path"] == path and bool(p.get("zero_copy")) == zero_copy
    ]


def layout(s: dict[str, Any]) -> str:
    return (
        "1 worker"
        if s["workers"] == 1
        else f"{s['workers']} workers" + (", MPS" if s["mps"] else " (no MPS)")
    )


def gpu_label(work: int, bare: dict[int, dict]) -> str:
    b = bare.get(work)
    return f"{b['gpu_time_us']:.1f} us (work {work})" if b else f"work {work}"


def table_main(sessions: list[dict], bare: dict[int, dict]) -> tuple[list[str], dict[str, Any]]:
    head = [
        "GPU time per batch",
        "run",
        "batches/s median (min-max)",
        "of bare",
        "GPU busy",
        "host us/batch",
        "latency us p50 / p99",
        "via shm",
        "faults",
        "errors",
    ]
    lines = header(head)
    facts: dict[str, Any] = {}
    for work in dict.fromkeys(s["work"] for s in sessions if "table" in s["parts"]):
        label = gpu_label(work, bare)
        limit = (bare.get(work) or {}).get("limit") or []
        base = _med([r["batches_per_s"] for r in limit])
        if limit:
            lines.append(
                f"| {label} | bare limit (depth {limit[0]['depth']}, graphs, spin) | "
                f"{spread([r['batches_per_s'] for r in limit])} | 100% | "
                f"{fmt(_med([r['gpu_busy'] for r in limit]), '{:.1%}')} | "
                f"{fmt(_med([r['host_us_per_batch'] for r in limit]), '{:.1f}')} | "
                f"{fmt(_med([r['latency_us_p50'] for r in limit]))} / {fmt(_med([r['latency_us_p99'] for r in limit]))} | "
                f"- | {sum(r['faults'] for r in limit)} | - |"
            )
            label = ""
        for s in sessions:
            if s["work"] != work or "table" not in s["parts"]:
                continue
            if not s["phases"]:
                lines.append(
                    f"| {label} | {layout(s)} | {cell(s.get('error') or s.get('skipped') or 'no data')} |"
                    + " |" * (len(head) - 3)
                )
                label = ""
                continue
            for path in PATHS:
                runs = select(s, "table", path)
                rate = _med([r["requests_per_s"] for r in runs])
                frac = rate / base if rate and base else None
                host = _med([r["host_us_per_batch"] for r in runs])
                facts[f"{work}/{s['workers']}/{path}"] = {"of_bare": frac, "host_us": host}
                lines.append(
                    f"| {label} | {layout(s)}, {path} | {spread([r['requests_per_s'] for r in runs])} | "
                    f"{fmt(frac, '{:.1%}')} | {fmt(_med([r['gpu_busy'] for r in runs]), '{:.1%}')} | "
                    f"{fmt(host, '{:.1f}')} | {fmt(_med([r['latency_us_p50'] for r in runs]))} / "
                    f"{fmt(_med([r['latency_us_p99'] for r in runs]))} | {fmt(_med([r['via_shm'] for r in runs]), '{:.0%}')} | "
                    f"{sum(r['faults'] for r in runs)} | {cell(merge_errors(runs) or 'none')} |"
                )
                label = ""
    return lines, facts


def table_small(sessions: list[dict]) -> tuple[list[str], dict[str, Any]]:
    head = [
        "run",
        "requests/s median (min-max)",
        "per worker",
        "rows per batch",
        "host us/batch",
        "latency us p50 / p99",
        "via shm",
        "shm / frames (per repetition)",
        "errors",
    ]
    lines = header(head)
    facts: dict[str, Any] = {}
    for s in sessions:
        if "small" not in s["parts"] or not s["phases"]:
            continue
        frames, shm = select(s, "small", "frames"), select(s, "small", "shm")
        ratios = [
            b["requests_per_s"] / a["requests_per_s"]
            for a, b in zip(frames, shm, strict=False)
            if a["requests_per_s"]
        ]
        facts[s["workers"]] = _med(ratios)
        for path, runs in (("frames", frames), ("shm", shm)):
            lines.append(
                f"| {layout(s)}, {path} | {spread([r['requests_per_s'] for r in runs])} | "
                f"{fmt(_med([r['per_worker_per_s'] for r in runs]))} | {fmt(_med([r['rows_per_batch'] for r in runs]), '{:.1f}')} | "
                f"{fmt(_med([r['host_us_per_batch'] for r in runs]), '{:.1f}')} | {fmt(_med([r['latency_us_p50'] for r in runs]))} / "
                f"{fmt(_med([r['latency_us_p99'] for r in runs]))} | {fmt(_med([r['via_shm'] for r in runs]), '{:.0%}')} | "
                f"{spread(ratios, '{:.2f}x') if path == 'shm' else ''} | {cell(merge_errors(runs) or 'none')} |"
            )
    return lines, facts


def table_c1(sessions: list[dict], bare: dict[int, dict]) -> tuple[list[str], dict[str, Any]]:
    head = ["GPU time per batch", "run", "p50 us median (min-max)", "p99 us", "p50 minus bare p50", "errors"]
    lines = header(head)
    facts: dict[str, Any] = {}
    for s in sessions:
        if "latency" not in s["parts"]:
            continue
        label = gpu_label(s["work"], bare)
        b = bare.get(s["work"]) or {}
        serial = b.get("serial") if b.get("c1") else []
        base = _med([r["latency_us_p50"] for r in serial]) if serial else None
        if base is not None:
            lines.append(
                f"| {label} | bare loop, one batch at a time | {spread([r['latency_us_p50'] for r in serial])} | "
                f"{fmt(_med([r['latency_us_p99'] for r in serial]))} | - | - |"
            )
            label = ""
        for path, zero_copy in C1_PATHS:
            runs = select(s, "latency", path, zero_copy)
            p50 = _med([r["latency_us_p50"] for r in runs])
            added = p50 - base if p50 is not None and base is not None else None
            name = f"orchestrator, {path}" + (", inputs built in the lease (c.empty)" if zero_copy else "")
            facts[f"work {s['work']}, {name}"] = added
            lines.append(
                f"| {label} | {name} | {spread([r['latency_us_p50'] for r in runs])} | "
                f"{fmt(_med([r['latency_us_p99'] for r in runs]))} | {fmt(added, '{:+.0f} us')} | "
                f"{cell(merge_errors(runs) or 'none')} |"
            )
            label = ""
    return lines, facts


def table_steady(sessions: list[dict], bare: dict[int, dict]) -> list[str]:
    head = [
        "GPU time per batch",
        "clients x in flight",
        "seconds",
        "attaches (p50 / max ms)",
        "requests/s",
        "latency us p50 / p99",
        "wrong results",
        "errors",
        "driver faults (window / since READY)",
        "launches >1 ms",
        "leases before / after",
        "arena free after",
    ]
    lines = header(head)
    for s in sessions:
        st = s.get("steady")
        if "steady" not in s["parts"]:
            continue
        if not st:
            lines.append(
                f"| {gpu_label(s['work'], bare)} | {cell(s.get('error') or s.get('skipped') or 'no data')} |"
                + " |" * (len(head) - 2)
            )
            continue
        free = (
            f"{st['free_bytes_after'] / st['arena_bytes']:.1%} of {st['arena_bytes'] >> 20} MiB"
            if st["arena_bytes"]
            else "-"
        )
        lines.append(
            f"| {gpu_label(s['work'], bare)} | {st['clients']} x {st['in_flight_per_client']} | {st['seconds']:.0f} | "
            f"{st['attaches']:,} ({fmt(st['attach_ms_p50'], '{:.1f}')} / {fmt(st['attach_ms_max'], '{:.0f}')}) | "
            f"{st['requests_per_s']:,.0f} | {fmt(st['latency_us_p50'])} / {fmt(st['latency_us_p99'])} | "
            f"{st['wrong']} | {cell(st['errors'] or 'none')} | {st['faults']} / {st['faults_after_ready']} | "
            f"{st['launches_over_1ms']} | {st['leases_before']} / {st['leases_after']} | {free} |"
        )
    return lines


def verdicts(args: argparse.Namespace, sessions: list[dict], main: dict, small: dict, c1: dict) -> list[str]:
    """The issue's targets against the medians measured, for the parts this run made."""
    w30, w110 = args.work_list[0], args.work_list[min(1, len(args.work_list) - 1)]
    checks: list[tuple[str, float | None, str, bool]] = []  # (target, value, format, met)
    if main:
        for key, least, what in (
            (f"{w30}/1/shm", 0.60, "~30 us, one worker, shm: of bare >= 60%"),
            (f"{w30}/2/shm", 0.90, "~30 us, two workers under MPS, shm: of bare >= 90%"),
            (f"{w110}/1/shm", 0.98, "~110 us, one worker, shm: of bare >= 98%"),
        ):
            v = (main.get(key) or {}).get("of_bare")
            checks.append((what, v, "{:.1%}", v is not None and v >= least))
        host = (main.get(f"{w30}/1/shm") or {}).get("host_us")
        checks.append(
            (
                "~30 us, one worker, shm: serving-thread host us per batch <= 30",
                host,
                "{:.1f}",
                host is not None and host <= 30,
            )
        )
    for workers, ratio in sorted(small.items()):
        checks.append(
            (
                f"1-row requests, {workers} worker(s): shm / frames requests/s >= 3x",
                ratio,
                "{:.2f}x",
                ratio is not None and ratio >= 3,
            )
        )
    for what, added in c1.items():
        if ", shm" in what:
            checks.append(
                (
                    f"concurrency 1, {what}: p50 minus bare p50 <= 40 us",
                    added,
                    "{:+.0f} us",
                    added is not None and added <= 40,
                )
            )
    out = [
        f"- {what}: {fmt(v, spec)} -> {'n/a' if v is None else 'met' if ok else 'MISSED'}"
        for what, v, spec, ok in checks
    ]
    for s in sessions:
        st = s.get("steady")
        if st:
            ok = st["faults"] == st["launches_over_1ms"] == st["wrong"] == 0 and not st["errors"]
            out.append(
                f"- steady {st['seconds']:.0f} s, {st['clients']} clients attaching every {st['attach_s']:g} s: "
                f"faults {st['faults']}, launches >1 ms {st['launches_over_1ms']}, wrong {st['wrong']}, "
                f"errors {sum(st['errors'].values())} (targets 0, 0, 0) -> {'met' if ok else 'MISSED'}"
            )
    return out


def session_notes(sessions: list[dict]) -> list[str]:
    out = []
    for s in sessions:
        if s.get("skipped"):
            out.append(f"- {s['label']} ({layout(s)}): {s['skipped']}")
            continue
        shm = [w.get("shm") or {} for w in s.get("workers_status") or []]
        arenas = (
            ", ".join(
                f"{x.get('arena_bytes', 0) >> 20} MiB registered={x.get('registered')}"
                if x.get("enabled")
                else "shm OFF"
                for x in shm
            )
            or "-"
        )
        bad_checks = [c for c in s.get("checks") or [] if not all(c.values())]
        extra = ""
        if s["mps"]:
            left = s.get("mps_after_stop") or s.get("mps_pipe_dir_left")
            extra = f"; MPS: {mps_evidence({**s, 'workers': s.get('workers_status') or []})}; left after stop: {left or 'nothing'}"
        out.append(
            f"- {s['label']} ({layout(s)}): start {s.get('start_s', '-')} s; arenas {arenas}; first results "
            f"{'checked bit-exact on both paths' if s.get('checks') and not bad_checks else f'FAILED {bad_checks}' if bad_checks else 'not checked'}"
            f"{extra}; stop {s.get('stop', '-')}" + (f"; ERROR {cell(s['error'])}" if s.get("error") else "")
        )
    return out


def report(
    args: argparse.Namespace, info: dict[str, Any], sessions: list[dict], bare: dict[int, dict]
) -> str:
    main, fmain = table_main(sessions, bare)
    small, fsmall = table_small(sessions)
    c1, fc1 = table_c1(sessions, bare)
    cores = pinning(1, 2)
    md = [
        f"# Shared-memory data path: {info['device']} (driver {info['driver']}), {info['date']}",
        "",
        f"- command: `{info['command']}`",
        f"- host: {info['cpu_model']}, kernel {info['kernel']}, {info['affinity_cpus']} of {info['host_cpus']} CPUs, "
        f"Python {info['python']}, cuda-bindings {info.get('cuda_bindings')}, NVRTC {info.get('nvrtc')}; "
        f"/dev/shm free {info.get('dev_shm_free_mib')} MiB"
        + (
            " (WARNING: less than two 256 MiB arenas need)"
            if (info.get("dev_shm_free_mib") or 1 << 20) < 600
            else ""
        ),
        f"- configs: {CONFIGS[1].relative_to(ROOT)} (1 worker) and {CONFIGS[2].relative_to(ROOT)} (2 workers, MPS), "
        "overriding name, run directory, model.work and the worker cores"
        + (" (CPU smoke: CPU workers, no graphs, no MPS)" if args.device == "cpu" else ""),
        "- cores: "
        + (
            f"worker {cores[0][0]} (a second worker the next 4), clients on the rest; the bare loop on the "
            "first worker's"
            if cores[0]
            else "not pinned (fewer than 16 CPUs)"
        ),
        f"- batch: {ROWS} x {args.item} float32 ({ROWS * args.item * 4 >> 10} KiB in, the same out); {args.reps} "
        f"repetitions of each measurement, the paths alternating; median (min-max) over them",
        "",
    ]
    if any("table" in s["parts"] for s in sessions):
        md += [
            f"## Issue-3 table: {args.clients} client processes x {args.in_flight} in flight, {args.seconds:g} s each",
            "",
            *main,
            "",
            "batches/s: client replies per second (one 64-row request = one batch); of bare: median against the bare "
            "limit's median; GPU busy: the workers' event-timed GPU time (union of each worker's batch spans, summed "
            "over workers, so it can pass 100% under MPS) over wall time; host us/batch: the serving threads' working "
            "time (status host_ns) per batch (status batches); via shm: the share of requests the workers served "
            "through shared memory (status shm.requests); faults: driver faults journaled during the measurement. "
            "Latencies are closed-loop at saturation.",
            "",
        ]
    if small[2:]:
        md += [
            f"## Many small requests: 1-row requests, {args.clients} clients x {args.small_in_flight} in flight, "
            f"{args.seconds:g} s each, work {args.work_list[0]}",
            "",
            *small,
            "",
            "rows per batch: rows (monitor items) per batch (status batches): how far the worker coalesced.",
            "",
        ]
    if c1[2:]:
        md += [
            f"## Latency at concurrency 1: one client, one {ROWS}-row request at a time (infer), {args.c1_seconds:g} s each",
            "",
            *c1,
            "",
            "bare loop: stage the input into pinned memory, launch (graph), wait (spin), copy the result out, one "
            "batch at a time (depth 1), first fifth dropped; orchestrator: client-observed infer() latency.",
            "",
        ]
    steady_lines = table_steady(sessions, bare)
    if steady_lines[2:]:
        md += [
            f"## Steady run: shared memory, clients attaching and detaching every {args.attach_s:g} s, every result "
            "checked bit for bit against the numpy reference",
            "",
            *steady_lines,
            "",
            "Driver faults: the workers' driver journal (allocations, registrations, module loads, graph "
            "instantiations after READY); launches >1 ms: the monitor's enqueue_over_1ms_total over the window.",
            "",
        ]
    md += [
        "## Against the targets (issue 9)",
        "",
        *verdicts(args, sessions, fmain, fsmall, fc1),
        "",
        "## Sessions",
        "",
        *session_notes(sessions),
        "",
    ]
    return "\n".join(md)


# --- main ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output path stem: writes OUT.md and OUT.json")
    ap.add_argument(
        "--parts", default="table,small,latency,steady", help="any of table, small, latency, steady"
    )
    ap.add_argument(
        "--works",
        default="762,5975,64000",
        help="synthetic work per row group: ~30 us, ~110 us, ~1 ms of GPU time on an H200 (31.8/113.5/974 us)",
    )
    ap.add_argument("--item", type=int, default=512, help="floats per row")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measurement")
    ap.add_argument(
        "--seconds", type=float, default=3.0, help="each table / small-request measurement and bare run"
    )
    ap.add_argument("--c1-seconds", type=float, default=1.5, help="each concurrency-1 measurement")
    ap.add_argument("--clients", type=int, default=8, help="client processes in the pool")
    ap.add_argument("--in-flight", type=int, default=8, help="table: requests each client keeps in flight")
    ap.add_argument(
        "--small-in-flight", type=int, default=32, help="1-row requests each client keeps in flight"
    )
    ap.add_argument("--lease-mb", type=int, default=8, help="each client's lease (shm_lease_mb)")
    ap.add_argument("--bare-depth", type=int, default=4, help="the bare limit's pipeline depth")
    ap.add_argument("--steady-seconds", type=float, default=60.0)
    ap.add_argument("--steady-clients", type=int, default=16)
    ap.add_argument("--steady-in-flight", type=int, default=4)
    ap.add_argument(
        "--attach-s", type=float, default=1.0, help="steady: each client detaches and re-attaches this often"
    )
    ap.add_argument(
        "--budget-s", type=float, default=1e9, help="skip sessions that would end after this many seconds"
    )
    ap.add_argument(
        "--device",
        choices=["gpu", "cpu"],
        default="gpu",
        help="cpu: CPU workers, a smoke test of this script",
    )
    ap.add_argument("--logs", type=Path, help="copy each session's supervisor, worker and MPS logs here")
    args = ap.parse_args()
    args.work_list = [int(w) for w in args.works.split(",")]
    args.part_list = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.part_list) - {"table", "small", "latency", "steady"}
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(143)
    )  # a step's timeout: stop the orchestrator on the way out
    t_end = time.monotonic() + args.budget_s
    info = {**machine_info(), **host_facts(), "mps_before": mps_leftovers()}
    args.mps_before = frozenset(p["pid"] for p in info["mps_before"])
    say(json.dumps(info))
    sessions = plan(args)
    say(f"plan: {[(s['label'], s['parts'], round(estimate_s(args, s))) for s in sessions]}")
    bare: dict[int, dict] = {}
    errors: list[str] = []
    try:
        bare = run_bare(args, sessions)
    except Exception as exc:  # the orchestrator rows are still worth having
        log.exception("bare loop failed")
        errors.append(f"bare loop: {type(exc).__name__}: {exc}")
    tmp = Path(
        tempfile.mkdtemp(prefix="bshm-", dir="/tmp")
    )  # short: ipc socket paths live in the run directories
    try:
        for s in sessions:
            if time.monotonic() + estimate_s(args, s) > t_end:
                s["skipped"] = f"skipped: time budget (needs ~{estimate_s(args, s):.0f} s)"
                s.update(phases=[], mps=s["workers"] == 2 and args.device == "gpu")
                say(f"== {s['label']}: {s['skipped']}")
                continue
            run_session(args, tmp, s)
            write(args, info, sessions, bare, errors)  # a step killed at its limit keeps what it has so far
    finally:  # also on SIGTERM: what was measured is written
        shutil.rmtree(tmp, ignore_errors=True)
        info["mps_after"] = mps_leftovers()
        text = write(args, info, sessions, bare, errors)
    say(text)
    say(f"wrote {args.out}.md and {args.out}.json")
    failed = errors or any(s.get("error") or s.get("skipped") for s in sessions)
    return 1 if failed else 0


def write(
    args: argparse.Namespace, info: dict, sessions: list[dict], bare: dict[int, dict], errors: list[str]
) -> str:
    """OUT.md and OUT.json from what has been measured so far; returns the Markdown."""
    text = report(args, info, [s for s in sessions if "phases" in s], bare)
    if errors:
        text += "\n## Errors\n\n" + "\n".join(f"- {cell(e, 2000)}" for e in errors) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text)
    Path(f"{args.out}.json").write_text(
        json.dumps(
            {
                "machine": info,
                "args": {k: v for k, v in vars(args).items() if k != "mps_before"},
                "bare": bare,
                "sessions": sessions,
                "errors": errors,
            },
            indent=1,
            default=str,
        )
    )
    return text


if __name__ == "__main__":
    sys.exit(main())
