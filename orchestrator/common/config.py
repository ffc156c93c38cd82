"""TOML configuration: loaded with tomllib into frozen dataclasses and validated before anything starts.

Runs in the CLI and the supervisor (workers receive an already-validated copy). Every problem is reported
with its key path and what was expected, e.g. `model.max_batch: expected a positive integer, got "big"`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from orchestrator.common.errors import ConfigError

# ipc:// paths must fit in sockaddr_un.sun_path (108 bytes with the NUL); keep room for socket names.
_MAX_RUN_DIR = 80


def _check(ok, expect: str, doc: str) -> dict:
    """Field metadata: a predicate, the expectation stated in errors, and a doc line for the reference."""
    return {"check": ok, "expect": expect, "doc": doc}


def _int_range(lo: int, hi: int | None, doc: str) -> dict:
    if lo == 1 and hi is None:
        expect = "expected a positive integer"
    elif hi is None:
        expect = f"expected an integer >= {lo}"
    else:
        expect = f"expected an integer from {lo} to {hi}"
    return _check(lambda v: v >= lo and (hi is None or v <= hi), expect, doc)


def _positive(doc: str) -> dict:
    return _check(lambda v: v > 0, "expected a positive number", doc)


def _port(doc: str) -> dict:
    return _int_range(0, 65535, doc)


@dataclass(frozen=True)
class OrchestratorSection:
    name: str = field(default="orchestrator", metadata={"doc": "name used to find this orchestrator"})
    run_dir: str = field(
        default="",
        metadata={
            "doc": "run directory (0700); default $XDG_RUNTIME_DIR/orchestrator/<name> or /tmp/orchestrator-<uid>/<name>"
        },
    )
    startup_timeout_s: float = field(
        default=120.0, metadata=_positive("seconds a worker may take to report READY")
    )
    stop_timeout_s: float = field(default=10.0, metadata=_positive("seconds to drain in-flight work on stop"))
    log_level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata={"doc": "log level of the supervisor and workers"}
    )
    log_max_mb: int = field(
        default=64,
        metadata=_int_range(
            0,
            1 << 20,
            "supervisor.log and each worker log are rotated past this size (one older file kept as NAME.1); 0 = never",
        ),
    )
    min_ready_workers: int = field(
        default=1,
        metadata=_int_range(
            1, None, "/readyz answers 200 only while at least this many workers are READY (and not draining)"
        ),
    )
    cpu_affinity: str | tuple[int, ...] = field(
        default="auto",
        metadata={
            "doc": '"auto" (the supervisor and its threads on cores no worker has: one physical core is kept '
            'for them when there are more than workers), "none" (anywhere), or a list of cores'
        },
    )


@dataclass(frozen=True)
class WorkersSection:
    device: Literal["cpu", "gpu"] = field(
        default="cpu", metadata={"doc": "CPU workers (no GPU needed) or one worker per GPU"}
    )
    count: int = field(default=1, metadata=_int_range(1, 256, "CPU mode: number of workers"))
    gpus: str | tuple[int | str, ...] = field(
        default="all", metadata={"doc": 'GPU mode: "all" or a list of indices or UUIDs'}
    )
    per_gpu: int = field(
        default=1,
        metadata=_int_range(1, 16, "workers per GPU; without MPS they time-slice the GPU (warning)"),
    )
    cpu_affinity: str | tuple[tuple[int, ...], ...] = field(
        default="auto",
        metadata={"doc": '"auto" (NUMA-local cores from NVML), "none", or one list of cores per worker'},
    )
    heartbeat_interval_ms: int = field(
        default=200, metadata=_int_range(10, 10000, "worker heartbeat period (ms)")
    )
    hang_timeout_s: float = field(
        default=5.0,
        metadata=_positive("a worker with queued work and no progress for this long is restarted"),
    )


@dataclass(frozen=True)
class DimSection:
    """One dynamic non-batch dimension of the model (`[[model.dims]]`), e.g. BERT's sequence length."""

    name: str = field(
        default="", metadata={"doc": "the dimension's name in the model (ONNX dim_param, torch.export Dim)"}
    )
    min: int = field(default=1, metadata=_int_range(1, None, "smallest size a request may carry"))
    max: int = field(
        default=0,
        metadata=_int_range(0, None, "largest size a request may carry (0 = the model's own bound)"),
    )
    buckets: tuple[int, ...] = field(
        default=(),
        metadata={
            "doc": "pad coalesced requests up to one of these sizes (the last is max); empty = batch only requests of equal size (GPU engines need buckets)"
        },
    )
    pad: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "doc": "value of padded positions per input (default 0), e.g. {input_ids = 0, attention_mask = 0}"
        },
    )
    follow: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "doc": "outputs with this dimension at an axis (batch = 0) where the model's dimension names do not say so, e.g. {last_hidden_state = 1}"
        },
    )


