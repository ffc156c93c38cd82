"""The TensorRT adapter against a fake `tensorrt` module and a CPU stand-in for the CUDA layer: its call
sequence (deserialize -> one context per slot -> addresses -> shapes -> execute_async_v3), results through
the real Pipeline, graph use, and every load error path. Needs neither CUDA nor TensorRT."""

from __future__ import annotations

import ctypes
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.common.config import parse_config
from orchestrator.common.errors import EngineError
from tests.unit.fake_cuda import FakeRuntime
from workers.driver_journal import JOURNAL
from workers.engines import tensorrt_engine
from workers.engines.tensorrt_engine import TensorRTEngine
from workers.pipeline import Pipeline, Request

GOOD = b"FAKEPLAN"

# --- a fake tensorrt module: y = 2 * x + 1 over a (batch, 4) float32 input ---------------------------

SEV = types.SimpleNamespace(**{k: types.SimpleNamespace(name=k) for k in ("ERROR", "WARNING", "INFO")})
BAD_PLANS = [
    (
        b"OLDVER",
        "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization assertion "
        "stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not match.)",
    ),
    (
        b"OTHERGPU",
        "The engine plan file is generated on an incompatible device, expecting compute 8.6 "
        "got compute 9.0, please rebuild.",
    ),
    (b"NOTVC", "Unexpected call to stub loadRunner for ReformatRunner"),
]
GARBAGE = (
    "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
    "(Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)"
)


class Opts(types.SimpleNamespace):
    """How the fake plan behaves: batch range or static batch, dtype, failures; `calls` records the API use."""

    calls: list[tuple]
    batch: tuple[int, int]
    static: int | None
    dtype: str
    fail_execute: bool
    runtime_errors: tuple[str, ...]


class FakeContext:
    def __init__(self, o: Opts) -> None:
        self.o = o
        self.addr: dict[str, int] = {}
        self.rows = 0

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.o.calls.append(("set_tensor_address", name))
        self.addr[name] = ptr
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.o.calls.append(("set_input_shape", name, tuple(shape)))
        lo, hi = self.o.batch if self.o.static is None else (self.o.static, self.o.static)
        ok = lo <= shape[0] <= hi
        self.rows = shape[0] if ok else self.rows
        return ok

    def infer_shapes(self) -> list[str]:
        return []

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.rows, 4)

    def execute_async_v3(self, stream: int) -> bool:
        self.o.calls.append(("execute_async_v3", stream, self.rows))
        if self.o.fail_execute:
            return False
        n = self.rows * 4
        x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addr["input"]))
        y = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addr["output"]))
        y[:] = x * 2 + 1
        return True


class FakeEngine:
    num_io_tensors = 2
    num_optimization_profiles = 1

    def __init__(self, o: Opts) -> None:
        self.o = o

    def get_tensor_name(self, i: int) -> str:
        return ["input", "output"][i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "input" else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return self.o.dtype

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.o.static if self.o.static is not None else -1, 4)

    def get_tensor_location(self, name: str) -> str:
        return "DEVICE"

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        lo, hi = self.o.batch
        return [(lo, 4), (hi, 4), (hi, 4)]

    def create_execution_context(self) -> FakeContext:
        self.o.calls.append(("create_execution_context",))
        return FakeContext(self.o)


class FakeTrtRuntime:
    opts: Opts  # set per fake module

    def __init__(self, logger: Any) -> None:
        self.opts.calls.append(("Runtime",))
        self.logger = logger
        self.engine_host_code_allowed = False
        for msg in self.opts.runtime_errors:
            logger.log(SEV.ERROR, msg)

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        self.opts.calls.append(("deserialize_cuda_engine", len(data)))
        if data.startswith(GOOD):
            self.logger.log(SEV.INFO, "loaded")
            return FakeEngine(self.opts)
        msg = next((m for marker, m in BAD_PLANS if data.startswith(marker)), GARBAGE)
        self.logger.log(SEV.ERROR, msg)
        return None


class FakeILogger:
    def __init__(self) -> None:
        pass


def _nptype(dt: str) -> type:
    if dt != "FLOAT":
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return np.float32


