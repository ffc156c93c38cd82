"""Process titles: `ps` shows each process's role ("orchestrator: worker w0 cpu in RUN_DIR") rather than
`python -m workers.worker .../w0.json` (setproctitle, an optional package: without it titles are skipped)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from orchestrator.common.procstat import set_title
from tests.conftest import write_config


def cmdline(pid: int) -> str:
    """What `ps` shows: /proc/PID/cmdline, NUL-separated (a title is one string, padded with NULs)."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return " ".join(part.decode() for part in raw.split(b"\0") if part)


def test_the_supervisor_and_each_worker_are_titled_by_role(short_tmp: Path, orchestrator_factory) -> None:
    pytest.importorskip("setproctitle")
    cfg = write_config(
        short_tmp,
        {
            "orchestrator": {"name": "titles"},
            "workers": {"count": 2},
            "model": {"kind": "synthetic", "item_shape": [4], "max_batch": 4},
        },
    )
    orch = orchestrator_factory(cfg)
    st = orch.status()
    run_dir = orch.run_dir
    assert cmdline(st["pid"]) == f"orchestrator: supervisor titles in {run_dir}"
    assert sorted(cmdline(w["pid"]) for w in st["workers"]) == [
        f"orchestrator: worker w0 cpu in {run_dir}",
        f"orchestrator: worker w1 cpu in {run_dir}",
    ]


def test_without_setproctitle_the_title_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "setproctitle", None)  # the import fails as if not installed
    before = cmdline(os.getpid())
    assert set_title("orchestrator: supervisor x") is False
    assert cmdline(os.getpid()) == before
