"""The CUPTI driver journal without a GPU: which functions it records, how its records become journal
entries, how they merge with the orchestrator's own entries, and the fallback when CUPTI cannot run."""

from __future__ import annotations

import enum
import logging
import re
import sys
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from orchestrator.supervisor.monitor import stalls
from workers import cupti_journal
from workers.cupti_journal import (
    Clock,
    CuptiUnavailable,
    ThreadNames,
    classify,
    entries_from,
    locking_functions,
)
from workers.driver_journal import MERGE_SLACK_NS, DriverJournal, DriverOp


@pytest.mark.parametrize(
    ("name", "op"),
    [
        ("cuMemHostRegister_v2", "host_register"),
        ("cuMemHostUnregister", "host_unregister"),
        ("cudaHostRegister_v4000", "host_register"),
        ("cuMemAllocHost_v2", "pinned_alloc"),
        ("cuMemHostAlloc", "pinned_alloc"),
        ("cudaMallocHost_v3020", "pinned_alloc"),
        ("cuMemFreeHost", "pinned_free"),
        ("cudaFreeHost_v3020", "pinned_free"),
        ("cuMemAlloc_v2", "device_alloc"),
        ("cuMemAllocManaged", "device_alloc"),
        ("cuMemCreate", "device_alloc"),
        ("cudaMalloc_v3020", "device_alloc"),
        ("cuMemFree_v2", "device_free"),
        ("cudaFree_v3020", "device_free"),
        ("cuMemRelease", "device_free"),
        ("cuModuleLoadData", "module_load"),
        ("cuLibraryLoadData", "module_load"),
        ("cuModuleUnload", "module_unload"),
        ("cuGraphInstantiateWithFlags", "graph_instantiate"),
        ("cuGraphExecDestroy", "graph_destroy"),
        ("cuDevicePrimaryCtxRetain", "context_create"),
        ("cuStreamCreateWithPriority", "stream_create"),
        ("cuStreamDestroy_v2", "stream_destroy"),
    ],
)
def test_lock_taking_functions_are_recorded_under_their_operation(name: str, op: str) -> None:
    assert classify(name) == op


@pytest.mark.parametrize(
    "name",
    [
        "cuLaunchKernel",
        "cuLaunchKernelEx_ptsz",
        "cuGraphLaunch",
        "cuMemcpyHtoDAsync_v2",
        "cuMemcpyBatchAsync",
        "cuEventRecord",
        "cuEventSynchronize",
        "cuStreamSynchronize",
        "cuMemAllocAsync",
        "cuMemFreeAsync_ptsz",
        "cuMemAllocFromPoolAsync",
        "cudaLaunchKernel_v7000",
        "cudaGraphLaunch_v10000",
        "cuCtxSetCurrent",
        "cuMemGetInfo_v2",
    ],
)
def test_launches_copies_and_stream_ordered_allocation_are_left_out(name: str) -> None:
    assert classify(name) is None


def test_every_driver_function_cupti_knows_is_either_recorded_or_not_a_launch() -> None:
    cupti = pytest.importorskip("cupti.cupti", reason="cupti-python not installed")
    recorded = {m.name for m in cupti.Driver_api_trace_cbid if classify(m.name)}
    assert {"cuMemHostRegister_v2", "cuMemAlloc_v2", "cuModuleLoadData", "cuGraphInstantiate"} <= recorded
    hot = ("Launch", "Memcpy", "Memset", "Synchronize", "EventRecord", "Query", "StreamWait")
    assert not [n for n in recorded if any(h in n for h in hot)]


# --- CUPTI records -> journal entries ------------------------------------------------------------------


class _Kind(enum.IntEnum):
    DRIVER = 6
    RUNTIME = 5
    OVERHEAD = 13


class _Overhead(enum.IntEnum):
    CUPTI_BUFFER_FLUSH = 1
    LAZY_FUNCTION_LOADING = 1 << 5
    RUNTIME_TRIGGERED_MODULE_LOADING = 1 << 6