def make_fake_trt(
    calls: list[tuple],
    *,
    batch: tuple[int, int] = (1, 16),
    static: int | None = None,
    dtype: str = "FLOAT",
    fail_execute: bool = False,
    runtime_errors: tuple[str, ...] = (),
) -> Any:
    opts = Opts(
        calls=calls,
        batch=batch,
        static=static,
        dtype=dtype,
        fail_execute=fail_execute,
        runtime_errors=runtime_errors,
    )
    trt = types.ModuleType("fake_tensorrt")
    trt.__version__ = "11.4.0"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT", NONE="NONE")
    trt.TensorLocation = types.SimpleNamespace(DEVICE="DEVICE", HOST="HOST")
    trt.nptype = _nptype
    trt.ILogger = FakeILogger
    trt.Runtime = type("Runtime", (FakeTrtRuntime,), {"opts": opts})
    return trt


def config(tmp_path: Path, plan: bytes | None = GOOD, **pipeline: Any) -> Any:
    path = tmp_path / "model.plan"
    if plan is not None:
        path.write_bytes(plan)
    raw = {
        "workers": {"device": "gpu"},
        "model": {"kind": "tensorrt", "path": str(path), "max_batch": pipeline.pop("max_batch", 8)},
        "pipeline": {"depth": 2, **pipeline},
    }
    return parse_config(raw, check_files=False)


@pytest.fixture(autouse=True)
def _journal_not_ready():
    JOURNAL.ready = False
    yield
    JOURNAL.ready = False


def run_batches(engine: TensorRTEngine, depth: int, sizes: list[int], buckets: tuple[int, ...]) -> None:
    """Drive `sizes` through the real Pipeline and check y = 2x + 1 for every request."""
    pipe = Pipeline(engine, depth, max_queue=64, max_queue_delay_us=0, buckets=buckets)
    engine.warmup(pipe.slots, pipe.buckets)
    engine.mark_ready()
    rng = np.random.default_rng(0)
    results: dict[int, np.ndarray] = {}
    inputs: dict[int, np.ndarray] = {}

    def complete(batch: Any) -> None:
        for r, off in batch.parts:
            results[r.request_id] = batch.slot.outputs["output"][off : off + r.rows].copy()

    for i, rows in enumerate(sizes):
        x = rng.random((rows, 4), dtype=np.float32)
        inputs[i] = x
        assert pipe.offer(Request(f"c{i}", i, {"input": x}, rows, 0))
        pipe.launch_next(0, lambda r: None)
        while pipe.inflight:
            pipe.wait_oldest()
            pipe.complete_oldest(complete)
    for i, x in inputs.items():
        np.testing.assert_array_equal(results[i], x * 2 + 1)


def test_call_sequence_and_results_without_graphs(tmp_path: Path) -> None:
    calls: list[tuple] = []
    rt = FakeRuntime()
    eng = TensorRTEngine(config(tmp_path, sync="spin"), trt=make_fake_trt(calls), rt=rt)
    assert rt.sched == "spin"
    assert [s.name for s in eng.inputs] == ["input"] and eng.inputs[0].item_shape == (4,)
    assert eng.outputs[0].dtype == np.float32 and not eng.pads_to_buckets
    assert [c[0] for c in calls[:2]] == ["Runtime", "deserialize_cuda_engine"]
    assert eng.logger.capturing is False and ("INFO", "loaded") in eng.logger.messages
    calls.clear()
    run_batches(eng, 2, [3, 8, 1, 5], buckets=(1, 2, 4, 8))
    names = [c[0] for c in calls]
    # one context per slot, addresses bound right after it, then shapes, then enqueues
    assert names[:4] == [
        "create_execution_context",
        "set_tensor_address",
        "set_tensor_address",
        "set_input_shape",
    ]
    assert names.count("create_execution_context") == 2
    assert names.index("execute_async_v3") > names.index("set_input_shape")
    executed = [c[2] for c in calls if c[0] == "execute_async_v3"]
    assert executed[-4:] == [3, 8, 1, 5]  # eager: exact batch sizes, no padding
    streams = {slot.stream.ptr for slot in eng.slots}
    assert {c[1] for c in calls if c[0] == "execute_async_v3"} == streams  # each slot's own stream
    d = eng.describe()
    assert d["module_loading"] == "EAGER" and d["batch_range"] == [1, 16] and d["cuda_graphs"] is False
    eng.close()


