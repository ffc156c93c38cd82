"""Where the worker's serving thread spends its time: py-spy samples one GPU worker under closed-loop load,
on the frames path and on the shared-memory path, and prints each path's self time by function and the
inclusive time of the serving loop's own steps, per batch.

    python scripts/profile_serving.py --work 762 --seconds 6 --out benchmarks/results/shm-h200-.../profile

Needs py-spy (carried as a wheel on the GPU machine) and runs as a user allowed to ptrace the worker.
Starts configs/gpu-shm.toml (name, run directory, work and cores overridden, as bench_shm.py does).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_gpu_orch import closed_loop  # noqa: E402
from scripts.bench_shm import CONFIGS, session_config  # noqa: E402
from scripts.benchlib import cli, machine_info, status_json  # noqa: E402

# The serving loop's own steps: inclusive samples under each, per batch.
STEPS = (
    "ServeLoop._receive",
    "decode_request_header",
    "decode_tensors",
    "Pipeline.check",
    "ServeLoop._shm_spans",
    "Pipeline.launch_next",
    "GpuEngineBase.launch",
    "ServeLoop._complete",
    "ServeLoop._on_complete",
    "WorkerTelemetry.on_batch",
    "ThreadProbe.snap",
    "Socket.send_multipart",
    "Socket.recv_multipart",
    "Poller.poll",
    "ServeLoop._heartbeat",
    "GpuEngineBase.gpu_span_ns",
)


def _client(
    config: str, shm: bool, in_flight: int, seconds: float, start_at: float, cpus: list[int] | None, q: Any
) -> None:
    sys.path.insert(0, str(ROOT))
    if cpus:
        os.sched_setaffinity(0, cpus)
    from orchestrator.client import Client

    x = np.random.default_rng().random((64, 512), dtype=np.float32)
    with Client(config, shm=shm, shm_lease_mb=8, max_in_flight=in_flight) as c:
        for _ in range(20):
            c.infer(x)
        r = closed_loop(c, {"x": x}, in_flight, seconds, start_at)
    q.put(len(r["lat"]))


def pyspy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.prefix) / "bin" / "py-spy")
    for cand in (exe, "/tmp/site/bin/py-spy"):
        if Path(cand).is_file():
            return cand
    raise SystemExit("py-spy not found (pip install py-spy, or carry its wheel)")


def profile(config: Path, shm: bool, args: argparse.Namespace, cpus: list[int] | None, out: Path) -> dict:
    st = status_json(config)
    pid = st["workers"][0]["pid"]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.monotonic() + 4.0  # the clients' imports and warm-up happen before
    procs = [
        ctx.Process(target=_client, args=(str(config), shm, args.in_flight, args.seconds, start_at, cpus, q))
        for _ in range(args.clients)
    ]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.monotonic()) + 0.5)
    b0 = status_json(config)["workers"][0]
    raw = out.with_name(f"{out.name}-{'shm' if shm else 'frames'}.txt")
    subprocess.run(
        [
            pyspy(),
            "record",
            "-p",
            str(pid),
            "-d",
            str(max(1, int(args.seconds - 2))),
            "-r",
            "2000",
            "-f",
            "raw",
            "-o",
            str(raw),
            "--nonblocking",
        ],
        capture_output=True,
        timeout=120,
    )
    b1 = status_json(config)["workers"][0]
    done = sum(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    batches = b1["batches"] - b0["batches"]
    host_us = (b1["host_ns"] - b0["host_ns"]) / max(1, batches) / 1e3
    return {
        "path": "shm" if shm else "frames",
        "requests": done,
        "batches": batches,
        "host_us_per_batch": host_us,
        **summarise(raw, batches),
    }


def summarise(raw: Path, batches: int) -> dict[str, Any]:
    """Self and inclusive samples of the serving thread (MainThread) from py-spy's raw (collapsed) output."""
    self_c: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or "MainThread" not in stack.split(";")[0] and "process" not in stack.split(";")[0]:
            pass
        frames = [f.split(" (")[0] for f in stack.split(";")]
        count = int(n)
        total += count
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    return {"samples": total, "self": self_c.most_common(25), "inclusive": {s: incl.get(s, 0) for s in STEPS}}


def report(info: dict, runs: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"# Serving-thread profile: {info.get('device')} (driver {info.get('driver')}), {info['date']}",
        "",
        f"- command: `{info['command']}`",
        f"- load: {args.clients} client processes x {args.in_flight} in flight, 64 x 512 float32 requests, "
        f"work {args.work}; py-spy at 2 kHz on the worker for {max(1, int(args.seconds - 2))} s",
        "",
    ]
    for r in runs:
        share = r["host_us_per_batch"] / max(1e-9, r["samples"])
        lines += [
            f"## {r['path']}: {r['batches']:,} batches, host {r['host_us_per_batch']:.1f} us/batch (status host_ns)",
            "",
            "| step (inclusive) | share of samples | us per batch (share x wall / batches) |",
            "| --- | --- | --- |",
        ]
        wall_us = (max(1, int(args.seconds - 2))) * 1e6
        for step, n in r["inclusive"].items():
            lines.append(
                f"| {step} | {n / max(1, r['samples']):.1%} | {n / max(1, r['samples']) * wall_us / max(1, r['batches']):.1f} |"
            )
        lines += ["", "| function (self) | share |", "| --- | --- |"]
        lines += [f"| {f} | {n / max(1, r['samples']):.1%} |" for f, n in r["self"]]
        lines.append("")
        del share
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=int, default=762)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--item", type=int, default=512)
    p.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bprof-", dir="/tmp"))
    s = {"label": f"prof{args.work}", "workers": 1, "work": args.work}
    assert CONFIGS[1].is_file()
    config, _run_dir, cpus = session_config(args, tmp, s)
    proc = cli("start", str(config), "--detach")
    if proc.returncode != 0:
        raise SystemExit(f"start failed: {proc.stdout}{proc.stderr}")
    runs = []
    try:
        for shm in (False, True):
            runs.append(profile(config, shm, args, cpus, out))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "self"}), flush=True)
    finally:
        cli("stop", str(config), timeout=60)
    text = report(machine_info(), runs, args)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
