"""The scheduler state of a process, from /proc/PID/stat: used by the supervisor (a worker stopped by a
signal) and by clients (a supervisor that is gone or a zombie). Linux only; no third-party import, so a
client-only install can use it."""

from __future__ import annotations


def process_state(pid: int) -> bytes | None:
    """The one-letter state (b"R", b"S", b"T", b"Z"...) of process `pid`, or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
