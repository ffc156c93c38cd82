"""The supervisor's view of one worker slot: spawn mechanism, process sentinel, state and progress.

Runs on the supervisor's main thread only. Workers are started with subprocess (fork+exec of a fresh
interpreter, so nothing CUDA-related is ever forked) in their own session, so a terminal's Ctrl-C reaches
only the supervisor, which then drains them in order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from orchestrator.common import messages
from orchestrator.common.config import Config, to_dict
from orchestrator.common.errors import OrchestratorError
from orchestrator.common.messages import Heartbeat, Ready, ShmStats
from orchestrator.common.procstat import process_state
from orchestrator.common.rundir import RunDir
from orchestrator.supervisor.devices import WorkerPlan
from orchestrator.supervisor.restart_policy import RestartTracker

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


State = messages.WorkerState  # a worker slot's state (the events carry it)

SHM_COUNTS = ("arena_bytes", "free_bytes", "leases", "requests", "bytes")


def shm_status(shm: ShmStats | None) -> dict[str, Any]:
    """The status `shm` object built from a heartbeat's `shm` entry; runs in the supervisor.

    Always the same numeric keys (integers: the heartbeat's schema makes them so), so scripts need no special
    case: `enabled` is False with zeros when the heartbeat has none (transport.shm_mb = 0). `requests` and
    `bytes` count since this worker process started, like the heartbeat's `requests` (both paths).
    """
    if shm is None:
        return {"enabled": False} | dict.fromkeys(SHM_COUNTS, 0)
    return {**msgspec.structs.asdict(shm), "enabled": True}


#: What status shows for a worker that has not sent a heartbeat yet.
_NO_HEARTBEAT = Heartbeat(id="", pid=0, t_ns=0, progress=0, requests=0, queued=0, inflight=0, faults=0)


def tail(path: Path, lines: int = 20, max_bytes: int = 16384) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped by a signal or traced (state T or t)."""
    return process_state(pid) in (b"T", b"t")


class WorkerHandle:
    def __init__(self, plan: WorkerPlan, cfg: Config, rundir: RunDir) -> None:
        self.plan = plan
        self.cfg = cfg
        self.rundir = rundir
        self.tracker = RestartTracker(cfg.restart)
        self.proc: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self.state = State.STOPPED
        self.ready_info: Ready | None = None  # the READY message of the current process
        self.endpoint = plan.endpoint
        self.started_at = 0.0
        self.ready_at = 0.0
        self.restart_at: float | None = None  # monotonic time of a scheduled restart
        self.quarantined = False
        self.last_error = ""
        self.startup_failure: OrchestratorError | None = None  # what a FAILED message said, rebuilt
        self.exit_code: int | None = None
        # progress-based hang detection (fed by heartbeats)
        self.last_beat = 0.0
        self.last_progress = -1
        self.last_progress_at = 0.0
        self.heartbeat: Heartbeat | None = None  # the latest one of the current process
        self.kill_reason = ""

    @property
    def id(self) -> str:
        return self.plan.id

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path:
        return self.rundir.logs / f"{self.id}.log"

    def spawn(self) -> None:
        spec = messages.WorkerSpec(
            id=self.id,
            device=self.plan.device,
            endpoint=self.plan.endpoint,
            supervisor_endpoint=self.rundir.inbox_endpoint(),
            ppid=os.getpid(),
            cpu_affinity=list(self.plan.cpu_affinity) if self.plan.cpu_affinity else None,
            gpu_uuid=self.plan.gpu_uuid,
            config=to_dict(self.cfg),
            run_dir=str(self.rundir.root),
        )
        spec_path = self.rundir.specs / f"{self.id}.json"
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(messages.encode_json(spec))
        env = dict(os.environ)
        env.update(self.plan.env)
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        logf = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - handed to the child
        logf.write(f"--- spawn {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.worker", str(spec_path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                close_fds=True,
                start_new_session=True,
                cwd=self.rundir.root,
            )
        finally:
            logf.close()
        self.pidfd = os.pidfd_open(self.proc.pid)
        now = time.monotonic()
        self.state = State.STARTING
        self.started_at = now
        self.last_beat = now
        self.last_progress = -1
        self.last_progress_at = now
        self.ready_info = None
        self.heartbeat = None
        self.startup_failure = None
        self.exit_code = None
        self.kill_reason = ""
        self.restart_at = None
        log.info(
            "[spawn] %s pid %d on %s (cores %s)",
            self.id,
            self.proc.pid,
            self.plan.device,
            ",".join(map(str, self.plan.cpu_affinity)) if self.plan.cpu_affinity else "any",
        )

    def reap(self) -> int | None:
        """Collect the exit status once the sentinel fired; None if still running."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.exit_code = code
        return code

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self, reason: str) -> None:
        self.kill_reason = reason
        self.signal(signal.SIGKILL)

    def on_heartbeat(self, msg: Heartbeat, now: float) -> None:
        self.last_beat = now
        msg.report = None  # the monitor keeps the telemetry; status shows its view
        self.heartbeat = msg
        if msg.progress != self.last_progress:
            self.last_progress = msg.progress
            self.last_progress_at = now

    @property
    def shm(self) -> dict[str, Any]:
        """The latest heartbeat's shared-memory counters in status form (see shm_status)."""
        return shm_status(self.heartbeat.shm if self.heartbeat is not None else None)

    def hung(self, now: float) -> str | None:
        """Why this worker looks hung, judged by progress rather than liveness; None if it is fine."""
        if self.proc is None or self.pidfd is None:
            return None
        if self.state == State.STARTING:
            if now - self.started_at > self.cfg.orchestrator.startup_timeout_s:
                return f"not READY after {self.cfg.orchestrator.startup_timeout_s:g}s"
            return None
        limit = self.cfg.workers.hang_timeout_s
        silent = now - self.last_beat
        if silent > limit:
            return f"no heartbeat for {silent:.1f}s (stopped or stuck)"
        # A process stopped by a signal (SIGSTOP, a debugger) serves nobody: no need to wait out the hang
        # timeout, which is there for slow batches. A few missed heartbeats and the stopped state suffice.
        if silent > max(1.0, 5 * self.cfg.workers.heartbeat_interval_ms / 1000) and _stopped(self.proc.pid):
            return f"stopped (state T) with no heartbeat for {silent:.1f}s"
        hb = self.heartbeat
        busy = (hb.queued or hb.inflight) if hb is not None else 0
        if busy and now - self.last_progress_at > limit:
            return f"{busy} requests waiting and no progress for {now - self.last_progress_at:.1f}s"
        return None

    def describe(self, now: float) -> dict[str, Any]:
        hb = self.heartbeat or _NO_HEARTBEAT
        ready = self.ready_info
        eng = ready.engine if ready is not None else {}
        return {
            "id": self.id,
            "device": self.plan.device,
            "gpu_uuid": self.plan.gpu_uuid,
            "gpu_name": self.plan.gpu_name,
            "shares_gpu_with": list(self.plan.shares_gpu_with),
            "pid": self.pid if self.state != State.STOPPED else None,
            "state": self.state.value,
            "restarts": self.tracker.restarts,
            "quarantined": self.quarantined,
            "endpoint": self.endpoint,
            "uptime_s": round(now - self.ready_at, 1) if self.state == State.READY else 0.0,
            "cpu_affinity": (ready.cpu_affinity if ready is not None else [])
            or list(self.plan.cpu_affinity or []),
            "module_loading": eng.get("module_loading"),
            "engine": eng,
            "faults": hb.faults,
            "queued": hb.queued,
            "inflight": hb.inflight,
            "batches": hb.progress,
            "requests": hb.requests,
            "host_ns": hb.host_ns,
            "shm": self.shm,
            "errors": dict(hb.errors),
            "last_error": self.last_error,
            "next_restart_in_s": round(self.restart_at - now, 1) if self.restart_at else None,
        }
