"""The `orchestrator` command: start, stop, status, validate, bench.

Runs in the user's shell process. User mistakes (bad config, nothing running) end with a clear message
and an exit status (2 for config or usage errors, 1 for runtime failures), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.client.control import ControlClient
from orchestrator.common.config import Config, default_run_dir, load_config
from orchestrator.common.errors import ConfigError, EngineError, OrchestratorError, UnavailableError
from orchestrator.common.rundir import RunDir

if TYPE_CHECKING:
    from orchestrator.cli.bench.sweep import Settings

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

#: The packages of the server extra, by import name: a client-only install (`pip install orchestrator`) has
#: none of them, and a command that needs one says what to install instead of a traceback.
SERVER_PACKAGES = ("psutil", "onnxruntime", "rich", "prometheus_client", "setproctitle", "tomli_w")
SERVER_INSTALL = "pip install 'orchestrator[server]' (in a checkout: pip install -e '.[server]')"


class MissingPackage(Exception):
    """A package of the server extra is not installed here: one line, exit 2."""


def _err(msg: str) -> None:
    print(f"orchestrator: {msg}", file=sys.stderr)


def _require(module: str, what: str) -> None:
    """Raise MissingPackage unless `module` can be imported (checked before the command does anything)."""
    if importlib.util.find_spec(module) is None:
        raise MissingPackage(f"{what} needs the {module} package, not installed here: {SERVER_INSTALL}")


def _load(path: str) -> Config:
    return load_config(path)


def _rundir_for(config: str | None) -> RunDir:
    if config is None:
        return RunDir(default_run_dir("orchestrator"))
    p = Path(config)
    if p.is_dir():
        return RunDir(p)
    return RunDir(load_config(config, check_files=False).run_dir)


def _running_or_explain(rd: RunDir) -> bool:
    if rd.is_running() and rd.control.exists():
        return True
    _err(f"no orchestrator is running in {rd.root}")
    return False


# --- validate ------------------------------------------------------------------------------------


def _check_shm_space(cfg: Config, workers: int | None) -> None:
    """Refuse a config whose arenas would not fit in shared memory (ConfigError: one line, exit 2)."""
    from orchestrator.common.shm import space_problem

    problem = space_problem(cfg.run_dir, workers or 0, cfg.transport.shm_mb)
    if problem:
        raise ConfigError([problem], cfg.source or None)


def _planned_workers(cfg: Config, gpus: int | None = None) -> int | None:
    w = cfg.workers
    if w.device == "cpu":
        return w.count
    if gpus is None and not isinstance(w.gpus, str):
        gpus = len(w.gpus)
    return gpus * w.per_gpu if gpus is not None else None


def _check_model(cfg: Config) -> None:
    """What can be known about the model without a GPU: ONNX models are loaded (their dynamic dimensions
    checked against [[model.dims]]); a torch program must be a .pt2 archive, and torch installed."""
    m = cfg.model
    try:
        if m.kind == "onnx":
            _require("onnxruntime", 'model.kind = "onnx"')
            from workers.engines.onnx_cpu import OnnxCpuEngine

            OnnxCpuEngine(cfg)
        elif m.kind == "torch":
            from workers.engines.torch_engine import TORCH_MISSING
            from workers.engines.torch_program import program_kind

            if importlib.util.find_spec("torch") is None:
                raise ConfigError([TORCH_MISSING], cfg.source or None)
            program_kind(m.path)
    except EngineError as exc:
        raise ConfigError([f"model: {exc}"], cfg.source or None) from None


def _check_journal(cfg: Config) -> None:
    """monitor.driver_journal = "cupti" on GPU workers needs cupti-python and the compiled CUPTI callback
    here (workers would refuse to start): the callback is built now, into the cache the workers load from."""
    if cfg.workers.device != "gpu" or cfg.monitor.driver_journal != "cupti":
        return
    from workers import cupti_journal, cupti_native

    if not cupti_journal.cupti_installed():
        raise ConfigError(
            [
                'monitor.driver_journal = "cupti" needs cupti-python, not installed here: '
                "pip install 'orchestrator[gpu]' (or \"auto\" to use CUPTI only where it is)"
            ],
            cfg.source or None,
        )
    try:
        cupti_native.build()
    except cupti_native.NativeUnavailable as exc:
        raise ConfigError(
            [
                f'monitor.driver_journal = "cupti": {exc} (or "auto", which falls back to the worker\'s own journal)'
            ],
            cfg.source or None,
        ) from None


def _check_run_dir(cfg: Config) -> None:
    """The run directory exists and is a directory, or can be created: tried for real, in its nearest existing
    ancestor (a scratch directory made and removed), since access() says yes to root on read-only or
    special file systems such as /proc."""
    root = cfg.run_dir
    where = f"orchestrator.run_dir: {root}"
    if root.exists():
        if not root.is_dir():
            raise ConfigError([f"{where} exists and is not a directory"], cfg.source or None)
        parent = root
    else:
        parent = root.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError([f"{where} cannot be created: {parent} is not a directory"], cfg.source or None)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".orchestrator-check-", dir=parent))
    except OSError as exc:
        raise ConfigError(
            [f"{where} cannot be created or used: {exc.strerror} in {parent}"], cfg.source or None
        ) from None


def cmd_validate(args: argparse.Namespace) -> int:
    """Everything `start` checks before it starts anything, so that OK means `start` will not refuse it."""
    cfg = _load(args.config)
    _preflight(cfg, warn=False)
    w = cfg.workers
    where = (
        f"{w.count} CPU worker(s)" if w.device == "cpu" else f"GPU(s) {w.gpus}, {w.per_gpu} worker(s) per GPU"
    )
    model = cfg.model.path or f"synthetic work={cfg.model.work} item_shape={list(cfg.model.item_shape)}"
    print(
        f"{args.config}: OK: {where}; {cfg.model.kind} model {model}; max batch {cfg.model.max_batch}; "
        f"pipeline depth {cfg.pipeline.depth}; run dir {cfg.run_dir}"
    )
    from orchestrator.supervisor.mps import config_warnings

    for text in config_warnings(cfg):
        _err(f"warning: {text}")
    return EXIT_OK


# --- start ---------------------------------------------------------------------------------------


def _preflight(cfg: Config, warn: bool = True) -> None:
    """What start refuses before anything starts (ConfigError, MpsError or MissingPackage: one line, exit 2);
    validate runs it."""
    _require("psutil", "running an orchestrator")
    _check_run_dir(cfg)
    _check_model(cfg)
    _check_journal(cfg)
    if cfg.workers.device == "gpu":
        from orchestrator.supervisor.devices import discover_or_explain

        gpus = discover_or_explain(cfg)  # raises ConfigError naming what is missing
        _check_shm_space(cfg, _planned_workers(cfg, len(gpus)))
        if cfg.mps.enabled:
            from orchestrator.supervisor.devices import plan_workers
            from orchestrator.supervisor.mps import MpsDaemon

            uuids = list(
                dict.fromkeys(p.gpu_uuid for p in plan_workers(cfg, RunDir(cfg.run_dir), gpus) if p.gpu_uuid)
            )
            MpsDaemon(
                cfg, cfg.run_dir, uuids
            ).check()  # MpsError: binary missing, compute mode, foreign daemon
    else:
        _check_shm_space(cfg, _planned_workers(cfg))
    if warn:
        from orchestrator.supervisor.mps import config_warnings

        for text in config_warnings(cfg):
            _err(f"warning: {text}")


def cmd_start(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    rd = RunDir(cfg.run_dir)
    if rd.is_running():
        _err(f"an orchestrator is already running in {rd.root} (pid {rd.read_pid()}); stop it first")
        return EXIT_FAIL
    _preflight(cfg)
    if args.detach:
        return _start_detached(cfg, Path(args.config), rd, args.timeout)
    from orchestrator.supervisor.core import Supervisor, configure_logging, install_signal_wakeup

    configure_logging(cfg)
    flag, wake_fd = install_signal_wakeup()
    print(
        f"orchestrator '{cfg.orchestrator.name}' starting in {rd.root} (Ctrl-C drains and stops)",
        file=sys.stderr,
    )
    return Supervisor(cfg).run(flag, wake_fd)


def _start_detached(cfg: Config, config_path: Path, rd: RunDir, timeout: float | None) -> int:
    rd.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = rd.root / "supervisor.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.supervisor", str(config_path.resolve())],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    limit = timeout or (cfg.orchestrator.startup_timeout_s + 15)
    deadline = time.monotonic() + limit
    last: dict = {}
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            from orchestrator.supervisor.worker_handle import tail

            _err(
                f"the supervisor exited with code {code} before all workers were ready:\n{tail(log_path, 25)}"
            )
            return EXIT_FAIL
        if rd.control.exists():
            try:
                with ControlClient(rd.control_endpoint(), timeout_s=2.0) as ctl:
                    last = ctl.call("status")
            except OrchestratorError:
                last = {}
            states = [w["state"] for w in last.get("workers", [])]
            if states and all(s == "ready" for s in states):
                print(
                    f"orchestrator '{cfg.orchestrator.name}' ready: {len(states)} workers, pid {proc.pid}, "
                    f"run dir {rd.root}"
                )
                return EXIT_OK
            failed = [w for w in last.get("workers", []) if w["state"] == "failed"]
            if failed and all(s in ("ready", "failed") for s in states):
                for w in failed:
                    _err(
                        f"{w['id']} on {w['device']} failed to start: {w['last_error']} "
                        f"(log: {rd.logs / (w['id'] + '.log')})"
                    )
                if "ready" in states:
                    _err(f"still serving on {states.count('ready')} worker(s); `orchestrator stop` stops it")
                return EXIT_FAIL
        time.sleep(0.1)
    _err(
        f"workers not ready after {limit:g}s: "
        + ", ".join(f"{w['id']}={w['state']}" for w in last.get("workers", []))
        + f"; see {log_path}"
    )
    return EXIT_FAIL


# --- stop ----------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_stop(args: argparse.Namespace) -> int:
    rd = _rundir_for(args.config)
    if not _running_or_explain(rd):
        return EXIT_FAIL
    with ControlClient(rd.control_endpoint(), timeout_s=5.0) as ctl:
        reply = ctl.call("stop")
    pid = reply.get("pid")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not rd.is_running() and (pid is None or not _pid_alive(pid)):
            print(f"stopped (run dir {rd.root})")
            return EXIT_OK
        time.sleep(0.05)
    _err(f"the supervisor (pid {pid}) is still running after {args.timeout:g}s")
    return EXIT_FAIL


# --- status --------------------------------------------------------------------------------------


def _fetch_status(rd: RunDir) -> dict:
    with ControlClient(rd.control_endpoint(), timeout_s=3.0) as ctl:
        return ctl.call("status")


def cmd_status(args: argparse.Namespace) -> int:
    if not args.json:
        _require("rich", "status (without --json)")
    rd = _rundir_for(args.config)
    if not _running_or_explain(rd):
        return EXIT_FAIL
    if args.json:
        print(json.dumps(_fetch_status(rd), indent=None if args.once else 2, default=str))
        return EXIT_OK
    from rich.console import Console

    from orchestrator.cli import status_view

    if args.once:
        # Piped or captured output has no terminal width: use a wide page rather than truncate columns.
        console = Console() if sys.stdout.isatty() else Console(width=200)
        console.print(status_view.render(_fetch_status(rd)))
        return EXIT_OK
    status_view.live(lambda: _fetch_status(rd), refresh_hz=args.refresh)
    return EXIT_OK


# --- keygen --------------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    from orchestrator.common.security import keygen

    public, secret = keygen(args.directory, args.name)
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret, mode 0600: keep it)")
    return EXIT_OK


# --- bench ---------------------------------------------------------------------------------------


class _Usage(Exception):
    """A bench flag's value is not acceptable: one line, exit 2."""


