"""PyTorch programs on the GPU (`model.kind = "torch"`): an AOTInductor package or an ExportedProgram
(`.pt2`), run through the same pipeline as the other GPU engines.

Runs in a GPU worker, on its serving thread. torch and the worker's CUDA layer share the primary context
and the slot's stream (a torch ExternalStream over it): our copies move the bytes between pinned host
memory and the slot's static device tensors (allocated through torch before READY), the program runs
between them, and one CUDA graph per (slot, batch bucket, size bucket) replays all of it at once. The
graphs are captured with torch.cuda.graph, in one private memory pool per slot (a slot's graphs never run
at the same time; two slots' do), so the program's intermediate tensors are allocated once, at warm-up.
After READY torch's caching allocator must not grow: its segment count (cudaMalloc) is compared with READY
on every heartbeat and each new segment is a fault; with graphs on, so is each new block allocation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.common.config import Config
from orchestrator.common.errors import EngineError
from workers.engines.base import TensorSpec
from workers.engines.dims import launch_keys, model_dims
from workers.engines.gpu_base import GpuEngineBase, GpuSlot
from workers.engines.torch_program import BATCH, Program

log = logging.getLogger(__name__)

TORCH_MISSING = (
    "model.kind = \"torch\" needs PyTorch, which is not installed here: pip install 'orchestrator[torch]'"
)


@dataclass
class _DeviceTensor:
    """A slot's static device buffer, allocated by torch (so the program reads and writes it in place);
    `handle`/`ptr` are what the CUDA layer's copies take. torch frees it with the tensor."""

    tensor: Any
    ptr: int
    handle: Any

    def free(self) -> None:
        self.tensor = None


class _TorchGraph:
    """A torch.cuda.CUDAGraph launched on the slot's stream: through the driver when torch exposes the
    executable graph (one call, no stream switch), else by replay() with the slot's stream current."""

    def __init__(self, torch: Any, graph: Any, tstream: Any) -> None:
        self.graph = graph
        self.tstream = tstream
        self._torch = torch
        self._exec = None
        raw = getattr(graph, "raw_cuda_graph_exec", None)
        if raw is not None:
            from cuda.bindings import driver

            self._exec = driver.CUgraphExec(int(raw()))
            self._launch = driver.cuGraphLaunch

    def launch(self, stream: Any) -> None:
        if self._exec is not None:
            err = self._launch(self._exec, stream.handle)[0]
            if err:
                raise EngineError(f"cuGraphLaunch failed: {err.name}")
            return
        with self._torch.cuda.stream(self.tstream):
            self.graph.replay()

    def destroy(self) -> None:
        self.graph = None
        self._exec = None


