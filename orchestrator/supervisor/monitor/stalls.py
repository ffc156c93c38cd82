"""Stall attribution (pure functions over recorded inputs) and the JSON-lines stall log.

Runs in the supervisor: the monitor calls attribute() on the thread that received a worker's stall
candidate, then StallLog.write() (thread-safe) appends the record to <run_dir>/stalls.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CAUSES = (
    "driver_lock",
    "python_gc",
    "lock_wait",
    "cpu_preemption",
    "cpu_stolen",
    "throttling",
    "foreign_process",
    "unknown",
)
#: Clock-event reasons that slow the GPU down (idle, application clocks and display clocks do not).
SLOWING_REASONS = frozenset(
    {
        "sw_power_cap",
        "hw_slowdown",
        "sw_thermal",
        "hw_thermal",
        "hw_power_brake",
        "sync_boost",
        "board_limit",
        "reliability",
    }
)
_ABNORMAL_REASONS = frozenset({"hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake"})
#: Below this best score the stall is ranked "unknown" first: nothing that overlapped it explains it well.
UNKNOWN_BELOW = 0.25
#: Causes scoring below this are noise (a few microseconds of run-queue wait) and are left out.
MIN_SCORE = 0.05
#: GPU time this many times its baseline means the device itself was slow for this batch.
GPU_SLOW_RATIO = 1.5
#: A launch is asynchronous: GPU-side causes cannot explain a slow enqueue alone, so they stay below this.
HOST_ONLY_CAP = 0.15

Cause = tuple[str, float, dict]


def _overlap_ns(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def _enqueue_stall(c: dict) -> bool:
    return "enqueue" in c.get("kind", ())


def _gpu_ratio(c: dict) -> float | None:
    gpu = (c.get("timings_us") or {}).get("gpu")
    base = (c.get("baseline_us") or {}).get("gpu")
    if gpu is None or not base:
        return None
    return gpu / base


def _driver_lock(c: dict) -> Cause | None:
    ops = c.get("journal") or []
    if not ops:
        return None
    l0, l1 = c["launch_t0_ns"], c["launch_t1_ns"]
    t0, t1 = c["t0_ns"], c["t1_ns"]
    rows, in_launch, in_window = [], 0, 0
    for op in ops:
        ov_l = _overlap_ns(op["t0_ns"], op["t1_ns"], l0, l1)
        ov_w = _overlap_ns(op["t0_ns"], op["t1_ns"], t0, t1)
        in_launch += ov_l
        in_window += ov_w
        if ov_w:
            rows.append(
                {
                    "op": op["op"],
                    "name": op.get("api") or op["op"],
                    "source": op.get("source", "own"),
                    "detail": op.get("detail", ""),
                    "thread": op.get("thread", ""),
                    "library": op.get("library", ""),
                    "fault": op.get("fault", False),
                    "dur_us": (op["t1_ns"] - op["t0_ns"]) / 1e3,
                    "overlap_us": max(ov_l, ov_w) / 1e3,
                }
            )
    if not rows:
        return None
    if _enqueue_stall(c) and in_launch:
        coverage = min(1.0, in_launch / max(1, l1 - l0))
        score = 0.55 + 0.4 * coverage
        probe = c.get("probe_launch") or {}
        if probe.get("vcsw", 0) > 0:  # the launching thread blocked while the op ran: a lock wait
            score += 0.05
    else:
        coverage = min(1.0, in_window / max(1, t1 - t0))
        score = 0.35 + 0.4 * coverage
    rows.sort(key=lambda r: -r["overlap_us"])
    return "driver_lock", score, {"ops": rows[:5], "n_ops": len(rows), "coverage": round(coverage, 3)}


def _python_gc(c: dict) -> Cause | None:
    """A garbage collection overlapped the stall: on the serving thread it is the stall; on another thread
    it held the GIL the serving thread waited for (which also shows as a lock wait)."""
    rows = c.get("gc") or []
    if not rows:
        return None
    if _enqueue_stall(c):
        a0, a1, base = c["launch_t0_ns"], c["launch_t1_ns"], 0.55
    else:
        a0, a1, base = c["t0_ns"], c["t1_ns"], 0.35
    overlap = sum(_overlap_ns(r["t0_ns"], r["t1_ns"], a0, a1) for r in rows)
    if not overlap:
        return None
    coverage = min(1.0, overlap / max(1, a1 - a0))
    longest = max(rows, key=lambda r: r["t1_ns"] - r["t0_ns"])
    return (
        "python_gc",
        base + 0.4 * coverage,
        {
            "generation": longest["generation"],
            "thread": longest["thread"],
            "dur_us": round((longest["t1_ns"] - longest["t0_ns"]) / 1e3, 1),
            "n": len(rows),
            "coverage": round(coverage, 3),
        },
    )


def _probe_for(c: dict) -> tuple[str, dict | None]:
    if _enqueue_stall(c) and c.get("probe_launch"):
        return "launch", c["probe_launch"]
    return "batch", c.get("probe_batch")


def _lock_wait(c: dict) -> Cause | None:
    where, p = _probe_for(c)
    if not p or p.get("vcsw", 0) <= 0 or p.get("wall_us", 0) <= 0:
        return None
    blocked = p["blocked_us"]
    weight = 0.75
    if where == "batch":
        # The batch window also holds the completion wait and the loop's idle polling, where blocking is
        # normal (and in blocking-sync mode expected): only blocked time beyond that wait is suspect.
        blocked = max(0.0, blocked - ((c.get("timings_us") or {}).get("complete_wait") or 0.0))
        weight = 0.4
    frac = min(1.0, blocked / p["wall_us"])
    if frac <= 0:
        return None
    return (
        "lock_wait",
        weight * frac,
        {
            "window": where,
            "blocked_us": round(blocked, 1),
            "vcsw": p["vcsw"],
            "wall_us": round(p["wall_us"], 1),
            "sync_mode": c.get("sync_mode"),
        },
    )


#: Below this the time a probe could not place (wall - on CPU - run-queue) is the snaps' own noise.
STOLEN_MIN_US = 200.0


def _cpu_stolen(c: dict, host: dict) -> Cause | None:
    """The thread neither ran nor waited to run, yet never switched out: its CPU was taken without the
    scheduler, by the hypervisor (steal time, on a virtual machine) or by interrupt handling. Sleeping
    would have counted voluntary switches, waiting for a CPU run-queue time."""
    where, p = _probe_for(c)
    if not p or p.get("vcsw", 0) > 0 or p.get("wall_us", 0) <= 0 or p["blocked_us"] < STOLEN_MIN_US:
        return None
    frac = min(1.0, p["blocked_us"] / p["wall_us"])
    ev = {
        "window": where,
        "stolen_us": round(p["blocked_us"], 1),
        "wall_us": round(p["wall_us"], 1),
        "host_steal_pct": host.get("steal_pct"),
        "host_irq_pct": host.get("irq_pct"),
    }
    return "cpu_stolen", 0.5 + 0.4 * frac, ev


def _host_saturated(host: dict) -> list[str]:
    why = []
    cpu = host.get("cpu_pct")
    if cpu is not None and cpu >= 90:
        why.append(f"host CPU {cpu:.0f}%")
    psi = host.get("psi_cpu_some_avg10")
    if psi is not None and psi >= 25:
        why.append(f"CPU pressure {psi:.0f}% (some avg10)")
    load1, ncpu = host.get("load1"), host.get("ncpu")
    if load1 is not None and ncpu and load1 >= 1.5 * ncpu:
        why.append(f"load {load1:.1f} on {ncpu} CPUs")
    return why


def _cpu_preemption(c: dict, host: dict) -> Cause | None:
    where, p = _probe_for(c)
    span_us = p.get("wall_us", 0) if p else 0
    if where == "batch" and c.get("probe_request"):
        # Run-queue time only accrues while runnable, so the wider window (from before the oldest request
        # arrived) adds no noise; measure it against the stall's own duration.
        where, p = "request", c["probe_request"]
        span_us = min(p.get("wall_us", 0), (c["t1_ns"] - c["t0_ns"]) / 1e3)
    saturated = _host_saturated(host or {})
    score, ev = 0.0, {"window": where, "host": saturated}
    if p and span_us > 0:
        runq_frac = min(1.0, p["runq_us"] / span_us) if c.get("schedstat", True) else 0.0
        score = 0.85 * runq_frac + (0.1 if p.get("ivcsw", 0) > 0 else 0.0)
        ev.update(runq_us=round(p["runq_us"], 1), ivcsw=p.get("ivcsw", 0), wall_us=round(p["wall_us"], 1))
    if saturated:
        score = score + 0.15 if score > 0 else 0.2
    if score <= 0:
        return None
    return "cpu_preemption", min(0.95, score), ev


def _throttling(c: dict, samples: list[dict]) -> Cause | None:
    if not samples:
        return None
    active: set[str] = set()
    drop, min_clock, max_clock = 0.0, None, None
    for s in samples:
        reasons = set(s.get("throttle_reasons") or ())
        active |= reasons & SLOWING_REASONS
        clk, mx = s.get("sm_clock_mhz"), s.get("sm_clock_max_mhz")
        if clk and mx and "gpu_idle" not in reasons:
            if min_clock is None or clk < min_clock:
                min_clock, max_clock = clk, mx
                drop = max(0.0, 1.0 - clk / mx)
    base = 0.0
    if active:
        base = 0.35 if active & _ABNORMAL_REASONS else 0.25
    if drop >= 0.15:
        base += min(0.25, drop)
    if base <= 0:
        return None
    ratio = _gpu_ratio(c)
    score = base + 0.35 if ratio is not None and ratio >= GPU_SLOW_RATIO else base * 0.6
    if _enqueue_stall(c) and "latency" not in c.get("kind", ()):
        score = min(score, HOST_ONLY_CAP)
    ev = {
        "reasons": sorted(active),
        "sm_clock_mhz": min_clock,
        "sm_clock_max_mhz": max_clock,
        "clock_drop": round(drop, 3),
        "gpu_ratio": round(ratio, 2) if ratio is not None else None,
        "samples": len(samples),
    }
    return "throttling", min(0.95, score), ev


def _foreign(c: dict, foreign: list[Any]) -> Cause | None:
    if not foreign:
        return None
    ratio = _gpu_ratio(c)
    score = 0.7 if ratio is not None and ratio >= GPU_SLOW_RATIO else 0.3
    if _enqueue_stall(c) and "latency" not in c.get("kind", ()):
        score = min(score, HOST_ONLY_CAP)  # other processes did not delay launches in our measurements
    return (
        "foreign_process",
        score,
        {"processes": foreign[:8], "gpu_ratio": round(ratio, 2) if ratio is not None else None},
    )


def attribute(
    candidate: dict, gpu_samples: list[dict], host: dict, foreign_pids: Iterable[int | dict]
) -> list[Cause]:
    """Rank the possible causes of one stall candidate: [(cause, score 0..1, evidence)], best first.

    `gpu_samples` are the NVML samples of the worker's GPU around the stall window (empty without NVML),
    `host` the latest host sample, `foreign_pids` the processes on that GPU that are not ours.
    "unknown" ranks first when no cause reaches UNKNOWN_BELOW.
    """
    tried = [
        _driver_lock(candidate),
        _python_gc(candidate),
        _lock_wait(candidate),
        _cpu_preemption(candidate, host or {}),
        _cpu_stolen(candidate, host or {}),
        _throttling(candidate, gpu_samples or []),
        _foreign(candidate, list(foreign_pids or ())),
    ]
    found = _reconcile([x for x in tried if x and x[1] >= MIN_SCORE])
    ranked = sorted(((n, round(s, 3), e) for n, s, e in found), key=lambda x: -x[1])
    if not ranked or ranked[0][1] < UNKNOWN_BELOW:
        ev: dict[str, Any] = {"dominant_phase": dominant_phase(candidate), "weak": [n for n, _, _ in ranked]}
        probe = candidate.get("probe_launch") if _enqueue_stall(candidate) else None
        if probe and probe.get("wall_us"):
            # Neither blocked nor waiting for a CPU: the launch ran on one (the driver spinning), say how long
            ev.update(launch_oncpu_us=round(probe["oncpu_us"], 1), launch_wall_us=round(probe["wall_us"], 1))
        ranked.insert(0, ("unknown", UNKNOWN_BELOW, ev))
    return ranked


def _reconcile(found: list[Cause]) -> list[Cause]:
    """A driver operation or a garbage collection (the GIL) that overlapped the blocked time explains the
    lock wait: rank it above."""
    by = {n: (s, e) for n, s, e in found}
    for holder in ("driver_lock", "python_gc"):
        if holder in by and "lock_wait" in by:
            s, e = by[holder]
            lw = by["lock_wait"][0]
            if s <= lw:
                by[holder] = (min(0.99, lw + 0.05), {**e, "explains": "lock_wait"})
    return [(n, s, e) for n, (s, e) in by.items()]


def dominant_phase(candidate: dict) -> str | None:
    """Which phase of the oldest request's life took the longest (queue_wait, enqueue, complete_wait, reply)."""
    t = candidate.get("timings_us") or {}
    phases: dict[str, float] = {
        k: t[k] for k in ("queue_wait", "enqueue", "complete_wait", "reply") if t.get(k) is not None
    }
    return max(phases, key=phases.__getitem__) if phases else None


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f} s"
    return f"{v / 1e3:.1f} ms" if v >= 1000 else f"{v:.0f} us"