def test_graphs_are_captured_per_slot_and_bucket_and_replayed(tmp_path: Path) -> None:
    calls: list[tuple] = []
    rt = FakeRuntime()
    eng = TensorRTEngine(
        config(tmp_path, cuda_graphs=True, buckets=[2, 4, 8]), trt=make_fake_trt(calls), rt=rt
    )
    assert eng.pads_to_buckets
    run_batches(eng, 2, [3, 8, 1], buckets=(2, 4, 8))
    captures = [e for e in rt.log if e[0] == "capture"]
    assert len(captures) == 2 * 3
    assert eng.describe()["cuda_graphs"] is True and eng.graphs_captured == 6
    launches = [e for e in rt.log if e[0] == "graph_launch"]
    assert len(launches) >= 3 + 6  # warm-up replays plus the three batches
    executed = [c[2] for c in calls if c[0] == "execute_async_v3"]
    assert executed[-3:] == [4, 8, 2]  # padded to buckets
    eng.close()


def test_capture_failure_falls_back_to_eager(tmp_path: Path) -> None:
    calls: list[tuple] = []
    rt = FakeRuntime()
    rt.capture = lambda stream, enqueue, detail="": None  # type: ignore[method-assign]
    eng = TensorRTEngine(config(tmp_path, cuda_graphs=True, buckets=[4, 8]), trt=make_fake_trt(calls), rt=rt)
    run_batches(eng, 1, [3, 7], buckets=(4, 8))
    assert eng.graph_failures == 2 and eng.describe()["cuda_graphs"] is False


def test_batches_below_profile_minimum_run_padded(tmp_path: Path) -> None:
    calls: list[tuple] = []
    eng = TensorRTEngine(config(tmp_path), trt=make_fake_trt(calls, batch=(4, 16)), rt=FakeRuntime())
    run_batches(eng, 1, [1, 6], buckets=(8,))
    executed = [c[2] for c in calls if c[0] == "execute_async_v3"]
    assert executed[-2:] == [4, 6]


def test_static_batch_plan(tmp_path: Path) -> None:
    calls: list[tuple] = []
    eng = TensorRTEngine(config(tmp_path, max_batch=8), trt=make_fake_trt(calls, static=8), rt=FakeRuntime())
    assert (eng.min_batch, eng.profile_max) == (8, 8)
    run_batches(eng, 2, [3, 8], buckets=(8,))
    assert all(c[2] == 8 for c in calls if c[0] == "execute_async_v3")


@pytest.mark.parametrize(
    ("plan", "fragment"),
    [
        (None, "TensorRT plan not found"),
        (b"", "the file is empty"),
        (b"\x00garbage" * 64, "not a TensorRT plan, or it is truncated"),
        (b"OLDVER", "another TensorRT version"),
        (b"OTHERGPU", "built for another GPU (this one is Fake GPU, compute capability 9.0)"),
        (b"NOTVC", "not version-compatible"),
    ],
)
def test_load_errors_are_clear(tmp_path: Path, plan: bytes | None, fragment: str) -> None:
    with pytest.raises(EngineError) as err:
        TensorRTEngine(config(tmp_path, plan), trt=make_fake_trt([]), rt=FakeRuntime())
    assert fragment in str(err.value)
    assert "model.plan" in str(err.value)


def test_garbage_error_quotes_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="Magic tag does not match"):
        TensorRTEngine(config(tmp_path, b"junk"), trt=make_fake_trt([]), rt=FakeRuntime())


def test_max_batch_beyond_profile_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"model.max_batch = 32 exceeds .*input 'input' allows batch 1..16"):
        TensorRTEngine(config(tmp_path, max_batch=32), trt=make_fake_trt([]), rt=FakeRuntime())


def test_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="type BF16 has no numpy equivalent"):
        TensorRTEngine(config(tmp_path), trt=make_fake_trt([], dtype="BF16"), rt=FakeRuntime())


def test_runtime_start_failure_is_reported_before_deserializing(tmp_path: Path) -> None:
    calls: list[tuple] = []
    msg = "createInferRuntime: Error Code 6: API Usage Error (CUDA initialization failure with error: 35)"
    with pytest.raises(EngineError, match="failed to start: createInferRuntime"):
        TensorRTEngine(config(tmp_path), trt=make_fake_trt(calls, runtime_errors=(msg,)), rt=FakeRuntime())
    assert ("deserialize_cuda_engine", len(GOOD)) not in calls


