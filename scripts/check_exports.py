"""Check what scripts/export_models.py wrote: each artefact against the eager model, at several shapes.

    python scripts/check_exports.py DIR

For every DIR/NAME.json manifest, rebuilds the eager model (same architecture, seed 0), loads each file
the manifest lists (NAME.ep.pt2, NAME.pt2, NAME.onnx) and compares its outputs with the eager model's for
random inputs at every corner of the dims' ranges (batch 1 and max, seq 1 and max) and one size between.
The torch programs are loaded as the torch engine loads them (workers.engines.torch_program.Program),
run on the manifest's device and dtype and compared with the eager model in that dtype (2e-2 absolute +
2e-2 relative in fp16, 1e-4 in fp32); the ONNX twin runs in onnxruntime on the cpu against the fp32 eager
model (1e-4). The names, shapes and dims that each loader reads must match the manifest. Runs where the
export ran (same torch). One line per artefact on stdout; exit 1 on any mismatch, 2 when DIR has no
manifest or a package is missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.export_models import (  # noqa: E402
    INSTALL_HINT,
    MODELS,
    ModelSpec,
    as_outputs,
    compare,
    describe_sizes,
    missing_packages,
    run_eager,
    run_onnx,
    to_device,
)
from workers.engines.torch_program import Program  # noqa: E402


def check_sizes(ranges: dict[str, tuple[int, int]]) -> list[dict[str, int]]:
    """Every corner of the dims' ranges, then one size in between (batch 3, seq 7, clipped to the range)."""
    sizes: list[dict[str, int]] = [{}]
    for name, (lo, hi) in ranges.items():
        sizes = [{**s, name: v} for s in sizes for v in (lo, hi)]
    middle = {"batch": 3, "seq": 7}
    return [*sizes, {name: min(max(middle[name], lo), hi) for name, (lo, hi) in ranges.items()}]


def load(fmt: str, path: Path, spec: ModelSpec, manifest: dict[str, Any]) -> Callable[..., Any]:
    """A callable that takes the model's inputs as positional tensors, for one artefact, after checking
    that the names and shapes its loader reads (the torch engine's Program, or onnxruntime) match the
    manifest."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        found: Any = [(a.name, list(a.shape)) for a in (*session.get_inputs(), *session.get_outputs())]
        wanted: Any = [(t["name"], t["shape"]) for t in (*manifest["inputs"], *manifest["outputs"])]
        if found != wanted:
            raise ValueError(f"onnxruntime reads names and shapes {found}, the manifest says {wanted}")
        return lambda *inputs: run_onnx(session, spec, inputs)
    program = Program(path, device_index=0 if manifest["device"] == "cuda" else -1)  # -1: a cpu package
    sig = program.signature  # its shapes leave the batch dim out
    found = [[(n, shape) for n, _, shape in sig[k]] for k in ("inputs", "outputs")], sig["dims"]
    wanted = (
        [[(t["name"], t["shape"][1:]) for t in manifest[k]] for k in ("inputs", "outputs")],
        manifest["dims"],
    )
    if found != wanted:
        raise ValueError(f"the program's signature has {found}, the manifest says {wanted}")
    return program.run


def check(spec: ModelSpec, manifest_path: Path) -> bool:
    """Checks every file that one manifest lists; prints one line each. True when all match."""
    import torch

    manifest = json.loads(manifest_path.read_text())
    if manifest["versions"]["torch"] != torch.__version__:
        print(
            f"note: {manifest_path.name} was written by torch {manifest['versions']['torch']}, "
            f"this is {torch.__version__}"
        )
    shapes = check_sizes({name: (lo, hi) for name, (lo, hi) in manifest["dims"].items()})
    base = spec.build()  # fp32 on the cpu: the ONNX twin's reference
    device, dtype = manifest["device"], getattr(torch, manifest["dtype"])
    model = copy.deepcopy(base).to(device=device, dtype=dtype)

    all_ok = True
    for fmt, entry in manifest["files"].items():
        name = entry["file"]
        if fmt == "onnx":
            reference, run_device, run_dtype, tol = base, "cpu", torch.float32, 1e-4
        else:
            reference, run_device, run_dtype = model, device, dtype
            tol = 2e-2 if dtype == torch.float16 else 1e-4
        try:
            runner = load(fmt, manifest_path.parent / name, spec, manifest)
        except Exception as exc:  # a file that does not load is a failed check, on one line
            print(f"FAIL {name}: {exc}")
            all_ok = False
            continue
        worst, failures = 0.0, []
        for sizes in shapes:
            inputs = to_device(spec.sample(sizes, torch.Generator().manual_seed(1)), run_device, run_dtype)
            try:
                with torch.inference_mode():
                    actual = as_outputs(runner(*inputs))
            except Exception as exc:  # e.g. a size outside the program's range: a failed check
                failures.append(f"{describe_sizes(sizes)} ({type(exc).__name__}: {str(exc).splitlines()[0]})")
                continue
            diff, ok = compare(run_eager(reference, inputs), actual, tol)
            worst = max(worst, diff)
            if not ok:
                failures.append(f"{describe_sizes(sizes)} (max abs diff {diff:.3g})")
        all_ok = all_ok and not failures
        detail = f"; failed at {', '.join(failures)}" if failures else ""
        status = "FAIL" if failures else "ok  "
        print(
            f"{status} {name:<20} {str(run_dtype).removeprefix('torch.')} on {run_device}, tol {tol:g}, "
            f"{len(shapes)} shapes, max abs diff {worst:.2e}{detail}",
            flush=True,
        )
    return all_ok


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="the --out directory of export_models.py")
    args = ap.parse_args(argv)
    found = [spec for spec in MODELS if (args.dir / f"{spec.name}.json").is_file()]
    if not found:
        names = ", ".join(f"{spec.name}.json" for spec in MODELS)
        print(f"check_exports: no manifest ({names}) in {args.dir}", file=sys.stderr)
        return 2
    missing = missing_packages(["torch", "onnxruntime", *(n for spec in found for n in spec.needs)])
    if missing:
        print(
            f"check_exports: missing {', '.join(missing)}; install: {INSTALL_HINT} onnxruntime",
            file=sys.stderr,
        )
        return 2
    results = [check(spec, args.dir / f"{spec.name}.json") for spec in found]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
