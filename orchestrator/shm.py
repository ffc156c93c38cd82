"""Shared-memory data path, the parts both sides use: where arenas live, a span allocator, and the
client's view of its lease.

A worker owns one arena (a shared-memory file, registered as pinned host memory on GPU workers before
READY). A local client attaches over the data socket and gets a lease: a page-aligned region of the arena
that only it is told about, named by an unguessable lease id. Requests then name input and output spans
(offsets relative to the lease); the worker checks every span against the lease, copies inputs straight to
the device and outputs straight back into the lease, and answers with a small completion message.

Runs in the worker (workers/arena.py) and in the user's process (orchestrator.client). No CUDA here.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import BatchTooLargeError, OverloadedError

PAGE = mmap.PAGESIZE
SPAN_ALIGN = 256  # every span starts 256-byte aligned: aligned DMA, aligned numpy views of any dtype


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


# --- where arenas live ------------------------------------------------------------------------------


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` (longest mount-point prefix in /proc/self/mounts)."""
    best, kind = "", ""
    target = str(path.resolve())
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        return ""
    return kind


def arena_dir(run_dir: Path) -> Path:
    """Directory for a run's arena files: `<run_dir>/shm` when the run directory is on tmpfs, else a
    0700 directory under /dev/shm named after the run directory.

    Arenas must be shared memory (tmpfs), not a disk file: the kernel refuses to pin file-backed pages
    for the long term (cuMemHostRegister) and would write dirty pages back to disk continuously."""
    if _fs_type(run_dir) in ("tmpfs", "ramfs") or not Path("/dev/shm").is_dir():
        return run_dir / "shm"
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
    return Path("/dev/shm") / f"orchestrator-{os.getuid()}-{digest}"


def ensure_private_dir(path: Path) -> None:
    """Create `path` mode 0700 (owner only, like the data sockets) or check that an existing one is ours
    and private; raises PermissionError naming the problem otherwise."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(
            f"shared-memory directory {path} belongs to uid {st.st_uid}, not to us ({os.getuid()})"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def space_problem(run_dir: Path, workers: int, shm_mb: int) -> str | None:
    """Why `workers` arenas of `shm_mb` MiB would not fit where this run's arenas live, or None. Checked by
    `validate` and `start`, so a full /dev/shm (a container's is often 64 MiB) is a config error, not a worker
    that fails to start."""
    if not shm_mb or workers <= 0:
        return None
    directory = arena_dir(run_dir)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if directory.is_dir():  # this run's old arenas are replaced, not added to
        free += sum(p.stat().st_size for p in directory.glob("*.arena"))
    need = workers * (shm_mb << 20)
    if need <= free:
        return None
    return (
        f"transport.shm_mb: {workers} worker(s) x {shm_mb} MiB need {need >> 20} MiB of shared memory in {probe}, "
        f"{free >> 20} MiB free (lower transport.shm_mb, or 0 to turn shared memory off)"
    )


# --- allocation -----------------------------------------------------------------------------------


class SpanAllocator:
    """First-fit allocator of aligned byte ranges in [0, size). Not thread-safe: callers lock.

    Free ranges are kept sorted and merged with their neighbours on release, so a fully released
    allocator is again one range of `size` bytes."""

    def __init__(self, size: int, align: int) -> None:
        self.size = size
        self.align = align
        self._starts: list[int] = [0] if size else []
        self._sizes: list[int] = [size] if size else []
        self._used: dict[int, int] = {}  # offset -> bytes of each live allocation
        self.free_bytes = size

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new range of at least `nbytes`, or None when no free range is large enough."""
        n = round_up(max(nbytes, 1), self.align)
        for i, sz in enumerate(self._sizes):
            if sz >= n:
                off = self._starts[i]
                if sz == n:
                    del self._starts[i], self._sizes[i]
                else:
                    self._starts[i] += n
                    self._sizes[i] -= n
                self._used[off] = n
                self.free_bytes -= n
                return off
        return None

    def release(self, off: int) -> None:
        """Return the range starting at `off`; KeyError if no live allocation starts there."""
        n = self._used.pop(off)
        self.free_bytes += n
        i = bisect.bisect_left(self._starts, off)
        starts, sizes = self._starts, self._sizes
        if i > 0 and starts[i - 1] + sizes[i - 1] == off:  # merge with the range before
            i -= 1
            sizes[i] += n
        else:
            starts.insert(i, off)
            sizes.insert(i, n)
        if i + 1 < len(starts) and starts[i] + sizes[i] == starts[i + 1]:  # and with the one after
            sizes[i] += sizes[i + 1]
            del starts[i + 1], sizes[i + 1]

    def size_of(self, off: int) -> int:
        return self._used[off]

    @property
    def live(self) -> int:
        return len(self._used)


# --- the client's lease ---------------------------------------------------------------------------


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
