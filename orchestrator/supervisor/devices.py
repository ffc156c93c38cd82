"""Plans the worker processes for a config: which device each serves, its environment and CPU cores.

Runs in the supervisor (and `orchestrator start` pre-flight). Never imports CUDA: GPUs are discovered
through NVML, and CUDA packages are only looked up, not imported.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from orchestrator.common.config import Config
from orchestrator.common.errors import ConfigError
from orchestrator.common.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    id: str
    device: str  # "cpu" or "gpu:<index>"
    endpoint: str
    cpu_affinity: tuple[int, ...] | None
    env: dict[str, str] = field(default_factory=dict)
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    gpu_name: str | None = None
    shares_gpu_with: tuple[str, ...] = ()


def physical_core_of(cpu: int) -> tuple[int, int] | None:
    """(package, core) of a logical CPU from sysfs; None where the topology is not readable."""
    base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
    try:
        with open(f"{base}/physical_package_id") as f:
            package = int(f.read())
        with open(f"{base}/core_id") as f:
            return package, int(f.read())
    except (OSError, ValueError):
        return None


def _physical_cores(
    cores: Collection[int], core_of: Callable[[int], object] | None = None
) -> list[list[int]]:
    """Logical CPUs grouped by physical core (SMT siblings together), in order of each core's first CPU; a CPU
    whose topology is unreadable is a core of its own."""
    core_of = core_of or physical_core_of
    physical: dict[object, list[int]] = {}
    for cpu in sorted(cores):
        key = core_of(cpu)
        physical.setdefault(key if key is not None else ("cpu", cpu), []).append(cpu)
    return list(physical.values())


def _split(
    cores: list[int], parts: int, core_of: Callable[[int], object] | None = None
) -> list[tuple[int, ...] | None]:
    """Split cores into `parts` disjoint groups, by physical core: SMT siblings (logical CPUs of one core,
    which Linux usually numbers far apart, e.g. 0 and 32) go to the same worker, so no two workers share a
    physical core while there are at least as many physical cores as workers. With fewer, logical CPUs are
    split instead; with fewer logical CPUs than workers, all of them are shared."""
    if not cores:
        return [None] * parts
    if len(cores) < parts:
        return [tuple(cores)] * parts
    physical = _physical_cores(cores, core_of)
    units = physical if len(physical) >= parts else [[c] for c in sorted(cores)]
    size, extra = divmod(len(units), parts)
    out: list[tuple[int, ...] | None] = []
    start = 0
    for i in range(parts):
        n = size + (1 if i < extra else 0)
        out.append(tuple(sorted(c for unit in units[start : start + n] for c in unit)))
        start += n
    return out


def _supervisor_reserve(cfg: Config, cores: set[int], workers: int) -> set[int]:
    """The cores kept off the workers for the supervisor's own threads (its poll loop, the NVML sampler,
    ZeroMQ's I/O threads): with orchestrator.cpu_affinity = "auto", the last physical core (all its SMT
    siblings) of `cores` when there are more physical cores than workers; the configured list; or none."""
    want = cfg.orchestrator.cpu_affinity
    if want == "none":
        return set()
    if isinstance(want, tuple):
        return set(want)
    physical = _physical_cores(cores)
    if len(physical) <= workers:
        return set()  # every physical core serves a worker: the supervisor shares (status says so)
    return set(max(physical, key=max))


def supervisor_cores(cfg: Config, plans: list[WorkerPlan]) -> tuple[int, ...] | None:
    """Where the supervisor process and its threads run: the configured cores, else (auto) every allowed
    core that no worker is pinned to; None (anywhere) when that leaves nothing or with "none"."""
    want = cfg.orchestrator.cpu_affinity
    if want == "none":
        return None
    host = os.sched_getaffinity(0)
    if isinstance(want, tuple):
        bad = sorted(set(want) - host)
        if bad:
            raise ConfigError(
                f"orchestrator.cpu_affinity: cores {bad} are not available on this host (available: {sorted(host)})"
            )
        return tuple(sorted(want))
    if any(p.cpu_affinity is None for p in plans):
        return None  # a worker may run anywhere: no core is the supervisor's alone
    used = {c for p in plans for c in p.cpu_affinity or ()}
    left = sorted(host - used)
    return tuple(left) if left else None


def _endpoint(cfg: Config, rundir: RunDir, worker_id: str, index: int) -> str:
    t = cfg.transport
    if t.kind == "tcp":
        port = f"{t.port_base + index}" if t.port_base else "*"
        return f"tcp://{t.host}:{port}"
    return f"ipc://{rundir.worker_socket(worker_id)}"


def _explicit_affinity(cfg: Config, n: int) -> list[tuple[int, ...] | None] | None:
    aff = cfg.workers.cpu_affinity
    if aff == "none":
        return [None] * n
    if isinstance(aff, tuple):
        if len(aff) != n:
            raise ConfigError(f"workers.cpu_affinity: {len(aff)} core lists given for {n} workers")
        host = os.sched_getaffinity(0)
        for i, cores in enumerate(aff):
            bad = sorted(set(cores) - host)
            if bad or not cores:
                raise ConfigError(
                    f"workers.cpu_affinity[{i}]: cores {bad or '[]'} are not available on this host "
                    f"(available: {sorted(host)})"
                )
        return [tuple(c) for c in aff]
    return None  # "auto"


def gpu_preflight(cfg: Config) -> list[str]:
    """What a GPU config needs that this host lacks; empty when it can start."""
    missing = []
    if importlib.util.find_spec("pynvml") is None:
        missing.append("the nvidia-ml-py package (pip install 'orchestrator[gpu]')")
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        missing.append("the cuda-python package (pip install 'orchestrator[gpu]')")
    if cfg.model.kind == "tensorrt" and not any(
        importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_lean", "tensorrt_lean_bindings")
    ):
        missing.append("TensorRT (the tensorrt or tensorrt-lean packages)")
    if cfg.model.kind in ("tensorrt",) and not os.path.isfile(cfg.model.path):
        missing.append(f"the TensorRT plan {cfg.model.path}")
    return missing


def discover_or_explain(cfg: Config) -> list[dict]:
    """GPUs from NVML, or a ConfigError naming everything that is missing."""
    missing = gpu_preflight(cfg)
    gpus: list[dict] = []
    if importlib.util.find_spec("pynvml") is not None:
        from orchestrator.supervisor.monitor.nvml_sampler import discover_gpus

        try:
            gpus = discover_gpus()
        except Exception as exc:  # NVML raises its own error types; the message is what matters
            missing.insert(0, f"an NVIDIA driver with visible GPUs (NVML: {exc})")
        else:
            if not gpus:
                missing.insert(0, "an NVIDIA GPU (NVML sees none)")
    else:
        missing.insert(0, "an NVIDIA driver and GPU (cannot query NVML)")
    if missing:
        raise ConfigError(
            [f'workers.device = "gpu" needs {m}' for m in missing]
            + ["use a CPU config such as configs/cpu.toml on this host"],
            cfg.source or None,
        )
    return gpus


def _select_gpus(cfg: Config, gpus: list[dict]) -> list[dict]:
    want = cfg.workers.gpus
    if want == "all":
        return gpus
    chosen = []
    for sel in want:
        match = [g for g in gpus if (g["index"] == sel if isinstance(sel, int) else g["uuid"] == sel)]
        if not match:
            have = ", ".join(f"{g['index']}={g['uuid']}" for g in gpus)
            raise ConfigError(f"workers.gpus: GPU {sel!r} not found (have: {have})")
        chosen.append(match[0])
    return chosen


def _module_loading(cfg: Config, worker_id: str) -> str:
    """CUDA_MODULE_LOADING for a GPU worker: EAGER (a lazily loaded kernel stalls launches at its first use),
    except LAZY for a worker that [debug] inject = "lazy_module" applies to, whose stalls that kind needs."""
    return "LAZY" if cfg.debug.inject == "lazy_module" and cfg.debug.applies_to(worker_id) else "EAGER"


def plan_workers(cfg: Config, rundir: RunDir, gpus: list[dict] | None = None) -> list[WorkerPlan]:
    """One plan per worker process; GPU configs need `gpus` from discover_or_explain()."""
    host = os.sched_getaffinity(0)
    if cfg.workers.device == "cpu":
        n = cfg.workers.count
        affinity = _explicit_affinity(cfg, n) or _split(sorted(host - _supervisor_reserve(cfg, host, n)), n)
        return [WorkerPlan(f"w{i}", "cpu", _endpoint(cfg, rundir, f"w{i}", i), affinity[i]) for i in range(n)]
    chosen = _select_gpus(cfg, gpus or [])
    per = cfg.workers.per_gpu
    explicit = _explicit_affinity(cfg, len(chosen) * per)
    near = {c for g in chosen for c in g.get("cpu_affinity") or ()} or host  # the GPUs' local cores
    local = _numa_split(chosen, per, _supervisor_reserve(cfg, near, len(chosen) * per))
    plans: list[WorkerPlan] = []
    for g in chosen:
        ids = tuple(f"w{len(plans) + k}" for k in range(per))
        for k, wid in enumerate(ids):
            i = len(plans)
            env = {
                "CUDA_VISIBLE_DEVICES": g["uuid"],
                "CUDA_MODULE_LOADING": _module_loading(cfg, wid),
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            }
            plans.append(
                WorkerPlan(
                    wid,
                    f"gpu:{g['index']}",
                    _endpoint(cfg, rundir, wid, i),
                    explicit[i] if explicit else local[(g["index"], k)],
                    env,
                    g["index"],
                    g["uuid"],
                    g.get("name"),
                    tuple(x for x in ids if x != wid),
                )
            )
    lazy = [p.id for p in plans if p.env["CUDA_MODULE_LOADING"] == "LAZY"]
    if lazy:
        log.warning(
            '[spawn] %s forced to CUDA_MODULE_LOADING=LAZY for debug.inject = "lazy_module" (not EAGER)',
            ", ".join(lazy),
        )
    return plans


def _numa_split(
    gpus: list[dict], per_gpu: int, reserved: Collection[int] = ()
) -> dict[tuple[int, int], tuple[int, ...] | None]:
    """NUMA-local cores for each (GPU index, worker k). GPUs that NVML gives the same local cores (one NUMA
    node, or a host where every core is local to every GPU) share those cores out among all their workers,
    so no two workers of the node run on the same core; a GPU alone on its node splits its cores among its
    own workers. The supervisor's `reserved` cores are left out while a node keeps a core per worker."""
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for g in gpus:
        key = tuple(sorted(g.get("cpu_affinity") or []))
        groups.setdefault(key, []).extend((g["index"], k) for k in range(per_gpu))
    out: dict[tuple[int, int], tuple[int, ...] | None] = {}
    for cores, members in groups.items():
        pool = [c for c in cores if c not in reserved]
        if len(pool) < len(members):
            pool = list(cores)
        for member, part in zip(members, _split(pool, len(members)), strict=True):
            out[member] = part
    return out
