"""Worker process entry: load the engine, allocate and warm up, report READY, then serve over ZeroMQ.

`python -m workers.worker SPEC_JSON_PATH` (an orchestrator.common.messages.WorkerSpec), started by the
supervisor. One serving thread owns the data ROUTER and the supervisor PUSH socket and runs the pipeline; a
completion-waiter thread is used only for GPU engines in blocking-sync mode. Signal handlers only set a flag and wake the serving thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from orchestrator.common import messages
from orchestrator.common.config import Config, from_dict
from orchestrator.common.errors import ConfigError, ErrorCode, OrchestratorError
from orchestrator.common.procstat import pin_process, set_title
from workers import inject
from workers.serve_loop import ServeLoop

log = logging.getLogger("workers.worker")

_PR_SET_PDEATHSIG = 1


def _arm_parent_death(expected_ppid: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, then close the race where it already did."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:  # pragma: no cover - non-Linux
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable; relying on the parent-pid check")
    if os.getppid() != expected_ppid:
        log.error("[shutdown] supervisor %d already gone before start", expected_ppid)
        sys.exit(0)


def _configure_logging(cfg: Config, spec: messages.WorkerSpec) -> None:
    """stderr is <run_dir>/logs/<id>.log (the supervisor redirected it): rotated past log_max_mb."""
    from orchestrator.common import logs
    from orchestrator.common.rundir import RunDir

    worker_id = spec.id
    path = RunDir(spec.run_path(cfg.run_dir)).logs / f"{worker_id}.log"
    logs.configure(
        cfg.orchestrator.log_level,
        f"%(asctime)s %(levelname)s [{worker_id}] %(name)s: %(message)s",
        path,
        cfg.orchestrator.log_max_mb << 20,
    )


def _startup(spec: messages.WorkerSpec, cfg: Config, ctx: zmq.Context, sup: zmq.Socket) -> ServeLoop:
    """Everything before READY. Raises on failure (reported as last words by the caller)."""
    if (
        spec.cpu_affinity
    ):  # every thread: ZeroMQ's I/O threads started with the context, on our parent's cores
        pin_process(tuple(spec.cpu_affinity))
    if cfg.debug.inject == "crash_on_start" and cfg.debug.applies_to(spec.id):
        raise RuntimeError("injected start-up crash (debug.inject = crash_on_start)")
    t0 = time.monotonic()
    if cfg.workers.device == "gpu":  # before the engine: CUPTI's own threads are the only new ones then
        from workers import cupti_journal

        try:
            cupti_journal.start(cfg.monitor.driver_journal)
        except cupti_journal.CuptiUnavailable as exc:
            raise ConfigError(f'monitor.driver_journal = "cupti": {exc}') from None
    from workers.engines.registry import create_engine  # imports CUDA only for GPU engines

    engine = create_engine(cfg)
    loop = ServeLoop(spec, cfg, engine, ctx, sup)
    log.info(
        "[ready] engine %s loaded and warmed up in %.2fs; endpoint %s",
        engine.kind,
        time.monotonic() - t0,
        loop.endpoint,
    )
    return loop


def title(spec: messages.WorkerSpec) -> str:
    """The process title `ps` shows: "orchestrator: worker w3 gpu 3 in RUN_DIR" ("... w0 cpu in ..."); the
    run directory tells the workers of two orchestrators on one host apart."""
    return f"orchestrator: worker {spec.id} {spec.device.replace(':', ' ')} in {spec.run_dir}"


def run_worker(spec_path: str) -> int:
    try:
        spec = messages.WORKER_SPEC.decode(Path(spec_path).read_bytes())
    except (OSError, messages.MessageError) as exc:  # not the supervisor's file, or another release's
        print(f"workers.worker: cannot use {spec_path}: {exc}", file=sys.stderr)
        return 2
    set_title(title(spec))
    cfg = from_dict(spec.config)
    _configure_logging(cfg, spec)
    _arm_parent_death(spec.ppid)
    # Only set flags in signal handlers; the serving loop notices through the wakeup fd it polls.
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    stop_flag = {"stop": False}

    def on_term(signum: int, frame: Any) -> None:
        stop_flag["stop"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    ctx = zmq.Context(io_threads=cfg.transport.io_threads)
    sup = ctx.socket(zmq.PUSH)
    sup.setsockopt(zmq.LINGER, 2000)
    sup.setsockopt(zmq.SNDHWM, 1000)
    sup.connect(spec.supervisor_endpoint)
    try:
        loop = _startup(spec, cfg, ctx, sup)
    except Exception as exc:  # last words: the supervisor shows this with the log tail
        code = exc.code if isinstance(exc, OrchestratorError) else ErrorCode.INTERNAL
        if isinstance(exc, OrchestratorError):  # a stated problem (model, config, device): no traceback
            log.error("[spawn] start-up failed: %s", exc)
        else:
            log.exception("[spawn] start-up failed")
        failed = messages.Failed(
            id=spec.id, pid=os.getpid(), code=int(code), error=f"{type(exc).__name__}: {exc}"
        )
        sup.send(messages.encode(failed))
        sup.close()
        ctx.term()
        return 3
    # Stall injection ([debug] inject) starts after READY, so its driver operations count as faults.
    injector = (
        inject.start(cfg, spec.run_path(cfg.run_dir) / f"inject-{spec.id}.windows")
        if cfg.debug.applies_to(spec.id)
        else None
    )
    try:
        loop.run(rfd, stop_flag)
    finally:
        inject.stop(injector)
        loop.close()
        if cfg.workers.device == "gpu":
            from workers import cupti_journal

            cupti_journal.stop()
        sup.close(linger=1000)
        ctx.term()
    return 0


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m workers.worker SPEC_JSON_PATH (started by the supervisor)", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_worker(sys.argv[1]))


if __name__ == "__main__":
    main()
