"""Results check themselves: a reference per distinct request, and the comparison of a reply with it.

The reference is computed once per request by the target's own engine run in this process where it can
be (an ONNX model on ONNX Runtime, the synthetic engine's numpy function), else it is the first reply the
orchestrator gave for that request. Runs in the CLI process (references) and in the client processes
(comparisons).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from orchestrator.cli.bench.inputs import ModelSpec

Outputs = Mapping[str, np.ndarray]


def tolerance(dtype: np.dtype) -> tuple[float, float] | None:
    """(rtol, atol) for np.allclose on this dtype; None for exact comparison (integers, booleans).

    Loose enough for the same model run at another batch size (other kernels, other summation order;
    TF32 on GPUs), tight enough for a wrong row, a stale buffer or another request's result."""
    if dtype.kind not in "fc":
        return None
    if dtype.itemsize <= 2 or (dtype.kind == "c" and dtype.itemsize <= 4):
        return 2e-2, 2e-2
    if dtype.itemsize <= 4 or (dtype.kind == "c" and dtype.itemsize <= 8):
        return 1e-2, 1e-3
    return 1e-6, 1e-9


def compare(got: Outputs, want: Outputs, rtol: float | None = None, atol: float | None = None) -> str | None:
    """None when `got` matches `want` (every output of `want`, same shape and dtype, values within
    tolerance; NaN matches NaN); otherwise one line saying what differs."""
    for name, w in want.items():
        g = got.get(name)
        if g is None:
            return f"output {name!r} missing from the reply"
        g = np.asarray(g)
        if g.shape != w.shape:
            return f"{name}: shape {list(g.shape)}, expected {list(w.shape)}"
        if g.dtype != w.dtype:
            return f"{name}: dtype {g.dtype}, expected {w.dtype}"
        if np.array_equal(g, w):  # the usual case, at a twentieth of isclose's cost on a 512 KiB output
            continue
        tol = tolerance(w.dtype)
        if tol is None:
            bad = g != w
        else:
            r, a = (rtol if rtol is not None else tol[0]), (atol if atol is not None else tol[1])
            bad = ~np.isclose(g, w, rtol=r, atol=a, equal_nan=True)
        n = int(np.count_nonzero(bad))
        if n:
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))[bad]
            finite = diff[np.isfinite(diff)]
            worst = f"{finite.max():.3g}" if finite.size else "nan"
            return f"{name}: {n} of {w.size} values differ (max |diff| {worst})"
    return None


Reference = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def engine_reference(config_path: str | Path | None, spec: ModelSpec) -> tuple[Reference | None, str]:
    """The target's engine in this process, when its config is readable here and its engine runs on the
    CPU (an ONNX model, the synthetic engine) and serves the same tensors; else (None, why not)."""
    if not config_path:
        return None, "the target's config is not known here: a tcp:// target"
    from orchestrator.common.config import load_config
    from orchestrator.common.errors import OrchestratorError

    try:
        cfg = load_config(config_path)
    except (OrchestratorError, OSError) as exc:
        return None, f"cannot load the target's config {config_path}: {exc}"
    m = cfg.model
    names = {n for n, _, _ in spec.inputs}
    if m.kind == "synthetic":
        from workers.engines import synthetic_math

        if names != {"x"} or spec.inputs[0][2] != tuple(m.item_shape):
            return None, f"the served model is not the synthetic model of {config_path}"
        work = int(m.work)
        return (lambda req: {"y": synthetic_math.reference(req["x"], work)}), "synthetic engine (numpy)"
    if m.kind == "onnx":
        from orchestrator.common.errors import EngineError
        from workers.engines.onnx_cpu import OnnxCpuEngine

        try:
            engine = OnnxCpuEngine(cfg)
        except EngineError as exc:
            return None, f"cannot load the model in-process: {exc}"
        if {s.name for s in engine.inputs} != names:
            return None, f"the served model's inputs differ from {m.path}'s"
        out_names = [s.name for s in engine.outputs]
        session = engine.session

        def run(req: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(out_names, session.run(out_names, dict(req)), strict=True))

        return run, f"ONNX Runtime in-process ({Path(m.path).name})"
    return None, f"a {m.kind} engine does not run in this process"


def references(
    pool: list[dict[str, np.ndarray]], reference: Reference | None, first_reply: Callable[[dict], Outputs]
) -> tuple[list[dict[str, np.ndarray]], str]:
    """One reference per request of `pool`: the engine's result, or the orchestrator's first reply."""
    if reference is not None:
        return [{k: np.array(v) for k, v in reference(req).items()} for req in pool], "engine"
    return [{k: np.array(v) for k, v in first_reply(req).items()} for req in pool], "first reply"


def check_plan(check_every: int, pool_size: int) -> Callable[[int], bool]:
    """Which requests (by their sequence number k; request k sends pool[k % pool_size]) get their reply
    checked: whole rounds of the pool, every `check_every`-th round, so that every request of the pool is
    checked as often as the others. 0 = none."""
    if check_every <= 0:
        return lambda k: False
    if check_every == 1:
        return lambda k: True
    n = max(1, pool_size)
    return lambda k: (k // n) % check_every == 0
