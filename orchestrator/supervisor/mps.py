"""The NVIDIA MPS control daemon the supervisor manages when `[mps] enabled = true`: checks, start, stop.

Runs in the supervisor's main thread (and the CLI's pre-flight); never imports CUDA. It drives the daemon
only through the `nvidia-cuda-mps-control` program (`-d` to start, commands on stdin), so it is testable
with a stand-in program.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.common.config import Config
from orchestrator.common.errors import MpsError

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
SERVER = "nvidia-cuda-mps-server"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # where a daemon started without CUDA_MPS_PIPE_DIRECTORY listens
SEARCH_DIRS: tuple[str, ...] = ("/usr/local/nvidia/bin", "/usr/bin")  # after PATH
PID_FILE = "nvidia-cuda-mps-control.pid"  # the daemon writes it into its pipe directory
STATUS_REFRESH_S = 2.0  # seconds between server/client queries (each runs the control program)
# NVML compute modes (nvml.h nvmlComputeMode_t); MPS works in DEFAULT and EXCLUSIVE_PROCESS.
_COMPUTE_MODES = {0: "default", 1: "exclusive_thread", 2: "prohibited", 3: "exclusive_process"}


@dataclass(frozen=True)
class MpsProcess:
    """A running MPS process. pipe_dir: its CUDA_MPS_PIPE_DIRECTORY (the default when unset), None when
    its environment cannot be read (another user's process)."""

    pid: int
    role: str  # CONTROL or SERVER
    ppid: int
    pipe_dir: str | None


def _role(name: str | None, cmdline: list[str] | None) -> str | None:
    # The kernel truncates comm to 15 characters ("nvidia-cuda-mps" for both programs): argv[0] decides.
    names = {name or ""}
    if cmdline:
        names.add(os.path.basename(cmdline[0]))
    return CONTROL if CONTROL in names else SERVER if SERVER in names else None


def list_mps_processes() -> list[MpsProcess]:
    """Every live MPS control daemon and server this process can see (psutil; zombies are left out)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "ppid", "name", "cmdline", "status"]):
        info = p.info
        role = _role(info.get("name"), info.get("cmdline"))
        if role is None or info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        try:
            pipe: str | None = p.environ().get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pipe = None
        out.append(MpsProcess(info["pid"], role, info.get("ppid") or 0, pipe))
    return out


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_mps(pid: int) -> bool:
    """pid is still an MPS process (not gone, not a zombie, not reused by another program): safe to signal."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and _role(proc.name(), proc.cmdline()) is not None
    except psutil.Error:
        return False


def find_binary(binary: str | None = None) -> str:
    """Path of nvidia-cuda-mps-control (`binary` if given), or MpsError saying where it was looked for."""
    if binary:
        if os.path.isfile(binary) and os.access(binary, os.X_OK):
            return binary
        raise MpsError(f"mps: {binary} is not an executable file")
    found = shutil.which(CONTROL) or next(
        (str(Path(d) / CONTROL) for d in SEARCH_DIRS if os.access(Path(d) / CONTROL, os.X_OK)), None
    )
    if found is None:
        raise MpsError(
            f"mps.enabled = true but {CONTROL} was not found on PATH or in {', '.join(SEARCH_DIRS)}: "
            "install the NVIDIA driver's compute utilities, or set mps.enabled = false"
        )
    return found


def check_compute_modes(gpu_uuids: list[str], nvml: Any = None) -> dict[str, str]:
    """Compute mode of each GPU by UUID; MpsError if one is PROHIBITED. Without NVML: {} and a warning."""
    from orchestrator.supervisor.monitor.nvml_sampler import load_nvml

    mod, why = load_nvml(nvml)
    if mod is None:
        log.warning("[spawn] mps: cannot check the GPUs' compute mode (%s)", why)
        return {}
    modes = {}
    try:
        for uuid in gpu_uuids:
            try:
                raw = int(mod.nvmlDeviceGetComputeMode(mod.nvmlDeviceGetHandleByUUID(uuid)))
            except Exception as exc:  # NVMLError subclasses: say so and let MPS itself be the judge
                log.warning("[spawn] mps: cannot read the compute mode of GPU %s (%s)", uuid, exc)
                modes[uuid] = "unknown"
                continue
            modes[uuid] = _COMPUTE_MODES.get(raw, f"mode {raw}")
    finally:
        mod.nvmlShutdown()
    bad = [u for u, m in modes.items() if m == "prohibited"]
    if bad:
        raise MpsError(
            f"mps: GPU {', '.join(bad)} is in compute mode PROHIBITED, which allows no CUDA context; "
            "as root, `nvidia-smi -i <gpu> -c DEFAULT` (or EXCLUSIVE_PROCESS, the mode MPS recommends)"
        )
    return modes


def config_warnings(cfg: Config) -> list[str]:
    """Legal but probably unintended worker/MPS settings, for `validate`, `start` and the supervisor log."""
    w, m = cfg.workers, cfg.mps
    out = []
    if w.device == "gpu" and w.per_gpu > 1 and not m.enabled:
        out.append(
            f"workers.per_gpu = {w.per_gpu} without MPS: the workers of a GPU time-slice it (their kernels "
            "never overlap) and each holds its own context; set [mps] enabled = true to share it"
        )
    if m.enabled and w.device == "gpu" and w.per_gpu == 1:
        out.append("mps.enabled with workers.per_gpu = 1: one client per GPU gains nothing from MPS")
    if not m.enabled and (m.active_thread_percentage or m.use_existing):
        out.append(
            "mps.active_thread_percentage and mps.use_existing have no effect unless mps.enabled = true"
        )
    if m.enabled and m.active_thread_percentage and m.active_thread_percentage * w.per_gpu < 100:
        out.append(
            f"mps.active_thread_percentage = {m.active_thread_percentage} x {w.per_gpu} workers per GPU "
            "leaves part of each GPU's SMs unused"
        )
    return out


class MpsDaemon:
    """One MPS control daemon for the workers of a supervisor: ours (started and quit here) or an existing
    one (used, never stopped, only with mps.use_existing). Call start() before spawning any worker."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        gpu_uuids: list[str],
        *,
        binary: str | None = None,
        list_processes: Callable[[], list[MpsProcess]] = list_mps_processes,
        nvml: Any = None,
        default_pipe_dir: str = DEFAULT_PIPE_DIR,
        timeout_s: float = 10.0,
        quit_timeout_s: float = 10.0,
    ) -> None:
        self.cfg = cfg
        self.own_pipe_dir = Path(run_dir) / "mps" / "pipe"
        self.own_log_dir = Path(run_dir) / "mps" / "log"
        self.gpu_uuids = list(gpu_uuids)
        self._binary_arg = binary
        self._list = list_processes
        self._nvml = nvml
        self.default_pipe_dir = default_pipe_dir
        self.timeout_s = timeout_s
        self.quit_timeout_s = quit_timeout_s
        self.binary: str | None = None
        self.pipe_dir: Path | None = None  # what the workers use: ours, or the existing daemon's
        self.log_dir: Path | None = None
        self.ours = False
        self.pid: int | None = None
        self.compute_modes: dict[str, str] = {}
        self._env: dict[str, str] = {}
        self._launched = self._stopped = False
        self._servers: tuple[float, list[int], dict[int, list[int]]] | None = None

    # --- checks ---------------------------------------------------------------------------------

    def check(self) -> list[MpsProcess]:
        """Binary, compute modes and foreign daemons, starting nothing (also the CLI's pre-flight).
        Returns the foreign daemons; raises MpsError if one runs and mps.use_existing is off."""
        self.binary = find_binary(self._binary_arg)
        self.compute_modes = check_compute_modes(self.gpu_uuids, self._nvml)
        foreign = self.foreign_daemons()
        if foreign and not self.cfg.mps.use_existing:
            what = "; ".join(
                f"pid {p.pid or '?'} with pipe directory {p.pipe_dir or 'unknown (another user)'}"
                for p in foreign
            )
            raise MpsError(
                f"mps: an MPS control daemon that this orchestrator did not start is running ({what}). "
                "Its clients and ours would share GPUs unknowingly. Stop it (`echo quit | "
                f"CUDA_MPS_PIPE_DIRECTORY=<dir> {CONTROL}`) or set mps.use_existing = true to use it"
            )
        return foreign

    def foreign_daemons(self) -> list[MpsProcess]:
        """Control daemons not listening in our pipe directory; a daemon answering in the default pipe
        directory counts even when no process is visible (another PID namespace)."""
        own = str(self.own_pipe_dir)
        found = [p for p in self._list() if p.role == CONTROL and p.pipe_dir != own]
        default = Path(self.default_pipe_dir)
        if (
            not any(p.pipe_dir in (None, str(default)) for p in found)
            and (default / "control").exists()
            and self._answers(default)
        ):
            found.append(MpsProcess(_read_pid(default) or 0, CONTROL, 0, str(default)))
        return found

    # --- start ----------------------------------------------------------------------------------

    def start(self) -> dict[str, str]:
        """Check, then start our daemon (or adopt an existing one); returns the env every worker needs."""
        if self._env:
            return dict(self._env)
        foreign = self.check()
        self._stop_stale()
        if foreign:  # check() raised unless use_existing
            self._adopt(foreign)
        else:
            if self.cfg.mps.use_existing:
                log.info("[spawn] mps.use_existing: no MPS daemon is running; starting our own")
            self._launch()
        assert self.pipe_dir is not None
        self._env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir)}
        if self.log_dir is not None:
            self._env["CUDA_MPS_LOG_DIRECTORY"] = str(self.log_dir)
        return dict(self._env)

    def worker_env(self, worker_index: int) -> dict[str, str]:
        """Environment for worker `worker_index` (the same for every worker while the config has one
        active_thread_percentage; the index is the hook for per-worker shares)."""
        if not self._env:
            raise RuntimeError("MpsDaemon.worker_env() before a successful start()")
        env = dict(self._env)
        if self.cfg.mps.active_thread_percentage:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(self.cfg.mps.active_thread_percentage)
        return env

    def _adopt(self, foreign: list[MpsProcess]) -> None:
        # An explicit CUDA_MPS_PIPE_DIRECTORY in our environment names the daemon to use; else the one found.
        chosen = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or next(
            (p.pipe_dir for p in foreign if p.pipe_dir), self.default_pipe_dir
        )
        if not self._answers(Path(chosen)):
            raise MpsError(
                f"mps.use_existing: the MPS daemon at pipe directory {chosen} does not answer "
                f"`get_server_list`; set CUDA_MPS_PIPE_DIRECTORY to the right one"
            )
        self.pipe_dir = Path(chosen)
        log_dir = os.environ.get("CUDA_MPS_LOG_DIRECTORY")
        self.log_dir = Path(log_dir) if log_dir else None
        self.pid = _read_pid(self.pipe_dir) or next((p.pid for p in foreign if p.pipe_dir == chosen), None)
        log.info(
            "[spawn] using the existing MPS control daemon (pid %s, pipe dir %s); it stays running after stop",
            self.pid,
            self.pipe_dir,
        )

    def _daemon_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(self.own_pipe_dir)
        env["CUDA_MPS_LOG_DIRECTORY"] = str(self.own_log_dir)
        if self.gpu_uuids:
            # The server then sees only our GPUs. UUIDs, not indices: MPS renumbers the devices it exposes,
            # and the workers' CUDA_VISIBLE_DEVICES=<uuid> must name the same GPU either way.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpu_uuids)
        return env

    def _launch(self) -> None:
        shutil.rmtree(self.own_pipe_dir, ignore_errors=True)  # stale sockets and pid file of a dead daemon
        for d in (self.own_pipe_dir, self.own_log_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pipe_dir, self.log_dir, self.ours = self.own_pipe_dir, self.own_log_dir, True
        launch_log = self.own_log_dir / "launch.log"
        self._launched = True
        assert self.binary is not None
        # Output to a file, not a pipe: the daemon inherits the launcher's stdout and would hold a pipe open.
        with open(launch_log, "ab") as out:
            try:
                proc = subprocess.run(
                    [self.binary, "-d"],
                    env=self._daemon_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=self.timeout_s,
                    start_new_session=True,
                    close_fds=True,
                )
            except subprocess.TimeoutExpired:
                raise MpsError(f"mps: `{CONTROL} -d` did not return within {self.timeout_s:g}s") from None
        if proc.returncode != 0:
            raise MpsError(
                f"mps: `{CONTROL} -d` exited with code {proc.returncode}: "
                f"{_tail(launch_log) or 'no output'} (logs in {self.own_log_dir})"
            )
        self.pid = self._wait_ready()
        log.info(
            "[spawn] MPS control daemon pid %d, pipe dir %s, log dir %s, GPUs %s",
            self.pid,
            self.own_pipe_dir,
            self.own_log_dir,
            ",".join(self.gpu_uuids) or "all",
        )

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + self.timeout_s
        while True:
            pid = self._own_pid()
            if pid is not None and self._answers(self.own_pipe_dir):
                return pid
            if time.monotonic() > deadline:
                logs = _tail(self.own_log_dir / "control.log") or _tail(self.own_log_dir / "launch.log")
                which = f" (pid {pid})" if pid else ""
                raise MpsError(
                    f"mps: the MPS control daemon{which} did not answer within {self.timeout_s:g}s; "
                    f"{logs or 'no log output'} (logs in {self.own_log_dir})"
                )
            time.sleep(0.05)

    def _own_pid(self) -> int | None:
        pid = _read_pid(self.own_pipe_dir)
        if pid is not None and _alive(pid):
            return pid
        own = str(self.own_pipe_dir)
        return next((p.pid for p in self._list() if p.role == CONTROL and p.pipe_dir == own), None)

    def _stop_stale(self) -> None:
        """A daemon in our pipe directory outlived a previous supervisor of this run dir (SIGKILL): quit it."""
        own = str(self.own_pipe_dir)
        stale = [p for p in self._list() if p.pipe_dir == own]
        daemons = [p.pid for p in stale if p.role == CONTROL]
        if not stale:
            return
        log.warning(
            "[spawn] stopping MPS processes %s left in %s by a previous supervisor",
            [p.pid for p in stale],
            own,
        )
        self._control("quit", self.own_pipe_dir)
        for pid in daemons:
            self._wait_or_kill(pid)
        for p in stale:
            if p.role == SERVER:
                self._wait_or_kill(p.pid, grace_s=1.0)

    # --- talking to the daemon ------------------------------------------------------------------

    def _control(
        self, command: str, pipe_dir: Path, timeout_s: float = 3.0
    ) -> subprocess.CompletedProcess | None:
        """`echo COMMAND | nvidia-cuda-mps-control` against `pipe_dir`; None if it could not run or timed out."""
        if self.binary is None:
            return None
        env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(pipe_dir))
        try:
            return subprocess.run(
                [self.binary],
                input=command + "\n",
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout_s,
                close_fds=True,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("mps: %r in %s failed: %s", command, pipe_dir, exc)
            return None

    def _answers(self, pipe_dir: Path) -> bool:
        res = self._control("get_server_list", pipe_dir, timeout_s=2.0)
        return res is not None and res.returncode == 0

    def _server_list(self) -> tuple[list[int], dict[int, list[int]]]:
        assert self.pipe_dir is not None
        res = self._control("get_server_list", self.pipe_dir, timeout_s=2.0)
        servers = _pids(res.stdout) if res is not None and res.returncode == 0 else []
        clients = {}
        for pid in servers:
            r = self._control(f"get_client_list {pid}", self.pipe_dir, timeout_s=2.0)
            clients[pid] = _pids(r.stdout) if r is not None and r.returncode == 0 else []
        return servers, clients

    def status(self) -> dict[str, Any]:
        """For the supervisor's status: the daemon, its servers and their client pids (refreshed at most
        every STATUS_REFRESH_S, since each query runs the control program)."""
        alive = self.pid is not None and _alive(self.pid)
        now = time.monotonic()
        # An empty answer is not kept: the server only starts when the first worker connects.
        if (
            alive
            and self.pipe_dir is not None
            and not self._stopped
            and (self._servers is None or not self._servers[1] or now - self._servers[0] > STATUS_REFRESH_S)
        ):
            self._servers = (now, *self._server_list())
        servers, clients = (self._servers[1], self._servers[2]) if self._servers and alive else ([], {})
        return {
            "enabled": True,
            "ours": self.ours,
            "binary": self.binary,
            "pipe_dir": str(self.pipe_dir) if self.pipe_dir else None,
            "log_dir": str(self.log_dir) if self.log_dir else None,
            "daemon_pid": self.pid,
            "daemon_alive": alive,
            "servers": servers,
            "clients": {str(k): v for k, v in clients.items()},
            "active_thread_percentage": self.cfg.mps.active_thread_percentage or None,
            "compute_modes": dict(self.compute_modes),
            "stopped": self._stopped,
        }

    # --- stop -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Quit our daemon (after the workers have exited), escalate to SIGTERM/SIGKILL if it lingers, end
        any server it leaves behind and remove the pipe directory (the log directory stays). Idempotent;
        a daemon we did not start is left alone."""
        if self._stopped:
            return
        self._stopped = True
        if not self._launched:
            return
        pid = self.pid or self._own_pid()
        own = str(self.own_pipe_dir)
        servers = [
            p.pid for p in self._list() if p.role == SERVER and (p.pipe_dir == own or (pid and p.ppid == pid))
        ]
        res = self._control("quit", self.own_pipe_dir, timeout_s=self.quit_timeout_s)
        how = "quit" if res is not None and res.returncode == 0 else "quit failed"
        if pid is not None:
            how = self._wait_or_kill(pid, grace_s=self.quit_timeout_s, first=how)
        for spid in servers:  # normally gone with the daemon; a hung one must not keep the GPU
            self._wait_or_kill(spid, grace_s=1.0)
        shutil.rmtree(self.own_pipe_dir, ignore_errors=True)
        log.info("[shutdown] MPS control daemon pid %s stopped (%s)", pid, how)

    def _wait_or_kill(self, pid: int, grace_s: float = 5.0, first: str = "exited") -> str:
        """Wait up to grace_s for pid to exit, then SIGTERM (3 s), then SIGKILL; says how it ended."""
        how = first
        for sig, wait_s in ((None, grace_s), (signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
            if sig is not None:
                log.warning("[shutdown] MPS process %d still running: %s", pid, sig.name)
                how = f"{first}, then {sig.name}"
                if not _is_mps(pid):  # exited meanwhile, or the pid now belongs to another program
                    return how
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    return how
                except PermissionError:
                    log.error("[shutdown] no permission to signal MPS process %d", pid)
                    return f"{how} (not permitted)"
            deadline = time.monotonic() + wait_s
            while _alive(pid):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return how
        log.error("[shutdown] MPS process %d survived SIGKILL", pid)
        return f"{how}; still running"


def _read_pid(pipe_dir: Path) -> int | None:
    try:
        return int((Path(pipe_dir) / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pids(text: str) -> list[int]:
    return [int(tok) for tok in text.split() if tok.isdigit()]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