def _numbers(text: str, flag: str, kind: type, positive: bool = True) -> list:
    """`1,4,16` -> [1, 4, 16]: finite numbers of `kind`, each above 0 (`positive`) or at least 0."""
    out = []
    for part in text.split(","):
        try:
            v = kind(part.strip())
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or (v <= 0 if positive else v < 0):
            what = ("positive " if positive else "non-negative ") + ("integer" if kind is int else "number")
            want = f"{what}s separated by commas" if "," in text else f"a {what}"
            raise _Usage(f'{flag}: expected {want}, got "{text}"')
        out.append(v)
    return out


def _one(text: str, flag: str, kind: type, positive: bool = True) -> Any:
    if "," in text:
        raise _Usage(f'{flag}: expected one value, got "{text}"')
    return _numbers(text, flag, kind, positive)[0]


def _cpu_list(text: str) -> list[int]:
    """`8-15` or `8,9,12-13` -> core numbers."""
    cores: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            cores.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    except ValueError:
        raise _Usage(f'--client-cpus: expected core numbers such as 8-15 or 8,9,10, got "{text}"') from None
    if not cores or min(cores) < 0:
        raise _Usage(f'--client-cpus: expected core numbers such as 8-15 or 8,9,10, got "{text}"')
    return cores


def _bench_settings(args: argparse.Namespace) -> Settings:
    from orchestrator.cli.bench.inputs import InputError, parse_dims
    from orchestrator.cli.bench.sweep import Settings

    if args.rate is not None and args.concurrency is not None:
        raise _Usage("--rate (open loop) and --concurrency (closed loop) exclude each other: give one")
    s = Settings(
        concurrency=None
        if args.rate is not None
        else _numbers(args.concurrency or "1,4,16,64", "--concurrency", int),
        rates=_numbers(args.rate, "--rate", float) if args.rate is not None else None,
        rows=_one(args.rows, "--rows", int),
        duration=_one(args.duration, "--duration", float),
        warmup=_one(args.warmup, "--warmup", float, positive=False),
        processes=_one(args.processes, "--processes", int),
        shm="auto" if args.shm is None else bool(args.shm),
        seed=_one(args.seed, "--seed", int, positive=False),
        check_every=_one(args.check, "--check", int, positive=False),
        rtol=_one(args.rtol, "--rtol", float, positive=False) if args.rtol is not None else None,
        atol=_one(args.atol, "--atol", float, positive=False) if args.atol is not None else None,
        client_cpus=_cpu_list(args.client_cpus) if args.client_cpus else None,
        timeout=_one(args.timeout, "--timeout", float),
        inputs=args.inputs,
    )
    try:
        s.dims = parse_dims(args.dim)
    except InputError as exc:
        raise _Usage(str(exc)) from None
    if s.processes > 256:
        raise _Usage(f"--processes {s.processes}: at most 256")
    if s.inputs and not Path(s.inputs).is_file():
        raise _Usage(f"--inputs: no such file: {s.inputs}")
    if (args.server_key is None) != (args.client_key is None):
        raise _Usage(
            "--server-key and --client-key go together (CURVE: the server's public key, your secret key)"
        )
    if args.server_key is not None:
        for flag, path in (("--server-key", args.server_key), ("--client-key", args.client_key)):
            if not Path(path).is_file():
                raise _Usage(f"{flag}: no such file: {path}")
        s.curve = (args.server_key, args.client_key)
    for flag in ("json", "csv", "plot"):
        out = getattr(args, flag)
        if out is not None and not Path(out).resolve().parent.is_dir():
            raise _Usage(f"--{flag}: the directory of {out} does not exist")
    for target in (args.target, args.compare):
        if target is not None and not target.startswith(("ipc://", "tcp://")) and not Path(target).exists():
            raise _Usage(f"no such config file or run directory: {target}")
    return s


