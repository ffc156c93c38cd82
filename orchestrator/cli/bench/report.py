"""What `orchestrator bench` shows and writes: a progress display while it runs (rich, on stderr), a table
per target at the end (stdout), the JSON document and the CSV rows.

Runs in the CLI process.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.cli.bench.sweep import JSON_VERSION, point_label


def _f(v: Any, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def _counts(d: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (d or {}).items()) or "-"


def summary(point: dict[str, Any]) -> str:
    """One line per point: what the progress display prints as each point ends."""
    kind = "rate" if point["mode"] == "open" else "concurrency"
    label = point_label(kind, point[kind])
    lat = point.get("latency_us") or {}
    parts = [
        f"{label}: {_f(point['requests_per_s'])} req/s, {_f(point['items_per_s'])} items/s",
        f"p50 {_f(lat.get('p50'))} us, p99 {_f(lat.get('p99'))} us",
    ]
    if point.get("gpu_busy") is not None:
        parts.append(f"GPU busy {point['gpu_busy']:.0%}")
    if point["errors"]:
        parts.append(f"errors: {_counts(point['errors'])}")
    if point["wrong"]:
        parts.append(f"WRONG: {point['wrong']} of {point['checked']} checked ({point['wrong_example']})")
    return "; ".join(parts)


class BenchProgress:
    """A progress bar over the whole run (every point of every target), the current point and the replies
    per second the clients see now; a line per finished point. Without a terminal, only the lines."""

    def __init__(self, total_s: float, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.total_s = total_s
        self.prefix = ""
        self._bar: Any = None
        self._task: Any = None
        self._done_s = 0.0
        self._point_s = 0.0
        self._t0 = 0.0
        self._label = ""
        self._last: tuple[float, int] | None = None
        self._rate = ""

    def __enter__(self) -> BenchProgress:
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("connecting", total=self.total_s, rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def begin(self, label: str, seconds: float) -> None:
        self._label = f"{self.prefix}{label}"
        self._point_s = seconds
        self._t0 = time.monotonic()
        self._last = None
        self._rate = ""
        self._update()

    def tick(self, completed: int) -> None:
        now = time.monotonic()
        if self._last is None:
            self._last = (now, completed)
        elif now - self._last[0] >= 0.5:
            self._rate = f"{(completed - self._last[1]) / (now - self._last[0]):,.0f} replies/s"
            self._last = (now, completed)
        self._update()

    def _update(self) -> None:
        if self._bar is not None:
            elapsed = min(self._point_s, time.monotonic() - self._t0)
            self._bar.update(
                self._task, completed=self._done_s + elapsed, description=self._label, rate=self._rate
            )

    def end(self, point: dict[str, Any]) -> None:
        self._done_s += self._point_s
        self._update()
        self.console.print(f"{self.prefix}{summary(point)}", highlight=False, soft_wrap=True)


def table(result: dict[str, Any]) -> Table:
    """The points of one target, one row each."""
    points = result["points"]
    open_loop = bool(points) and points[0]["mode"] == "open"
    t = Table(
        title=f"{result['target']}: {result['transport']}, {points[0]['rows'] if points else '-'} row(s) per request",
        title_justify="left",
    )
    cols = [
        ("rate/s" if open_loop else "concurrency", "right"),
        ("req/s", "right"),
        ("items/s", "right"),
        ("p50 us", "right"),
        ("p90 us", "right"),
        ("p99 us", "right"),
        ("max us", "right"),
        ("errors", "left"),
        ("wrong", "right"),
        ("GPU busy", "right"),
        ("GPU us/batch", "right"),
        ("host us/batch", "right"),
        ("rows/batch", "right"),
        ("queue p50 us", "right"),
        ("stalls", "left"),
        ("launches >1ms", "right"),
    ]
    for name, justify in cols:
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for p in points:
        lat = p.get("latency_us") or {}
        queue = p.get("queue_us") or {}
        wrong = f"[bold red]{p['wrong']}/{p['checked']}[/]" if p["wrong"] else f"0/{p['checked']}"
        t.add_row(
            _f(p["rate"], ",g") if open_loop else str(p["concurrency"]),
            _f(p["requests_per_s"]) if p["correct"] else "[bold red]WRONG[/]",
            _f(p["items_per_s"]) if p["correct"] else "[bold red]WRONG[/]",
            _f(lat.get("p50")),
            _f(lat.get("p90")),
            _f(lat.get("p99")),
            _f(lat.get("max")),
            _counts(p["errors"]),
            wrong,
            _f(p["gpu_busy"], ".0%"),
            _f(p["gpu_us_per_batch"], ",.1f"),
            _f(p["host_us_per_batch"], ",.1f"),
            _f(p["rows_per_batch"], ",.1f"),
            _f(queue.get("p50"), ",.0f"),
            _counts(p["stalls"]),
            _f(p["launches_over_1ms"], "d"),
        )
    return t


def notes(result: dict[str, Any]) -> list[str]:
    """What the table cannot say: the reference, null figures, busy clients, incomplete telemetry."""
    out = [f"checked against: {result['reference_source'] or 'nothing (--check 0)'}"]
    points = result["points"]
    if points and all(p["gpu_busy"] is None for p in points):
        out.append("GPU busy and GPU time per batch: no GPU telemetry (CPU workers)")
    busy = [p["client_cpu"] for p in points if p.get("client_cpu") is not None]
    if busy and max(busy) > 0.9:
        out.append(
            f"a client process used {max(busy):.0%} of a core: it may be the bottleneck (try --processes)"
        )
    if any(not p["telemetry"]["complete"] for p in points):
        out.append("some points' telemetry ends before every worker reported after the window")
    late = [p for p in points if p.get("late")]
    if late:
        worst = max(late, key=lambda p: p["late"] / max(1.0, p["sent_per_s"] * p["duration_s"]))
        out.append(
            f"open loop: the clients fell behind the schedule ({worst['late']:,} requests more than 1 ms late "
            f"at rate {worst['rate']:g}/s); latencies count from when each was due"
        )
    return out


def document(
    settings: dict[str, Any], first: dict[str, Any], second: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON document: the first target's result at the top level, the second under `compare`."""
    return {
        "version": JSON_VERSION,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["orchestrator", *sys.argv[1:]]),
        "host": platform.node(),
        "host_cpus": os.cpu_count(),
        "settings": settings,
        **first,
        "compare": second,
    }


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


