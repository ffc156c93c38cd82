"""The model as a client learns it (inputs, outputs, dynamic dimensions, max batch) and the requests a
benchmark sends: random arrays shaped from the model's input specs, or chunks of a user's .npz file.

Runs in the CLI process; the arrays built here are handed to the client processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.common import shapes

#: Distinct requests per sweep at most, and the bytes they (and their references) may take.
MAX_DISTINCT = 16
MAX_POOL_BYTES = 256 << 20
#: Random integer inputs are drawn from [0, INT_HIGH): valid token ids and class indices for any real
#: vocabulary; inputs whose name contains "mask" are all ones.
INT_HIGH = 100


class InputError(ValueError):
    """The requests cannot be built as asked (a bad --dim, --rows or --inputs file): a usage error."""


@dataclass(frozen=True)
class Dim:
    name: str
    lo: int
    hi: int
    buckets: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """What `Client` learns at discovery, from the first ready worker."""

    inputs: tuple[tuple[str, np.dtype, tuple[int | str, ...]], ...]
    outputs: tuple[tuple[str, np.dtype, tuple[int | str, ...]], ...]
    max_batch: int
    dims: tuple[Dim, ...] = field(default=())

    @classmethod
    def from_client(cls, client: Any) -> ModelSpec:
        ready = [w for w in client.workers if w["state"] == "ready"]
        w = ready[0] if ready else client.workers[0]

        def specs(items: Any) -> tuple[tuple[str, np.dtype, tuple[int | str, ...]], ...]:
            return tuple((str(n), np.dtype(dt), tuple(shape)) for n, dt, shape in items)

        dims = tuple(
            Dim(str(d[0]), int(d[1]), int(d[2]), tuple(int(b) for b in (d[3] if len(d) > 3 else ())))
            for d in w.get("dims") or ()
        )
        return cls(specs(w["inputs"]), specs(w["outputs"]), int(client.max_batch), dims)

    def describe(self, dims: Mapping[str, int]) -> dict[str, Any]:
        """JSON: each tensor as name, dtype and shape (batch first), the dimension sizes used."""

        def one(items: Any) -> list[dict[str, Any]]:
            return [{"name": n, "dtype": dt.name, "shape": ["batch", *shape]} for n, dt, shape in items]

        return {
            "inputs": one(self.inputs),
            "outputs": one(self.outputs),
            "max_batch": self.max_batch,
            "dims": dict(dims),
        }


def parse_dims(items: list[str]) -> dict[str, int]:
    """`--dim seq=128` (repeatable) -> {"seq": 128}."""
    out: dict[str, int] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f'--dim: expected NAME=SIZE with a positive size, got "{item}"')
        out[name.strip()] = int(value)
    return out


def resolve_dims(spec: ModelSpec, given: Mapping[str, int]) -> dict[str, int]:
    """The size of every dynamic dimension: as given (checked against its range), else its largest size."""
    known = {d.name: d for d in spec.dims}
    named = {d for _, _, shape in spec.inputs for d in shape if isinstance(d, str)}
    for name in given:
        if name not in known and name not in named:
            have = ", ".join(sorted(known) or sorted(named)) or "none"
            raise InputError(f"--dim {name}: the model has no dynamic dimension {name!r} (it has: {have})")
    out: dict[str, int] = {}
    for name in sorted(named | set(known)):
        d = known.get(name)
        size = given.get(name, d.hi if d is not None else 0)
        if d is None and name not in given:
            raise InputError(
                f"dimension {name!r} has no range the client knows of: give it with --dim {name}=N"
            )
        if d is not None and not d.lo <= size <= d.hi:
            raise InputError(f"--dim {name}={size}: outside the model's range {d.lo}..{d.hi}")
        out[name] = size
    return out


def request_bytes(spec: ModelSpec, rows: int, dims: Mapping[str, int], outputs: bool = True) -> int:
    """Bytes of one request's inputs (and outputs) at `rows` rows and these dimension sizes."""
    items = [*spec.inputs, *(spec.outputs if outputs else ())]
    total = 0
    for _, dt, shape in items:
        try:
            total += rows * math.prod(shapes.resolve(shape, dims)) * dt.itemsize
        except KeyError:  # an output dimension no input binds: unknown before the reply
            continue
    return total


