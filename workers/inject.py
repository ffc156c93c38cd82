"""Stall injection for verification ([debug] inject): a side thread in the worker that periodically does
what stalls launches, or busy-loop processes on the worker's cores (cpu_hog).

Two families of GPU kinds, to check both driver journals:

- Through workers/cuda, so our own journal (workers.driver_journal.JOURNAL) records them:
  pinned_alloc (pinned host alloc+free), device_alloc (device alloc+free), module_load (module load+unload).
- Done the way another library in the process would, straight through cuda.bindings (or torch) and never
  through workers/cuda, so only the CUPTI journal sees them: host_register (cuMemHostRegister +
  cuMemHostUnregister of a host buffer), library_alloc (a device alloc+free through torch's caching allocator
  with its cache emptied, or raw cuMemAlloc/cuMemFree without torch), lazy_module (cuModuleLoadData of a
  module then the first launch of one of its kernels, which under CUDA_MODULE_LOADING=LAZY loads that
  kernel inside the driver; the supervisor starts an injected worker with LAZY loading for this kind).

Started by the worker after READY, so every injected driver operation is journaled as a fault; runs on
its own daemon thread ("inject") and, for cpu_hog, in child processes that die with the worker. Errors are
logged and kept in Injector.error; they never stop the worker.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.common.config import GPU_INJECTIONS, Config
from orchestrator.common.errors import ConfigError
from workers.cuda.errors import check

log = logging.getLogger(__name__)

KINDS = (*GPU_INJECTIONS, "cpu_hog")

# Busy loop for cpu_hog children; it exits by itself once its parent (the worker) is gone, so a
# SIGKILLed worker leaves no hog behind even if stop() never ran.
_HOG_SOURCE = (
    "import os\np = os.getppid()\nwhile os.getppid() == p:\n    for _ in range(200000):\n        pass\n"
)

# A small module for module_load and lazy_module: 50 trivial kernels, like the measurement in FACTS.md.
MODULE_KERNELS = 50
MODULE_SOURCE = "\n".join(
    f'extern "C" __global__ void k{i}(float* p) {{ p[{i}] += 1.0f; }}' for i in range(MODULE_KERNELS)
)


def _torch_with_cuda() -> tuple[Any, str]:
    """(torch, "") when torch is installed and sees a CUDA device, else (None, why not). Imported here, on
    the injection thread, never at module import."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    torch.cuda.init()  # torch's own CUDA start-up once, here, not inside the first period
    return torch, ""


