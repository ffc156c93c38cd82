"""ONNX Runtime on the CPU: serves any ONNX model whose inputs and outputs have a leading batch dimension.

Runs on the worker's serving thread; tensor names, dtypes and item shapes are read from the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.config import Config
from orchestrator.errors import EngineError
from workers.engines.base import Engine, Slot, TensorSpec

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def _spec(arg: Any, where: str) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise EngineError(f"{where} {arg.name!r} has type {arg.type}, which this engine does not serve")
    shape = list(arg.shape)
    if not shape:
        raise EngineError(f"{where} {arg.name!r} is a scalar; a leading batch dimension is required")
    item = shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in item):
        raise EngineError(f"{where} {arg.name!r} has shape {shape}: only the first (batch) dimension may be dynamic")
    return TensorSpec(arg.name, np.dtype(dtype), tuple(item))


class OnnxCpuEngine(Engine):
    kind = "onnx"
    synchronous = True
    computes_views = True

    def __init__(self, cfg: Config) -> None:
        import onnxruntime as ort  # heavy import: only in workers that serve ONNX

        opts = ort.SessionOptions()
        if cfg.model.intra_op_threads:
            opts.intra_op_num_threads = cfg.model.intra_op_threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(cfg.model.path, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise EngineError(f"cannot load ONNX model {cfg.model.path}: {exc}") from None
        self.inputs = tuple(_spec(a, "input") for a in self.session.get_inputs())
        self.outputs = tuple(_spec(a, "output") for a in self.session.get_outputs())
        self.max_batch = cfg.model.max_batch
        self.path = cfg.model.path
        self._out_names = [o.name for o in self.outputs]

    def create_slots(self, depth: int) -> list[Slot]:
        def alloc(specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
            return {s.name: np.zeros((self.max_batch, *s.item_shape), s.dtype) for s in specs}

        return [Slot(i, alloc(self.inputs), alloc(self.outputs)) for i in range(depth)]

    def warmup(self, slots: list[Slot], buckets: tuple[int, ...]) -> None:
        for rows in (1, self.max_batch):
            self.launch(slots[0], rows)

    def launch(self, slot: Slot, rows: int) -> None:
        feeds = {name: arr[:rows] for name, arr in slot.inputs.items()}
        self.compute_views(feeds, {name: arr[:rows] for name, arr in slot.outputs.items()})

    def compute_views(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        # ONNX Runtime reads the inputs in place (views of the arena or of the slot) and returns new arrays.
        results = self.session.run(self._out_names, inputs)
        for name, value in zip(self._out_names, results, strict=True):
            out = outputs[name]
            if value.shape != out.shape:
                raise EngineError(f"model output {name!r} has shape {list(value.shape)}, expected {list(out.shape)}")
            out[...] = value

    def done(self, slot: Slot) -> bool:
        return True

    def wait(self, slot: Slot) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "device": "cpu", "path": self.path}