def random_inputs(
    spec: ModelSpec, rows: int, dims: Mapping[str, int], seed: int = 0, count: int | None = None
) -> list[dict[str, np.ndarray]]:
    """`count` distinct requests (default: as many as fit MAX_POOL_BYTES, at most MAX_DISTINCT) of random
    arrays: floats standard normal, integers uniform in [0, INT_HIGH) (ones where the name says mask),
    booleans random."""
    if count is None:
        per = max(1, request_bytes(spec, rows, dims))
        count = max(1, min(MAX_DISTINCT, MAX_POOL_BYTES // (2 * per)))
    rng = np.random.default_rng(seed)
    pool: list[dict[str, np.ndarray]] = []
    for _ in range(count):
        req: dict[str, np.ndarray] = {}
        for name, dt, shape in spec.inputs:
            full = (rows, *shapes.resolve(shape, dims))
            if dt.kind == "f":
                req[name] = rng.standard_normal(full).astype(dt)
            elif dt.kind == "b":
                req[name] = rng.integers(0, 2, full).astype(dt)
            elif dt.kind in "iu":
                if "mask" in name.lower():
                    req[name] = np.ones(full, dt)
                else:
                    req[name] = rng.integers(0, min(INT_HIGH, np.iinfo(dt).max), full).astype(dt)
            else:
                raise InputError(
                    f"input {name!r} has dtype {dt}, which random inputs cannot fill: use --inputs"
                )
        pool.append(req)
    return pool


def npz_inputs(path: Path, spec: ModelSpec, rows: int) -> list[dict[str, np.ndarray]]:
    """Requests cut from a .npz of the model's inputs (one array per input, named as in the model; a
    one-input model takes any single array): consecutive chunks of `rows` rows, at most MAX_DISTINCT."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"--inputs {path}: cannot read it as a .npz file: {exc}") from None
    names = [n for n, _, _ in spec.inputs]
    if len(names) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"--inputs {path}: no array for input(s) {missing} (it has {sorted(arrays)})")
    lengths = set()
    out: dict[str, np.ndarray] = {}
    for name, dt, shape in spec.inputs:
        a = arrays[name]
        if a.ndim != len(shape) + 1:
            raise InputError(
                f"--inputs {path}: {name!r} has shape {list(a.shape)}, the model takes {shapes.describe(shape)}"
            )
        for axis, d in enumerate(shape, start=1):
            if isinstance(d, int) and a.shape[axis] != d:
                raise InputError(
                    f"--inputs {path}: {name!r} has shape {list(a.shape)}, the model takes {shapes.describe(shape)}"
                )
        if a.dtype != dt:
            if not np.can_cast(a.dtype, dt, "same_kind"):
                raise InputError(f"--inputs {path}: {name!r} is {a.dtype}, the model takes {dt}")
            a = a.astype(dt)
        lengths.add(a.shape[0])
        out[name] = a
    if len(lengths) != 1:
        raise InputError(f"--inputs {path}: the arrays have different numbers of rows {sorted(lengths)}")
    n = lengths.pop()
    if n < rows:
        raise InputError(f"--inputs {path}: {n} row(s), fewer than --rows {rows}")
    chunks = min(MAX_DISTINCT, n // rows)
    return [
        {k: np.ascontiguousarray(v[i * rows : (i + 1) * rows]) for k, v in out.items()} for i in range(chunks)
    ]


def dims_of(spec: ModelSpec, request: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The dimension sizes a request carries (for --inputs, whose arrays set them)."""
    return shapes.bind([(n, shape) for n, _, shape in spec.inputs], {n: a.shape for n, a in request.items()})
