"""Serving-thread cost of host-side paths, on the CPU with no GPU (no-op or stand-in CUDA layers), for
before/after comparisons of changes to them:

    python scripts/bench_host_paths.py enqueue   # GpuEngineBase._enqueue_eager / _enqueue_shm, static model
    python scripts/bench_host_paths.py dims      # the pipeline's check / stage+launch / complete for four
                                                 # bert-sized (16 x 128) shared-memory requests
    python scripts/bench_host_paths.py header    # orchestrator.common.protocol.decode_request_header on a
                                                 # shared-memory and a frames INFER header, two tensors each

`enqueue` drives a GPU engine over a CUDA stand-in whose copies do nothing, so the figure is the Python
around the driver calls. `dims` drives workers.pipeline.Pipeline with a do-nothing asynchronous engine that
has a dynamic `seq` dimension, over a real shared-memory arena in /tmp. `header` times the worker's decode of
a request header (orchestrator/common/protocol.py), the first thing the serving thread does with each request.
Figures are noisy on a shared VM: run each a few times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.common.config import parse_config  # noqa: E402
from orchestrator.common.protocol import decode_request_header, encode_request, encode_shm_request  # noqa: E402
from tests.unit.fake_cuda import FakeRuntime  # noqa: E402
from workers.arena import Arena  # noqa: E402
from workers.engines.base import Engine, Slot, TensorSpec  # noqa: E402
from workers.engines.dims import DynamicDim  # noqa: E402
from workers.engines.gpu_base import GpuEngineBase  # noqa: E402
from workers.pipeline import Pipeline, Request, ShmSpans  # noqa: E402


class _NoCopies(FakeRuntime):
    @staticmethod
    def copy_htod_async(dst: int, src: int, nbytes: int, stream: object) -> None:
        pass

    @staticmethod
    def copy_dtoh_async(dst: int, src: int, nbytes: int, stream: object) -> None:
        pass


class _StaticGpu(GpuEngineBase):
    kind = "toy"

    def __init__(self) -> None:
        super().__init__(parse_config({"workers": {"device": "gpu"}}, check_files=False), _NoCopies())
        self.inputs = (TensorSpec("x", np.dtype(np.float32), (256,)),)
        self.outputs = (TensorSpec("y", np.dtype(np.float32), (256,)),)
        self.max_batch = 64

    def _compute(self, slot: object, rows: int) -> bool:
        return True


def enqueue(n: int = 200_000) -> None:
    e = _StaticGpu()
    s = e.create_slots(1)[0]
    e.arena_addr = 1 << 20
    s.shm_parts = [(0, 4, [0], [4096])]
    eager = min(timeit.repeat(lambda: e._enqueue_eager(s, 64), number=n, repeat=5)) / n * 1e9  # type: ignore[arg-type]
    shm = min(timeit.repeat(lambda: e._enqueue_shm(s, 64), number=n, repeat=5)) / n * 1e9  # type: ignore[arg-type]
    print(f"_enqueue_eager {eager:.0f} ns, _enqueue_shm {shm:.0f} ns (no-op copies)")


class _AsyncDims(Engine):
    kind = "fake"
    synchronous = False
    pads_to_buckets = True

    def __init__(self) -> None:
        self.inputs = (
            TensorSpec("input_ids", np.dtype(np.int64), ("seq",)),
            TensorSpec("attention_mask", np.dtype(np.int64), ("seq",)),
        )
        self.outputs = (
            TensorSpec("last_hidden_state", np.dtype(np.float16), ("seq", 128)),
            TensorSpec("pooler_output", np.dtype(np.float16), (128,)),
        )
        self.dims = (DynamicDim("seq", 1, 128, (32, 64, 128)),)
        self.max_batch = 256

    def create_slots(self, depth: int) -> list[Slot]:
        return [
            Slot(
                i,
                {s.name: np.zeros((256, 128), np.int64) for s in self.inputs},
                {
                    "last_hidden_state": np.ones((256, 128, 128), np.float16),
                    "pooler_output": np.ones((256, 128), np.float16),
                },
            )
            for i in range(depth)
        ]

    def launch(self, slot: Slot, rows: int) -> None:
        pass

    def done(self, slot: Slot) -> bool:
        return True

    def wait(self, slot: Slot) -> None:
        pass


def dims(length: int = 128, batches: int = 2000, per_batch: int = 4) -> None:
    with tempfile.TemporaryDirectory(prefix="bhp-") as tmp:
        arena = Arena(Path(tmp), "w0", 256, 64)
        lease = arena.attach(os.getpid(), 64 << 20)
        p = Pipeline(_AsyncDims(), 2, 1024, 100, (1, 2, 4, 8, 16, 32, 64, 128, 256), arena=arena)
        rows = 16
        in_b = rows * length * 8
        out_b = rows * length * 128 * 2 + rows * 128 * 2
        base = lease.offset
        for k in range(2):
            arena.view(base + k * in_b, np.dtype(np.int64), (rows, length))[...] = 1
        specs = [
            ("input_ids", np.dtype(np.int64), (rows, length)),
            ("attention_mask", np.dtype(np.int64), (rows, length)),
        ]
        spans = ShmSpans(
            lease,
            [base, base + in_b],
            [base + 2 * in_b, base + 2 * in_b + rows * length * 256],
            in_b * 2 + out_b,
        )
        t = {"check": 0.0, "launch": 0.0, "complete": 0.0}
        for it in range(batches):
            t0 = time.perf_counter()
            for k in range(per_batch):
                req = Request(None, it * 10 + k, None, p.check_specs(specs), 0, 0, None, spans)
                req.dims = p.bound
                req.key = p.key_of(req.dims)
                p.offer(req)
            t1 = time.perf_counter()
            p.launch_next(0, lambda r: None)
            t2 = time.perf_counter()
            p.complete_oldest(lambda b: None)
            t3 = time.perf_counter()
            t["check"] += t1 - t0
            t["launch"] += t2 - t1
            t["complete"] += t3 - t2
        arena.close()
    print(
        f"seq {length}: per batch of {per_batch} x {rows} rows (us):",
        {k: round(v / batches * 1e6, 1) for k, v in t.items()},
    )


def header(n: int = 200_000) -> None:
    """The worker's header decode for two typical requests (bert-like: two int64 16 x 128 inputs): the best
    of 7 runs of n."""
    specs = [["input_ids", "<i8", [16, 128], 0], ["attention_mask", "<i8", [16, 128], 16384]]
    shm = encode_shm_request(123456, specs, 7, 32768, 5000)[0]
    x = np.zeros((16, 128), np.int64)
    frames = encode_request(123457, {"input_ids": x, "attention_mask": x}, 5000)[0]
    for label, data in (("shm INFER", shm), ("frames INFER", frames)):
        decode_request_header(data)  # the dtype cache warm, as in a serving worker
        best = min(timeit.repeat(lambda d=data: decode_request_header(d), number=n, repeat=7))
        print(f"decode_request_header, {label} header of {len(data)} bytes: {best / n * 1e6:.2f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["enqueue", "dims", "header"])
    ap.add_argument("--seq", type=int, default=128, help="dims: the requests' sequence length (1-128)")
    a = ap.parse_args()
    if a.what == "enqueue":
        enqueue()
    elif a.what == "header":
        header()
    else:
        dims(a.seq)


if __name__ == "__main__":
    main()
