"""ONNX Runtime on the CPU: serves any ONNX model whose inputs and outputs have a leading batch dimension,
and other dynamic dimensions ([batch, seq] for NLP models) within the ranges [[model.dims]] declares.

Runs on the worker's serving thread; tensor names, dtypes and item shapes are read from the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.common.config import Config
from orchestrator.common.errors import EngineError
from workers.engines.base import Engine, Slot, TensorSpec
from workers.engines.dims import batch_view, model_dims

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _spec(arg: Any, where: str) -> TensorSpec:
    """A tensor's spec from ONNX Runtime: dynamic dimensions keep their dim_param name (an unnamed one is
    called `<tensor>.<axis>`, the name [[model.dims]] then uses)."""
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise EngineError(f"{where} {arg.name!r} has type {arg.type}, which this engine does not serve")
    shape = list(arg.shape)
    if not shape:
        raise EngineError(f"{where} {arg.name!r} is a scalar; a leading batch dimension is required")
    item: list[int | str] = []
    for axis, d in enumerate(shape[1:], start=1):
        if isinstance(d, int) and d > 0:
            item.append(d)
        elif isinstance(d, str) and d:
            item.append(d)
        else:
            item.append(f"{arg.name}.{axis}")
    return TensorSpec(arg.name, np.dtype(dtype), tuple(item))


class OnnxCpuEngine(Engine):
    kind = "onnx"
    synchronous = True
    computes_views = True

    def __init__(self, cfg: Config) -> None:
        try:
            import onnxruntime as ort  # heavy import: only in workers that serve ONNX
        except ModuleNotFoundError:
            raise EngineError(
                "ONNX models need onnxruntime, not installed here: pip install 'orchestrator[server]'"
            ) from None

        opts = ort.SessionOptions()
        if cfg.model.intra_op_threads:
            opts.intra_op_num_threads = cfg.model.intra_op_threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(cfg.model.path, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise EngineError(f"cannot load ONNX model {cfg.model.path}: {exc}") from None
        self.inputs, self.outputs, self.dims = model_dims(
            [_spec(a, "input") for a in self.session.get_inputs()],
            [_spec(a, "output") for a in self.session.get_outputs()],
            {},
            cfg.model.dims,
            need_buckets=False,
            where=f"ONNX model {cfg.model.path}",
        )
        self._largest = tuple(d.hi for d in self.dims)
        self.max_batch = cfg.model.max_batch
        self.path = cfg.model.path
        self._out_names = [o.name for o in self.outputs]

    def create_slots(self, depth: int) -> list[Slot]:
        def alloc(specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
            return {
                s.name: np.zeros((self.max_batch, *self.item_shape_at(s, self._largest)), s.dtype)
                for s in specs
            }

        return [Slot(i, alloc(self.inputs), alloc(self.outputs)) for i in range(depth)]

    def warmup(self, slots: list[Slot], buckets: tuple[int, ...]) -> None:
        slots[0].dims = self._largest
        for rows in (1, self.max_batch):
            self.launch(slots[0], rows)

    def launch(self, slot: Slot, rows: int) -> None:
        if not self.dims:
            feeds = {name: arr[:rows] for name, arr in slot.inputs.items()}
            self.compute_views(feeds, {name: arr[:rows] for name, arr in slot.outputs.items()})
            return
        d = slot.dims
        self.compute_views(
            {s.name: batch_view(slot.inputs[s.name], rows, self.item_shape_at(s, d)) for s in self.inputs},
            {s.name: batch_view(slot.outputs[s.name], rows, self.item_shape_at(s, d)) for s in self.outputs},
        )

    def compute_views(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        # ONNX Runtime reads the inputs in place (views of the arena or of the slot) and returns new arrays.
        results = self.session.run(self._out_names, inputs)
        for name, value in zip(self._out_names, results, strict=True):
            out = outputs[name]
            if value.shape != out.shape:
                raise EngineError(
                    f"model output {name!r} has shape {list(value.shape)}, expected {list(out.shape)}"
                )
            out[...] = value

    def done(self, slot: Slot) -> bool:
        return True

    def wait(self, slot: Slot) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "device": "cpu", "path": self.path}
