"""Streams and events: record, query, synchronise (GIL released), elapsed time.

Runs in a GPU worker, created on the serving thread during start-up and used on it per batch.
"""

from __future__ import annotations

from cuda.bindings import driver

from workers.cuda.errors import check

_NOT_READY = driver.CUresult.CUDA_ERROR_NOT_READY


class Stream:
    """A CUDA stream. Non-blocking by default: it never implicitly synchronises with the legacy default
    stream (TensorRT warns that the default stream adds cudaDeviceSynchronize calls)."""

    def __init__(self, non_blocking: bool = True, priority: int | None = None) -> None:
        flags = (
            driver.CUstream_flags.CU_STREAM_NON_BLOCKING
            if non_blocking
            else driver.CUstream_flags.CU_STREAM_DEFAULT
        )
        if priority is None:
            self.handle = check(driver.cuStreamCreate(flags), "cuStreamCreate")
        else:  # lower number = higher priority; see cuCtxGetStreamPriorityRange
            self.handle = check(
                driver.cuStreamCreateWithPriority(flags, priority), "cuStreamCreateWithPriority"
            )
        self.ptr: int = int(self.handle)

    def __int__(self) -> int:
        return self.ptr

    def synchronize(self) -> None:
        """Wait for all work on the stream (GIL released during the wait, cuda-bindings >= 12.9.1)."""
        check(driver.cuStreamSynchronize(self.handle), "cuStreamSynchronize")

    def wait_event(self, event: Event) -> None:
        """Make later work on this stream wait for `event` (device-side; the host does not block)."""
        check(driver.cuStreamWaitEvent(self.handle, event.handle, 0), "cuStreamWaitEvent")

    def destroy(self) -> None:
        if self.ptr:
            self.ptr = 0
            check(driver.cuStreamDestroy(self.handle), "cuStreamDestroy")


class Event:
    """A CUDA event.

    timing=False sets CU_EVENT_DISABLE_TIMING, the cheapest event for query and wait. blocking_sync=True
    makes synchronize() sleep on an OS primitive instead of busy-waiting: it frees the CPU at the cost of
    some wake-up latency (trtexec's --noSpinWait).
    """

    def __init__(self, timing: bool = False, blocking_sync: bool = False) -> None:
        flags = 0
        if not timing:
            flags |= driver.CUevent_flags.CU_EVENT_DISABLE_TIMING
        if blocking_sync:
            flags |= driver.CUevent_flags.CU_EVENT_BLOCKING_SYNC
        self.timing = timing
        self.blocking_sync = blocking_sync
        self.handle = check(driver.cuEventCreate(flags), "cuEventCreate")

    def record(self, stream: Stream) -> None:
        err = driver.cuEventRecord(self.handle, stream.handle)[0]
        if err:
            check((err,), "cuEventRecord")

    def query(self) -> bool:
        """True when all work captured by the last record() has completed; never blocks."""
        err = driver.cuEventQuery(self.handle)[0]
        if not err:
            return True
        if err == _NOT_READY:
            return False
        check((err,), "cuEventQuery")
        return False  # unreachable: check raised

    def synchronize(self) -> None:
        """Block until the event completes. cuda-bindings releases the GIL for the wait (FACTS.md)."""
        err = driver.cuEventSynchronize(self.handle)[0]
        if err:
            check((err,), "cuEventSynchronize")

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from `start` to this event (both timing events, both completed); ~0.5 us resolution."""
        return float(check(driver.cuEventElapsedTime(start.handle, self.handle), "cuEventElapsedTime"))

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(driver.cuEventDestroy(handle), "cuEventDestroy")