def evidence_text(cause: str, ev: dict) -> str:
    """One short line saying why a cause was ranked."""
    if cause == "driver_lock":
        ops = ev.get("ops") or []
        parts = [
            f"{o.get('name') or o['op']}{' ' + o['detail'] if o.get('detail') else ''}"
            f"{' on ' + o['thread'] if o.get('thread') else ''}"
            f"{' from ' + o['library'] if o.get('library') else ''} {_fmt_us(o.get('dur_us'))}"
            for o in ops[:2]
        ]
        more = f" +{ev.get('n_ops', len(ops)) - 2}" if ev.get("n_ops", len(ops)) > 2 else ""
        return f"{'; '.join(parts)}{more} (covers {ev.get('coverage', 0):.0%})"
    if cause == "python_gc":
        more = f" +{ev['n'] - 1}" if ev.get("n", 1) > 1 else ""
        return (
            f"generation {ev.get('generation')} collection on {ev.get('thread') or '?'} "
            f"{_fmt_us(ev.get('dur_us'))}{more} (covers {ev.get('coverage', 0):.0%})"
        )
    if cause == "lock_wait":
        return f"blocked {_fmt_us(ev.get('blocked_us'))} with {ev.get('vcsw')} voluntary switches"
    if cause == "cpu_preemption":
        bits = []
        if ev.get("runq_us") is not None:
            bits.append(f"run-queue {_fmt_us(ev['runq_us'])}, {ev.get('ivcsw', 0)} preemptions")
        bits.extend(ev.get("host") or ())
        return ", ".join(bits)
    if cause == "cpu_stolen":
        host = [
            f"host {name} {ev[key]:.1f}%"
            for key, name in (("host_steal_pct", "steal"), ("host_irq_pct", "interrupts"))
            if ev.get(key)
        ]
        return ", ".join(
            [f"off its CPU {_fmt_us(ev.get('stolen_us'))} with no switch (hypervisor or interrupts)", *host]
        )
    if cause == "throttling":
        clk = (
            f"SM {ev.get('sm_clock_mhz')}/{ev.get('sm_clock_max_mhz')} MHz" if ev.get("sm_clock_mhz") else ""
        )
        ratio = f"GPU time x{ev['gpu_ratio']}" if ev.get("gpu_ratio") else ""
        return ", ".join(x for x in (",".join(ev.get("reasons") or ()), clk, ratio) if x)
    if cause == "foreign_process":
        procs = ev.get("processes") or []
        return ", ".join(
            f"pid {p.get('pid')} {p.get('name', '')}".strip() if isinstance(p, dict) else f"pid {p}"
            for p in procs[:3]
        )
    if cause == "unknown":
        text = f"longest phase: {ev.get('dominant_phase') or '?'}"
        if ev.get("launch_wall_us"):
            text += f"; the launch was on a CPU {_fmt_us(ev['launch_oncpu_us'])} of {_fmt_us(ev['launch_wall_us'])}"
        return text
    return ""


