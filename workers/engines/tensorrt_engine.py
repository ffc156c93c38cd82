"""TensorRT engine: loads a serialized plan with `tensorrt` or the lean runtime and runs it per slot.

Runs in a GPU worker process on its serving thread. One execution context per slot, tensor addresses
bound once per slot, input shapes set when the batch size changes, execute_async_v3 on the slot's stream,
and one CUDA graph per (slot, bucket) when pipeline.cuda_graphs is on. Load errors are EngineErrors
that say what is wrong with the plan, using what TensorRT logged while deserializing it.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from orchestrator.common.config import Config
from orchestrator.common.errors import EngineError
from workers.driver_journal import JOURNAL
from workers.engines.base import TensorSpec
from workers.engines.gpu_base import GpuEngineBase, GpuSlot

log = logging.getLogger(__name__)

# Import names per runtime: the pip wheels install `*_bindings`; the sdists add a re-exporting alias.
RUNTIME_MODULES = {
    "tensorrt": ("tensorrt", "tensorrt_bindings"),
    "tensorrt_lean": ("tensorrt_lean", "tensorrt_lean_bindings"),
}

# Every TensorRT class member this adapter uses; tests/unit/test_tensorrt_api.py checks them against the
# installed bindings, so keep it in step with the code below.
TRT_API: dict[str, tuple[str, ...]] = {
    "Runtime": ("deserialize_cuda_engine", "engine_host_code_allowed"),
    "ICudaEngine": (
        "num_io_tensors",
        "get_tensor_name",
        "get_tensor_mode",
        "get_tensor_dtype",
        "get_tensor_shape",
        "get_tensor_profile_shape",
        "get_tensor_location",
        "num_optimization_profiles",
        "create_execution_context",
    ),
    "IExecutionContext": (
        "set_input_shape",
        "set_tensor_address",
        "execute_async_v3",
        "infer_shapes",
        "get_tensor_shape",
    ),
    "ILogger": ("log",),
    "TensorIOMode": ("INPUT", "OUTPUT"),
    "TensorLocation": ("HOST",),
}
TRT_FUNCTIONS = ("nptype",)


def import_tensorrt(choice: str) -> tuple[ModuleType, str]:
    """Import the runtime `choice` names ("auto": full tensorrt first, then the lean runtime)."""
    order = ["tensorrt", "tensorrt_lean"] if choice == "auto" else [choice]
    tried = []
    for kind in order:
        for name in RUNTIME_MODULES[kind]:
            try:
                return importlib.import_module(name), kind
            except (ImportError, OSError) as exc:
                tried.append(f"{name}: {exc}")
    raise EngineError(
        f'TensorRT is not installed (model.runtime = "{choice}"; tried {"; ".join(tried)}). Install the GPU '
        "extra (pip install 'orchestrator[gpu]', which brings tensorrt-lean-cu13-bindings and -libs) or the full "
        "tensorrt package."
    )


def make_logger(trt: ModuleType) -> Any:
    """An ILogger that keeps TensorRT's messages while `capturing` (plan load) and logs them always.

    A Python logger takes the GIL for every message TensorRT emits, so it is fine at load time; in
    steady state TensorRT is quiet (it logs only on errors).
    """

    class CaptureLogger(trt.ILogger):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.capturing = True
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            name = getattr(severity, "name", str(severity))
            if self.capturing:
                self.messages.append((name, msg))
            if name in ("INTERNAL_ERROR", "ERROR"):
                log.error("[trt] %s", msg)
            elif name == "WARNING":
                log.warning("[trt] %s", msg)
            else:
                log.debug("[trt] %s", msg)

    return CaptureLogger()


def diagnose_plan_failure(messages: list[tuple[str, str]], path: str, runtime: str, device: Any) -> str:
    """Explain why deserialize_cuda_engine returned None, from the messages TensorRT logged."""
    errors = [m for s, m in messages if s in ("ERROR", "INTERNAL_ERROR")] or [m for _, m in messages]
    low = " ".join(errors).lower()
    cc = ".".join(str(v) for v in device.compute_capability)
    if "incompatible device" in low or "expecting compute" in low:
        reason = f"the plan was built for another GPU (this one is {device.name}, compute capability {cc}); rebuild it on this GPU model"
    elif (
        "version tag does not match" in low
        or "not compatible with this version" in low
        or "expecting library version" in low
    ):
        reason = (
            f"the plan was built with another TensorRT version (this runtime is {runtime}); rebuild it with "
            "this version, or build a version-compatible plan (trtexec --versionCompatible)"
        )
    elif "loadrunner" in low or "version compatible" in low or "version-compatible" in low:
        reason = (
            "the plan is not version-compatible, which the lean runtime requires; rebuild it with "
            "trtexec --versionCompatible or install the full tensorrt package"
        )
    elif "host code" in low:
        reason = "the plan embeds host code (version-compatible plan); set model.trust_host_code = true if you trust it"
    else:
        reason = "the file is not a TensorRT plan, or it is truncated or corrupted"
    said = "; ".join(errors[-3:]) if errors else "nothing"
    return f"cannot load TensorRT plan {path}: {reason}. TensorRT said: {said}"


class TensorRTEngine(GpuEngineBase):
    """A TensorRT plan behind the shared GPU slot machinery. `trt` and `rt` may be injected (tests)."""

    kind = "tensorrt"

    def __init__(self, cfg: Config, trt: ModuleType | None = None, rt: Any = None) -> None:
        path = Path(cfg.model.path)
        if not path.is_file():
            raise EngineError(f"TensorRT plan not found: {path} (model.path)")
        data = path.read_bytes()
        if not data:
            raise EngineError(f"cannot load TensorRT plan {path}: the file is empty")
        if trt is None:
            trt, runtime_kind = import_tensorrt(cfg.model.runtime)
        else:
            runtime_kind = cfg.model.runtime
        self.trt = trt
        self.runtime_name = f"{trt.__name__} {getattr(trt, '__version__', '?')}"
        super().__init__(cfg, rt)  # creates the CUDA context first: TensorRT uses the primary context
        self.path = str(path)
        self._capturing = False
        self._load(data, runtime_kind)
        self._discover()
        self._contexts: list[Any] = []
        self._ctx_rows: list[int] = []

    # --- load ---------------------------------------------------------------------------------------

    def _load(self, data: bytes, runtime_kind: str) -> None:
        trt = self.trt
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        failed = [m for s, m in self.logger.messages if s in ("ERROR", "INTERNAL_ERROR")]
        if failed:  # e.g. CUDA initialisation failure: deserializing now could crash the process
            raise EngineError(f"TensorRT runtime ({self.runtime_name}) failed to start: {'; '.join(failed)}")
        if self.cfg.model.trust_host_code:
            # Version-compatible plans run host code from the file: only for plans the operator trusts.
            self.runtime.engine_host_code_allowed = True
        with JOURNAL.timed("engine_load", self.path):
            engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:  # TensorRT never raises here; the reason is in what it logged
            raise EngineError(
                diagnose_plan_failure(self.logger.messages, self.path, self.runtime_name, self.ctx.info)
            )
        self.engine = engine
        self.logger.capturing = False
        log.info("[ready] TensorRT plan %s loaded with %s (%s)", self.path, self.runtime_name, runtime_kind)

    def _tensor(self, name: str) -> tuple[TensorSpec, int]:
        """The spec of one I/O tensor and its batch dimension (-1 when dynamic)."""
        e, trt = self.engine, self.trt
        dt = e.get_tensor_dtype(name)
        try:
            dtype = np.dtype(trt.nptype(dt))
        except TypeError:
            raise EngineError(
                f"tensor {name!r}: TensorRT type {getattr(dt, 'name', dt)} has no numpy equivalent; "
                "this server supports FLOAT, HALF, INT8, INT32, INT64, BOOL and UINT8 I/O"
            ) from None
        shape = tuple(int(d) for d in e.get_tensor_shape(name))
        if e.get_tensor_location(name) == trt.TensorLocation.HOST:
            raise EngineError(
                f"tensor {name!r} is a shape tensor (host memory); plans with shape-tensor inputs are not supported"
            )
        if not shape:
            raise EngineError(
                f"tensor {name!r} is a scalar; every I/O tensor needs a leading batch dimension"
            )
        if any(d < 0 for d in shape[1:]):
            raise EngineError(
                f"tensor {name!r} has shape {list(shape)}: only the first (batch) dimension may be dynamic"
            )
        return TensorSpec(name, dtype, shape[1:]), shape[0]

    def _discover(self) -> None:
        """I/O tensors, dtypes and the batch range allowed by optimization profile 0."""
        e, trt = self.engine, self.trt
        inputs, outputs = [], []
        lo, hi, limiter = 1, 1 << 31, ""
        for i in range(e.num_io_tensors):
            name = e.get_tensor_name(i)
            mode = e.get_tensor_mode(name)
            spec, batch = self._tensor(name)
            if mode == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                if batch >= 0:
                    rng = (batch, batch)
                else:
                    mn, _opt, mx = e.get_tensor_profile_shape(name, 0)
                    rng = (int(mn[0]), int(mx[0]))
                lo = max(lo, rng[0])
                if rng[1] < hi:
                    hi, limiter = (
                        rng[1],
                        f"input {name!r} allows batch {rng[0]}..{rng[1]} in optimization profile 0",
                    )
            elif mode == trt.TensorIOMode.OUTPUT:
                outputs.append(spec)
        if not inputs or not outputs:
            raise EngineError(
                f"TensorRT plan {self.path} has {len(inputs)} input(s) and {len(outputs)} output(s); both are needed"
            )
        if lo > hi:
            raise EngineError(
                f"TensorRT plan {self.path}: its inputs allow no common batch size ({lo} > {hi})"
            )
        if self.cfg.model.max_batch > hi:
            raise EngineError(
                f"model.max_batch = {self.cfg.model.max_batch} exceeds what the plan accepts: {limiter}; "
                "lower model.max_batch or rebuild the plan with a larger --maxShapes"
            )
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self.min_batch, self.profile_max = lo, hi
        self.max_batch = self.cfg.model.max_batch
        self._in_shapes = [(s.name, s.item_shape) for s in inputs]

    # --- slots -------------------------------------------------------------------------------------

    def _alloc_rows(self) -> int:
        # Batches below the profile minimum run padded to it, so buffers hold at least that many rows.
        return max(self.max_batch, self.min_batch)

    def _init_slot(self, slot: GpuSlot) -> None:
        with JOURNAL.timed("context_create", f"TensorRT execution context for slot {slot.index}"):
            ctx = self.engine.create_execution_context()
        if ctx is None:
            raise EngineError(
                f"TensorRT could not create execution context {slot.index} (out of device memory?)"
            )
        # Buffers never move, so addresses are bound once per slot; captured graphs bake them in too.
        for name, buf in slot.device.items():
            if not ctx.set_tensor_address(name, buf.ptr):
                raise EngineError(f"TensorRT set_tensor_address({name!r}) failed")
        self._contexts.append(ctx)
        self._ctx_rows.append(0)
        rows = self._alloc_rows()
        self._set_rows(slot.index, rows)
        missing = ctx.infer_shapes()
        if missing:
            raise EngineError(f"TensorRT cannot infer shapes; unspecified: {missing}")
        for spec in self.outputs:
            got = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
            if got != (rows, *spec.item_shape):
                raise EngineError(
                    f"output {spec.name!r} has shape {list(got)} for a batch of {rows}; "
                    f"expected [{rows}, {', '.join(map(str, spec.item_shape))}] (batch-major outputs only)"
                )

    def _set_rows(self, index: int, rows: int) -> None:
        ctx = self._contexts[index]
        for name, item in self._in_shapes:
            if not ctx.set_input_shape(name, (rows, *item)):
                raise EngineError(f"TensorRT rejected input shape {[rows, *item]} for {name!r}")
        self._ctx_rows[index] = rows

    # --- per batch ---------------------------------------------------------------------------------

    def _compute(self, slot: GpuSlot, rows: int) -> bool:
        i = slot.index
        exec_rows = rows if rows >= self.min_batch else self.min_batch
        if self._ctx_rows[i] != exec_rows:
            self._set_rows(i, exec_rows)
        if self._contexts[i].execute_async_v3(slot.stream.ptr):
            return True
        if self._capturing:  # not capturable: let capture() end the capture and fall back to eager
            return False
        raise EngineError(
            f"TensorRT execute_async_v3 failed for a batch of {rows} rows (see the [trt] log lines)"
        )

    def _capture(self, slot: GpuSlot, rows: int, compute_only: bool = False) -> None:
        self._capturing = True
        try:
            super()._capture(slot, rows, compute_only)
        finally:
            self._capturing = False

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            runtime=self.runtime_name,
            plan=self.path,
            batch_range=[self.min_batch, self.profile_max],
            inputs=[s.to_wire() for s in self.inputs],
            outputs=[s.to_wire() for s in self.outputs],
        )
        return d

    def close(self) -> None:
        self._contexts.clear()  # contexts free their activation memory before our buffers go
        super().close()
