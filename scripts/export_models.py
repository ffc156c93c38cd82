"""Export real architectures with random weights (seed 0, nothing downloaded) for the orchestrator's engines.

    python scripts/export_models.py --out models                           # GPU host: fp16 on cuda
    python scripts/export_models.py --out /tmp/x --device cpu --models bert --max-batch 8 --seq-max 32

Models: `bert-tiny` (a bert-tiny-shaped transformers.BertModel: input_ids, attention_mask [batch, seq] ->
last_hidden_state, pooler_output) and `resnet18` (torchvision: images [batch, 3, 224, 224] -> logits).
For each model NAME, OUT gets:

    NAME.ep.pt2   torch.export ExportedProgram on --device (fp16 on cuda, fp32 on cpu), dims batch and seq
    NAME.pt2      AOTInductor package of that program (compiled on this host, for this torch; --no-aoti skips)
                  (both carry the torch engine's signature: workers/engines/torch_program.py)
    NAME.onnx     fp32 ONNX twin for the CPU ONNX Runtime engine, opset 17, dim_params "batch"/"seq"
                  (checked against the fp32 eager model with onnxruntime at two shapes; --no-onnx skips)
    NAME.json     manifest: dims, inputs, outputs, dtype, seed, versions, the files written

Runs on the GPU host with --device cuda (torch, transformers, torchvision, onnx, onnxruntime; AOTInductor
needs a C++ compiler), and on a CPU-only development machine with --device cpu. The artefacts belong to
the torch that wrote them: export on the host that serves them. scripts/check_exports.py checks them.
One progress line per artefact on stderr. Exit 2 when a needed package is missing.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.engines.torch_program import package_aoti, save_exported  # noqa: E402  (imports no torch)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch.export import ExportedProgram

SEED = 0
OPSET = 17
BERT_CONFIG = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}
BERT_VOCAB = 30522  # BertConfig's default vocab_size
BERT_POSITIONS = 512  # BertConfig's default max_position_embeddings: the longest seq the model takes
# Sizes traced at export. Not 0 or 1: torch.export specializes a dim whose example size is 0 or 1.
EXAMPLE_SIZES = {"batch": 2, "seq": 16}
INSTALL_HINT = "pip install 'orchestrator[torch]' transformers torchvision"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # "int64", or "float" for the artefact's float dtype
    shape: tuple[str | int, ...]  # a str is a dynamic dim, by name

    def describe(self, float_dtype: str) -> dict[str, Any]:
        dtype = float_dtype if self.dtype == "float" else self.dtype
        return {"name": self.name, "dtype": dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    alias: str
    architecture: str
    needs: tuple[str, ...]  # packages beyond torch
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    build: Callable[[], torch.nn.Module]  # fp32, on the cpu, eval mode, weights from seed SEED
    sample: Callable[[dict[str, int], torch.Generator], tuple[torch.Tensor, ...]]  # cpu, fp32 floats

    def dims(self) -> list[str]:
        names = [d for t in self.inputs for d in t.shape if isinstance(d, str)]
        return list(dict.fromkeys(names))


def build_bert() -> torch.nn.Module:
    import torch
    import transformers

    class BertEncoder(torch.nn.Module):
        """(input_ids, attention_mask) -> (last_hidden_state, pooler_output), plain tensors."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state, out.pooler_output

    # "eager" attention is matmul + additive mask + softmax: the same small op set in the exported program,
    # the AOTInductor kernels on either device and the ONNX graph, with no choice of fused SDPA kernel
    # (flash / memory-efficient / math, each with its own mask and alignment rules) left to the device or
    # the torch version. "sdpa" exported as well here (torch 2.13); at seq <= 512 and head dim 64 a fused
    # kernel gains little.
    config = transformers.BertConfig(attn_implementation="eager", **BERT_CONFIG)
    torch.manual_seed(SEED)
    return BertEncoder(transformers.BertModel(config)).eval()