@dataclass(frozen=True)
class ModelSection:
    kind: Literal["onnx", "synthetic", "tensorrt", "torch"] = field(
        default="synthetic",
        metadata={
            "doc": "engine: ONNX Runtime (CPU), synthetic calibrated workload, a TensorRT plan (GPU), or a PyTorch .pt2 program (GPU; the torch extra)"
        },
    )
    path: str = field(
        default="", metadata={"doc": "model file (onnx, tensorrt, torch .pt2); relative to the config file"}
    )
    max_batch: int = field(default=64, metadata=_int_range(1, None, "largest batch (rows) the engine runs"))
    item_shape: tuple[int, ...] = field(
        default=(256,), metadata={"doc": "synthetic: shape of one item (row)"}
    )
    work: int = field(default=0, metadata=_int_range(0, 1 << 24, "synthetic: iterations per element"))
    fill_gpu: bool = field(
        default=True,
        metadata={
            "doc": "synthetic on a GPU: one full batch occupies every SM (like a real model at its max batch), so batches of different slots do not run side by side"
        },
    )
    runtime: Literal["auto", "tensorrt", "tensorrt_lean"] = field(
        default="auto", metadata={"doc": "tensorrt: which runtime module loads the plan"}
    )
    trust_host_code: bool = field(
        default=False,
        metadata={"doc": "tensorrt: allow host code in version-compatible plans (trusted plans only)"},
    )
    intra_op_threads: int = field(
        default=1, metadata=_int_range(0, 256, "onnx: ONNX Runtime threads per worker (0 = its default)")
    )
    dims: tuple[DimSection, ...] = field(
        default=(),
        metadata={
            "doc": "dynamic non-batch dimensions: ranges, padding buckets and values ([[model.dims]] tables; see Dynamic dimensions)"
        },
    )


@dataclass(frozen=True)
class PipelineSection:
    depth: int = field(
        default=2, metadata=_int_range(1, 16, "batches in flight per worker (1 = sync every batch)")
    )
    cuda_graphs: bool = field(
        default=False,
        metadata={"doc": "capture one CUDA graph per slot and bucket; batches are padded to their bucket"},
    )
    buckets: tuple[int, ...] = field(
        default=(),
        metadata={"doc": "batch sizes graphs are captured for; default powers of two up to max_batch"},
    )
    sync: Literal["spin", "blocking"] = field(
        default="blocking",
        metadata={"doc": "how the worker waits for the GPU: spin (lowest latency, burns a core) or blocking"},
    )
    max_queue: int = field(
        default=1024, metadata=_int_range(1, None, "queued requests per worker before OVERLOADED")
    )
    max_queue_delay_us: int = field(
        default=100,
        metadata=_int_range(
            0, 10_000_000, "longest a request waits to be coalesced while the pipeline is busy (us)"
        ),
    )


