"""Four-GPU scaling check (issue 6): the synthetic twin of configs/4gpu.toml on all its GPUs versus the same
config restricted to GPU 0, with worker placement, CPU affinity (against NVML) and telemetry verified.
Runs in this process (orchestration, checks, status capture) and in spawned client processes.

    python scripts/bench_scaling.py --out benchmarks/results/scaling-4xh200 --logs /tmp/scaling-logs
    python scripts/bench_scaling.py --gpus 0 --seconds 3 --out /tmp/scaling-smoke   # plumbing on one GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_mps import (  # noqa: E402
    ITEM,
    ROWS,
    StatusSampler,
    cell,
    check_results,
    fmt,
    mps_leftovers,
    stop,
    summarize_status,
)
from scripts.benchlib import cli, copy_logs, machine_info, pinning, start_or_record, status_json  # noqa: E402
from scripts.loadgen import run_load  # noqa: E402

log = logging.getLogger("bench_scaling")

TARGET_RATIO = 3.6
BASE_CONFIG = ROOT / "configs" / "4gpu-synthetic.toml"


def nvml_affinity() -> dict[int, list[int]]:
    """Each GPU's NUMA-local CPUs straight from nvmlDeviceGetCpuAffinity (the independent reference), limited
    to the CPUs this process may use, as the supervisor's planner does."""
    import pynvml

    pynvml.nvmlInit()
    try:
        words = ((os.cpu_count() or 1) + 63) // 64
        usable = os.sched_getaffinity(0)
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            mask = pynvml.nvmlDeviceGetCpuAffinity(pynvml.nvmlDeviceGetHandleByIndex(i), words)
            out[i] = sorted(
                c
                for k, w in enumerate(mask)
                for c in range(64 * k, 64 * k + 64)
                if (int(w) >> (c - 64 * k)) & 1 and c in usable
            )
        return out
    finally:
        pynvml.nvmlShutdown()


def ranges(cpus: list[int]) -> str:
    """[0,1,2,3,8] -> '0-3,8'."""
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(out) or "-"


def scaled_config(
    tmp: Path, label: str, gpus: list[int], work: int | None, extra: dict | None = None
) -> tuple[Path, Path, dict]:
    """The twin config with its own run dir and name, `gpus` overridden (and work, and any extra sections);
    returns its path, its run dir and the config as a dict."""
    doc = tomllib.loads(BASE_CONFIG.read_text())
    run_dir = tmp / f"r-{label}"
    doc["orchestrator"].update(name=f"scaling-{label}", run_dir=str(run_dir))
    doc["workers"]["gpus"] = gpus
    if work is not None:
        doc["model"]["work"] = work
    for section, keys in (extra or {}).items():
        doc.setdefault(section, {}).update(keys)
    path = tmp / f"{label}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path, run_dir, doc


