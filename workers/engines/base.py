"""The one small interface every engine implements, and the per-batch Slot it fills.

Runs in a worker process, on the worker's serving thread. The pipeline (workers/pipeline.py) only ever
talks to this interface, so CPU and GPU engines share one code path; only the runtime layer differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator.common.shapes import resolve


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor. `item_shape` excludes the leading batch dimension; its entries are
    sizes, or the names of dynamic dimensions (orchestrator/common/shapes.py)."""

    name: str
    dtype: np.dtype
    item_shape: tuple[int | str, ...]

    def to_wire(self) -> list:
        return [self.name, self.dtype.str, list(self.item_shape)]


@dataclass(eq=False)
class Slot:
    """Everything one in-flight batch needs, allocated once at start-up.

    `inputs`/`outputs` are host arrays of shape (max_batch, *item_shape): pinned memory on a GPU, plain
    memory on the CPU. Engines subclass Slot (or use `extra`) for their device buffers, streams, events,
    execution contexts and graphs.
    """

    index: int
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    rows: int = 0  # rows of the batch currently launched, after padding
    # Sizes of the engine's dynamic dimensions (Engine.dims order) the batch was launched with: () for a
    # model without any. The slot's arrays are sized for the largest; a batch uses their leading part.
    dims: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # The batch's layout: rows [0, frames_rows) were staged into `inputs`; each DMA shared-memory request
    # follows as (first row, rows, input arena offsets, output arena offsets), in engine tensor order.
    # Staged shared-memory requests (among the first frames_rows rows) are listed in staged_shm in the same
    # form: their outputs are copied back into the arena when the batch completes.
    frames_rows: int = 0
    shm_parts: list[tuple[int, int, list[int], list[int]]] = field(default_factory=list)
    staged_shm: list[tuple[int, int, list[int], list[int]]] = field(default_factory=list)
    staged_dims: list[tuple[int, ...]] = field(default_factory=list)  # each staged_shm request's own sizes


class Engine(ABC):
    """A loaded model plus the runtime that executes it. All methods run on the serving thread.

    Life cycle: __init__ (load) -> create_slots(depth) -> warmup(slots) -> READY ->
    launch/done/wait per batch -> close(). After READY an engine must not allocate memory, load modules or
    instantiate graphs (GPU engines record any such call as a fault).
    """

    kind: str = "base"
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_batch: int = 1
    #: True when launches must use one of the warmed-up bucket sizes (CUDA graphs, fixed-shape plans);
    #: the pipeline then pads each batch up to its bucket.
    pads_to_buckets: bool = False
    #: True when launch() computes the batch before returning (CPU engines): nothing overlaps it, so the
    #: serving loop drains its socket first to coalesce; asynchronous (GPU) engines are fed first instead.
    synchronous: bool = False
    #: Synchronous engines that can compute straight from input views into output views (a lone shared-
    #: memory request then needs no copy at all): they implement compute_views.
    computes_views: bool = False
    #: The model's dynamic non-batch dimensions (workers/engines/dims.py), in a fixed order.
    dims: tuple[Any, ...] = ()

    @abstractmethod
    def create_slots(self, depth: int) -> list[Slot]:
        """Allocate `depth` slots with every buffer a batch needs."""

    def warmup(self, slots: list[Slot], buckets: tuple[int, ...]) -> None:  # noqa: B027 - optional hook
        """Run every code path once (every bucket on every slot when graphs are on). Default: nothing."""

    @abstractmethod
    def launch(self, slot: Slot, rows: int) -> None:
        """Start the batch staged in `slot.inputs[:rows]`; results land in `slot.outputs[:rows]` (with
        dynamic dimensions, in the leading part of each array shaped for `slot.dims`: dims.batch_view).

        GPU engines only enqueue (H2D, kernels or graph, D2H, event record) and return at once; CPU
        engines may compute synchronously.
        """

    def item_shape_at(self, spec: TensorSpec, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """A tensor's concrete item shape at these sizes of the dynamic dimensions (self.dims order); cached,
        since the pipeline asks per request."""
        cache: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = self.__dict__.setdefault(
            "_item_shapes", {}
        )
        key = (spec.name, sizes)
        shape = cache.get(key)
        if shape is None:
            shape = cache[key] = resolve(
                spec.item_shape, {d.name: v for d, v in zip(self.dims, sizes, strict=True)}
            )
        return shape

    def compute_views(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Synchronous engines with `computes_views`: compute one batch from `inputs` into `outputs`."""
        raise NotImplementedError

    def attach_arena(self, addr: int, nbytes: int) -> bool:
        """The worker's shared-memory arena, before warm-up. GPU engines register it as pinned host memory
        (so copies from and to it are true DMA) and capture compute-only graphs. Returns whether it was
        registered with the device (False on CPU engines, which read it as plain memory)."""
        return False

    @abstractmethod
    def done(self, slot: Slot) -> bool:
        """Non-blocking: has the batch in `slot` finished?"""

    @abstractmethod
    def wait(self, slot: Slot) -> None:
        """Block until the batch in `slot` has finished (releasing the GIL while waiting)."""

    def gpu_time_us(self, slot: Slot) -> float | None:
        """Device time of the last finished batch in `slot`, from events; None where not measured."""
        return None

    def gpu_span_ns(self, slot: Slot) -> tuple[int, int] | None:
        """(start, stop) of the slot's last finished batch on the device, on the host's monotonic clock;
        called once per completed batch, so overlapping batches can be merged into true GPU-busy time."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts for the READY message and `status` (device name, module loading mode, faults...)."""
        return {"kind": self.kind}

    def faults(self) -> int:
        """Driver-lock operations (allocation, module load, graph instantiation) seen after READY."""
        return 0

    def mark_ready(self) -> None:  # noqa: B027 - optional hook
        """Called once warm-up is over; from now on allocations are faults."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything. Called once, at worker exit."""
