"""`orchestrator bench` without processes: the result check, the telemetry window arithmetic, the inputs,
the report and plot, the flags' one-line errors, and the README's description of the command."""

from __future__ import annotations

import csv
import re
import shlex
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from orchestrator.cli import commands
from orchestrator.cli.bench import check, inputs, report, telemetry
from orchestrator.cli.bench.load import PointLoad, PoolSpec, _Point
from orchestrator.cli.bench.sweep import Settings, make_point
from orchestrator.common.errors import OverloadedError
from orchestrator.common.histogram import Histogram

ROOT = Path(__file__).resolve().parents[2]
CPU = str(ROOT / "configs" / "cpu.toml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- the check ------------------------------------------------------------------------------------------


def _reply(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((4, 16)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return {"logits": logits, "probs": probs.astype(np.float32)}


def test_a_matching_reply_passes_within_tolerance() -> None:
    want = _reply()
    got = {k: (v * (1 + 1e-5)).astype(np.float32) for k, v in want.items()}  # another batch's rounding
    assert check.compare(got, want) is None
    nan = {"y": np.array([[np.nan, 1.0]], np.float32)}
    assert check.compare({"y": nan["y"].copy()}, nan) is None  # NaN where the reference has NaN


@pytest.mark.parametrize(
    ("tamper", "expect"),
    [
        (lambda r: r["logits"].__setitem__((2, 5), r["logits"][2, 5] + 0.5), "logits: 1 of 64 values differ"),
        (lambda r: r.update(logits=r["logits"][::-1].copy()), "logits: "),  # rows of other requests
        (lambda r: r.update(probs=np.zeros_like(r["probs"])), "probs: 64 of 64 values differ"),
        (lambda r: r.update(probs=r["probs"][:3]), "probs: shape [3, 16], expected [4, 16]"),
        (lambda r: r.pop("probs"), "output 'probs' missing"),
        (lambda r: r.update(probs=r["probs"].astype(np.float64)), "probs: dtype float64, expected float32"),
        (lambda r: r["logits"].__setitem__((0, 0), np.nan), "logits: 1 of 64 values differ (max |diff| nan)"),
    ],
)
def test_a_tampered_reply_is_caught(tamper, expect: str) -> None:
    want = _reply()
    got = {k: v.copy() for k, v in want.items()}
    tamper(got)
    why = check.compare(got, want)
    assert why is not None and why.startswith(expect), why


def test_integers_compare_exactly_and_tolerances_can_be_set() -> None:
    want = {"ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    got = {"ids": want["ids"].copy()}
    assert check.compare(got, want) is None
    got["ids"][1, 2] += 1
    assert check.compare(got, want) == "ids: 1 of 6 values differ (max |diff| 1)"
    y = {"y": np.array([1.0], np.float32)}
    assert check.compare({"y": np.array([1.005], np.float32)}, y) is None
    assert check.compare({"y": np.array([1.005], np.float32)}, y, rtol=1e-4, atol=0) is not None


def test_the_check_plan_samples_every_request_of_the_cycle_alike() -> None:
    plan = check.check_plan(4, 5)
    picked = [k for k in range(200) if plan(k)]
    assert len(picked) == 50
    assert sorted({k % 5 for k in picked}) == [0, 1, 2, 3, 4]
    assert all(check.check_plan(1, 5)(k) for k in range(10))
    assert not any(check.check_plan(0, 5)(k) for k in range(10))


def test_references_come_from_the_engine_or_the_first_reply() -> None:
    spec = inputs.ModelSpec((("features", np.dtype(np.float32), (64,)),), (), 64)
    pool = inputs.random_inputs(spec, 2, {}, count=3)
    engine, why = check.engine_reference(CPU, spec)
    assert engine is not None and "ONNX Runtime" in why
    refs, kind = check.references(pool, engine, lambda req: pytest.fail("no request is needed"))
    assert kind == "engine" and refs[0]["probs"].shape == (2, 16)
    firsts = iter([{"y": np.ones(1)}, {"y": np.zeros(1)}, {"y": np.ones(1)}])
    refs, kind = check.references(pool, None, lambda req: next(firsts))
    assert kind == "first reply" and [r["y"][0] for r in refs] == [1, 0, 1]
    assert check.engine_reference(None, spec)[0] is None
    other = inputs.ModelSpec((("x", np.dtype(np.float32), (64,)),), (), 64)
    engine, why = check.engine_reference(CPU, other)
    assert engine is None and "inputs differ" in why


def test_a_point_with_wrong_results_has_no_throughput() -> None:
    load = PointLoad(seconds=2.0, ok=100, rows=100, sent=110, checked=10, wrong=3, wrong_example="probs: ...")
    load.latencies_us = np.array([100.0, 200.0, 300.0])
    p = make_point("concurrency", 4, Settings(), load, {})
    assert p["requests_per_s"] is None and p["items_per_s"] is None and p["correct"] is False
    assert p["wrong"] == 3 and p["checked"] == 10 and p["latency_us"]["p50"] == 200.0
    assert "WRONG" in report.summary(p)
    good = make_point("concurrency", 4, Settings(), PointLoad(seconds=2.0, ok=100, rows=400), {})
    assert good["requests_per_s"] == 50.0 and good["items_per_s"] == 200.0 and good["correct"]


class _FakeClient:
    """Client.submit() answered at once: `answer(inputs)` is the reply, or an exception to fail with."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def submit(self, inputs):
        fut: Future = Future()
        out = self.answer(inputs)
        if isinstance(out, Exception):
            fut.set_exception(out)
        else:
            fut.set_result(out)
        return fut


def _client_loop(answer, references, seconds: float = 0.2, **cmd) -> dict:
    """One client process's point, run in this thread against a fake client."""
    x = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
    spec = PoolSpec("unused", [x], references=references, check_every=1)
    now = time.monotonic()
    cmd = {"t_begin": now, "t_start": now, "t_end": now + seconds, "grace_s": 0.0, "concurrency": 2, **cmd}
    return _Point(_FakeClient(answer), spec, cmd, SimpleNamespace(value=0), [0], 0).run()


def test_the_client_loop_counts_wrong_replies_as_wrong_not_as_throughput() -> None:
    right = {"y": np.ones((2, 4), np.float32)}
    r = _client_loop(lambda inputs: {"y": right["y"].copy()}, [right])
    assert r["ok"] > 0 and r["wrong"] == 0 and r["checked"] == r["ok"] and r["rows"] == 2 * r["ok"]
    assert len(r["lat"]) == 8 * r["ok"]  # one float64 latency per counted reply
    r = _client_loop(lambda inputs: {"y": np.zeros((2, 4), np.float32)}, [right])
    assert r["wrong"] > 0 and r["wrong"] == r["checked"] and r["ok"] == 0 and r["lat"] == b""
    assert r["wrong_example"] == "y: 8 of 8 values differ (max |diff| 1)"
    r = _client_loop(lambda inputs: OverloadedError("full"), [right])
    assert r["errors"]["OverloadedError"] > 0 and r["ok"] == r["checked"] == 0 and r["fatal"] is None


def test_the_open_loop_keeps_its_schedule() -> None:
    right = {"y": np.ones((2, 4), np.float32)}
    r = _client_loop(lambda inputs: {"y": right["y"].copy()}, [right], seconds=0.5, rate=200.0, phase=0.0)
    assert 90 <= r["sent"] <= 101 and r["ok"] >= 90  # 100 due in the window


# --- telemetry --------------------------------------------------------------------------------------------


def _hist(values: list[float]) -> dict:
    h = Histogram()
    for v in values:
        h.record(v)
    return h.to_wire()


def _snap(
    t: float, batches: int, rows: int, busy_ns: int, gpu: list[float], pid: int = 10, **extra
) -> telemetry.Snapshot:
    view = {
        "requests_total": rows,
        "items_total": rows,
        "batches_total": batches,
        "gpu_busy_ns_total": busy_ns,
        "enqueue_over_1ms_total": extra.get("over", 0),
        "reported_s_total": extra.get("reported", t),
        "report_age_s": extra.get("age", 0.1),
        "stall_causes": extra.get("stalls", {}),
        "failures_by_code": extra.get("failures", {}),
        "hist_total": {
            "gpu_us": _hist(gpu),
            "enqueue_us": _hist([50.0] * batches),
            "queue_us": _hist([20.0] * rows),
            "latency_us": _hist([300.0] * rows),
        },
    }
    worker = {"id": "w0", "state": "ready", "pid": pid, "batches": batches, "host_ns": batches * 80_000}
    return telemetry.Snapshot(t, {"workers": [worker], "monitor": {"workers": {"w0": view}}})


def test_the_window_differences_cumulative_counters() -> None:
    before = _snap(10.0, 100, 400, 50_000_000, [100.0] * 100, stalls={"unknown": 1}, failures={"20": 2})
    after = _snap(
        12.0,
        600,
        2400,
        1_550_000_000,
        [100.0] * 100 + [300.0] * 500,
        over=3,
        stalls={"unknown": 1, "driver_lock": 2},
        failures={"20": 5, "22": 1},
    )
    w = telemetry.window(before, after)
    assert w["gpu_busy"] == pytest.approx(0.75)  # 1.5 s busy of 2 s reported
    assert w["gpu_us_per_batch"] == pytest.approx(300.0)  # only the window's 500 batches
    assert w["host_us_per_batch"] == pytest.approx(80.0)
    assert w["rows_per_batch"] == pytest.approx(4.0) and w["batches"] == 500
    assert w["queue_us"]["mean"] == pytest.approx(20.0) and w["queue_us"]["p50"] == pytest.approx(20, rel=0.1)
    assert w["stalls"] == {"driver_lock": 2} and w["launches_over_1ms"] == 3
    assert w["worker_failures"] == {"OVERLOADED": 3, "DEADLINE_EXCEEDED": 1}
    assert w["telemetry"]["window_s"] == pytest.approx(2.0) and w["telemetry"]["restarted"] == []


def test_cpu_workers_have_no_gpu_figures_and_a_restart_drops_host_time() -> None:
    before = _snap(10.0, 100, 400, 0, [])
    after = _snap(12.0, 600, 2400, 0, [], pid=11)  # restarted during the point
    w = telemetry.window(before, after)
    assert w["gpu_busy"] is None and w["gpu_us_per_batch"] is None
    assert w["host_us_per_batch"] is None and w["telemetry"]["restarted"] == ["w0"]
    assert w["rows_per_batch"] == pytest.approx(4.0)
    empty = telemetry.window(telemetry.Snapshot(0, {}), telemetry.Snapshot(0, {}), False)
    assert (
        empty["gpu_busy"] is None and empty["rows_per_batch"] is None and empty["launches_over_1ms"] is None
    )


def test_freshness_needs_a_report_after_the_window_from_every_ready_worker() -> None:
    snap = _snap(12.0, 1, 1, 0, [], age=0.3)
    assert telemetry.fresh(snap, 11.6) and not telemetry.fresh(snap, 11.8)
    snap.status["workers"][0]["state"] = "backoff"  # a worker that is not serving does not hold it up
    assert telemetry.fresh(snap, 11.8)


def test_hist_delta_keeps_only_the_new_samples() -> None:
    a, b = Histogram(), Histogram()
    for v in (10.0, 10.0):
        a.record(v)
        b.record(v)
    for v in (1000.0, 1000.0, 1000.0):
        b.record(v)
    d = telemetry.hist_delta(a, b)
    assert d.count == 3 and d.mean() == pytest.approx(1000.0) and d.quantile(0.01) > 800


# --- inputs ------------------------------------------------------------------------------------------------


SEQ = inputs.ModelSpec(
    (("input_ids", np.dtype(np.int64), ("seq",)), ("attention_mask", np.dtype(np.int64), ("seq",))),
    (("last_hidden_state", np.dtype(np.float32), ("seq", 16)),),
    64,
    (inputs.Dim("seq", 1, 128, (32, 64, 128)),),
)


def test_random_inputs_follow_the_specs_and_dims() -> None:
    dims = inputs.resolve_dims(SEQ, {})
    assert dims == {"seq": 128}
    pool = inputs.random_inputs(SEQ, 3, inputs.resolve_dims(SEQ, {"seq": 40}), seed=1)
    assert len(pool) == inputs.MAX_DISTINCT
    ids, mask = pool[0]["input_ids"], pool[0]["attention_mask"]
    assert ids.shape == (3, 40) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < inputs.INT_HIGH
    assert (mask == 1).all()
    assert not np.array_equal(pool[0]["input_ids"], pool[1]["input_ids"])
    for bad, msg in (
        ({"seq": 200}, "outside the model's range 1..128"),
        ({"len": 4}, "no dynamic dimension 'len'"),
    ):
        with pytest.raises(inputs.InputError, match=msg):
            inputs.resolve_dims(SEQ, bad)
    with pytest.raises(inputs.InputError, match="NAME=SIZE"):
        inputs.parse_dims(["seq=0"])


def test_npz_inputs(tmp_path: Path) -> None:
    spec = inputs.ModelSpec((("features", np.dtype(np.float32), (64,)),), (), 64)
    path = tmp_path / "in.npz"
    np.savez(path, np.arange(10 * 64, dtype=np.float64).reshape(10, 64))  # any name for a one-input model
    pool = inputs.npz_inputs(path, spec, 4)
    assert len(pool) == 2 and pool[1]["features"].dtype == np.float32 and pool[1]["features"][0, 0] == 256
    np.savez(path, features=np.zeros((10, 32), np.float32))
    with pytest.raises(inputs.InputError, match="the model takes"):
        inputs.npz_inputs(path, spec, 4)
    np.savez(path, features=np.zeros((2, 64), np.float32))
    with pytest.raises(inputs.InputError, match="fewer than --rows 4"):
        inputs.npz_inputs(path, spec, 4)
    path.write_text("not a zip")
    with pytest.raises(inputs.InputError, match="cannot read it"):
        inputs.npz_inputs(path, spec, 4)


# --- report and plot -------------------------------------------------------------------------------------


def _result(target: str, gpu: bool = False) -> dict:
    points = []
    for c, rps in ((1, 1000.0), (8, 4000.0)):
        load = PointLoad(seconds=2.0, ok=int(rps * 2), rows=int(rps * 2), sent=int(rps * 2), checked=5)
        load.latencies_us = np.linspace(100 * c, 300 * c, 50)
        p = make_point("concurrency", c, Settings(), load, {})
        if gpu:
            p["gpu_busy"] = 0.2 * c / 8 + 0.5
        points.append(p)
    return {"target": target, "transport": "frames", "reference_source": "engine", "points": points}


def test_csv_and_table(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    report.write_csv(out, [_result("a"), _result("b")])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and list(rows[0]) == report.CSV_COLUMNS
    assert (
        rows[2]["target"] == "b" and float(rows[1]["requests_per_s"]) == 4000.0 and rows[0]["gpu_busy"] == ""
    )
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(report.table(_result("a")))
    text = console.export_text()
    assert "concurrency" in text and "4,000" in text
    assert any("no GPU telemetry" in n for n in report.notes(_result("a")))


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from orchestrator.cli.bench.plot import plot

    for results, name in (([_result("a")], "one.png"), ([_result("a", gpu=True), _result("b")], "two.png")):
        plot(results, tmp_path / name, title="test")
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


# --- flags ---------------------------------------------------------------------------------------------------


def _bench(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as ei:
        commands.main(["bench", *args])
    return int(ei.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "0"], '--concurrency: expected a positive integer, got "0"'),
        (
            ["--concurrency", "1,x"],
            '--concurrency: expected positive integers separated by commas, got "1,x"',
        ),
        (["--rate", "-1"], '--rate: expected a positive number, got "-1"'),
        (["--rate", "nan"], '--rate: expected a positive number, got "nan"'),
        (["--rate", "5", "--concurrency", "2"], "--rate (open loop) and --concurrency (closed loop) exclude"),
        (["--rows", "2,3"], '--rows: expected one value, got "2,3"'),
        (["--duration", "0"], '--duration: expected a positive number, got "0"'),
        (["--warmup", "-1"], '--warmup: expected a non-negative number, got "-1"'),
        (["--processes", "0"], '--processes: expected a positive integer, got "0"'),
        (["--check", "x"], '--check: expected a non-negative integer, got "x"'),
        (["--dim", "seq"], '--dim: expected NAME=SIZE with a positive size, got "seq"'),
        (["--client-cpus", "a-b"], "--client-cpus: expected core numbers"),
        (["--server-key", CPU], "--server-key and --client-key go together"),
        (["--inputs", "/nonexistent.npz"], "--inputs: no such file: /nonexistent.npz"),
        (
            ["--json", "/nonexistent/out.json"],
            "--json: the directory of /nonexistent/out.json does not exist",
        ),
        (["--compare", "/nonexistent.toml"], "no such config file or run directory: /nonexistent.toml"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(capsys, args: list[str], message: str) -> None:
    code, err = _bench(capsys, CPU, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"orchestrator: {message}"), err


def test_plot_without_matplotlib_is_a_usage_error(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, err = _bench(capsys, CPU, "--plot", "/tmp/out.png")
    assert code == 2 and err.count("\n") == 1 and err.startswith("orchestrator: --plot needs matplotlib")


# --- the README ---------------------------------------------------------------------------------------------


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Benchmarking your model") : text.index("## Benchmarks\n")]


def test_the_readme_examples_use_real_flags_and_every_flag_is_documented() -> None:
    section = _readme_section()
    lines = [
        ln.split("  #")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", section, re.S)
        for ln in block.splitlines()
        if ln.startswith("orchestrator bench")
    ]
    assert len(lines) >= 3
    parser = commands.build_parser()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])  # exits 2 on an unknown flag
        assert args.func is commands.cmd_bench
        commands._bench_settings(args)  # every value acceptable
    sub = next(a for a in parser._actions if a.dest == "cmd").choices["bench"]  # type: ignore[union-attr]
    flags = [
        opt
        for action in sub._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    ]
    missing = [f for f in flags if f not in section]
    assert not missing, f"flags not in the README's bench section: {missing}"
    keys = {
        "requests_per_s",
        "items_per_s",
        "latency_us",
        "gpu_busy",
        "gpu_us_per_batch",
        "host_us_per_batch",
    }
    keys |= {
        "rows_per_batch",
        "queue_us",
        "stalls",
        "launches_over_1ms",
        "errors",
        "wrong",
        "server_latency_us",
    }
    assert not [k for k in keys if f"`{k}`" not in section]
