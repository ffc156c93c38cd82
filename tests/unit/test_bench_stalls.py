"""scripts/bench_stalls.py's pure parts: scenario configs, host time per batch, attribution with the
operation named, and the checks' wording."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest

from scripts import bench_stalls as bs


def _args(**kw: Any) -> Namespace:
    base = dict(
        cpu_smoke=False,
        gpu=0,
        item=1024,
        work=4597,
        rows=64,
        stall_factor=8.0,
        stall_min_us=1000,
        period_ms=200,
        pinned_mib=64,
        device_mib=256,
        register_mib=64,
        library_mib=48,
        journal="cupti",
    )
    base.update(kw)
    return Namespace(**base)


def _rec(cause: str, op: str | None = None, name: str = "x", enqueue_us: float = 2000.0) -> dict[str, Any]:
    return {
        "kind": ["enqueue"],
        "enqueue_us": enqueue_us,
        "cause": cause,
        "driver_op": None if op is None else {"name": name, "op": op, "dur_us": 1500.0, "source": "cupti"},
    }


def test_sections_journal_and_injection_sizes(tmp_path: Path) -> None:
    args = _args()
    clean = bs.scenario_sections(args, "clean", tmp_path)
    own = bs.scenario_sections(args, "clean-own", tmp_path)
    assert clean["monitor"]["driver_journal"] == "cupti" and "debug" not in clean
    assert own["monitor"]["driver_journal"] == "own" and "debug" not in own
    reg = bs.scenario_sections(args, "host_register", tmp_path)
    assert reg["debug"] == {"inject": "host_register", "inject_period_ms": 200, "inject_bytes": 64 << 20}
    assert bs.scenario_sections(args, "library_alloc", tmp_path)["debug"]["inject_bytes"] == 48 << 20
    assert "inject_bytes" not in bs.scenario_sections(args, "lazy_module", tmp_path)["debug"]
    for scenario in bs.GPU_SCENARIOS:  # every scenario's config loads
        bs.write_config(
            tmp_path / f"{scenario}.toml", bs.scenario_sections(args, scenario, tmp_path / scenario)
        )


def test_host_per_batch() -> None:
    before = {"pid": 7, "batches": 100, "host_ns": 1_000_000}
    after = {"pid": 7, "batches": 300, "host_ns": 5_000_000}
    assert bs.host_per_batch(before, after)["host_us_per_batch"] == 20.0
    restarted = bs.host_per_batch(before, {**after, "pid": 8})
    assert restarted["restarted"] and restarted["host_us_per_batch"] is None
    assert bs.host_per_batch(before, before)["host_us_per_batch"] is None


def test_analyse_right_op() -> None:
    records = [
        _rec("driver_lock", "host_register", "cuMemHostRegister_v2"),
        _rec("driver_lock", "host_unregister", "cuMemHostUnregister"),
        _rec("driver_lock", "device_alloc", "cuMemAlloc_v2"),  # driver_lock, wrong operation
        _rec("cpu_preemption"),
        _rec("driver_lock", "host_register", enqueue_us=500.0),  # not over 1 ms: not flagged
        {"kind": ["latency"], "enqueue_us": 50.0, "latency_us": 9000.0, "cause": "unknown"},
    ]
    a = bs.analyse(records, 4, "host_register")
    assert a["flagged_over_1ms"] == 4 and a["recall"] == 1.0
    assert a["driver_lock_first"] == 3 and a["driver_lock_right_op"] == 2 and a["right_op_share"] == 0.5
    assert a["ops_by_name"] == {
        "(none)": 1,
        "cuMemAlloc_v2": 1,
        "cuMemHostRegister_v2": 1,
        "cuMemHostUnregister": 1,
    }
    assert a["expected_ops"] == ["host_register", "host_unregister"]
    assert bs.analyse(records, 4, "library_alloc")["driver_lock_right_op"] == 1
    assert bs.analyse([], 0, "lazy_module")["right_op_share"] is None
    assert bs.compact(records[0], "host_register", True)["driver_op"]["name"] == "cuMemHostRegister_v2"


def _result(scenario: str, over: int, records: list[dict[str, Any]], host: float | None, mode: str | None):
    r: dict[str, Any] = {
        "scenario": scenario,
        "ok": True,
        "batches": 1000,
        "enqueue_over_1ms": over,
        "host_us_per_batch": host,
        "journal_configured": "own" if scenario == "clean-own" else "auto",
        "driver_journal": None if mode is None else {"mode": mode, "note": None},
    }
    r.update(bs.analyse(records, over, scenario))
    return r


def test_checks() -> None:
    good = [_rec("driver_lock", "lazy_load", "cuModuleGetFunction")] * 19 + [_rec("unknown")]
    results = [
        {
            **_result("clean", 0, [], 20.4, "cupti"),
            "journal_note_after": "CUPTI on demand: attached at the first launch blocked like a lock wait, ...",
        },
        _result("clean-own", 0, [], 20.0, "own"),
        {
            **_result("lazy_module", 20, good, 21.0, "cupti"),
            "journal_note_after": "CUPTI armed at 02:38:59 by a launch blocked 1.0 ms; it stays armed",
        },
        _result("host_register", 0, [], 20.0, "cupti"),
        _result("library_alloc", 10, [_rec("driver_lock", "device_alloc")] * 8, 20.0, "cupti"),
    ]
    out = bs.checks(results, cpu=True)
    text = "\n".join(out)
    assert "clean: 0 stall(s) flagged, journal auto, CUPTI not armed -> PASS" in text
    assert "clean-own: 0 stall(s) flagged, journal own -> PASS" in text
    assert any(line.startswith("lazy_module:") and line.endswith("-> PASS") for line in out)  # 100% / 95%
    assert any(
        line.startswith("host_register:") and bs.NO_STALL in line and "PASS" not in line for line in out
    )
    assert any(line.startswith("library_alloc:") and line.endswith("-> FAIL") for line in out)  # recall 80%
    assert "difference +0.40 us -> PASS" in text
    table = bs.table(
        [
            {
                **r,
                "stalls_by_cause": {},
                "load": {"throughput_rps": 1.0, "items_per_s": 1.0, "latency_us_p50": 1, "latency_us_p99": 2},
            }
            for r in results
        ]
    )
    assert "| lazy_module | auto, CUPTI armed at 02:38:59 |" in table and "19/20 (95.0%)" in table
    assert "| host_register | auto, CUPTI ? |" in table  # the live note was not read


def test_host_check_says_when_not_cupti() -> None:
    clean = _result("clean", 0, [], 22.0, "own")
    own = _result("clean-own", 0, [], 20.0, "own")
    (line,) = bs.host_check(clean, own)
    assert "difference +2.00 us -> FAIL" in line and "not a CUPTI on/off comparison" in line
    assert bs.host_check(clean, None) == []


def test_pairs_check_takes_the_median_of_paired_differences() -> None:
    pairs = [
        {"pair": 1, "ok": True, "diff_us": 8.5, "stalls": {"clean": 1, "clean-own": 0}},
        {"pair": 2, "ok": True, "diff_us": -0.4, "stalls": {"clean": 2, "clean-own": 3}},
        {"pair": 3, "ok": True, "diff_us": 0.6, "stalls": {"clean": 0, "clean-own": None}},
        {"pair": 4, "ok": False, "diff_us": None},
    ]
    line, clean, own = bs.pairs_check(pairs, 20.0)
    assert clean == "clean in the pairs: 3 stall(s) in 4 x 20 s (target: none)"
    assert own == "clean-own in the pairs: 3 stall(s) in 4 x 20 s (target: none)"
    assert line.startswith("host time per batch over 3 alternated pairs (20 s each): clean minus clean-own ")
    assert "median +0.60 us (each: +8.50, -0.40, +0.60) -> PASS (target: within 1 us)" in line
    assert bs.pairs_check([], 20.0) == []
    (line,) = bs.pairs_check([{"pair": 1, "ok": False, "diff_us": None}], 20.0)
    assert line.endswith("not measured (runs failed)")


def test_injection_overlap_counts_only_launches_an_injected_operation_overlapped(tmp_path: Path) -> None:
    path = tmp_path / "inject-w0.windows"
    path.write_text("1000 2000\n5000 6000\n\n")
    windows = bs.read_windows(path)
    assert windows == [(1000, 2000), (5000, 6000)]
    assert bs.read_windows(tmp_path / "missing.windows") is None

    def rec(l0: int, l1: int, cause: str, op: str | None = None) -> dict:
        return {
            "kind": ["enqueue"],
            "enqueue_us": 1500.0,
            "cause": cause,
            "driver_op": {"op": op} if op else None,
            "launch_t0_ns": l0,
            "launch_t1_ns": l1,
        }

    spun = {"wall_us": 1100.0, "oncpu_us": 1000.0, "runq_us": 0.0, "blocked_us": 100.0}
    records = [
        rec(1500, 2500, "driver_lock", "host_register"),  # inside the first operation: right
        {**rec(4000, 5100, "unknown"), "probe_launch": spun},  # overlaps the second's start, spun on a CPU
        rec(2500, 4000, "cpu_preemption"),  # between operations: the host's noise
        rec(6500, 7000, "unknown"),  # after both
        {**rec(5500, 5600, "unknown"), "enqueue_us": 900.0},  # not over 1 ms: not counted
    ]
    got = bs.injection_overlap(records, windows, "host_register")
    assert (got["operations"], got["flagged_over_1ms"], got["overlapping"], got["overlapping_right_op"]) == (
        2,
        4,
        2,
        1,
    )
    assert got["overlapping_right_share"] == 0.5
    assert got["not_overlapping_by_cause"] == {"cpu_preemption": 1, "unknown": 1}
    assert got["overlapping_wrong_by_cause"] == {"unknown": 1} and got["overlapping_on_cpu"] == 1
    assert [r.get("injected_overlap") for r in records] == [True, True, False, False, None]


def test_cpu_taken_sums_steal_and_interrupts_over_the_window() -> None:
    from collections import namedtuple

    T = namedtuple("T", "user steal irq softirq")
    before = [T(1.0, 0.10, 0.0, 0.01), T(2.0, 0.00, 0.02, 0.0)]
    after = [T(9.0, 0.13, 0.0, 0.02), T(9.0, 0.01, 0.02, 0.0)]
    got = bs.cpu_taken(before, after)
    assert got == pytest.approx(
        {"steal_ms": 40.0, "steal_ms_max_cpu": 30.0, "irq_ms": 10.0, "irq_ms_max_cpu": 10.0}
    )
    assert "steal 40 ms (most on one CPU 30)" in bs._taken({"cpu_taken": got})


def test_pin_without_the_cores_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(bs.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("scripts.benchlib.os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    with pytest.raises(SystemExit) as exc:
        bs.main(["--pin", "--out", str(tmp_path / "stalls")])
    assert exc.value.code == 2
    assert "--pin needs 12 cores (4 for the worker, 8 for the clients); this process may use 4" in (
        capsys.readouterr().err
    )
