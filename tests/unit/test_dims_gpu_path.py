"""The GPU engines' path for a model with a dynamic dimension, on the CPU stand-in for the CUDA layer: frame
requests and shared-memory requests of every size, padded (staged by the CPU) or at their bucket's size
(DMA between their spans and the device rows, around the compute-only graph), in mixed batches, give
the results of the model run on each request alone. Needs no CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from orchestrator.common.config import parse_config
from orchestrator.common.errors import EngineError
from tests.unit.fake_cuda import FakeRuntime
from workers.arena import Arena
from workers.engines.base import TensorSpec
from workers.engines.dims import DynamicDim, launch_keys
from workers.engines.gpu_base import GpuEngineBase, GpuSlot
from workers.pipeline import Pipeline, Request, ShmSpans

SCALE = np.array([1.0, 2.0, 3.0], np.float32)


VOCAB = 100  # ids index an embedding of this many rows: anything else is an out-of-range gather


def model(ids: np.ndarray) -> dict[str, np.ndarray]:
    """y[r, s, k] = (ids[r, s] + 1) * (k + 1) (nonzero for id 0, as an embedding is); total[r] = sum of the
    row (padding with 0 leaves it unchanged)."""
    if ids.size and not (0 <= ids.min() and ids.max() < VOCAB):  # the device-side assert of a real gather
        raise EngineError(f"id out of the embedding's range: {ids.min()}..{ids.max()}")
    return {
        "y": (ids[..., None] + 1).astype(np.float32) * SCALE,
        "total": ids.sum(1, keepdims=True).astype(np.float32),
    }


class ToyEngine(GpuEngineBase):
    kind = "toy"

    def __init__(self, rt: FakeRuntime) -> None:
        cfg = parse_config(
            {"workers": {"device": "gpu"}, "pipeline": {"cuda_graphs": True}}, check_files=False
        )
        super().__init__(cfg, rt)
        self.inputs = (TensorSpec("ids", np.dtype(np.int64), ("seq",)),)
        self.outputs = (
            TensorSpec("y", np.dtype(np.float32), ("seq", 3)),
            TensorSpec("total", np.dtype(np.float32), (1,)),
        )
        self.dims = (DynamicDim("seq", 1, 8, (4, 8)),)
        self.max_batch = 8

    def _shape(self, spec: TensorSpec, dims: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(dims[0] if d == "seq" else d for d in spec.item_shape)  # type: ignore[misc]

    def _launch_keys(self) -> list[tuple[int, ...]]:
        return launch_keys(self.dims)

    def _row_bytes(self, dims: tuple[int, ...]) -> tuple[list[int], list[int]]:
        return (
            [int(np.prod(self._shape(s, dims))) * s.dtype.itemsize for s in self.inputs],
            [int(np.prod(self._shape(s, dims))) * s.dtype.itemsize for s in self.outputs],
        )

    def _alloc_tensor(self, slot: GpuSlot, spec: TensorSpec, rows: int) -> tuple[np.ndarray, object, int]:
        item = self._shape(spec, (8,))
        row_bytes = int(np.prod(item)) * spec.dtype.itemsize
        host, dev = self.rt.PinnedBuffer(row_bytes * rows), self.rt.DeviceBuffer(row_bytes * rows)
        slot.buffers += [host, dev]
        slot.device[spec.name] = dev
        return host.view(spec.dtype, (rows, *item)), dev, row_bytes

    def _compute(self, slot: GpuSlot, rows: int) -> bool:
        length = slot.dims[0]
        ids = slot.device["ids"].view(np.int64, (rows, length))
        out = model(ids)
        slot.device["y"].view(np.float32, (rows, length, 3))[...] = out["y"]
        slot.device["total"].view(np.float32, (rows, 1))[...] = out["total"]
        return True


@pytest.fixture
def setup(tmp_path: Path):
    rt = FakeRuntime()
    engine = ToyEngine(rt)
    arena = Arena(tmp_path, "w0", 4, 2)
    engine.attach_arena(arena.addr, arena.size)
    pipe = Pipeline(engine, 2, 64, 0, (1, 2, 4, 8), arena=arena)
    engine.warmup(pipe.slots, pipe.buckets)
    engine.mark_ready()
    yield engine, pipe, arena
    engine.close()
    arena.close()


def test_mixed_sizes_frames_and_shared_memory_match_the_model(setup) -> None:
    engine, pipe, arena = setup
    lease = arena.attach(os.getpid(), 1 << 20)
    pipe.dma_min_bytes = 1  # every shared-memory request at its bucket's size goes by DMA
    rng = np.random.default_rng(7)
    free = [lease.offset]
    sent: list[tuple[Request, dict[str, np.ndarray]]] = []
    shm_parts_seen = 0
    for i in range(40):
        rows, length = int(rng.integers(1, 4)), int(rng.choice([1, 3, 4, 6, 8]))
        ids = rng.integers(1, 100, (rows, length), dtype=np.int64)
        if i % 2:  # shared memory: the inputs and outputs in spans of the lease
            off = free[0]
            arena.view(off, np.dtype(np.int64), ids.shape)[...] = ids
            y_off = off + ids.nbytes
            t_off = y_off + rows * length * 3 * 4
            free[0] = t_off + rows * 4
            rows_ = pipe.check_specs([("ids", np.dtype(np.int64), ids.shape)])
            req = Request(None, i, None, rows_, 0, shm=ShmSpans(lease, [off], [y_off, t_off], free[0] - off))
        else:
            req = Request(None, i, {"ids": ids}, pipe.check({"ids": ids}), 0)
        req.dims = pipe.bound
        req.key = pipe.key_of(req.dims)
        assert pipe.offer(req)
        sent.append((req, model(ids)))
    got: dict[int, dict[str, np.ndarray]] = {}

    def complete(batch) -> None:
        for req, off in batch.parts:
            if req.shm is None:
                got[req.request_id] = {n: pipe.output_view(batch, n, off, req).copy() for n in ("y", "total")}

    while pipe.queue or pipe.inflight:
        while pipe.queue and pipe.free:
            batch = pipe.launch_next(0, lambda r: None)
            shm_parts_seen += len(batch.slot.shm_parts)
        pipe.wait_oldest()
        pipe.complete_oldest(complete)
    assert shm_parts_seen > 0, "no request went by DMA"
    for req, want in sent:
        if req.shm is None:
            out = got[req.request_id]
        else:
            n, length = req.rows, req.dims[0]
            out = {
                "y": arena.view(req.shm.outputs[0], np.dtype(np.float32), (n, length, 3)),
                "total": arena.view(req.shm.outputs[1], np.dtype(np.float32), (n, 1)),
            }
        for name in ("y", "total"):
            np.testing.assert_array_equal(out[name], want[name], err_msg=f"request {req.request_id} {name}")


def test_every_batch_and_size_bucket_has_both_graphs(setup) -> None:
    engine, pipe, _ = setup
    for slot in pipe.slots:
        keys = {(rows, dims) for rows in (1, 2, 4, 8) for dims in ((4,), (8,))}
        assert set(slot.graphs) == keys and set(slot.compute_graphs) == keys


def test_remembered_checks_give_each_shape_its_own_sizes_and_never_skip_a_refusal(setup) -> None:
    from orchestrator.common.errors import InvalidInputError

    _, pipe, _ = setup
    ids = np.dtype(np.int64)
    for _ in range(2):  # the second round is answered from what the first remembered
        assert pipe.check_specs([("ids", ids, (3, 6))]) == 3 and pipe.bound == (6,)
        assert pipe.check_specs([("ids", ids, (2, 4))]) == 2 and pipe.bound == (4,)
        for bad in ([("ids", ids, (2, 9))], [("ids", np.dtype(np.int32), (2, 4))]):
            with pytest.raises(InvalidInputError):
                pipe.check_specs(bad)
