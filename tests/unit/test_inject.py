"""Stall-injection start-up rules (no processes, no CUDA): which kinds run where, and clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.common.config import parse_config
from orchestrator.common.errors import ConfigError
from workers import inject


def cfg(device: str, kind: str):
    return parse_config({"workers": {"device": device}, "debug": {"inject": kind}}, check_files=False)


@pytest.mark.parametrize("kind", ["pinned_alloc", "device_alloc", "module_load"])
def test_gpu_kinds_are_refused_on_cpu_workers(kind: str) -> None:
    # Config validation refuses this combination already; start() refuses it too, in case a config
    # reaches a CPU worker by another route.
    with pytest.raises(ConfigError, match=f'"{kind}" needs workers.device = "gpu"'):
        cfg("cpu", kind)
    gpu = cfg("gpu", kind)
    on_cpu = dataclasses.replace(gpu, workers=dataclasses.replace(gpu.workers, device="cpu"))
    with pytest.raises(ConfigError, match=f'debug.inject = "{kind}" needs workers.device = "gpu"'):
        inject.start(on_cpu)


@pytest.mark.parametrize("kind", ["none", "crash_on_start", "hang_after"])
def test_non_thread_kinds_start_nothing(kind: str) -> None:
    assert inject.start(cfg("cpu", kind)) is None
    inject.stop(None)  # a no-op


def test_gpu_kind_without_cuda_context_reports_error_and_stops() -> None:
    # The thread needs the engine's context; without one it records the error instead of crashing.
    pytest.importorskip("cuda.bindings")
    inj = inject.Injector("device_alloc", 1, 1024)
    inj.start()
    inj.stop()
    assert inj.count == 0 and inj.error is not None


def test_module_source_has_fifty_kernels() -> None:
    assert inject._MODULE_SOURCE.count("__global__") == 50
