"""Renders `orchestrator status` with rich: one row per worker and its GPU, a host line, latest stalls.

Runs in the CLI process (`orchestrator status`, `--once`, or the live loop); it only formats the status
dict the supervisor returns, so it never touches NVML, CUDA or the workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from orchestrator.supervisor.monitor.stalls import evidence_text

log = logging.getLogger(__name__)

_STATE_STYLE = {
    "ready": "bold green",
    "serving": "bold green",
    "running": "bold green",
    "spawning": "yellow",
    "starting": "yellow",
    "loading": "yellow",
    "warming": "yellow",
    "restarting": "yellow",
    "backoff": "yellow",
    "draining": "yellow",
    "stopping": "yellow",
    "dead": "bold red",
    "failed": "bold red",
    "crashed": "bold red",
    "quarantined": "bold red",
    "hung": "bold red",
    "stopped": "dim",
}
_BAD_REASONS = {"hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake", "reliability"}
_CAUSE_STYLE = {
    "driver_lock": "magenta",
    "python_gc": "magenta",
    "lock_wait": "magenta",
    "cpu_preemption": "yellow",
    "cpu_stolen": "yellow",
    "throttling": "red",
    "foreign_process": "red",
    "unknown": "dim",
}


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _rate(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v / 1000:.2f}s"
    return f"{v:.1f}ms" if v >= 1 else f"{v * 1000:.0f}us"


def _us(v: float | None) -> str:
    return "-" if v is None else _ms(v / 1000.0)


def _state(state: str | None) -> Text:
    s = state or "?"
    return Text(s, style=_STATE_STYLE.get(s.lower(), "white"))


def _clock(g: dict) -> Text:
    cur, mx = g.get("sm_clock_mhz"), g.get("sm_clock_max_mhz")
    if cur is None:
        return Text("-")
    idle = "gpu_idle" in (g.get("throttle_reasons") or ())
    low = mx and not idle and cur < 0.9 * mx
    return Text(f"{cur}/{mx or '?'}", style="yellow" if low else "")


def _power(g: dict) -> Text:
    p, lim = g.get("power_w"), g.get("power_limit_w")
    if p is None:
        return Text("-")
    near = lim and p >= 0.95 * lim
    return Text(f"{p:.0f}/{lim:.0f}W" if lim else f"{p:.0f}W", style="yellow" if near else "")


def _temp(g: dict) -> Text:
    t, slow = g.get("temp_c"), g.get("temp_slowdown_c")
    if t is None:
        return Text("-")
    style = "bold red" if slow and t >= slow - 5 else ("yellow" if slow and t >= slow - 15 else "")
    return Text(f"{t}C", style=style)


def _reasons(g: dict) -> Text:
    names = [r for r in (g.get("throttle_reasons") or ()) if r != "gpu_idle"]
    out = Text()
    if not names:
        out.append("idle" if "gpu_idle" in (g.get("throttle_reasons") or ()) else "-", style="dim")
    for i, name in enumerate(names):
        if i:
            out.append(",")
        out.append(name, style="bold red" if name in _BAD_REASONS else "yellow")
    if g.get("foreign_pids"):
        out.append(f" +{len(g['foreign_pids'])} foreign", style="bold red")
    return out


def _stalls(m: dict) -> Text:
    n = m.get("stalls") or 0
    if not n:
        return Text("0", style="dim")
    cause = m.get("last_stall_cause") or "?"
    return Text.assemble(f"{n} ", (cause, _CAUSE_STYLE.get(cause, "")))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _shm(w: dict) -> Text:
    """Share of this worker process's requests that came through shared memory (since it started)."""
    shm = w.get("shm")
    if not shm:
        return Text("-", style="dim")  # a supervisor without shared-memory status
    if not shm.get("enabled"):
        return Text("off", style="dim")
    total = w.get("requests") or 0
    if total <= 0:
        return Text("-")
    pct = 100.0 * (shm.get("requests") or 0) / total
    if 0 < pct < 1:
        return Text("<1%")
    return Text(f"{min(100, int(pct))}%")  # floored: 100% only when every request used it


def cores(cpus: list[int] | None) -> str:
    """A CPU list as ranges ("0-3,8"); "any" for an unpinned process."""
    if not cpus:
        return "any"
    cpus = sorted(cpus)
    out, start = [], cpus[0]
    for prev, cur in zip(cpus, [*cpus[1:], None], strict=True):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur  # type: ignore[assignment]
    return ",".join(out)


