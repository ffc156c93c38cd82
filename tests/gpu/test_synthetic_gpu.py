"""The synthetic GPU engine through the real Pipeline: bit-exact results against the numpy reference for
every bucket size, depths 1-4, graphs on/off, spin/blocking; zero driver faults in steady state; faults
recorded under stall injection; eager module loading; waits from a second thread."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from gpu_helpers import drive, gpu_config, poison, same_bits

from workers import inject
from workers.driver_journal import JOURNAL
from workers.engines import synthetic_math
from workers.pipeline import Pipeline

log = logging.getLogger(__name__)

WORK = 20
ITEM = (1000,)  # not a multiple of the block size: the kernel's tail guard is exercised
MAX_BATCH = 16


def build(
    engines: list, depth: int, graphs: bool, sync: str, work: int = WORK, item=ITEM, max_batch=MAX_BATCH
):
    from workers.engines.synthetic_gpu import SyntheticGpuEngine

    cfg = gpu_config(
        model__work=work,
        model__item_shape=list(item),
        model__max_batch=max_batch,
        pipeline__depth=depth,
        pipeline__cuda_graphs=graphs,
        pipeline__sync=sync,
    )
    eng = SyntheticGpuEngine(cfg)
    engines.append(eng)
    pipe = Pipeline(eng, depth, max_queue=1024, max_queue_delay_us=0, buckets=cfg.buckets)
    eng.warmup(pipe.slots, pipe.buckets)
    poison(pipe.slots)
    eng.mark_ready()
    return eng, pipe


def inputs_for(sizes: list[int], rng: np.random.Generator, item=ITEM) -> list[dict[str, np.ndarray]]:
    """Random batches: uniform [0,1), wide normals, negatives, and a few inf/NaN/zero specials."""
    out = []
    for k, rows in enumerate(sizes):
        x = rng.random((rows, *item), dtype=np.float32)
        if k % 3 == 1:
            x = (rng.standard_normal((rows, *item)) * 1e3).astype(np.float32)
        if k % 5 == 2:
            x.flat[:4] = [np.inf, -np.inf, np.nan, -0.0]
        out.append({"x": x})
    return out


@pytest.mark.parametrize("sync", ["spin", "blocking"])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_exact_for_every_bucket_size(engines: list, depth: int, graphs: bool, sync: str) -> None:
    eng, pipe = build(engines, depth, graphs, sync)
    faults0 = JOURNAL.faults
    buckets = pipe.buckets
    sizes = list(buckets)  # exactly every bucket size...
    sizes += [b - 1 for b in buckets if b > 2]  # ...and sizes that pad up to the next bucket
    sizes += [int(s) for s in np.random.default_rng(depth).integers(1, MAX_BATCH + 1, 12)]
    batches = inputs_for(sizes, np.random.default_rng(100 * depth + graphs))
    got = drive(pipe, batches)
    for i, b in enumerate(batches):
        want = synthetic_math.reference(b["x"], WORK)
        assert same_bits(got[i]["y"], want), f"batch {i} ({len(b['x'])} rows) differs from the reference"
    assert JOURNAL.faults == faults0
    d = eng.describe()
    assert d["cuda_graphs"] is graphs and d["sync"] == sync and d["depth"] == depth


def test_steady_state_has_no_driver_faults(engines: list) -> None:
    eng, pipe = build(engines, 3, True, "blocking", work=50)
    faults0, total0 = JOURNAL.faults, JOURNAL.total
    rng = np.random.default_rng(7)
    sizes = [int(s) for s in rng.integers(1, MAX_BATCH + 1, 2000)]
    x = rng.random((MAX_BATCH, *ITEM), dtype=np.float32)
    enqueue_ns: list[int] = []
    gpu_us: list[float] = []

    def on_batch(batch) -> None:
        enqueue_ns.append(batch.t_enqueued_ns - batch.t_launch_ns)
        gpu_us.append(eng.gpu_time_us(batch.slot))

    got = drive(pipe, [{"x": x[:n]} for n in sizes], on_batch)
    assert len(got) == 2000
    assert JOURNAL.faults == faults0 and JOURNAL.total == total0, JOURNAL.since(0)[-5:]
    assert eng.faults() == faults0
    e = np.array(enqueue_ns) / 1e3
    log.warning(
        "steady state: 2000 batches, enqueue p50 %.1f us p99 %.1f us max %.1f us, >1 ms: %d, "
        "GPU time p50 %.1f us",
        np.percentile(e, 50),
        np.percentile(e, 99),
        e.max(),
        int((e > 1000).sum()),
        np.percentile(gpu_us, 50),
    )
    assert min(gpu_us) > 0


@pytest.mark.parametrize(
    "kind,ops",
    [
        ("pinned_alloc", {"pinned_alloc", "pinned_free"}),
        ("device_alloc", {"device_alloc", "device_free"}),
        ("module_load", {"module_load", "module_unload"}),
    ],
)
def test_injection_threads_produce_faults(engines: list, kind: str, ops: set[str]) -> None:
    eng, pipe = build(engines, 2, True, "spin")
    seq0 = JOURNAL.since(0)[-1].seq if JOURNAL.since(0) else 0
    faults0 = JOURNAL.faults
    cfg = gpu_config(
        pipeline__cuda_graphs=True, debug__inject=kind, debug__inject_period_ms=5, debug__inject_bytes=8 << 20
    )
    inj = inject.start(cfg)
    assert inj is not None
    x = np.random.default_rng(1).random((8, *ITEM), dtype=np.float32)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        drive(pipe, [{"x": x}] * 20)
    inject.stop(inj)
    assert inj.error is None, inj.error
    assert inj.count >= 5
    new = JOURNAL.since(seq0)
    injected = [e for e in new if e.thread == "inject"]
    assert {e.op for e in injected} == ops and all(e.fault for e in injected)
    assert JOURNAL.faults - faults0 == len(injected) == 2 * inj.count
    assert eng.faults() == JOURNAL.faults - faults0  # counted from its own READY: earlier tests left faults


def test_module_loading_is_eager_and_reported(engines: list) -> None:
    from cuda.bindings import driver

    from workers.cuda.context import check_module_loading, module_loading_mode

    assert check_module_loading() == "EAGER"
    eng, _ = build(engines, 1, False, "spin")
    assert module_loading_mode() == "EAGER"
    mode = driver.cuModuleGetLoadingMode()[1]
    assert mode == driver.CUmoduleLoadingMode.CU_MODULE_EAGER_LOADING
    d = eng.describe()
    assert d["module_loading"] == "EAGER"
    assert d["uuid"].startswith("GPU-") and d["device"] and d["compute_capability"].count(".") == 1
    log.warning("describe: %s", d)


def test_wait_from_another_thread(engines: list) -> None:
    """The worker's completion-waiter thread calls wait(); the context must follow it there."""
    eng, pipe = build(engines, 2, False, "blocking", work=2000)
    slot = pipe.slots[0]
    slot.inputs["x"][:4] = 0.25
    eng.launch(slot, 4)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            eng.wait(slot)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    t.join(10)
    assert not errors and eng.done(slot)
    assert same_bits(slot.outputs["y"][:4], synthetic_math.reference(slot.inputs["x"][:4], 2000))


