"""Device-agnostic batching pipeline: bounded request queue, coalescing, slots, in-order completion.

Runs on the worker's serving thread and owns no sockets (workers/worker.py adds those). Up to `depth`
batches are in flight; the pipeline waits only on the OLDEST one, and only when its results are needed or
its slot must be reused (deferred synchronisation). CPU and GPU engines go through this same code.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from orchestrator.common import shapes
from orchestrator.common.errors import BatchTooLargeError, InvalidInputError
from workers.engines.base import Engine, Slot
from workers.engines.dims import batch_view

SHM_DMA_MIN_BYTES = 64 << 10
_CHECKED_MAX = 4096  # distinct accepted request shapes remembered by Pipeline.check_specs


class ShmSpans:
    """Where a shared-memory request's tensors lie: arena offsets (already checked against its lease) of
    each input and output, in the engine's input and output order."""

    __slots__ = ("lease", "inputs", "outputs", "nbytes")

    def __init__(self, lease: Any, inputs: list[int], outputs: list[int], nbytes: int) -> None:
        self.lease = lease
        self.inputs = inputs
        self.outputs = outputs
        self.nbytes = nbytes  # payload bytes, inputs plus outputs


class Request:
    """One accepted client request. `tensors` are zero-copy views over the received frames; a shared-
    memory request has `shm` instead (its data stays in the arena until the engine reads it)."""

    __slots__ = (
        "identity",
        "request_id",
        "tensors",
        "rows",
        "t_recv_ns",
        "deadline_ns",
        "keep",
        "shm",
        "many",
        "dims",
        "key",
    )

    def __init__(
        self,
        identity: Any,
        request_id: int,
        tensors: dict[str, np.ndarray] | None,
        rows: int,
        t_recv_ns: int,
        deadline_ns: int = 0,
        keep: Any = None,
        shm: ShmSpans | None = None,
    ) -> None:
        self.identity = identity
        self.request_id = request_id
        self.tensors = tensors
        self.rows = rows
        self.t_recv_ns = t_recv_ns
        self.deadline_ns = deadline_ns  # 0 = none; time.monotonic_ns() clock
        self.keep = keep  # the received frames, kept alive until staging has copied them
        self.shm = shm
        self.many = False  # came in a multi-request message: its completion may be sent with others
        self.dims: tuple[int, ...] = ()  # sizes of the model's dynamic dimensions in this request
        self.key: tuple[int, ...] = ()  # the sizes it is launched at (its padding buckets): batches share one


class Batch:
    """A launched batch: which slot, which requests at which row offsets, and its timings."""

    __slots__ = (
        "slot",
        "parts",
        "rows",
        "padded",
        "t_launch_ns",
        "t_enqueued_ns",
        "t_done_ns",
        "probe0",
        "probe1",
    )

    def __init__(self, slot: Slot, parts: list[tuple[Request, int]], rows: int, padded: int) -> None:
        self.slot = slot
        self.parts = parts
        self.rows = rows
        self.padded = padded
        self.t_launch_ns = 0  # host clock when staging started
        self.t_enqueued_ns = 0  # host clock when engine.launch returned
        self.t_done_ns = 0  # host clock when completion was observed
        self.probe0: Any = None  # thread probe snapshots around engine.launch (monitor telemetry)
        self.probe1: Any = None


