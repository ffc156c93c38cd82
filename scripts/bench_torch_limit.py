"""In-process limit for the real models (bert-tiny, resnet18): the exported .pt2 driven by PyTorch alone, with
no serving layer, as the ceiling that a server of the same model on the same GPU can approach.

    python scripts/bench_torch_limit.py --model bert --models /tmp/models --json OUT/limit-bert.json
    python scripts/bench_torch_limit.py --model resnet --models /tmp/models --json OUT/limit-resnet.json
    python scripts/bench_torch_limit.py --model bert --models /tmp/models --program ep --json OUT/lim-ep.json
    python scripts/bench_torch_limit.py --model resnet --models /tmp/models --batches 1,8 --depth 3

Everything runs in this process on cuda:0 (CUDA_VISIBLE_DEVICES picks the GPU). The model is the
AOTInductor package (MODEL.pt2, loaded with aoti_load_package(path, run_single_threaded=True), which keeps the
runner's own synchronisation out of graph capture) or, with --program ep, the ExportedProgram (MODEL.ep.pt2,
torch.export.load(path).module()); both are fp16 and written by scripts/export_models.py, whose manifest
(MODEL.json) gives the input dtypes and the batch range. A request is 16 sequences x 128 tokens (bert) or 8
images of 3x224x224 (resnet), and --batches counts requests per batch.

For each batch size, --depth slots are prepared, each with its own stream, its own input in pinned host
memory, a pinned output, and a CUDA graph captured on that stream of: H2D copy of the pinned input -> model ->
copy of the outputs into static device buffers -> D2H copy into the pinned output. Every slot's replay is
checked against the eager model on the same input (fp16 tolerance) before timing, and its last outputs again
after. The slots are replayed round robin for --seconds, each replay between two timing events, the host
waiting only on the oldest slot before reusing it. items/s counts every replay completed over the host wall
time; GPU busy is the union of the replays' event spans over the span from the first replay's start to the
last one's end (copies included: they are part of the graph). The inputs stay in their pinned buffers
throughout: no host staging is timed. cuDNN benchmark mode is on (resnet's convolutions get the fastest
algorithms, chosen while warming up before capture).

Latency at concurrency 1: one request at a time through a one-request graph (H2D -> model -> D2H), the host
waiting on the stream after each, over --c1-iters iterations (the first tenth dropped).

Prints a table; --json FILE also gets the device, driver, torch version, every batch size's items/s and GPU
busy, the best batch size and the concurrency-1 p50/p99. Exits 1 when any check or measurement failed.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_gpu_bare import union_length  # noqa: E402
from scripts.benchlib import machine_info  # noqa: E402

SEQ_LEN = 128
IMAGE = (3, 224, 224)
RTOL = ATOL = 2e-2  # fp16: results from different batch sizes or kernels differ in the last bits


@dataclass(frozen=True)
class ModelSpec:
    """One model's files, request size and tensors."""

    file: str  # MODEL.pt2 (AOTInductor) and MODEL.ep.pt2 (ExportedProgram) in the models directory
    per_request: int  # rows per request
    unit: str  # what a row is
    inputs: tuple[str, ...]  # in the order the model takes them
    dtypes: tuple[str, ...]  # numpy dtype of each input (the manifest's, where there is one: see resolve)
    outputs: tuple[str, ...]  # in the order the model returns them
    served: str  # the one output the LitServe benchmark returns (JSON)


MODELS = {
    "bert": ModelSpec(
        "bert-tiny",
        16,
        "sequences",
        ("input_ids", "attention_mask"),
        ("int64", "int64"),
        ("last_hidden_state", "pooler_output"),
        "pooler_output",
    ),
    "resnet": ModelSpec("resnet18", 8, "images", ("images",), ("float16",), ("logits",), "logits"),
}


def model_path(models: Path, spec: ModelSpec, program: str) -> Path:
    return models / (f"{spec.file}.pt2" if program == "aoti" else f"{spec.file}.ep.pt2")


