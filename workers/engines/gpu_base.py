"""Shared machinery of the GPU engines: slots with pinned/device buffers, a stream and events; H2D ->
compute -> D2H enqueue; completion by event; one CUDA graph per (slot, bucket).

Runs in a GPU worker process on its serving thread. Subclasses (synthetic_gpu, tensorrt_engine) supply
only the compute step. The CUDA layer arrives as a runtime object (workers.cuda.runtime.CudaRuntime by
default) so unit tests can substitute a CPU stand-in.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator.common.config import Config
from orchestrator.common.errors import EngineError
from orchestrator.common.protocol import shm_layout
from workers import cupti_journal
from workers.driver_journal import JOURNAL
from workers.engines.base import Engine, Slot, TensorSpec

log = logging.getLogger(__name__)

# Batch spans are read relative to an anchor event, re-recorded this often: cuEventElapsedTime returns
# float milliseconds, whose resolution decays with distance from the reference (12 ns at 200 ms).
_REANCHOR_NS = 200_000_000
_BYTE = np.dtype(np.uint8)


@dataclass(eq=False)
class GpuSlot(Slot):
    """A Slot plus its CUDA resources. `h2d`/`d2h` hold (dst, src, bytes per row) for each tensor, and
    `in_dev`/`out_dev` (device pointer, bytes per row): the copy plan at the model's own sizes. `copies`
    holds one plan per launch size of the dynamic dimensions ((): the model's own), built with the slot."""

    stream: Any = None
    ev_start: Any = None  # timing event, recorded before the H2D copies
    ev_stop: Any = None  # timing event recorded after the D2H copies; blocking-sync in "blocking" mode
    ev_done: Any = None  # the completion event waited on: the same event as ev_stop (one record per batch)
    buffers: list[Any] = field(default_factory=list)  # every pinned/device buffer, for close()
    device: dict[str, Any] = field(default_factory=dict)  # tensor name -> DeviceBuffer
    h2d: list[tuple[Any, int, int]] = field(default_factory=list)
    d2h: list[tuple[int, Any, int]] = field(default_factory=list)
    # bucket rows (and, with dynamic dimensions, their sizes: (rows, dims)) -> GraphExec (H2D, compute, D2H)
    graphs: dict[Any, Any] = field(default_factory=dict)
    compute_graphs: dict[Any, Any] = field(default_factory=dict)  # the same keys -> GraphExec (compute only)
    in_dev: list[tuple[int, int]] = field(default_factory=list)  # (device pointer, bytes per row) per input
    out_dev: list[tuple[int, int]] = field(default_factory=list)  # the same per output
    anchor: int = 0  # which of the engine's anchor events this slot's last batch is timed against
    copies: dict[tuple[int, ...], tuple[list, list, list, list]] = field(default_factory=dict)


def default_runtime() -> Any:
    """The real CUDA layer, imported only when a GPU engine is built without a stand-in."""
    from workers.cuda.runtime import CudaRuntime

    return CudaRuntime()


class GpuEngineBase(Engine):
    """Everything a GPU engine does except the compute step (`_compute`) and loading (`__init__`)."""

    kind = "gpu"

    def __init__(self, cfg: Config, rt: Any = None) -> None:
        self.cfg = cfg
        self.rt = rt if rt is not None else default_runtime()
        self.sync = cfg.pipeline.sync
        # Context scheduling matches the sync mode: SPIN makes cuEventSynchronize on a plain event busy-
        # wait inside the driver with the GIL released (trtexec's spin wait); BLOCKING_SYNC sleeps.
        self.ctx = self.rt.context("spin" if self.sync == "spin" else "blocking")
        self.want_graphs = cfg.pipeline.cuda_graphs
        self.pads_to_buckets = self.want_graphs
        self.graphs_captured = 0
        self.graph_failures = 0
        self.slots: list[GpuSlot] = []
        self._closed = False
        self._anchors: list[Any] = []  # two timing events, alternately re-recorded (see launch)
        self._anchor = -1
        self._anchor_ns = [0, 0]  # host monotonic time at which each anchor was recorded
        self._anchor_users = [0, 0]  # launched batches timed against each anchor, not yet read
        self._tls = threading.local()  # which threads have the CUDA context bound
        self._tls.bound = True  # the constructing thread: context() made it current
        self.arena_addr = 0  # the shared-memory arena, registered as pinned host memory (attach_arena)
        self.arena_size = 0
        self._faults_base = 0  # the journal's fault count at this engine's READY
        self._arena_reg: Any = None

    # --- subclass hooks --------------------------------------------------------------------------

    def _compute(self, slot: GpuSlot, rows: int) -> Any:
        """Enqueue the model on slot.stream for `rows` rows (device buffers already hold the input).
        May return False to signal an enqueue failure during graph capture."""
        raise NotImplementedError

    def _alloc_rows(self) -> int:
        """Rows each slot buffer holds (the engine may compute more rows than it accepts)."""
        return self.max_batch

    def _init_slot(self, slot: GpuSlot) -> None:
        """Per-slot setup after the buffers exist (kernel args, execution contexts...)."""

    def _launch_keys(self) -> list[tuple[int, ...]]:
        """The sizes of the dynamic dimensions each bucket is warmed up (and captured) at: [()] without."""
        return [()]

    def _row_bytes(self, dims: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """Bytes per row of each input and output at dynamic sizes `dims` (engines with dims override)."""
        raise NotImplementedError

    @staticmethod
    def _graph_key(slot: GpuSlot, rows: int) -> Any:
        """Graphs are keyed by rows, and by (rows, dims) for a model with dynamic dimensions."""
        return (rows, slot.dims) if slot.dims else rows

    # --- slots --------------------------------------------------------------------------------------

    def _alloc_tensor(self, slot: GpuSlot, spec: TensorSpec, rows: int) -> tuple[np.ndarray, Any, int]:
        row_bytes = (
            int(np.prod([int(d) for d in spec.item_shape], dtype=np.int64)) * spec.dtype.itemsize
        )  # static
        nbytes = max(row_bytes * rows, 1)
        detail = f"slot {slot.index} {spec.name} {nbytes} B"
        host = self.rt.PinnedBuffer(nbytes, detail)
        dev = self.rt.DeviceBuffer(nbytes, detail)
        slot.buffers += [host, dev]
        slot.device[spec.name] = dev
        return host.view(spec.dtype, (rows, *spec.item_shape)), dev, row_bytes

    def create_slots(self, depth: int) -> list[Slot]:
        rows = self._alloc_rows()
        blocking = self.sync == "blocking"
        for i in range(depth):
            slot = GpuSlot(index=i, inputs={}, outputs={})
            slot.stream = self.rt.Stream(non_blocking=True)
            slot.ev_start = self.rt.Event(timing=True)
            # One event ends the batch for both timing and completion: a separate completion event cost
            # another cuEventRecord (about 1.5 us of serving-thread time per batch on an H200).
            slot.ev_stop = self.rt.Event(timing=True, blocking_sync=blocking)
            slot.ev_done = slot.ev_stop
            for spec in self.inputs:
                arr, dev, row_bytes = self._alloc_tensor(slot, spec, rows)
                slot.inputs[spec.name] = arr
                slot.h2d.append((dev.handle, arr.ctypes.data, row_bytes))
                slot.in_dev.append((dev.ptr, row_bytes))
            for spec in self.outputs:
                arr, dev, row_bytes = self._alloc_tensor(slot, spec, rows)
                slot.outputs[spec.name] = arr
                slot.d2h.append((arr.ctypes.data, dev.handle, row_bytes))
                slot.out_dev.append((dev.ptr, row_bytes))
            for dims in self._launch_keys():
                slot.copies[dims] = self._copy_plan(slot, dims)
            self._init_slot(slot)
            self.slots.append(slot)
        self._anchors = [self.rt.Event(timing=True), self.rt.Event(timing=True)]
        log.info("[ready] %s: %d slot(s) of %d rows allocated", self.kind, depth, rows)
        return list(self.slots)

    # --- per batch (hot path: no allocation, no sync) ------------------------------------------

    def _copy_plan(self, slot: GpuSlot, dims: tuple[int, ...]) -> tuple[list, list, list, list]:
        """(h2d, d2h, in_dev, out_dev) for a batch at dynamic sizes `dims`: the same buffers, with the bytes
        per row at those sizes (a batch at smaller sizes uses each buffer's leading part)."""
        if not dims:
            return slot.h2d, slot.d2h, slot.in_dev, slot.out_dev
        rb_in, rb_out = self._row_bytes(dims)
        return (
            [(d, s, rb) for (d, s, _), rb in zip(slot.h2d, rb_in, strict=True)],
            [(d, s, rb) for (d, s, _), rb in zip(slot.d2h, rb_out, strict=True)],
            [(p, rb) for (p, _), rb in zip(slot.in_dev, rb_in, strict=True)],
            [(p, rb) for (p, _), rb in zip(slot.out_dev, rb_out, strict=True)],
        )

    def _enqueue_eager(self, slot: GpuSlot, rows: int) -> Any:
        h2d, d2h, _, _ = slot.copies[slot.dims]
        handle = slot.stream.handle
        htod = self.rt.copy_htod_async
        for dst, src, row_bytes in h2d:
            htod(dst, src, rows * row_bytes, handle)
        ok = self._compute(slot, rows)
        dtoh = self.rt.copy_dtoh_async
        for dst, src, row_bytes in d2h:
            dtoh(dst, src, rows * row_bytes, handle)
        return ok

    def _anchor_for(self, slot: GpuSlot, now: int) -> None:
        """Pick the anchor this batch is timed against, re-recording the idle one when the current is old.
        The anchor goes on this slot's stream, which is idle (its last batch finished before the slot was
        freed), so the event fires at about `now` on the host clock."""
        a = self._anchor
        if a < 0 or (now - self._anchor_ns[a] > _REANCHOR_NS and self._anchor_users[1 - a] == 0):
            a = self._anchor = 0 if a < 0 else 1 - a
            self._anchors[a].record(slot.stream)
            self._anchor_ns[a] = now
        slot.anchor = a
        self._anchor_users[a] += 1

    def _enqueue_shm(self, slot: GpuSlot, rows: int) -> None:
        """A batch with shared-memory requests: staged frame rows (if any) and each request's spans go
        straight between the registered arena and the device rows, around the compute-only graph. No
        payload byte is touched by the CPU. With dynamic dimensions, every DMA request has the batch's
        sizes: its rows lie at those sizes in the device buffers as in its spans."""
        h2d, d2h, in_dev, out_dev = slot.copies[slot.dims]
        handle = slot.stream.handle
        htod, dtoh = self.rt.copy_htod_async, self.rt.copy_dtoh_async
        base = self.arena_addr
        frames = slot.frames_rows
        if frames:
            for dst, src, row_bytes in h2d:
                htod(dst, src, frames * row_bytes, handle)
        for row, n, ins, _ in slot.shm_parts:
            for (dev, row_bytes), off in zip(in_dev, ins, strict=True):
                htod(dev + row * row_bytes, base + off, n * row_bytes, handle)
        graph = slot.compute_graphs.get((rows, slot.dims) if slot.dims else rows)
        if graph is not None:
            graph.launch(slot.stream)
        else:
            self._compute(slot, rows)
        if frames:
            for dst, src, row_bytes in d2h:
                dtoh(dst, src, frames * row_bytes, handle)
        for row, n, _, outs in slot.shm_parts:
            for (dev, row_bytes), off in zip(out_dev, outs, strict=True):
                dtoh(base + off, dev + row * row_bytes, n * row_bytes, handle)

    def launch(self, slot: Slot, rows: int) -> None:
        assert isinstance(slot, GpuSlot)
        stream = slot.stream
        self._anchor_for(slot, time.monotonic_ns())
        slot.ev_start.record(stream)
        if slot.shm_parts:
            self._enqueue_shm(slot, rows)
        else:
            graph = slot.graphs.get((rows, slot.dims) if slot.dims else rows)
            if graph is not None:
                graph.launch(stream)
            else:  # graphs off, or this bucket's capture failed
                self._enqueue_eager(slot, rows)
        slot.ev_stop.record(stream)

    def attach_arena(self, addr: int, nbytes: int) -> bool:
        self._arena_reg = self.rt.HostRegistration(addr, nbytes, f"shared-memory arena {nbytes >> 20} MiB")
        self.arena_addr = addr
        self.arena_size = nbytes
        return True

    def done(self, slot: Slot) -> bool:
        return slot.ev_done.query()  # type: ignore[attr-defined]

    def wait(self, slot: Slot) -> None:
        # Both modes wait in cuEventSynchronize, which releases the GIL: in "spin" mode the event has no
        # blocking-sync flag and the context is SCHED_SPIN, so the driver busy-waits (lowest latency);
        # in "blocking" mode the event's BLOCKING_SYNC flag makes the thread sleep until the GPU is done.
        # A Python query loop would hold the GIL between queries and starve the worker's other threads.
        if not getattr(self._tls, "bound", False):
            self._bind_thread()  # e.g. the worker's completion-waiter thread, on its first wait
        slot.ev_done.synchronize()  # type: ignore[attr-defined]

    def _bind_thread(self) -> None:
        """Make the CUDA context current on the calling thread (it is per OS thread)."""
        make_current = getattr(self.ctx, "make_current", None)
        if make_current is not None:
            make_current()
        self._tls.bound = True

    def gpu_time_us(self, slot: Slot) -> float | None:
        """Stream time of the slot's last batch, H2D through D2H, from its timing events."""
        s: GpuSlot = slot  # type: ignore[assignment]
        return s.ev_stop.elapsed_ms(s.ev_start) * 1000.0

    def gpu_span_ns(self, slot: Slot) -> tuple[int, int] | None:
        s: GpuSlot = slot  # type: ignore[assignment]
        a = s.anchor
        ref, base = self._anchors[a], self._anchor_ns[a]
        self._anchor_users[a] = max(0, self._anchor_users[a] - 1)
        return (base + int(s.ev_start.elapsed_ms(ref) * 1e6), base + int(s.ev_stop.elapsed_ms(ref) * 1e6))

    def timeline_us(self, slot: Slot, ref: Any) -> tuple[float, float]:
        """(start, stop) of the slot's last batch in microseconds after timing event `ref`: lets a
        benchmark merge overlapping batches of different slots into true GPU-busy time."""
        s: GpuSlot = slot  # type: ignore[assignment]
        return s.ev_start.elapsed_ms(ref) * 1000.0, s.ev_stop.elapsed_ms(ref) * 1000.0

    # --- warm-up, readiness ----------------------------------------------------------------------

    def warmup(self, slots: list[Slot], buckets: tuple[int, ...]) -> None:
        """Run every bucket (at every size bucket of the dynamic dimensions) on every slot eagerly, then
        capture one graph per (slot, bucket)."""
        combos = [(rows, dims) for dims in self._launch_keys() for rows in buckets]
        for slot in slots:
            assert isinstance(slot, GpuSlot)
            for rows, dims in combos:
                slot.dims = dims
                if self._enqueue_eager(slot, rows) is False:
                    raise EngineError(f"{self.kind}: warm-up enqueue of {rows} rows failed (see the log)")
                slot.stream.synchronize()
                if self.want_graphs:
                    self._capture(slot, rows)
                    if self.arena_addr:
                        self._capture(slot, rows, compute_only=True)
                self.launch(slot, rows)  # the real launch path once, events included
                self.wait(slot)
                self.gpu_time_us(slot)
                if self.arena_addr:  # and the shared-memory path: one row through the arena
                    slot.shm_parts = [self._warmup_spans(slot)]
                    self.launch(slot, rows)
                    self.wait(slot)
                    slot.shm_parts = []
            slot.dims = ()
        log.info(
            "[ready] %s warmed up: %d slot(s) x buckets %s x sizes %s, %d graph(s) captured, %d capture "
            "failure(s)",
            self.kind,
            len(slots),
            list(buckets),
            self._launch_keys(),
            self.graphs_captured,
            self.graph_failures,
        )

    def _warmup_spans(self, slot: GpuSlot) -> tuple[int, int, list[int], list[int]]:
        """A one-row shared-memory part for warm-up, before any client has a lease: each input's first row
        copied from the slot's pinned input (what the eager warm-up ran on) to the arena's start, one after
        another, and the outputs after them. Inputs and outputs must not share bytes: an output written
        over an input (as it once was, at offset 0) feeds the next warm-up batch garbage, e.g. token ids out
        of an embedding's range (a device-side assert that ends the worker)."""
        h2d, _, _, out_dev = slot.copies[slot.dims]
        rows = [rb for _, _, rb in h2d] + [rb for _, rb in out_dev]
        offs, total = shm_layout([(None, _BYTE, (rb,)) for rb in rows])  # a client's span layout
        if total > self.arena_size:
            raise EngineError(
                f"one row of the model's tensors ({total} bytes) does not fit the {self.arena_size} byte "
                "shared-memory arena: raise transport.shm_mb"
            )
        for (_, src, row_bytes), off in zip(h2d, offs, strict=False):
            ctypes.memmove(self.arena_addr + off, src, row_bytes)
        return (0, 1, offs[: len(h2d)], offs[len(h2d) :])

    def _capture(self, slot: GpuSlot, rows: int, compute_only: bool = False) -> None:
        """One graph per (slot, bucket): H2D + compute + D2H for staged batches, or the compute step alone
        (compute_only) for batches whose copies go to and from the arena (_enqueue_shm)."""
        into = slot.compute_graphs if compute_only else slot.graphs
        step = self._compute if compute_only else self._enqueue_eager
        detail = f"{self.kind} slot {slot.index} bucket {rows}" + (" compute" if compute_only else "")
        graph = self.rt.capture(slot.stream, lambda: step(slot, rows), detail)
        if graph is None:
            self.graph_failures += 1
            return
        into[self._graph_key(slot, rows)] = graph
        self.graphs_captured += 1

    def mark_ready(self) -> None:
        self._anchor_users = [0, 0]  # warm-up launches were never read as spans
        # The journal is process-wide and may already hold faults (an engine before this one in the same
        # process, as in the GPU tests): this engine's faults are those recorded after its own READY.
        self._faults_base = JOURNAL.faults
        try:
            cupti_journal.before_ready(
                self.cfg.monitor.driver_journal, lambda: self.rt.PinnedBuffer(4096, "journal check").free()
            )
        except cupti_journal.CuptiUnavailable as exc:
            raise EngineError(f'monitor.driver_journal = "cupti": {exc}') from None
        JOURNAL.mark_ready()

    def faults(self) -> int:
        return JOURNAL.faults - self._faults_base

    @staticmethod
    def _journal_facts() -> dict[str, Any]:
        cj = cupti_journal.active()
        # Engine facts are sent once, at READY: CUPTI's counters say so in their names.
        stats = (
            {}
            if cj is None
            else {
                (f"{k}_at_ready" if k in ("records", "flushes", "flush_us_mean") else k): v
                for k, v in cj.stats().items()
            }
        )
        return {"mode": JOURNAL.mode, "note": JOURNAL.note, **stats}

    def describe(self) -> dict[str, Any]:
        info = self.ctx.info
        return {
            "kind": self.kind,
            "device": info.name,
            "uuid": info.uuid,
            "compute_capability": f"{info.compute_capability[0]}.{info.compute_capability[1]}",
            "driver": info.driver_version,
            "module_loading": self.ctx.loading_mode,
            "driver_journal": self._journal_facts(),
            "cuda_graphs": bool(self.want_graphs and self.graphs_captured and not self.graph_failures),
            "graphs_captured": self.graphs_captured,
            "sync": self.sync,
            "max_batch": self.max_batch,
            "depth": len(self.slots),
        }

    def close(self) -> None:
        """Destroy graphs, events and streams; free buffers. Runs at worker exit, after serving stopped."""
        if self._closed:
            return
        self._closed = True
        # Shutting down is not steady state: frees here must not be counted as post-READY faults.
        JOURNAL.ready = False
        for slot in self.slots:
            try:
                slot.stream.synchronize()
            except EngineError as exc:  # a failed context still lets us release host memory
                log.warning("[shutdown] slot %d stream sync failed: %s", slot.index, exc)
            for graph in [*slot.graphs.values(), *slot.compute_graphs.values()]:
                graph.destroy()
            slot.graphs.clear()
            slot.compute_graphs.clear()
            slot.inputs.clear()
            slot.outputs.clear()
            for buf in slot.buffers:
                buf.free()
            for ev in (slot.ev_start, slot.ev_stop):
                ev.destroy()
            slot.stream.destroy()
        self.slots.clear()
        if self._arena_reg is not None:
            self._arena_reg.free()
            self._arena_reg = None
