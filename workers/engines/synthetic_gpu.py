"""The synthetic engine on a GPU: synthetic_math's NVRTC kernel, bit-exact with the numpy reference.

Runs in a GPU worker process on its serving thread. Input "x" and output "y" are float32 of shape
(batch, *model.item_shape); model.work sets the iterations per element and so the GPU time per batch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from orchestrator.common.config import Config
from orchestrator.common.errors import EngineError
from workers.cuda.context import device_attribute
from workers.cuda.module import (
    KernelArgs,
    Module,
    allow_dynamic_smem,
    compile_cubin,
    launch_kernel,
    max_active_blocks,
    nvrtc_version,
)
from workers.engines import synthetic_math
from workers.engines.base import Slot, TensorSpec
from workers.engines.gpu_base import GpuEngineBase, GpuSlot

log = logging.getLogger(__name__)

KERNEL = "synthetic"
BLOCK = 256
# --fmad=false: no fused multiply-add contraction, so `v * 3 + x` rounds twice, exactly like numpy.
NVRTC_OPTIONS = ("--fmad=false", "--std=c++17")


class SyntheticGpuEngine(GpuEngineBase):
    """y = synthetic_math.reference(x, work), one thread per element."""

    kind = "synthetic"

    def __init__(self, cfg: Config, rt: Any = None) -> None:
        super().__init__(cfg, rt)
        m = cfg.model
        self.work = m.work
        self.item_shape = tuple(m.item_shape)
        self.item_elems = int(np.prod(self.item_shape, dtype=np.int64))
        self.max_batch = m.max_batch
        self.inputs = (TensorSpec("x", synthetic_math.DTYPE, self.item_shape),)
        self.outputs = (TensorSpec("y", synthetic_math.DTYPE, self.item_shape),)
        arch = self.ctx.info.arch
        cubin = compile_cubin(synthetic_math.CUDA_SOURCE, "synthetic.cu", arch, NVRTC_OPTIONS)
        self.nvrtc_version = nvrtc_version()
        self.module = Module(cubin, f"synthetic kernel ({arch})")
        self.function = self.module.function(KERNEL)
        self._args: dict[int, Any] = {}  # slot index -> KernelArgs
        self.smem = self._fill_smem() if m.fill_gpu else 0
        log.info(
            "[ready] synthetic GPU engine: item %s, work %d, %s, NVRTC %s, %d B shared memory per block",
            self.item_shape,
            self.work,
            arch,
            self.nvrtc_version,
            self.smem,
        )

    def _fill_smem(self) -> int:
        """Dynamic shared memory per block that makes one full batch occupy every SM, and no more.

        The kernel is one thread per element and uses few registers, so left alone a max batch fills
        only part of a large GPU and the batches of different slots run side by side: "GPU time per
        batch" would then overstate how busy the GPU is. A real model at its max batch fills the GPU;
        reserving shared memory (which the kernel never touches) caps the blocks resident per SM at
        what one full batch needs, so the synthetic workload behaves the same way."""
        blocks = -(-self.max_batch * self.item_elems // BLOCK)
        sms = device_attribute("MULTIPROCESSOR_COUNT")
        per_sm = -(-blocks // sms)
        if per_sm >= max_active_blocks(self.function, BLOCK, 0):
            return 0  # a full batch already fills every SM
        optin = device_attribute("MAX_SHARED_MEMORY_PER_BLOCK_OPTIN")
        allow_dynamic_smem(self.function, optin)
        smem = min(optin, device_attribute("MAX_SHARED_MEMORY_PER_MULTIPROCESSOR") // per_sm)
        while smem > 0 and max_active_blocks(self.function, BLOCK, smem) < per_sm:
            smem -= 256
        log.info(
            "[ready] fill_gpu: %d blocks per full batch on %d SMs -> %d resident per SM (%d B each)",
            blocks,
            sms,
            max_active_blocks(self.function, BLOCK, smem),
            smem,
        )
        return smem

    def _init_slot(self, slot: GpuSlot) -> None:
        # (x, y, n, work): pointers and n as 64-bit, work as 32-bit, exactly the kernel's C types.
        # n changes per batch and is updated in place (KernelArgs.set); nothing is allocated per launch.
        self._args[slot.index] = KernelArgs(
            [
                (slot.device["x"].ptr, np.uint64),
                (slot.device["y"].ptr, np.uint64),
                (0, np.uint64),
                (self.work, np.uint32),
            ]
        )

    def _compute(self, slot: GpuSlot, rows: int) -> None:
        n = rows * self.item_elems
        args = self._args[slot.index]
        args.set(2, n)
        launch_kernel(self.function, (n + BLOCK - 1) // BLOCK, BLOCK, slot.stream, args, self.smem)

    def warmup(self, slots: list[Slot], buckets: tuple[int, ...]) -> None:
        super().warmup(slots, buckets)
        self._self_check(slots[0], buckets[0])

    def _self_check(self, slot: Slot, rows: int) -> None:
        """Run one batch of known data and compare its first row with numpy, bit for bit: catches a
        kernel that was compiled with contraction or otherwise diverges, before the worker says READY."""
        rng = np.random.default_rng(12345)
        x = slot.inputs["x"]
        x[:rows] = rng.random((rows, *self.item_shape), dtype=np.float32)
        slot.outputs["y"][:rows] = np.nan
        self.launch(slot, rows)
        self.wait(slot)
        want = synthetic_math.reference(x[:1], self.work)
        got = slot.outputs["y"][:1]
        if not np.array_equal(got, want, equal_nan=True):
            bad = int(np.count_nonzero(got != want))
            raise EngineError(
                f"synthetic GPU kernel disagrees with the numpy reference in {bad} of {want.size} elements"
            )

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            work=self.work,
            item_shape=list(self.item_shape),
            nvrtc=self.nvrtc_version,
            fill_gpu_smem=self.smem,
        )
        return d

    def close(self) -> None:
        super().close()
        if self.module.handle is not None:
            self.module.unload()
