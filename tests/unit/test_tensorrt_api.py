"""The TensorRT members the adapter calls exist on the real installed bindings (lean runtime or full
tensorrt), and the two behaviours its error paths rely on hold. Skipped when no TensorRT is installed;
never creates a Runtime (that needs a GPU)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from workers.engines.tensorrt_engine import RUNTIME_MODULES, TRT_API, TRT_FUNCTIONS, make_logger


def _installed() -> list[str]:
    found = []
    for names in RUNTIME_MODULES.values():
        for name in names:
            try:
                importlib.import_module(name)
            except (ImportError, OSError):
                continue
            found.append(name)
            break
    return found


MODULES = _installed()
pytestmark = pytest.mark.skipif(
    not MODULES, reason="no TensorRT bindings installed (tensorrt-lean-cu13-bindings)"
)


@pytest.fixture(params=MODULES or ["none"])
def trt(request: pytest.FixtureRequest):
    return importlib.import_module(request.param)


def test_every_member_the_adapter_uses_exists(trt) -> None:
    missing = [
        f"{cls}.{member}"
        for cls, members in TRT_API.items()
        for member in members
        if not hasattr(getattr(trt, cls, None), member)
    ]
    missing += [f for f in TRT_FUNCTIONS if not callable(getattr(trt, f, None))]
    assert not missing, f"{trt.__name__} {trt.__version__} lacks {missing}"


def test_execution_members_are_methods_with_expected_arity(trt) -> None:
    # pybind11 signatures in the docstrings: a renamed or re-shaped call would break us silently.
    ctx = trt.IExecutionContext
    assert "stream_handle" in ctx.execute_async_v3.__doc__
    assert "-> bool" in ctx.execute_async_v3.__doc__
    assert "-> bool" in ctx.set_input_shape.__doc__ and "-> bool" in ctx.set_tensor_address.__doc__
    assert "profile_index" in trt.ICudaEngine.get_tensor_profile_shape.__doc__
    assert "ICudaEngine" in trt.Runtime.deserialize_cuda_engine.__doc__


def test_nptype_maps_float_and_raises_type_error_for_bf16(trt) -> None:
    assert np.dtype(trt.nptype(trt.DataType.FLOAT)) == np.float32
    assert np.dtype(trt.nptype(trt.DataType.HALF)) == np.float16
    with pytest.raises(TypeError):
        trt.nptype(trt.DataType.BF16)


def test_capture_logger_subclasses_the_real_ilogger(trt) -> None:
    logger = make_logger(trt)
    assert isinstance(logger, trt.ILogger)
    logger.log(trt.ILogger.Severity.ERROR, "boom")
    logger.capturing = False
    logger.log(trt.ILogger.Severity.WARNING, "later")
    assert logger.messages == [("ERROR", "boom")]


def test_io_mode_and_location_enums(trt) -> None:
    assert trt.TensorIOMode.INPUT != trt.TensorIOMode.OUTPUT
    assert trt.TensorLocation.HOST != trt.TensorLocation.DEVICE
