"""Shared-memory data path, the parts both sides use: where arenas live and a span allocator.

A worker owns one arena (a shared-memory file, registered as pinned host memory on GPU workers before
READY). A local client attaches over the data socket and gets a lease: a page-aligned region of the arena
that only it is told about, named by an unguessable lease id. Requests then name input and output spans
(offsets relative to the lease); the worker checks every span against the lease, copies inputs straight to
the device and outputs straight back into the lease, and answers with a small completion message.

Runs in the worker (workers/arena.py) and in the user's process (the client's view of its lease:
orchestrator/client/lease.py). No CUDA here.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
from pathlib import Path

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
