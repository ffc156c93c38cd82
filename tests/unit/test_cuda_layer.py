"""The CUDA layer's GPU-free parts: the eager-loading check, error naming, kernel-argument packing and
NVRTC compilation (NVRTC needs no GPU). Skipped where cuda-bindings is not installed."""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import pytest

pytest.importorskip("cuda.bindings")

from cuda.bindings import driver, nvrtc  # noqa: E402

from workers.cuda import context  # noqa: E402
from workers.cuda.errors import CudaError, check  # noqa: E402
from workers.cuda.module import KernelArgs, compile_cubin  # noqa: E402
from workers.engines import synthetic_math  # noqa: E402


@pytest.mark.parametrize(
    ("value", "mode", "warns"),
    [(None, "LAZY", True), ("lazy", "LAZY", True), ("EAGER", "EAGER", False), (" eager ", "EAGER", False)],
)
def test_module_loading_check(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    value: str | None,
    mode: str,
    warns: bool,
) -> None:
    monkeypatch.setattr(context, "_env_mode", context._env_mode)  # restored afterwards
    if value is None:
        monkeypatch.delenv(context.LOADING_ENV, raising=False)
    else:
        monkeypatch.setenv(context.LOADING_ENV, value)
    with caplog.at_level(logging.WARNING, logger="workers.cuda.context"):
        assert context.check_module_loading() == mode
    assert any("not EAGER" in r.getMessage() for r in caplog.records) is warns
    if context.current_context() is None:  # no CUDA yet in this process: the environment's answer
        assert context.module_loading_mode() == mode


def test_check_names_the_error_and_operation() -> None:
    assert check((driver.CUresult.CUDA_SUCCESS, 7), "op") == 7
    assert check((driver.CUresult.CUDA_SUCCESS,), "op") is None
    assert check((driver.CUresult.CUDA_SUCCESS, 1, 2), "op") == (1, 2)
    with pytest.raises(CudaError, match=r"cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY \(2\)") as err:
        check((driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY, None), "cuMemAlloc")
    assert err.value.name == "CUDA_ERROR_OUT_OF_MEMORY" and err.value.op == "cuMemAlloc"


def test_kernel_args_pack_addresses_and_update_in_place() -> None:
    args = KernelArgs([(0x1000, np.uint64), (5, np.uint64), (9, np.uint32)])
    ptrs = np.ctypeslib.as_array((ctypes.c_uint64 * 3).from_address(args.ptr))
    assert ctypes.c_uint64.from_address(int(ptrs[0])).value == 0x1000
    assert ctypes.c_uint32.from_address(int(ptrs[2])).value == 9
    before = args.ptr
    args.set(1, 123456789012)
    assert ctypes.c_uint64.from_address(int(ptrs[1])).value == 123456789012 and args.ptr == before


def _nvrtc_or_skip() -> None:
    try:
        nvrtc.nvrtcVersion()
    except Exception as exc:  # libnvrtc not installed
        pytest.skip(f"NVRTC unavailable: {exc}")


def test_synthetic_kernel_compiles_to_cubin() -> None:
    _nvrtc_or_skip()
    cubin = compile_cubin(synthetic_math.CUDA_SOURCE, "synthetic.cu", "sm_90", ("--fmad=false",))
    assert cubin[:4] == b"\x7fELF"


def test_fmad_false_leaves_no_fused_multiply_add() -> None:
    """The bit-exactness contract: with --fmad=false the PTX has separate mul and add, no fma."""
    _nvrtc_or_skip()

    def ptx(options: list[bytes]) -> str:
        prog = check(
            nvrtc.nvrtcCreateProgram(synthetic_math.CUDA_SOURCE.encode(), b"s.cu", 0, [], []), "create"
        )
        opts = [b"--gpu-architecture=compute_90", *options]
        check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), "compile")
        buf = b" " * check(nvrtc.nvrtcGetPTXSize(prog), "size")
        check(nvrtc.nvrtcGetPTX(prog, buf), "ptx")
        nvrtc.nvrtcDestroyProgram(prog)
        return buf.decode(errors="replace")

    assert "fma.rn.f32" in ptx([])  # the default contracts v * 3 + x
    exact = ptx([b"--fmad=false"])
    assert "fma." not in exact and "mul.rn.f32" in exact and "add.rn.f32" in exact


def test_compile_error_carries_the_log() -> None:
    _nvrtc_or_skip()
    with pytest.raises(CudaError, match="nvrtcCompileProgram failed: NVRTC_ERROR_COMPILATION.*error"):
        compile_cubin('extern "C" __global__ void k() { undefined_thing(); }', "bad.cu", "sm_90")