def sample_bert(sizes: dict[str, int], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random token ids and a right-padded mask: row 0 full, the last row half padding, the rest random.

    With a padded row in every example of batch >= 2, a tracer that meets a data-dependent shortcut
    ("mask all ones: drop it") keeps the mask.
    """
    import torch

    batch, seq = sizes["batch"], sizes["seq"]
    input_ids = torch.randint(0, BERT_VOCAB, (batch, seq), generator=gen)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    lengths[-1] = max(1, seq // 2)
    lengths[0] = seq
    attention_mask = (torch.arange(seq) < lengths[:, None]).to(torch.int64)
    return input_ids, attention_mask


def build_resnet18() -> torch.nn.Module:
    import torch
    import torchvision

    class ImageClassifier(torch.nn.Module):
        """images -> logits; the wrapper names the exported program's input "images"."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.net(images)

    torch.manual_seed(SEED)
    return ImageClassifier(torchvision.models.resnet18(weights=None)).eval()


def sample_images(sizes: dict[str, int], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    import torch

    return (torch.randn((sizes["batch"], 3, 224, 224), generator=gen),)


MODELS = (
    ModelSpec(
        name="bert-tiny",
        alias="bert",
        architecture="transformers.BertModel(BertConfig(attn_implementation='eager', "
        + ", ".join(f"{k}={v}" for k, v in BERT_CONFIG.items())
        + "))",
        needs=("transformers",),
        inputs=(
            TensorInfo("input_ids", "int64", ("batch", "seq")),
            TensorInfo("attention_mask", "int64", ("batch", "seq")),
        ),
        outputs=(
            TensorInfo("last_hidden_state", "float", ("batch", "seq", 128)),
            TensorInfo("pooler_output", "float", ("batch", 128)),
        ),
        build=build_bert,
        sample=sample_bert,
    ),
    ModelSpec(
        name="resnet18",
        alias="resnet",
        architecture="torchvision.models.resnet18(weights=None)",
        needs=("torchvision",),
        inputs=(TensorInfo("images", "float", ("batch", 3, 224, 224)),),
        outputs=(TensorInfo("logits", "float", ("batch", 1000)),),
        build=build_resnet18,
        sample=sample_images,
    ),
)


def find_model(name: str) -> ModelSpec:
    for spec in MODELS:
        if name in (spec.name, spec.alias):
            return spec
    raise KeyError(name)


def missing_packages(names: Sequence[str]) -> list[str]:
    return [n for n in dict.fromkeys(names) if importlib.util.find_spec(n) is None]


def versions(spec: ModelSpec) -> dict[str, str]:
    return {n: importlib.metadata.version(n) for n in ("torch", *spec.needs)}


def to_device(inputs: Sequence[torch.Tensor], device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Moves inputs to device; floating-point ones are cast to dtype, integer ones keep theirs."""
    return tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in inputs)


def compare(
    expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor | np.ndarray], tol: float
) -> tuple[float, bool]:
    """(largest |actual - expected| over the outputs, whether all are within tol + tol * |expected|)."""
    import torch

    worst, ok = 0.0, len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=False):
        e32 = e.detach().float().cpu()
        a32 = torch.as_tensor(a).detach().float().cpu()
        if a32.shape != e32.shape:
            return float("inf"), False
        diff = (a32 - e32).abs()
        worst = max(worst, diff.max().item())
        ok = ok and bool((diff <= tol + tol * e32.abs()).all())  # False on NaN too
    return worst, ok


def as_outputs(value: Any) -> tuple[Any, ...]:
    """A model's outputs as a tuple: a single-output model returns one tensor, a runtime may give a list."""
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def run_eager(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    import torch

    with torch.inference_mode():
        return as_outputs(model(*inputs))


def run_onnx(session: Any, spec: ModelSpec, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    feeds = {t.name: x.cpu().numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
    return session.run([t.name for t in spec.outputs], feeds)


def example_sizes(ranges: dict[str, tuple[int, int]]) -> dict[str, int]:
    return {name: min(EXAMPLE_SIZES[name], hi) for name, (_, hi) in ranges.items()}


def dynamic_shapes_for(spec: ModelSpec, ranges: dict[str, tuple[int, int]]) -> dict[str, dict[int, Any]]:
    """torch.export dynamic_shapes with named dims: Dim("batch", min=1, max=...), Dim("seq", min=1, max=...).

    min=1 is what the engines need, and torch 2.13 keeps it as given: traced at EXAMPLE_SIZES (>= 2, so
    nothing is specialized), the program's range_constraints read [1, max] and at batch 1 / seq 1 it
    gives the eager model's outputs (check_exports.py tests every corner of the ranges).
    """
    from torch.export import Dim

    dims = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in ranges.items()}
    return {t.name: {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs}


def export_program(
    model: torch.nn.Module,
    spec: ModelSpec,
    ranges: dict[str, tuple[int, int]],
    dynamic_shapes: dict[str, dict[int, Any]],
    device: str,
    dtype: torch.dtype,
) -> ExportedProgram:
    import torch

    example = spec.sample(example_sizes(ranges), torch.Generator().manual_seed(SEED))
    return torch.export.export(
        model, to_device(example, device, dtype), dynamic_shapes=dynamic_shapes, strict=False
    )


def export_onnx(
    model: torch.nn.Module, spec: ModelSpec, ranges: dict[str, tuple[int, int]], path: Path
) -> str:
    """The fp32 ONNX twin of model (fp32, on the cpu), checked with onnxruntime at two shapes.

    The TorchScript exporter (dynamo=False, deprecated since torch 2.9 but present in 2.11 and 2.13) needs
    no onnxscript. It traces: shape-dependent Python branches become constants, so the result is checked
    against the eager model at the smallest and the largest shape; its expected warnings are silenced
    (TracerWarning for those branches; aten::index, here only ever indexed by aranges in transformers'
    mask code). Returns the differences found, for the progress line.
    """
    import onnxruntime as ort
    import torch

    axes = {
        t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
        for t in spec.inputs + spec.outputs
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", "Exporting aten::index operator")
        torch.onnx.export(
            model,
            spec.sample(example_sizes(ranges), torch.Generator().manual_seed(SEED)),
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report = []
    for sizes in ({n: lo for n, (lo, _) in ranges.items()}, {n: hi for n, (_, hi) in ranges.items()}):
        inputs = spec.sample(sizes, torch.Generator().manual_seed(SEED + 1))
        worst, ok = compare(run_eager(model, inputs), run_onnx(session, spec, inputs), 1e-4)
        report.append(f"{describe_sizes(sizes)}: max abs diff {worst:.1e}")
        if not ok:
            raise SystemExit(
                f"export_models: {path.name} differs from the fp32 eager model at "
                f"{describe_sizes(sizes)}: max abs diff {worst:.3g}"
            )
    return "; ".join(report)


def describe_sizes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sizes.items())


def progress(path: Path, seconds: float, what: str) -> None:
    size = path.stat().st_size
    size_text = f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"
    print(f"{path.name:<20} {size_text:>9} {seconds:7.1f} s  {what}", file=sys.stderr, flush=True)


def export_model(
    spec: ModelSpec, out: Path, device: str, ranges: dict[str, tuple[int, int]], aoti: bool, onnx: bool
) -> None:
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    dims_text = ", ".join(f"{n} {lo}..{hi}" for n, (lo, hi) in ranges.items())
    base = spec.build()
    model = copy.deepcopy(base).to(device=device, dtype=dtype) if device != "cpu" else base
    files: dict[str, dict[str, Any]] = {}

    # Both programs carry the orchestrator's signature (dim and output names), read by the torch engine.
    t0 = time.perf_counter()
    dynamic_shapes = dynamic_shapes_for(spec, ranges)
    output_names = [t.name for t in spec.outputs]
    ep = export_program(model, spec, ranges, dynamic_shapes, device, dtype)
    path = out / f"{spec.name}.ep.pt2"
    save_exported(ep, path, dynamic_shapes, output_names)
    progress(path, time.perf_counter() - t0, f"torch.export, {dtype_name} on {device}, {dims_text}")
    files["torch.export"] = {"file": path.name, "bytes": path.stat().st_size}

    if aoti:
        t0 = time.perf_counter()
        path = out / f"{spec.name}.pt2"
        package_aoti(ep, path, dynamic_shapes, output_names)
        progress(path, time.perf_counter() - t0, f"AOTInductor, {dtype_name} on {device}")
        files["aoti"] = {"file": path.name, "bytes": path.stat().st_size}

    if onnx:
        t0 = time.perf_counter()
        path = out / f"{spec.name}.onnx"
        checked = export_onnx(base, spec, ranges, path)
        progress(path, time.perf_counter() - t0, f"ONNX opset {OPSET}, float32; vs eager at {checked}")
        files["onnx"] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "dtype": "float32",
            "device": "cpu",
            "opset": OPSET,
        }

    t0 = time.perf_counter()
    path = out / f"{spec.name}.json"
    manifest = {
        "model": spec.name,
        "architecture": spec.architecture,
        "seed": SEED,
        "device": device,
        "dtype": dtype_name,
        "dims": {name: list(r) for name, r in ranges.items()},
        "inputs": [t.describe(dtype_name) for t in spec.inputs],
        "outputs": [t.describe(dtype_name) for t in spec.outputs],
        "files": files,
        "versions": versions(spec),
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    progress(path, time.perf_counter() - t0, "manifest")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for the artefacts (created)")
    ap.add_argument("--models", default="bert,resnet", help="comma-separated: bert, resnet")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="fp16 on cuda, fp32 on cpu")
    ap.add_argument("--max-batch", type=int, default=64, help="batch dim range 1..N (N >= 2)")
    ap.add_argument("--seq-max", type=int, default=128, help=f"seq dim range 1..N (N <= {BERT_POSITIONS})")
    ap.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor package (slow on cpu)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX twin")
    args = ap.parse_args(argv)
    try:
        specs = [find_model(m.strip()) for m in args.models.split(",") if m.strip()]
    except KeyError as exc:
        ap.error(f"unknown model {exc}; choose from {', '.join(s.alias for s in MODELS)}")
    if not specs:
        ap.error("--models names no model")
    if args.max_batch < 2:
        ap.error("--max-batch must be at least 2")
    if not 2 <= args.seq_max <= BERT_POSITIONS:
        ap.error(f"--seq-max must be within 2..{BERT_POSITIONS}")

    onnx_packages = [] if args.no_onnx else ["onnx", "onnxruntime"]
    missing = missing_packages(["torch", *(n for s in specs for n in s.needs), *onnx_packages])
    if missing:
        print(
            f"export_models: missing {', '.join(missing)}; install: {INSTALL_HINT} onnx onnxruntime",
            file=sys.stderr,
        )
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"export_models: --device cuda, but torch {torch.__version__} sees no CUDA device; "
            "use --device cpu",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    limits = {"batch": args.max_batch, "seq": args.seq_max}
    for spec in specs:
        ranges = {name: (1, limits[name]) for name in spec.dims()}
        export_model(spec, args.out, args.device, ranges, aoti=not args.no_aoti, onnx=not args.no_onnx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
