"""`--plot FILE.png`: latency (p50 and p99) against throughput across the sweep, and GPU busy against
concurrency (or rate), one line per target. matplotlib is an optional extra, imported here only.

Runs in the CLI process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MISSING = "--plot needs matplotlib: pip install matplotlib (or the plot extra: pip install -e '.[plot]')"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require() -> None:
    """Raise PlotUnavailable (with MISSING) unless matplotlib can be imported: checked before a sweep."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(MISSING) from None


def plot(results: list[dict[str, Any]], path: str | Path, title: str | None = None) -> None:
    """Draw every target's sweep into one PNG (two panels)."""
    require()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax_lat, ax_gpu) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    open_loop = any(p["mode"] == "open" for r in results for p in r["points"])
    x_key = "rate" if open_loop else "concurrency"
    any_gpu = False
    wrong_notes: list[str] = []
    for i, result in enumerate(results):
        name = result["target"] if len(results) == 1 else f"{'AB'[i] if i < 2 else i}: {result['target']}"
        color = colors[i % len(colors)]
        good = [p for p in result["points"] if p["correct"] and p["latency_us"] and p["items_per_s"]]
        xs = [p["items_per_s"] for p in good]
        for q, style in (("p50", "-"), ("p99", "--")):
            ax_lat.plot(
                xs,
                [p["latency_us"][q] / 1e3 for p in good],
                style,
                marker="o",
                color=color,
                label=f"{name} {q}",
            )
        for p in good:
            ax_lat.annotate(
                f"{p[x_key]:g}",
                (p["items_per_s"], p["latency_us"]["p50"] / 1e3),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color=color,
            )
        wrong = [f"{p[x_key]:g}" for p in result["points"] if not p["correct"]]
        if wrong:
            wrong_notes.append(f"{name}: wrong results at {', '.join(wrong)} (not plotted)")
        gpu = [p for p in result["points"] if p["gpu_busy"] is not None]
        if gpu:
            any_gpu = True
            ax_gpu.plot(
                [p[x_key] for p in gpu],
                [100 * p["gpu_busy"] for p in gpu],
                marker="o",
                color=color,
                label=name,
            )
    ax_lat.set_xlabel("throughput (items/s)")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax_lat.yaxis.set_major_formatter(plain)
    ax_lat.yaxis.set_minor_formatter(plain)
    ax_lat.tick_params(axis="y", which="minor", labelsize=7)
    if wrong_notes:
        ax_lat.text(0.02, 0.98, "\n".join(wrong_notes), transform=ax_lat.transAxes, va="top", color="red")
    ax_lat.set_title(f"latency against throughput (labels: {'rate' if open_loop else 'concurrency'})")
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend(fontsize=8)
    ax_gpu.set_xlabel("offered rate (requests/s)" if open_loop else "concurrency (requests in flight)")
    ax_gpu.set_ylabel("GPU busy (%)")
    ax_gpu.set_title("GPU busy (mean over workers)")
    ax_gpu.grid(True, alpha=0.3)
    if any_gpu:
        if not open_loop:
            ax_gpu.set_xscale("log", base=2)
            ax_gpu.xaxis.set_major_formatter(plain)
        ax_gpu.set_ylim(0, 105)
        ax_gpu.legend(fontsize=8)
        missing = [r["target"] for r in results if all(p["gpu_busy"] is None for p in r["points"])]
        if missing:
            ax_gpu.text(0.02, 0.02, f"no GPU telemetry: {', '.join(missing)}", transform=ax_gpu.transAxes)
    else:
        ax_gpu.text(
            0.5,
            0.5,
            "no GPU telemetry\n(CPU workers)",
            ha="center",
            va="center",
            fontsize=14,
            transform=ax_gpu.transAxes,
        )
        ax_gpu.set_xticks([])
        ax_gpu.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
