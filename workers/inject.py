"""Stall injection for verification ([debug] inject): a side thread in the worker that periodically does
what stalls launches (pinned or device alloc+free, module load+unload), or busy-loop processes on the
worker's cores (cpu_hog).

Started by the worker after READY, so every injected driver operation is journaled as a fault; runs on
its own daemon thread ("inject") and, for cpu_hog, in child processes that die with the worker.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
from typing import Any

from orchestrator.common.config import Config
from orchestrator.common.errors import ConfigError

log = logging.getLogger(__name__)

GPU_KINDS = ("pinned_alloc", "device_alloc", "module_load")
KINDS = (*GPU_KINDS, "cpu_hog")

# Busy loop for cpu_hog children; it exits by itself once its parent (the worker) is gone, so a
# SIGKILLed worker leaves no hog behind even if stop() never ran.
_HOG_SOURCE = (
    "import os\np = os.getppid()\nwhile os.getppid() == p:\n    for _ in range(200000):\n        pass\n"
)

# A small module for module_load: 50 trivial kernels, like the measurement in FACTS.md.
_MODULE_SOURCE = "\n".join(
    f'extern "C" __global__ void k{i}(float* p) {{ p[{i}] += 1.0f; }}' for i in range(50)
)


class Injector:
    """Runs one injection kind until stop(). Use start(cfg) to build and start one."""

    def __init__(self, kind: str, period_ms: int, nbytes: int) -> None:
        self.kind = kind
        self.period_s = period_ms / 1000.0
        self.nbytes = nbytes
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
        try:
            from workers.cuda.context import current_context

            ctx = current_context()
            if ctx is None:
                raise RuntimeError(
                    "stall injection needs the worker's CUDA context; start it after the engine"
                )
            ctx.make_current()  # the context is current per OS thread
            op = self._prepare()
            log.warning(
                "[inject] %s every %.1f ms started (thread %s)",
                self.kind,
                self.period_s * 1e3,
                threading.current_thread().name,
            )
            while not self._stop.wait(self.period_s):
                op()
                self.count += 1
        except BaseException as exc:  # report, never kill the worker from a debug thread
            self.error = exc
            log.error("[inject] %s stopped: %s", self.kind, exc)

    def _prepare(self) -> Any:
        """The periodic operation, going through workers.cuda so JOURNAL records it."""
        if self.kind == "pinned_alloc":
            from workers.cuda.memory import PinnedBuffer

            return lambda: PinnedBuffer(self.nbytes, "injected").free()
        if self.kind == "device_alloc":
            from workers.cuda.memory import DeviceBuffer

            return lambda: DeviceBuffer(self.nbytes, "injected").free()
        from workers.cuda.context import current_context
        from workers.cuda.module import Module, compile_cubin

        ctx = current_context()
        assert ctx is not None
        cubin = compile_cubin(_MODULE_SOURCE, "inject.cu", ctx.info.arch)  # NVRTC takes no driver lock
        return lambda: Module(cubin, "injected").unload()

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


def injected_here(cfg: Config, worker_id: str) -> bool:
    """Whether [debug] inject applies to this worker."""
    return cfg.debug.inject != "none" and (
        not cfg.debug.inject_workers or worker_id in cfg.debug.inject_workers
    )


def start(cfg: Config) -> Injector | None:
    """Start the injection `cfg.debug.inject` asks for, or return None when there is none to run here.

    crash_on_start and hang_after are the worker's own faults, not side threads: they return None too.
    GPU kinds need a GPU worker whose engine has created the CUDA context already.
    """
    d = cfg.debug
    if d.inject not in KINDS:
        return None
    if d.inject in GPU_KINDS and cfg.workers.device != "gpu":
        raise ConfigError(
            f'debug.inject = "{d.inject}" needs workers.device = "gpu"; a CPU worker can only use "cpu_hog"'
        )
    inj = Injector(d.inject, d.inject_period_ms, d.inject_bytes)
    inj.start()
    return inj


def stop(inj: Injector | None) -> None:
    if inj is not None:
        inj.stop()
