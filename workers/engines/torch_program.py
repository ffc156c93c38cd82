"""PyTorch `.pt2` programs: tell an AOTInductor package from an ExportedProgram, read a program's signature
(input and output names, dtypes, per-row shapes with named dynamic dimensions and their ranges), load it,
and write programs that carry their signature.

Runs in GPU workers (loading, through workers/engines/torch_engine.py), in the CLI (`program_kind`, which
needs no torch) and in scripts/export_models.py (`save_exported`, `package_aoti`). torch is imported only
inside the functions that need it.

A signature is plain data: {"inputs": [[name, numpy dtype str, [sizes or dimension names]]], "outputs":
[...], "dims": {name: [min, max]}}, the batch dimension excluded from the shapes and named "batch" in
`dims`. An ExportedProgram has it in its graph; an AOTInductor package only where it was written by
`package_aoti` (in its metadata), since the compiled model does not expose its input shapes.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.common.errors import EngineError

AOTI = "aoti"
EXPORTED = "exported_program"
SIGNATURE_KEY = "orchestrator.signature"  # AOTInductor package metadata / ExportedProgram extra file
_EXTRA_FILE = "orchestrator.json"
BATCH = "batch"

_TORCH_TO_NUMPY = {
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "|i1",
    "uint8": "|u1",
    "bool": "|b1",
}


def program_kind(path: str | Path) -> str:
    """AOTI or EXPORTED, from the archive's layout (both are zip files named .pt2); EngineError otherwise."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise EngineError(f"{path} is not a PyTorch .pt2 archive ({exc})") from None
    if any("/data/aotinductor/" in n for n in names):
        return AOTI
    if any(n.endswith("/models/model.json") or n.endswith("serialized_exported_program.json") for n in names):
        return EXPORTED
    raise EngineError(
        f"{path} is a zip file but neither an AOTInductor package (aoti_compile_and_package) nor "
        "an ExportedProgram (torch.export.save)"
    )


def _dtype(t: Any, what: str) -> str:
    name = str(t).removeprefix("torch.")
    if name not in _TORCH_TO_NUMPY:
        raise EngineError(
            f"{what} has dtype {name}, which the orchestrator does not serve "
            f"(served: {', '.join(_TORCH_TO_NUMPY)})"
        )
    return _TORCH_TO_NUMPY[name]


def signature_of(
    ep: Any, dim_names: Mapping[str, str] | None = None, output_names: list[str] | None = None
) -> dict[str, Any]:
    """The signature of an ExportedProgram. `dim_names` maps its size symbols (str, e.g. "s27") to names;
    unnamed dynamic dimensions are called `<input>.<axis>`. Outputs are named by `output_names`, by the
    keys of a dict output, or `output<i>`. Raises EngineError for what the engine cannot serve."""
    names = dict(dim_names or {})
    ranges: dict[str, list[int]] = {}
    for sym, vr in ep.range_constraints.items():
        lo, hi = int(vr.lower), vr.upper
        ranges[str(sym)] = [lo, int(hi) if hi.is_finite else 0]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    sig = ep.graph_signature
    batch_sym: str | None = None
    inputs = []
    for name in sig.user_inputs:
        val = placeholders[name].meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise EngineError(
                f"program input {name!r} is not a tensor; the orchestrator serves tensor inputs only"
            )
        shape = list(val.shape)
        if not shape:
            raise EngineError(f"program input {name!r} is a scalar; a leading batch dimension is required")
        first = str(shape[0])
        if first not in ranges:
            raise EngineError(
                f"program input {name!r} has a fixed batch of {first}: export it with a dynamic batch "
                "dimension (dynamic_shapes={...: {0: torch.export.Dim('batch', max=...)}})"
            )
        if batch_sym is None:
            batch_sym = first
        elif first != batch_sym:
            raise EngineError(
                f"program input {name!r}: its first dimension is not the batch dimension of the others"
            )
        item: list[int | str] = []
        for axis, d in enumerate(shape[1:], start=1):
            s = str(d)
            if s.isdigit():
                item.append(int(s))
            elif s in ranges:
                item.append(names.setdefault(s, f"{name}.{axis}"))
            else:
                raise EngineError(
                    f"program input {name!r} axis {axis} has size {s}, an expression the orchestrator "
                    "cannot bind from a request"
                )
        inputs.append([name, _dtype(val.dtype, f"program input {name!r}"), item])
    names[batch_sym] = BATCH  # type: ignore[index]
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") if hasattr(a, "meta") else None for a in out_node.args[0]]
    spec = ep.call_spec.out_spec
    keys = output_names or (list(spec.context) if spec is not None and spec.type is dict else None)
    outputs = []
    for i, val in enumerate(vals):
        oname = keys[i] if keys and i < len(keys) else f"output{i}"
        if val is None or not hasattr(val, "shape") or not len(val.shape) or str(val.shape[0]) != batch_sym:
            raise EngineError(f"program output {oname!r} is not a tensor with the batch dimension first")
        item = []
        for axis, d in enumerate(val.shape[1:], start=1):
            s = str(d)
            if s.isdigit():
                item.append(int(s))
            elif s in names:
                item.append(names[s])
            else:
                raise EngineError(
                    f"program output {oname!r} axis {axis} has size {s}, which follows no input dimension"
                )
        outputs.append([oname, _dtype(val.dtype, f"program output {oname!r}"), item])
    dims = {names[s]: r for s, r in ranges.items() if s in names}
    return {"inputs": inputs, "outputs": outputs, "dims": dims}