@dataclass(frozen=True)
class TransportSection:
    kind: Literal["ipc", "tcp"] = field(
        default="ipc", metadata={"doc": "worker endpoints: ipc sockets in the run directory, or TCP"}
    )
    host: str = field(
        default="127.0.0.1", metadata={"doc": "tcp: bind address (loopback unless you mean it)"}
    )
    port_base: int = field(default=0, metadata=_port("tcp: first worker port (0 = ephemeral)"))
    max_message_bytes: int = field(
        default=256 << 20, metadata=_int_range(1, None, "largest accepted message on any socket (bytes)")
    )
    io_threads: int = field(
        default=1, metadata=_int_range(1, 16, "ZeroMQ I/O threads per worker (large payloads may need 2)")
    )
    shm_mb: int = field(
        default=256,
        metadata=_int_range(
            0,
            1 << 20,
            "shared-memory arena per worker for local clients (MiB; registered as pinned memory on GPU workers before READY); 0 = off",
        ),
    )
    shm_max_lease_mb: int = field(
        default=64, metadata=_int_range(1, 1 << 20, "largest share of the arena one client may lease (MiB)")
    )
    control_port: int = field(
        default=0,
        metadata=_port(
            "tcp: port of a TCP control socket for remote discovery (status, endpoints; never stop), events on the next port; 0 = none"
        ),
    )
    curve: bool = field(
        default=False,
        metadata={"doc": "tcp: encrypt and authenticate with ZeroMQ CURVE (keys from `orchestrator keygen`)"},
    )
    curve_server_secret: str = field(
        default="",
        metadata={"doc": "tcp+curve: the server's secret certificate file (relative to the config file)"},
    )
    curve_clients_dir: str = field(
        default="",
        metadata={
            "doc": "tcp+curve: directory of authorised client public certificates (empty = any client holding the server key)"
        },
    )
    insecure: bool = field(
        default=False, metadata={"doc": "allow binding TCP to a non-loopback address without CURVE"}
    )


@dataclass(frozen=True)
class MpsSection:
    enabled: bool = field(
        default=False,
        metadata={
            "doc": "start an NVIDIA MPS control daemon (pipe and log directories under <run_dir>/mps) before the workers; quit it on stop"
        },
    )
    active_thread_percentage: int = field(
        default=0,
        metadata=_int_range(
            0,
            100,
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for every worker: its share of each GPU's SMs (0 = unset)",
        ),
    )
    use_existing: bool = field(
        default=False,
        metadata={
            "doc": "use an MPS daemon that is already running (CUDA_MPS_PIPE_DIRECTORY if set, else the one found) instead of refusing; it is never stopped"
        },
    )


@dataclass(frozen=True)
class MonitorSection:
    interval_ms: int = field(default=100, metadata=_int_range(10, 60000, "NVML fast-loop period (ms)"))
    metrics_port: int = field(
        default=0,
        metadata=_port(
            "HTTP port for /metrics (Prometheus) and the probes /livez, /readyz, /startupz (0 = off)"
        ),
    )
    http_host: str = field(
        default="127.0.0.1",
        metadata={
            "doc": "address of that HTTP server (0.0.0.0 in a Kubernetes pod, so the kubelet and Prometheus reach it)"
        },
    )
    livez_stall_s: float = field(
        default=5.0, metadata=_positive("/livez fails when the supervisor loop has not turned for this long")
    )
    stall_factor: float = field(
        default=8.0,
        metadata=_check(
            lambda v: v > 1, "expected a number above 1", "stall: this many times the recent baseline"
        ),
    )
    stall_min_us: int = field(
        default=1000, metadata=_int_range(0, None, "stall: never below this many microseconds")
    )
    driver_journal: Literal["auto", "cupti", "own"] = field(
        default="auto",
        metadata={
            "doc": "GPU workers' driver-operation journal: \"own\" sees only the orchestrator's own CUDA calls; "
            "CUPTI sees every thread and library in the process (a compiled callback, built once per host "
            'with the C compiler) but costs every driver call once attached. "auto": CUPTI attached at the '
            'first launch blocked like a lock wait, else "own" where CUPTI cannot run; "cupti": attached from '
            "start-up; `start` refuses (one line, exit 2) without cupti-python or a C compiler"
        },
    )


