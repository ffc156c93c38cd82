"""Stall detection and driver-lock attribution on a GPU (issues 4, 16): clean, clean-own and injected runs.
python3 scripts/bench_stalls.py --out benchmarks/results/stalls [--scenarios clean,clean-own,host_register,...] [--journal auto|cupti|own] [--seconds 60] [--pairs 4 --pair-seconds 20]   (CPU plumbing: --cpu-smoke --seconds 5)

Each scenario starts one worker (synthetic engine, about 110 us per batch on an H200) under closed-loop load and
reports the launches over 1 ms (the worker's exact counter), the stall records flagged for them, the share whose
top cause is driver_lock with the injected operation named (the record's `driver_op`), and the serving
thread's host time per batch (heartbeat `host_ns` / `batches`). "clean-own" is the clean run with
`[monitor] driver_journal = "own"` (no CUPTI) whatever --journal says: clean vs clean-own is the journal's cost.
--pin puts the worker on 4 cores of its own and the load generator on the others, as when clients run on
other hosts. It did not quiet a clean run on an H200 host (16 cores): 34 stalls in 60 s pinned, with run-queue
waits of one 4 ms tick among the worker's own threads, against 25 unpinned on the next machine and 0 on the one
after (benchmarks/results/stalls-cupti-callback-h200-2026-12-03, calls 5-7). So both run unpinned by default
(workers.cpu_affinity = auto).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.cli.bench.telemetry import host_delta  # noqa: E402
from orchestrator.common.config import load_config  # noqa: E402
from orchestrator.common.rundir import RunDir  # noqa: E402
from scripts import benchlib  # noqa: E402
from scripts.benchlib import machine_info as machine  # noqa: E402
from scripts.benchlib import pinning  # noqa: E402
from scripts.loadgen import run_load  # noqa: E402

#: debug.inject kind -> the driver_op categories (the stall record's `driver_op.op`) that are the right answer.
EXPECTED_OPS: dict[str, frozenset[str]] = {
    "pinned_alloc": frozenset({"pinned_alloc", "pinned_free"}),
    "device_alloc": frozenset({"device_alloc", "device_free"}),
    "module_load": frozenset({"module_load", "module_unload"}),
    "host_register": frozenset({"host_register", "host_unregister"}),
    "library_alloc": frozenset({"device_alloc", "device_free"}),
    "lazy_module": frozenset({"lazy_load", "module_load", "module_unload"}),
}
INJECTED = tuple(EXPECTED_OPS)
CLEAN = ("clean", "clean-own")
GPU_SCENARIOS = (*CLEAN, *INJECTED)
CPU_SCENARIOS = (*CLEAN, "cpu_hog")
ALL_SCENARIOS = (*GPU_SCENARIOS, "cpu_hog")
RECALL_TARGET = 0.95  # of the launches over 1 ms, flagged as stalls
RIGHT_OP_TARGET = 0.90  # of those flagged, top cause driver_lock with the injected operation named
HOST_DIFF_TARGET_US = 1.0  # host time per batch, clean (journal on) minus clean-own (own journal only)
NO_STALL = "no launch over 1 ms: the injection did not stall this run"
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
            else {
                "device": "gpu",
                "gpus": [args.gpu],
                "per_gpu": 1,
                **({"cpu_affinity": [args.worker_cores]} if getattr(args, "worker_cores", None) else {}),
            }
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
        "monitor": {
            "interval_ms": 100,
            "stall_factor": args.stall_factor,
            "stall_min_us": args.stall_min_us,
            "driver_journal": "own" if scenario == "clean-own" else args.journal,
        },
    }
    if scenario not in CLEAN:
        debug: dict[str, Any] = {"inject": scenario, "inject_period_ms": args.period_ms}
        mib = {
            "pinned_alloc": args.pinned_mib,
            "device_alloc": args.device_mib,
            "host_register": args.register_mib,
            "library_alloc": args.library_mib,
        }.get(scenario)
        if mib is not None:
            debug["inject_bytes"] = mib << 20
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


def the_heartbeat(st: dict[str, Any]) -> dict[str, Any]:
    """The worker's own entry in status (the supervisor's worker handle: pid, heartbeat counters, engine facts)."""
    workers = st.get("workers") or []
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker in status, found {[w.get('id') for w in workers]}")
    return workers[0]


def host_per_batch(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The serving thread's host time per batch between two status entries of one worker (heartbeat `host_ns`
    and `batches`, both counted from the worker process's start): None when the worker restarted in between
    or served nothing."""
    out: dict[str, Any] = {"batches": None, "host_ns": None, "host_us_per_batch": None, "restarted": False}
    served = host_delta(before, after)
    if served is None:
        out["restarted"] = True
        return out
    nb, ns = served
    out.update(batches=nb, host_ns=ns)
    if nb > 0 and ns >= 0:
        out["host_us_per_batch"] = ns / nb / 1e3
    return out


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
        "driver_op": rec.get("driver_op"),
        # Where the launching thread's time went (on CPU, waiting for a core, blocked): an `unknown` stall's
        # only evidence.
        "probe_launch": (rec.get("candidate") or {}).get("probe_launch"),
        "launch_t0_ns": (rec.get("candidate") or {}).get("launch_t0_ns"),
        "launch_t1_ns": (rec.get("candidate") or {}).get("launch_t1_ns"),
    }


