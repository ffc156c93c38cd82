"""The worker's shared-memory arena and its client leases.

Runs in a worker process on the serving thread (created before READY, never resized). One shared-memory
file of `transport.shm_mb` MiB, mode 0600 in an owner-only directory, mapped once; GPU engines register it
as pinned host memory before READY, so no registration (a driver write-lock operation) ever happens while
serving, however many clients come and go.

A lease is a page-aligned region handed to one attaching client, named by a random 63-bit id that is the
capability to use it. Every span a request names is checked against its lease, so a buggy or hostile
client can address only its own lease through the protocol. A lease ends on DETACH or when its client
process exits (pidfd); its region is reused only once no request on it is in flight.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import secrets
import select
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.common.errors import InvalidInputError, OverloadedError
from orchestrator.common.messages import ShmStats
from orchestrator.common.shm import PAGE, SpanAllocator, arena_dir, ensure_private_dir

log = logging.getLogger(__name__)

MAX_LEASES = 4096


class Lease:
    __slots__ = ("id", "offset", "size", "pid", "pidfd", "inflight", "closing")

    def __init__(self, lease_id: int, offset: int, size: int, pid: int, pidfd: int) -> None:
        self.id = lease_id
        self.offset = offset
        self.size = size
        self.pid = pid
        self.pidfd = pidfd
        self.inflight = 0  # accepted requests on this lease not yet answered
        self.closing = False  # detached or its process exited: free once inflight reaches 0


class Arena:
    """The arena file, its mapping and the lease table."""

    def __init__(self, run_dir: Path, worker_id: str, size_mb: int, max_lease_mb: int) -> None:
        self.size = size_mb << 20
        self.max_lease = max_lease_mb << 20
        directory = arena_dir(run_dir)
        ensure_private_dir(directory)
        self.path = directory / f"{worker_id}.arena"
        self.path.unlink(missing_ok=True)  # a previous incarnation's (crashed) arena: its clients re-attach
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Reserve every page now: a full /dev/shm fails here, at start, not as SIGBUS while serving.
            os.posix_fallocate(fd, 0, self.size)
            self._mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise OSError(
                f"cannot create the {size_mb} MiB shared-memory arena {self.path}: {exc.strerror} "
                "(lower transport.shm_mb, or 0 to turn shared memory off)"
            ) from None
        os.close(fd)
        self.buf = np.frombuffer(self._mm, np.uint8)
        self.addr = self.buf.ctypes.data
        self.registered = False
        self._alloc = SpanAllocator(self.size, PAGE)
        self.leases: dict[int, Lease] = {}
        self._by_fd: dict[int, Lease] = {}
        self._poll = select.poll()
        self.requests = 0  # served through shared memory
        self.bytes = 0  # payload bytes (inputs + outputs) through shared memory
        self.refused = 0  # attach requests refused (arena full, too many leases, unknown process)
        log.info(
            "[ready] shared-memory arena %s: %d MiB, leases up to %d MiB", self.path, size_mb, max_lease_mb
        )

    # --- leases -----------------------------------------------------------------------------------

    def attach(self, pid: Any, nbytes: Any) -> Lease:
        """A new lease of min(nbytes, max lease) bytes for process `pid`; RequestError when impossible."""
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise InvalidInputError("attach: pid must be a positive integer")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise InvalidInputError("attach: size must be a positive integer")
        if len(self.leases) >= MAX_LEASES:
            self.refused += 1
            raise OverloadedError(f"attach: {MAX_LEASES} leases already held on this worker")
        size = min(nbytes, self.max_lease)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            self.refused += 1
            raise InvalidInputError(
                f"attach: process {pid} is not visible from the worker ({exc.strerror}); "
                "shared memory needs a client on this host, in the worker's PID namespace"
            ) from None
        off = self._alloc.alloc(size)
        if off is None:
            os.close(pidfd)
            self.refused += 1
            raise OverloadedError(
                f"attach: no {size:,} B free in the {self.size:,} B arena "
                f"({self._alloc.free_bytes:,} B free in pieces; {len(self.leases)} leases)"
            )
        lease = Lease(self._new_id(), off, self._alloc.size_of(off), pid, pidfd)
        self.leases[lease.id] = lease
        self._by_fd[pidfd] = lease
        self._poll.register(pidfd, select.POLLIN)
        return lease

    def _new_id(self) -> int:
        while True:
            lid = secrets.randbits(63) or 1
            if lid not in self.leases:
                return lid

    def detach(self, lease_id: Any) -> bool:
        lease = self.leases.get(lease_id) if isinstance(lease_id, int) else None
        if lease is None or lease.closing:
            return False
        self._close(lease)
        return True

    def _close(self, lease: Lease) -> None:
        lease.closing = True
        if lease.pidfd >= 0:
            self._poll.unregister(lease.pidfd)
            self._by_fd.pop(lease.pidfd, None)
            os.close(lease.pidfd)
            lease.pidfd = -1
        if lease.inflight == 0:
            self._free(lease)

    def _free(self, lease: Lease) -> None:
        if self.leases.pop(lease.id, None) is not None:
            self._alloc.release(lease.offset)

    def reap(self) -> int:
        """End the leases whose client process has exited; returns how many. Called once per heartbeat."""
        n = 0
        for fd, _ in self._poll.poll(0):
            lease = self._by_fd.get(fd)
            if lease is not None:
                self._close(lease)
                n += 1
        return n

    # --- requests ---------------------------------------------------------------------------------

    def lease_for(self, lease_id: Any) -> Lease:
        lease = (
            self.leases.get(lease_id)
            if isinstance(lease_id, int) and not isinstance(lease_id, bool)
            else None
        )
        if lease is None or lease.closing:
            raise InvalidInputError("unknown or detached shared-memory lease (attach again)")
        return lease

    @staticmethod
    def span(lease: Lease, off: Any, nbytes: int, what: str) -> int:
        """Arena offset of the lease-relative span [off, off + nbytes) of tensor `what`, or InvalidInputError."""
        if off.__class__ is not int or off < 0 or off + nbytes > lease.size:
            raise InvalidInputError(
                f"{what}: span at {off!r} of {nbytes:,} B lies outside the lease of {lease.size:,} B"
            )
        return lease.offset + off

    def begin(self, lease: Lease) -> None:
        lease.inflight += 1

    def served(self, shm: Any) -> None:
        """A shared-memory request (workers.pipeline.ShmSpans) was answered with its results."""
        self.requests += 1
        self.bytes += shm.nbytes
        self.end(shm.lease)

    def end(self, lease: Lease) -> None:
        """A request on `lease` was answered: a closing lease is freed after its last one."""
        lease.inflight -= 1
        if lease.closing and lease.inflight == 0:
            self._free(lease)

    def view(self, arena_off: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape) * dtype.itemsize
        return self.buf[arena_off : arena_off + n].view(dtype).reshape(shape)

    # --- status -----------------------------------------------------------------------------------

    def stats(self) -> ShmStats:
        """What a heartbeat carries (orchestrator.common.messages.ShmStats)."""
        return ShmStats(
            arena_bytes=self.size,
            free_bytes=self._alloc.free_bytes,
            leases=len(self.leases),
            requests=self.requests,
            bytes=self.bytes,
            path=str(self.path),
            registered=self.registered,
            refused=self.refused,
        )

    def close(self) -> None:
        for lease in list(self.leases.values()):
            if lease.pidfd >= 0:
                os.close(lease.pidfd)
        self.leases.clear()
        self.path.unlink(missing_ok=True)
        # The mapping itself goes with the process: views (numpy, the registered range) may still exist.
