"""A start in which no worker reaches READY ends in one WorkerStartupError: `orchestrator start` prints it (the
failure, its exit code and the worker's log tail) and exits 1, in the foreground as detached."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli, write_config

pytestmark = pytest.mark.timeout(120)


def test_foreground_start_where_no_worker_can_start(short_tmp: Path) -> None:
    cfg = write_config(
        short_tmp,
        {
            "workers": {"count": 1},
            "model": {"kind": "synthetic", "item_shape": [4], "max_batch": 4},
            "debug": {"inject": "crash_on_start"},
            "restart": {"flap_max_crashes": 1},
        },
    )
    p = cli("start", str(cfg), timeout=90)
    assert p.returncode == 1, p.stderr
    head, sep, message = p.stderr.partition("orchestrator: no worker could start:\n")
    assert sep, p.stderr
    assert message.startswith(
        "w0 on cpu failed to start: RuntimeError: injected start-up crash (debug.inject = crash_on_start) "
        "(exit code 3)\n--- last lines of "
    ), message
    assert "injected start-up crash" in message.split("--- last lines of ", 1)[1]  # the worker's log tail
    assert (
        'commands.py", line' not in p.stderr and "WorkerStartupError" not in p.stderr
    )  # printed, not a traceback
    assert "[shutdown] all workers stopped (no worker could start)" in head  # drained in order first
