"""NVRTC compilation to a cubin, module load/unload (journaled), kernel lookup and launch with packed args.

Runs in a GPU worker: compile and load on the serving thread during start-up (the stall injector loads
and unloads modules on purpose); launch on the serving thread per batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from cuda.bindings import driver, nvrtc

from orchestrator.common.errors import EngineError
from workers.cuda.errors import CudaError, check
from workers.cuda.stream import Stream
from workers.driver_journal import JOURNAL

log = logging.getLogger(__name__)


def nvrtc_version() -> str:
    major, minor = check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    return f"{major}.{minor}"


def _program_log(prog: Any) -> str:
    size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    buf = b" " * size
    check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
    return buf.rstrip(b"\0 ").decode(errors="replace")


@functools.lru_cache(maxsize=32)
def compile_cubin(source: str, name: str, arch: str, options: tuple[str, ...] = ()) -> bytes:
    """Compile CUDA C++ `source` with NVRTC to a cubin for `arch` (e.g. "sm_90"). Cached per process.

    A cubin (not PTX) is machine code for exactly this GPU: loading it needs no JIT, so module load
    stays short and predictable. NVRTC itself takes no driver lock.
    """
    try:
        prog = check(
            nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram"
        )
    except CudaError:
        raise
    except Exception as exc:  # libnvrtc missing: cuda-bindings does not ship it
        raise EngineError(f"NVRTC unavailable ({exc}); install nvidia-cuda-nvrtc") from exc
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if err:
            raise CudaError("nvrtcCompileProgram", err.name, int(err), _program_log(prog))
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    log.debug("[cuda] compiled %s for %s (%d B, options %s)", name, arch, len(cubin), options)
    return cubin


class Module:
    """A loaded module. Loading takes the driver's write lock: do it only during start-up."""

    def __init__(self, image: bytes, detail: str = "") -> None:
        self._detail = detail or f"{len(image)} B image"
        # Keep the image alive and pass its address: cuModuleLoadData reads it during the call only.
        self._image = np.frombuffer(image, dtype=np.uint8)
        with JOURNAL.timed("module_load", self._detail):
            self.handle = check(driver.cuModuleLoadData(self._image.ctypes.data), "cuModuleLoadData")

    def function(self, name: str) -> Any:
        """The CUfunction for an extern "C" kernel name."""
        return check(driver.cuModuleGetFunction(self.handle, name.encode()), f"cuModuleGetFunction({name})")

    def unload(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            with JOURNAL.timed("module_unload", self._detail):
                check(driver.cuModuleUnload(handle), "cuModuleUnload")


class KernelArgs:
    """Kernel parameters packed once as numpy scalars plus the void** array of their addresses.

    cuLaunchKernel copies the parameter values at launch, so a value can be changed in place (set())
    between launches without allocating anything. Scalars must have the kernel's exact C type.
    """

    def __init__(self, values: Sequence[tuple[Any, np.dtype | type]]) -> None:
        self._store = [np.array([v], dtype=t) for v, t in values]
        self._ptrs = np.array([a.ctypes.data for a in self._store], dtype=np.uint64)
        self.ptr: int = self._ptrs.ctypes.data

    def set(self, index: int, value: Any) -> None:
        self._store[index][0] = value


def max_active_blocks(func: Any, block: int, dynamic_smem: int) -> int:
    """Blocks of `func` one SM can hold at once with this block size and dynamic shared memory."""
    return int(
        check(
            driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(func, block, dynamic_smem),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor",
        )
    )


def allow_dynamic_smem(func: Any, nbytes: int) -> None:
    """Let launches of `func` request up to `nbytes` of dynamic shared memory (above 48 KiB needs opt-in)."""
    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    check(driver.cuFuncSetAttribute(func, attr, nbytes), "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")


def launch_kernel(
    func: Any, grid: int, block: int, stream: Stream, args: KernelArgs, shared_mem: int = 0
) -> None:
    """One-dimensional launch of `func` on `stream`. Returns at once (no sync)."""
    err = driver.cuLaunchKernel(func, grid, 1, 1, block, 1, 1, shared_mem, stream.handle, args.ptr, 0)[0]
    if err:
        check((err,), "cuLaunchKernel")
