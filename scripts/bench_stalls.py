"""Stall detection on a GPU (issue 4): clean, pinned_alloc, device_alloc, module_load runs, 60 s each.
python3 scripts/bench_stalls.py --out benchmarks/results/stalls   (CPU plumbing: --cpu-smoke --seconds 5)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.common.config import load_config  # noqa: E402
from orchestrator.common.rundir import RunDir  # noqa: E402
from scripts import benchlib  # noqa: E402
from scripts.benchlib import machine_info as machine  # noqa: E402
from scripts.loadgen import run_load  # noqa: E402

GPU_SCENARIOS = ("clean", "pinned_alloc", "device_alloc", "module_load")
CPU_SCENARIOS = ("clean", "cpu_hog")
ALL_SCENARIOS = (*GPU_SCENARIOS, "cpu_hog")
SETTLE_S = 1.0  # idle time around the measured run: worker reports (every 200 ms) and stall records land
CAUSES = ("driver_lock", "lock_wait", "cpu_preemption", "throttling", "foreign_process", "unknown")


def say(msg: str) -> None:
    print(msg, flush=True)


# --- config ---------------------------------------------------------------------------------------


def scenario_sections(args: argparse.Namespace, scenario: str, run_dir: Path) -> dict[str, dict[str, Any]]:
    """The config of one scenario as TOML sections (also recorded in the JSON output)."""
    cpu = args.cpu_smoke
    sections: dict[str, dict[str, Any]] = {
        "orchestrator": {"name": f"stalls-{scenario}", "run_dir": str(run_dir), "startup_timeout_s": 120},
        "workers": (
            {"device": "cpu", "count": 1, "cpu_affinity": [[min(os.sched_getaffinity(0))]]}
            if cpu
            else {"device": "gpu", "gpus": [args.gpu], "per_gpu": 1}
        ),
        "model": {"kind": "synthetic", "item_shape": [args.item], "work": args.work, "max_batch": args.rows},
        "pipeline": {
            "depth": 2,
            "cuda_graphs": not cpu,
            "buckets": [args.rows],
            "sync": "blocking" if cpu else "spin",
            "max_queue": 4096,
            "max_queue_delay_us": 0,
        },
        "monitor": {"interval_ms": 100, "stall_factor": args.stall_factor, "stall_min_us": args.stall_min_us},
    }
    if scenario != "clean":
        debug: dict[str, Any] = {"inject": scenario, "inject_period_ms": args.period_ms}
        if scenario == "pinned_alloc":
            debug["inject_bytes"] = args.pinned_mib << 20
        elif scenario == "device_alloc":
            debug["inject_bytes"] = args.device_mib << 20
        sections["debug"] = debug
    return sections


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    path.write_text(tomli_w.dumps(sections))
    load_config(path)  # ConfigError names the key at fault before anything starts
    return path


# --- orchestrator helpers -------------------------------------------------------------------------


def status_json(config: Path) -> dict[str, Any]:
    return benchlib.status_json(config)  # `orchestrator status CFG --once --json`


def status_text(config: Path) -> str:
    proc = benchlib.cli("status", str(config), "--once", timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"orchestrator status --once failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def the_worker(st: dict[str, Any]) -> dict[str, Any]:
    workers = (st.get("monitor") or {}).get("workers") or {}
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker in status, found {sorted(workers)}")
    return next(iter(workers.values()))


def stop(config: Path, run_dir: Path) -> str | None:
    """`orchestrator stop`; SIGTERM to the supervisor this script started if that fails. None when stopped."""
    rd = RunDir(run_dir)
    if not rd.is_running():
        return None
    try:
        proc = benchlib.cli("stop", str(config), timeout=120)
        if proc.returncode == 0:
            return None
        problem = f"orchestrator stop exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    except Exception as exc:  # a hung CLI must not keep the supervisor alive
        problem = f"orchestrator stop failed: {exc}"
    pid = rd.read_pid()
    if pid is not None and rd.is_running():
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while rd.is_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        problem += f"; sent SIGTERM to supervisor pid {pid}" + (" (still running)" if rd.is_running() else "")
    return problem


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- stalls ----------------------------------------------------------------------------------------


def read_stalls(run_dir: Path) -> list[dict[str, Any]]:
    records = []
    for name in ("stalls.jsonl.1", "stalls.jsonl"):  # .1 is the rotated (older) part, if any
        path = run_dir / name
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    records.append(json.loads(line))
    return records


def compact(rec: dict[str, Any], scenario: str, in_window: bool) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "in_window": in_window,
        "time": rec.get("time"),
        "t_ns": rec.get("t_ns"),
        "worker_id": rec.get("worker_id"),
        "kind": rec.get("kind"),
        "enqueue_us": rec.get("enqueue_us"),
        "latency_us": rec.get("latency_us"),
        "gpu_us": rec.get("gpu_us"),
        "baseline_us": rec.get("baseline_us"),
        "cause": rec.get("cause"),
        "causes": [{"cause": c["cause"], "score": c["score"]} for c in rec.get("causes", [])],
        "summary": rec.get("summary"),
    }


def analyse(records: list[dict[str, Any]], enq_over_1ms: int) -> dict[str, Any]:
    """Recall of the >1 ms launches and how the flagged ones were attributed (records of the measured window)."""
    flagged = [r for r in records if "enqueue" in (r.get("kind") or ()) and (r.get("enqueue_us") or 0) > 1000]
    driver = sum(1 for r in flagged if r.get("cause") == "driver_lock")
    by_cause: dict[str, int] = {}
    for r in records:
        by_cause[r.get("cause", "unknown")] = by_cause.get(r.get("cause", "unknown"), 0) + 1
    flagged_causes: dict[str, int] = {}
    for r in flagged:
        flagged_causes[r.get("cause", "unknown")] = flagged_causes.get(r.get("cause", "unknown"), 0) + 1
    return {
        "stalls": len(records),
        "stalls_by_cause": by_cause,
        "stalls_by_kind": {
            k: sum(1 for r in records if r.get("kind") == list(k.split("+")))
            for k in ("enqueue", "latency", "enqueue+latency")
        },
        "flagged_over_1ms": len(flagged),
        "flagged_over_1ms_by_cause": flagged_causes,
        "over_1ms_any_kind": sum(1 for r in records if (r.get("enqueue_us") or 0) > 1000),
        "recall": len(flagged) / enq_over_1ms if enq_over_1ms else None,
        "driver_lock_first": driver,
        "driver_lock_share": driver / len(flagged) if flagged else None,
        "max_enqueue_us_flagged": max((r["enqueue_us"] for r in flagged), default=None),
    }


# --- one scenario ----------------------------------------------------------------------------------


def gpu_brief(st: dict[str, Any] | None) -> list[dict[str, Any]]:
    keys = (
        "index",
        "name",
        "sm_clock_mhz",
        "sm_clock_max_mhz",
        "mem_clock_mhz",
        "power_w",
        "power_limit_w",
        "temp_c",
        "temp_slowdown_c",
        "util_pct",
        "throttle_reasons",
        "foreign_pids",
    )
    return [{k: g.get(k) for k in keys} for g in ((st or {}).get("monitor") or {}).get("gpus") or []]


def run_scenario(args: argparse.Namespace, scenario: str, tmp: Path) -> dict[str, Any]:
    run_dir = tmp / f"run-{scenario}"
    sections = scenario_sections(args, scenario, run_dir)
    config = write_config(tmp / f"{scenario}.toml", sections)
    shape = (args.rows, args.item)
    res: dict[str, Any] = {"scenario": scenario, "config": sections, "ok": False}
    t_start = time.monotonic()
    try:
        proc = benchlib.cli("start", str(config), "--detach", timeout=240)
        if proc.returncode != 0:
            raise RuntimeError(
                f"orchestrator start failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1500:]}"
            )
        res["start_s"] = round(time.monotonic() - t_start, 1)
        say(f"  [{scenario}] started in {res['start_s']} s; warm-up {args.warmup:g} s")
        run_load(config, shape, args.procs, args.in_flight, args.warmup)
        time.sleep(SETTLE_S)
        t_w0 = time.time()
        before = the_worker(status_json(config))

        mid: dict[str, Any] = {}

        def snapshot() -> (
            None
        ):  # while the load runs: the text view and the JSON, clocks and throttle included
            time.sleep(min(args.seconds / 2 + 1.0, args.seconds))
            for key, fn in (("status_text", status_text), ("status_json", status_json)):
                try:
                    mid[key] = fn(config)
                except Exception as exc:
                    mid[key + "_error"] = str(exc)

        snap = threading.Thread(target=snapshot, name="mid-run-status", daemon=True)
        say(f"  [{scenario}] load {args.procs} procs x {args.in_flight} in flight for {args.seconds:g} s")
        snap.start()
        load = run_load(config, shape, args.procs, args.in_flight, args.seconds)
        snap.join(60)
        time.sleep(SETTLE_S)
        t_w1 = time.time()
        after_st = status_json(config)
        after = the_worker(after_st)
        res.update(mid)
        res["final_stall_counts"] = (after_st.get("monitor") or {}).get("stall_counts")
        res["window"] = {"t0": t_w0, "t1": t_w1}
        res["worker_before"] = {
            k: before.get(k)
            for k in ("batches_total", "enqueue_over_1ms_total", "stalls", "faults_total", "requests_total")
        }
        res["worker_after"] = {
            k: after.get(k)
            for k in (
                "batches_total",
                "enqueue_over_1ms_total",
                "stalls",
                "faults_total",
                "requests_total",
                "stall_causes",
                "baseline_us",
                "sync_mode",
                "enqueue_p50_us",
                "enqueue_p99_us",
            )
        }
        res["batches"] = after["batches_total"] - before["batches_total"]
        res["requests"] = after["requests_total"] - before["requests_total"]
        res["enqueue_over_1ms"] = after["enqueue_over_1ms_total"] - before["enqueue_over_1ms_total"]
        res["driver_faults"] = (after.get("faults_total") or 0) - (before.get("faults_total") or 0)
        res["load"] = {
            "requests": load.requests,
            "ok": load.ok,
            "errors": load.errors,
            "wall_s": round(load.wall_s, 3),
            "throughput_rps": load.throughput,
            "items_per_s": load.rows / load.wall_s if load.wall_s else 0.0,
            "latency_us_p50": load.pct(50),
            "latency_us_p99": load.pct(99),
            "latency_us_max": float(load.latencies_us.max()) if load.latencies_us.size else None,
        }
        res["gpus_mid_run"] = gpu_brief(mid.get("status_json"))
        res["ok"] = True
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
        res["supervisor_log_tail"] = tail(run_dir / "supervisor.log")
        for log in sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else ():
            res[f"log_tail_{log.stem}"] = tail(log)
        say(f"  [{scenario}] FAILED: {res['error']}")
    finally:
        problem = stop(config, run_dir)
        if problem:
            res["stop_problem"] = problem
            say(f"  [{scenario}] {problem}")
    if res["ok"]:
        window = res["window"]
        records = read_stalls(run_dir)
        inside = [r for r in records if window["t0"] <= (r.get("time") or 0) <= window["t1"]]
        res["stall_records"] = [
            compact(r, scenario, window["t0"] <= (r.get("time") or 0) <= window["t1"]) for r in records
        ]
        res["stalls_outside_window"] = len(records) - len(inside)
        res.update(analyse(inside, res["enqueue_over_1ms"]))
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return res


# --- output ----------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:.2f} ms" if v >= 1000 else f"{v:.0f} us"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | batches | enqueue>1ms | flagged (of those) | recall | top cause driver_lock | "
        "stalls by cause | throughput | p50/p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if not r["ok"]:
            lines.append(
                f"| {r['scenario']} | FAILED: {r.get('error', '?')[:160].replace('|', '/')} | | | | | | | |"
            )
            continue
        causes = (
            ", ".join(f"{c} {n}" for c, n in sorted(r["stalls_by_cause"].items(), key=lambda x: -x[1]))
            or "none"
        )
        dl = (
            f"{r['driver_lock_first']}/{r['flagged_over_1ms']} ({_pct(r['driver_lock_share'])})"
            if r["flagged_over_1ms"]
            else "n/a"
        )
        ld = r["load"]
        lines.append(
            f"| {r['scenario']} | {r['batches']:,} | {r['enqueue_over_1ms']:,} | {r['flagged_over_1ms']:,} "
            f"| {_pct(r['recall'])} | {dl} | {causes} | {ld['throughput_rps']:,.0f} req/s "
            f"({ld['items_per_s']:,.0f} items/s) | {_us(ld['latency_us_p50'])} / {_us(ld['latency_us_p99'])} |"
        )
    return "\n".join(lines)


def gpu_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | GPU | SM clock / max (MHz) | mem clock (MHz) | power / limit (W) | temp (C) | util | "
        "throttle reasons |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for g in r.get("gpus_mid_run") or ():
            pw = g.get("power_w")
            pl = g.get("power_limit_w")
            lines.append(
                f"| {r['scenario']} | {g.get('index')} {g.get('name') or ''} | {g.get('sm_clock_mhz')} / "
                f"{g.get('sm_clock_max_mhz')} | {g.get('mem_clock_mhz')} | "
                f"{'-' if pw is None else f'{pw:.0f}'} / {'-' if pl is None else f'{pl:.0f}'} | "
                f"{g.get('temp_c')} (slowdown {g.get('temp_slowdown_c')}) | {g.get('util_pct')}% | "
                f"{', '.join(g.get('throttle_reasons') or ()) or 'none'} |"
            )
    return "\n".join(lines) if len(lines) > 2 else "(no GPU in status: CPU run or NVML unavailable)"


def checks(results: list[dict[str, Any]], cpu: bool) -> list[str]:
    out = []
    for r in results:
        s = r["scenario"]
        if not r["ok"]:
            out.append(f"{s}: FAILED ({r.get('error')})")
            continue
        if s == "clean":
            out.append(
                f"clean: {r['stalls']} stall(s) flagged -> {'PASS' if r['stalls'] == 0 else 'FAIL'} (target: none)"
            )
        elif s == "cpu_hog":
            top = max(r["stalls_by_cause"], key=r["stalls_by_cause"].get) if r["stalls_by_cause"] else None
            out.append(
                f"cpu_hog: {r['stalls']} stall(s), most often {top} "
                f"-> {'PASS' if top == 'cpu_preemption' else 'FAIL'} (target: cpu_preemption)"
            )
        else:
            ok = (
                r["recall"] is not None
                and r["recall"] >= 0.9
                and r["driver_lock_share"] is not None
                and r["driver_lock_share"] >= 0.9
            )
            verdict = ("PASS" if ok else "FAIL") if s == "pinned_alloc" else ("meets" if ok else "below")
            out.append(
                f"{s}: recall {_pct(r['recall'])} of {r['enqueue_over_1ms']} launches >1 ms, driver_lock first "
                f"{_pct(r['driver_lock_share'])} -> {verdict} (90% / 90%{'' if s == 'pinned_alloc' else ', report only'})"
            )
        if not cpu and r.get("gpus_mid_run"):
            g = r["gpus_mid_run"][0]
            seen = g.get("sm_clock_mhz") is not None and g.get("throttle_reasons") is not None
            out.append(
                f"  {s}: clocks and throttle reasons in status while loaded: {'yes' if seen else 'NO'}"
            )
    return out


def write_outputs(
    prefix: Path,
    info: dict[str, Any],
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    total_s: float,
) -> tuple[str, list[str]]:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tbl = table(results)
    chk = checks(results, args.cpu_smoke)
    mode = "CPU smoke (synthetic CPU worker, no GPU)" if args.cpu_smoke else "GPU"
    settings = (
        f"{mode}; one worker; synthetic engine, request = batch = {args.rows} x {args.item} float32, "
        f"work {args.work}; depth 2, graphs {'off' if args.cpu_smoke else 'on'}, sync "
        f"{'blocking' if args.cpu_smoke else 'spin'}, buckets [{args.rows}]; stall_factor {args.stall_factor:g}, "
        f"stall_min_us {args.stall_min_us}; injection every {args.period_ms} ms on a side thread "
        f"(pinned_alloc {args.pinned_mib} MiB, device_alloc {args.device_mib} MiB, module_load a 50-kernel "
        f"cubin; cpu_hog one busy process per worker core); load {args.procs} client processes x "
        f"{args.in_flight} in flight, warm-up {args.warmup:g} s, measured {args.seconds:g} s."
    )
    md = [
        f"# Stall detection: {info.get('device', '?')}, driver {info.get('driver', '?')}, {info.get('date')}",
        "",
        f"Command: `{info.get('command')}`",
        "",
        settings,
        "",
        "Columns: batches and enqueue>1ms are the worker's counters over the measured window "
        "(`enqueue_over_1ms_total`, exact); flagged = stall records of that window with kind `enqueue` and "
        "enqueue_us > 1000; recall = flagged / enqueue>1ms; top cause driver_lock = flagged ranked "
        "`driver_lock` first; stalls by cause = every stall record of the window (enqueue or latency); "
        "throughput and p50/p99 are client-side (closed loop).",
        "",
        tbl,
        "",
        *[f"- {c}" for c in chk],
        "",
        "## GPU in `orchestrator status --json` while loaded (mid-run)",
        "",
        gpu_table(results),
        "",
    ]
    for r in results:
        md += [f"## {r['scenario']}", ""]
        if not r["ok"]:
            md += ["```", r.get("traceback", r.get("error", "")), r.get("supervisor_log_tail", ""), "```", ""]
            continue
        md += [
            f"Elapsed {r['elapsed_s']} s (start {r.get('start_s')} s); driver-lock faults journaled in the "
            f"window: {r['driver_faults']}; stall records outside the window (warm-up): "
            f"{r['stalls_outside_window']}; flagged >1 ms by cause: {r['flagged_over_1ms_by_cause'] or 'none'}; "
            f"longest flagged enqueue: {_us(r['max_enqueue_us_flagged'])}; client errors: "
            f"{r['load']['errors'] or 'none'}.",
            "",
        ]
        if "status_text" in r:
            md += ["`orchestrator status --once` mid-run:", "", "```", r["status_text"].rstrip(), "```", ""]
        for key in ("status_text_error", "status_json_error", "stop_problem"):
            if key in r:
                md += [f"{key}: {r[key]}", ""]
    md += [f"Total {total_s:.0f} s."]
    (prefix.with_name(prefix.name + ".md")).write_text("\n".join(md) + "\n")
    slim = [{k: v for k, v in r.items() if k != "stall_records"} for r in results]
    (prefix.with_name(prefix.name + ".json")).write_text(
        json.dumps(
            {
                "machine": info,
                "settings": settings,
                "args": vars(args),
                "total_s": round(total_s, 1),
                "results": slim,
            },
            indent=1,
            default=str,
        )
    )
    with open(prefix.with_name(prefix.name + "-stalls.jsonl"), "w") as fh:
        for r in results:
            for rec in r.get("stall_records") or ():
                fh.write(json.dumps(rec, default=str) + "\n")
    return tbl, chk


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        required=True,
        type=Path,
        help="path prefix: writes PREFIX.md, PREFIX.json, PREFIX-stalls.jsonl",
    )
    ap.add_argument(
        "--scenarios",
        default=None,
        help=f"comma list from {', '.join(ALL_SCENARIOS)} "
        f"(default: {','.join(GPU_SCENARIOS)}; with --cpu-smoke {','.join(CPU_SCENARIOS)})",
    )
    ap.add_argument("--seconds", type=float, default=60.0, help="measured load per scenario")
    ap.add_argument("--warmup", type=float, default=3.0, help="load before the measured window")
    ap.add_argument(
        "--work",
        type=int,
        default=None,
        help="synthetic work (default 4597, about 110 us per batch on an H200; 20 with --cpu-smoke)",
    )
    ap.add_argument("--procs", type=int, default=4, help="client processes")
    ap.add_argument("--in-flight", type=int, default=4, help="requests in flight per client process")
    ap.add_argument("--period-ms", type=int, default=200, help="injection period")
    ap.add_argument("--pinned-mib", type=int, default=64, help="pinned_alloc size")
    ap.add_argument("--device-mib", type=int, default=256, help="device_alloc size")
    ap.add_argument("--gpu", type=int, default=0, help="GPU index for the worker")
    ap.add_argument("--stall-factor", type=float, default=8.0)
    ap.add_argument("--stall-min-us", type=int, default=1000)
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU worker (no GPU): clean and cpu_hog, to test the plumbing",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary configs and run directories")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.rows, args.item = 8, 256
        args.work = 20 if args.work is None else args.work
    else:
        args.rows, args.item = 64, 1024
        args.work = 4597 if args.work is None else args.work
    scenarios = (
        args.scenarios.split(",")
        if args.scenarios
        else list(CPU_SCENARIOS if args.cpu_smoke else GPU_SCENARIOS)
    )
    bad = [s for s in scenarios if s not in ALL_SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; choose from {', '.join(ALL_SCENARIOS)}")
    if args.cpu_smoke and set(scenarios) - set(CPU_SCENARIOS):
        ap.error(f"--cpu-smoke runs only {', '.join(CPU_SCENARIOS)} (the GPU injections need a GPU worker)")
    info = machine()
    say(f"{info.get('device')} (driver {info.get('driver')}); scenarios {scenarios}, {args.seconds:g} s each")
    tmp = Path(tempfile.mkdtemp(prefix="bst-"))  # short: ipc socket paths live in the run directories
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for scenario in scenarios:
            say(f"== {scenario}")
            results.append(run_scenario(args, scenario, tmp))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"kept {tmp}")
    tbl, chk = write_outputs(args.out, info, args, results, time.monotonic() - t0)
    say(f"wrote {args.out}.md, {args.out}.json, {args.out}-stalls.jsonl ({time.monotonic() - t0:.0f} s)")
    for line in chk:
        say(line)
    say(tbl)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