def _worker_table(status: dict) -> Table:
    mon = status.get("monitor") or {}
    gpus = {g.get("uuid"): g for g in mon.get("gpus") or ()}
    metrics = mon.get("workers") or {}
    t = Table(expand=False, header_style="bold", pad_edge=False, box=None, padding=(0, 1))
    for name, justify in (
        ("worker", "left"),
        ("device", "left"),
        ("state", "left"),
        ("pid", "right"),
        ("cores", "left"),
        ("rst", "right"),
        ("up", "right"),
        ("req/s", "right"),
        ("items/s", "right"),
        ("shm", "right"),
        ("p50", "right"),
        ("p99", "right"),
        ("q/infl", "right"),
        ("busy", "right"),
        ("SM MHz", "right"),
        ("power", "right"),
        ("temp", "right"),
        ("throttle", "left"),
        ("faults", "right"),
        ("stalls", "left"),
    ):
        t.add_column(name, justify="right" if justify == "right" else "left", no_wrap=True)
    for w in status.get("workers") or ():
        m = metrics.get(w.get("id"), {})
        g = gpus.get(w.get("gpu_uuid")) or {}
        queued = w.get("queued") if w.get("queued") is not None else m.get("queued")
        inflight = w.get("inflight") if w.get("inflight") is not None else m.get("inflight")
        faults = w.get("faults") if w.get("faults") is not None else m.get("faults")
        t.add_row(
            str(w.get("id", "?")),
            str(w.get("device") or "-"),
            _state(w.get("state")),
            str(w.get("pid") or "-"),
            cores(w.get("cpu_affinity")),
            str(w.get("restarts", 0)),
            _dur(w.get("uptime_s")),
            _rate(m.get("requests_per_s")),
            _rate(m.get("items_per_s")),
            _shm(w),
            _ms(m.get("latency_p50_ms")),
            _ms(m.get("latency_p99_ms")),
            f"{queued if queued is not None else '-'}/{inflight if inflight is not None else '-'}",
            _pct(m.get("gpu_busy_pct")),
            _clock(g),
            _power(g),
            _temp(g),
            _reasons(g) if g else Text("-"),
            Text(str(faults), style="bold red") if faults else Text(str(faults or 0), style="dim"),
            _stalls(m),
        )
    return t


def _engine_lines(status: dict) -> list[Text]:
    """One line per GPU engine setup (workers that share it are listed together): what runs, CUDA graphs
    on or off (and why), the module loading mode, the driver journal (cupti, or own and why); problems in
    red."""
    groups: dict[tuple, list[str]] = {}
    live = (status.get("monitor") or {}).get("workers") or {}
    for w in status.get("workers") or ():
        eng = w.get("engine") or {}
        if not eng or eng.get("device") in (None, "cpu"):
            continue
        facts = eng.get("driver_journal") or {}  # as at READY; the worker's reports say what it is now
        m = live.get(w.get("id")) or {}
        graphs = eng.get("graphs") or ("on" if eng.get("cuda_graphs") else "off")
        key = (
            eng.get("kind"),
            eng.get("program"),
            graphs,
            eng.get("graphs_captured"),
            eng.get("capture_error"),
            w.get("module_loading") or eng.get("module_loading"),
            m.get("journal_mode") or facts.get("mode"),
            m.get("journal_note") or facts.get("note"),
        )
        groups.setdefault(key, []).append(str(w.get("id")))
    lines = []
    for (kind, program, graphs, captured, error, loading, journal, note), ids in groups.items():
        line = Text(
            f"engine {kind}" + (f" ({program})" if program else "") + f" on {', '.join(ids)}: ", style="dim"
        )
        line.append(
            f"graphs {graphs}" + (f" ({captured})" if captured else ""),
            style="green" if graphs == "on" else "yellow",
        )
        if error:
            line.append(f": {error}", style="yellow")
        line.append("  module loading ")
        line.append(str(loading or "?"), style="green" if loading == "EAGER" else "bold red")
        if journal:  # which driver operations stall attribution can see
            line.append("  driver journal ")
            line.append(journal, style="green" if journal == "cupti" else "yellow")
            if note:  # own: why not CUPTI; cupti: on demand, or armed when and by what
                line.append(f" ({note})", style="dim" if journal == "cupti" else "yellow")
        lines.append(line)
    return lines


