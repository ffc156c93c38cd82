"""Worker telemetry: the thread probe, stall detection against the recent baseline, report shape, and
the measured per-batch cost (run with -s to see the figure)."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest

from orchestrator.common.config import MonitorSection
from workers import telemetry
from workers.driver_journal import DriverJournal
from workers.gc_journal import Collection, GcJournal
from workers.pipeline import Batch, Request
from workers.telemetry import ThreadProbe, WorkerTelemetry

US = 1000  # ns
_CLOCK: list[int] = []  # the instant make_batch timed its batch from (see frozen_clock)


class _FrozenClock:
    """time, except that monotonic_ns() returns the instant the last batch was made."""

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def monotonic_ns() -> int:
        return _CLOCK[0] if _CLOCK else time.monotonic_ns()


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """on_batch reads the clock once and measures latency from it: a test thread preempted between making
    a batch and accounting it (a loaded 2-core CI machine) would turn a normal batch into a stall. With
    this, on_batch sees the instant the batch was made."""
    monkeypatch.setattr(telemetry, "time", _FrozenClock())
    yield
    _CLOCK.clear()


def make_batch(
    enqueue_us: float,
    latency_us: float,
    n_requests: int = 2,
    rows: int = 4,
    probe: ThreadProbe | None = None,
    gpu_done_us: float = 100.0,
) -> Batch:
    """A replied batch whose oldest request arrived `latency_us` ago and whose launch took `enqueue_us`."""
    now = time.monotonic_ns()
    _CLOCK[:] = [now]
    t_recv = now - int(latency_us * US)
    t_enq = now - int(gpu_done_us * US) - 20 * US
    t_launch = t_enq - int(enqueue_us * US)
    t_recv = min(t_recv, t_launch)
    parts = [(Request(None, i, {}, rows // n_requests, t_recv + i * US), i) for i in range(n_requests)]
    b = Batch(None, parts, rows, rows)  # type: ignore[arg-type]  # no slot needed for accounting
    b.t_launch_ns, b.t_enqueued_ns, b.t_done_ns = t_launch, t_enq, now - 20 * US
    if probe is not None:
        b.probe0 = probe.snap()
        b.probe1 = probe.snap()
    return b


def make_tel(journal: DriverJournal | None = None, **kw: object) -> WorkerTelemetry:
    mon = MonitorSection(stall_factor=8.0, stall_min_us=1000)
    return WorkerTelemetry("w0", mon, journal or DriverJournal(), "blocking", **kw)  # type: ignore[arg-type]


def warm(tel: WorkerTelemetry, n: int = 96, enqueue_us: float = 20.0, latency_us: float = 300.0) -> None:
    for _ in range(n):
        assert tel.on_batch(make_batch(enqueue_us, latency_us), 100.0) is None


def test_probe_reads_this_threads_counters() -> None:
    probe = ThreadProbe()
    a = probe.snap()
    x = 0
    for i in range(200_000):  # stay on the CPU for a few ms
        x += i
    time.sleep(0.01)  # and block once: a voluntary switch
    b = probe.snap()
    assert probe.schedstat and probe.rusage
    assert all(isinstance(v, int) for v in a) and len(a) == 5
    d = telemetry.probe_delta(a, b)
    assert d["wall_us"] >= 10_000
    assert d["oncpu_us"] > 0 and d["runq_us"] >= 0 and d["vcsw"] >= 1
    assert d["blocked_us"] >= 5_000  # the sleep is neither on a CPU nor waiting for one
    probe.close()


def test_probe_counts_a_spin_on_the_cpu_not_as_blocked() -> None:
    """A launch that spins in the driver must read as on a CPU (or waiting for one), never as blocked:
    schedstat's own on-CPU field lags for the reading thread and made a 1 ms spin look blocked."""
    probe = ThreadProbe()
    for _ in range(5):
        a = probe.snap()
        while time.monotonic_ns() - a[0] < 1_000_000:  # 1 ms on the CPU, no system call that sleeps
            pass
        d = telemetry.probe_delta(a, probe.snap())
        assert d["oncpu_us"] + d["runq_us"] >= 0.8 * d["wall_us"], d
        assert d["blocked_us"] <= 0.2 * d["wall_us"], d
    probe.close()


