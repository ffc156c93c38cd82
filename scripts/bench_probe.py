"""What the launch's thread probe (workers.telemetry.ThreadProbe) costs, and whether it sees a spin.

    python3 scripts/bench_probe.py [--json PATH]

The serving thread snaps the probe twice a batch, around the launch. Two ways to read the thread's on-CPU
time are compared:
- schedstat: the first field of /proc/thread-self/schedstat (the probe before 2026-12-04);
- thread_time_ns: CLOCK_THREAD_CPUTIME_ID (the probe now).
For each: the cost of one snap (median of 9 runs of 100,000), and what it reads for a 1 ms busy loop
(20 loops): a spin must read about 1,000 us on a CPU, not blocked.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.benchlib import machine_info  # noqa: E402  (after the path: run as a script)
from workers.telemetry import ThreadProbe  # noqa: E402


def old_snap(fd: int) -> tuple[int, int, int, int, int]:
    """The probe's reading before: on-CPU and run-queue both from schedstat, then the switch counts."""
    t = time.monotonic_ns()
    fields = os.pread(fd, 64, 0).split()
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return t, int(fields[0]), int(fields[1]), ru.ru_nvcsw, ru.ru_nivcsw


def cost_ns(fn: Any, n: int = 100_000, runs: int = 9) -> float:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        out.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(out)


def spin_reads(snap: Any, loops: int = 20) -> list[float]:
    """On-CPU microseconds the snap function reads across a 1 ms busy loop, `loops` times."""
    reads = []
    for _ in range(loops):
        a = snap()
        while time.monotonic_ns() - a[0] < 1_000_000:
            pass
        b = snap()
        reads.append((b[1] - a[1]) / 1e3)
    return reads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    probe = ThreadProbe()
    res: dict[str, Any] = {"machine": machine_info()}
    for name, snap in (("schedstat", lambda: old_snap(fd)), ("thread_time_ns", probe.snap)):
        reads = spin_reads(snap)
        res[name] = {
            "snap_ns": round(cost_ns(snap), 1),
            "spin_1ms_oncpu_us": {
                "min": round(min(reads), 1),
                "median": round(statistics.median(reads), 1),
                "max": round(max(reads), 1),
            },
        }
        print(
            f"{name:15s} snap {res[name]['snap_ns']:7.1f} ns; a 1 ms spin reads on a CPU "
            f"{res[name]['spin_1ms_oncpu_us']['min']}-{res[name]['spin_1ms_oncpu_us']['max']} us "
            f"(median {res[name]['spin_1ms_oncpu_us']['median']}, {len(reads)} spins)"
        )
    probe.close()
    os.close(fd)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