def read_windows(path: Path) -> list[tuple[int, int]] | None:
    """The injected operations' (start, end) from <run_dir>/inject-<worker>.windows; None without the file."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return sorted((int(a), int(b)) for a, b in (line.split() for line in text.splitlines() if line.strip()))


def injection_overlap(records: list[dict[str, Any]], windows: list[tuple[int, int]], scenario: str) -> dict:
    """Of the flagged launches over 1 ms, those whose launch overlapped an injected operation (the ones the
    injection can have caused), and how many of those were blamed on the right operation; the rest by
    cause, and how many launches ran on a CPU most of the time (the driver spinning, not blocked). Each
    flagged record gets `injected_overlap` (True or False) for the stall log the bench writes."""
    starts = [w[0] for w in windows]
    flagged = [r for r in records if "enqueue" in (r.get("kind") or ()) and (r.get("enqueue_us") or 0) > 1000]
    hit: list[dict[str, Any]] = []
    missed: list[dict[str, Any]] = []
    for r in flagged:
        l0, l1 = r.get("launch_t0_ns"), r.get("launch_t1_ns")
        # One thread runs the operations one after another: only the last to start before the launch ended
        # can still have been running when it began.
        i = bisect.bisect_right(starts, l1) if l0 is not None and l1 is not None else 0
        r["injected_overlap"] = bool(i) and l0 is not None and windows[i - 1][1] >= l0
        (hit if r["injected_overlap"] else missed).append(r)
    wrong = [r for r in hit if not right_op(r, scenario)]
    return {
        "operations": len(windows),
        "flagged_over_1ms": len(flagged),
        "overlapping": len(hit),
        "overlapping_right_op": len(hit) - len(wrong),
        "overlapping_right_share": (len(hit) - len(wrong)) / len(hit) if hit else None,
        "overlapping_wrong_by_cause": _count([r.get("cause", "unknown") for r in wrong]),
        "overlapping_on_cpu": len([r for r in hit if on_cpu(r)]),
        "not_overlapping_by_cause": _count([r.get("cause", "unknown") for r in missed]),
    }


def on_cpu(rec: dict[str, Any]) -> bool:
    """The launch's thread was on a CPU for at least half the launch (spinning, not blocked or waiting)."""
    p = rec.get("probe_launch") or {}
    return bool(p.get("wall_us")) and p.get("oncpu_us", 0) >= 0.5 * p["wall_us"]


def _count(keys: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items(), key=lambda x: (-x[1], x[0])))