CSV_COLUMNS = [
    "target",
    "mode",
    "concurrency",
    "rate",
    "rows",
    "processes",
    "duration_s",
    "requests",
    "requests_per_s",
    "items_per_s",
    "sent_per_s",
    "late",
    "latency_p50_us",
    "latency_p90_us",
    "latency_p99_us",
    "latency_max_us",
    "latency_mean_us",
    "errors",
    "checked",
    "wrong",
    "correct",
    "client_cpu",
    "gpu_busy",
    "gpu_us_per_batch",
    "host_us_per_batch",
    "enqueue_p50_us",
    "enqueue_p99_us",
    "rows_per_batch",
    "batches",
    "queue_mean_us",
    "queue_p50_us",
    "queue_p99_us",
    "server_latency_p50_us",
    "server_latency_p99_us",
    "stalls",
    "launches_over_1ms",
    "worker_failures",
    "telemetry_window_s",
]


def csv_row(target: str, p: dict[str, Any]) -> dict[str, Any]:
    """One point flattened; counts by type/cause as `name:n` joined by `;`."""

    def sub(key: str, name: str) -> Any:
        return (p.get(key) or {}).get(name)

    def joined(d: dict[str, int]) -> str:
        return ";".join(f"{k}:{v}" for k, v in d.items())

    return {
        "target": target,
        "mode": p["mode"],
        "concurrency": p["concurrency"],
        "rate": p["rate"],
        "rows": p["rows"],
        "processes": p["processes"],
        "duration_s": p["duration_s"],
        "requests": p["requests"],
        "requests_per_s": p["requests_per_s"],
        "items_per_s": p["items_per_s"],
        "sent_per_s": p["sent_per_s"],
        "late": p["late"],
        "latency_p50_us": sub("latency_us", "p50"),
        "latency_p90_us": sub("latency_us", "p90"),
        "latency_p99_us": sub("latency_us", "p99"),
        "latency_max_us": sub("latency_us", "max"),
        "latency_mean_us": sub("latency_us", "mean"),
        "errors": joined(p["errors"]),
        "checked": p["checked"],
        "wrong": p["wrong"],
        "correct": p["correct"],
        "client_cpu": p["client_cpu"],
        "gpu_busy": p["gpu_busy"],
        "gpu_us_per_batch": p["gpu_us_per_batch"],
        "host_us_per_batch": p["host_us_per_batch"],
        "enqueue_p50_us": sub("enqueue_us", "p50"),
        "enqueue_p99_us": sub("enqueue_us", "p99"),
        "rows_per_batch": p["rows_per_batch"],
        "batches": p["batches"],
        "queue_mean_us": sub("queue_us", "mean"),
        "queue_p50_us": sub("queue_us", "p50"),
        "queue_p99_us": sub("queue_us", "p99"),
        "server_latency_p50_us": sub("server_latency_us", "p50"),
        "server_latency_p99_us": sub("server_latency_us", "p99"),
        "stalls": joined(p["stalls"]),
        "launches_over_1ms": p["launches_over_1ms"],
        "worker_failures": joined(p["worker_failures"]),
        "telemetry_window_s": p["telemetry"]["window_s"],
    }


def write_csv(path: str | Path, results: list[dict[str, Any]]) -> None:
    """One row per point of every target; empty cells where a figure is null."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for result in results:
            for p in result["points"]:
                w.writerow({k: ("" if v is None else v) for k, v in csv_row(result["target"], p).items()})
