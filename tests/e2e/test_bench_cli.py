"""`orchestrator bench` as a user runs it, against CPU workers started by the test: a closed-loop sweep
written as JSON, CSV and a plot; an open-loop comparison of two targets; wrong replies reported as wrong; the
exit codes of a target that is not running (1) and of bad flags (2)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import DEMO_MODEL, cli, write_config

pytestmark = pytest.mark.timeout(120)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cpu_config(tmp: Path) -> Path:
    return write_config(
        tmp,
        {
            "workers": {"count": 2},
            "model": {"kind": "onnx", "path": str(DEMO_MODEL), "max_batch": 64},
            "transport": {"shm_mb": 16, "shm_max_lease_mb": 4},
        },
    )


def test_sweep_json_csv_plot_and_compare(short_tmp: Path, orchestrator_factory) -> None:
    cfg = cpu_config(short_tmp)
    orch = orchestrator_factory(cfg)
    out = short_tmp / "out.json"
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["bench", str(cfg), "--concurrency", "1,8", "--duration", "2", "--warmup", "0.5"]
    args += ["--json", str(out), "--csv", str(short_tmp / "out.csv")]
    args += ["--plot", str(short_tmp / "out.png")] if plot else []
    p = cli(*args, timeout=90)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "concurrency 8:" in p.stderr  # a line per finished point
    assert "concurrency" in p.stdout and "no GPU telemetry" in p.stdout  # the table and its notes

    doc = json.loads(out.read_text())
    assert doc["transport"] == "shared memory" and doc["reference"] == "engine" and doc["compare"] is None
    assert doc["model"]["inputs"] == [{"name": "features", "dtype": "float32", "shape": ["batch", 64]}]
    points = doc["points"]
    assert [pt["concurrency"] for pt in points] == [1, 8]
    for pt in points:
        assert pt["requests_per_s"] > 0 and pt["items_per_s"] > 0
        assert pt["latency_us"]["p50"] <= pt["latency_us"]["p99"] <= pt["latency_us"]["max"]
        assert pt["gpu_busy"] is None and pt["gpu_us_per_batch"] is None  # CPU workers
        assert pt["errors"] == {} and pt["wrong"] == 0 and pt["checked"] > 0 and pt["correct"]
        # The workers' telemetry over the same window: what they served is what the clients saw, give or
        # take a heartbeat of the same load at each end.
        tele = pt["telemetry"]
        assert tele["complete"] and pt["duration_s"] <= tele["window_s"] < pt["duration_s"] + 1.0
        served = sum(w["requests"] for w in tele["workers"].values())
        assert 0.7 * pt["requests"] < served < 1.5 * pt["requests"]
        assert pt["rows_per_batch"] >= 1 and pt["host_us_per_batch"] > 0 and pt["queue_us"]["p50"] > 0
    assert points[0]["rows_per_batch"] < points[1]["rows_per_batch"]  # 8 in flight: requests coalesce
    rows = list(csv.DictReader((short_tmp / "out.csv").open()))
    assert [r["concurrency"] for r in rows] == ["1", "8"] and float(rows[1]["items_per_s"]) > 0
    if plot:
        assert (short_tmp / "out.png").read_bytes()[:8] == PNG_MAGIC

    # Open loop, two client processes, frames, a run directory compared with the same orchestrator's config.
    cmp_out = short_tmp / "cmp.json"
    p = cli(
        "bench",
        str(orch.run_dir),
        "--compare",
        str(cfg),
        "--rate",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--processes",
        "2",
        "--no-shm",
        "--check",
        "--json",
        str(cmp_out),
        timeout=90,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(cmp_out.read_text())
    assert doc["target"] == str(orch.run_dir) and doc["compare"]["target"] == str(cfg)
    assert (
        doc["transport"] == "frames" and doc["reference"] == "engine"
    )  # the run dir's config, found via status
    for pt in (doc["points"][0], doc["compare"]["points"][0]):
        assert pt["mode"] == "open" and pt["rate"] == 200 and pt["concurrency"] is None
        assert 150 < pt["requests_per_s"] < 250 and pt["checked"] == pt["requests"]


def test_wrong_results_are_reported_not_counted(short_tmp: Path, orchestrator_factory) -> None:
    cfg = write_config(
        short_tmp,
        {
            "workers": {"count": 1},
            "model": {"kind": "synthetic", "item_shape": [16], "work": 3, "max_batch": 8},
        },
    )
    orchestrator_factory(cfg)
    # The reference is the synthetic engine run in the bench process with the config file as it reads now:
    # make it disagree with what the worker serves.
    text = cfg.read_text()
    assert "work = 3" in text
    cfg.write_text(text.replace("work = 3", "work = 4"))
    out = short_tmp / "out.json"
    p = cli(
        "bench", str(cfg), "--concurrency", "2", "--duration", "0.5", "--warmup", "0.2", "--json", str(out)
    )
    assert p.returncode == 1, p.stderr
    assert (
        p.stderr.splitlines()[-1]
        == "orchestrator: 1 point(s) returned wrong results (see `wrong` in the table)"
    )
    assert "WRONG" in p.stdout and "Traceback" not in p.stderr
    (pt,) = json.loads(out.read_text())["points"]
    assert pt["wrong"] > 0 and pt["wrong"] == pt["checked"]  # every checked reply (the default sample)
    assert pt["correct"] is False and pt["requests_per_s"] is None and pt["items_per_s"] is None
    assert pt["wrong_example"].startswith("y: ")


def test_exit_codes(short_tmp: Path) -> None:
    cfg = cpu_config(short_tmp)
    p = cli("bench", str(cfg), "--duration", "1")
    assert (
        p.returncode == 1 and p.stderr == f"orchestrator: no orchestrator is running in {short_tmp / 'run'}\n"
    )
    for args, message in (
        (["--concurrency", "0"], '--concurrency: expected a positive integer, got "0"'),
        (["--concurrency", "x"], '--concurrency: expected a positive integer, got "x"'),
        (["--rate", "-1"], '--rate: expected a positive number, got "-1"'),
        (
            ["--rate", "10", "--concurrency", "4"],
            "--rate (open loop) and --concurrency (closed loop) exclude",
        ),
    ):
        p = cli("bench", str(cfg), *args)
        assert p.returncode == 2 and p.stderr.startswith(f"orchestrator: {message}"), p.stderr
        assert p.stderr.count("\n") == 1 and not p.stdout
