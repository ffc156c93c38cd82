"""The supervisor process: spawns and watches workers, serves the control socket, publishes events.

Its main thread owns every socket (control ROUTER, events PUB, worker inbox PULL) and polls them together
with each worker's pidfd (the process sentinel), so crashes, SIGKILLs and OOM kills are seen at once.
It never imports CUDA. `python -m orchestrator.supervisor CONFIG` (its __main__.py) runs main() here: the
detached supervisor `orchestrator start --detach` starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any

import zmq

from orchestrator.common import messages
from orchestrator.common.config import Config, load_config
from orchestrator.common.errors import ConfigError, OrchestratorError, WorkerStartupError, error_from_code
from orchestrator.common.messages import Failed, Heartbeat, Ready, Stall, StateChange, SupervisorState
from orchestrator.common.procstat import pin_process, set_title
from orchestrator.common.rundir import RunDir
from orchestrator.common.security import secure_server, stop_authenticator
from orchestrator.supervisor import control
from orchestrator.supervisor.devices import discover_or_explain, plan_workers, supervisor_cores
from orchestrator.supervisor.monitor.monitor import Monitor
from orchestrator.supervisor.mps import MpsDaemon, config_warnings
from orchestrator.supervisor.restart_policy import Action
from orchestrator.supervisor.worker_handle import State, WorkerHandle, tail

log = logging.getLogger("orchestrator.supervisor")

_TICK_MS = 100  # housekeeping period: hang checks, scheduled restarts, stop deadlines
_BEAT_S = 0.25  # the events socket carries a supervisor heartbeat this often


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rundir = RunDir(cfg.run_dir)
        self.workers: dict[str, WorkerHandle] = {}
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self.stopping = False
        self.stop_reason = ""
        self._stop_deadline = 0.0
        self._killed_all = False
        self.gpus: list[dict] = []
        self.cpu_affinity: tuple[int, ...] | None = None  # where the supervisor and its threads run
        self.monitor: Monitor | None = None
        self.mps: MpsDaemon | None = None
        self.startup_error: WorkerStartupError | None = None  # no worker could start: run() raises it
        self._startup_settled = False
        self._last_tick = time.monotonic()  # the loop's last turn, for /livez
        self._started = False  # latched once min_ready_workers were READY together, for /startupz

    # --- setup ----------------------------------------------------------------------------------

    def _open_sockets(self) -> None:
        ctx = self.ctx = zmq.Context(io_threads=1)
        limit = self.cfg.transport.max_message_bytes
        self.ctl = ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
        self.ctl.bind(self.rundir.control_endpoint())
        self._next_beat = 0.0
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.rundir.events_endpoint())
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.MAXMSGSIZE, min(limit, 16 << 20))
        self.inbox.bind(self.rundir.inbox_endpoint())
        # The run directory (0700) is the gate. The control socket is group-accessible so that `status` works
        # for another user the owner lets into the directory (e.g. chmod 0750 and a shared group); the
        # worker inbox and the event stream stay owner-only.
        os.chmod(self.rundir.control, 0o660)
        for p in (self.rundir.events, self.rundir.inbox):
            os.chmod(p, 0o600)
        self.tcp_ctl = self.tcp_pub = None
        t = self.cfg.transport
        if t.kind == "tcp" and t.control_port:
            # Remote discovery only: status and endpoints; `stop` is refused here (local_only).
            self.tcp_ctl = ctx.socket(zmq.ROUTER)
            self.tcp_ctl.setsockopt(zmq.LINGER, 0)
            self.tcp_ctl.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
            secure_server(ctx, self.tcp_ctl, t)
            self.tcp_ctl.bind(f"tcp://{t.host}:{t.control_port}")
            self.tcp_pub = ctx.socket(zmq.PUB)
            self.tcp_pub.setsockopt(zmq.LINGER, 0)
            secure_server(ctx, self.tcp_pub, t)
            self.tcp_pub.bind(f"tcp://{t.host}:{t.control_port + 1}")
            log.info(
                "[spawn] TCP control on %s:%d (curve %s)", t.host, t.control_port, "on" if t.curve else "off"
            )

    def _plan(self) -> None:
        if self.cfg.workers.device == "gpu":
            self.gpus = discover_or_explain(self.cfg)
        for text in config_warnings(self.cfg):
            log.warning("[spawn] %s", text)
        host = tuple(sorted(os.sched_getaffinity(0)))
        plans = plan_workers(self.cfg, self.rundir, self.gpus)
        self.cpu_affinity = supervisor_cores(self.cfg, plans)
        if self.cpu_affinity is not None:
            # Workers inherit our mask: one without cores of its own gets the host's, not ours.
            plans = [p if p.cpu_affinity else dataclasses.replace(p, cpu_affinity=host) for p in plans]
            pin_process(self.cpu_affinity)
            log.info("[spawn] supervisor and its threads on cores %s", ",".join(map(str, self.cpu_affinity)))
        else:
            log.info("[spawn] supervisor not pinned (orchestrator.cpu_affinity: no core is ours alone)")
        if self.cfg.mps.enabled:
            # Before any worker starts: a CUDA context created while no daemon answers silently runs without MPS.
            self.mps = MpsDaemon(
                self.cfg, self.rundir.root, list(dict.fromkeys(p.gpu_uuid for p in plans if p.gpu_uuid))
            )
            self.mps.start()  # MpsError (an OrchestratorError) says why not: binary, compute mode, foreign daemon
            plans = [
                dataclasses.replace(p, env={**p.env, **self.mps.worker_env(i)}) for i, p in enumerate(plans)
            ]
        for plan in plans:
            self.workers[plan.id] = WorkerHandle(plan, self.cfg, self.rundir)

    # --- events ---------------------------------------------------------------------------------

    def _emit(self, msg: messages.Event) -> None:
        frames = [msg.kind.value.encode(), messages.encode(msg)]  # the topic is the kind, for SUB filters
        self.pub.send_multipart(frames)
        if self.tcp_pub is not None:
            self.tcp_pub.send_multipart(frames)

    def _publish(self, w: WorkerHandle) -> None:
        self._emit(
            messages.WorkerEvent(
                id=w.id,
                state=w.state,
                endpoint=w.endpoint,
                pid=w.pid,
                restarts=w.tracker.restarts,
                t=time.time(),
            )
        )

    def _set_state(self, w: WorkerHandle, state: State) -> None:
        if w.state != state:
            w.state = state
            self._publish(w)

    def _receive(self, raw: bytes) -> None:
        """One message from the inbox, typed by its decoder; one it refuses is logged and dropped."""
        try:
            msg = messages.WORKER_MESSAGES.decode(raw)
        except messages.MessageError as exc:  # another release's worker, or not a worker at all
            log.warning("[inbox] refused a message: %s", exc)
            return
        self._on_inbox(msg)

    def _on_inbox(self, msg: messages.WorkerMessage) -> None:
        w = self.workers.get(msg.id)
        if w is None or msg.pid != w.pid:
            return  # not one of ours, or a previous process of the slot (a late message)
        now = time.monotonic()
        match msg:
            case Heartbeat():
                if self.monitor is not None and msg.report is not None:
                    self.monitor.on_report(w.id, msg.report)
                w.on_heartbeat(msg, now)
                if self.monitor is not None:
                    self.monitor.on_shm(w.id, w.shm)
            case Stall():
                if self.monitor is not None:
                    rec = self.monitor.on_stall(w.id, msg.candidate)
                    log.warning("[stall] %s: %s", w.id, rec.get("summary", rec.get("causes")))
            case Ready():
                w.ready_info = msg
                w.endpoint = msg.endpoint
                w.ready_at = now
                w.last_beat = now
                w.last_error = ""
                w.startup_failure = None
                w.tracker.on_ready(now)
                if self.monitor is not None:
                    self.monitor.set_worker(w.id, w.pid, w.plan.gpu_uuid)
                log.info(
                    "[ready] %s pid %d at %s (%s, loading %s)",
                    w.id,
                    w.pid,
                    w.endpoint,
                    msg.engine.get("kind"),
                    msg.engine.get("module_loading", "n/a"),
                )
                self._set_state(w, State.DRAINING if self.stopping else State.READY)
            case Failed():
                w.last_error = msg.error
                # the worker's own exception, rebuilt by the mapping both planes use (EngineError...)
                w.startup_failure = error_from_code(msg.code, msg.error)
            case StateChange():
                if msg.state == State.DRAINING:
                    self._set_state(w, State.DRAINING)

    def _on_exit(self, w: WorkerHandle) -> None:
        code = w.reap()
        if code is None:
            return
        now = time.monotonic()
        if self.stopping:
            log.info("[reap] %s exited with code %s", w.id, code)
            self._set_state(w, State.STOPPED)
            return
        why = w.kill_reason or w.last_error or f"exit code {code}"
        log.error(
            "[reap] %s (pid %s) died: %s; log tail:\n%s",
            w.id,
            w.proc.pid if w.proc else "?",
            why,
            tail(w.log_path, 12),
        )
        w.last_error = why if why.startswith("exit") else f"{why} (exit code {code})"
        decision = w.tracker.on_crash(now)
        w.quarantined = decision.action == Action.QUARANTINE
        w.restart_at = decision.at if decision.action != Action.GIVE_UP else None
        log.warning("[restart] %s: %s", w.id, decision.reason)
        self._set_state(w, State.FAILED)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_beat:  # clients tell a live supervisor from a dead one by these
            self._next_beat = now + _BEAT_S
            self._emit(messages.SupervisorEvent(state=SupervisorState.ALIVE, pid=os.getpid(), t=time.time()))
        for w in self.workers.values():
            if w.pidfd is not None and not self.stopping and w.state in (State.STARTING, State.READY):
                why = w.hung(now)
                if why and not w.kill_reason:
                    log.error("[restart] %s looks hung: %s; killing pid %s", w.id, why, w.pid)
                    w.kill(f"hung: {why}")
            if w.restart_at is not None and now >= w.restart_at and w.pidfd is None and not self.stopping:
                w.quarantined = False
                w.spawn()
                self._publish(w)
        if self.stopping and not self._killed_all and now >= self._stop_deadline:
            self._killed_all = True
            for w in self.workers.values():
                if w.pidfd is not None:
                    log.warning("[shutdown] %s did not stop in time; SIGKILL", w.id)
                    w.signal(signal.SIGKILL)

    # --- control --------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_reason = reason
        # Workers drain within stop_timeout_s; allow a little more before SIGKILL.
        self._stop_deadline = time.monotonic() + self.cfg.orchestrator.stop_timeout_s + 3.0
        log.info(
            "[shutdown] %s: draining %d workers",
            reason,
            sum(w.pidfd is not None for w in self.workers.values()),
        )
        self._emit(messages.SupervisorEvent(state=SupervisorState.STOPPING, t=time.time()))
        for w in self.workers.values():
            w.restart_at = None
            if w.pidfd is not None:
                w.signal(signal.SIGTERM)
                self._set_state(w, State.DRAINING)
            else:
                self._set_state(w, State.STOPPED)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "name": self.cfg.orchestrator.name,
            "pid": os.getpid(),
            "run_dir": str(self.rundir.root),
            "config": self.cfg.source,
            "started_at": self.started_at,
            "uptime_s": round(now - self._t0, 1),
            "stopping": self.stopping,
            "device": self.cfg.workers.device,
            "cpu_affinity": list(self.cpu_affinity) if self.cpu_affinity is not None else None,
            "workers": [w.describe(now) for w in self.workers.values()],
            "monitor": self.monitor.snapshot() if self.monitor is not None else {},
            "mps": self.mps.status() if self.mps is not None else None,
        }

    def health(self) -> dict[str, Any]:
        """The probes' verdict, read by the HTTP server thread (orchestrator/supervisor/monitor/http.py): live
        while the loop turns; ready while enough workers are READY and no stop is under way; started once they
        were."""
        now = time.monotonic()
        need = self.cfg.orchestrator.min_ready_workers
        ready = sum(w.state == State.READY for w in list(self.workers.values()))
        total = len(self.workers)
        stall = now - self._last_tick
        live = stall < self.cfg.monitor.livez_stall_s
        if self.stopping:
            ready_reason = f"draining ({self.stop_reason})"
        elif ready < need:
            ready_reason = f"{ready} of {total} workers ready; {need} needed"
        else:
            ready_reason = ""
        return {
            "live": live,
            "live_reason": f"the supervisor loop has not turned for {stall:.1f}s",
            "ready": live and not ready_reason,
            "ready_reason": ready_reason or "the supervisor loop is stuck",
            "started": self._started,
            "started_reason": f"{ready} of {total} workers ready; {need} needed",
            "ready_workers": ready,
            "workers": total,
            "min_ready_workers": need,
        }

    def endpoints(self, local: bool = True) -> dict[str, Any]:
        t = self.cfg.transport
        events = self.rundir.events_endpoint() if local else f"tcp://{t.host}:{t.control_port + 1}"
        return {
            "events": events,
            "curve": t.curve,
            "shm_mb": t.shm_mb,
            "max_message_bytes": t.max_message_bytes,
            "pid": os.getpid(),
            "beat_s": _BEAT_S,
            "workers": [
                {
                    "id": w.id,
                    "endpoint": w.endpoint,
                    "state": w.state.value,
                    "device": w.plan.device,
                    "inputs": w.ready_info.inputs if w.ready_info else [],
                    "outputs": w.ready_info.outputs if w.ready_info else [],
                    "max_batch": w.ready_info.max_batch if w.ready_info else None,
                    "dims": w.ready_info.dims if w.ready_info else [],
                }
                for w in self.workers.values()
            ],
        }

    # --- main loop ------------------------------------------------------------------------------

    def _poll_once(self, poller: zmq.Poller, wake_fd: int) -> None:
        fd_to_worker = {w.pidfd: w for w in self.workers.values() if w.pidfd is not None}
        for fd in fd_to_worker:
            poller.register(fd, zmq.POLLIN)
        try:
            events = dict(poller.poll(_TICK_MS))
        finally:
            for fd in fd_to_worker:
                poller.unregister(fd)
        if wake_fd in events:
            try:
                os.read(wake_fd, 512)
            except BlockingIOError:
                pass
        if self.inbox in events:
            for _ in range(1000):
                try:
                    raw = self.inbox.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._receive(raw)
        for sock, local in ((self.ctl, True), (self.tcp_ctl, False)):
            if sock is not None and sock in events:
                self._serve_control(sock, local)
        for fd, w in fd_to_worker.items():
            if fd in events:
                self._on_exit(w)
        self._housekeeping()

    def _check_startup(self) -> None:
        """Once every worker has either reached READY or failed its first start: if none came up, stop
        with an error instead of restarting forever (a bad model or config fails fast and loudly)."""
        ws = self.workers.values()
        if not all(w.ready_at or w.state == State.FAILED for w in ws):
            return
        self._startup_settled = True
        if not any(w.ready_at for w in ws):
            # Raised by run() once the stop is over: `start` prints it (one message, no traceback), the
            # detached supervisor logs it and exits 1.
            err = WorkerStartupError("no worker could start:\n" + "\n".join(self.startup_failures()))
            err.__cause__ = next((w.startup_failure for w in ws if w.startup_failure), None)
            self.startup_error = err
            self.request_stop("no worker could start")

    def _serve_control(self, sock: zmq.Socket, local: bool) -> None:
        for _ in range(100):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 2:  # anything else is not a DEALER control request: drop it
                sock.send_multipart([frames[0], control.handle(self, frames[1], local=local)])

    def serve(self, stop_flag: dict[str, bool], wake_fd: int) -> None:
        poller = zmq.Poller()
        for s in (self.ctl, self.inbox, self.tcp_ctl):
            if s is not None:
                poller.register(s, zmq.POLLIN)
        poller.register(wake_fd, zmq.POLLIN)
        while True:
            if stop_flag.get("stop") and not self.stopping:
                self.request_stop(str(stop_flag.get("reason", "signal")))
            if self.stopping and all(w.pidfd is None for w in self.workers.values()):
                return
            self._poll_once(poller, wake_fd)
            self._last_tick = time.monotonic()
            if (
                not self._started
                and sum(w.state == State.READY for w in self.workers.values())
                >= self.cfg.orchestrator.min_ready_workers
            ):
                self._started = True
            if not self._startup_settled and not self.stopping:
                self._check_startup()

    def startup_failures(self) -> list[str]:
        """Workers that failed before ever reaching READY (for `start` to report)."""
        out = []
        for w in self.workers.values():
            if w.state == State.FAILED and not w.ready_at:
                out.append(
                    f"{w.id} on {w.plan.device} failed to start: {w.last_error}\n"
                    f"--- last lines of {w.log_path} ---\n{tail(w.log_path, 15)}"
                )
        return out

    def run(self, stop_flag: dict[str, bool], wake_fd: int) -> int:
        """Own the run directory, start every worker, serve until stopped. Returns the exit status (0);
        raises WorkerStartupError when no worker could start."""
        lock_fd = self.rundir.acquire()
        set_title(f"orchestrator: supervisor {self.cfg.orchestrator.name} in {self.rundir.root}")
        try:
            self._open_sockets()
            self._plan()
            self.monitor = Monitor(self.cfg, self.rundir.root, health=self.health)
            self.monitor.start(self.gpus)
            for w in self.workers.values():
                w.spawn()
                self._publish(w)
            log.info(
                "[spawn] supervisor pid %d, %d workers, run dir %s",
                os.getpid(),
                len(self.workers),
                self.rundir.root,
            )
            self.serve(stop_flag, wake_fd)
            log.info("[shutdown] all workers stopped (%s)", self.stop_reason)
            if self.startup_error is not None:
                raise self.startup_error
            return 0
        finally:
            self._teardown()
            os.close(lock_fd)

    def _teardown(self) -> None:
        for w in self.workers.values():
            if w.pidfd is not None:
                w.signal(signal.SIGKILL)
                if w.proc is not None:
                    w.proc.wait(5)
                w.reap()
        if self.mps is not None:
            self.mps.stop()  # only now: every client has exited (also after crashes); idempotent
        if self.monitor is not None:
            self.monitor.stop()
        if hasattr(self, "ctx"):
            for s in (
                self.ctl,
                self.pub,
                self.inbox,
                getattr(self, "tcp_ctl", None),
                getattr(self, "tcp_pub", None),
            ):
                if s is not None:
                    s.close(0)
            stop_authenticator(self.ctx)
            self.ctx.term()
        self.rundir.cleanup()


def install_signal_wakeup() -> tuple[dict[str, Any], int]:
    """SIGINT/SIGTERM only set a flag; the wake-up fd makes the main loop notice at once."""
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    flag: dict[str, Any] = {"stop": False}

    def on_signal(signum: int, frame: Any) -> None:
        flag["stop"] = True
        flag["reason"] = signal.Signals(signum).name

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    return flag, rfd


def configure_logging(cfg: Config, log_file: bool = False) -> None:
    """The supervisor's logging: to stderr, which is <run_dir>/supervisor.log when detached (log_file), then
    rotated past orchestrator.log_max_mb; repeated messages rate-limited (orchestrator/common/logs.py)."""
    from orchestrator.common import logs

    logs.configure(
        cfg.orchestrator.log_level,
        "%(asctime)s %(levelname)s %(name)s: %(message)s",
        RunDir(cfg.run_dir).root / "supervisor.log" if log_file else None,
        cfg.orchestrator.log_max_mb << 20,
    )


def main() -> None:
    """Detached entry (`orchestrator start --detach` runs this in a new session)."""
    if len(sys.argv) != 2:
        print("usage: python -m orchestrator.supervisor CONFIG", file=sys.stderr)
        sys.exit(2)
    try:
        cfg = load_config(sys.argv[1])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(cfg, log_file=True)
    flag, wake_fd = install_signal_wakeup()
    try:
        sys.exit(Supervisor(cfg).run(flag, wake_fd))
    except OrchestratorError as exc:
        log.error("%s", exc)
        sys.exit(1)