def _causes(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {n}" for k, n in (counts or {}).items()) or "none"


def right_op(rec: dict[str, Any], scenario: str) -> bool:
    """Top cause driver_lock, and the driver operation named is one the scenario injects."""
    op = rec.get("driver_op") or {}
    return rec.get("cause") == "driver_lock" and op.get("op") in EXPECTED_OPS.get(scenario, ())


def analyse(records: list[dict[str, Any]], enq_over_1ms: int, scenario: str = "") -> dict[str, Any]:
    """Recall of the >1 ms launches and how the flagged ones were attributed (records of the measured window)."""
    flagged = [r for r in records if "enqueue" in (r.get("kind") or ()) and (r.get("enqueue_us") or 0) > 1000]
    driver = sum(1 for r in flagged if r.get("cause") == "driver_lock")
    right = sum(1 for r in flagged if right_op(r, scenario))
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
        "expected_ops": sorted(EXPECTED_OPS.get(scenario, ())),
        "driver_lock_right_op": right,
        "right_op_share": right / len(flagged) if flagged else None,
        "ops_by_name": _count([(r.get("driver_op") or {}).get("name") or "(none)" for r in flagged]),
        "ops_by_category": _count([(r.get("driver_op") or {}).get("op") or "(none)" for r in flagged]),
        "ops_by_source": _count([(r.get("driver_op") or {}).get("source") or "(none)" for r in flagged]),
        "ops_by_library": _count([(r.get("driver_op") or {}).get("library") or "(none)" for r in flagged]),
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
        run_load(config, shape, args.procs, args.in_flight, args.warmup, cpus=args.client_cores)
        time.sleep(SETTLE_S)
        t_w0 = time.time()
        cpu_before = psutil.cpu_times(percpu=True)
        before_st = status_json(config)
        before, hb_before = the_worker(before_st), the_heartbeat(before_st)

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
        load = run_load(config, shape, args.procs, args.in_flight, args.seconds, cpus=args.client_cores)
        snap.join(60)
        time.sleep(SETTLE_S)
        t_w1 = time.time()
        res["cpu_taken"] = cpu_taken(cpu_before, psutil.cpu_times(percpu=True))
        after_st = status_json(config)
        after, hb_after = the_worker(after_st), the_heartbeat(after_st)
        res.update(mid)
        engine = hb_after.get("engine") or {}
        res["driver_journal"] = engine.get("driver_journal")  # {"mode", "note"}: what the worker runs
        res["journal_note_after"] = after.get("journal_note")  # live: on demand, or armed when and by what
        res["journal_configured"] = sections["monitor"]["driver_journal"]
        res["module_loading"] = hb_after.get("module_loading")
        res["engine"] = engine
        hb_keys = ("pid", "batches", "host_ns", "requests", "faults")
        res["heartbeat_before"] = {k: hb_before.get(k) for k in hb_keys}
        res["heartbeat_after"] = {k: hb_after.get(k) for k in hb_keys}
        res["host"] = host_per_batch(hb_before, hb_after)
        res["host_us_per_batch"] = res["host"]["host_us_per_batch"]
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
        res["gc"] = gc_delta(before.get("gc"), after.get("gc"))
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
        res.update(analyse(inside, res["enqueue_over_1ms"], scenario))
        windows = read_windows(run_dir / "inject-w0.windows")
        if windows is not None:
            res["injection"] = injection_overlap(
                [r for r in res["stall_records"] if r["in_window"]], windows, scenario
            )
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return res


def _gc(r: dict[str, Any]) -> str:
    g = r.get("gc")
    if not g:
        return "garbage collections not reported"
    return (
        f"garbage collections in the window {'/'.join(str(n) for n in g['collections'])} (generation 0/1/2), "
        f"{g['slow']} of 50 us or more"
    )


def cpu_taken(before: list[Any], after: list[Any]) -> dict[str, float]:
    """Time the host's CPUs lost without a switch over the window (/proc/stat, 10 ms resolution): steal (the
    hypervisor ran someone else on our virtual CPU) and interrupt handling; in ms, all CPUs and the most
    on one."""
    pairs = list(zip(after, before, strict=True))  # the same CPUs, read twice

    def delta(fields: tuple[str, ...]) -> list[float]:
        return [sum(getattr(a, f, 0.0) - getattr(b, f, 0.0) for f in fields) * 1e3 for a, b in pairs]

    steal, irq = delta(("steal",)), delta(("irq", "softirq"))
    return {
        "steal_ms": round(sum(steal), 1),
        "steal_ms_max_cpu": round(max(steal, default=0.0), 1),
        "irq_ms": round(sum(irq), 1),
        "irq_ms_max_cpu": round(max(irq, default=0.0), 1),
    }


def _taken(r: dict[str, Any]) -> str:
    t = r.get("cpu_taken")
    if not t:
        return ""
    return (
        f"; CPU time taken without a switch in the window: steal {t['steal_ms']:g} ms (most on one CPU "
        f"{t['steal_ms_max_cpu']:g}), interrupts {t['irq_ms']:g} ms (most on one CPU {t['irq_ms_max_cpu']:g})"
    )


def gc_delta(before: dict | None, after: dict | None) -> dict | None:
    """The worker's garbage collections in the window: per generation, and those of 50 us or longer."""
    if not before or not after:
        return None
    return {
        "collections": [a - b for a, b in zip(after["collections"], before["collections"], strict=True)],
        "slow": after["slow"] - before["slow"],
        "longest_us_since_ready": after["longest_us"],
        "frozen": after["frozen"],
        "full_us_before_freeze": after["full_us_before"],
        "full_us_after_freeze": after["full_us_after"],
    }


# --- output ----------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:.2f} ms" if v >= 1000 else f"{v:.0f} us"


def journal_mode(r: dict[str, Any]) -> str | None:
    """The journal the worker reported running ("cupti" or "own"); None when it did not say (CPU, old code)."""
    dj = r.get("driver_journal")
    return dj.get("mode") if isinstance(dj, dict) else None


def _journal(r: dict[str, Any]) -> str:
    asked, mode = r.get("journal_configured") or "?", journal_mode(r)
    if mode is None:
        return f"{asked} (not reported)"
    if asked == "auto" and mode == "cupti":  # on demand: was CUPTI armed by the end of the window?
        note = r.get("journal_note_after") or ""
        armed = re.search(r"armed at (\d\d:\d\d:\d\d)", note)
        state = f"armed at {armed.group(1)}" if armed else "not armed" if "on demand" in note else "?"
        return f"auto, CUPTI {state}"
    return mode if mode == asked else f"{mode} (asked {asked})"


def _ratio(n: int, of: int, share: float | None) -> str:
    return f"{n}/{of} ({_pct(share)})" if of else "n/a"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | journal | batches | enqueue>1ms | flagged (of those) | recall | top cause driver_lock | "
        "right op | stalls by cause | host us/batch | throughput | p50/p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if not r["ok"]:
            lines.append(
                f"| {r['scenario']} | FAILED: {r.get('error', '?')[:160].replace('|', '/')} | | | | | | | | | | |"
            )
            continue
        causes = (
            ", ".join(f"{c} {n}" for c, n in sorted(r["stalls_by_cause"].items(), key=lambda x: -x[1]))
            or "none"
        )
        dl = _ratio(r["driver_lock_first"], r["flagged_over_1ms"], r["driver_lock_share"])
        ro = (
            _ratio(r["driver_lock_right_op"], r["flagged_over_1ms"], r["right_op_share"])
            if r["scenario"] in EXPECTED_OPS
            else "n/a"
        )
        host = r.get("host_us_per_batch")
        ld = r["load"]
        lines.append(
            f"| {r['scenario']} | {_journal(r)} | {r['batches']:,} | {r['enqueue_over_1ms']:,} "
            f"| {r['flagged_over_1ms']:,} | {_pct(r['recall'])} | {dl} | {ro} | {causes} "
            f"| {'-' if host is None else f'{host:.2f}'} | {ld['throughput_rps']:,.0f} req/s "
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


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def checks(results: list[dict[str, Any]], cpu: bool) -> list[str]:
    out = []
    by = {r["scenario"]: r for r in results}
    for r in results:
        s = r["scenario"]
        if not r["ok"]:
            out.append(f"{s}: FAILED ({r.get('error')})")
            continue
        if s in CLEAN:
            out.append(
                f"{s}: {r['stalls']} stall(s) flagged, journal {_journal(r)} -> {_verdict(r['stalls'] == 0)} "
                f"(target: none); {_gc(r)}{_taken(r)}"
            )
        elif s == "cpu_hog":
            top = max(r["stalls_by_cause"], key=r["stalls_by_cause"].get) if r["stalls_by_cause"] else None
            out.append(
                f"cpu_hog: {r['stalls']} stall(s), most often {top} "
                f"-> {_verdict(top == 'cpu_preemption')} (target: cpu_preemption)"
            )
        elif not r["enqueue_over_1ms"]:
            out.append(
                f"{s}: {NO_STALL} (0 of {r['batches']:,} batches; {r['flagged_over_1ms']} enqueue stall(s) "
                f"flagged, {r['stalls']} stall(s) in all; journal {_journal(r)}) -> no verdict"
            )
        else:
            ok = (
                r["recall"] is not None
                and r["recall"] >= RECALL_TARGET
                and r["right_op_share"] is not None
                and r["right_op_share"] >= RIGHT_OP_TARGET
            )
            ops = ", ".join(f"{k} {n}" for k, n in r["ops_by_name"].items()) or "none"
            libs = ", ".join(f"{k} {n}" for k, n in (r.get("ops_by_library") or {}).items()) or "none"
            out.append(
                f"{s}: recall {_pct(r['recall'])} of {r['enqueue_over_1ms']} launches >1 ms "
                f"(target {RECALL_TARGET:.0%}); driver_lock with the right operation "
                f"({'/'.join(r['expected_ops'])}) {_ratio(r['driver_lock_right_op'], r['flagged_over_1ms'], r['right_op_share'])} "
                f"(target {RIGHT_OP_TARGET:.0%}; driver_lock first {_pct(r['driver_lock_share'])}); "
                f"operations named: {ops}; calling library: {libs}; journal {_journal(r)} -> {_verdict(ok)}"
                f"{_taken(r)}"
            )
            inj = r.get("injection")
            if inj:
                out.append(
                    f"  {s}: {inj['overlapping']} of {inj['flagged_over_1ms']} flagged launches overlapped one of "
                    f"the {inj['operations']} injected operations; the right operation named for "
                    f"{_ratio(inj['overlapping_right_op'], inj['overlapping'], inj['overlapping_right_share'])} "
                    f"of those (the others: {_causes(inj.get('overlapping_wrong_by_cause'))}; "
                    f"on a CPU most of the launch: {inj.get('overlapping_on_cpu', '?')}); "
                    f"not overlapping any: {_causes(inj['not_overlapping_by_cause'])}"
                )
        if not cpu and r.get("gpus_mid_run"):
            g = r["gpus_mid_run"][0]
            seen = g.get("sm_clock_mhz") is not None and g.get("throttle_reasons") is not None
            out.append(
                f"  {s}: clocks and throttle reasons in status while loaded: {'yes' if seen else 'NO'}"
            )
    out.extend(host_check(by.get("clean"), by.get("clean-own")))
    return out


def host_check(clean: dict[str, Any] | None, own: dict[str, Any] | None) -> list[str]:
    """Host time per batch, journal on (clean) vs own journal only (clean-own): the journal's cost."""
    if clean is None or own is None:
        return []
    if not (clean["ok"] and own["ok"]):
        return ["host time per batch: not compared (clean or clean-own failed)"]
    hc, ho = clean.get("host_us_per_batch"), own.get("host_us_per_batch")
    if hc is None or ho is None:
        return [f"host time per batch: not measured (clean {hc}, clean-own {ho}; restarted or no batches)"]
    diff = hc - ho
    note = ""
    if journal_mode(clean) != "cupti":
        note = f" (the clean run's journal is {_journal(clean)}, not CUPTI: this is not a CUPTI on/off comparison)"
    return [
        f"host time per batch: clean ({_journal(clean)}) {hc:.2f} us vs clean-own ({_journal(own)}) {ho:.2f} us, "
        f"difference {diff:+.2f} us -> {_verdict(abs(diff) <= HOST_DIFF_TARGET_US)} "
        f"(target: within {HOST_DIFF_TARGET_US:g} us){note}"
    ]


def run_pairs(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """--pairs N: clean-own and clean alternated N times (the order flips each pair), --pair-seconds each,
    for the journal's host cost per batch. Between runs of one scenario it moved 72-88 us a batch on the H200,
    so a single pair cannot resolve 1 us; the median of paired differences can narrow it."""
    short = argparse.Namespace(**{**vars(args), "seconds": args.pair_seconds})
    out = []
    for i in range(args.pairs):
        order = ("clean-own", "clean") if i % 2 == 0 else ("clean", "clean-own")
        d = tmp / f"pair{i}"
        d.mkdir()
        runs = {}
        for scenario in order:
            say(f"== pair {i + 1}/{args.pairs}: {scenario}")
            runs[scenario] = run_scenario(short, scenario, d)
        c, o = runs["clean"], runs["clean-own"]
        hc, ho = c.get("host_us_per_batch"), o.get("host_us_per_batch")
        out.append(
            {
                "pair": i + 1,
                "order": list(order),
                "clean_us": hc,
                "clean_own_us": ho,
                "diff_us": hc - ho if hc is not None and ho is not None else None,
                "clean_journal": _journal(c),
                "clean_summaries": [r.get("summary") for r in c.get("stall_records") or ()],
                "stalls": {"clean": c.get("stalls"), "clean-own": o.get("stalls")},
                "stalls_by_cause": {"clean": c.get("stalls_by_cause"), "clean-own": o.get("stalls_by_cause")},
                "ok": c["ok"] and o["ok"],
            }
        )
    return out


def pairs_check(pairs: list[dict[str, Any]], seconds: float) -> list[str]:
    """The median of the paired host-time differences against the 1 us target, with every pair's."""
    if not pairs:
        return []
    diffs = [p["diff_us"] for p in pairs if p["ok"] and p["diff_us"] is not None]
    if not diffs:
        return [f"host time per batch over {len(pairs)} alternated pairs: not measured (runs failed)"]
    med = statistics.median(diffs)
    each = ", ".join(f"{d:+.2f}" for d in diffs)
    return [
        f"host time per batch over {len(diffs)} alternated pairs ({seconds:g} s each): clean minus clean-own "
        f"median {med:+.2f} us (each: {each}) -> {_verdict(abs(med) <= HOST_DIFF_TARGET_US)} "
        f"(target: within {HOST_DIFF_TARGET_US:g} us)",
        *(
            f"{name} in the pairs: {sum((p.get('stalls') or {}).get(name) or 0 for p in pairs)} stall(s) in "
            f"{len(pairs)} x {seconds:g} s (target: none)"
            for name in ("clean", "clean-own")
        ),
    ]


def write_outputs(
    prefix: Path,
    info: dict[str, Any],
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    total_s: float,
    pairs: list[dict[str, Any]] | None = None,
) -> tuple[str, list[str]]:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tbl = table(results)
    chk = checks(results, args.cpu_smoke) + pairs_check(pairs or [], args.pair_seconds)
    mode = "CPU smoke (synthetic CPU worker, no GPU)" if args.cpu_smoke else "GPU"
    settings = (
        f"{mode}; one worker; synthetic engine, request = batch = {args.rows} x {args.item} float32, "
        f"work {args.work}; depth 2, graphs {'off' if args.cpu_smoke else 'on'}, sync "
        f"{'blocking' if args.cpu_smoke else 'spin'}, buckets [{args.rows}]; stall_factor {args.stall_factor:g}, "
        f"stall_min_us {args.stall_min_us}; driver journal {args.journal} (clean-own: own); injection every "
        f"{args.period_ms} ms on a side thread (through our CUDA layer: pinned_alloc {args.pinned_mib} MiB, "
        f"device_alloc {args.device_mib} MiB, module_load a 50-kernel cubin; as another library would, seen "
        f"only by CUPTI: host_register {args.register_mib} MiB, library_alloc {args.library_mib} MiB, "
        f"lazy_module a lazily loaded module; cpu_hog one busy process per worker core); load {args.procs} "
        f"client processes x {args.in_flight} in flight, warm-up {args.warmup:g} s, measured {args.seconds:g} s; "
        + (
            f"worker on cores {args.worker_cores}, clients on cores {args.client_cores}."
            if args.worker_cores
            else "worker and clients unpinned (workers.cpu_affinity = auto)."
        )
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
        "`driver_lock` first; right op = flagged ranked `driver_lock` first whose `driver_op.op` is one the "
        "scenario injects (pinned_alloc: pinned_alloc/pinned_free; device_alloc and library_alloc: "
        "device_alloc/device_free; module_load: module_load/module_unload; host_register: "
        "host_register/host_unregister; lazy_module: lazy_load/module_load/module_unload); stalls by cause = "
        "every stall record of the window (enqueue or latency); journal = the driver journal the worker "
        "reported running (engine fact `driver_journal.mode`); host us/batch = the serving thread's working "
        "time per batch over the window (heartbeat `host_ns` / `batches`); throughput and p50/p99 are "
        "client-side (closed loop).",
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
            f"Journal: {_journal(r)} (worker's fact: {r.get('driver_journal')}); module loading: "
            f"{r.get('module_loading')}; flagged >1 ms by driver operation: {r['ops_by_name'] or 'none'} "
            f"(categories {r['ops_by_category'] or 'none'}, sources {r['ops_by_source'] or 'none'}); host time: "
            f"{r['host']['host_ns']} ns over {r['host']['batches']} batches"
            f"{' (worker restarted in the window)' if r['host']['restarted'] else ''}.",
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
                "pairs": pairs or [],
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
    ap.add_argument("--register-mib", type=int, default=64, help="host_register size")
    ap.add_argument("--library-mib", type=int, default=64, help="library_alloc size")
    ap.add_argument(
        "--journal",
        choices=("auto", "cupti", "own"),
        default="auto",
        help="[monitor] driver_journal of every scenario (clean-own always runs own)",
    )
    ap.add_argument("--gpu", type=int, default=0, help="GPU index for the worker")
    ap.add_argument("--stall-factor", type=float, default=8.0)
    ap.add_argument("--stall-min-us", type=int, default=1000)
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help=f"CPU worker (no GPU): {', '.join(CPU_SCENARIOS)}, to test the plumbing",
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="then run clean-own and clean this many times, alternated, for the journal's host cost per batch",
    )
    ap.add_argument("--pair-seconds", type=float, default=20.0, help="measured load per run of a pair")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="put the worker on 4 cores of its own and the load generator on the others (needs 12 or more cores; "
        "refused otherwise); it did not quiet a clean run on an H200, so both run unpinned by default",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary configs and run directories")
    args = ap.parse_args(argv)
    args.worker_cores, args.client_cores = None, None
    if args.pin and not args.cpu_smoke:
        cores, args.client_cores = pinning(1, 1)
        if not cores:  # asked for, so not quietly dropped
            ap.error(
                f"--pin needs 12 cores (4 for the worker, 8 for the clients); this process may use "
                f"{len(os.sched_getaffinity(0))}"
            )
        args.worker_cores = cores[0]
    if args.cpu_smoke:
        args.rows, args.item = 8, 256
        args.work = 20 if args.work is None else args.work
    else:
        args.rows, args.item = 64, 1024
        args.work = 4597 if args.work is None else args.work
    scenarios = (
        [x.strip() for x in args.scenarios.split(",") if x.strip()]
        if args.scenarios
        else list(CPU_SCENARIOS if args.cpu_smoke else GPU_SCENARIOS)
    )
    if args.pairs < 0 or args.pair_seconds <= 0:
        ap.error("--pairs must be 0 or more and --pair-seconds above 0")
    if len(set(scenarios)) != len(scenarios):
        ap.error(f"a scenario is named twice in {scenarios}")
    bad = [s for s in scenarios if s not in ALL_SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; choose from {', '.join(ALL_SCENARIOS)}")
    if args.cpu_smoke and set(scenarios) - set(CPU_SCENARIOS):
        ap.error(f"--cpu-smoke runs only {', '.join(CPU_SCENARIOS)} (the GPU injections need a GPU worker)")
    info = machine()
    say(f"{info.get('device')} (driver {info.get('driver')}); scenarios {scenarios}, {args.seconds:g} s each")
    tmp = Path(tempfile.mkdtemp(prefix="bst-"))  # short: ipc socket paths live in the run directories
    results: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for scenario in scenarios:
            say(f"== {scenario}")
            results.append(run_scenario(args, scenario, tmp))
        pairs = run_pairs(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"kept {tmp}")
    tbl, chk = write_outputs(args.out, info, args, results, time.monotonic() - t0, pairs)
    say(f"wrote {args.out}.md, {args.out}.json, {args.out}-stalls.jsonl ({time.monotonic() - t0:.0f} s)")
    for line in chk:
        say(line)
    say(tbl)
    return 0 if all(r["ok"] for r in results) and all(p["ok"] for p in pairs) else 1


if __name__ == "__main__":
    sys.exit(main())
