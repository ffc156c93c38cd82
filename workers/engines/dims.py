"""A model's dynamic non-batch dimensions, as the engine and the config together define them.

Runs in the worker process: engines call `model_dims` once at load (their tensor specs name dynamic
dimensions, orchestrator/common/shapes.py), and the pipeline uses the result to check, batch and pad requests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from orchestrator.common.config import DimSection
from orchestrator.common.errors import EngineError
from workers.engines.base import TensorSpec


@dataclass(frozen=True)
class DynamicDim:
    """One dynamic dimension: the sizes a request may carry, the sizes batches are padded to (none: only
    requests of equal size are batched together) and the value padded positions get, per input."""

    name: str
    lo: int
    hi: int
    buckets: tuple[int, ...] = ()
    pad: Mapping[str, float] = field(default_factory=dict)

    def launch_size(self, size: int) -> int:
        """The size a request of `size` is launched at: its bucket, or itself without buckets."""
        for b in self.buckets:
            if b >= size:
                return b
        return size


def model_dims(
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    ranges: Mapping[str, tuple[int, int | None]],
    config: Sequence[DimSection],
    *,
    need_buckets: bool,
    where: str = "model",
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], tuple[DynamicDim, ...]]:
    """Combine the model's dynamic dimensions (named in its specs; `ranges` holds the bounds the model
    declares, None for none) with [[model.dims]]. Returns the specs (outputs renamed where `follow` says)
    and the dimensions, or raises EngineError naming what to configure."""
    names: list[str] = []
    users: dict[str, list[str]] = {}
    for s in inputs:
        for d in s.item_shape:
            if isinstance(d, str):
                if d not in users:
                    names.append(d)
                    users[d] = []
                users[d].append(s.name)
    by_name = {c.name: c for c in config}
    for cd in config:
        if cd.name not in users:
            have = f"its dynamic dimensions are {names}" if names else "it has none besides the batch"
            raise EngineError(f"model.dims: {where} has no dynamic input dimension {cd.name!r} ({have})")
    out_specs = []
    for s in outputs:
        shape = list(s.item_shape)
        for cd in config:
            axis = cd.follow.get(s.name)
            if axis is None:
                continue
            if not 1 <= axis <= len(shape):
                raise EngineError(
                    f"model.dims[{cd.name!r}].follow: output {s.name!r} has no axis {axis} "
                    f"(its shape is [batch, {', '.join(map(str, shape))}])"
                )
            shape[axis - 1] = cd.name
        for axis, d in enumerate(shape, start=1):
            if isinstance(d, str) and d not in users:
                raise EngineError(
                    f"output {s.name!r} has dynamic dimension {d!r} at axis {axis}, which follows no "
                    f"input dimension ({names or 'none'}): name the one it follows in [[model.dims]] "
                    f"follow = {{{s.name} = {axis}}}, or export the model with that name"
                )
        out_specs.append(TensorSpec(s.name, s.dtype, tuple(shape)))
    dims = []
    for name in names:
        c = by_name.get(name)
        lo_model, hi_model = ranges.get(name, (1, None))
        lo = max(lo_model, c.min if c else 1)
        hi = (c.max if c and c.max else None) or hi_model
        if hi is None:
            raise EngineError(
                f"input {users[name][0]!r} has dynamic dimension {name!r} with no upper bound: declare "
                f'its range in the config ([[model.dims]] name = "{name}", max = ...)'
            )
        if hi_model is not None and hi > hi_model:
            raise EngineError(f"model.dims[{name!r}].max = {hi} exceeds the model's own bound {hi_model}")
        if lo > hi:
            raise EngineError(f"dimension {name!r}: its range {lo}..{hi} is empty")
        buckets = tuple(c.buckets) if c else ()
        if buckets and (buckets[0] < lo or buckets[-1] != hi):
            raise EngineError(
                f"model.dims[{name!r}].buckets {list(buckets)}: they must lie in {lo}..{hi} and end at {hi}"
            )
        if need_buckets and not buckets:
            raise EngineError(
                f"dimension {name!r} is dynamic and this engine runs fixed shapes (one CUDA graph per "
                f'batch and size bucket): give it buckets ([[model.dims]] name = "{name}", '
                f"buckets = [...] ending at {hi})"
            )
        pad = dict(c.pad) if c else {}
        for key in pad:
            if key not in users[name]:
                raise EngineError(
                    f"model.dims[{name!r}].pad: {key!r} is not an input with dimension {name!r} "
                    f"(those are {users[name]})"
                )
        dims.append(DynamicDim(name, lo, hi, buckets, pad))
    return tuple(inputs), tuple(out_specs), tuple(dims)


def largest(dims: Sequence[DynamicDim]) -> dict[str, int]:
    return {d.name: d.hi for d in dims}


def launch_keys(dims: Sequence[DynamicDim]) -> list[tuple[int, ...]]:
    """Every combination of bucket sizes (what a fixed-shape engine warms up and captures)."""
    return list(itertools.product(*(d.buckets or (d.hi,) for d in dims)))


def batch_view(arr: np.ndarray, rows: int, shape: tuple[int, ...]) -> np.ndarray:
    """The leading part of a slot array (sized for the largest dimensions) as a C-contiguous
    [rows, *shape] array: how a batch launched at smaller sizes lays its tensors out."""
    return arr.reshape(-1)[: rows * math.prod(shape)].reshape(rows, *shape)