def _names_from_dynamic_shapes(ep: Any, dynamic_shapes: Mapping[str, Mapping[int, Any]]) -> dict[str, str]:
    """Size symbol -> the name of the torch.export.Dim the exporter gave it."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out: dict[str, str] = {}
    for inp, axes in dynamic_shapes.items():
        node = placeholders.get(inp)
        if node is None:
            continue
        shape = node.meta["val"].shape
        for axis, dim in axes.items():
            name = getattr(dim, "__name__", None)
            if name:
                out[str(shape[axis])] = name
    return out


def save_exported(
    ep: Any, path: str | Path, dynamic_shapes: Mapping[str, Mapping[int, Any]], output_names: list[str]
) -> dict[str, Any]:
    """torch.export.save with the signature (Dim and output names) as an extra file; returns it."""
    import torch

    sig = signature_of(ep, _names_from_dynamic_shapes(ep, dynamic_shapes), output_names)
    torch.export.save(ep, str(path), extra_files={_EXTRA_FILE: json.dumps(sig)})
    return sig


def package_aoti(
    ep: Any,
    path: str | Path,
    dynamic_shapes: Mapping[str, Mapping[int, Any]],
    output_names: list[str],
    **inductor_configs: Any,
) -> dict[str, Any]:
    """Compile an ExportedProgram into an AOTInductor package carrying its signature; returns it."""
    import torch

    sig = signature_of(ep, _names_from_dynamic_shapes(ep, dynamic_shapes), output_names)
    configs = {"aot_inductor.metadata": {SIGNATURE_KEY: json.dumps(sig)}, **inductor_configs}
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)
    return sig


class Program:
    """A loaded program: `run(*tensors)` returns a list of output tensors; `signature` as above."""

    def __init__(self, path: str | Path, device_index: int = 0) -> None:
        import torch

        self.path = str(path)
        self.kind = program_kind(path)
        try:
            if self.kind == AOTI:
                # run_single_threaded: one runner without its own locking, so a CUDA graph can capture it
                # (pytorch PR #148601); the worker's serving thread is its only caller.
                model = torch._inductor.aoti_load_package(
                    self.path, run_single_threaded=True, device_index=device_index
                )
                raw = model.get_metadata().get(SIGNATURE_KEY)
                if raw is None:
                    raise EngineError(
                        f"AOTInductor package {self.path} carries no input signature (the compiled model "
                        "does not expose its input shapes): write it with workers.engines.torch_program."
                        "package_aoti, or serve the ExportedProgram (torch.export.save) instead"
                    )
                self.signature = json.loads(raw)
                self.device = model.get_metadata().get("AOTI_DEVICE_KEY", "")
                self._run = model
            else:
                extra = {_EXTRA_FILE: ""}
                ep = torch.export.load(self.path, extra_files=extra)
                self.signature = json.loads(extra[_EXTRA_FILE]) if extra[_EXTRA_FILE] else signature_of(ep)
                self.device = next(
                    (str(t.device) for t in ep.state_dict.values() if hasattr(t, "device")), ""
                )
                self._run = ep.module()
        except EngineError:
            raise
        except Exception as exc:  # torch raises many types for corrupt or incompatible archives
            raise EngineError(
                f"cannot load {self.path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None

    def run(self, *tensors: Any) -> list[Any]:
        out = self._run(*tensors)
        if isinstance(out, dict):
            return list(out.values())
        if isinstance(out, (list, tuple)):
            return list(out)
        return [out]