class TorchEngine(GpuEngineBase):
    kind = "torch"

    def __init__(self, cfg: Config, rt: Any = None) -> None:
        try:
            import torch
        except ImportError:
            raise EngineError(TORCH_MISSING) from None
        super().__init__(cfg, rt)  # our context first: torch then finds the primary context current
        self._torch = torch
        torch.cuda.set_device(0)
        self.program = Program(cfg.model.path, device_index=0)
        if self.program.device and not self.program.device.startswith("cuda"):
            raise EngineError(
                f"{cfg.model.path} was exported for {self.program.device}, not the GPU: export it on the "
                "GPU (scripts/export_models.py --device cuda)"
            )
        sig = self.program.signature
        dims = {k: (lo, hi or None) for k, (lo, hi) in sig["dims"].items()}
        b_lo, b_hi = dims.pop(BATCH, (1, None))
        where = f"program {cfg.model.path}"
        if b_lo > 1:
            raise EngineError(
                f"{where}: its batch dimension starts at {b_lo}; export it with Dim('batch', min=1) so "
                "batches of one row run"
            )
        if b_hi is not None and cfg.model.max_batch > b_hi:
            raise EngineError(
                f"model.max_batch = {cfg.model.max_batch} exceeds the batch range of {where} (1..{b_hi})"
            )
        specs = [
            [TensorSpec(n, np.dtype(d), tuple(shape)) for n, d, shape in sig[k]]
            for k in ("inputs", "outputs")
        ]
        self.inputs, self.outputs, self.dims = model_dims(
            specs[0], specs[1], dims, cfg.model.dims, need_buckets=True, where=where
        )
        self.max_batch = cfg.model.max_batch
        self.pads_to_buckets = (
            True  # fixed shapes only: torch's allocator then reaches its steady state in warm-up
        )
        self._largest = tuple(d.hi for d in self.dims)
        self._alloc_base: tuple[int, int] | None = None
        self._alloc_faults_seen = 0
        self.capture_error = ""
        self._torch_dtypes = {
            s.name: getattr(torch, np.dtype(s.dtype).name if s.dtype != np.bool_ else "bool")
            for s in (*self.inputs, *self.outputs)
        }
        log.info(
            "[ready] torch %s: %s %s, inputs %s, outputs %s, dynamic %s",
            torch.__version__,
            self.program.kind,
            cfg.model.path,
            [s.to_wire() for s in self.inputs],
            [s.to_wire() for s in self.outputs],
            [(d.name, d.lo, d.hi, list(d.buckets)) for d in self.dims],
        )

    # --- shapes -----------------------------------------------------------------------------------

    def _launch_keys(self) -> list[tuple[int, ...]]:
        return launch_keys(self.dims) if self.dims else [()]

    def _row_bytes(self, dims: tuple[int, ...]) -> tuple[list[int], list[int]]:
        def rb(s: TensorSpec) -> int:
            return int(np.prod(self.item_shape_at(s, dims), dtype=np.int64)) * s.dtype.itemsize

        return [rb(s) for s in self.inputs], [rb(s) for s in self.outputs]

    # --- slots ------------------------------------------------------------------------------------

    def _alloc_tensor(self, slot: GpuSlot, spec: TensorSpec, rows: int) -> tuple[np.ndarray, Any, int]:
        """Pinned host memory from our CUDA layer, the device tensor from torch; both sized for the
        largest sizes of the dynamic dimensions (a batch at smaller sizes uses their leading part)."""
        from cuda.bindings import driver

        item = self.item_shape_at(spec, self._largest)
        row_bytes = int(np.prod(item, dtype=np.int64)) * spec.dtype.itemsize
        nbytes = max(row_bytes * rows, 1)
        host = self.rt.PinnedBuffer(nbytes, f"slot {slot.index} {spec.name} {nbytes} B")
        flat = self._torch.empty(
            max(rows * int(np.prod(item, dtype=np.int64)), 1),
            dtype=self._torch_dtypes[spec.name],
            device="cuda",
        )
        ptr = flat.data_ptr()
        dev = _DeviceTensor(flat, ptr, driver.CUdeviceptr(ptr))
        slot.buffers += [host, dev]
        slot.device[spec.name] = dev
        return host.view(spec.dtype, (rows, *item)), dev, row_bytes

    def _init_slot(self, slot: GpuSlot) -> None:
        torch = self._torch
        slot.extra["tstream"] = torch.cuda.ExternalStream(slot.stream.ptr)
        slot.extra["pool"] = torch.cuda.graph_pool_handle()
        slot.extra["views"] = {}

    def _views(self, slot: GpuSlot, rows: int) -> tuple[list[Any], list[Any]]:
        """The device tensors of a batch of `rows` rows at sizes slot.dims: views of the static buffers."""
        key = (rows, slot.dims)
        views = slot.extra["views"].get(key)
        if views is None:

            def view(spec: TensorSpec) -> Any:
                shape = (rows, *self.item_shape_at(spec, slot.dims))
                return slot.device[spec.name].tensor[: int(np.prod(shape, dtype=np.int64))].view(shape)

            views = slot.extra["views"][key] = (
                [view(s) for s in self.inputs],
                [view(s) for s in self.outputs],
            )
        return views

    # --- compute ----------------------------------------------------------------------------------

    def _compute(self, slot: GpuSlot, rows: int) -> Any:
        ins, outs = self._views(slot, rows)
        with self._torch.cuda.stream(slot.extra["tstream"]):
            results = self.program.run(*ins)
            if len(results) != len(outs):
                raise EngineError(
                    f"the program returned {len(results)} outputs, its signature lists {len(outs)}"
                )
            for dst, got in zip(outs, results, strict=True):
                dst.copy_(got)
        return True

    def _capture(self, slot: GpuSlot, rows: int, compute_only: bool = False) -> None:
        torch = self._torch
        step = self._compute if compute_only else self._enqueue_eager
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(
                graph,
                pool=slot.extra["pool"],
                stream=slot.extra["tstream"],
                capture_error_mode="thread_local",
            ):
                step(slot, rows)
        except Exception as exc:  # the program does something a graph cannot hold: it runs uncaptured
            self.graph_failures += 1
            if not self.capture_error:
                self.capture_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning(
                    "[ready] CUDA graph capture of %s failed (%s): it runs without graphs (graphs: off)",
                    self.cfg.model.path,
                    self.capture_error,
                )
            torch.cuda.synchronize()
            return
        into = slot.compute_graphs if compute_only else slot.graphs
        into[self._graph_key(slot, rows)] = _TorchGraph(torch, graph, slot.extra["tstream"])
        self.graphs_captured += 1

    # --- readiness and faults ------------------------------------------------------------------------

    def _alloc_counts(self) -> tuple[int, int]:
        stats = self._torch.cuda.memory_stats()
        return int(stats.get("segment.all.allocated", 0)), int(stats.get("allocation.all.allocated", 0))

    def mark_ready(self) -> None:
        super().mark_ready()
        self._alloc_base = self._alloc_counts()

    def allocator_faults(self) -> int:
        """New cudaMalloc segments since READY; with every batch captured, new block allocations too (a
        graph replay allocates nothing; an eager run takes blocks from the cache, which is expected)."""
        if self._alloc_base is None:
            return 0
        segs, allocs = self._alloc_counts()
        n = segs - self._alloc_base[0]
        if not self.graph_failures and self.want_graphs:
            n += allocs - self._alloc_base[1]
        if n > self._alloc_faults_seen:
            log.warning(
                "[stall] torch's caching allocator changed after READY: %d new segment(s), %d new block "
                "allocation(s)",
                segs - self._alloc_base[0],
                allocs - self._alloc_base[1],
            )
            self._alloc_faults_seen = n
        return n

    def faults(self) -> int:
        return super().faults() + self.allocator_faults()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            program=self.program.kind,
            path=self.cfg.model.path,
            torch=self._torch.__version__,
            graphs="on" if d["cuda_graphs"] else "off",
            capture_error=self.capture_error or None,
            dims=[[x.name, x.lo, x.hi, list(x.buckets)] for x in self.dims],
            inputs=[s.to_wire() for s in self.inputs],
            outputs=[s.to_wire() for s in self.outputs],
        )
        return d

    def close(self) -> None:
        super().close()
        self._torch.cuda.synchronize()