def cmd_bench(args: argparse.Namespace) -> int:
    """A throughput/latency sweep against a running orchestrator, with its workers' telemetry."""
    _require("rich", "bench")
    from rich.console import Console
    from rich.markup import escape

    from orchestrator.cli.bench import report
    from orchestrator.cli.bench.inputs import InputError
    from orchestrator.cli.bench.sweep import SweepError, run_target

    try:
        s = _bench_settings(args)
    except _Usage as exc:
        _err(str(exc))
        return EXIT_USAGE
    if args.plot:
        from orchestrator.cli.bench.plot import PlotUnavailable, require

        try:
            require()
        except PlotUnavailable as exc:
            _err(str(exc))
            return EXIT_USAGE
    targets = [args.target, *([args.compare] if args.compare else [])]
    per_point = s.warmup + s.duration + 0.5
    results: list[dict] = []
    failure: str | None = None
    with report.BenchProgress(per_point * len(s.points()) * len(targets)) as progress:
        for i, target in enumerate(targets):
            progress.prefix = f"{'AB'[i]}: " if len(targets) > 1 else ""
            try:
                results.append(run_target(target, s, progress))
            except InputError as exc:
                _err(str(exc))
                return EXIT_USAGE
            except ConfigError as exc:
                if exc.source:
                    raise
                _err(str(exc))
                return EXIT_USAGE
            except SweepError as exc:
                results.append(exc.partial)
                failure = f"{target}: {exc}"
                break
            except OrchestratorError as exc:
                if not results:
                    raise
                failure = f"{target}: {exc}"
                break
    out = Console() if sys.stdout.isatty() else Console(width=200)
    for result in results:
        out.print(report.table(result))
        for line in report.notes(result):
            out.print(f"  {escape(line)}", highlight=False)
    doc = report.document(s.to_json(), results[0], results[1] if len(results) > 1 else None)
    if args.json:
        report.write_json(args.json, doc)
    if args.csv:
        report.write_csv(args.csv, results)
    if args.plot:
        from orchestrator.cli.bench.plot import plot

        plot(results, args.plot, title=doc["command"])
    if failure:
        _err(failure)
        return EXIT_FAIL
    wrong = [p for r in results for p in r["points"] if not p["correct"]]
    if wrong:
        _err(f"{len(wrong)} point(s) returned wrong results (see `wrong` in the table)")
        return EXIT_FAIL
    return EXIT_OK


