"""TensorRT plan loading on a real GPU with the real installed runtime (lean or full): bad plan files
(missing, empty, garbage, truncated) give clear errors that quote TensorRT. No plan can be built here
(no builder is installable), so the success path is covered by tests/unit/test_tensorrt_adapter.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from gpu_helpers import drive, gpu_config, poison

from orchestrator.common.errors import EngineError
from workers.engines import synthetic_math
from workers.engines.tensorrt_engine import TensorRTEngine, import_tensorrt
from workers.pipeline import Pipeline

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def runtime_choice() -> str:
    try:
        _, kind = import_tensorrt("auto")
    except EngineError as exc:
        pytest.skip(str(exc))
    return kind


def load(tmp_path: Path, data: bytes | None, runtime: str) -> EngineError:
    plan = tmp_path / "model.plan"
    if data is not None:
        plan.write_bytes(data)
    cfg = gpu_config(
        model__kind="tensorrt", model__path=str(plan), model__runtime=runtime, model__max_batch=4
    )
    with pytest.raises(EngineError) as err:
        TensorRTEngine(cfg)
    log.warning("%s -> %s", "missing" if data is None else f"{len(data)} B", err.value)
    return err.value


def test_missing_plan(tmp_path: Path, runtime_choice: str) -> None:
    assert "TensorRT plan not found" in str(load(tmp_path, None, runtime_choice))


def test_empty_plan(tmp_path: Path, runtime_choice: str) -> None:
    assert "the file is empty" in str(load(tmp_path, b"", runtime_choice))


def test_garbage_plan(tmp_path: Path, runtime_choice: str) -> None:
    msg = str(load(tmp_path, bytes(range(256)) * 64, runtime_choice))
    assert "cannot load TensorRT plan" in msg and "model.plan" in msg
    assert "not a TensorRT plan" in msg or "another TensorRT version" in msg
    assert "TensorRT said: " in msg and "TensorRT said: nothing" not in msg


def test_truncated_plan_header(tmp_path: Path, runtime_choice: str) -> None:
    # A plan starts with the tag "ftrt"; cut right after it, as an interrupted copy would.
    msg = str(load(tmp_path, b"ftrt" + b"\x00" * 28, runtime_choice))
    assert "cannot load TensorRT plan" in msg and "TensorRT said: " in msg


def test_plan_error_leaves_process_usable(tmp_path: Path, runtime_choice: str, engines: list) -> None:
    """A failed load must not poison the CUDA context: the synthetic engine still runs afterwards."""
    from workers.engines.synthetic_gpu import SyntheticGpuEngine

    load(tmp_path, b"junk" * 100, runtime_choice)
    cfg = gpu_config(model__work=5, model__item_shape=[64], model__max_batch=4)
    eng = SyntheticGpuEngine(cfg)
    engines.append(eng)
    pipe = Pipeline(eng, 2, 16, 0, cfg.buckets)
    eng.warmup(pipe.slots, pipe.buckets)
    poison(pipe.slots)
    x = np.linspace(0, 1, 4 * 64, dtype=np.float32).reshape(4, 64)
    got = drive(pipe, [{"x": x}])
    assert np.array_equal(got[0]["y"], synthetic_math.reference(x, 5))