@dataclass(frozen=True)
class RestartSection:
    enabled: bool = field(default=True, metadata={"doc": "restart crashed or hung workers"})
    backoff_initial_s: float = field(
        default=0.5, metadata=_positive("first restart delay; doubles per consecutive crash")
    )
    backoff_max_s: float = field(default=30.0, metadata=_positive("longest restart delay"))
    flap_window_s: float = field(
        default=60.0, metadata=_positive("window in which crashes count as flapping")
    )
    flap_max_crashes: int = field(
        default=5, metadata=_int_range(1, None, "crashes within the window that quarantine a worker")
    )
    quarantine_s: float = field(
        default=300.0, metadata=_positive("how long a quarantined worker stays failed before a retry")
    )


InjectKind = Literal[
    "none",
    "pinned_alloc",
    "device_alloc",
    "module_load",
    "host_register",
    "library_alloc",
    "lazy_module",
    "cpu_hog",
    "crash_on_start",
    "hang_after",
]
#: debug.inject kinds done on a GPU worker's side thread. The first three go through workers/cuda (our own
#: journal sees them); the others are done the way another library would (only CUPTI sees them).
GPU_INJECTIONS = tuple(
    k for k in get_args(InjectKind) if k not in ("none", "cpu_hog", "crash_on_start", "hang_after")
)


@dataclass(frozen=True)
class DebugSection:
    """Fault and stall injection for verification (never enable in production)."""

    inject: InjectKind = field(
        default="none",
        metadata={
            "doc": "inject a driver-lock operation, a CPU hog, a start-up crash or a hang (verification only)"
        },
    )
    inject_period_ms: int = field(
        default=500, metadata=_int_range(1, 600000, "period of the injected operation")
    )
    inject_bytes: int = field(default=64 << 20, metadata=_int_range(1, None, "size of injected allocations"))
    inject_after_batches: int = field(
        default=0, metadata=_int_range(0, None, "hang_after: batches served before the worker hangs")
    )
    inject_workers: tuple[str, ...] = field(
        default=(), metadata={"doc": "worker ids the injection applies to (empty = all)"}
    )

    def applies_to(self, worker_id: str) -> bool:
        """Whether an injection is configured and applies to this worker (the workers use it, and the
        supervisor, which starts a lazy_module worker with lazy loading)."""
        return self.inject != "none" and (not self.inject_workers or worker_id in self.inject_workers)


@dataclass(frozen=True)
class Config:
    orchestrator: OrchestratorSection = OrchestratorSection()
    workers: WorkersSection = WorkersSection()
    model: ModelSection = ModelSection()
    pipeline: PipelineSection = PipelineSection()
    transport: TransportSection = TransportSection()
    mps: MpsSection = MpsSection()
    monitor: MonitorSection = MonitorSection()
    restart: RestartSection = RestartSection()
    debug: DebugSection = DebugSection()
    source: str = ""  # path of the file this came from ("" for built-in)

    @property
    def run_dir(self) -> Path:
        return (
            Path(self.orchestrator.run_dir)
            if self.orchestrator.run_dir
            else default_run_dir(self.orchestrator.name)
        )

    @property
    def model_path(self) -> Path:
        return Path(self.model.path)

    @property
    def buckets(self) -> tuple[int, ...]:
        if self.pipeline.buckets:
            return self.pipeline.buckets
        out, b = [], 1
        while b < self.model.max_batch:
            out.append(b)
            b *= 2
        out.append(self.model.max_batch)
        return tuple(out)


_SECTIONS: dict[str, type] = {k: v for k, v in typing.get_type_hints(Config).items() if k != "source"}


def default_run_dir(name: str) -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    root = (
        Path(base) / "orchestrator"
        if base and os.access(base, os.W_OK)
        else Path(f"/tmp/orchestrator-{os.getuid()}")
    )
    return root / name