def test_probe_without_proc_degrades(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_SCHEDSTAT", "/nonexistent/schedstat")
    probe = ThreadProbe()
    assert not probe.schedstat
    a, b = probe.snap(), probe.snap()
    assert a[2] == b[2] == 0 and b[1] >= a[1] > 0  # run-queue unknown, on-CPU from thread_time_ns


def test_probe_opened_in_one_thread_reports_that_thread() -> None:
    box: dict = {}

    def other() -> None:
        box["probe"] = ThreadProbe()
        box["snap"] = box["probe"].snap()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    mine = ThreadProbe().snap()
    assert box["snap"][1] != mine[1]  # different threads, different on-CPU clocks


@pytest.mark.usefixtures("frozen_clock")
def test_no_stall_during_warmup_even_when_slow() -> None:
    tel = make_tel()
    for i in range(64):
        assert tel.on_batch(make_batch(50_000.0 if i % 7 == 0 else 20.0, 300.0), 100.0) is None


@pytest.mark.usefixtures("frozen_clock")
def test_enqueue_stall_is_flagged_with_overlapping_journal_and_probe() -> None:
    journal = DriverJournal()
    tel = make_tel(journal)
    warm(tel)
    now = time.monotonic_ns()
    journal.record("pinned_alloc", now - 10_000 * US, now - 200 * US, "64 MiB")  # overlaps the launch
    journal.record("device_alloc", now - 900_000 * US, now - 800_000 * US, "early")  # long before it
    b = make_batch(5_000.0, 5_300.0, probe=ThreadProbe())
    cand = tel.on_batch(b, 100.0)
    assert cand is not None
    assert "enqueue" in cand["kind"] and cand["worker_id"] == "w0" and cand["pid"] > 0
    assert cand["timings_us"]["enqueue"] == pytest.approx(5000, rel=0.01)
    assert cand["baseline_us"]["enqueue"] == pytest.approx(20, rel=0.05)
    assert [e["op"] for e in cand["journal"]] == ["pinned_alloc"]
    assert cand["probe_launch"] is not None and cand["probe_batch"] is not None
    msgpack.unpackb(msgpack.packb(cand))  # goes on the wire as is


@pytest.mark.usefixtures("frozen_clock")
def test_a_stall_candidate_carries_the_collections_that_overlapped_it() -> None:
    collections = GcJournal()
    tel = make_tel(collections=collections)
    warm(tel)
    now = time.monotonic_ns()
    collections._kept.append(Collection(now - 900_000 * US, now - 899_000 * US, 2, "MainThread", 0))  # before
    collections._kept.append(Collection(now - 4_000 * US, now - 1_000 * US, 2, "MainThread", 12))
    cand = tel.on_batch(make_batch(5_000.0, 5_300.0), 100.0)
    assert cand is not None
    assert [(c["generation"], c["collected"]) for c in cand["gc"]] == [(2, 12)]
    assert tel.report()["gc"]["frozen"] == 0  # the journal's stats travel in every report


@pytest.mark.usefixtures("frozen_clock")
def test_threshold_floor_and_factor() -> None:
    tel = make_tel()
    warm(tel)
    assert tel.on_batch(make_batch(500.0, 900.0), 100.0) is None  # 25x the baseline, under the 1 ms floor
    assert tel.on_batch(make_batch(1_500.0, 1_900.0), 100.0) is not None  # over both
    low = WorkerTelemetry("w1", MonitorSection(stall_factor=8.0, stall_min_us=0), DriverJournal(), "spin")
    warm(low)
    assert low.on_batch(make_batch(140.0, 300.0), 100.0) is None  # 7x: under the factor
    assert low.on_batch(make_batch(200.0, 300.0), 100.0) is not None  # 10x


@pytest.mark.usefixtures("frozen_clock")
def test_baseline_is_robust_to_a_stall_storm() -> None:
    tel = make_tel(max_candidates_per_s=1000.0)
    warm(tel)
    flagged = sum(
        tel.on_batch(make_batch(30_000.0 if i % 4 == 0 else 20.0, 300.0), 100.0) is not None
        for i in range(400)
    )
    assert flagged == 100  # a quarter of the batches stalled: the median stays at the normal 20 us


@pytest.mark.usefixtures("frozen_clock")
def test_latency_stall_behind_a_reported_one_is_a_knock_on() -> None:
    tel = make_tel()
    warm(tel)
    assert tel.on_batch(make_batch(20_000.0, 20_300.0), 100.0) is not None
    follower = make_batch(20.0, 20_000.0)  # its request arrived during the stall above
    assert tel.on_batch(follower, 100.0) is None
    rep = tel.report()
    assert rep["interval"]["knock_on"] == 1 and rep["interval"]["stalls"] == 1


@pytest.mark.usefixtures("frozen_clock")
def test_candidates_are_rate_limited() -> None:
    tel = make_tel(max_candidates_per_s=2.0)
    warm(tel)
    out = [tel.on_batch(make_batch(20_000.0, 300.0), 100.0) for _ in range(4)]
    assert sum(c is not None for c in out) == 2
    assert tel.report()["interval"]["suppressed"] == 2


def test_report_shape_and_reset() -> None:
    journal = DriverJournal()
    tel = make_tel(journal)
    journal.record("module_load", 1, 2, "startup")
    for _ in range(10):
        tel.on_batch(make_batch(20.0, 300.0, n_requests=2, rows=4), 250.0)
    tel.note_failure(20)
    tel.note_failure(20)
    tel.note_failure(10)
    tel.note_queue(7, 2)
    rep = msgpack.unpackb(msgpack.packb(tel.report()))
    iv = rep["interval"]
    assert (iv["requests"], iv["batches"], iv["rows"]) == (20, 10, 40)
    assert iv["failures"] == {"20": 2, "10": 1}
    assert iv["hist"]["latency_us"]["n"] == 20 and iv["hist"]["enqueue_us"]["n"] == 10
    assert iv["gpu_time_us"] == pytest.approx(2500.0) and iv["gpu_busy_pct"] > 0
    assert (rep["queued"], rep["inflight"], rep["max_queued"]) == (7, 2, 7)
    assert rep["journal"]["total"] == 1 and rep["journal"]["entries"][0]["op"] == "module_load"
    assert (rep["journal"]["mode"], rep["journal"]["note"]) == ("own", None)  # live, unlike READY's facts
    assert rep["total"]["requests"] == 20 and rep["worker_id"] == "w0" and rep["interval_s"] > 0
    tel.on_batch(make_batch(20.0, 300.0), None)  # a CPU engine: no GPU time
    rep2 = tel.report()
    assert rep2["interval"]["requests"] == 2 and rep2["interval"]["failures"] == {}
    assert rep2["interval"]["gpu_busy_pct"] is None
    assert rep2["total"]["requests"] == 22 and rep2["total"]["hist"]["latency_us"]["n"] == 22
    assert rep2["journal"]["entries"] == []  # only new entries are shipped
    assert rep2["seq"] == rep["seq"] + 1


def test_per_batch_cost_is_small() -> None:
    """on_batch plus the two probe snaps the pipeline takes, for a 4-request batch."""
    tel = make_tel()
    probe = tel.probe
    assert probe is not None
    reqs = [Request(None, i, {}, 1, 0) for i in range(4)]
    batch = Batch(None, [(r, i) for i, r in enumerate(reqs)], 4, 4)  # type: ignore[arg-type]
    n = 5000

    def run(with_telemetry: bool) -> float:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            now = time.monotonic_ns()
            for r in reqs:
                r.t_recv_ns = now - 300 * US
            batch.t_launch_ns, batch.t_enqueued_ns, batch.t_done_ns = now - 150 * US, now - 130 * US, now
            if with_telemetry:
                batch.probe0 = probe.snap()
                batch.probe1 = probe.snap()
                tel.on_batch(batch, 100.0)
        return (time.perf_counter_ns() - t0) / n / 1e3

    run(True)  # warm caches, fill the baseline window
    costs = [run(True) - run(False) for _ in range(5)]
    cost = statistics.median(costs)
    snaps = statistics.median(_time_snaps(probe) for _ in range(3))
    print(
        f"\n[telemetry] per-batch cost: {cost:.2f} us (of which 2 probe snaps {2 * snaps:.2f} us), "
        f"4 requests/batch, median of 5 runs of {n}"
    )
    assert cost < 30.0


def _time_snaps(probe: ThreadProbe, n: int = 5000) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        probe.snap()
    return (time.perf_counter_ns() - t0) / n / 1e3


def test_gpu_busy_is_the_union_of_overlapping_batch_spans() -> None:
    tel = make_tel()
    base = time.monotonic_ns()
    # Three batches (ns on the host clock): [0, 100], [50, 150] overlaps the first, [300, 400] after a gap.
    for start, stop in ((0, 100), (50, 150), (300, 400)):
        tel.on_batch(make_batch(10.0, 50.0), 100.0, (base + start * 1000, base + stop * 1000))
    rep = tel.report()
    assert rep["interval"]["gpu_busy_ns"] == 250_000  # 150 us + 100 us, the overlap counted once
    assert (
        rep["interval"]["gpu_time_us"] == 300.0
    )  # the per-batch sum overcounts: that is why the union exists
    expected_pct = 100.0 * 250_000 / (rep["interval_s"] * 1e9)
    assert rep["interval"]["gpu_busy_pct"] == pytest.approx(expected_pct)
