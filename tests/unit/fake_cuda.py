"""A CPU stand-in for workers.cuda.runtime.CudaRuntime: host memory for pinned and device buffers, copies
as memmove, graphs that replay what was captured. GPU engines run on it in unit tests (no CUDA needed)."""

from __future__ import annotations

import ctypes
import types
from typing import Any

import numpy as np


class FakeBuffer:
    """Host memory standing in for pinned and device buffers; ptr/handle are real addresses."""

    def __init__(self, nbytes: int, detail: str = "") -> None:
        self.mem = np.zeros(nbytes, np.uint8)
        self.nbytes = nbytes
        self.ptr = self.mem.ctypes.data
        self.handle = self.ptr
        self.freed = False

    def view(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.mem[:n].view(dtype).reshape(shape)

    def free(self) -> None:
        self.freed = True


class FakeStream:
    count = 0

    def __init__(self, non_blocking: bool = True) -> None:
        FakeStream.count += 1
        self.ptr = 1000 + FakeStream.count
        self.handle = self.ptr

    def synchronize(self) -> None:
        pass

    def destroy(self) -> None:
        pass


class FakeEvent:
    def __init__(self, timing: bool = False, blocking_sync: bool = False) -> None:
        self.timing, self.blocking_sync = timing, blocking_sync

    def record(self, stream: FakeStream) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_ms(self, start: FakeEvent) -> float:
        return 0.05

    def destroy(self) -> None:
        pass


class FakeGraph:
    def __init__(self, replay: Any, log: list) -> None:
        self.replay, self.log = replay, log

    def launch(self, stream: FakeStream) -> None:
        self.log.append(("graph_launch",))
        self.replay()

    def destroy(self) -> None:
        pass


class FakeRegistration:
    """cuMemHostRegister's stand-in: host memory is already addressable by the fake copies."""

    def __init__(self, ptr: int, nbytes: int, detail: str = "") -> None:
        self.ptr = ptr

    def free(self) -> None:
        self.ptr = 0


class FakeRuntime:
    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.info = types.SimpleNamespace(
            name="Fake GPU", uuid="GPU-fake", compute_capability=(9, 0), driver_version="13.0", arch="sm_90"
        )
        self.sched = None

    PinnedBuffer = FakeBuffer
    DeviceBuffer = FakeBuffer
    HostRegistration = FakeRegistration
    Stream = FakeStream
    Event = FakeEvent

    def context(self, sched: str) -> Any:
        self.sched = sched
        return types.SimpleNamespace(info=self.info, loading_mode="EAGER")

    @staticmethod
    def copy_htod_async(dst: int, src: int, nbytes: int, stream: Any) -> None:
        ctypes.memmove(dst, src, nbytes)

    @staticmethod
    def copy_dtoh_async(dst: int, src: int, nbytes: int, stream: Any) -> None:
        ctypes.memmove(dst, src, nbytes)

    def capture(self, stream: FakeStream, enqueue: Any, detail: str = "") -> FakeGraph | None:
        self.log.append(("capture", detail))
        return FakeGraph(enqueue, self.log) if enqueue() is not False else None