FAKE_CUPTI = SimpleNamespace(ActivityKind=_Kind, ActivityOverheadKind=_Overhead)
NAMES = {10: "cuMemHostRegister_v2", 11: "cuLaunchKernel", 12: "cuMemAlloc_v2", -20: "cudaMalloc_v3020"}


def _api(kind: int, cbid: int, start: int, end: int, tid: int) -> SimpleNamespace:
    return SimpleNamespace(kind=kind, cbid=cbid, start=start, end=end, thread_id=tid)


def test_records_become_entries_on_the_monotonic_clock_with_thread_names() -> None:
    clock = Clock(lambda: 0)
    clock.offset_ns = 1_000
    me = threading.get_native_id()
    lazy = SimpleNamespace(
        kind=_Kind.OVERHEAD,
        overhead_kind=_Overhead.LAZY_FUNCTION_LOADING,
        start=500,
        end=900,
        object_id=SimpleNamespace(pt=SimpleNamespace(thread_id=me)),
    )
    flush = SimpleNamespace(kind=_Kind.OVERHEAD, overhead_kind=_Overhead.CUPTI_BUFFER_FLUSH, start=1, end=2)
    acts = [
        _api(_Kind.DRIVER, 10, 100, 200, me),
        _api(_Kind.DRIVER, 11, 300, 310, me),  # a launch: never in the journal
        _api(_Kind.RUNTIME, 20, 400, 450, me),
        lazy,
        flush,
    ]
    out = entries_from(acts, FAKE_CUPTI, locking_functions(NAMES), clock, ThreadNames())
    assert [(e.op, e.api, e.t0_ns, e.t1_ns, e.source) for e in out] == [
        ("host_register", "cuMemHostRegister_v2", 1_100, 1_200, "cupti"),
        ("device_alloc", "cudaMalloc_v3020", 1_400, 1_450, "cupti"),
        ("lazy_load", "lazy_function_loading", 1_500, 1_900, "cupti"),
    ]
    assert {e.thread for e in out} == {threading.current_thread().name}
    assert {e.tid for e in out} == {me}


def test_a_thread_python_does_not_know_is_named_from_proc() -> None:
    names = ThreadNames()
    assert names(threading.get_native_id()) == threading.current_thread().name
    assert names(2**31 - 7) == f"tid {2**31 - 7}"


def test_clock_lines_cupti_up_with_monotonic() -> None:
    import time

    clock = Clock(lambda: time.monotonic_ns() - 5_000_000)
    assert abs(clock.offset_ns - 5_000_000) < 100_000
    assert clock.uncertainty_ns >= 0


# --- the journal: merging, faults ------------------------------------------------------------------


def _cupti_op(op: str, api: str, t0: int, t1: int, tid: int) -> DriverOp:
    return DriverOp(0, op, t0, t1, "", "inject", False, api, tid, "cupti")


def test_a_call_seen_by_both_journals_is_one_entry_with_the_api_name() -> None:
    j = DriverJournal()
    j.mark_ready()
    own = j.record("pinned_alloc", j.ready_ns + 1_000_000, j.ready_ns + 3_000_000, "staging")
    assert j.faults == 1
    new = j.add_foreign(
        [_cupti_op("pinned_alloc", "cuMemHostAlloc", own.t0_ns + 5_000, own.t1_ns - 5_000, own.tid)]
    )
    assert new == 0 and j.faults == 1 and j.total == 1
    (e,) = j.since(0)
    assert (e.api, e.op, e.detail, e.source, e.name) == (
        "cuMemHostAlloc",
        "pinned_alloc",
        "staging",
        "own+cupti",
        "cuMemHostAlloc",
    )


