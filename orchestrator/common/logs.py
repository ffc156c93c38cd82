"""Logging for the supervisor and the workers: one line format, a bound on the log file, and repeated
messages rate-limited.

Runs in every orchestrator process. A process's stdout and stderr are its log file (the supervisor's
`supervisor.log`, a worker's `logs/wN.log`: crashes and tracebacks land there too), so the file is bounded
by rotating the descriptors themselves: past `max_bytes`, the file is renamed to `NAME.1` (replacing the
previous one) and fds 1 and 2 are pointed at a fresh file. A message template logged more than `burst` times
a minute by one logger is dropped after that, and a count of what was dropped follows the next one let
through (a stalling GPU can otherwise log thousands of identical lines a minute).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

WINDOW_S = 60.0


class RepeatFilter(logging.Filter):
    """At most `burst` records per (logger, message template) per minute; then a count of those dropped."""

    def __init__(self, burst: int = 20, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.clock = clock
        self._seen: dict[tuple[str, str], list[float | int]] = {}  # key -> [window start, count, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= WINDOW_S:
                dropped = int(entry[2]) if entry is not None else 0
                self._seen[key] = [now, 1, 0]
                if dropped:
                    record.msg = f"{record.msg} ({dropped} more like this in the last minute were not logged)"
                if len(self._seen) > 10_000:  # templates are few; bound it anyway
                    self._seen.clear()
                return True
            entry[1] += 1
            if entry[1] <= self.burst:
                return True
            entry[2] += 1
            return False


class RotatingStderr(logging.StreamHandler):
    """Writes to stderr, whose file is rotated in place once it passes `max_bytes` (see the module)."""

    def __init__(self, path: Path | None, max_bytes: int) -> None:
        super().__init__(sys.stderr)
        self.path = path
        self.max_bytes = max_bytes

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.path is None or self.max_bytes <= 0:
            return
        try:
            if os.fstat(2).st_size > self.max_bytes:
                self._rotate()
        except OSError:
            pass  # a log that cannot be rotated must not stop serving

    def _rotate(self) -> None:
        assert self.path is not None
        sys.stdout.flush()
        sys.stderr.flush()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        os.write(
            2,
            f"--- rotated {time.strftime('%Y-%m-%d %H:%M:%S')}: older lines in {self.path.name}.1 ---\n".encode(),
        )


def configure(
    level: str, fmt: str, log_path: Path | None = None, max_bytes: int = 0, burst: int = 20
) -> None:
    """Root logging for this process: `fmt` to stderr (which is `log_path` when the parent redirected it
    there: then bounded by `max_bytes`), repeats limited to `burst` a minute per message template."""
    handler = RotatingStderr(log_path, max_bytes)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RepeatFilter(burst))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