def build_record(candidate: dict, causes: list[Cause], gpu: dict | None) -> dict:
    """The stall as logged, shown in status and counted in metrics (JSON-serialisable)."""
    t = candidate.get("timings_us") or {}
    return {
        "time": time.time(),
        "t_ns": candidate.get("t1_ns"),
        "worker_id": candidate.get("worker_id"),
        "pid": candidate.get("pid"),
        "gpu_index": (gpu or {}).get("index"),
        "gpu_uuid": (gpu or {}).get("uuid"),
        "kind": candidate.get("kind", []),
        "enqueue_us": t.get("enqueue"),
        "latency_us": t.get("latency"),
        "gpu_us": t.get("gpu"),
        "baseline_us": candidate.get("baseline_us"),
        "dominant_phase": dominant_phase(candidate),
        "cause": causes[0][0] if causes else "unknown",
        "driver_op": driver_op(causes),
        "summary": summarize(candidate, causes),
        "causes": [{"cause": n, "score": s, "evidence": e} for n, s, e in causes],
        "candidate": candidate,
    }


def driver_op(causes: list[Cause]) -> dict | None:
    """The operation a stall ranked `driver_lock` first is blamed on (the one overlapping it most): its
    name (the CUDA function where CUPTI named it, else the orchestrator's operation), operation, duration,
    thread, calling library (where CUPTI's callback could tell) and source; None for other causes."""
    if not causes or causes[0][0] != "driver_lock":
        return None
    ops = causes[0][2].get("ops") or []
    if not ops:
        return None
    o = ops[0]
    return {
        "name": o.get("name") or o["op"],
        "op": o["op"],
        "dur_us": o.get("dur_us"),
        "thread": o.get("thread", ""),
        "library": o.get("library", ""),
        "source": o.get("source", "own"),
    }


