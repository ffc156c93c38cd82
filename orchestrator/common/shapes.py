"""Dynamic (non-batch) dimensions: a tensor's item shape names them, a request's shapes bind them.

Shared by the worker (admission, batching, padding: workers/pipeline.py) and the client (laying out a
shared-memory request's outputs: orchestrator/client/core.py). An item shape is a tuple whose entries are
sizes (int) or the names of dynamic dimensions (str), e.g. `("seq", 128)` for BERT's last hidden state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from orchestrator.common.errors import InvalidInputError

ItemShape = tuple[int | str, ...]


def is_dynamic(shape: Iterable[int | str]) -> bool:
    return any(d.__class__ is str for d in shape)


def resolve(shape: Iterable[int | str], dims: Mapping[str, int]) -> tuple[int, ...]:
    """The concrete item shape for bound dimension sizes."""
    return tuple(dims[d] if d.__class__ is str else d for d in shape)  # type: ignore[index,misc]


def row_bytes(shape: Iterable[int | str], dims: Mapping[str, int], itemsize: int) -> int:
    return math.prod(resolve(shape, dims)) * itemsize


def bind(specs: Sequence[tuple[str, ItemShape]], given: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The size of each dynamic dimension in a request: `given` maps input names to full shapes (batch
    first, rank already checked). A dimension must have one size in every input that has it."""
    dims: dict[str, int] = {}
    first: dict[str, str] = {}
    for name, shape in specs:
        full = given[name]
        for axis, d in enumerate(shape, start=1):
            if d.__class__ is not str:
                continue
            size = full[axis]
            seen = dims.get(d)  # type: ignore[call-overload]
            if seen is None:
                dims[d] = size  # type: ignore[index]
                first[d] = name  # type: ignore[index]
            elif seen != size:
                raise InvalidInputError(
                    f"dimension {d!r} is {size} in tensor {name!r} but {seen} in tensor "
                    f"{first[d]!r}: one request has one size per dimension"
                )  # type: ignore[index]
    return dims


def describe(shape: Iterable[int | str]) -> str:
    """`[batch, seq, 128]`: an item shape as error messages show it."""
    return "[batch" + "".join(f", {d}" for d in shape) + "]"
