"""Real models through the orchestrator: bert-tiny (requests of 16 sequences x 128 tokens) or resnet18
(requests of 8 images), closed-loop at each concurrency (requests in flight over all client processes),
shared memory on; items/s, latency p50/p99, GPU busy, host time per batch, batch fill; results checked
against the ExportedProgram run in this process; optionally a steady run (faults, launches over 1 ms).

Runs on a GPU host after scripts/export_models.py (the GPU machine: scripts/device_run.sh real):
    python scripts/bench_real.py --model bert --concurrency 1,64 --seconds 10 --json bert.json
    python scripts/bench_real.py --model resnet --concurrency 1,32 --seconds 10 --steady-s 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_gpu_orch import closed_loop, totals  # noqa: E402
from scripts.benchlib import ROOT, ClientPool, copy_logs, machine_info, start_or_record, status_json  # noqa: E402
from scripts.profile_serving import pyspy, summarise  # noqa: E402

MODELS = {
    "bert": {"config": "configs/gpu-bert.toml", "program": "models/bert-tiny.ep.pt2", "items": 16},
    "resnet": {"config": "configs/gpu-resnet.toml", "program": "models/resnet18.ep.pt2", "items": 8},
}
CHECK_EVERY = 16  # every 16th reply is compared with the in-process reference


def say(msg: str) -> None:
    print(f"[bench_real {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_inputs(model: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if model == "bert":
        ids = rng.integers(1, 1000, (16, 128), dtype=np.int64)  # valid for bert and for models/demo-seq.onnx
        mask = np.ones((16, 128), np.int64)
        mask[8:, 100:] = 0  # half the sequences end early: padding inside the sequence, as real batches have
        return {"input_ids": ids, "attention_mask": mask}
    return {"images": rng.standard_normal((8, 3, 224, 224)).astype(np.float16)}


def reference(model: str, program: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs of the ExportedProgram run in this process (the same weights as the served package)."""
    import torch

    from workers.engines.torch_program import Program

    prog = Program(program)
    names = [o[0] for o in prog.signature["outputs"]]
    with torch.no_grad():
        outs = prog.run(*(torch.from_numpy(inputs[i[0]]).cuda() for i in prog.signature["inputs"]))
    return {n: o.float().cpu().numpy() for n, o in zip(names, outs, strict=True)}


def _client_proc(
    config: str, model: str, seed: int, ref: dict[str, np.ndarray], cmd_q: Any, res_q: Any
) -> None:
    try:
        from orchestrator.client import Client

        inputs = make_inputs(model, seed)
        seen = [0]

        def check(out: dict[str, np.ndarray]) -> bool:
            seen[0] += 1
            if seen[0] % CHECK_EVERY != 1:
                return True
            return all(np.allclose(out[n].astype(np.float32), ref[n], atol=3e-2, rtol=3e-2) for n in ref)

        with Client(config, shm=True, shm_lease_mb=64, max_in_flight=256, timeout=60) as c:
            for _ in range(10):
                c.infer(inputs)
            res_q.put({"ready": True, "check": check(c.infer(inputs))})
            while (cmd := cmd_q.get()) is not None:
                r = closed_loop(c, inputs, cmd["in_flight"], cmd["seconds"], cmd["start_at"], check)
                res_q.put({**r, "lat": np.asarray(r["lat"], dtype=np.float64).tobytes()})
    except BaseException as exc:  # reported to the coordinator
        res_q.put({"error": f"{type(exc).__name__}: {exc}"})


def point(
    pool: ClientPool,
    config: Path,
    concurrency: int,
    processes: int,
    seconds: float,
    items: int,
    profile: Path | None = None,
) -> dict[str, Any]:
    clients = min(processes, concurrency)
    per = max(1, concurrency // clients)
    before = status_json(config)
    spies = []
    if profile is not None:  # py-spy on the worker and one client for the window (sampling, no pause)
        profile.mkdir(parents=True, exist_ok=True)
        raw, raw_client = profile / f"c{concurrency}.txt", profile / f"c{concurrency}-client.txt"
        for pid, into in ((before["workers"][0]["pid"], raw), (pool.procs[0].pid, raw_client)):
            cmd = [pyspy(), "record", "-p", str(pid), "-d", str(max(1, int(seconds) - 1)), "-r", "1000"]
            spies.append(
                subprocess.Popen(
                    [*cmd, "-f", "raw", "-o", str(into), "--nonblocking"], stdout=subprocess.DEVNULL
                )
            )
    results = pool.run({"clients": clients, "in_flight": per, "seconds": seconds})
    for spy in spies:
        spy.wait(timeout=60)
    time.sleep(0.5)  # the workers' last heartbeat of the window
    after = status_json(config)
    t0, t1 = totals(before), totals(after)
    d = {k: t1[k] - t0[k] for k in t1}
    lat = np.concatenate([np.frombuffer(r["lat"], dtype=np.float64) for r in results]) * 1e6
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "concurrency": clients * per,
        "clients": clients,
        "in_flight_each": per,
        "requests": int(lat.size),
        "seconds": round(wall, 3),
        "requests_per_s": lat.size / wall,
        "items_per_s": lat.size * items / wall,
        "latency_us": {
            "p50": float(np.percentile(lat, 50)),
            "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)),
            "max": float(lat.max()),
        }
        if lat.size
        else None,
        "gpu_busy": d["gpu_busy_ns"] / (wall * 1e9) if d["gpu_busy_ns"] else None,
        "host_us_per_batch": d["host_ns"] / d["batches"] / 1e3 if d["batches"] else None,
        "rows_per_batch": d["rows"] / d["batches"] if d["batches"] else None,
        "faults": d["faults"],
        "launches_over_1ms": d["launches_over_1ms"],
        "wrong": sum(r["wrong"] for r in results),
        "errors": errors,
        "profile": profiled(raw, d["batches"] * max(1, int(seconds) - 1) / wall) if spies else None,
        "profile_client": profiled(raw_client, lat.size / clients * max(1, int(seconds) - 1) / wall)
        if spies
        else None,
    }