class Injector:
    """Runs one injection kind until stop(). Use start(cfg) to build and start one."""

    def __init__(self, kind: str, period_ms: int, nbytes: int, windows: Path | None = None) -> None:
        self.kind = kind
        self.period_s = period_ms / 1000.0
        self.nbytes = nbytes
        # Each operation's start and end (time.monotonic_ns(), one "t0 t1" line per operation), for benches
        # that tell the stalls the injection caused from the host's own noise; the journals never read it.
        self.windows = windows
        self.count = 0  # operations done (alloc+free or load+unload pairs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hogs: list[subprocess.Popen] = []
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.kind == "cpu_hog":
            self._start_hogs()
            return
        self._thread = threading.Thread(target=self._run, name="inject", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for proc in self._hogs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._hogs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("[inject] cpu hog %d did not exit", proc.pid)
        self._hogs.clear()

    # --- GPU kinds (side thread) -------------------------------------------------------------------

    def _run(self) -> None:
        cleanups: list[Callable[[], Any]] = []
        try:
            from workers.cuda.context import current_context

            ctx = current_context()
            if ctx is None:
                raise RuntimeError(
                    "stall injection needs the worker's CUDA context; start it after the engine"
                )
            ctx.make_current()  # the context is current per OS thread
            op = self._prepare(ctx, cleanups)
            log.warning(
                "[inject] %s every %.1f ms started (thread %s)",
                self.kind,
                self.period_s * 1e3,
                threading.current_thread().name,
            )
            out = open(self.windows, "a", buffering=1) if self.windows else None  # noqa: SIM115
            if out is not None:
                cleanups.append(out.close)
            while not self._stop.wait(self.period_s):
                t0 = time.monotonic_ns()
                op()
                self.count += 1
                if out is not None:
                    out.write(f"{t0} {time.monotonic_ns()}\n")
        except BaseException as exc:  # report, never kill the worker from a debug thread
            self.error = exc
            log.error("[inject] %s stopped: %s", self.kind, exc)
        finally:
            for cleanup in reversed(cleanups):
                try:
                    cleanup()
                except Exception as exc:  # best effort: the worker keeps running either way
                    log.warning("[inject] %s clean-up failed: %s", self.kind, exc)

    def _prepare(self, ctx: Any, cleanups: list[Callable[[], Any]]) -> Callable[[], None]:
        """Set up once and return the periodic operation; `cleanups` are run when the thread ends."""
        if self.kind in ("pinned_alloc", "device_alloc", "module_load"):
            return self._prepare_own(ctx)
        if self.kind == "host_register":
            return self._prepare_host_register()
        if self.kind == "library_alloc":
            return self._prepare_library_alloc()
        if self.kind == "lazy_module":
            return self._prepare_lazy_module(ctx, cleanups)
        raise ValueError(f"unknown injection kind {self.kind!r}")

    def _prepare_own(self, ctx: Any) -> Callable[[], None]:
        """pinned_alloc, device_alloc, module_load: through workers.cuda, so JOURNAL records them."""
        if self.kind == "pinned_alloc":
            from workers.cuda.memory import PinnedBuffer

            return lambda: PinnedBuffer(self.nbytes, "injected").free()
        if self.kind == "device_alloc":
            from workers.cuda.memory import DeviceBuffer

            return lambda: DeviceBuffer(self.nbytes, "injected").free()
        from workers.cuda.module import Module, compile_cubin

        cubin = compile_cubin(MODULE_SOURCE, "inject.cu", ctx.info.arch)  # NVRTC takes no driver lock
        return lambda: Module(cubin, "injected").unload()

    # The kinds below are done like a foreign library: straight driver (or torch) calls, never workers.cuda's
    # journaled wrappers (only its check() of the result), so our own journal does not see them; CUPTI does.

    def _prepare_host_register(self) -> Callable[[], None]:
        """cuMemHostRegister + cuMemHostUnregister of one host buffer (pinning and unpinning its pages)."""
        from cuda.bindings import driver

        buf = np.ones(self.nbytes, dtype=np.uint8)  # np.ones touches every page once, here
        ptr, nbytes = buf.ctypes.data, buf.nbytes

        def op() -> None:
            check(driver.cuMemHostRegister(ptr, nbytes, 0), "cuMemHostRegister")
            check(driver.cuMemHostUnregister(ptr), "cuMemHostUnregister")
            _ = buf  # keep the buffer alive as long as the operation

        return op

    def _prepare_library_alloc(self) -> Callable[[], None]:
        """A device alloc+free as a library would: torch's caching allocator with its cache emptied each
        time (so cudaMalloc and cudaFree really run), else raw cuMemAlloc/cuMemFree. Emptying the cache also
        hands back blocks that a torch engine in this worker had cached, as another library's call would."""
        nbytes = self.nbytes
        torch, why = _torch_with_cuda()
        if torch is not None:
            log.warning("[inject] library_alloc: %d B through torch %s", nbytes, torch.__version__)

            def torch_op() -> None:
                t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
                del t
                torch.cuda.empty_cache()  # hand the block back, so the next period allocates again

            return torch_op
        from cuda.bindings import driver

        log.warning("[inject] library_alloc: %d B through cuMemAlloc/cuMemFree (%s)", nbytes, why)

        def driver_op() -> None:
            dptr = check(driver.cuMemAlloc(nbytes), "cuMemAlloc")
            check(driver.cuMemFree(dptr), "cuMemFree")

        return driver_op

    def _prepare_lazy_module(self, ctx: Any, cleanups: list[Callable[[], Any]]) -> Callable[[], None]:
        """cuModuleLoadData of a 50-kernel module, the first launch of one of its kernels (under LAZY loading
        the kernel is loaded then, inside the driver), then cuModuleUnload."""
        from cuda.bindings import driver

        from workers.cuda.module import compile_cubin

        cubin = compile_cubin(MODULE_SOURCE, "inject.cu", ctx.info.arch)  # NVRTC takes no driver lock
        image = np.frombuffer(cubin, dtype=np.uint8)  # cuModuleLoadData reads it during the call only
        dptr = check(driver.cuMemAlloc(MODULE_KERNELS * 4), "cuMemAlloc")  # one float per kernel
        cleanups.append(lambda: driver.cuMemFree(dptr))
        stream = check(driver.cuStreamCreate(0), "cuStreamCreate")
        cleanups.append(lambda: (driver.cuStreamSynchronize(stream), driver.cuStreamDestroy(stream)))
        # Kernel parameters as workers.cuda.module.KernelArgs packs them: the values, and a void** array of
        # their addresses; cuLaunchKernel copies the values at launch.
        arg = np.array([int(dptr)], dtype=np.uint64)
        params = np.array([arg.ctypes.data], dtype=np.uint64)
        # One kernel's first launch a period, not all 50: a Python loop of 100 driver calls on this thread
        # holds the GIL between the calls, and the serving thread's waits for it (up to the 5 ms switch
        # interval) showed up as stalls with no driver operation at all (H200, lazy_module at 60 s: 16 of
        # 28 launches over 1 ms). A library would load lazily from C++, without the GIL.
        name = b"k0"

        def op() -> None:
            mod = check(driver.cuModuleLoadData(image.ctypes.data), "cuModuleLoadData")
            try:
                func = check(driver.cuModuleGetFunction(mod, name), "cuModuleGetFunction")
                check(
                    driver.cuLaunchKernel(func, 1, 1, 1, 1, 1, 1, 0, stream, params.ctypes.data, 0),
                    "cuLaunchKernel",
                )
                check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
            except BaseException:
                driver.cuModuleUnload(mod)  # best effort: the launch's error is the one to report
                raise
            check(driver.cuModuleUnload(mod), "cuModuleUnload")
            _ = arg  # keep the parameter values alive as long as the operation

        return op

    # --- cpu_hog (child processes) -------------------------------------------------------------------

    def _start_hogs(self) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        for _ in cpus:  # one hog per core the worker may use
            proc = subprocess.Popen(
                [sys.executable, "-c", _HOG_SOURCE],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            os.sched_setaffinity(proc.pid, cpus)  # compete for exactly the worker's cores
            self._hogs.append(proc)
        atexit.register(self.stop)
        log.warning("[inject] cpu_hog: %d busy process(es) on cores %s", len(cpus), cpus)

    @property
    def hog_pids(self) -> list[int]:
        return [p.pid for p in self._hogs]


def start(cfg: Config, windows: Path | None = None) -> Injector | None:
    """Start the injection `cfg.debug.inject` asks for, or return None when there is none to run here.
    A GPU kind appends each operation's start and end to `windows` when given.

    crash_on_start and hang_after are the worker's own faults, not side threads: they return None too.
    GPU kinds (GPU_INJECTIONS) need a GPU worker whose engine has created the CUDA context already.
    """
    d = cfg.debug
    if d.inject not in KINDS:
        return None
    if d.inject in GPU_INJECTIONS and cfg.workers.device != "gpu":
        raise ConfigError(
            f'debug.inject = "{d.inject}" needs workers.device = "gpu"; a CPU worker can only use "cpu_hog"'
        )
    inj = Injector(d.inject, d.inject_period_ms, d.inject_bytes, windows)
    inj.start()
    return inj


def stop(inj: Injector | None) -> None:
    if inj is not None:
        inj.stop()
