"""The scheduler state of a process, from /proc/PID/stat: used by the supervisor (a worker stopped by a
signal) and by clients (a supervisor that is gone or a zombie); the title the supervisor and workers give
themselves, and the cores all their threads run on. Linux only; no third-party import at module level, so a client-only install can use it."""

from __future__ import annotations

import os


def process_state(pid: int) -> bytes | None:
    """The one-letter state (b"R", b"S", b"T", b"Z"...) of process `pid`, or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def set_title(title: str) -> bool:
    """Name this process for `ps` and /proc/PID/cmdline ("orchestrator: worker w3 gpu 3"). Needs the optional
    setproctitle package; without it the title stays the command line, and this returns False."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return False
    setproctitle(title)
    return True


def pin_process(cores: tuple[int, ...]) -> None:
    """Pin every thread of this process to `cores` (sched_setaffinity acts on one thread; threads made
    later inherit their creator's mask): ZeroMQ's I/O threads exist already when the supervisor plans."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