def profiled(raw: Path, batches: float) -> dict[str, Any] | None:
    """The worker's py-spy samples in the window (`batches` served while it sampled): the serving loop's steps
    (inclusive) and the functions with the most self time, as a share of the samples and as microseconds of
    thread time per batch (at 1 kHz a sample stands for 1 ms)."""
    if not raw.is_file():
        return None
    prof = summarise(raw, 0)
    samples = max(1, prof["samples"])
    per_batch = 1e3 / max(1.0, batches)
    return {
        "samples": prof["samples"],
        "steps_us_per_batch": {k: round(n * per_batch, 1) for k, n in prof["inclusive"].items() if n},
        "self_top": [[f, round(n / samples, 4), round(n * per_batch, 1)] for f, n in prof["self"]],
    }


def session_config(args: argparse.Namespace, tmp: Path) -> Path:
    src = ROOT / MODELS[args.model]["config"]
    raw = tomllib.loads(src.read_text())
    raw["orchestrator"]["run_dir"] = str(tmp / "run")
    raw["model"]["path"] = str((src.parent / raw["model"]["path"]).resolve())
    if args.per_gpu > 1:  # several workers on the GPU: under MPS, each with its own serving thread
        raw["workers"]["per_gpu"] = args.per_gpu
        raw["mps"] = {"enabled": True}
    if args.journal:  # the driver journal each way (issue 16): CUPTI's cost on a real model
        raw.setdefault("monitor", {})["driver_journal"] = args.journal
    path = tmp / "config.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument(
        "--concurrency", default="1,64", help="requests in flight over all clients, comma-separated"
    )
    ap.add_argument("--processes", type=int, default=8, help="client processes at most")
    ap.add_argument("--per-gpu", type=int, default=1, help="workers on the GPU (more than 1: under MPS)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point")
    ap.add_argument(
        "--steady-s", type=float, default=0.0, help="then a steady run this long at the last concurrency"
    )
    ap.add_argument(
        "--journal", choices=["auto", "cupti", "own"], help="monitor.driver_journal (default: the config's)"
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", type=Path, help="py-spy the worker during each point; raw samples go here")
    ap.add_argument("--logs", type=Path, help="copy the run directory's logs here")
    args = ap.parse_args()
    try:
        levels = [int(x) for x in args.concurrency.split(",")]
        if any(c < 1 for c in levels):
            raise ValueError
    except ValueError:
        ap.error(f"--concurrency: expected positive integers separated by commas, got {args.concurrency!r}")
    spec = MODELS[args.model]
    program = ROOT / spec["program"]
    if not program.is_file():
        print(f"bench_real: {program} not found: run scripts/export_models.py first", file=sys.stderr)
        return 2
    out: dict[str, Any] = {
        "machine": machine_info(),
        "model": args.model,
        "request_items": spec["items"],
        "points": [],
        "shm": True,
    }
    ref = reference(args.model, program, make_inputs(args.model, 0))
    tmp = Path(tempfile.mkdtemp(prefix="br-", dir="/tmp"))
    config = session_config(args, tmp)
    run = {"config": str(config)}
    if not start_or_record(config, tmp / "run", run, args.logs):
        print(f"bench_real: {run['error']}", file=sys.stderr)
        return 1
    out["start_s"] = run["start_s"]
    pool = None
    try:
        st = status_json(config)
        out["engine"] = st["workers"][0].get("engine")
        # Every process sends the same input (seed 0): the reference is computed once.
        n = min(args.processes, max(levels))
        pool = ClientPool(_client_proc, [(str(config), args.model, 0, ref)] * n)
        out["first_replies_match_reference"] = all(r["check"] for r in pool.ready)
        for c in levels:
            r = point(pool, config, c, args.processes, args.seconds, spec["items"], args.profile)
            out["points"].append(r)
            lat = r["latency_us"] or {}
            say(
                f"{args.model} c={r['concurrency']}: {r['items_per_s']:,.0f} items/s, p50 {lat.get('p50', 0):,.0f} us, "
                f"p99 {lat.get('p99', 0):,.0f} us, GPU busy {r['gpu_busy'] or 0:.1%}, host "
                f"{r['host_us_per_batch'] or 0:.1f} us/batch, {r['rows_per_batch'] or 0:.1f} rows/batch, "
                f"wrong {r['wrong']}, errors {r['errors']}"
            )
        if args.steady_s:
            r = point(pool, config, levels[-1], args.processes, args.steady_s, spec["items"])
            out["steady"] = r
            say(
                f"steady {args.steady_s:.0f} s: {r['items_per_s']:,.0f} items/s, faults {r['faults']}, launches over "
                f"1 ms {r['launches_over_1ms']}, wrong {r['wrong']}, errors {r['errors']}"
            )
        out["status_end"] = status_json(config)
    finally:
        if pool is not None:
            pool.close()
        from scripts.benchlib import cli

        cli("stop", str(config), timeout=120)
        copy_logs(tmp / "run", args.logs)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
