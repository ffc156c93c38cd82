"""The shared-memory path on a GPU: requests whose inputs and outputs live in a registered arena give
bit-exact synthetic results for every bucket (alone, coalesced, and mixed with frame requests), and a
real GPU orchestrator records no driver operation after READY while clients attach and detach."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from gpu_helpers import gpu_config, poison, same_bits

from orchestrator.client import Client
from tests.conftest import write_config
from workers.arena import Arena
from workers.driver_journal import JOURNAL
from workers.engines import synthetic_math
from workers.pipeline import Pipeline, Request, ShmSpans

WORK = 20
ITEM = (1000,)
MAX_BATCH = 16


def build(engines: list, tmp: Path, graphs: bool):
    from workers.engines.synthetic_gpu import SyntheticGpuEngine

    cfg = gpu_config(
        model__work=WORK,
        model__item_shape=list(ITEM),
        model__max_batch=MAX_BATCH,
        pipeline__depth=3,
        pipeline__cuda_graphs=graphs,
        pipeline__sync="spin",
    )
    eng = SyntheticGpuEngine(cfg)
    engines.append(eng)
    arena = Arena(tmp, "w0", 16, 8)
    arena.registered = eng.attach_arena(arena.addr, arena.size)
    pipe = Pipeline(eng, 3, max_queue=1024, max_queue_delay_us=0, buckets=cfg.buckets, arena=arena)
    eng.warmup(pipe.slots, pipe.buckets)
    poison(pipe.slots)
    eng.mark_ready()
    return eng, pipe, arena


@pytest.mark.parametrize("graphs", [False, True])
def test_exact_through_the_arena_for_every_bucket(engines: list, short_tmp: Path, graphs: bool) -> None:
    eng, pipe, arena = build(engines, short_tmp, graphs)
    assert arena.registered
    faults0 = JOURNAL.faults
    lease = arena.attach(__import__("os").getpid(), 4 << 20)
    row = ITEM[0] * 4
    rng = np.random.default_rng(3)
    sizes = (
        list(pipe.buckets) + [b - 1 for b in pipe.buckets if b > 2] + [int(s) for s in rng.integers(1, 5, 10)]
    )
    for k, rows in enumerate(sizes):
        # One batch of several requests: shared-memory ones at lease offsets, and (every other batch) one
        # frame request first, so mixed batches are covered too.
        parts, off, want = [], 0, {}
        split = [rows] if rows < 3 else [rows // 3, rows - rows // 3]
        for i, n in enumerate(split):
            x = rng.random((n, *ITEM), dtype=np.float32)
            if k % 2 and i == 0:
                parts.append(Request(("f", i), i, {"x": x}, n, time.monotonic_ns()))
            else:
                in_off, out_off = off, off + n * row
                arena.view(lease.offset + in_off, np.dtype(np.float32), (n, *ITEM))[...] = x
                arena.view(lease.offset + out_off, np.dtype(np.float32), (n, *ITEM))[...] = np.nan
                spans = ShmSpans(lease, [lease.offset + in_off], [lease.offset + out_off], 2 * n * row)
                parts.append(Request(("s", i), i, None, n, time.monotonic_ns(), shm=spans))
                off += 2 * n * row
            want[i] = synthetic_math.reference(x, WORK)
        for req in parts:
            assert pipe.offer(req)
        batch = pipe.launch_next(time.monotonic_ns(), lambda r: None)
        assert batch is not None and batch.rows == rows
        pipe.wait_oldest()
        got = {}

        def complete(b, got=got) -> None:
            for req, r0 in b.parts:
                if req.shm is None:
                    got[req.request_id] = b.slot.outputs["y"][r0 : r0 + req.rows].copy()
                else:
                    got[req.request_id] = arena.view(
                        req.shm.outputs[0], np.dtype(np.float32), (req.rows, *ITEM)
                    ).copy()

        pipe.complete_oldest(complete)
        for i, w in want.items():
            assert same_bits(got[i], w), f"batch {k} ({rows} rows), request {i} differs from the reference"
    assert JOURNAL.faults == faults0


def test_clients_attach_and_detach_without_driver_operations(short_tmp: Path, orchestrator_factory) -> None:
    config = write_config(
        short_tmp,
        {
            "workers": {"device": "gpu", "gpus": [0]},
            "model": {"kind": "synthetic", "item_shape": [512], "work": 50, "max_batch": 16},
            "pipeline": {"depth": 3, "cuda_graphs": True, "sync": "spin"},
            "transport": {"shm_mb": 64, "shm_max_lease_mb": 2},
        },
    )
    orch = orchestrator_factory(config)
    st0 = orch.status()
    w0 = st0["workers"][0]
    assert w0["shm"]["registered"] is True
    rng = np.random.default_rng(5)
    wrong = 0
    for _ in range(20):  # 20 clients one after another, each attaching, serving and detaching
        with Client(config, shm=True) as c:
            for _ in range(10):
                x = rng.random((int(rng.integers(1, 17)), 512), dtype=np.float32)
                y = c.infer(x)["y"]
                wrong += not same_bits(y, synthetic_math.reference(x, 50))
    st = orch.wait_status(
        lambda s: s["workers"][0]["shm"]["requests"] >= 200 and s["workers"][0]["shm"]["leases"] == 0
    )
    w = st["workers"][0]
    assert wrong == 0
    assert w["shm"]["requests"] >= 200 and w["shm"]["leases"] == 0
    assert w["shm"]["free_bytes"] == w["shm"]["arena_bytes"]
    assert w["faults"] == 0, "a driver operation ran after READY while clients attached and detached"
