"""Pinned host buffers (exposed as numpy arrays), device buffers and async copies between them.

Runs in a GPU worker: buffers are allocated on the serving thread during start-up (and by the stall
injector on purpose); every allocation and free goes through JOURNAL so a post-READY one is a fault.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from cuda.bindings import driver

from workers.cuda.errors import check
from workers.driver_journal import JOURNAL

log = logging.getLogger(__name__)


class _ArrayInterface:
    """Lets numpy wrap raw memory while holding a reference to its owner.

    np.asarray() on an object with __array_interface__ makes an array whose .base is that object, so
    every view keeps the PinnedBuffer alive (a bare ctypes wrapper would not).
    """

    def __init__(self, owner: Any, ptr: int, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.owner = owner
        self.__array_interface__ = {
            "version": 3,
            "data": (ptr, False),  # (address, read-only?)
            "typestr": dtype.str,
            "shape": shape,
            "strides": None,  # C-contiguous
        }


class PinnedBuffer:
    """Page-locked host memory from cuMemHostAlloc; copies from it are truly asynchronous.

    Pinned allocation takes the driver's write lock for milliseconds (FACTS.md: it stalled launches in
    other threads by up to 33 ms), so allocate these only during start-up.
    """

    def __init__(self, nbytes: int, detail: str = "") -> None:
        if nbytes <= 0:
            raise ValueError(f"pinned buffer size must be positive, got {nbytes}")
        self.nbytes = nbytes
        self._detail = detail or f"{nbytes} B"
        # Flags 0: not portable, not mapped, not write-combined (write-combined host memory is very slow
        # for the CPU to read, which would ruin the D2H output buffers).
        with JOURNAL.timed("pinned_alloc", self._detail):
            self.ptr: int = int(check(driver.cuMemHostAlloc(nbytes, 0), "cuMemHostAlloc"))

    def view(self, dtype: np.dtype | type, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        """A writable numpy array over this buffer (zero-copy); it keeps the buffer object alive."""
        dt = np.dtype(dtype)
        need = offset + int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if need > self.nbytes:
            raise ValueError(f"view of {need} B exceeds the pinned buffer's {self.nbytes} B")
        if not self.ptr:
            raise ValueError("pinned buffer already freed")
        return np.asarray(_ArrayInterface(self, self.ptr + offset, dt, tuple(shape)))

    def free(self) -> None:
        """Release the memory. Views must no longer be used: numpy cannot know the memory went away."""
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            with JOURNAL.timed("pinned_free", self._detail):
                check(driver.cuMemFreeHost(ptr), "cuMemFreeHost")


class DeviceBuffer:
    """Device memory from cuMemAlloc (at least 256-byte aligned, as TensorRT needs)."""

    def __init__(self, nbytes: int, detail: str = "") -> None:
        if nbytes <= 0:
            raise ValueError(f"device buffer size must be positive, got {nbytes}")
        self.nbytes = nbytes
        self._detail = detail or f"{nbytes} B"
        with JOURNAL.timed("device_alloc", self._detail):
            self.handle = check(driver.cuMemAlloc(nbytes), "cuMemAlloc")
        self.ptr: int = int(self.handle)

    def free(self) -> None:
        if self.ptr:
            handle, self.ptr = self.handle, 0
            with JOURNAL.timed("device_free", self._detail):
                check(driver.cuMemFree(handle), "cuMemFree")


class HostRegistration:
    """Existing host memory (the shared-memory arena) page-locked with cuMemHostRegister, so async copies
    from and to it are DMA like those of a PinnedBuffer. Registration takes the driver's write lock, so
    workers do it once, before READY."""

    def __init__(self, ptr: int, nbytes: int, detail: str = "") -> None:
        self.nbytes = nbytes
        self._detail = detail or f"{nbytes} B"
        with JOURNAL.timed("host_register", self._detail):
            check(driver.cuMemHostRegister(ptr, nbytes, 0), "cuMemHostRegister")
        self.ptr = ptr

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            with JOURNAL.timed("host_unregister", self._detail):
                check(driver.cuMemHostUnregister(ptr), "cuMemHostUnregister")


# --- async copies (hot path: no allocation, one checked driver call each) -------------------------


def copy_htod_async(dst: int, src: int, nbytes: int, stream: Any) -> None:
    """Pinned host `src` -> device `dst` on `stream`; returns at once."""
    err = driver.cuMemcpyHtoDAsync(dst, src, nbytes, stream)[0]
    if err:
        check((err,), "cuMemcpyHtoDAsync")


def copy_dtoh_async(dst: int, src: int, nbytes: int, stream: Any) -> None:
    """Device `src` -> pinned host `dst` on `stream`; returns at once."""
    err = driver.cuMemcpyDtoHAsync(dst, src, nbytes, stream)[0]
    if err:
        check((err,), "cuMemcpyDtoHAsync")


def memset_d8_async(dst: int, value: int, nbytes: int, stream: Any) -> None:
    """Fill device memory with a byte value on `stream` (used to poison buffers in tests and warm-up)."""
    check(driver.cuMemsetD8Async(dst, value, nbytes, stream), "cuMemsetD8Async")
