"""Shared test fixtures: short temporary run directories, config writing, spawned orchestrators, and a
guard that every test leaves no child process behind. Runs in the pytest process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "demo.onnx"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tier marker of each test comes from its folder: `pytest -m unit`, `-m "not gpu"`..."""
    for item in items:
        path = str(item.fspath).replace(os.sep, "/")
        for tier in ("unit", "integration", "e2e", "gpu"):
            if f"tests/{tier}/" in path:
                item.add_marker(getattr(pytest.mark, tier))


# Temporary directories of the test running now: a detached orchestrator left behind is recognised by its
# command line naming one of them, so processes of other sessions on the same machine are never touched.
_TEST_DIRS: set[str] = set()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: ipc:// socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="orch-", dir="/tmp"))
    _TEST_DIRS.add(str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(directory: Path, sections: dict[str, dict[str, object]], name: str = "test.toml") -> Path:
    """Write a TOML config whose run directory is inside `directory`."""
    sections = {k: dict(v) for k, v in sections.items()}
    orch = sections.setdefault("orchestrator", {})
    orch.setdefault("name", "t")
    orch.setdefault("run_dir", str(directory / "run"))
    orch.setdefault("startup_timeout_s", 60)
    path = directory / name
    path.write_text(tomli_w.dumps(sections))
    return path


def wait_until(pred: Any, timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll `pred` until it returns something true (returned), or fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def cli(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    """Run the `orchestrator` CLI as a user would (a fresh interpreter)."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"orchestrator {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


class Running:
    """A detached orchestrator started through the CLI; stopped (and checked gone) on exit."""

    def __init__(self, config: Path) -> None:
        self.config = config
        from orchestrator.common.config import load_config

        self.cfg = load_config(config)
        self.run_dir = self.cfg.run_dir

    def start(self, timeout: float = 90) -> Running:
        cli("start", str(self.config), "--detach", timeout=timeout, check=True)
        return self

    def status(self) -> dict:
        from orchestrator.client.control import ControlClient
        from orchestrator.common.rundir import RunDir

        with ControlClient(RunDir(self.run_dir).control_endpoint(), timeout_s=5) as c:
            return c.call("status")

    def wait_status(self, predicate, timeout: float = 5.0) -> dict:
        """Poll status until predicate(status) holds (counters arrive with heartbeats, every 200 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if predicate(st) or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def stop(self) -> None:
        from orchestrator.common.rundir import RunDir

        if RunDir(self.run_dir).is_running():
            cli("stop", str(self.config), timeout=60)


@pytest.fixture
def orchestrator_factory() -> Iterator:
    started: list[Running] = []

    def make(config: Path, start: bool = True) -> Running:
        r = Running(config)
        started.append(r)
        return r.start() if start else r

    yield make
    for r in started:
        r.stop()


def _descendants() -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every test must leave no child process behind (detached supervisors included)."""
    before = {p.pid for p in _descendants()}
    started_at = time.time()
    yield
    deadline = time.time() + 10
    left: list[psutil.Process] = []
    while time.time() < deadline:
        left = [p for p in _descendants() if p.pid not in before]
        left += [p for p in _orchestrator_orphans(started_at)]
        if not left:
            _TEST_DIRS.clear()
            return
        time.sleep(0.1)
    for p in left:
        p.kill()
    _TEST_DIRS.clear()
    pytest.fail(f"processes left behind: {[(p.pid, ' '.join(p.cmdline()[:4])) for p in left]}")


#: How a supervisor's or a worker's command line reads: its process title names the role and the run directory
#: ("orchestrator: worker w0 cpu in /tmp/orch-x/run"), or, without setproctitle, the module it runs.
ROLE_MARKS = (
    "orchestrator: supervisor ",
    "orchestrator: worker ",
    "orchestrator.supervisor",
    "workers.worker",
)


def _orchestrator_orphans(since: float) -> list[psutil.Process]:
    """Detached supervisors and their workers re-parent to init: find this test's by command line (a role
    and one of the test's own directories) and start time."""
    if not _TEST_DIRS:
        return []
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if (
                p.info["create_time"] >= since - 1
                and p.pid != os.getpid()
                and any(m in cmd for m in ROLE_MARKS)
                and any(d in cmd for d in _TEST_DIRS)
                and p.status() != psutil.STATUS_ZOMBIE
            ):
                out.append(p)
        except psutil.Error:
            continue
    return out