def test_execute_failure_raises(tmp_path: Path) -> None:
    eng = TensorRTEngine(config(tmp_path), trt=make_fake_trt([], fail_execute=True), rt=FakeRuntime())
    pipe = Pipeline(eng, 1, max_queue=4, max_queue_delay_us=0, buckets=(8,))
    with pytest.raises(EngineError, match="execute_async_v3 failed"):
        eng.warmup(pipe.slots, pipe.buckets)


def test_trust_host_code_sets_runtime_flag(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    import dataclasses

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, trust_host_code=True))
    eng = TensorRTEngine(cfg, trt=make_fake_trt([]), rt=FakeRuntime())
    assert eng.runtime.engine_host_code_allowed is True


def test_no_tensorrt_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str) -> None:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(tensorrt_engine.importlib, "import_module", fail)
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        tensorrt_engine.import_tensorrt("auto")


def test_runtime_choice_order(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[str] = []

    def fake_import(name: str) -> Any:
        tried.append(name)
        if name == "tensorrt_lean_bindings":
            return types.ModuleType(name)
        raise ImportError(name)

    monkeypatch.setattr(tensorrt_engine.importlib, "import_module", fake_import)
    mod, kind = tensorrt_engine.import_tensorrt("auto")
    assert kind == "tensorrt_lean" and mod.__name__ == "tensorrt_lean_bindings"
    assert tried == ["tensorrt", "tensorrt_bindings", "tensorrt_lean", "tensorrt_lean_bindings"]
    tried.clear()
    with pytest.raises(EngineError):
        tensorrt_engine.import_tensorrt("tensorrt")
    assert tried == ["tensorrt", "tensorrt_bindings"]


class FakeRegistration:
    def __init__(self, ptr: int, nbytes: int, detail: str = "") -> None:
        self.ptr = ptr

    def free(self) -> None:
        self.ptr = 0


def test_shared_memory_batches_copy_spans_around_the_compute_graph(tmp_path: Path) -> None:
    """The GPU engines' shared-memory path on the fake runtime: each request's spans are copied between the
    arena and its device rows around a compute-only graph (one per slot and bucket, beside the full one),
    mixed with a staged frame request in the same batch."""
    from workers.arena import Arena
    from workers.pipeline import ShmSpans

    calls: list[tuple] = []
    rt = FakeRuntime()
    rt.HostRegistration = FakeRegistration  # type: ignore[attr-defined]
    eng = TensorRTEngine(
        config(tmp_path, cuda_graphs=True, buckets=[2, 4, 8]), trt=make_fake_trt(calls), rt=rt
    )
    arena = Arena(tmp_path, "w0", 1, 1)
    assert eng.attach_arena(arena.addr, arena.size)
    pipe = Pipeline(eng, 2, max_queue=64, max_queue_delay_us=0, buckets=(2, 4, 8), arena=arena)
    pipe.dma_min_bytes = 0  # every shared-memory request by DMA, however small
    eng.warmup(pipe.slots, pipe.buckets)
    eng.mark_ready()
    assert eng.graphs_captured == 2 * 3 * 2  # full and compute-only, per slot and bucket
    rng = np.random.default_rng(1)
    framed = rng.random((2, 4), dtype=np.float32)
    shared = rng.random((3, 4), dtype=np.float32)
    arena.view(0, np.dtype(np.float32), (3, 4))[...] = shared
    arena.view(4096, np.dtype(np.float32), (3, 4))[...] = np.nan
    assert pipe.offer(Request("f", 1, {"input": framed}, 2, 0))
    assert pipe.offer(Request("s", 2, None, 3, 0, shm=ShmSpans(None, [0], [4096], 96)))
    batch = pipe.launch_next(0, lambda r: None)
    assert batch is not None and batch.padded == 8 and batch.slot.frames_rows == 2
    pipe.wait_oldest()
    got: dict[int, np.ndarray] = {}
    pipe.complete_oldest(lambda b: got.update({1: b.slot.outputs["output"][:2].copy()}))
    np.testing.assert_array_equal(got[1], framed * 2 + 1)
    np.testing.assert_array_equal(arena.view(4096, np.dtype(np.float32), (3, 4)), shared * 2 + 1)
    eng.close()
    arena.close()
