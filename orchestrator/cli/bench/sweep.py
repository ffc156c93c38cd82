"""One target's sweep: learn the model, build the requests and their references, then run each point
(load from the client processes, telemetry snapshots around its window) and put its figures together.

Runs in the CLI process.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.cli.bench import check, inputs, telemetry
from orchestrator.cli.bench.load import ClientPool, LoadError, PointLoad, PoolSpec
from orchestrator.common.errors import OrchestratorError

JSON_VERSION = 1


@dataclass
class Settings:
    """Everything about a sweep but its target (the same for both targets of --compare)."""

    concurrency: list[int] | None = None  # closed loop at each of these ...
    rates: list[float] | None = None  # ... or open loop at each of these requests/s
    rows: int = 1
    duration: float = 5.0
    warmup: float = 1.0
    processes: int = 1
    shm: bool | str = "auto"
    dims: dict[str, int] = field(default_factory=dict)
    inputs: str | None = None  # a .npz file; None = random
    seed: int = 0
    check_every: int = 16  # 0 = off, 1 = every reply
    rtol: float | None = None
    atol: float | None = None
    client_cpus: list[int] | None = None
    curve: tuple[str, str] | None = None
    timeout: float = 30.0

    def points(self) -> list[tuple[str, float]]:
        if self.rates:
            return [("rate", r) for r in self.rates]
        return [("concurrency", c) for c in (self.concurrency or [1])]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mode"] = "open" if self.rates else "closed"
        out.pop("curve")
        return out


class Progress(Protocol):
    def begin(self, label: str, seconds: float) -> None: ...

    def tick(self, completed: int) -> None: ...

    def end(self, point: dict[str, Any]) -> None: ...


class SweepError(OrchestratorError):
    """The sweep stopped midway; `partial` holds the target's result with the points done so far."""

    def __init__(self, message: str, partial: dict[str, Any]) -> None:
        super().__init__(message)
        self.partial = partial


def point_label(kind: str, value: float) -> str:
    return f"concurrency {value:g}" if kind == "concurrency" else f"rate {value:g}/s"


def _config_here(target: str, status: dict[str, Any], endpoint: str) -> str | None:
    """The target's config file, where this process can read it (a local target)."""
    if target.endswith(".toml"):
        return target
    if endpoint.startswith("ipc://") and status.get("config"):
        return str(status["config"])
    return None


def _lease_mb(spec: inputs.ModelSpec, s: Settings, dims: dict[str, int]) -> int:
    """A shared-memory lease big enough for one process's share of the largest point in flight."""
    per_request = inputs.request_bytes(spec, s.rows, dims)
    in_flight = math.ceil(max(s.concurrency or [1]) / s.processes) if not s.rates else 256
    default = 32 * inputs.request_bytes(spec, spec.max_batch, dims)
    return max(1, math.ceil(max(2 * in_flight * per_request, default) / (1 << 20)))


