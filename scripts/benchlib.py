"""Helpers shared by the benchmark scripts: the CLI as a user runs it, status as JSON, and the machine facts
(device, driver, date, command) every report records. Runs in the benchmark's process.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import platform
import queue
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`orchestrator ARGS` as a user runs it (this interpreter, the repository's package)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def status_json(config: Path) -> dict[str, Any]:
    """`orchestrator status CONFIG --once --json`, parsed."""
    proc = cli("status", str(config), "--once", "--json", timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"orchestrator status failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def copy_logs(run_dir: Path, dest: Path | None) -> None:
    """The run directory's logs (supervisor, workers, MPS) for the record; sockets are not copied."""
    if dest is None:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for src in [
        run_dir / "supervisor.log",
        run_dir / "stalls.jsonl",
        *sorted((run_dir / "logs").glob("*")),
        *sorted((run_dir / "mps" / "log").glob("*")),
    ]:
        if src.is_file():
            shutil.copy2(src, dest / (f"mps-{src.name}" if src.parent.name == "log" else src.name))


def start_or_record(config: Path, run_dir: Path, r: dict[str, Any], logs: Path | None) -> bool:
    """`orchestrator start CONFIG --detach`, timed into r["start_s"]; on failure the reason goes into
    r["error"], the logs are kept, and False is returned."""
    t0 = time.monotonic()
    start = cli("start", str(config), "--detach", timeout=200)
    r["start_s"] = round(time.monotonic() - t0, 1)
    if start.returncode == 0:
        return True
    r["error"] = f"start failed ({start.returncode}): {(start.stdout + start.stderr).strip()[-800:]}"
    copy_logs(run_dir, logs)
    return False


def _nvidia_smi() -> str | None:
    fallback = "/usr/local/nvidia/bin/nvidia-smi"
    return shutil.which("nvidia-smi") or (fallback if os.access(fallback, os.X_OK) else None)


def machine_info() -> dict[str, Any]:
    """Date, command, host; device name and driver of every GPU (NVML, else nvidia-smi; "n/a" without a
    GPU); cuda-bindings and NVRTC versions where installed."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "device": "n/a",
        "driver": "n/a",
    }
    smi = _nvidia_smi()
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,driver_version,compute_mode", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            lines = [ln.split(", ") for ln in out.stdout.strip().splitlines() if ln.strip()]
            if out.returncode == 0 and lines:
                info["device"], info["driver"] = lines[0][0], lines[0][1]
                info["gpus"] = [" / ".join(ln) for ln in lines]
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi_error"] = str(exc)
    try:
        import cuda.bindings

        from workers.cuda.module import nvrtc_version

        info["cuda_bindings"] = cuda.bindings.__version__
        info["nvrtc"] = nvrtc_version()
    except Exception as exc:  # no CUDA packages or no NVRTC library: recorded, not fatal
        info["cuda_bindings"] = f"unavailable: {exc}"
    return info


class ClientPool:
    """Client processes that stay up across measurements. Each runs `target(*args, cmd_q, res_q)` with its
    own `args`; its first message (kept in `ready`) says it is up. Each command runs in all of them (or the
    first `clients`) from a common start time, and each answers with its window's results."""

    def __init__(self, target: Callable[..., None], args: list[tuple]) -> None:
        ctx = mp.get_context("spawn")
        self.res_q = ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in args]
        self.procs = [
            ctx.Process(target=target, args=(*a, q, self.res_q), daemon=True)
            for a, q in zip(args, self.cmd_qs, strict=True)
        ]
        for p in self.procs:
            p.start()
        try:
            self.ready = self._collect(len(args), 180)
        except BaseException:
            self.close()
            raise

    def _collect(self, n: int, timeout: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.res_q.get(timeout=1.0))
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"client processes: {len(out)} of {n} answered; exit codes of dead ones {dead}"
                    ) from None
        errors = [r["error"] for r in out if "error" in r]
        if errors:
            raise RuntimeError(f"client process failed: {errors[0]}")
        return out

    def run(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        n = cmd.get("clients") or len(self.procs)
        cmd = {**cmd, "start_at": time.monotonic() + 0.3}  # every process starts at the same moment
        for q in self.cmd_qs[:n]:
            q.put(cmd)
        return self._collect(n, cmd["seconds"] + 120)

    def close(self) -> None:
        for q, p in zip(self.cmd_qs, self.procs, strict=True):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def pinning(n_workers: int, max_workers: int) -> tuple[list[list[int]] | None, list[int] | None]:
    """(cores per worker, client cores): 4 cores of its own per worker and the load generator on every
    other core, when the host has the cores for the largest run; otherwise (None, None)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 4 * max_workers + 8:
        return None, None
    return [cores[4 * i : 4 * i + 4] for i in range(n_workers)], cores[4 * n_workers :]
