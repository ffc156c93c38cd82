"""Process logs: a log file (the process's own stderr) is rotated in place past its bound, and a message
repeated many times a minute is logged `burst` times, then counted."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from orchestrator.common.logs import RepeatFilter


def test_repeats_are_limited_per_template_and_counted() -> None:
    now = [0.0]
    f = RepeatFilter(burst=3, clock=lambda: now[0])

    def rec(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("w", logging.WARNING, __file__, 1, msg, args, None)

    passed = [f.filter(rec("[stall] launch took %d us", i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert f.filter(rec("another message"))  # other templates are counted apart
    now[0] = 61.0
    r = rec("[stall] launch took %d us", 99)
    assert f.filter(r) and "(7 more like this in the last minute were not logged)" in r.getMessage()


def test_log_file_is_rotated_in_place_past_its_bound(tmp_path: Path) -> None:
    log = tmp_path / "w0.log"
    code = f"""
import logging, sys
from pathlib import Path
from orchestrator.common import logs
logs.configure("info", "%(message)s", Path({str(log)!r}), max_bytes=4000, burst=10**6)
for i in range(400):
    logging.getLogger("t").info("line %04d %s", i, "x" * 40)
print("stdout follows the rotation", flush=True)
sys.stderr.write("and so do tracebacks\\n")
"""
    with open(log, "ab") as out:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )
    assert proc.returncode == 0
    older = log.with_name("w0.log.1")
    assert log.stat().st_size <= 4000 + 200 and older.stat().st_size <= 4000 + 200
    text = log.read_text()
    assert "line 0399" in text and "stdout follows the rotation" in text and "and so do tracebacks" in text
    assert "--- rotated" in text
