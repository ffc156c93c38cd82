"""CPU benchmark of the whole data path: client-observed round-trip latency and throughput for small
batches with the no-work synthetic engine, next to the raw ZeroMQ round trip on the same machine.

    python scripts/bench_cpu.py --out benchmarks/results/cpu-$(hostname).md

Not a test: it reports numbers. Runs an orchestrator from configs/cpu-synthetic.toml semantics in a
temporary run directory, and a bare Python ROUTER echo server for the raw comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.loadgen import run_load  # noqa: E402


def _echo_server(endpoint: str, ready: mp.Event) -> None:
    """The raw comparison: a Python ROUTER that copies the payload (as staging would) and replies."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    ready.set()
    buf = bytearray(1 << 22)
    while True:
        frames = s.recv_multipart(copy=False)
        if frames[1].bytes == b"stop":
            break
        payload = frames[2].buffer
        buf[: len(payload)] = payload
        s.send_multipart([frames[0], frames[1], bytes(buf[: len(payload)])], copy=True)
    s.close(0)
    ctx.term()


def raw_rtt(endpoint: str, payload: bytes, n: int) -> list[float]:
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.connect(endpoint)
    lat = []
    for i in range(n + 200):
        t = time.perf_counter()
        d.send_multipart([b"h", payload], copy=False)
        d.recv_multipart()
        if i >= 200:
            lat.append(time.perf_counter() - t)
    d.send_multipart([b"stop", b""])
    d.close(0)
    ctx.term()
    return lat


def orchestrator_rtt(config: Path, x: np.ndarray, n: int) -> list[float]:
    from orchestrator.client import Client

    lat = []
    with Client(config) as c:
        for i in range(n + 200):
            t = time.perf_counter()
            c.infer(x)
            if i >= 200:
                lat.append(time.perf_counter() - t)
    return lat


def pct(v: list[float], p: float) -> float:
    return float(np.percentile(np.array(v) * 1e6, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4, help="rows per batch (x 256 float32 = 1 KiB per row)")
    ap.add_argument("-n", type=int, default=3000, help="sequential round trips per latency measurement")
    ap.add_argument("--procs", type=int, default=2, help="client processes for the throughput run")
    ap.add_argument("--in-flight", type=int, default=8, help="requests in flight per client process")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path, help="write the Markdown report here (and .json beside it)")
    args = ap.parse_args()

    x = np.random.default_rng(0).standard_normal((args.rows, 256)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="orch-bench-", dir="/tmp") as tmp:
        ready = mp.get_context("spawn").Event()
        ep = f"ipc://{tmp}/echo.sock"
        srv = mp.get_context("spawn").Process(target=_echo_server, args=(ep, ready))
        srv.start()
        ready.wait(30)
        raw = raw_rtt(ep, x.tobytes(), args.n)
        srv.join(10)

        cfg = Path(tmp) / "bench.toml"
        cfg.write_text(f"""[orchestrator]\nname = "bench"\nrun_dir = "{tmp}/run"\n
[workers]\ndevice = "cpu"\ncount = 1\n\n[model]\nkind = "synthetic"\nitem_shape = [256]\nwork = 0\nmax_batch = 64\n
[pipeline]\ndepth = 2\nmax_queue_delay_us = 0\n""")
        cmd = [sys.executable, "-m", "orchestrator.cli"]
        subprocess.run([*cmd, "start", str(cfg), "--detach"], check=True, cwd=ROOT)
        try:
            orch = orchestrator_rtt(cfg, x, args.n)
            load = run_load(cfg, (args.rows, 256), args.procs, args.in_flight, args.seconds)
            tput = load.throughput
        finally:
            subprocess.run([*cmd, "stop", str(cfg)], check=True, cwd=ROOT)

    rows = {
        "raw ZeroMQ round trip (Python DEALER -> ROUTER echo with a staging copy)": raw,
        "orchestrator round trip (Client.infer -> worker -> reply, no-work engine)": orch,
    }
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# CPU data-path benchmark ({date})",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- batch: {args.rows} x 256 float32 ({x.nbytes} bytes) each way; {args.n} sequential round trips after 200 warm-up",
        "",
        "| path | p50 (us) | p99 (us) | mean (us) |",
        "| --- | --- | --- | --- |",
    ]
    for name, v in rows.items():
        lines.append(f"| {name} | {pct(v, 50):.0f} | {pct(v, 99):.0f} | {np.mean(v) * 1e6:.0f} |")
    ratio = pct(orch, 50) / pct(raw, 50)
    lines += [
        "",
        f"p50 ratio orchestrator / raw: **{ratio:.2f}x** (target < 2x)",
        "",
        f"Throughput, {args.procs} client processes x {args.in_flight} in flight, 1 worker, {args.seconds:g} s: "
        f"**{tput:,.0f} batches/s** ({tput * args.rows:,.0f} rows/s), latency p50 {load.pct(50):.0f} us, "
        f"p99 {load.pct(99):.0f} us, errors {load.errors or 'none'}",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        args.out.with_suffix(".json").write_text(
            json.dumps(
                {
                    "date": date,
                    "command": sys.argv,
                    "rows": args.rows,
                    "ratio_p50": ratio,
                    "throughput_batches_s": tput,
                    "raw_us": {"p50": pct(raw, 50), "p99": pct(raw, 99)},
                    "orchestrator_us": {"p50": pct(orch, 50), "p99": pct(orch, 99)},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
