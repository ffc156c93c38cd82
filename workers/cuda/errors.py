"""CudaError and check(): turn cuda-python's (err, *outputs) tuples into values or a named exception.

Used by every module of workers/cuda, in any worker thread that calls CUDA.
"""

from __future__ import annotations

from typing import Any

from orchestrator.common.errors import EngineError


class CudaError(EngineError):
    """A CUDA driver or NVRTC call failed. `name` is the error enum's name, `op` the failed operation."""

    def __init__(self, op: str, name: str, code: int, detail: str = "") -> None:
        self.op = op
        self.name = name
        self.code_value = code
        msg = f"{op} failed: {name} ({code})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


def error_name(err: Any) -> str:
    """The enum name of a CUresult / nvrtcResult. Reading the enum needs no driver call, so this works
    even when the failure is that libcuda could not be used."""
    name = getattr(err, "name", None)
    return name if isinstance(name, str) else f"error {int(err)}"


def check(result: tuple, op: str) -> Any:
    """Return the outputs of a cuda-python call, or raise CudaError naming `op`.

    Every binding returns a tuple whose first item is the status enum; CUDA_SUCCESS and NVRTC_SUCCESS are
    0 and therefore falsy, which keeps this check to one truth test on the hot path.
    """
    err = result[0]
    if err:
        raise CudaError(op, error_name(err), int(err))
    n = len(result)
    if n == 1:
        return None
    if n == 2:
        return result[1]
    return result[1:]
