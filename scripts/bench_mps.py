"""One-GPU MPS benchmark (issue 6): the synthetic engine at about 30 us and 110 us per batch, MPS off and on
x 1 and 2 workers per GPU, each run through the CLI (start, status, stop) and driven by client processes.
Runs in this process (orchestration, checks, status sampling) and in spawned client processes.

    python scripts/bench_mps.py --out benchmarks/results/mps-h100 --logs /tmp/mps-logs
    python scripts/bench_mps.py --cpu-smoke --out /tmp/mps-smoke      # the same flow on CPU workers, no MPS
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.supervisor import mps  # noqa: E402
from scripts.benchlib import cli, copy_logs, machine_info, start_or_record, status_json  # noqa: E402
from scripts.loadgen import run_load  # noqa: E402

log = logging.getLogger("bench_mps")

ITEM = 1024
ROWS = 64
# Calibrated on the H200 (benchmarks/results/gpu-h200-2026-11-21, 64 x 1024 float32 batches): work 0 -> 34.5 us
# of GPU time per batch (the copies alone), work 4597 -> 108.3 us.
WORK_30US = 0
WORK_110US = 4597


# --- helpers shared with scripts/bench_scaling.py --------------------------------------------------


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit-identical float32 arrays, any NaN equal to any NaN."""
    gn, wn = np.isnan(got), np.isnan(want)
    return bool(
        got.shape == want.shape
        and np.array_equal(gn, wn)
        and np.array_equal(got[~gn].view(np.uint32), want[~wn].view(np.uint32))
    )