def run_target(target: str, s: Settings, progress: Progress | None = None) -> dict[str, Any]:
    """The sweep of `s` against `target`: {"target", "model", "transport", "reference", "workers", "points"}."""
    from orchestrator.client.core import Client, resolve_control_endpoint
    from orchestrator.common.security import ClientKeys

    keys = ClientKeys(*s.curve) if s.curve else None
    endpoint = resolve_control_endpoint(target)
    with Client(target, shm=s.shm, curve=keys, copy_results=True, timeout=s.timeout) as client:
        spec = inputs.ModelSpec.from_client(client)
        if s.rows > spec.max_batch:
            raise inputs.InputError(f"--rows {s.rows}: more than the model's max batch ({spec.max_batch})")
        if s.inputs:
            if s.dims:
                raise inputs.InputError("--dim sizes random inputs; with --inputs the file's arrays set them")
            pool = inputs.npz_inputs(Path(s.inputs), spec, s.rows)
            dims = inputs.dims_of(spec, pool[0])
        else:
            dims = inputs.resolve_dims(spec, s.dims)
            pool = inputs.random_inputs(spec, s.rows, dims, seed=s.seed)
        tele = telemetry.Telemetry(endpoint, keys)
        try:
            status = tele.snapshot().status
            reference_kind, reference_note = None, None
            refs = None
            if s.check_every:
                engine, why = check.engine_reference(_config_here(target, status, endpoint), spec)
                try:
                    refs, reference_kind = check.references(pool, engine, client.infer)
                except OrchestratorError as exc:
                    raise LoadError(f"the first request failed: {exc}") from None
                reference_note = why if engine is not None else f"first reply ({why})"
        except BaseException:
            tele.close()
            raise
        transport = "shared memory" if client.shm else "frames"
    result: dict[str, Any] = {
        "target": target,
        "config": status.get("config"),
        "transport": transport,
        "reference": reference_kind,
        "reference_source": reference_note,
        "model": spec.describe(dims),
        "workers": [
            {
                "id": w.get("id"),
                "device": w.get("device"),
                "engine": (w.get("engine") or {}).get("kind"),
                "state": w.get("state"),
            }
            for w in status.get("workers") or []
        ],
        "points": [],
    }
    pool_spec = PoolSpec(
        target,
        pool,
        references=refs,
        check_every=s.check_every,
        rtol=s.rtol,
        atol=s.atol,
        shm=s.shm,
        shm_lease_mb=_lease_mb(spec, s, dims) if client.shm else None,
        curve=s.curve,
        timeout=s.timeout,
        cpus=tuple(s.client_cpus) if s.client_cpus else None,
    )
    try:
        with ClientPool(pool_spec, s.processes) as clients:
            for kind, value in s.points():
                if progress is not None:
                    progress.begin(point_label(kind, value), s.warmup + s.duration)
                snaps: dict[str, Any] = {}

                def at_start(snaps: dict[str, Any] = snaps) -> None:
                    snaps["before"] = tele.snapshot()

                def at_end(t_end: float, snaps: dict[str, Any] = snaps) -> None:
                    snaps["after"], snaps["complete"] = tele.snapshot_after(t_end)

                def tick(clients: ClientPool = clients) -> None:
                    if progress is not None:
                        progress.tick(clients.completed)

                try:
                    load = clients.run(
                        concurrency=int(value) if kind == "concurrency" else None,
                        rate=float(value) if kind == "rate" else None,
                        warmup=s.warmup,
                        duration=s.duration,
                        at_start=at_start,
                        at_end=at_end,
                        tick=tick,
                    )
                except OrchestratorError as exc:
                    raise SweepError(f"{point_label(kind, value)}: {exc}", result) from None
                point = make_point(kind, value, s, load, snaps)
                result["points"].append(point)
                if progress is not None:
                    progress.end(point)
    finally:
        tele.close()
    return result


def make_point(
    kind: str, value: float, s: Settings, load: PointLoad, snaps: dict[str, Any]
) -> dict[str, Any]:
    """A point's figures: the clients' (throughput, latency, errors, checks) and the workers' telemetry."""
    secs = load.seconds
    wrong = load.wrong > 0
    lat = load.latencies_us
    point: dict[str, Any] = {
        "mode": "open" if kind == "rate" else "closed",
        "concurrency": int(value) if kind == "concurrency" else None,
        "rate": float(value) if kind == "rate" else None,
        "rows": s.rows,
        "processes": s.processes,
        "duration_s": secs,
        "requests": load.ok,
        # A point with wrong results has no throughput: it is reported as wrong instead.
        "requests_per_s": None if wrong else load.ok / secs,
        "items_per_s": None if wrong else load.rows / secs,
        "sent_per_s": load.sent / secs,
        "late": load.late if kind == "rate" else None,
        "latency_us": {
            "p50": load.pct(50),
            "p90": load.pct(90),
            "p99": load.pct(99),
            "max": float(lat.max()),
            "mean": float(lat.mean()),
        }
        if lat.size
        else None,
        "errors": dict(sorted(load.errors.items())),
        "checked": load.checked,
        "wrong": load.wrong,
        "wrong_example": load.wrong_example,
        "correct": not wrong,
        "client_cpu": load.client_cpu,
    }
    if "before" in snaps and "after" in snaps:
        point.update(telemetry.window(snaps["before"], snaps["after"], snaps.get("complete", False)))
    else:
        point.update(telemetry.window(telemetry.Snapshot(0, {}), telemetry.Snapshot(0, {}), False))
    return point