def test_batch_spans_merge_into_gpu_busy_time(engines: list) -> None:
    """Spans are on the host clock, in order, inside the wall time of the run; the running union the
    telemetry keeps (batches in completion order) equals the union of the sorted intervals and never exceeds
    the wall time; fill_gpu reserved shared memory for a full batch. (How busy the GPU gets is a benchmark
    figure, not asserted here: it depends on the host.)"""
    eng, pipe = build(engines, 3, True, "spin", work=2000, item=(1024,), max_batch=64)
    assert eng.describe()["fill_gpu_smem"] > 0  # 64 x 1024 threads would fill only part of a large GPU
    x = np.random.default_rng(3).random((64, 1024), dtype=np.float32)
    spans: list[tuple[int, int]] = []
    t0 = time.monotonic_ns()
    drive(pipe, [{"x": x}] * 600, lambda b: spans.append(eng.gpu_span_ns(b.slot)))
    t1 = time.monotonic_ns()
    assert all(s < e for s, e in spans)
    assert all(b[1] >= a[1] for a, b in zip(spans, spans[1:], strict=False)), "batches finish in order"
    assert spans[0][0] >= t0 - 1_000_000 and spans[-1][1] <= t1 + 1_000_000  # host clock, within 1 ms
    busy, until = 0, 0
    for s, e in spans:
        if e > until:
            busy += e - max(s, until)
            until = e
    merged, end = 0, 0  # the same union from the intervals sorted by start
    for s, e in sorted(spans):
        if e > end:
            merged += e - max(s, end)
            end = e
    assert 0 < busy <= merged <= (t1 - t0) + 2_000_000
    frac = busy / (t1 - t0)
    log.warning("spans: %d batches, GPU busy %.1f%% of %.3f s", len(spans), 100 * frac, (t1 - t0) / 1e9)
    assert 0 < frac <= 1.0 + 1e-3