# --- entry ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="orchestrator", description="Multi-process inference orchestrator.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("start", help="start the supervisor and its workers")
    p.add_argument("config", help="TOML config file, e.g. configs/cpu.toml")
    p.add_argument(
        "--detach", action="store_true", help="return once all workers are ready (or fail with the reason)"
    )
    p.add_argument("--timeout", type=float, default=None, help="--detach: seconds to wait for READY")
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("stop", help="drain in-flight work and stop")
    p.add_argument(
        "config", nargs="?", help="config file or run directory (default: the default run directory)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the supervisor to exit")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("status", help="live health view (or --once / --json)")
    p.add_argument("config", nargs="?", help="config file or run directory")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--refresh", type=float, default=4.0, help="live view refreshes per second")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("keygen", help="create a CURVE key pair for TCP with curve = true")
    p.add_argument("directory", help="where to write NAME.key and NAME.key_secret")
    p.add_argument("--name", default="server", help="server (default) or a client name")
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("validate", help="check a config without starting anything")
    p.add_argument("config")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser(
        "bench",
        help="measure throughput and latency as load rises, with the workers' telemetry",
        description="Load a running orchestrator (closed loop at each --concurrency, or open loop at each "
        "--rate) and report, per point, requests/s, items/s, latency percentiles, errors, wrong results and "
        "the workers' telemetry over the same window. See README.md, 'Benchmarking your model'.",
    )
    p.add_argument(
        "target", help="config file, run directory or control endpoint (ipc://..., tcp://host:port)"
    )
    p.add_argument(
        "--concurrency",
        metavar="N[,N...]",
        help="closed loop: requests in flight, one point each (default 1,4,16,64)",
    )
    p.add_argument("--rate", metavar="R[,R...]", help="open loop: requests per second, one point each")
    p.add_argument("--rows", default="1", metavar="N", help="rows (items) per request (default 1)")
    p.add_argument("--duration", default="5", metavar="S", help="measured seconds per point (default 5)")
    p.add_argument(
        "--warmup", default="1", metavar="S", help="seconds of load before each point's window (default 1)"
    )
    p.add_argument(
        "--processes", default="1", metavar="P", help="client processes sharing the load (default 1)"
    )
    p.add_argument(
        "--shm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shared memory (--shm) or frames (--no-shm); default: shared memory for local targets",
    )
    p.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="size of a dynamic dimension (default: its max)",
    )
    p.add_argument(
        "--inputs", metavar="FILE.npz", help="requests cut from these arrays instead of random ones"
    )
    p.add_argument("--seed", default="0", metavar="N", help="seed of the random inputs (default 0)")
    p.add_argument(
        "--check",
        nargs="?",
        const="1",
        default="16",
        metavar="N",
        help="check every Nth reply against a reference (--check alone: every reply; 0: none; default 16)",
    )
    p.add_argument("--rtol", metavar="X", help="relative tolerance of the check (default: by dtype)")
    p.add_argument("--atol", metavar="X", help="absolute tolerance of the check (default: by dtype)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one CSV row per point")
    p.add_argument(
        "--plot", metavar="FILE.png", help="draw latency against throughput and GPU busy (matplotlib)"
    )
    p.add_argument(
        "--compare", metavar="TARGET2", help="run the same sweep against a second target, then compare"
    )
    p.add_argument("--client-cpus", metavar="LIST", help="pin the client processes to these cores, e.g. 8-15")
    p.add_argument("--timeout", default="30", metavar="S", help="seconds each request may take (default 30)")
    p.add_argument("--server-key", metavar="FILE", help="tcp with CURVE: the server's public key")
    p.add_argument("--client-key", metavar="FILE", help="tcp with CURVE: your secret key")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as exc:
        if exc.source:
            _err(f"invalid config {exc.source}:")
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        code = EXIT_USAGE
    except UnavailableError as exc:
        _err(str(exc))
        code = EXIT_FAIL
    except OrchestratorError as exc:
        _err(str(exc))
        code = EXIT_FAIL
    except MissingPackage as exc:
        _err(str(exc))
        code = EXIT_USAGE
    except ModuleNotFoundError as exc:  # a path the checks above do not cover: still one line
        name = (exc.name or "").partition(".")[0]
        if name not in SERVER_PACKAGES:
            raise
        _err(f"{args.cmd} needs the {name} package, not installed here: {SERVER_INSTALL}")
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