# --- generic validation driven by the dataclass type hints ---------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against type `tp`; return the converted value or append an error."""
    origin = get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{path}: expected true or false, got {_describe(value)}")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(f"{path}: expected an integer, got {_describe(value)}")
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        errors.append(f"{path}: expected a number, got {_describe(value)}")
    elif tp is str:
        if isinstance(value, str):
            return value
        errors.append(f"{path}: expected a string, got {_describe(value)}")
    elif origin is Literal:
        choices = get_args(tp)
        if value in choices and isinstance(value, type(choices[0])):
            return value
        errors.append(
            f"{path}: expected one of {', '.join(repr(c) for c in choices)}, got {_describe(value)}"
        )
    elif origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {_describe(value)}")
            return None
        inner = args[0]
        out = []
        for i, item in enumerate(value):
            sub: list[str] = []
            conv = _convert(inner, item, f"{path}[{i}]", sub)
            errors.extend(sub)
            out.append(conv)
        return tuple(out)
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build_section(tp, value, path, errors)
    elif origin is dict:
        inner = get_args(tp)[1]
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a table, got {_describe(value)}")
            return None
        out_d = {}
        for k, item in value.items():
            out_d[k] = _convert(inner, item, f"{path}.{k}", errors)
        return out_d
    elif origin in (typing.Union, types.UnionType):
        for alt in get_args(tp):
            sub = []
            conv = _convert(alt, value, path, sub)
            if not sub:
                return conv
        errors.append(f"{path}: got {_describe(value)}, which is not allowed here (see the config reference)")
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    return None