def resolve(models: Path, name: str) -> tuple[ModelSpec, dict[str, int]]:
    """MODELS[name] with the input dtypes of the export's manifest (MODEL.json, written by export_models.py:
    fp16 on cuda, fp32 on cpu), and the upper bound of each of its dynamic dims ({"batch": rows, "seq":
    tokens}); the defaults and no bounds without a manifest."""
    spec = MODELS[name]
    try:
        manifest = json.loads((models / f"{spec.file}.json").read_text())
        dtypes = {t["name"]: t["dtype"] for t in manifest["inputs"]}
        bounds = {dim: int(r[1]) for dim, r in manifest["dims"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return spec, {}
    typed = tuple(dtypes.get(n, d) for n, d in zip(spec.inputs, spec.dtypes, strict=True))
    return replace(spec, dtypes=typed), bounds


def check_bounds(spec: ModelSpec, bounds: dict[str, int], requests: int) -> str | None:
    """Why `requests` requests in one batch are outside the export's dims (None when they fit)."""
    if bounds.get("seq", SEQ_LEN) < SEQ_LEN and "input_ids" in spec.inputs:
        return f"the export takes sequences of at most {bounds['seq']} tokens, the requests have {SEQ_LEN}"
    if requests * spec.per_request > bounds.get("batch", requests * spec.per_request):
        rows, most = requests * spec.per_request, bounds["batch"]
        return (
            f"{requests} requests are {rows} {spec.unit}, the export takes at most {most} "
            f"({spec.file}.json dims.batch): at most {most // spec.per_request} requests per batch"
        )
    return None


def make_inputs(spec: ModelSpec, requests: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`requests` requests' worth of inputs. bert: token ids after a [CLS] (101), each sequence 32-128 tokens
    long and padded with 0 (mask 0) to 128; resnet: values on a 1/8 grid in [-2, 2] (exact in fp16, short in
    JSON), in the dtype the export takes."""
    rng = np.random.default_rng(seed)
    rows = requests * spec.per_request
    if spec.inputs == ("images",):
        return {"images": rng.integers(-16, 17, (rows, *IMAGE), dtype=np.int8).astype(spec.dtypes[0]) / 8}
    ids = rng.integers(1000, 30000, (rows, SEQ_LEN), dtype=np.int64)
    ids[:, 0] = 101
    lengths = rng.integers(32, SEQ_LEN + 1, rows)
    mask = (np.arange(SEQ_LEN) < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def load_model(path: Path, program: str, device: str, single_threaded: bool = False) -> tuple[Any, str]:
    """The model on `device` and a note of how it was loaded. AOTI: aoti_load_package, with
    run_single_threaded=True when asked and this torch has the keyword (the note says when it has not)."""
    import torch

    # An export that returns a HF ModelOutput (BertModel's) can be neither loaded nor called unless
    # transformers has registered its ModelOutput types with pytree, which importing modeling_outputs does.
    with contextlib.suppress(ImportError):
        import transformers.modeling_outputs  # noqa: F401

    if program == "ep":
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(torch.export.load(str(path)), device)
        return ep.module(), "torch.export.load(path).module()"
    params = inspect.signature(torch._inductor.aoti_load_package).parameters
    kwargs: dict[str, Any] = {}
    dev = torch.device(device)
    if "device_index" in params and dev.type == "cuda" and dev.index is not None:
        kwargs["device_index"] = dev.index
    note = ""
    if single_threaded:
        if "run_single_threaded" in params:
            kwargs["run_single_threaded"] = True
        else:
            note = (
                f" (torch {torch.__version__}'s aoti_load_package has no run_single_threaded: "
                "loaded without it)"
            )
    call = ", ".join(["path", *(f"{k}={v!r}" for k, v in kwargs.items())])
    return torch._inductor.aoti_load_package(str(path), **kwargs), f"aoti_load_package({call}){note}"


class Runner:
    """The loaded model called with named inputs, returning its outputs by name. An export takes its inputs
    either as keywords or positionally (it refuses the other form), found on the first call; it returns a dict
    (or a ModelOutput), a tuple or a single tensor, named after spec.outputs in that order."""

    def __init__(self, model: Any, spec: ModelSpec) -> None:
        self.model = model
        self.spec = spec
        self.by_name: bool | None = None

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        if self.by_name is None:
            try:
                out = self.model(**feeds)
                self.by_name = True
            except (TypeError, ValueError) as by_name:
                try:
                    out = self.model(*(feeds[n] for n in self.spec.inputs))
                except Exception as positional:
                    raise RuntimeError(
                        f"the model takes neither keyword inputs ({by_name}) nor positional "
                        f"ones ({positional})"
                    ) from positional
                self.by_name = False
        elif self.by_name:
            out = self.model(**feeds)
        else:
            out = self.model(*(feeds[n] for n in self.spec.inputs))
        return self.named(out)

    def named(self, out: Any) -> dict[str, Any]:
        if isinstance(out, Mapping):
            named = {n: out[n] for n in self.spec.outputs if n in out}
        elif isinstance(out, tuple | list):
            named = dict(zip(self.spec.outputs, out, strict=False))
        else:
            named = {self.spec.outputs[0]: out}
        if self.spec.served not in named:
            raise RuntimeError(f"the model's outputs {type(out).__name__} have no {self.spec.served!r}")
        return named


def compare(got: np.ndarray, want: np.ndarray) -> tuple[bool, float]:
    """(within fp16 tolerance, max abs difference): |got - want| <= ATOL + RTOL * |want| everywhere."""
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    if got.shape != want.shape:
        return False, float("inf")
    diff = np.abs(got - want)
    ok = bool(np.all(diff <= ATOL + RTOL * np.abs(want))) and bool(np.all(np.isfinite(got)))
    return ok, float(diff.max()) if diff.size else 0.0


def percentiles_us(lat_s: list[float] | np.ndarray) -> dict[str, float | None]:
    if len(lat_s) == 0:
        return {"p50": None, "p90": None, "p99": None}
    p = np.percentile(np.asarray(lat_s, dtype=np.float64) * 1e6, [50, 90, 99])
    return {"p50": round(float(p[0]), 1), "p90": round(float(p[1]), 1), "p99": round(float(p[2]), 1)}


# --- CUDA graphs -------------------------------------------------------------------------------------------


@dataclass
class Slot:
    """One graph in flight: its stream, pinned buffers, graph and the events around its latest replay."""

    stream: Any
    graph: Any
    host_in: dict[str, Any]
    host_out: dict[str, Any]
    keep: list[Any]  # device buffers the graph reads and writes
    start: Any
    end: Any
    busy: bool = False

    def launch(self) -> None:
        import torch

        with torch.cuda.stream(self.stream):
            self.start.record()
            self.graph.replay()
            self.end.record()
        self.busy = True


def capture(runner: Runner, inputs: dict[str, np.ndarray], outputs: tuple[str, ...], device: str) -> Slot:
    """A slot whose graph copies `inputs` (in pinned memory) to the GPU, runs the model, copies `outputs` into
    static device buffers and back to pinned memory. The model is warmed up on the capture stream first."""
    import torch

    host_in = {k: torch.from_numpy(v).pin_memory() for k, v in inputs.items()}
    dev_in = {k: torch.empty_like(v, device=device) for k, v in host_in.items()}
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):  # lazy initialisation, allocator, library handles: none of it may be captured
            for k, t in dev_in.items():
                t.copy_(host_in[k], non_blocking=True)
            out = runner(dev_in)
    stream.synchronize()
    # outside inference mode: the host may write them (check_slot zeroes the outputs)
    dev_out = {k: torch.empty_like(out[k]) for k in outputs}
    host_out = {k: torch.empty(out[k].shape, dtype=out[k].dtype, pin_memory=True) for k in outputs}
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, stream=stream):
        for k, t in dev_in.items():
            t.copy_(host_in[k], non_blocking=True)
        out = runner(dev_in)
        for k in outputs:
            dev_out[k].copy_(out[k])
            host_out[k].copy_(dev_out[k], non_blocking=True)
    return Slot(
        stream,
        graph,
        host_in,
        host_out,
        [dev_in, dev_out],
        torch.cuda.Event(enable_timing=True),
        torch.cuda.Event(enable_timing=True),
    )


def check_outputs(slot: Slot, reference: dict[str, np.ndarray], when: str) -> float:
    """The slot's pinned outputs against the eager reference: the max abs difference; raises on a mismatch."""
    worst = 0.0
    for k, want in reference.items():
        ok, diff = compare(slot.host_out[k].float().numpy(), want)
        if not ok:
            raise RuntimeError(
                f"{when}: graph replay differs from the eager model on {k!r}: max abs diff {diff:g}"
            )
        worst = max(worst, diff)
    return worst


def check_slot(slot: Slot, reference: dict[str, np.ndarray]) -> float:
    """Replays the slot once, outputs zeroed first, and checks them against the eager reference."""
    for k in slot.host_out:
        slot.host_out[k].zero_()
    slot.launch()
    slot.end.synchronize()
    slot.busy = False
    return check_outputs(slot, reference, "before timing")


def eager_reference(
    runner: Runner, inputs: dict[str, np.ndarray], outputs: tuple[str, ...], device: str
) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        out = runner({k: torch.from_numpy(v).to(device) for k, v in inputs.items()})
        return {k: out[k].float().cpu().numpy() for k in outputs}


def run_slots(slots: list[Slot], seconds: float) -> dict[str, Any]:
    """Round robin over the slots for `seconds`, waiting only on the slot about to be reused (the oldest);
    replays, host wall time and the replays' event spans (ms from a reference event)."""
    import torch

    torch.cuda.synchronize()
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()
    spans: list[tuple[float, float]] = []

    def retire(slot: Slot) -> None:
        slot.end.synchronize()
        spans.append((ref.elapsed_time(slot.start), ref.elapsed_time(slot.end)))
        slot.busy = False

    t0 = time.perf_counter()
    deadline = t0 + seconds
    i = 0
    while True:
        slot = slots[i % len(slots)]
        if slot.busy:
            retire(slot)
        if time.perf_counter() >= deadline:
            break
        slot.launch()
        i += 1
    for slot in slots:
        if slot.busy:
            retire(slot)
    wall = time.perf_counter() - t0
    return {"replays": len(spans), "wall_s": wall, "spans": spans}


def measure_batch(runner: Runner, spec: ModelSpec, requests: int, args: argparse.Namespace) -> dict[str, Any]:
    """One batch size: capture --depth slots, each on its own input, check each against the eager model, warm
    up, time, and check each slot's last outputs again (graphs in flight together must not share buffers)."""
    outputs = spec.outputs if args.outputs == "all" else (spec.served,)
    slots, references = [], []
    for j in range(args.depth):
        inputs = make_inputs(spec, requests, seed=1000 * requests + j)
        references.append(eager_reference(runner, inputs, outputs, args.device))
        slots.append(capture(runner, inputs, outputs, args.device))
    diff = max(check_slot(s, ref) for s, ref in zip(slots, references, strict=True))
    run_slots(slots, min(0.5, args.seconds))  # warm-up: clocks, caches
    r = run_slots(slots, args.seconds)
    for s, ref in zip(slots, references, strict=True):
        diff = max(diff, check_outputs(s, ref, "after timing"))
    items = r["replays"] * requests * spec.per_request
    first = min(s for s, _ in r["spans"])
    last = max(e for _, e in r["spans"])
    return {
        "requests": requests,
        "items": requests * spec.per_request,
        "replays": r["replays"],
        "items_per_s": round(items / r["wall_s"], 1),
        "requests_per_s": round(r["replays"] * requests / r["wall_s"], 1),
        "gpu_busy": round(union_length(r["spans"]) / (last - first), 4) if last > first else None,
        "gpu_ms_per_batch": round(float(np.mean([e - s for s, e in r["spans"]])), 4),
        "check_max_abs_diff": diff,
    }


def concurrency1(runner: Runner, spec: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """One request at a time: replay the one-request graph (H2D -> model -> D2H) and wait for it."""
    inputs = make_inputs(spec, 1, seed=1)
    outputs = spec.outputs if args.outputs == "all" else (spec.served,)
    slot = capture(runner, inputs, outputs, args.device)
    diff = check_slot(slot, eager_reference(runner, inputs, outputs, args.device))
    lat = []
    for _ in range(args.c1_iters):
        t0 = time.perf_counter()
        slot.launch()
        slot.stream.synchronize()
        lat.append(time.perf_counter() - t0)
    slot.busy = False
    kept = lat[len(lat) // 10 :]
    return {
        "iters": len(kept),
        **{f"latency_us_{k}": v for k, v in percentiles_us(kept).items()},
        "check_max_abs_diff": diff,
    }


# --- main ------------------------------------------------------------------------------------------------


def default_batches(most: int) -> list[int]:
    """1, 2, 4, ... up to `most` requests, `most` included."""
    sizes = [1 << i for i in range(most.bit_length()) if 1 << i < most]
    return [*sizes, most] if most >= 1 else []


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model, --models, --program: which export of which model (this script and bench_litserve.py)."""
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--models", type=Path, required=True, help="directory with MODEL.pt2 and MODEL.ep.pt2")
    ap.add_argument(
        "--program",
        choices=["aoti", "ep"],
        default="aoti",
        help="aoti: the AOTInductor package (default); ep: the ExportedProgram",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument(
        "--batches",
        help="batch sizes in requests (comma separated); default: powers of two "
        "up to the most the export takes (MODEL.json dims.batch), else 1,2,4,8",
    )
    ap.add_argument("--depth", type=int, default=2, help="graphs in flight, one stream and buffer set each")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed replay loop per batch size")
    ap.add_argument(
        "--c1-iters", type=int, default=2000, help="concurrency-1 iterations (the first tenth dropped)"
    )
    ap.add_argument(
        "--outputs",
        choices=["all", "served"],
        default="all",
        help="outputs copied back to the host: all the model returns (default) or only the one "
        "the LitServe benchmark returns (bert: pooler_output, resnet: logits)",
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    args.spec, bounds = resolve(args.models, args.model)
    most = bounds.get("batch", 8 * args.spec.per_request) // args.spec.per_request
    try:
        args.batch_list = (
            [int(b) for b in args.batches.split(",") if b.strip()] if args.batches else default_batches(most)
        )
    except ValueError:
        ap.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if not args.batch_list or min(args.batch_list) < 1:
        ap.error(
            "--batches: every batch size must be a positive number of requests (the export's batch dim "
            "may take less than one request)"
        )
    for requests in args.batch_list:
        if why := check_bounds(args.spec, bounds, requests):
            ap.error(f"--batches: {why}")
    if args.depth < 1:
        ap.error("--depth must be at least 1")
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    if args.c1_iters < 10:
        ap.error("--c1-iters must be at least 10")
    args.path = model_path(args.models, args.spec, args.program)
    if not args.path.is_file():
        ap.error(f"no model file {args.path} (scripts/export_models.py writes it)")
    args.device = "cuda:0"
    return args


def table(result: dict[str, Any]) -> str:
    spec = MODELS[result["model"]]
    lines = [
        f"{result['device']} | driver {result['driver']} | torch {result['torch']} "
        f"(CUDA {result['cuda']}) | {result['model_file']} via {result['load']} | "
        f"depth {result['depth']} | outputs copied: {', '.join(result['outputs_copied'])}",
        f"{'requests':>8} {spec.unit:>10} {spec.unit + '/s':>14} {'requests/s':>11} {'GPU busy':>9} "
        f"{'GPU ms/batch':>13}  note",
    ]
    for r in result["batches"]:
        if "error" in r:
            lines.append(
                f"{r['requests']:>8} {r['requests'] * spec.per_request:>10} {'-':>14} {'-':>11} "
                f"{'-':>9} {'-':>13}  ERROR {r['error']}"
            )
            continue
        busy = f"{r['gpu_busy']:.1%}" if r["gpu_busy"] is not None else "-"
        lines.append(
            f"{r['requests']:>8} {r['items']:>10} {r['items_per_s']:>14,.0f} "
            f"{r['requests_per_s']:>11,.0f} {busy:>9} {r['gpu_ms_per_batch']:>13.3f}  "
            f"checked (max abs diff {r['check_max_abs_diff']:.3g})"
        )
    best = result.get("best")
    if best:
        lines.append(
            f"best: {best['requests']} requests ({best['items']} {spec.unit}) per batch, "
            f"{best['items_per_s']:,.0f} {spec.unit}/s"
        )
    c1 = result.get("concurrency1") or {}
    if "error" in c1:
        lines.append(f"concurrency 1: ERROR {c1['error']}")
    elif c1:
        lines.append(
            f"concurrency 1 (one request, H2D -> graph -> D2H -> sync): "
            f"p50 {c1['latency_us_p50']:.0f} us, p99 {c1['latency_us_p99']:.0f} us "
            f"over {c1['iters']} iterations"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_torch_limit: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    spec: ModelSpec = args.spec
    torch.backends.cudnn.benchmark = True  # resnet's convolutions: the fastest algorithms, picked in warm-up
    info = machine_info()
    model, load_note = load_model(args.path, args.program, args.device, single_threaded=True)
    runner = Runner(model, spec)
    result: dict[str, Any] = {
        "machine": info,
        "device": torch.cuda.get_device_name(0),
        "driver": info["driver"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": args.model,
        "model_file": str(args.path),
        "program": args.program,
        "load": load_note,
        "per_request": spec.per_request,
        "unit": spec.unit,
        "depth": args.depth,
        "seconds": args.seconds,
        "outputs_copied": list(spec.outputs if args.outputs == "all" else (spec.served,)),
        "batches": [],
        "best": None,
        "concurrency1": None,
    }
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a step's timeout: what was measured is written
    try:
        for requests in args.batch_list:
            try:
                row = measure_batch(runner, spec, requests, args)
            except Exception as exc:  # out of memory, a failed capture or check: recorded, the sweep goes on
                row = {"requests": requests, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the graphs' pools went with the slots
            result["batches"].append(row)
            print(f"{requests} requests: {row.get('items_per_s', row.get('error'))}", flush=True)
        try:
            result["concurrency1"] = concurrency1(runner, spec, args)
        except Exception as exc:  # recorded like a batch size's failure
            result["concurrency1"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    finally:
        done = [r for r in result["batches"] if "error" not in r]
        if done:
            best = max(done, key=lambda r: r["items_per_s"])
            result["best"] = {k: best[k] for k in ("requests", "items", "items_per_s", "gpu_busy")}
        print(table(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}")
    failed = len(done) < len(args.batch_list) or "error" in result["concurrency1"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
