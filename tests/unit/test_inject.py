"""Stall-injection start-up rules (no processes, no CUDA): which kinds run where, and clear errors; the
foreign-library kinds fail into Injector.error, never out of their thread; lazy_module's worker is planned
with lazy module loading, every other GPU worker with eager."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.common.config import GPU_INJECTIONS, parse_config
from orchestrator.common.errors import ConfigError
from orchestrator.common.rundir import RunDir
from orchestrator.supervisor.devices import plan_workers
from workers import inject
from workers.cuda.errors import CudaError

FOREIGN = ("host_register", "library_alloc", "lazy_module")


def cfg(device: str, kind: str, **debug: object):
    return parse_config(
        {"workers": {"device": device}, "debug": {"inject": kind, **debug}}, check_files=False
    )


def test_kinds_are_the_configs() -> None:
    assert set(FOREIGN) < set(GPU_INJECTIONS)
    assert inject.KINDS == (*GPU_INJECTIONS, "cpu_hog")


@pytest.mark.parametrize("kind", GPU_INJECTIONS)
def test_gpu_kinds_are_refused_on_cpu_workers(kind: str) -> None:
    # Config validation refuses this combination already, in one line; start() refuses it too, in case a
    # config reaches a CPU worker by another route.
    with pytest.raises(ConfigError) as refused:
        cfg("cpu", kind)
    assert refused.value.errors == [
        f'debug.inject: "{kind}" needs workers.device = "gpu"; CPU workers can use "cpu_hog"'
    ]
    gpu = cfg("gpu", kind)
    assert gpu.debug.inject == kind
    on_cpu = dataclasses.replace(gpu, workers=dataclasses.replace(gpu.workers, device="cpu"))
    with pytest.raises(
        ConfigError, match=f'debug.inject = "{kind}" needs workers.device = "gpu"; a CPU worker can only use'
    ):
        inject.start(on_cpu)


@pytest.mark.parametrize("kind", ["none", "crash_on_start", "hang_after"])
def test_non_thread_kinds_start_nothing(kind: str) -> None:
    assert inject.start(cfg("cpu", kind)) is None
    inject.stop(None)  # a no-op


@pytest.fixture
def thread_crashes() -> Iterator[list[BaseException | None]]:
    """Exceptions that escape any thread (threading.excepthook): a debug thread must never let one out."""
    seen: list[BaseException | None] = []
    before = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)
    yield seen
    threading.excepthook = before


def _run_to_error(inj: inject.Injector) -> None:
    inj.start()
    assert inj._thread is not None
    inj._thread.join(30)  # the thread ends by itself on its error; no stop() needed
    assert not inj._thread.is_alive()
    inj.stop()


def test_gpu_kind_without_cuda_context_reports_error_and_stops() -> None:
    # The thread needs the engine's context; without one it records the error instead of crashing.
    pytest.importorskip("cuda.bindings")
    inj = inject.Injector("device_alloc", 1, 1024)
    inj.start()
    inj.stop()
    assert inj.count == 0 and inj.error is not None


@pytest.mark.parametrize("kind", FOREIGN)
def test_foreign_kind_without_cuda_context_reports_error(
    kind: str, thread_crashes: list[BaseException | None]
) -> None:
    # No CUDA context in this process (or no cuda-bindings at all): the error is kept, the caller runs on.
    inj = inject.Injector(kind, 1, 1024)
    _run_to_error(inj)
    assert inj.error is not None and inj.count == 0
    assert thread_crashes == []


@pytest.mark.parametrize("kind", FOREIGN)
def test_foreign_kind_failing_driver_calls_report_error(
    kind: str, thread_crashes: list[BaseException | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A context that claims to be there, on a host without a usable driver: set-up or the first operation
    # fails (no libcuda, or CUDA not initialised), and the thread records it instead of raising.
    pytest.importorskip("cuda.bindings")
    from workers.cuda import context, module

    fake = SimpleNamespace(make_current=lambda: None, info=SimpleNamespace(arch="sm_90"))
    monkeypatch.setattr(context, "current_context", lambda: fake)
    monkeypatch.setattr(module, "compile_cubin", lambda *a, **k: b"\0" * 64)  # keep NVRTC out of it
    inj = inject.Injector(kind, 1, 1024)
    _run_to_error(inj)
    assert inj.error is not None and inj.count == 0
    assert thread_crashes == []


def test_each_operation_appends_its_start_and_end_to_the_windows_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.cuda import context

    monkeypatch.setattr(context, "current_context", lambda: SimpleNamespace(make_current=lambda: None))
    path = tmp_path / "inject-w0.windows"
    inj = inject.Injector("host_register", 1, 1024, path)
    done = threading.Event()

    def op() -> None:
        if inj.count == 2:  # the third operation: after it, stop
            done.set()
            inj._stop.set()

    monkeypatch.setattr(inj, "_prepare", lambda ctx, cleanups: op)
    inj.start()
    assert done.wait(30)
    inj.stop()
    assert inj.error is None and inj.count == 3
    rows = [tuple(map(int, line.split())) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and all(t0 <= t1 for t0, t1 in rows)
    assert [t0 for t0, _ in rows] == sorted(t0 for t0, _ in rows)


def test_driver_call_names_the_failed_call() -> None:
    class Err(int):
        name = "CUDA_ERROR_NOT_INITIALIZED"

    # the foreign kinds check their straight cuda.bindings calls with workers/cuda's check(), which
    # journals nothing
    with pytest.raises(CudaError, match=r"cuMemHostRegister failed: CUDA_ERROR_NOT_INITIALIZED \(3\)"):
        inject.check((Err(3),), "cuMemHostRegister")
    assert inject.check((Err(0), "out"), "cuMemAlloc") == "out"
    assert inject.check((Err(0),), "cuMemFree") is None


def test_module_source_has_fifty_kernels() -> None:
    assert inject.MODULE_SOURCE.count("__global__") == 50 == inject.MODULE_KERNELS


# --- lazy_module's worker: CUDA_MODULE_LOADING=LAZY (supervisor planning, fake GPUs) --------------------


def plans(**debug: object) -> dict[str, str]:
    gpu_list = [{"index": i, "uuid": f"GPU-{i}", "name": "H200", "cpu_affinity": [i]} for i in range(2)]
    c = parse_config(
        {
            "orchestrator": {"cpu_affinity": "none"},
            "workers": {"device": "gpu", "per_gpu": 2},
            "model": {"kind": "synthetic"},
            "debug": debug,
        },
        check_files=False,
    )
    return {p.id: p.env["CUDA_MODULE_LOADING"] for p in plan_workers(c, RunDir("/tmp/orch-plan"), gpu_list)}


def test_lazy_module_makes_every_injected_worker_load_lazily(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="orchestrator.supervisor.devices"):
        assert plans(inject="lazy_module") == dict.fromkeys(["w0", "w1", "w2", "w3"], "LAZY")
    assert [r.getMessage() for r in caplog.records if "LAZY" in r.getMessage()] == [
        '[spawn] w0, w1, w2, w3 forced to CUDA_MODULE_LOADING=LAZY for debug.inject = "lazy_module" (not EAGER)'
    ]


def test_lazy_module_leaves_workers_it_does_not_apply_to_eager() -> None:
    assert plans(inject="lazy_module", inject_workers=["w1", "w2"]) == {
        "w0": "EAGER",
        "w1": "LAZY",
        "w2": "LAZY",
        "w3": "EAGER",
    }


@pytest.mark.parametrize("kind", ["none", "module_load", "host_register", "library_alloc", "cpu_hog"])
def test_other_injections_keep_eager_loading(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="orchestrator.supervisor.devices"):
        assert set(plans(inject=kind).values()) == {"EAGER"}
    assert not any("LAZY" in r.getMessage() for r in caplog.records)