def _build_section(cls: type, raw: Any, path: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table, got {_describe(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            errors.append(f"{path}.{key}: unknown key (known: {', '.join(sorted(known))})")
    values = {}
    for name, f in known.items():
        if name not in raw:
            continue
        before = len(errors)
        value = _convert(hints[name], raw[name], f"{path}.{name}", errors)
        expect = f.metadata.get("expect")
        if len(errors) > before:
            if expect:  # one clear sentence beats the generic type error
                del errors[before:]
                errors.append(f"{path}.{name}: {expect}, got {_describe(raw[name])}")
        elif "check" in f.metadata and not f.metadata["check"](value):
            errors.append(f"{path}.{name}: {expect}, got {_describe(raw[name])}")
        else:
            values[name] = value
    return cls(**values)


def _cross_checks(cfg: Config, base: Path, check_files: bool, errors: list[str]) -> Config:
    m, p, w = cfg.model, cfg.pipeline, cfg.workers
    if m.kind in ("onnx", "tensorrt", "torch"):
        if not m.path:
            errors.append(f'model.path: required for kind = "{m.kind}"')
        else:
            path = Path(os.path.normpath(m.path if Path(m.path).is_absolute() else base / m.path))
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, path=str(path)))
            if check_files and not path.is_file():
                errors.append(f"model.path: file not found: {path}")
    if m.kind == "synthetic" and (not m.item_shape or any(d <= 0 for d in m.item_shape)):
        errors.append("model.item_shape: expected a non-empty list of positive integers")
    if p.buckets:
        if list(p.buckets) != sorted(set(p.buckets)) or p.buckets[0] < 1:
            errors.append("pipeline.buckets: expected strictly increasing positive integers")
        elif p.buckets[-1] != m.max_batch:
            errors.append(f"pipeline.buckets: the last bucket must equal model.max_batch ({m.max_batch})")
    if w.device == "cpu" and (p.cuda_graphs or cfg.mps.enabled):
        errors.append('workers.device: CUDA graphs and MPS need device = "gpu"')
    if w.device == "cpu" and cfg.monitor.driver_journal == "cupti":
        errors.append(
            'monitor.driver_journal: "cupti" needs workers.device = "gpu" (a CPU worker has no driver to journal)'
        )
    if w.device == "cpu" and cfg.debug.inject in GPU_INJECTIONS:
        errors.append(
            f'debug.inject: "{cfg.debug.inject}" needs workers.device = "gpu"; CPU workers can use "cpu_hog"'
        )
    if w.device == "cpu" and m.kind in ("tensorrt", "torch"):
        errors.append(f'model.kind: "{m.kind}" needs workers.device = "gpu"')
    _check_dims(m, errors)
    if isinstance(w.gpus, str) and w.gpus != "all":
        errors.append(f'workers.gpus: expected "all" or a list of GPU indices or UUIDs, got "{w.gpus}"')
    if isinstance(w.cpu_affinity, str) and w.cpu_affinity not in ("auto", "none"):
        errors.append(
            f'workers.cpu_affinity: expected "auto", "none" or a list of core lists, got "{w.cpu_affinity}"'
        )
    sup = cfg.orchestrator.cpu_affinity
    if isinstance(sup, str) and sup not in ("auto", "none"):
        errors.append(f'orchestrator.cpu_affinity: expected "auto", "none" or a list of cores, got "{sup}"')
    elif isinstance(sup, tuple) and (not sup or any(c < 0 for c in sup)):
        errors.append(
            f"orchestrator.cpu_affinity: expected a non-empty list of core numbers, got {list(sup)}"
        )
    t = cfg.transport
    if t.kind == "tcp":
        loopback = t.host in ("127.0.0.1", "localhost", "::1") or t.host.startswith("127.")
        if not loopback and not t.curve and not t.insecure:
            errors.append(
                f'transport.host: binding TCP to "{t.host}" without curve = true exposes the workers to '
                "anyone on that network; set transport.curve = true (see README, Security) or insecure = true"
            )
        if t.curve:
            for key in ("curve_server_secret", "curve_clients_dir"):
                value = getattr(t, key)
                if value:
                    path = Path(os.path.normpath(value if Path(value).is_absolute() else base / value))
                    changes: dict[str, Any] = {key: str(path)}
                    t = dataclasses.replace(t, **changes)
                    ok = path.is_dir() if key == "curve_clients_dir" else path.is_file()
                    if check_files and not ok:
                        errors.append(f"transport.{key}: not found: {path}")
            if not t.curve_server_secret:
                errors.append(
                    "transport.curve_server_secret: required with curve = true (orchestrator keygen DIR)"
                )
            cfg = dataclasses.replace(cfg, transport=t)
        if t.control_port and t.control_port == 65535:
            errors.append("transport.control_port: the events socket takes the next port; use at most 65534")
    elif t.curve or t.control_port:
        errors.append('transport.curve and transport.control_port need transport.kind = "tcp"')
    if w.device == "cpu" and cfg.orchestrator.min_ready_workers > w.count:
        errors.append(
            f"orchestrator.min_ready_workers: {cfg.orchestrator.min_ready_workers} exceeds workers.count "
            f"({w.count}): /readyz could never answer 200"
        )
    if t.shm_mb and t.shm_max_lease_mb > t.shm_mb:
        errors.append(
            f"transport.shm_max_lease_mb: {t.shm_max_lease_mb} exceeds the arena (transport.shm_mb = {t.shm_mb})"
        )
    run_dir = str(cfg.run_dir)
    if len(run_dir) > _MAX_RUN_DIR:
        errors.append(
            f"orchestrator.run_dir: {run_dir!r} is {len(run_dir)} characters; ipc socket paths need it under {_MAX_RUN_DIR}"
        )
    if not cfg.orchestrator.name or "/" in cfg.orchestrator.name:
        errors.append("orchestrator.name: expected a non-empty name without '/'")
    return cfg


def _check_dims(m: ModelSection, errors: list[str]) -> None:
    """[[model.dims]]: named once each, buckets increasing and within [min, max]."""
    if m.dims and m.kind == "synthetic":
        errors.append("model.dims: the synthetic model has no dynamic dimensions")
    seen: set[str] = set()
    for i, d in enumerate(m.dims):
        at = f"model.dims[{i}]"
        if not d.name:
            errors.append(f"{at}.name: required (the dimension's name in the model)")
        elif d.name in seen:
            errors.append(f"{at}.name: dimension {d.name!r} is configured twice")
        seen.add(d.name)
        if d.max and d.min > d.max:
            errors.append(f"{at}: min {d.min} exceeds max {d.max}")
        if d.buckets:
            b = d.buckets
            if list(b) != sorted(set(b)) or b[0] < d.min:
                errors.append(f"{at}.buckets: expected strictly increasing sizes from min ({d.min}) up")
            elif d.max and b[-1] != d.max:
                errors.append(f"{at}.buckets: the last bucket must equal max ({d.max})")
        for name, axis in d.follow.items():
            if axis is not None and axis < 1:
                errors.append(f"{at}.follow.{name}: expected an axis >= 1 (axis 0 is the batch)")


def parse_config(
    raw: dict, source: str = "", base_dir: Path | None = None, check_files: bool = True
) -> Config:
    """Validate a parsed TOML document. Raises ConfigError listing every problem."""
    errors: list[str] = []
    sections = {}
    for key, value in raw.items():
        if key not in _SECTIONS:
            errors.append(f"{key}: unknown section (known: {', '.join(sorted(_SECTIONS))})")
            continue
        sections[key] = _build_section(_SECTIONS[key], value, key, errors)
    cfg = Config(**sections, source=source)
    cfg = _cross_checks(cfg, base_dir or Path.cwd(), check_files, errors)
    if errors:
        raise ConfigError(errors, source or None)
    return cfg


def load_config(path: str | os.PathLike, check_files: bool = True) -> Config:
    """Read and validate a TOML config file. Raises ConfigError with every problem found."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", str(p)) from None
    return parse_config(raw, str(p.resolve()), p.resolve().parent, check_files)


def to_dict(cfg: Config) -> dict:
    """Plain-data form (lists, not tuples) for passing to workers and printing."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Inverse of to_dict for an already-validated config (used inside workers)."""
    src = data.get("source", "")
    raw = {k: v for k, v in data.items() if k != "source"}
    # Paths are already absolute; skip file checks (the supervisor did them).
    return parse_config(_lists(raw), src, Path("/"), check_files=False)


def _lists(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    names = {bool: "bool", int: "integer", float: "number", str: "string"}
    if tp in names:
        return names[tp]
    origin = get_origin(tp)
    if origin is Literal:
        return " / ".join(f'"{a}"' for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"table of {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "list of tables"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return str(tp)


def _inline_toml(v: Any) -> str:
    """A default value on one line, for the config reference's table: tomli-w writes each scalar (it spreads
    arrays over several lines, which a Markdown table cannot hold)."""
    import tomli_w  # documentation only: the package is needed by scripts/update_readme_config.py and tests

    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = dataclasses.asdict(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_inline_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{" + ", ".join(f"{tomli_w.dumps({k: 0})[:-5]} = {_inline_toml(x)}" for k, x in v.items()) + "}"
        )
    return tomli_w.dumps({"v": v})[4:-1]


def _reference_row(key: str, tp: Any, f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        default = _inline_toml(f.default)
    elif f.default_factory is not dataclasses.MISSING:
        default = _inline_toml(f.default_factory())
    else:
        default = ""
    type_name = (
        "list of tables"
        if get_origin(tp) is tuple and dataclasses.is_dataclass(get_args(tp)[0])
        else _type_name(tp)
    )
    return f"| `{key}` | {type_name} | `{default}` | {f.metadata.get('doc', '')} |"


def reference() -> str:
    """The config reference as a Markdown table, generated from the dataclasses (the README embeds it)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            lines.append(_reference_row(f"{section}.{f.name}", hints[f.name], f))
            inner = get_args(hints[f.name])
            if get_origin(hints[f.name]) is tuple and inner and dataclasses.is_dataclass(inner[0]):
                sub_hints = typing.get_type_hints(inner[0])
                lines.extend(
                    _reference_row(f"{section}.{f.name}[].{g.name}", sub_hints[g.name], g)
                    for g in dataclasses.fields(inner[0])
                )
    return "\n".join(lines)