class Pipeline:
    """Queue -> coalesce -> stage into a free slot -> launch; complete in submission order."""

    def __init__(
        self,
        engine: Engine,
        depth: int,
        max_queue: int,
        max_queue_delay_us: int,
        buckets: tuple[int, ...],
        probe: Any = None,
        arena: Any = None,
    ) -> None:
        self.engine = engine
        self.depth = depth
        self.max_queue = max_queue
        self.delay_ns = max_queue_delay_us * 1000
        self.buckets = tuple(b for b in buckets if b <= engine.max_batch) or (engine.max_batch,)
        self.probe = probe  # object with snap(); see orchestrator monitor telemetry
        self.slots = engine.create_slots(depth)
        self.free: deque[Slot] = deque(self.slots)
        self.inflight: deque[Batch] = deque()
        self.queue: deque[Request] = deque()
        self.queued_rows = 0
        self.completed_batches = 0  # progress counter reported in heartbeats
        self.completed_requests = 0
        self._in_specs = {s.name: s for s in engine.inputs}
        self._out_specs = {s.name: s for s in engine.outputs}
        self.dims = engine.dims  # dynamic non-batch dimensions (workers/engines/dims.py); () for most models
        self.bound: tuple[int, ...] = ()  # their sizes in the request check_specs() last accepted
        self._dim_names = tuple(d.name for d in self.dims)
        self.item_shape = engine.item_shape_at  # a tensor's item shape at given dynamic sizes
        self._row_bytes: dict[tuple[int, ...], list[int]] = {}  # dims -> input_row_bytes
        self._checked: dict[tuple, tuple[int, tuple[int, ...]]] = {}  # accepted specs -> (rows, bound)
        self.arena = arena  # workers.arena.Arena, for synchronous engines' views of shared-memory requests
        # A shared-memory request smaller than this (inputs plus outputs) is staged by a CPU copy like a
        # frame request: copying a few KiB costs well under a microsecond, an async copy's driver call
        # several, and a batch whose rows are all staged runs as one graph launch (docs/design.md).
        self.dma_min_bytes = SHM_DMA_MIN_BYTES

    # --- admission ------------------------------------------------------------------------------

    def check(self, tensors: dict[str, np.ndarray]) -> int:
        """Validate a request's tensors against the engine; return its row count or raise RequestError."""
        return self.check_specs([(name, arr.dtype, arr.shape) for name, arr in tensors.items()])

    def check_specs(self, specs: list[tuple[str, np.dtype, tuple[int, ...]]]) -> int:
        """check() on (name, dtype, shape) triples, as a request header lists them. Clients send the same
        few shapes over and over: an accepted list is remembered with its rows and dynamic sizes, so a
        repeat costs one dict lookup (bounded: a client cannot grow it past _CHECKED_MAX)."""
        key = tuple(specs)
        hit = self._checked.get(key)
        if hit is not None:
            self.bound = hit[1]
            return hit[0]
        rows = self._check_specs(specs)
        if len(self._checked) < _CHECKED_MAX:
            self._checked[key] = (rows, self.bound)
        return rows

    def _check_specs(self, specs: list[tuple[str, np.dtype, tuple[int, ...]]]) -> int:
        names = {name for name, _, _ in specs}
        if len(names) != len(specs):
            raise InvalidInputError("a tensor is given twice")
        expected = set(self._in_specs)
        if names != expected:
            unknown = sorted(names - expected)
            missing = sorted(expected - names)
            parts = []
            if unknown:
                parts.append(f"unknown tensor(s) {unknown}")
            if missing:
                parts.append(f"missing tensor(s) {missing}")
            raise InvalidInputError(f"{'; '.join(parts)}; the model takes {sorted(expected)}")
        rows = -1
        for name, dtype, shape in specs:
            spec = self._in_specs[name]
            if dtype != spec.dtype:
                raise InvalidInputError(f"tensor {name!r}: dtype {dtype}, the model takes {spec.dtype}")
            item = spec.item_shape
            if len(shape) != len(item) + 1 or (tuple(shape[1:]) != item and not self._fits(item, shape)):
                raise InvalidInputError(
                    f"tensor {name!r}: shape {list(shape)}, the model takes {shapes.describe(item)}"
                )
            if rows == -1:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidInputError(
                    f"tensor {name!r}: batch {shape[0]} differs from the other inputs' {rows}"
                )
        if rows <= 0:
            raise InvalidInputError("empty batch: at least one row is needed")
        if rows > self.engine.max_batch:
            raise BatchTooLargeError(
                f"batch of {rows} rows exceeds the model's max batch {self.engine.max_batch}"
            )
        if self.dims:
            bound = shapes.bind(
                [(n, self._in_specs[n].item_shape) for n, _, _ in specs], {n: s for n, _, s in specs}
            )
            for d in self.dims:
                size = bound[d.name]
                if not d.lo <= size <= d.hi:
                    raise InvalidInputError(
                        f"dimension {d.name!r} is {size}; the model takes {d.lo} to {d.hi}"
                    )
            self.bound = tuple(bound[n] for n in self._dim_names)
        return rows

    @staticmethod
    def _fits(item: tuple[int | str, ...], shape: tuple[int, ...]) -> bool:
        """A shape matches an item shape with dynamic dimensions in its fixed entries (sizes come later)."""
        return all(d.__class__ is str or d == got for d, got in zip(item, shape[1:], strict=True))

    def key_of(self, dims: tuple[int, ...]) -> tuple[int, ...]:
        """The sizes a request with dynamic-dimension sizes `dims` is launched at."""
        return tuple(d.launch_size(v) for d, v in zip(self.dims, dims, strict=True))

    def input_row_bytes(self, dims: tuple[int, ...]) -> list[int]:
        """Bytes per row of each input at dynamic sizes `dims` (cached: a request's spans are checked with it)."""
        got = self._row_bytes.get(dims)
        if got is None:
            got = self._row_bytes[dims] = [
                math.prod(self.item_shape(s, dims)) * s.dtype.itemsize for s in self.engine.inputs
            ]
        return got

    def offer(self, req: Request) -> bool:
        """Queue a checked request; False when the bounded queue is full (reply OVERLOADED)."""
        if len(self.queue) >= self.max_queue:
            return False
        self.queue.append(req)
        self.queued_rows += req.rows
        return True

    # --- launching ------------------------------------------------------------------------------

    def should_launch(self, now_ns: int) -> bool:
        """Launch when a slot is free and either the device would idle, the batch is full, or the oldest
        request has waited `max_queue_delay_us` to be coalesced."""
        if not self.queue or not self.free:
            return False
        if not self.inflight or self.queued_rows >= self.engine.max_batch:
            return True
        return now_ns - self.queue[0].t_recv_ns >= self.delay_ns

    def hold_until_ns(self) -> int | None:
        """When a held (coalescing) batch must launch at the latest, or None if nothing is held."""
        if self.queue and self.free and self.inflight:
            return self.queue[0].t_recv_ns + self.delay_ns
        return None

    def launch_next(self, now_ns: int, on_expired: Callable[[Request], None]) -> Batch | None:
        """Coalesce queued requests (whole requests only) into a free slot and launch it.

        Frame requests, and shared-memory requests smaller than `dma_min_bytes`, are staged (copied) into
        the slot's first rows; larger shared-memory requests follow and are not copied here: the engine
        copies them between the arena and the device itself (slot.shm_parts). A synchronous engine stages
        every request, except a shared-memory request alone, which it computes from arena views."""
        if self.dims:
            return self._launch_dynamic(now_ns, on_expired)
        slot = self.free.popleft()
        picked: list[Request] = []
        rows = 0
        limit = self.engine.max_batch
        queue = self.queue
        while queue and rows + queue[0].rows <= limit:
            req = queue.popleft()
            self.queued_rows -= req.rows
            if req.deadline_ns and now_ns > req.deadline_ns:
                on_expired(req)
                continue
            picked.append(req)
            rows += req.rows
        if not picked:
            self.free.appendleft(slot)
            return None
        parts: list[tuple[Request, int]] = []
        dma: list[Request] = []
        staged: list[tuple[int, int, list[int], list[int]]] = []
        engine, arena = self.engine, self.arena
        if engine.synchronous and len(picked) == 1 and picked[0].shm is not None and engine.computes_views:
            return self._launch_direct(slot, picked[0], now_ns)
        off = 0
        for req in picked:
            shm = req.shm
            if shm is None:
                for name, arr in req.tensors.items():  # type: ignore[union-attr]
                    slot.inputs[name][off : off + req.rows] = arr
                req.tensors = None  # staged: drop the frame views
                req.keep = None
            elif engine.synchronous or shm.nbytes < self.dma_min_bytes:
                for s, o in zip(engine.inputs, shm.inputs, strict=True):
                    slot.inputs[s.name][off : off + req.rows] = arena.view(
                        o, s.dtype, (req.rows, *s.item_shape)
                    )
                staged.append((off, req.rows, shm.inputs, shm.outputs))
            else:
                dma.append(req)
                continue
            parts.append((req, off))
            off += req.rows
        padded = next(b for b in self.buckets if b >= rows) if engine.pads_to_buckets else rows
        return self._seal(slot, parts, off, staged, dma, rows, padded, now_ns)

    def _seal(
        self,
        slot: Slot,
        parts: list[tuple[Request, int]],
        off: int,
        staged: list[tuple[int, int, list[int], list[int]]],
        dma: list[Request],
        rows: int,
        padded: int,
        now_ns: int,
    ) -> Batch:
        """Both launch paths' end: the `off` staged rows first, then each DMA request's rows (slot.shm_parts),
        and the launch."""
        slot.frames_rows = off
        slot.staged_shm = staged
        slot.shm_parts = []
        for req in dma:
            parts.append((req, off))
            slot.shm_parts.append((off, req.rows, req.shm.inputs, req.shm.outputs))  # type: ignore[union-attr]
            off += req.rows
        batch = Batch(slot, parts, rows, padded)
        self._launch(batch, now_ns)
        return batch

    def _launch_dynamic(self, now_ns: int, on_expired: Callable[[Request], None]) -> Batch | None:
        """launch_next for a model with dynamic dimensions: the oldest request's launch sizes (its padding
        buckets) pick the batch; queued requests with the same launch sizes join it in arrival order, the
        others keep their place. Every request is staged (padded where it is smaller than the batch's
        sizes), except a lone shared-memory request on an engine that computes views at any size, and a
        shared-memory request whose sizes are the batch's own on an asynchronous engine: that one goes by
        DMA between its spans and its device rows (slot.shm_parts), like a request of a static model."""
        queue, limit = self.queue, self.engine.max_batch
        while queue and queue[0].deadline_ns and now_ns > queue[0].deadline_ns:
            req = queue.popleft()
            self.queued_rows -= req.rows
            on_expired(req)
        if not queue:
            return None
        slot = self.free.popleft()
        key = queue[0].key
        picked: list[Request] = []
        rest: list[Request] = []
        rows = 0
        for req in queue:
            if req.key != key or rows + req.rows > limit:
                rest.append(req)
            elif req.deadline_ns and now_ns > req.deadline_ns:
                self.queued_rows -= req.rows
                on_expired(req)
            else:
                picked.append(req)
                rows += req.rows
                self.queued_rows -= req.rows
        queue.clear()
        queue.extend(rest)
        engine = self.engine
        one = picked[0]
        if (
            engine.synchronous
            and engine.computes_views
            and len(picked) == 1
            and one.shm is not None
            and one.dims == key
        ):
            return self._launch_direct(slot, one, now_ns)
        padded = next(b for b in self.buckets if b >= rows) if engine.pads_to_buckets else rows
        slot.dims = key
        ins = {
            s.name: batch_view(slot.inputs[s.name], padded, self.item_shape(s, key)) for s in engine.inputs
        }
        parts: list[tuple[Request, int]] = []
        staged: list[tuple[int, int, list[int], list[int]]] = []
        staged_dims: list[tuple[int, ...]] = []
        dma: list[Request] = []
        off = 0
        for req in picked:
            n, shm = req.rows, req.shm
            if (
                shm is not None
                and req.dims == key
                and not engine.synchronous
                and shm.nbytes >= self.dma_min_bytes
            ):
                dma.append(req)
                continue
            for s in engine.inputs:
                dst = ins[s.name][off : off + n]
                if req.dims != key:  # pad: the whole block, then the request's own part over it
                    dst[...] = self._pad_value(s.name)
                    dst = dst[(slice(None), *(slice(0, v) for v in self.item_shape(s, req.dims)))]
                if shm is None:
                    dst[...] = req.tensors[s.name]  # type: ignore[index]
                else:
                    i = engine.inputs.index(s)
                    dst[...] = self.arena.view(shm.inputs[i], s.dtype, (n, *self.item_shape(s, req.dims)))
            if shm is None:
                req.tensors = None
                req.keep = None
            else:
                staged.append((off, n, shm.inputs, shm.outputs))
                staged_dims.append(req.dims)
            parts.append((req, off))
            off += n
        slot.staged_dims = staged_dims
        return self._seal(slot, parts, off, staged, dma, rows, padded, now_ns)

    def _pad_value(self, tensor: str) -> float:
        """What padded positions of an input hold: its value in [[model.dims]] pad (0 by default). With
        several dynamic dimensions, the first that names the input decides."""
        for d in self.dims:
            if tensor in d.pad:
                return d.pad[tensor]
        return 0

    def output_view(self, batch: Batch, name: str, off: int, req: Request) -> np.ndarray:
        """One request's part of an output of a finished batch: its rows, cut back to its own sizes of the
        dynamic dimensions (a view; not contiguous where the batch was padded)."""
        return self._cut(batch.slot, batch.padded, name, off, req.rows, req.dims)

    def _cut(
        self, slot: Slot, padded: int, name: str, off: int, rows: int, dims: tuple[int, ...]
    ) -> np.ndarray:
        spec = self._out_specs[name]
        key = slot.dims
        part = batch_view(slot.outputs[name], padded, self.item_shape(spec, key))[off : off + rows]
        if dims != key:
            part = part[(slice(None), *(slice(0, v) for v in self.item_shape(spec, dims)))]
        return part

    def _launch(self, batch: Batch, now_ns: int, direct: Request | None = None) -> None:
        slot = batch.slot
        batch.t_launch_ns = now_ns
        probe = self.probe
        if probe is not None:
            batch.probe0 = probe.snap()
        slot.rows = batch.padded
        if direct is None:
            self.engine.launch(slot, batch.padded)
        else:
            self.engine.compute_views(*self._views(direct))
        batch.t_enqueued_ns = time.monotonic_ns()
        if probe is not None:
            batch.probe1 = probe.snap()
        self.inflight.append(batch)

    def _launch_direct(self, slot: Slot, req: Request, now_ns: int) -> Batch:
        """A synchronous (CPU) engine and one shared-memory request alone: computed straight from its input
        views into its output views, with no copy at all."""
        slot.dims = req.dims
        slot.frames_rows = 0
        slot.staged_shm = []
        slot.shm_parts = []
        batch = Batch(slot, [(req, 0)], req.rows, req.rows)
        self._launch(batch, now_ns, direct=req)
        return batch

    def _views(self, req: Request) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        engine, arena, shm, n, dims = self.engine, self.arena, req.shm, req.rows, req.dims
        assert shm is not None
        ins = {
            s.name: arena.view(o, s.dtype, (n, *self.item_shape(s, dims)))
            for s, o in zip(engine.inputs, shm.inputs, strict=True)
        }
        outs = {
            s.name: arena.view(o, s.dtype, (n, *self.item_shape(s, dims)))
            for s, o in zip(engine.outputs, shm.outputs, strict=True)
        }
        return ins, outs

    def _write_shm_outputs(self, batch: Batch) -> None:
        """After a batch with staged shared-memory requests: copy their output rows into their spans."""
        engine, arena, slot = self.engine, self.arena, batch.slot
        if self.dims:
            for (row, n, _, out_offs), dims in zip(slot.staged_shm, slot.staged_dims, strict=True):
                for s, o in zip(engine.outputs, out_offs, strict=True):
                    arena.view(o, s.dtype, (n, *self.item_shape(s, dims)))[...] = self._cut(
                        slot, batch.padded, s.name, row, n, dims
                    )
            return
        for row, n, _, out_offs in slot.staged_shm:
            for s, o in zip(engine.outputs, out_offs, strict=True):
                arena.view(o, s.dtype, (n, *s.item_shape))[...] = slot.outputs[s.name][row : row + n]

    # --- completion -----------------------------------------------------------------------------

    def oldest_done(self) -> bool:
        return bool(self.inflight) and self.engine.done(self.inflight[0].slot)

    def wait_oldest(self) -> None:
        """Deferred sync: block (GIL released) on the oldest in-flight batch only."""
        self.engine.wait(self.inflight[0].slot)

    def complete_oldest(self, on_complete: Callable[[Batch], None]) -> Batch:
        """Hand the oldest (finished) batch to `on_complete`, which must copy its outputs out of the slot
        before returning; then the slot is free for reuse."""
        batch = self.inflight.popleft()
        batch.t_done_ns = time.monotonic_ns()
        if batch.slot.staged_shm:
            self._write_shm_outputs(batch)
        on_complete(batch)
        self.free.append(batch.slot)
        self.completed_batches += 1
        self.completed_requests += len(batch.parts)
        return batch

    def drain_queue(self) -> list[Request]:
        """Remove and return every queued (not yet launched) request, e.g. on shutdown."""
        out = list(self.queue)
        self.queue.clear()
        self.queued_rows = 0
        return out

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.inflight)