def test_another_threads_call_is_a_new_fault_and_a_runtime_call_folds_into_its_driver_call() -> None:
    j = DriverJournal()
    j.mark_ready()
    t = j.ready_ns + 1_000_000
    new = j.add_foreign(
        [
            replace(
                _cupti_op("device_alloc", "cuMemAlloc_v2", t + 10_000, t + 90_000, 4242),
                library="libcudart.so.13",
            ),
            replace(
                _cupti_op("device_alloc", "cudaMalloc_v3020", t, t + 100_000, 4242),
                library="libc10_cuda.so (torch)",
            ),
            _cupti_op("host_register", "cuMemHostRegister_v2", t, t + 100_000, 4343),
        ]
    )
    assert new == 2 and j.faults == 2
    by_tid = {e.tid: e for e in j.since(0)}
    assert by_tid[4242].api == "cuMemAlloc_v2" and by_tid[4242].detail == "cudaMalloc_v3020"
    assert (by_tid[4242].t0_ns, by_tid[4242].t1_ns) == (t, t + 100_000)
    assert by_tid[4242].library == "libc10_cuda.so (torch)"  # the runtime call's caller, not the runtime
    assert by_tid[4343].api == "cuMemHostRegister_v2"


def test_calls_before_ready_are_not_faults_and_neighbours_do_not_merge(caplog) -> None:
    j = DriverJournal()
    before = _cupti_op("module_load", "cuModuleLoadData", 100, 200, 7)
    assert j.add_foreign([before]) == 0 and j.faults == 0
    j.mark_ready()
    t = j.ready_ns
    a = _cupti_op("host_register", "cuMemHostRegister_v2", t + 1_000_000, t + 5_000_000, 7)
    # starts right after `a` ends: a separate call even within the merge slack
    b = _cupti_op(
        "host_unregister", "cuMemHostUnregister", t + 5_000_000 + MERGE_SLACK_NS // 2, t + 9_000_000, 7
    )
    with caplog.at_level(logging.WARNING, logger="workers.driver_journal"):
        assert j.add_foreign([a, b]) == 2
    assert j.faults == 2 and j.total == 3
    assert "cuMemHostRegister_v2 after READY (host_register" in caplog.text
    assert "thread inject" in caplog.text


def test_sync_delivers_cupti_records_before_a_stall_is_read() -> None:
    j = DriverJournal()
    pending = [_cupti_op("host_register", "cuMemHostRegister_v2", 10, 20, 9)]
    j.attach("cupti", lambda: j.add_foreign(pending.copy()) and pending.clear())
    assert j.overlapping(0, 100) == []
    j.sync()
    assert [e.api for e in j.overlapping(0, 100)] == ["cuMemHostRegister_v2"]


# --- start and the fallback ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """start() runs once per process (CUPTI's callbacks are process-wide); each test starts from scratch."""
    cupti_journal.stop()
    yield
    cupti_journal.stop()


def test_own_mode_never_touches_cupti() -> None:
    j = DriverJournal()
    assert cupti_journal.start("own", j) is None
    assert j.mode == "own" and "own" in (j.note or "")


def test_start_runs_once_per_process() -> None:
    j = DriverJournal()
    cupti_journal.start("own", j)
    j.attach("own", None, "untouched")
    assert cupti_journal.start("auto", j) is None  # the engine's before_ready after the worker's start
    assert j.note == "untouched"


def test_every_operation_cupti_records_is_one_the_journal_knows() -> None:
    from workers.cupti_journal import LOCKING
    from workers.driver_journal import OPS

    assert {op for _, op in LOCKING} | {"lazy_load"} <= set(OPS)