def check_results(config: Path, work: int) -> dict[str, Any]:
    """A few batches of several sizes, in flight together (so every worker gets some), checked bit for bit
    against the numpy reference on their first, middle and last rows (all rows would take seconds)."""
    from orchestrator.client import Client
    from workers.engines.synthetic_math import reference

    rng = np.random.default_rng(6)
    xs = [rng.random((rows, ITEM), dtype=np.float32) for rows in (ROWS, 5, ROWS, 1, ROWS, 33, ROWS, ROWS)]
    with Client(config, timeout=60) as c:
        outs = [f.result(60)["y"] for f in [c.submit({"x": x}) for x in xs]]
    bad = []
    for i, (x, y) in enumerate(zip(xs, outs, strict=True)):
        rows = sorted({0, len(x) // 2, len(x) - 1})
        if y.shape != x.shape or not same_bits(y[rows], reference(x[rows], work)):
            bad.append(i)
    return {"ok": not bad, "batches": len(xs), "bad_batches": bad}


class StatusSampler(threading.Thread):
    """Takes `orchestrator status --json` snapshots while the load runs (the monitor's rates cover the
    last 2 s, so they must be read during the load, not after it)."""

    def __init__(self, config: Path, seconds: float, samples: int = 4) -> None:
        super().__init__(daemon=True)
        self.config, self.seconds, self.samples = config, seconds, samples
        self.snaps: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        t0 = time.monotonic()
        for k in range(self.samples):  # spread over the middle of the run, after a warm-up second
            at = 1.5 + (self.seconds - 2.5) * k / max(1, self.samples - 1)
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            try:
                self.snaps.append(status_json(self.config))
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                self.errors.append(str(exc)[-300:])


def _median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize_status(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the samples: each worker's GPU busy (event time / wall) and batches/s, each GPU's NVML
    utilisation."""
    out: dict[str, Any] = {"samples": len(snaps), "workers": {}, "gpus": {}}
    if not snaps:
        return out
    for wid in snaps[-1].get("monitor", {}).get("workers", {}):
        views = [s["monitor"]["workers"].get(wid, {}) for s in snaps]
        out["workers"][wid] = {
            "gpu_busy_pct": _median([v.get("gpu_busy_pct") for v in views]),
            "batches_per_s": _median([v.get("batches_per_s") for v in views]),
        }
    for g in snaps[-1].get("monitor", {}).get("gpus", []):
        views = [
            next((x for x in s["monitor"].get("gpus", []) if x.get("uuid") == g.get("uuid")), {})
            for s in snaps
        ]
        out["gpus"][str(g.get("index"))] = {
            "util_pct": _median([v.get("util_pct") for v in views]),
            "sm_clock_mhz": _median([v.get("sm_clock_mhz") for v in views]),
            "power_w": _median([v.get("power_w") for v in views]),
        }
    return out


def mps_leftovers(run_dir: Path | None = None, ignore: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """MPS processes running now: those of run_dir's pipe directory, or with run_dir None all of them except
    the pids in `ignore` (those that ran before the benchmark)."""
    procs = [p for p in mps.list_mps_processes() if p.pid not in ignore]
    if run_dir is not None:
        procs = [p for p in procs if p.pipe_dir and p.pipe_dir.startswith(str(run_dir))]
    return [{"pid": p.pid, "role": p.role, "pipe_dir": p.pipe_dir} for p in procs]


def mps_evidence(r: dict[str, Any]) -> str:
    """Whether the workers really were MPS clients: the server seen mid-load, and `status` listing the
    worker pids among its clients (get_client_list)."""
    if not r.get("mps"):
        return "n/a"
    server = any(p["role"] == mps.SERVER for p in r.get("mps_during") or [])
    st = r.get("mps_status")
    if not isinstance(st, dict):
        return f"server {'seen' if server else 'NOT seen'}; status has no MPS section"
    clients = {pid for pids in (st.get("clients") or {}).values() for pid in pids}
    workers = [w["pid"] for w in r.get("workers", [])]
    return (
        f"server {'seen' if server else 'NOT seen'}; "
        f"{sum(pid in clients for pid in workers)}/{len(workers)} workers are its clients"
    )


def stop(config: Path) -> tuple[bool, str]:
    proc = cli("stop", str(config), timeout=120)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()[-500:]


# --- one run -----------------------------------------------------------------------------------------


def write_config(
    tmp: Path, label: str, work: int, per_gpu: int, use_mps: bool, cpu: bool
) -> tuple[Path, Path]:
    run_dir = tmp / f"r-{label}"
    workers = (
        {"device": "cpu", "count": per_gpu}
        if cpu
        else {"device": "gpu", "gpus": [0], "per_gpu": per_gpu, "cpu_affinity": "auto"}
    )
    doc: dict[str, dict[str, Any]] = {
        "orchestrator": {"name": f"bench-mps-{label}", "run_dir": str(run_dir), "startup_timeout_s": 120.0},
        "workers": workers,
        "model": {"kind": "synthetic", "item_shape": [ITEM], "work": work, "max_batch": ROWS},
        "pipeline": {
            "depth": 3,
            "cuda_graphs": not cpu,
            "buckets": [ROWS],
            "sync": "spin",
            "max_queue": 4096,
            "max_queue_delay_us": 0,
        },
        "monitor": {"interval_ms": 100},
    }
    if use_mps:
        doc["mps"] = {"enabled": True}
    path = tmp / f"{label}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path, run_dir


def mid_run_probe(r: dict[str, Any], config: Path, run_dir: Path) -> None:
    """Under load: the MPS processes of this run and what `status` says about MPS."""
    try:
        r["mps_during"] = mps_leftovers(run_dir)
        r["mps_status_mid"] = status_json(config).get("mps")
    except Exception as exc:  # a probe must not end the run
        r["mid_probe_error"] = f"{type(exc).__name__}: {exc}"


def one_run(args: argparse.Namespace, tmp: Path, target: str, work: int, use_mps: bool, per_gpu: int) -> dict:
    label = f"{target}-mps{'on' if use_mps else 'off'}-{per_gpu}w"
    config, run_dir = write_config(tmp, label, work, per_gpu, use_mps, args.cpu_smoke)
    r: dict[str, Any] = {
        "label": label,
        "target": target,
        "work": work,
        "mps": use_mps,
        "workers_per_gpu": per_gpu,
        "clients": args.procs,
        "in_flight_per_client": args.in_flight,
        "ok": False,
    }
    if not start_or_record(config, run_dir, r, args.logs / label if args.logs else None):
        return r
    try:
        first = status_json(config)
        r["workers"] = [
            {k: w.get(k) for k in ("id", "device", "pid", "state", "cpu_affinity", "shares_gpu_with")}
            for w in first.get("workers", [])
        ]
        r["check"] = check_results(config, work)
        sampler = StatusSampler(config, args.seconds)
        sampler.start()
        during_mps = threading.Timer(args.seconds / 2, mid_run_probe, (r, config, run_dir))
        during_mps.start()
        load = run_load(config, (ROWS, ITEM), args.procs, args.in_flight, args.seconds)
        sampler.join(30)
        during_mps.join(5)
        r.update(load.figures())
        r["status"] = summarize_status(sampler.snaps)
        r["status_errors"] = sampler.errors
        last = sampler.snaps[-1] if sampler.snaps else first
        r["mps_status"] = r.get("mps_status_mid") or last.get("mps")
        r["faults"] = sum(int(w.get("faults", 0)) for w in last.get("workers", []))
        r["ok"] = r["check"]["ok"] and not load.errors
    except Exception as exc:  # one run's failure must not lose the others
        log.exception("%s failed", label)
        r["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stopped, text = stop(config)
        r["stop"] = "ok" if stopped else f"failed: {text}"
        time.sleep(0.5)  # the daemon's exit after `quit` is asynchronous
        r["mps_after_stop"] = mps_leftovers(None, args.mps_before)
        r["mps_pipe_dir_left"] = (run_dir / "mps" / "pipe").exists()
        copy_logs(run_dir, args.logs / label if args.logs else None)
    return r


# --- report ------------------------------------------------------------------------------------------


def fmt(v: Any, spec: str = "{:,.0f}") -> str:
    return "-" if v is None else spec.format(v)


def cell(v: Any, limit: int = 300) -> str:
    """Any value as one Markdown table cell: one line, pipes escaped, long text cut (the JSON keeps it all)."""
    text = " ".join(str(v).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + " ..."


def table(runs: list[dict]) -> str:
    head = [
        "run",
        "batches/s",
        "vs 1 worker no MPS",
        "items/s",
        "GPU busy (sum of workers)",
        "NVML util",
        "latency us p50 / p99",
        "check",
        "MPS in use",
        "no MPS process after stop",
        "errors",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    base: dict[str, float] = {}
    for r in runs:
        if r.get("batches_per_s") and not r["mps"] and r["workers_per_gpu"] == 1:
            base[r["target"]] = r["batches_per_s"]
    for r in runs:
        if "batches_per_s" not in r:
            lines.append(
                f"| {r['label']} | "
                + " | ".join(["-"] * (len(head) - 2))
                + f" | {cell(r.get('error') or r.get('skipped', '?'))} |"
            )
            continue
        st = r.get("status", {})
        busy = [
            w["gpu_busy_pct"] for w in st.get("workers", {}).values() if w.get("gpu_busy_pct") is not None
        ]
        busy_txt = (f"{sum(busy):.0f}% (" + " + ".join(f"{b:.0f}" for b in busy) + ")") if busy else "-"
        util = [g["util_pct"] for g in st.get("gpus", {}).values() if g.get("util_pct") is not None]
        ratio = r["batches_per_s"] / base[r["target"]] if base.get(r["target"]) else None
        gone = (
            "yes"
            if not r.get("mps_after_stop") and not r.get("mps_pipe_dir_left")
            else cell(f"NO: {r.get('mps_after_stop')}, pipe dir left: {r.get('mps_pipe_dir_left')}")
        )
        lines.append(
            f"| {r['label']} | {fmt(r['batches_per_s'])} | {fmt(ratio, '{:.2f}x')} | {fmt(r['items_per_s'])} | "
            f"{busy_txt} | {fmt(util[0] if util else None, '{:.0f}%')} | "
            f"{fmt(r['latency_us_p50'])} / {fmt(r['latency_us_p99'])} | "
            f"{'ok' if r.get('check', {}).get('ok') else 'FAILED'} | {mps_evidence(r)} | {gone} | "
            f"{cell(r.get('errors') or r.get('error') or 'none')} |"
        )
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace, info: dict, runs: list[dict]) -> str:
    works = {r["target"]: r["work"] for r in runs}
    return "\n".join(
        [
            f"# MPS benchmark, one GPU: {info['device']} (driver {info['driver']})",
            "",
            f"- date: {info['date']}",
            f"- command: `{info['command']}`",
            f"- GPUs: {'; '.join(info.get('gpus', [])) or 'n/a'}",
            f"- batch: {ROWS} x {ITEM} float32 (256 KiB in and out), one request per batch; synthetic work per target: "
            + ", ".join(f"{t} = {w}" for t, w in works.items()),
            f"- load: {args.procs} client processes x {args.in_flight} in flight, {args.seconds:g} s per run; pipeline "
            "depth 3, CUDA graphs, spin"
            + (" (CPU smoke: CPU workers, no graphs, no MPS)" if args.cpu_smoke else ""),
            "- GPU busy: each worker's event-timed GPU time / wall (monitor, 2 s window, median of samples); under MPS "
            "the workers' kernels overlap, so the sum can pass 100%. NVML util: share of time any kernel ran.",
            "",
            table(runs),
            *mps_lines(runs),
        ]
    )


def mps_lines(runs: list[dict]) -> list[str]:
    """What `status` said about MPS in each MPS run (daemon, servers and their clients = the workers)."""
    out = []
    for r in runs:
        if r.get("mps") and "batches_per_s" in r:
            st = r.get("mps_status")
            what = (
                f"daemon pid {st.get('daemon_pid')} (ours: {st.get('ours')}), servers {st.get('servers')}, "
                f"clients {st.get('clients')}, worker pids {[w['pid'] for w in r.get('workers', [])]}"
                if isinstance(st, dict)
                else "status()['mps'] is empty: the supervisor did not report MPS"
            )
            out.append(f"- {r['label']}: {what}")
    return ["", *out, ""] if out else []


def plan(args: argparse.Namespace) -> list[tuple[str, int, bool, int]]:
    if args.cpu_smoke:
        return [(t, w, False, n) for t, w in (("work0", 0), ("work2", 2)) for n in (1, 2)]
    order = [(False, 1), (False, 2), (True, 2), (True, 1)]  # most telling first, in case the budget runs out
    return [(t, w, m, n) for t, w in (("110us", args.work_110us), ("30us", args.work_30us)) for m, n in order]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work-30us", type=int, default=WORK_30US, help=f"synthetic work for ~30 us (default {WORK_30US})"
    )
    ap.add_argument(
        "--work-110us",
        type=int,
        default=WORK_110US,
        help=f"synthetic work for ~110 us (default {WORK_110US})",
    )
    ap.add_argument("--procs", type=int, default=8, help="client processes")
    ap.add_argument("--in-flight", type=int, default=8, help="requests in flight per client process")
    ap.add_argument("--seconds", type=float, default=6.0, help="load duration per run")
    ap.add_argument(
        "--budget-s", type=float, default=300.0, help="skip runs that would end after this many seconds"
    )
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="CPU workers, MPS off: proves the flow on any host"
    )
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    ap.add_argument("--logs", type=Path, help="copy each run's supervisor, worker and MPS logs here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = machine_info()
    log.info("machine: %s", info)
    info["mps_before"] = mps_leftovers()
    args.mps_before = frozenset(p["pid"] for p in info["mps_before"])
    try:
        info["mps_control"] = mps.find_binary()
    except mps.MpsError as exc:
        info["mps_control"] = str(exc)
    if info["mps_before"]:
        log.warning("MPS processes already running before the benchmark: %s", info["mps_before"])
    t_end = time.monotonic() + args.budget_s
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bmps-", dir="/tmp") as tmp:
        for target, work, use_mps, per_gpu in plan(args):
            label = f"{target}-mps{'on' if use_mps else 'off'}-{per_gpu}w"
            if time.monotonic() + args.seconds + 45 > t_end:
                runs.append(
                    {
                        "label": label,
                        "target": target,
                        "work": work,
                        "mps": use_mps,
                        "workers_per_gpu": per_gpu,
                        "skipped": "skipped: time budget",
                    }
                )
                continue
            log.info("run %s (work %d)", label, work)
            r = one_run(args, Path(tmp), target, work, use_mps, per_gpu)
            log.info(
                "run %s: %s",
                label,
                {
                    k: r.get(k)
                    for k in (
                        "batches_per_s",
                        "latency_us_p50",
                        "latency_us_p99",
                        "ok",
                        "error",
                        "mps_after_stop",
                    )
                },
            )
            runs.append(r)
    info["mps_after"] = mps_leftovers()
    text = report(args, info, runs)
    print(text, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text)
    Path(f"{args.out}.json").write_text(json.dumps({"machine": info, "runs": runs}, indent=1, default=str))
    log.info("wrote %s.md and .json", args.out)
    return 0 if runs and all(r.get("ok") and not r.get("mps_after_stop") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
