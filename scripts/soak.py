"""Soak run: an orchestrator (CPU workers, synthetic engine) under high closed-loop load for a configurable
time, sampled every few seconds: throughput, client-observed latency p50/p99, and the RSS of every process
(supervisor, each worker, each client). Verdict: RSS must not grow after warm-up.

    python scripts/soak.py --minutes 10 --out benchmarks/results/soak-cpu.md

Runs in the calling process (sampler and report), in client processes it starts (`soak.py --client`, the
same closed loop as scripts/loadgen.py, reporting every interval on stdout) and in the orchestrator it
starts in a temporary run directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1 << 20


# --- client process ------------------------------------------------------------------------------------


def client_main(spec: dict) -> None:
    """Keep `in_flight` submit() futures in flight for `seconds`; print a JSON tick several times per sample
    interval (fine-grained, so that a sample's count does not depend on how ticks fall into it)."""
    from orchestrator.client import Client

    rng = np.random.default_rng(os.getpid())
    x = rng.standard_normal((spec["rows"], spec["item"])).astype(np.float32)
    window: deque = deque()
    ok, errors, lat = 0, {}, []
    with Client(spec["config"], max_in_flight=spec["in_flight"] + 1) as c:
        print("ready", flush=True)
        t0 = time.perf_counter()
        t_end = t0 + spec["seconds"]
        tick_s = min(0.5, spec["interval"] / 4)
        next_tick = t0 + tick_s
        while True:
            now = time.perf_counter()
            if now >= next_tick or (now >= t_end and not window):
                print("tick " + json.dumps({"ok": ok, "errors": errors, "lat_us": lat}), flush=True)
                ok, errors, lat = 0, {}, []
                next_tick += tick_s
            if now < t_end and len(window) < spec["in_flight"]:
                window.append((now, c.submit(x)))
                continue
            if not window:
                break
            t_sub, fut = window.popleft()
            exc = fut.exception(timeout=60)
            if exc is None:
                ok += 1
                lat.append(round((time.perf_counter() - t_sub) * 1e6))
            else:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    print("done", flush=True)


# --- orchestrator and sampling ----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )


def _status(run_dir: Path) -> dict:
    from orchestrator.client.control import ControlClient
    from orchestrator.common.rundir import RunDir

    with ControlClient(RunDir(run_dir).control_endpoint(), timeout_s=5) as c:
        return c.call("status")


def _rss_mib(pid: int | None) -> float | None:
    try:
        p = psutil.Process(pid) if pid else None
        return p.memory_info().rss / MIB if p is not None and p.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def _read_lines(p: subprocess.Popen, name: str, out: queue.Queue) -> None:
    for line in p.stdout:
        out.put((name, line.rstrip("\n")))
    out.put((name, None))


def write_config(tmp: Path, a: argparse.Namespace) -> Path:
    cfg = tmp / "soak.toml"
    cfg.write_text(f"""[orchestrator]
name = "soak"
run_dir = "{tmp}/run"

[workers]
device = "cpu"
count = {a.workers}

[model]
kind = "synthetic"
item_shape = [{a.item}]
work = {a.work}
max_batch = 64

[pipeline]
depth = 2
max_queue_delay_us = 200
""")
    return cfg


def run_soak(a: argparse.Namespace) -> dict:
    seconds = a.minutes * 60
    tmp = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    cfg = write_config(tmp, a)
    started = _cli("start", str(cfg), "--detach")
    if started.returncode != 0:
        raise RuntimeError(f"orchestrator did not start:\n{started.stderr}")
    lines: queue.Queue = queue.Queue()
    clients: dict[str, subprocess.Popen] = {}
    readers = []
    samples: list[dict] = []
    try:
        st = _status(tmp / "run")
        first_pids = {"supervisor": st["pid"], **{w["id"]: w["pid"] for w in st["workers"]}}
        spec = {
            "config": str(cfg),
            "rows": a.rows,
            "item": a.item,
            "in_flight": a.in_flight,
            "interval": a.interval,
            "seconds": seconds,
        }
        for i in range(a.procs):
            p = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--client", json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            clients[f"c{i}"] = p
            readers.append(threading.Thread(target=_read_lines, args=(p, f"c{i}", lines), daemon=True))
            readers[-1].start()
        ready = 0
        while ready < a.procs:
            name, line = lines.get(timeout=120)
            if line is None:
                raise RuntimeError(f"client {name} exited before it was ready")
            ready += line == "ready"
        t0 = time.monotonic()
        done = 0
        while done < a.procs:
            deadline = t0 + (len(samples) + 1) * a.interval
            ok, errors, lat = 0, {}, []
            while True:
                try:
                    name, line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if line is None or line == "done":
                    done += 1
                elif line.startswith("tick "):
                    tick = json.loads(line[5:])
                    ok += tick["ok"]
                    lat += tick["lat_us"]
                    for k, v in tick["errors"].items():
                        errors[k] = errors.get(k, 0) + v
                if done >= a.procs:
                    break
            st = _status(tmp / "run")
            pids = {
                "supervisor": st["pid"],
                **{w["id"]: w["pid"] for w in st["workers"]},
                **{n: p.pid for n, p in clients.items()},
            }
            samples.append(
                {
                    "t_s": round(time.monotonic() - t0, 1),
                    "ok": ok,
                    "rps": ok / a.interval,
                    "errors": errors,
                    "p50_ms": float(np.percentile(lat, 50)) / 1e3 if lat else None,
                    "p99_ms": float(np.percentile(lat, 99)) / 1e3 if lat else None,
                    "rss_mib": {n: _rss_mib(pid) for n, pid in pids.items()},
                    "pids": pids,
                    "restarts": sum(w["restarts"] for w in st["workers"]),
                    "tail": done
                    > 0,  # a client finished inside this interval: partial, left out of the stats
                }
            )
            s = samples[-1]
            print(
                f"t={s['t_s']:6.1f}s {s['rps']:8.0f} req/s p50 {s['p50_ms'] or 0:6.2f} ms p99 "
                f"{s['p99_ms'] or 0:6.2f} ms rss "
                + " ".join(f"{n}={v:.1f}" for n, v in s["rss_mib"].items() if v is not None),
                file=sys.stderr,
                flush=True,
            )
    finally:
        for p in clients.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for t in readers:
            t.join(5)
        for p in clients.values():
            p.stdout.close()
        stopped = _cli("stop", str(cfg))
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return verdict(a, samples, first_pids, stopped.returncode == 0)


# --- verdict and report ---------------------------------------------------------------------------------


def verdict(a: argparse.Namespace, samples: list[dict], first_pids: dict, stopped_ok: bool) -> dict:
    """RSS after warm-up: the median of the last third may exceed the first third's by at most the
    tolerance (max of --tolerance-mib and --tolerance-pct of the first third)."""
    seconds = a.minutes * 60
    warm = max(a.warmup_s, 0.2 * seconds)
    steady = [s for s in samples if s["t_s"] >= warm and not s["tail"]]
    names = list(samples[0]["rss_mib"]) if samples else []
    per_process = {}
    for n in names:
        vals = [s["rss_mib"][n] for s in steady if s["rss_mib"].get(n) is not None]
        third = len(vals) // 3
        if third < 1:
            per_process[n] = {"ok": False, "why": "too few samples after warm-up"}
            continue
        first, last = float(np.median(vals[:third])), float(np.median(vals[-third:]))
        limit = max(a.tolerance_mib, first * a.tolerance_pct / 100)
        per_process[n] = {
            "first_mib": first,
            "last_mib": last,
            "growth_mib": last - first,
            "limit_mib": limit,
            "max_mib": max(vals),
            "ok": last - first <= limit,
        }
    restarts = samples[-1]["restarts"] if samples else -1
    same_pids = all(s["pids"].get(k) == v for s in samples for k, v in first_pids.items())
    total_ok = sum(s["ok"] for s in samples)
    errors: dict[str, int] = {}
    for s in samples:
        for k, v in s["errors"].items():
            errors[k] = errors.get(k, 0) + v
    lat_rows = [s for s in steady if s["p50_ms"] is not None]
    checks = {
        "RSS flat after warm-up (every process)": bool(per_process)
        and all(v["ok"] for v in per_process.values()),
        "no worker restarted": restarts == 0 and same_pids,
        "no errors": not errors,
        "clean stop": stopped_ok,
    }
    return {
        "options": vars(a),
        "samples": samples,
        "warmup_s": warm,
        "rss": per_process,
        "checks": checks,
        "passed": all(checks.values()),
        "requests_ok": total_ok,
        "errors": errors,
        "mean_rps": float(np.mean([s["rps"] for s in steady])) if steady else 0.0,
        "p50_ms_median": float(np.median([s["p50_ms"] for s in lat_rows])) if lat_rows else None,
        "p99_ms_max": float(max(s["p99_ms"] for s in lat_rows)) if lat_rows else None,
    }


def report(r: dict, command: str) -> str:
    a = r["options"]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    names = list(r["samples"][0]["rss_mib"]) if r["samples"] else []
    lines = [
        f"# Soak run on CPU ({date}): {'PASS' if r['passed'] else 'FAIL'}",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, load average at the end {os.getloadavg()[0]:.2f}",
        f"- command: `{command}`",
        f"- orchestrator: {a['workers']} CPU workers, synthetic engine (item {a['item']} float32, work {a['work']})",
        f"- load: {a['procs']} client processes x {a['in_flight']} submit() futures in flight (closed loop), "
        f"{a['rows']} rows per request, for {a['minutes']:g} min; sampled every {a['interval']:g} s; warm-up "
        f"{r['warmup_s']:.0f} s",
        "",
        f"Steady state: **{r['mean_rps']:.0f} requests/s** ({r['mean_rps'] * a['rows']:.0f} rows/s), latency "
        f"p50 {r['p50_ms_median'] or 0:.2f} ms (median of intervals), worst interval p99 {r['p99_ms_max'] or 0:.2f} ms; "
        f"{r['requests_ok']} requests answered, errors: {r['errors'] or 'none'}.",
        "",
        "| process | RSS first third (MiB) | RSS last third (MiB) | growth (MiB) | allowed (MiB) | max (MiB) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, v in r["rss"].items():
        if "first_mib" in v:
            lines.append(
                f"| {n} | {v['first_mib']:.1f} | {v['last_mib']:.1f} | {v['growth_mib']:+.1f} | "
                f"{v['limit_mib']:.1f} | {v['max_mib']:.1f} | {'PASS' if v['ok'] else 'FAIL'} |"
            )
        else:
            lines.append(f"| {n} | | | | | | FAIL ({v['why']}) |")
    lines += ["", "| check | result |", "| --- | --- |"]
    lines += [f"| {k} | {'PASS' if v else 'FAIL'} |" for k, v in r["checks"].items()]
    lines += [
        "",
        "Over time (RSS in MiB):",
        "",
        "| t (s) | req/s | p50 (ms) | p99 (ms) | errors | " + " | ".join(names) + " |",
        "| --- " * (5 + len(names)) + "|",
    ]
    for s in r["samples"]:
        rss = " | ".join(f"{s['rss_mib'][n]:.1f}" if s["rss_mib"].get(n) is not None else "" for n in names)
        lines.append(
            f"| {s['t_s']:.0f}{' (tail)' if s['tail'] else ''} | {s['rps']:.0f} | {s['p50_ms'] or 0:.2f} | {s['p99_ms'] or 0:.2f} | "
            f"{sum(s['errors'].values())} | {rss} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        client_main(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="load duration")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument(
        "--warmup-s", type=float, default=30.0, help="ignored for the RSS verdict (at least 20%% of the run)"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--in-flight", type=int, default=16, help="requests in flight per client process")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--item", type=int, default=256, help="row width (float32)")
    ap.add_argument("--work", type=int, default=20, help="synthetic iterations per element")
    ap.add_argument("--tolerance-mib", type=float, default=8.0)
    ap.add_argument("--tolerance-pct", type=float, default=5.0)
    ap.add_argument("--out", type=Path, help="write the Markdown report here (and .json beside it)")
    a = ap.parse_args()
    r = run_soak(a)
    text = report(r, "python " + " ".join(sys.argv))
    print(text)
    growth = ", ".join(f"{n} {v.get('growth_mib', float('nan')):+.1f} MiB" for n, v in r["rss"].items())
    print(
        f"{'PASS' if r['passed'] else 'FAIL'}: RSS growth after warm-up: {growth}; "
        + ", ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in r["checks"].items())
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        r["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in r["options"].items()}
        a.out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    sys.exit(0 if r["passed"] else 1)


if __name__ == "__main__":
    main()