def summarize(candidate: dict, causes: list[Cause]) -> str:
    """One log line: what was slow, against which baseline, and the top-ranked cause with its evidence."""
    t = candidate.get("timings_us") or {}
    base = candidate.get("baseline_us") or {}
    what = []
    for kind in candidate.get("kind") or ():
        v, b = t.get(kind), base.get(kind)
        ratio = f", x{v / b:.0f} baseline" if v and b else ""
        what.append(f"{kind} {_fmt_us(v)}{ratio}")
    text = "; ".join(what)
    if causes:
        name, score, ev = causes[0]
        text += f" -> {name} ({score:.2f}): {evidence_text(name, ev)}"
    if candidate.get("journal_armed_now"):  # monitor.driver_journal = "auto" was off until this stall
        text += "; CUPTI journal armed now: the next stalls name the driver operation"
    return text


class StallLog:
    """Appends stall records to a JSON-lines file; keeps per-cause counts and the latest records.

    Thread-safe. A write error is logged once and the in-memory view keeps working. The file is rotated to
    `<name>.1` past `max_bytes` so an endless stall storm cannot fill the disk.
    """

    def __init__(self, path: Path, keep: int = 50, max_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.counts: dict[str, int] = {c: 0 for c in CAUSES}
        self.op_counts: dict[str, int] = {}  # driver_lock stalls by the operation's name
        self.total = 0
        self._latest: deque[dict] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._fh: Any = None
        self._broken = False

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            self.total += 1
            cause = record.get("cause", "unknown")
            self.counts[cause] = self.counts.get(cause, 0) + 1
            op = record.get("driver_op")
            if op:
                self.op_counts[op["name"]] = self.op_counts.get(op["name"], 0) + 1
            self._latest.append(record)
            if self._broken:
                return
            try:
                self._append(line)
            except OSError as exc:
                self._broken = True
                log.error(
                    "[stall] cannot write %s (%s): stalls stay visible in status and metrics only",
                    self.path,
                    exc,
                )

    def _append(self, line: str) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")  # kept open for appends
        if self._fh.tell() + len(line) > self.max_bytes:
            self._fh.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(line)
        self._fh.flush()

    def latest(self, n: int | None = None) -> list[dict]:
        with self._lock:
            items = list(self._latest)
        return items[-n:] if n else items

    def snapshot_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def snapshot_op_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.op_counts)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