def _host_line(status: dict) -> Text:
    mon = status.get("monitor") or {}
    h = mon.get("host") or {}
    line = Text()
    line.append("host ", style="bold")
    line.append(f"CPU {_pct(h.get('cpu_pct'))}  mem {_pct(h.get('mem_pct'))}")
    if h.get("load1") is not None:
        line.append(f"  load {h['load1']:.2f}/{h.get('ncpu') or '?'}")
    if h.get("psi_cpu_some_avg10") is not None:
        line.append(f"  cpu pressure {h['psi_cpu_some_avg10']:.1f}%")
    if h.get("steal_pct"):  # a virtual machine whose host gave our CPUs away: shown only when it happened
        line.append(f"  steal {h['steal_pct']:.1f}%", style="yellow")
    mps = status.get("mps")
    line.append("  MPS ")
    line.append("on" if mps and mps.get("enabled", True) else "off", style="cyan" if mps else "dim")
    if mps and mps.get("pipe_dir"):
        line.append(f" ({mps['pipe_dir']})", style="dim")
    line.append("  NVML ")
    if mon.get("nvml"):
        line.append("on", style="green")
    else:
        line.append(f"off ({mon.get('nvml_reason') or 'unavailable'})", style="dim")
    if mon.get("metrics_port"):
        line.append(f"  http {mon.get('http_host') or '127.0.0.1'}:{mon['metrics_port']}")
        if mon.get("metrics_error"):
            line.append(f" ({mon['metrics_error']})", style="red")
    return line


def _stall_table(stalls: list[dict], limit: int = 5) -> Table:
    t = Table(
        expand=False,
        header_style="bold",
        box=None,
        padding=(0, 1),
        title="latest stalls",
        title_justify="left",
        title_style="bold",
    )
    for name in ("time", "worker", "gpu", "kind", "enqueue", "latency", "cause", "evidence", "then"):
        t.add_column(name, no_wrap=name != "evidence", overflow="ellipsis")
    for r in list(stalls)[-limit:][::-1]:
        causes = r.get("causes") or [{"cause": r.get("cause", "unknown"), "score": 0, "evidence": {}}]
        top = causes[0]
        when = datetime.fromtimestamp(r["time"]).strftime("%H:%M:%S") if r.get("time") else "-"
        t.add_row(
            when,
            str(r.get("worker_id")),
            str(r.get("gpu_index") if r.get("gpu_index") is not None else "-"),
            "+".join(r.get("kind") or ()),
            _us(r.get("enqueue_us")),
            _us(r.get("latency_us")),
            Text(f"{top['cause']} {top.get('score', 0):.2f}", style=_CAUSE_STYLE.get(top["cause"], "")),
            evidence_text(top["cause"], top.get("evidence") or {}),
            ", ".join(f"{c['cause']} {c.get('score', 0):.2f}" for c in causes[1:3]),
        )
    return t


def render(status: dict) -> RenderableType:
    """One frame of the status view."""
    mon = status.get("monitor") or {}
    head = Text.assemble(
        ("orchestrator ", "bold"),
        (str(status.get("name", "?")), "bold cyan"),
        f"  pid {status.get('pid', '-')} on cores {cores(status.get('cpu_affinity'))}"
        f"  up {_dur(status.get('uptime_s'))}  ",
        (str(status.get("run_dir", "")), "dim"),
    )
    parts: list[RenderableType] = [head, _worker_table(status), *_engine_lines(status), _host_line(status)]
    counts = {k: v for k, v in (mon.get("stall_counts") or {}).items() if v}
    if counts:
        parts.append(
            Text("stalls by cause: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), style="bold")
        )
    ops = mon.get("stall_driver_ops") or {}
    if ops:
        parts.append(
            Text(
                "driver_lock by operation: "
                + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda x: -x[1]))
            )
        )
    if mon.get("stalls"):
        parts.append(_stall_table(mon["stalls"]))
    return Group(*parts)


def render_unreachable(error: BaseException, last: dict | None) -> RenderableType:
    msg = Text.assemble(("supervisor not answering", "bold red"), f": {error}")
    if last is None:
        return Panel(msg, border_style="red")
    return Group(Panel(msg, border_style="red"), Text("last known state:", style="dim"), render(last))


def live(fetch: Callable[[], dict], refresh_hz: float = 4.0, console: Console | None = None) -> None:
    """Redraw the status `refresh_hz` times a second until Ctrl-C; fetch errors show, never crash."""
    period = 1.0 / max(0.1, refresh_hz)
    last: dict | None = None
    with Live(console=console or Console(), auto_refresh=False, screen=False) as view:
        try:
            while True:
                t0 = time.monotonic()
                try:
                    status = fetch()
                except Exception as exc:  # the supervisor may be restarting, gone, or slow
                    log.debug("status fetch failed: %s", exc)
                    frame = render_unreachable(exc, last)
                else:
                    last = status
                    frame = render(status)
                view.update(frame, refresh=True)
                time.sleep(max(0.0, period - (time.monotonic() - t0)))
        except KeyboardInterrupt:
            pass
