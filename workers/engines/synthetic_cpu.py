"""The synthetic engine on the CPU: the numpy reference of the GPU kernel, computed synchronously.

Runs on the worker's serving thread. work = 0 is the no-work engine used by the CPU benchmark.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.common.config import Config
from workers.engines import synthetic_math
from workers.engines.base import Engine, Slot, TensorSpec


class SyntheticCpuEngine(Engine):
    kind = "synthetic"
    synchronous = True
    computes_views = True

    def __init__(self, cfg: Config) -> None:
        shape = tuple(cfg.model.item_shape)
        self.inputs = (TensorSpec("x", synthetic_math.DTYPE, shape),)
        self.outputs = (TensorSpec("y", synthetic_math.DTYPE, shape),)
        self.max_batch = cfg.model.max_batch
        self.work = cfg.model.work

    def create_slots(self, depth: int) -> list[Slot]:
        shape = (self.max_batch, *(int(d) for d in self.inputs[0].item_shape))  # a static shape
        return [
            Slot(
                i,
                {"x": np.zeros(shape, np.float32)},
                {"y": np.zeros(shape, np.float32)},
                extra={"tmp": np.zeros(shape, np.float32)},
            )
            for i in range(depth)
        ]

    def launch(self, slot: Slot, rows: int) -> None:
        # Synchronous: the batch is finished when launch returns, so done() is always True.
        synthetic_math.reference(slot.inputs["x"][:rows], self.work, out=slot.outputs["y"][:rows])

    def compute_views(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        synthetic_math.reference(inputs["x"], self.work, out=outputs["y"])

    def done(self, slot: Slot) -> bool:
        return True

    def wait(self, slot: Slot) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "device": "cpu", "work": self.work}
