"""The client's view of its shared-memory lease: the mapped region of a worker's arena, a thread-safe span
allocator over it, and numpy views that give their span back when the last of them is gone.

Runs in the user's process (orchestrator/client/core.py and io_thread.py). The arena's side, and what both
sides share (the allocator, where arenas live), is orchestrator/common/shm.py and workers/arena.py.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Any

import numpy as np

from orchestrator.common.errors import BatchTooLargeError, OverloadedError
from orchestrator.common.shm import PAGE, SPAN_ALIGN, SpanAllocator, round_up


class _SpanOwner:
    """Owner of one span, handed to numpy as an __array_interface__: every array made over the span keeps
    this object alive, and the span returns to the lease when the last of them is gone."""

    def __init__(
        self, lease: ClientLease, off: int, dtype: np.dtype, shape: tuple[int, ...], ptr: int, readonly: bool
    ) -> None:
        self.lease = lease
        self.off = off
        self.__array_interface__ = {
            "version": 3,
            "data": (ptr, readonly),
            "typestr": dtype.str,
            "shape": shape,
            "strides": None,
        }

    def __del__(self) -> None:
        self.lease.release(self.off)


def span_lease(arr: Any) -> ClientLease | None:
    """The lease an array made by Client.empty() (or a view of one) lives in, from its base chain: no
    pointer arithmetic for the arrays that are not."""
    base = getattr(arr, "base", None)
    for _ in range(8):
        if base is None:
            return None
        if isinstance(base, _SpanOwner):
            return base.lease
        base = getattr(base, "base", None)
    return None


class ClientLease:
    """A client's lease on one worker's arena: the mapped region, a thread-safe span allocator over it,
    and the spans of requests still in flight.

    Used from user threads (infer, empty) and the client's I/O thread (submit), hence the lock. Requests
    whose caller gave up (deadline) keep their spans until the worker answers or the lease is dropped: the
    worker may still be reading or writing them."""

    def __init__(self, worker_id: str, lease_id: int, path: str, offset: int, size: int) -> None:
        self.worker_id = worker_id
        self.lease_id = lease_id
        self.size = size
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        finally:
            os.close(fd)
        self._base = np.frombuffer(self._mm, np.uint8)  # keeps the mapping alive while views exist
        self.addr = self._base.ctypes.data
        self._alloc = SpanAllocator(size, SPAN_ALIGN)
        self._cv = threading.Condition()
        self._inflight: dict[int, tuple[int, ...]] = {}  # request id -> spans to release on its reply
        self.dropped = False

    # spans ----------------------------------------------------------------------------------------

    def take(self, nbytes: int, deadline: float) -> int:
        """A span of `nbytes`, waiting for space until `deadline` (time.monotonic())."""
        if round_up(nbytes, SPAN_ALIGN) > self.size:
            raise BatchTooLargeError(
                f"request needs {nbytes:,} B of shared memory but the lease on {self.worker_id} holds {self.size:,} B "
                "(raise Client(shm_lease_mb=...) within transport.shm_max_lease_mb, or send it with shm=False)"
            )
        with self._cv:
            while True:
                off = self._alloc.alloc(nbytes)
                if off is not None:
                    return off
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OverloadedError(
                        f"shared-memory lease on {self.worker_id} full ({self.size:,} B, {self._alloc.live} spans "
                        "in use) for the whole deadline: results still referenced hold their spans"
                    )
                self._cv.wait(left)

    def release(self, off: int) -> None:
        with self._cv:
            try:
                self._alloc.release(off)
            except KeyError:  # already released (a double path on shutdown): nothing to do
                return
            self._cv.notify_all()

    def hold(self, request_id: int, spans: tuple[int, ...]) -> None:
        """Remember the spans of an in-flight request until `settle(request_id)`."""
        with self._cv:
            self._inflight[request_id] = spans

    def settle(self, request_id: int, keep: int | None = None) -> None:
        """The worker answered `request_id`: release its spans, except `keep` (now owned by result views)."""
        with self._cv:
            spans = self._inflight.pop(request_id, ())
            for off in spans:
                if off != keep:
                    try:
                        self._alloc.release(off)
                    except KeyError:
                        pass
            if spans:
                self._cv.notify_all()

    # views ----------------------------------------------------------------------------------------

    def contains(self, arr: np.ndarray) -> int | None:
        """Offset of `arr`'s data in this lease if it lies wholly inside and is C-contiguous, else None."""
        if not arr.flags.c_contiguous:
            return None
        ptr = arr.__array_interface__["data"][0]
        off = ptr - self.addr
        return off if 0 <= off and off + arr.nbytes <= self.size else None

    def view(self, off: int, dtype: np.dtype, shape: tuple[int, ...], readonly: bool) -> np.ndarray:
        """An array over the span at `off` that releases the span when the last array over it is gone."""
        return np.asarray(_SpanOwner(self, off, dtype, shape, self.addr + off, readonly))

    def raw(self, off: int, nbytes: int) -> np.ndarray:
        """A plain byte view (no ownership) for copying into a span the caller already holds."""
        return self._base[off : off + nbytes]


def describe_lease(reply: Any) -> tuple[int, str, int, int]:
    """(lease id, path, offset, size) from an ATTACH reply payload; ValueError when malformed."""
    if not isinstance(reply, dict):
        raise ValueError("attach reply is not a map")
    lease, path, offset, size = reply.get("lease"), reply.get("path"), reply.get("offset"), reply.get("size")
    if not (
        isinstance(lease, int) and isinstance(path, str) and isinstance(offset, int) and isinstance(size, int)
    ):
        raise ValueError(f"attach reply is missing fields: {sorted(reply)}")
    if offset % PAGE or size <= 0:
        raise ValueError(f"attach reply has a bad region (offset {offset}, size {size})")
    return lease, path, offset, size