def test_without_a_driver_cupti_mode_refuses_and_auto_gives_up_at_the_first_stall(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_INJECTION64_PATH", raising=False)
    monkeypatch.delenv("NSYS_PROFILING_SESSION_ID", raising=False)
    monkeypatch.delenv(cupti_journal.VARIANT_ENV, raising=False)
    try:
        from cuda.bindings import driver

        if driver.cuInit(0)[0] == 0:
            pytest.skip("a CUDA driver is present: the GPU tests cover the journal")
    except Exception:
        pass
    with pytest.raises(CuptiUnavailable):
        cupti_journal.start("cupti", DriverJournal())
    cupti_journal.stop()  # a new process
    j = DriverJournal()
    if cupti_journal.start("auto", j) is None:  # no cupti-python or no compiler here: own, and why
        assert j.mode == "own" and (j.note or "").startswith("CUPTI not used: ")
        return
    cupti_journal.verify(lambda: None, j)  # CUPTI untouched until a stall
    assert j.mode == "cupti" and "on demand" in (j.note or "")
    assert cupti_journal.on_stall(LOCK_WAIT) is False
    assert (j.note or "").startswith("CUPTI could not be armed: CuptiUnavailable: CUPTI refused the journal")


def test_a_profiler_owning_cupti_keeps_the_own_journal(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_INJECTION64_PATH", "/opt/nsight/libToolsInjection64.so")
    j = DriverJournal()
    assert cupti_journal.start("auto", j) is None
    assert "profiler" in (j.note or "")
    cupti_journal.stop()  # a new process
    with pytest.raises(CuptiUnavailable, match="profiler"):
        cupti_journal.start("cupti", DriverJournal())


# --- attribution carries the operation ------------------------------------------------------------------


def test_a_stall_blamed_on_the_driver_lock_names_the_operation_thread_and_library() -> None:
    t0 = 1_000_000_000
    cand = {
        "kind": ["enqueue"],
        "t0_ns": t0,
        "t1_ns": t0 + 20_000_000,
        "launch_t0_ns": t0 + 1_000_000,
        "launch_t1_ns": t0 + 15_000_000,
        "timings_us": {"enqueue": 14_000.0},
        "baseline_us": {"enqueue": 20.0},
        "probe_launch": {
            "wall_us": 14_000.0,
            "oncpu_us": 50.0,
            "runq_us": 0.0,
            "blocked_us": 13_950.0,
            "vcsw": 2,
            "ivcsw": 0,
        },
        "journal": [
            {
                "op": "host_register",
                "api": "cuMemHostRegister_v2",
                "source": "cupti",
                "t0_ns": t0,
                "t1_ns": t0 + 14_500_000,
                "thread": "inject",
                "library": "cuda.bindings._bindings.cydriver",
                "detail": "",
            }
        ],
    }
    causes = stalls.attribute(cand, [], {}, [])
    rec = stalls.build_record(cand, causes, None)
    assert rec["cause"] == "driver_lock"
    assert rec["driver_op"]["name"] == "cuMemHostRegister_v2"
    assert rec["driver_op"]["op"] == "host_register"
    assert rec["driver_op"]["thread"] == "inject" and rec["driver_op"]["source"] == "cupti"
    assert rec["driver_op"]["library"] == "cuda.bindings._bindings.cydriver"
    assert "cuMemHostRegister_v2 on inject from cuda.bindings._bindings.cydriver 14.5 ms" in rec["summary"]
    log = stalls.StallLog(path=__import__("pathlib").Path("/dev/null"))
    log.write(rec)
    assert log.snapshot_op_counts() == {"cuMemHostRegister_v2": 1}


def test_cuptis_own_threads_go_to_the_supervisors_cores(monkeypatch) -> None:
    calls: list[tuple[int, set[int]]] = []
    parent = __import__("os").getppid()

    def getaff(pid: int) -> set[int]:
        return {0, 1} if pid == 0 else {7} if pid == parent else set()

    monkeypatch.setattr(cupti_journal.os, "sched_getaffinity", getaff)
    monkeypatch.setattr(
        cupti_journal.os, "sched_setaffinity", lambda tid, cores: calls.append((tid, set(cores)))
    )
    cj = cupti_journal.CuptiJournal(DriverJournal())
    cj.own_tids = {4101, 4102}
    cj.isolate()
    assert calls == [(4101, {7}), (4102, {7})]
    assert cj.stats()["cupti_threads_cores"] == [7]
    cj.isolate()  # threads already moved are left alone
    assert len(calls) == 2


def test_cupti_journal_on_cpu_workers_or_without_cupti_python_is_a_config_error(monkeypatch) -> None:
    from orchestrator.cli import commands
    from orchestrator.common.config import parse_config
    from orchestrator.common.errors import ConfigError

    with pytest.raises(ConfigError, match='"cupti" needs workers.device = "gpu"'):
        parse_config({"monitor": {"driver_journal": "cupti"}}, check_files=False)
    gpu = parse_config(
        {"workers": {"device": "gpu"}, "monitor": {"driver_journal": "cupti"}}, check_files=False
    )
    monkeypatch.setattr(cupti_journal, "cupti_installed", lambda: False)
    with pytest.raises(
        ConfigError, match=r"needs cupti-python, not installed here: pip install 'orchestrator\[gpu\]'"
    ):
        commands._check_journal(gpu)
    commands._check_journal(parse_config({"workers": {"device": "gpu"}}, check_files=False))  # auto: fine


def test_cupti_journal_without_a_compiler_is_refused_before_start_unless_the_callback_is_built(
    monkeypatch, tmp_path
) -> None:
    from orchestrator.cli import commands
    from orchestrator.common.config import parse_config
    from orchestrator.common.errors import ConfigError
    from workers import cupti_native

    gpu = parse_config(
        {"workers": {"device": "gpu"}, "monitor": {"driver_journal": "cupti"}}, check_files=False
    )
    monkeypatch.setattr(cupti_journal, "cupti_installed", lambda: True)
    monkeypatch.setenv("ORCHESTRATOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cupti_native, "compiler", lambda: None)
    with pytest.raises(ConfigError, match=r'driver_journal = "cupti": no C compiler .* \(or "auto"'):
        commands._check_journal(gpu)
    monkeypatch.setattr(cupti_native, "compiler", lambda: ["false"])
    with pytest.raises(
        ConfigError, match=r'driver_journal = "cupti": false could not build the CUPTI callback'
    ):
        commands._check_journal(gpu)
    assert list(tmp_path.iterdir()) == []  # nothing half-built left for the workers to load
    # Workers load the library from the cache: one built there earlier (by another start) is enough.
    monkeypatch.setattr(cupti_native, "compiler", lambda: None)
    cupti_native.library_path().write_bytes(b"")
    commands._check_journal(gpu)


# --- what CUPTI is asked to record (ORCHESTRATOR_CUPTI_VARIANT) ------------------------------------------


def _fake_cupti(monkeypatch) -> SimpleNamespace:
    """A stand-in for cupti-python's `cupti.cupti` that remembers what the journal switched on; the
    callback variant subscribes a stand-in for the compiled callback (tests/unit/test_cupti_native.py
    covers the real one)."""
    import types

    drv = enum.IntEnum(
        "Driver_api_trace_cbid", {"cuMemAlloc_v2": 1, "cuLaunchKernel": 2, "cuMemHostRegister_v2": 3}
    )
    rt = enum.IntEnum("Runtime_api_trace_cbid", {"cudaMalloc_v3020": 1, "cudaLaunchKernel_v7000": 2})
    on = SimpleNamespace(driver=set(), runtime=set(), kinds=set(), callbacks=set(), unsubscribed=[])

    def enable_callback(enable: int, subscriber: int, domain: int, cbid: int) -> None:
        assert subscriber == 77
        name = (drv if domain == cupti_journal.DOMAIN_DRIVER else rt)(cbid).name
        (on.callbacks.add if enable else on.callbacks.discard)(name)

    api = SimpleNamespace(
        Driver_api_trace_cbid=drv,
        Runtime_api_trace_cbid=rt,
        ActivityThreadIdType=SimpleNamespace(SYSTEM=1),
        ActivityKind=SimpleNamespace(DRIVER=1, RUNTIME=2, OVERHEAD=3),
        set_thread_id_type=lambda t: None,
        activity_register_callbacks=lambda req, done: None,
        activity_enable_driver_api=lambda cbid, en: on.driver.add(drv(cbid).name),
        activity_enable_runtime_api=lambda cbid, en: on.runtime.add(rt(cbid).name),
        activity_enable=lambda kind: on.kinds.add(kind),
        activity_disable=lambda kind: on.kinds.discard(kind),
        activity_flush_all=lambda flag: None,
        enable_callback=enable_callback,
        unsubscribe=on.unsubscribed.append,
        get_timestamp=time.monotonic_ns,
    )
    pkg = types.ModuleType("cupti")
    pkg.cupti = api  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupti", pkg)
    from workers import cupti_native

    fake_native = SimpleNamespace(
        callback_ptr=1234, path="/cache/cupti_callback-x.so", drain=list, stats=lambda: {"dropped": 0}
    )
    monkeypatch.setattr(cupti_native, "load", lambda out_dir=None: fake_native)
    monkeypatch.setattr(cupti_journal.CuptiJournal, "_subscribe", lambda self, ptr: 77 if ptr == 1234 else 0)
    return on


@pytest.mark.parametrize(("variant", "loading"), [("", "EAGER"), ("callback", "EAGER"), ("callback", "LAZY")])
def test_the_callback_variant_calls_back_on_the_lock_taking_functions_only(
    monkeypatch, variant: str, loading: str
) -> None:
    on = _fake_cupti(monkeypatch)
    monkeypatch.setenv(cupti_journal.VARIANT_ENV, variant)
    monkeypatch.setenv("CUDA_MODULE_LOADING", loading)
    cj = cupti_journal.CuptiJournal(DriverJournal())
    cj.start()
    assert on.callbacks == {"cuMemAlloc_v2", "cuMemHostRegister_v2", "cudaMalloc_v3020"}  # never a launch
    assert on.driver == on.runtime == set()  # no activity records of API calls
    assert (3 in on.kinds) is (loading == "LAZY")  # lazy function loads only where they can happen
    assert cj.stats()["variant"] == "callback" and cj.stats()["lazy_load_records"] is (loading == "LAZY")
    cj.stop()
    assert on.unsubscribed == [77] and not on.kinds


def test_the_activity_variant_records_the_lock_taking_functions_and_lazy_loads(monkeypatch) -> None:
    on = _fake_cupti(monkeypatch)
    monkeypatch.setenv(cupti_journal.VARIANT_ENV, "activity")
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
    cj = cupti_journal.CuptiJournal(DriverJournal())
    cj.start()
    assert on.driver == {"cuMemAlloc_v2", "cuMemHostRegister_v2"}  # never a launch
    assert on.runtime == {"cudaMalloc_v3020"}
    assert 3 in on.kinds and not on.callbacks
    assert cj.stats()["variant"] == "activity"


def test_without_a_c_compiler_the_callback_variant_says_so(monkeypatch, tmp_path) -> None:
    from workers import cupti_native

    monkeypatch.setitem(sys.modules, "cupti", SimpleNamespace(cupti=SimpleNamespace()))
    monkeypatch.setenv("ORCHESTRATOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(cupti_journal.VARIANT_ENV, raising=False)
    monkeypatch.setattr(cupti_native, "compiler", lambda: None)
    with pytest.raises(CuptiUnavailable, match=r"^no C compiler \(set CC, or install cc, gcc or clang\)"):
        cupti_journal.CuptiJournal(DriverJournal()).start()


def test_an_unknown_variant_is_refused_before_cupti_is_touched(monkeypatch) -> None:
    monkeypatch.setenv(cupti_journal.VARIANT_ENV, "everything")
    monkeypatch.setitem(sys.modules, "cupti", None)  # importing it would fail differently
    with pytest.raises(
        CuptiUnavailable,
        match="ORCHESTRATOR_CUPTI_VARIANT='everything': expected one of callback, callback-driver, activity",
    ):
        cupti_journal.CuptiJournal(DriverJournal()).start()


def test_the_driver_journal_is_cupti_on_demand_unless_asked() -> None:
    from orchestrator.common.config import parse_config

    assert parse_config({"workers": {"device": "gpu"}}, check_files=False).monitor.driver_journal == "auto"


# --- on demand (monitor.driver_journal = "auto"): attached and armed by the first lock-like stall --------


#: A stall candidate as the serving thread builds it when a launch waited on a lock.
LOCK_WAIT = {
    "kind": ["enqueue"],
    "probe_launch": {"wall_us": 4_000.0, "oncpu_us": 20.0, "runq_us": 10.0, "blocked_us": 3_970.0, "vcsw": 2},
}


def _started_auto(monkeypatch, mode: str = "auto") -> tuple[SimpleNamespace, DriverJournal, list[int]]:
    """The journal as a worker has it after READY under `mode`: started and verified."""
    on = _fake_cupti(monkeypatch)
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
    monkeypatch.delenv(cupti_journal.VARIANT_ENV, raising=False)
    monkeypatch.delenv("CUDA_INJECTION64_PATH", raising=False)
    monkeypatch.delenv("NSYS_PROFILING_SESSION_ID", raising=False)
    from workers import cupti_native

    subscribed: list[int] = []

    def subscribe(self, ptr: int) -> int:
        subscribed.append(ptr)
        return 77

    monkeypatch.setattr(cupti_journal.CuptiJournal, "_subscribe", subscribe)
    probe_made: list[SimpleNamespace] = []
    native = cupti_native.load()  # replaced by _fake_cupti: drain what the probe "called"
    native.drain = lambda: [probe_made.pop()] if probe_made else []
    native.caller = lambda rec: "libtest.so"
    j = DriverJournal()
    cupti_journal.start(mode, j)

    def probe() -> None:  # a pinned allocation, as CUPTI would report it
        t = time.monotonic_ns()
        probe_made.append(
            SimpleNamespace(
                cbid=1, domain=1, tid=threading.get_native_id(), start_ns=t, end_ns=t + 1, comm=b""
            )
        )

    cupti_journal.verify(probe, j)
    return on, j, subscribed


def test_auto_leaves_cupti_untouched_until_a_stall(monkeypatch) -> None:
    on, j, subscribed = _started_auto(monkeypatch)
    cj = cupti_journal.active()
    assert cj is not None and cj.on_demand and not cj.armed
    assert subscribed == [] and on.callbacks == set() and not on.kinds  # CUPTI never attached
    assert j.since(0) == []
    assert j.mode == "cupti" and "on demand" in (j.note or "")


def test_a_lock_like_stall_arms_the_journal_for_good(monkeypatch) -> None:
    on, j, subscribed = _started_auto(monkeypatch)
    cj = cupti_journal.active()
    assert cj is not None
    assert cupti_journal.on_stall(LOCK_WAIT) is True  # attached and armed now
    assert on.callbacks == {"cuMemAlloc_v2", "cuMemHostRegister_v2", "cudaMalloc_v3020"}
    assert subscribed == [1234] and cj.armed and cj.stats()["armed"] is True
    assert re.fullmatch(
        r"CUPTI armed at \d\d:\d\d:\d\d by a launch blocked 4\.0 ms; it stays armed", j.note or ""
    )
    assert cupti_journal.on_stall(LOCK_WAIT) is False  # already armed: nothing to do
    assert subscribed == [1234] and on.unsubscribed == []  # it stays armed


@pytest.mark.parametrize(
    "candidate",
    [
        {"kind": ["latency"], "probe_batch": {"blocked_us": 9_000.0, "runq_us": 0.0}},  # slow GPU work
        {"kind": ["enqueue"], "probe_launch": {"blocked_us": 300.0, "runq_us": 4_000.0}},  # run-queue wait
        {"kind": ["enqueue"], "probe_launch": {"blocked_us": 400.0, "runq_us": 0.0, "vcsw": 2}},  # too short
        # off its CPU with no switch: the hypervisor or interrupts took it (cpu_stolen), no lock slept
        {"kind": ["enqueue"], "probe_launch": {"blocked_us": 4_700.0, "runq_us": 0.0, "vcsw": 0, "ivcsw": 0}},
        {"kind": ["enqueue"]},  # no probe
    ],
)
def test_stalls_no_lock_explains_leave_the_journal_disarmed(monkeypatch, candidate: dict) -> None:
    on, _, _ = _started_auto(monkeypatch)
    assert cupti_journal.on_stall(candidate) is False
    cj = cupti_journal.active()
    assert cj is not None and not cj.armed and on.callbacks == set()


def test_cupti_refusing_to_arm_leaves_the_own_journal_and_says_why(monkeypatch, caplog) -> None:
    _, j, _ = _started_auto(monkeypatch)

    def refuse(self, ptr: int) -> int:
        raise cupti_journal.CuptiUnavailable("cuptiSubscribe refused the journal's callback: ERROR_UNKNOWN")

    monkeypatch.setattr(cupti_journal.CuptiJournal, "_subscribe", refuse)
    with caplog.at_level(logging.WARNING):
        assert cupti_journal.on_stall(LOCK_WAIT) is False
        assert cupti_journal.on_stall(LOCK_WAIT) is False  # no second try, no second warning
    assert (j.note or "").startswith("CUPTI could not be armed: CuptiUnavailable: cuptiSubscribe refused")
    assert j.mode == "own"
    assert sum("own calls only" in r.message for r in caplog.records) == 1


def test_cupti_mode_stays_armed_and_own_mode_has_nothing_to_arm(monkeypatch) -> None:
    on, _, _ = _started_auto(monkeypatch, mode="cupti")
    cj = cupti_journal.active()
    assert cj is not None and cj.armed and not cj.on_demand and on.unsubscribed == []
    assert cupti_journal.on_stall(LOCK_WAIT) is False  # armed from start-up
    cupti_journal.stop()
    cupti_journal.start("own", DriverJournal())
    assert cupti_journal.on_stall(LOCK_WAIT) is False


def test_a_stall_that_armed_the_journal_says_so() -> None:
    t0 = 1_000_000_000
    cand = {
        "kind": ["enqueue"],
        "t0_ns": t0,
        "t1_ns": t0 + 5_000_000,
        "timings_us": {"enqueue": 5_000.0},
        "baseline_us": {"enqueue": 20.0},
        "journal_armed_now": True,
    }
    rec = stalls.build_record(cand, stalls.attribute(cand, [], {}, []), None)
    assert rec["summary"].endswith("; CUPTI journal armed now: the next stalls name the driver operation")


def test_engine_facts_name_cuptis_counters_as_taken_at_ready(monkeypatch) -> None:
    """Engine facts go to the supervisor once, at READY: a counter there must not pass for a live one."""
    from workers.engines.gpu_base import GpuEngineBase

    cj = SimpleNamespace(
        stats=lambda: {"variant": "callback", "records": 19, "flushes": 2, "flush_us_mean": 3.5}
    )
    monkeypatch.setattr(cupti_journal, "_ACTIVE", cj)
    facts = GpuEngineBase._journal_facts()
    assert facts["variant"] == "callback"
    assert (facts["records_at_ready"], facts["flushes_at_ready"], facts["flush_us_mean_at_ready"]) == (
        19,
        2,
        3.5,
    )
    assert "records" not in facts
