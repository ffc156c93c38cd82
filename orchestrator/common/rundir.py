"""The run directory: its layout, its 0700 creation, the single-instance lock and stale-file cleanup.

Used by the supervisor (which owns the directory while it runs) and by the CLI and clients (which only
read paths from it).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from orchestrator.common.errors import OrchestratorError

log = logging.getLogger(__name__)


class AlreadyRunningError(OrchestratorError):
    """Another supervisor holds this run directory."""


class RunDir:
    """Paths inside one orchestrator's run directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def control(self) -> Path:
        return self.root / "control.sock"

    @property
    def events(self) -> Path:
        return self.root / "events.sock"

    @property
    def inbox(self) -> Path:
        return self.root / "supervisor.sock"  # workers' PUSH -> supervisor PULL

    @property
    def lock(self) -> Path:
        return self.root / "supervisor.lock"

    @property
    def pidfile(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def specs(self) -> Path:
        return self.root / "workers"

    @property
    def stalls(self) -> Path:
        return self.root / "stalls.jsonl"

    def worker_socket(self, worker_id: str) -> Path:
        return self.root / f"{worker_id}.sock"

    def control_endpoint(self) -> str:
        return f"ipc://{self.control}"

    def events_endpoint(self) -> str:
        return f"ipc://{self.events}"

    def inbox_endpoint(self) -> str:
        return f"ipc://{self.inbox}"

    def read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        """True when a live supervisor holds the lock (checked without taking it for long)."""
        if not self.lock.exists():
            return False
        try:
            fd = os.open(self.lock, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def acquire(self) -> int:
        """Create the directory (0700), take the lock for the supervisor's lifetime, clean stale files.

        Returns the lock fd (kept open: the kernel drops the lock when the process dies, by any means)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)  # mkdir's mode is masked by umask, and the dir may predate us
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.read_pid()
            raise AlreadyRunningError(
                f"an orchestrator is already running in {self.root}" + (f" (pid {pid})" if pid else "")
            ) from None
        self._clean_stale()
        self.logs.mkdir(exist_ok=True, mode=0o700)
        self.specs.mkdir(exist_ok=True, mode=0o700)
        self.pidfile.write_text(f"{os.getpid()}\n")
        return fd

    def _clean_stale(self) -> None:
        stale = [p for p in self.root.glob("*.sock")] + [self.pidfile] + self._arenas()
        for p in stale:
            if p.exists():
                log.info("[spawn] removing stale %s", p.name)
                p.unlink(missing_ok=True)

    def _arena_dir(self) -> Path:
        """Where this run's shared-memory arenas live (orchestrator.common.shm.arena_dir; imported here, not at
        the top, so `status` and `stop` do not load numpy)."""
        from orchestrator.common.shm import arena_dir

        return arena_dir(self.root)

    def _arenas(self) -> list[Path]:
        """Arena files of this run: each worker removes its own, a killed one leaves it behind."""
        return sorted(self._arena_dir().glob("*.arena"))

    def cleanup(self) -> None:
        """Remove sockets, arenas and the pid file at a clean exit (logs and the stall log stay)."""
        for p in self.root.glob("*.sock"):
            p.unlink(missing_ok=True)
        for p in self.specs.glob("*.json"):
            p.unlink(missing_ok=True)
        for p in self._arenas():
            p.unlink(missing_ok=True)
        try:
            self._arena_dir().rmdir()
        except OSError:  # absent, or not empty (another process's file): leave it
            pass
        self.pidfile.unlink(missing_ok=True)
