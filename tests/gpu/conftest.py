"""GPU test tier: skipped unless cuda-bindings imports, cuInit succeeds and a device exists. Provides
engine construction and a pipelined driver over workers.pipeline.Pipeline (no sockets). Runs in the
pytest process, which owns one CUDA context for all GPU tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The driver reads this once, in cuInit: set it before anything below can initialise CUDA.
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

_HERE = Path(__file__).resolve().parent


def _skip_reason() -> str | None:
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        return f"cuda-bindings not installed ({exc})"
    try:
        err = driver.cuInit(0)[0]
        if err:
            return f"cuInit failed: {err.name}"
        err, count = driver.cuDeviceGetCount()
        if err or count < 1:
            return "no CUDA device"
    except Exception as exc:  # libcuda missing: no driver on this host
        return f"no CUDA driver ({exc})"
    return None


_REASON = _skip_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _REASON is None:
        return
    for item in items:
        if Path(str(item.fspath)).resolve().parent == _HERE:
            item.add_marker(pytest.mark.skip(reason=_REASON))


@pytest.fixture
def engines() -> Iterator[list]:
    """Collects engines a test builds and closes them (and resets the READY guard) afterwards."""
    from workers.driver_journal import JOURNAL

    made: list = []
    yield made
    for eng in made:
        eng.close()
    JOURNAL.ready = False
