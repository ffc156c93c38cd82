"""GPU benchmark (issue 3, item 9): calibrated synthetic batches of about 30 us, 110 us and 1 ms of GPU time;
for each, the bare limit (Part A: Pipeline + engine in one process, no ZeroMQ) and the whole orchestrator
(Part B: sync-per-batch baseline and configured for speed, driven by client processes).

    python scripts/bench_gpu.py --part A --out benchmarks/results/gpu-h100
    python scripts/bench_gpu.py --part B --works 120,560,5600 --gpu-us 31,111,1003 --out ...

Writes OUT.md (one Markdown table per run) and OUT.json. Batch: 64 rows x 1024 float32 (256 KiB in and
out), one request per batch. GPU time per batch is the slot stream's span from H2D start to D2H end,
from CUDA events. Runs on a GPU host, in this process (Part A) and spawned processes (Part B).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")  # read by cuInit: set before any CUDA call

from scripts import bench_gpu_bare as bare  # noqa: E402
from scripts import bench_gpu_orch as orch  # noqa: E402
from scripts.benchlib import machine_info as machine  # noqa: E402

log = logging.getLogger("bench_gpu")


def say(msg: str) -> None:
    print(msg, flush=True)


COLUMNS = [
    ("run", "{}"),
    ("batches/s", "{:,.0f}"),
    ("items/s", "{:,.0f}"),
    ("GPU busy", "{:.1%}"),
    ("GPU us/batch p50", "{:.1f}"),
    ("host us/batch", "{:.1f}"),
    ("enqueue us p50/p99", "{}"),
    ("latency us p50/p99", "{}"),
    ("launches >1 ms", "{}"),
    ("faults", "{}"),
]


def row(label: str, r: dict[str, Any]) -> list[str]:
    enq = f"{r['enqueue_us_p50']:.1f} / {r['enqueue_us_p99']:.1f}" if "enqueue_us_p50" in r else "-"
    vals = [
        label,
        r["batches_per_s"],
        r["items_per_s"],
        r["gpu_busy"],
        r.get("gpu_time_us_p50", float("nan")),
        r.get("host_us_per_batch", float("nan")),
        enq,
        f"{r['latency_us_p50']:.0f} / {r['latency_us_p99']:.0f}",
        r.get("launches_over_1ms", "-"),
        r["faults"],
    ]

    def cell(fmt: str, v: Any) -> str:
        if isinstance(v, float) and v != v:  # NaN: not measured in this kind of run
            return "-"
        return fmt.format(v) if isinstance(v, (int, float)) else str(v)

    return [cell(fmt, v) for (_, fmt), v in zip(COLUMNS, vals, strict=True)]


def table(title: str, rows: list[tuple[str, dict]]) -> str:
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(c for c, _ in COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row(label, r)) + " |" for label, r in rows]
    return "\n".join(lines) + "\n"


SHM = {"auto": "auto", "on": True, "off": False}  # --shm -> Client(shm=...)

BARE_RUNS = [
    ("bare, depth 1, no graphs (sync per batch)", 1, False, "spin"),
    ("bare, depth 2, graphs, spin", 2, True, "spin"),
    ("bare, depth 3, graphs, spin", 3, True, "spin"),
    ("bare, depth 4, graphs, spin", 4, True, "spin"),
    ("bare, depth 3, graphs, blocking", 3, True, "blocking"),
]


def part_a(args: argparse.Namespace, shape: bare.Shape, results: dict) -> None:
    targets = [float(t) for t in args.targets.split(",")]
    if args.works:
        works = [int(w) for w in args.works.split(",")]
        cal = [
            {"target_us": t, "work": w, "gpu_time_us": bare.measure_gpu_us(shape, w)}
            for t, w in zip(targets, works, strict=True)
        ]
    else:
        cal = [bare.calibrate(shape, t, say) for t in targets]
    results["calibration"] = cal
    for c in cal:
        runs = []
        for label, depth, graphs, sync in BARE_RUNS:
            r = bare.bare_run(shape, c["work"], depth, graphs, sync, args.seconds)
            say(f"  {label} @ work {c['work']}: {r['batches_per_s']:,.0f}/s busy {r['gpu_busy']:.1%}")
            runs.append((label, r))
        results["runs"].append({"target_us": c["target_us"], "work": c["work"], "part": "A", "runs": runs})
    if args.steady_seconds > 0:
        c = cal[min(1, len(cal) - 1)]
        r = bare.bare_run(shape, c["work"], 2, True, "spin", args.steady_seconds)
        say(
            f"  steady {args.steady_seconds:g}s @ work {c['work']}: faults {r['faults']}, launches >1 ms {r['launches_over_1ms']}, "
            f"enqueue max {r['enqueue_us_max']:.0f} us"
        )
        results["steady"] = {"work": c["work"], **r}


def part_b(args: argparse.Namespace, shape: bare.Shape, results: dict) -> None:
    cal = results.get("calibration")
    if not cal:
        works = [int(w) for w in args.works.split(",")]
        gpu = [float(g) for g in args.gpu_us.split(",")]
        cal = [{"target_us": g, "work": w, "gpu_time_us": g} for w, g in zip(works, gpu, strict=True)]
    tmp = Path(tempfile.mkdtemp(prefix="ob-", dir="/tmp"))
    for c in cal:
        runs = []
        variants = [
            ("orchestrator, depth 1, no graphs (baseline)", 1, False, 1),
            (f"orchestrator, depth {args.depth}, graphs (speed)", args.depth, True, 1),
        ]
        if args.io_threads_variant:
            variants.append(
                (f"orchestrator, depth {args.depth}, graphs, 2 ZeroMQ I/O threads", args.depth, True, 2)
            )
        for label, depth, graphs, io in variants:
            cfg = orch.write_config(
                tmp,
                f"bench{depth}io{io}",
                shape.rows,
                shape.item,
                c["work"],
                depth,
                graphs,
                args.sync,
                args.device,
                io,
            )
            r = orch.run(
                label,
                cfg,
                args.clients,
                args.in_flight,
                args.seconds,
                shape.rows,
                shape.item,
                c["work"],
                c["gpu_time_us"],
                say,
                SHM[args.shm],
            )
            say(
                f"  {label} @ work {c['work']}: {r['batches_per_s']:,.0f}/s busy {r['gpu_busy']:.1%} ({r['gpu_busy_source']})"
            )
            runs.append((label, r))
        bare_runs = next((x for x in results["runs"] if x["part"] == "A" and x["work"] == c["work"]), None)
        if bare_runs:
            best = max(r["batches_per_s"] for _, r in bare_runs["runs"])
            same = {
                (r["depth"], r["cuda_graphs"], r["sync"]): r["batches_per_s"] for _, r in bare_runs["runs"]
            }
            for (_, r), depth, graphs in zip(
                runs, (1, args.depth, args.depth), (False, True, True), strict=False
            ):
                r["fraction_of_bare"] = r["batches_per_s"] / best
                if (depth, graphs, args.sync) in same:
                    r["fraction_of_bare_same_depth"] = r["batches_per_s"] / same[(depth, graphs, args.sync)]
        results["runs"].append({"target_us": c["target_us"], "work": c["work"], "part": "B", "runs": runs})


def report(results: dict, out: Path) -> None:
    m = results["machine"]
    lines = [
        f"# GPU benchmark: {m.get('device')} (driver {m.get('driver')})",
        "",
        f"- date: {m['date']}",
        f"- command: `{m['command']}`",
        f"- cuda-bindings {m.get('cuda_bindings')}, NVRTC {m.get('nvrtc')}, Python {m['python']}, "
        f"{m['affinity_cpus']} of {m['host_cpus']} CPUs",
        f"- batch: {results['shape']}",
        "",
    ]
    for c in results.get("calibration", []):
        lines.append(
            f"- calibration: target {c['target_us']:g} us -> work {c['work']} -> {c['gpu_time_us']:.1f} us per batch"
        )
    lines.append("")
    for group in results["runs"]:
        title = f"Part {group['part']}: ~{group['target_us']:g} us per batch (work {group['work']})"
        lines.append(table(title, group["runs"]))
        for label, r in group["runs"]:
            if "gpu_busy_source" in r:
                frac = (
                    f"{r['fraction_of_bare']:.1%} of the best bare run; " if "fraction_of_bare" in r else ""
                )
                if "fraction_of_bare_same_depth" in r:
                    frac += f"{r['fraction_of_bare_same_depth']:.1%} of the bare run with the same depth/graphs/sync; "
                if r.get("gpu_busy_estimate") is not None:
                    frac += f"(batches x isolated GPU time would say {r['gpu_busy_estimate']:.1%}); "
                via = (
                    f"; via shared memory {r['via_shm']:.0%} (shm={r['shm']})"
                    if r.get("via_shm") is not None
                    else ""
                )
                lines.append(
                    f"- {label}: {frac}GPU busy {r['gpu_busy_source']}; results checked: {r.get('result_check')}{via}"
                )
        lines.append("")
    if "steady" in results:
        s = results["steady"]
        lines.append(
            f"Steady run: {s['seconds']} s at work {s['work']}, depth 2, graphs: {s['batches']} batches, "
            f"faults {s['faults']}, launches over 1 ms {s['launches_over_1ms']}, enqueue max {s['enqueue_us_max']:.0f} us."
        )
    if any(g["part"] == "A" for g in results["runs"]):
        lines += [
            "",
            "Part A GPU busy: union of the batches' event spans (H2D start to D2H end) over wall time;",
            "batches on different slot streams may overlap, which the union does not double-count. GPU us/batch",
            "is each batch's own span, which stretches when batches of several slots share the GPU.",
            "",
        ]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    say(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["A", "B", "AB"], default="A")
    p.add_argument("--out", required=True, help="output path stem: writes STEM.md and STEM.json")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument(
        "--item",
        type=int,
        default=512,
        help="floats per row: 512 = 128 KiB per 64-row batch, the size FACTS.md measured",
    )
    p.add_argument("--targets", default="30,110,1000", help="GPU us per batch to calibrate for")
    p.add_argument("--works", default="", help="skip calibration: work values, one per target")
    p.add_argument("--gpu-us", default="", help="Part B alone: Part A's GPU us per batch for --works")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    p.add_argument("--steady-seconds", type=float, default=60.0, help="Part A steady run (0 = skip)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--in-flight", type=int, default=8, help="requests each client keeps in flight")
    p.add_argument("--depth", type=int, default=3, help="Part B speed configuration's pipeline depth")
    p.add_argument("--sync", default="spin", choices=["spin", "blocking"])
    p.add_argument(
        "--device", default="gpu", choices=["gpu", "cpu"], help="Part B workers (cpu: smoke test only)"
    )
    p.add_argument(
        "--io-threads-variant",
        action="store_true",
        help="Part B: also run the speed config with 2 ZeroMQ I/O threads",
    )
    p.add_argument(
        "--shm",
        choices=sorted(SHM),
        default="auto",
        help="Part B clients' data path: auto (shared memory where the worker offers it), on, off (frames)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    shape = bare.Shape(args.rows, args.item)
    results: dict[str, Any] = {
        "machine": machine(),
        "runs": [],
        "shape": f"{shape.rows} x {shape.item} float32 ({shape.batch_bytes // 1024} KiB in, the same out)",
    }
    say(json.dumps(results["machine"]))
    if "A" in args.part:
        part_a(args, shape, results)
    if "B" in args.part:
        part_b(args, shape, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report(results, out)


if __name__ == "__main__":
    main()