def verify_placement(
    st: dict[str, Any],
    gpus: list[int],
    nvml: dict[int, list[int]],
    per_gpu: int,
    pinned: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Every worker ready on a listed GPU, the configured number per GPU, and its CPU affinity: with
    "auto", cores local to its GPU by NVML and shared with no other worker; with explicit cores, exactly
    those. The OS's view of each worker process must agree with status."""
    import psutil

    workers, problems = st.get("workers", []), []
    by_gpu: dict[int, list[dict]] = {}
    rows = []
    for w in workers:
        dev = str(w.get("device", ""))
        idx = int(dev.split(":")[1]) if dev.startswith("gpu:") else -1
        by_gpu.setdefault(idx, []).append(w)
        try:
            actual = sorted(psutil.Process(w["pid"]).cpu_affinity())
        except (psutil.Error, KeyError, TypeError) as exc:
            actual = []
            problems.append(f"{w.get('id')}: cannot read its affinity ({exc})")
        reported = sorted(w.get("cpu_affinity") or [])
        if actual and actual != reported:
            problems.append(f"{w['id']}: status says cores {ranges(reported)}, the OS says {ranges(actual)}")
        if w.get("state") != "ready":
            problems.append(f"{w.get('id')}: state {w.get('state')}")
        rows.append(
            {
                "id": w.get("id"),
                "gpu": idx,
                "uuid": w.get("gpu_uuid"),
                "pid": w.get("pid"),
                "state": w.get("state"),
                "cpus": ranges(reported),
                "os_cpus": ranges(actual),
                "nvml_cpus": ranges(nvml.get(idx, [])),
            }
        )
    if sorted(by_gpu) != sorted(gpus):
        problems.append(f"workers are on GPUs {sorted(by_gpu)}, expected {sorted(gpus)}")
    owner: dict[int, str] = {}
    for idx, ws in by_gpu.items():
        if len(ws) != per_gpu:
            problems.append(f"GPU {idx} has {len(ws)} workers, expected {per_gpu}")
        for w in ws:
            cores = sorted(w.get("cpu_affinity") or [])
            if pinned is not None:  # explicit cpu_affinity in the config: exactly what was asked
                if cores != pinned.get(w["id"]):
                    problems.append(
                        f"{w['id']}: cores {ranges(cores)}, configured {ranges(pinned.get(w['id'], []))}"
                    )
            elif not nvml.get(idx):
                problems.append(
                    f"GPU {idx}: NVML gave no CPU affinity, so the workers' cores are not verified"
                )
            elif not set(cores) <= set(nvml[idx]):  # auto: NUMA-local to its GPU...
                problems.append(
                    f"{w['id']}: cores {ranges(cores)} are not all local to GPU {idx} ({ranges(nvml[idx])})"
                )
            for c in cores:  # ...and no core shared with another worker
                if c in owner:
                    problems.append(f"{w['id']} and {owner[c]} share core {c}")
                    break
                owner[c] = w["id"]
    uuids = [w.get("gpu_uuid") for w in workers]
    if per_gpu == 1 and len(set(uuids)) != len(uuids):
        problems.append(f"two workers share a GPU UUID: {uuids}")
    return {"ok": not problems, "problems": problems, "workers": rows}


def verify_telemetry(st: dict[str, Any], gpus: list[int]) -> dict[str, Any]:
    """status shows every used GPU's NVML telemetry (clocks, power, utilisation) and each worker's GPU busy."""
    mon = st.get("monitor", {})
    problems = [] if mon.get("nvml") else [f"NVML telemetry off: {mon.get('nvml_reason')}"]
    seen = {g.get("index"): g for g in mon.get("gpus", [])}
    for idx in gpus:
        g = seen.get(idx)
        missing = [
            k for k in ("sm_clock_mhz", "power_w", "util_pct", "temp_c") if g is None or g.get(k) is None
        ]
        if missing:
            problems.append(f"GPU {idx}: no {', '.join(missing)} in status")
    for wid, w in mon.get("workers", {}).items():
        if w.get("gpu_busy_pct") is None:
            problems.append(f"{wid}: no gpu_busy_pct in status")
    return {
        "ok": not problems,
        "problems": problems,
        "gpus": [
            {k: seen[i].get(k) for k in ("index", "name", "sm_clock_mhz", "power_w", "util_pct", "temp_c")}
            for i in gpus
            if i in seen
        ],
    }


def one_run(
    args: argparse.Namespace,
    tmp: Path,
    label: str,
    gpus: list[int],
    nvml: dict[int, list[int]],
    capture: Path | None = None,
    extra: dict | None = None,
    seconds: float | None = None,
    pin: bool = True,
) -> dict[str, Any]:
    extra = {k: dict(v) for k, v in (extra or {}).items()}
    per_gpu = extra.get("workers", {}).get("per_gpu", 1)
    worker_cores, client_cores = pinning(len(gpus) * per_gpu, args.max_workers) if pin else (None, None)
    if worker_cores:
        extra.setdefault("workers", {})["cpu_affinity"] = worker_cores
    config, run_dir, doc = scaled_config(tmp, label, gpus, args.work, extra)
    seconds = seconds or args.seconds
    procs = args.clients_per_gpu * len(args.gpus)  # the same drive for every run: the baseline is not starved
    r: dict[str, Any] = {
        "label": label,
        "gpus": gpus,
        "clients": procs,
        "in_flight_per_client": args.in_flight,
        "ok": False,
        "config": doc,
        "worker_cores": worker_cores,
        "client_cores": client_cores,
    }
    if not start_or_record(config, run_dir, r, args.logs / label if args.logs else None):
        return r
    try:
        pinned = {f"w{i}": c for i, c in enumerate(worker_cores)} if worker_cores else None
        r["placement"] = verify_placement(status_json(config), gpus, nvml, per_gpu, pinned)
        r["check"] = check_results(config, doc["model"]["work"])
        sampler = StatusSampler(config, seconds)
        sampler.start()
        grab = threading.Timer(seconds * 0.6, lambda: r.update(capture=capture_status(config)))
        grab.start()
        load = run_load(config, (ROWS, ITEM), procs, args.in_flight, seconds, cpus=client_cores)
        sampler.join(30)
        grab.join(30)
        r.update(load.figures())
        r["status"] = summarize_status(sampler.snaps)
        r["status_errors"] = sampler.errors
        cap = r.get("capture") or {}
        r["telemetry"] = verify_telemetry(
            cap.get("json") or (sampler.snaps[-1] if sampler.snaps else {}), gpus
        )
        if capture is not None and cap:
            Path(f"{capture}.txt").write_text(cap.get("text", ""))
            Path(f"{capture}.json").write_text(json.dumps(cap.get("json"), indent=1, default=str))
        r["ok"] = bool(r["check"]["ok"] and r["placement"]["ok"] and r["telemetry"]["ok"] and not load.errors)
    except Exception as exc:  # one run's failure must not lose the others
        log.exception("%s failed", label)
        r["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stopped, text = stop(config)
        r["stop"] = "ok" if stopped else f"failed: {text}"
        time.sleep(0.5)
        r["mps_after_stop"] = mps_leftovers(run_dir)
        copy_logs(run_dir, args.logs / label if args.logs else None)
    r.pop("capture", None)
    return r


def capture_status(config: Path) -> dict[str, Any]:
    """`orchestrator status --once` (the text a user sees) and `--json`, taken under load."""
    text = cli("status", str(config), "--once", timeout=30)
    out: dict[str, Any] = {
        "text": text.stdout + (f"\n[stderr]\n{text.stderr}" if text.stderr.strip() else "")
    }
    try:
        out["json"] = status_json(config)
    except Exception as exc:  # the text capture is still worth keeping
        out["json_error"] = str(exc)
    return out


def report(args: argparse.Namespace, info: dict, runs: list[dict], ratio: float | None) -> str:
    head = [
        "run",
        "GPUs",
        "batches/s",
        "items/s",
        "GPU busy per worker",
        "NVML util per GPU",
        "latency us p50 / p99",
        "check",
        "placement + affinity",
        "telemetry",
        "errors",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in runs:
        if "batches_per_s" not in r:
            lines.append(
                f"| {r['label']} | {len(r['gpus'])} | "
                + " | ".join(["-"] * (len(head) - 3))
                + f" | {cell(r.get('error'))} |"
            )
            continue
        st = r.get("status", {})
        busy = " / ".join(fmt(w.get("gpu_busy_pct"), "{:.0f}%") for w in st.get("workers", {}).values())
        util = " / ".join(fmt(g.get("util_pct"), "{:.0f}%") for g in st.get("gpus", {}).values())
        lines.append(
            f"| {r['label']} | {len(r['gpus'])} | {fmt(r['batches_per_s'])} | {fmt(r['items_per_s'])} | "
            f"{busy or '-'} | {util or '-'} | {fmt(r['latency_us_p50'])} / {fmt(r['latency_us_p99'])} | "
            f"{'ok' if r['check']['ok'] else 'FAILED'} | "
            f"{'ok' if r['placement']['ok'] else cell('FAILED: ' + '; '.join(r['placement']['problems']))} | "
            f"{'ok' if r['telemetry']['ok'] else cell('FAILED: ' + '; '.join(r['telemetry']['problems']))} | "
            f"{cell(r.get('errors') or r.get('error') or 'none')} |"
        )
    verdict = (
        "not measured"
        if ratio is None
        else f"**{ratio:.2f}x** ({'meets' if ratio >= TARGET_RATIO else 'BELOW'} the {TARGET_RATIO}x target)"
    )
    auto = next((r for r in reversed(runs) if r.get("placement") and not r.get("worker_cores")), None)
    placement = auto["placement"]["workers"] if auto else []
    pins = [
        f"- {r['label']}: workers on cores {'; '.join(ranges(c) for c in r['worker_cores'])}, clients on "
        f"{ranges(r['client_cores'])}"
        if r.get("worker_cores")
        else f"- {r['label']}: workers.cpu_affinity = auto"
        for r in runs
    ]
    return "\n".join(
        [
            f"# Scaling: {info['device']} x {len(args.gpus)} (driver {info['driver']})",
            "",
            f"- date: {info['date']}",
            f"- command: `{info['command']}`",
            f"- GPUs: {'; '.join(info.get('gpus', [])) or 'n/a'}; host CPUs: {info['host_cpus']}",
            f"- config: {BASE_CONFIG.relative_to(ROOT)} with run_dir and gpus overridden"
            + (f", work = {args.work}" if args.work is not None else ""),
            f"- load: {args.clients_per_gpu * len(args.gpus)} client processes x {args.in_flight} in flight in every run "
            f"(batches of {ROWS} x {ITEM} float32), {args.seconds:g} s",
            f"- throughput ratio, {len(args.gpus)} GPUs / 1 GPU: {verdict}",
            "",
            "\n".join(lines),
            "",
            "CPU placement per run:",
            "",
            *pins,
            "",
            "Worker placement with workers.cpu_affinity = auto (the product's NUMA placement): status cores, the OS's "
            "view of the worker process, NVML's cores for its GPU",
            "",
            "| worker | GPU | pid | state | cores (status) | cores (OS) | NVML cores of its GPU |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *[
                f"| {w['id']} | {w['gpu']} | {w['pid']} | {w['state']} | {w['cpus']} | {w['os_cpus']} | {w['nvml_cpus']} |"
                for w in placement
            ],
            "",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="0,1,2,3", help="GPU indices of the all-GPU run (default 0,1,2,3)")
    ap.add_argument("--work", type=int, default=None, help="override the config's synthetic work")
    ap.add_argument(
        "--clients-per-gpu", type=int, default=12, help="client processes per GPU of the all-GPU run"
    )
    ap.add_argument("--in-flight", type=int, default=8, help="requests in flight per client process")
    ap.add_argument("--seconds", type=float, default=15.0, help="load duration per run")
    ap.add_argument(
        "--with-mps-run",
        action="store_true",
        help="also run all GPUs x 2 workers under MPS (one daemon for several GPUs); not in the ratio",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="plumbing check (e.g. --gpus 0): exit status ignores the ratio"
    )
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.md, OUT.json, OUT-status.txt/.json")
    ap.add_argument("--logs", type=Path, help="copy each run's supervisor and worker logs here")
    args = ap.parse_args()
    args.gpus = [int(g) for g in args.gpus.split(",")]
    args.max_workers = len(args.gpus) * (2 if args.with_mps_run else 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = machine_info()
    try:
        nvml = nvml_affinity()
    except Exception as exc:  # NVML's own error types; the runs then report what they can
        log.error("no CPU affinity from NVML: %s", exc)
        nvml, info["nvml_error"] = {}, str(exc)
    info["nvml_cpu_affinity"] = {i: ranges(c) for i, c in nvml.items()}
    log.info("machine: %s", info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bscale-", dir="/tmp") as tmp:
        n = len(args.gpus)
        # Throughput runs pin each worker to 4 cores and the clients elsewhere (as a deployment keeps
        # clients off a GPU worker's cores); the last run checks the product's "auto" NUMA placement.
        runs.append(one_run(args, Path(tmp), f"{n}gpu", args.gpus, nvml, Path(f"{args.out}-status")))
        runs.append(one_run(args, Path(tmp), "1gpu", args.gpus[:1], nvml))
        if args.with_mps_run:
            runs.append(
                one_run(
                    args,
                    Path(tmp),
                    f"{n}gpu-mps-2w",
                    args.gpus,
                    nvml,
                    extra={"workers": {"per_gpu": 2}, "mps": {"enabled": True}},
                )
            )
        runs.append(
            one_run(
                args,
                Path(tmp),
                f"{n}gpu-auto-affinity",
                args.gpus,
                nvml,
                seconds=min(5.0, args.seconds),
                pin=False,
            )
        )
        for r in runs:
            log.info("run %s: %s", r["label"], {k: r.get(k) for k in ("batches_per_s", "ok", "error")})
    all_, one = runs[0].get("batches_per_s"), runs[1].get("batches_per_s")
    ratio = all_ / one if all_ and one else None
    text = report(args, info, runs, ratio)
    print(text, flush=True)
    Path(f"{args.out}.md").write_text(text)
    Path(f"{args.out}.json").write_text(
        json.dumps(
            {"machine": info, "ratio": ratio, "target": TARGET_RATIO, "runs": runs}, indent=1, default=str
        )
    )
    log.info("wrote %s.md, .json and -status.txt/.json", args.out)
    meets = args.smoke or (ratio is not None and ratio >= TARGET_RATIO)
    placed = runs[-1].get("placement", {}).get("ok", False)  # the auto-affinity run
    return (
        0 if meets and runs[0]["ok"] and runs[1]["ok"] and placed else 1
    )  # the MPS run is reported, not judged


if __name__ == "__main__":
    sys.exit(main())
