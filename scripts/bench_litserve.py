"""LitServe serving a real model (bert-tiny or resnet18) as a user would serve it, with LitServe's own
batching, driven in a closed loop over HTTP at several concurrencies: the baseline for the orchestrator.

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl    # LitServe and its deps
    export PYTHONPATH=/tmp/site
    python scripts/bench_litserve.py --model bert --models /tmp/models --json OUT/ls-bert.json
    python scripts/bench_litserve.py --model resnet --models /tmp/models --workers-per-device 2 --json r.json
    python scripts/bench_litserve.py --model bert --models /tmp/models --program ep --json OUT/ls-bert-ep.json
    python scripts/bench_litserve.py --model bert --models /tmp/cpu-models --accelerator cpu \\
        --concurrency 1,4 --warmup 1 --duration 3                                   # CPU smoke test

What runs where:
- this process: makes the request, starts the server, checks the first reply, coordinates the load and
  samples NVML (GPU utilization of the server's GPU during each measured window); it never touches CUDA;
- one spawned child, before the server starts: the model run in-process on the same request (the reference
  for the check; it exits before the server takes the GPU);
- the server: this script with --serve-port, in its own session (process group), running LitServer.run() on
  127.0.0.1 at a free port. LitServe spawns its inference workers (--workers-per-device on one GPU, each
  loading the model onto the GPU in setup(): the AOTInductor package MODEL.pt2 by default, the
  ExportedProgram MODEL.ep.pt2 with --program ep; fp16 as exported; predict under torch.inference_mode()),
  forks its uvicorn API servers (--api-servers; LitServe's default is one per inference worker) and, with
  fast_queue, a ZeroMQ broker;
- --processes spawned client processes (default min(8, concurrency)) per concurrency point, each running its
  share of the concurrency as threads with one keep-alive HTTP connection each (http.client), every thread
  sending the same pre-encoded request and waiting for its reply before sending the next. The clients share
  the host's cores with the server: mind the server's CPU when reading the highest concurrencies.

A request is 16 sequences x 128 tokens (bert: input_ids and attention_mask, int64) or 8 images 3x224x224
(resnet, fp16), as JSON: each input a flat list with its shape ({"input_ids": {"shape": [16, 128], "data":
[...]}, ...}); --payload base64 sends each input's bytes base64-encoded in the JSON instead ({"shape": ...,
"b64": "..."}), to show what the JSON lists cost. LitServe batches up to --max-batch-size requests, waiting up
to --batch-timeout seconds for them; batch() concatenates the requests' rows, predict() runs them as one batch
and splits the result back per request (each inference worker prints how many requests its batches held,
every 5 s, into the server log). cuDNN benchmark mode is on in the workers. The reply is JSON with ONE output:
bert returns only pooler_output [16, 128] (not last_hidden_state, to keep the JSON manageable); resnet
returns the logits [8, 1000].

The first reply is compared with the in-process reference (fp16 tolerance); a mismatch is an error and
nothing is measured. Each concurrency point then runs --warmup seconds, then --duration seconds measured:
requests/s and items/s count the replies that arrived in the window, latency percentiles (us) are theirs,
errors count every failed request of the point (warm-up included). Prints a table; --json FILE gets the
settings, the check and every point. Exits 1 on any error.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.metadata
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_torch_limit import (  # noqa: E402
    ATOL,
    MODELS,
    RTOL,
    ModelSpec,
    Runner,
    add_model_args,
    check_bounds,
    compare,
    eager_reference,
    load_model,
    make_inputs,
    model_path,
    percentiles_us,
    resolve,
)
from scripts.benchlib import machine_info  # noqa: E402

API_PATH = "/predict"
HEALTH_PATH = "/health"
STOP_S = 8.0  # the server's graceful shutdown, before SIGKILL (inside a step timeout's 10 s grace)
STATS_S = 5.0  # each inference worker prints the batches it formed this often (server log)


# --- request and reply ------------------------------------------------------------------------------------


def encode_request(inputs: dict[str, np.ndarray], payload: str) -> bytes:
    """The request body: each input as its shape and a flat JSON list, or its bytes in base64."""
    if payload == "json":
        body = {k: {"shape": list(v.shape), "data": v.ravel().tolist()} for k, v in inputs.items()}
    else:
        body = {
            k: {"shape": list(v.shape), "b64": base64.b64encode(v.tobytes()).decode()}
            for k, v in inputs.items()
        }
    return json.dumps(body, separators=(",", ":")).encode()


def decode_request(request: dict[str, Any], spec: ModelSpec) -> dict[str, np.ndarray]:
    """A request body (parsed) back to the model's inputs, in the dtypes the model takes."""
    out = {}
    for name, dtype in zip(spec.inputs, spec.dtypes, strict=True):
        field = request[name]
        if "b64" in field:
            data = np.frombuffer(bytearray(base64.b64decode(field["b64"])), dtype=dtype)
        else:
            data = np.asarray(field["data"], dtype=dtype)
        out[name] = data.reshape(field["shape"])
    return out


# --- the server (this script with --serve-port) ------------------------------------------------------------


def _build_api_class() -> type:
    import litserve as ls

    class ModelAPI(ls.LitAPI):
        """The model behind LitServe as a user serves it: loaded onto the worker's device in setup() and
        warmed up there, requests batched by LitServe, fp16, predict under inference_mode."""

        def __init__(self, model: str, path: str, program: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.model_name, self.path, self.program = model, path, program

        def setup(self, device: str) -> None:
            import torch

            if device.startswith("cuda"):
                torch.cuda.set_device(device)
                torch.backends.cudnn.benchmark = True  # resnet: the fastest convolutions per batch shape
            self.model_spec = resolve(Path(self.path).parent, self.model_name)[0]
            self.torch_device = device
            self.runner = Runner(load_model(Path(self.path), self.program, device)[0], self.model_spec)
            self.batches, self.requests, self.since = 0, 0, time.monotonic()
            for n in sorted({1, self.max_batch_size}):  # first-call initialisation, at both ends of the range
                self.predict((make_inputs(self.model_spec, n), [self.model_spec.per_request] * n))
            self.batches, self.requests, self.since = 0, 0, time.monotonic()

        # LitServe builds the FastAPI route from decode_request's `request` annotation and encode_response's
        # return annotation: left out, the body is parsed as JSON into a dict and the dict returned is sent
        # as JSON.
        def decode_request(self, request):
            return decode_request(request, self.model_spec)

        def batch(self, inputs: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[int]]:
            """The requests' rows as one batch, and each request's row count (to split the result)."""
            return (
                {k: np.concatenate([x[k] for x in inputs]) for k in self.model_spec.inputs},
                [len(x[self.model_spec.inputs[0]]) for x in inputs],
            )

        def predict(self, x: Any) -> Any:
            """A batch (from batch()) gives one result per request; with max_batch_size 1 LitServe passes one
            decoded request and gets its result."""
            import torch

            feeds, sizes = x if isinstance(x, tuple) else (x, None)
            with torch.inference_mode():
                out = self.runner({k: torch.from_numpy(v).to(self.torch_device) for k, v in feeds.items()})
                y = out[self.model_spec.served].float().cpu().numpy()
            if sizes is None:
                return y
            self.count(len(sizes))
            return np.split(y, np.cumsum(sizes)[:-1])

        def count(self, requests: int) -> None:
            """Batches formed, in the server log every STATS_S seconds."""
            self.batches += 1
            self.requests += requests
            if (now := time.monotonic()) - self.since >= STATS_S:
                print(
                    f"worker {os.getpid()}: {self.batches} batches, {self.requests} requests in "
                    f"{now - self.since:.1f} s: {self.requests / self.batches:.2f} requests per batch",
                    flush=True,
                )
                self.batches, self.requests, self.since = 0, 0, now

        def encode_response(self, output: np.ndarray):
            return {self.model_spec.served: output.tolist()}

    ModelAPI.__qualname__ = "ModelAPI"  # pickled by reference, under this name, to the inference workers
    return ModelAPI


def _api_class() -> type:
    cls = globals().get("ModelAPI")
    if cls is None:
        cls = globals()["ModelAPI"] = _build_api_class()
    return cls


def __getattr__(name: str) -> Any:
    """`ModelAPI`, the LitAPI subclass, built on first use: LitServe is imported only in the server and in its
    inference workers, which unpickle the API object by this module attribute."""
    if name == "ModelAPI":
        return _api_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve(args: argparse.Namespace) -> None:
    import litserve as ls

    # SIGINT is LitServe's graceful shutdown (KeyboardInterrupt), even if it came in ignored (background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    api = _api_class()(
        model=args.model,
        path=str(args.path),
        program=args.program,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    server = ls.LitServer(
        api,
        accelerator=args.accelerator,
        devices=1,
        workers_per_device=args.workers_per_device,
        fast_queue=args.fast_queue,
    )
    server.run(
        host="127.0.0.1",
        port=args.serve_port,
        num_api_servers=args.api_servers,
        log_level="warning",
        generate_client_file=False,
    )


def server_argv(args: argparse.Namespace, port: int) -> list[str]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-port",
        str(port),
        "--model",
        args.model,
        "--models",
        str(args.models),
        "--program",
        args.program,
        "--accelerator",
        args.accelerator,
        "--max-batch-size",
        str(args.max_batch_size),
        "--batch-timeout",
        str(args.batch_timeout),
        "--workers-per-device",
        str(args.workers_per_device),
        "--fast-queue" if args.fast_queue else "--no-fast-queue",
    ]
    return argv + (["--api-servers", str(args.api_servers)] if args.api_servers else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float, log: Path) -> float:
    """Polls GET /health until it answers 200; seconds it took. Raises when the server exits first or is not
    ready within timeout_s, with the end of its log."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the LitServe server exited ({proc.returncode}) before it was ready; "
                f"its log ({log}) ends:\n{log_tail(log)}"
            )
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", HEALTH_PATH)
            if conn.getresponse().status == 200:
                return time.monotonic() - t0
        except (OSError, http.client.HTTPException):
            pass  # not listening yet
        time.sleep(0.5)
    raise RuntimeError(
        f"the LitServe server was not ready (GET {HEALTH_PATH} -> 200) within "
        f"{timeout_s:g} s; its log ({log}) ends:\n{log_tail(log)}"
    )


def stop_server(proc: subprocess.Popen) -> str:
    """SIGINT to the server (LitServe's graceful shutdown stops its workers and API servers), then SIGKILL to
    whatever is left of its process group."""
    how = "already exited"
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(STOP_S)
            how = "stopped by SIGINT"
        except subprocess.TimeoutExpired:
            how = f"killed (no exit within {STOP_S:g} s of SIGINT)"
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group is gone
    proc.wait()
    return how


# --- reference and check ------------------------------------------------------------------------------


def _reference(
    model: str, path: str, program: str, device: str, inputs: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, str]]:
    """In a spawned child: the served output of the model run in-process on `inputs`, and the torch facts."""
    import torch

    spec = resolve(Path(path).parent, model)[0]
    runner = Runner(load_model(Path(path), program, device)[0], spec)
    out = eager_reference(runner, inputs, (spec.served,), device)[spec.served]
    facts = {
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
    }
    return out, facts


def post(port: int, body: bytes, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", API_PATH, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_first(
    port: int, body: bytes, reference: np.ndarray, spec: ModelSpec, timeout: float
) -> dict[str, Any]:
    status, data = post(port, body, timeout)
    if status != 200:
        return {"ok": False, "error": f"first request: HTTP {status}: {data[:500]!r}"}
    got = np.asarray(json.loads(data)[spec.served], dtype=np.float32)
    ok, diff = compare(got, reference)
    r = {"ok": ok, "max_abs_diff": diff, "shape": list(got.shape), "reply_bytes": len(data)}
    if not ok:
        r["error"] = (
            f"the first reply's {spec.served} {list(got.shape)} differs from the in-process "
            f"model's {list(reference.shape)} (max abs diff {diff:g}; allowed |diff| <= {ATOL:g} + "
            f"{RTOL:g} x |reference|)"
        )
    return r


# --- GPU busy -------------------------------------------------------------------------------------------


class GpuBusy:
    """NVML's GPU utilization (share of time a kernel was running) over a window: the driver's samples
    (nvmlDeviceGetSamples, GPU_UTILIZATION_SAMPLES) timestamped inside it, or, where those are not supported,
    nvmlDeviceGetUtilizationRates polled through it. None without NVML."""

    def __init__(self, enabled: bool) -> None:
        self.nvml: Any = None
        self.mode = "samples"
        if not enabled:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
            self.nvml = pynvml
        except Exception:  # no pynvml or no driver: GPU busy is recorded as null
            self.nvml = None

    def _poll(self, last_us: int, samples: list[tuple[int, float]], rates: list[float]) -> int:
        nv = self.nvml
        if self.mode == "samples":
            try:
                vtype, got = nv.nvmlDeviceGetSamples(self.handle, nv.NVML_GPU_UTILIZATION_SAMPLES, last_us)
                field = nv.c_nvmlValue_t._fields_[vtype][0]
                samples += [(s.timeStamp, float(getattr(s.sampleValue, field))) for s in got]
                return max([last_us, *(s.timeStamp for s in got)])
            except nv.NVMLError_NotFound:
                return last_us  # no sample since the last one
            except nv.NVMLError:
                self.mode = "rates"
        rates.append(float(nv.nvmlDeviceGetUtilizationRates(self.handle).gpu))
        return last_us

    def window(self, start_at: float, end_at: float) -> dict[str, Any]:
        """Blocks until end_at (time.monotonic()); the mean utilization between start_at and end_at."""
        time.sleep(max(0.0, start_at - time.monotonic()))
        if self.nvml is None:
            time.sleep(max(0.0, end_at - time.monotonic()))
            return {"gpu_busy": None, "gpu_busy_source": "no NVML"}
        t0_us = int(time.time() * 1e6)  # NVML sample timestamps are wall-clock microseconds
        samples: list[tuple[int, float]] = []
        rates: list[float] = []
        last = t0_us
        while (left := end_at - time.monotonic()) > 0:
            time.sleep(min(0.25, left))
            last = self._poll(last, samples, rates)
        t1_us = int(time.time() * 1e6)
        values = [v for ts, v in samples if t0_us < ts <= t1_us] if self.mode == "samples" else rates
        source = "GPU utilization samples" if self.mode == "samples" else "utilization rates"
        return {
            "gpu_busy": round(float(np.mean(values)) / 100, 4) if values else None,
            "gpu_busy_source": f"NVML {source} ({len(values)})",
        }


# --- load --------------------------------------------------------------------------------------------------


def _client_proc(
    port: int,
    body: bytes,
    threads: int,
    timeout: float,
    go: Any,
    start: Any,
    warmup: float,
    duration: float,
    q: Any,
) -> None:
    """One client process: `threads` closed-loop threads, one keep-alive connection each."""
    results: list[tuple[list[float], Counter]] = [([], Counter()) for _ in range(threads)]
    headers = {"Content-Type": "application/json"}

    def loop(i: int, t_start: float, warm_until: float, end_at: float) -> None:
        lat, errors = results[i]
        conn: http.client.HTTPConnection | None = None
        time.sleep(max(0.0, t_start - time.monotonic()))
        while (t0 := time.monotonic()) < end_at:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                conn.request("POST", API_PATH, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status: int | str = resp.status
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)  # a server that refuses connections must not turn this into a spin
            t1 = time.monotonic()
            if status != 200:
                errors[f"HTTP {status}" if isinstance(status, int) else status] += 1
            elif warm_until <= t1 <= end_at:
                lat.append(t1 - t0)
        if conn is not None:
            conn.close()

    q.put("ready")
    go.wait()
    t_start = start.value
    ts = [
        threading.Thread(target=loop, args=(i, t_start, t_start + warmup, t_start + warmup + duration))
        for i in range(threads)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    lat = [x for r in results for x in r[0]]
    errors = sum((r[1] for r in results), Counter())
    q.put({"lat": np.asarray(lat, dtype=np.float64).tobytes(), "errors": dict(errors)})


def run_point(
    args: argparse.Namespace, port: int, body: bytes, concurrency: int, gpu: GpuBusy
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    nproc = min(args.processes or 8, concurrency)
    shares = [concurrency // nproc + (i < concurrency % nproc) for i in range(nproc)]
    q = ctx.Queue()
    go = ctx.Event()
    start = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=_client_proc,
            daemon=True,
            name=f"ls-client-{i}",
            args=(port, body, n, args.http_timeout, go, start, args.warmup, args.duration, q),
        )
        for i, n in enumerate(shares)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            if q.get(timeout=120) != "ready":
                raise RuntimeError("a client process did not start")
        start.value = time.monotonic() + 0.2
        go.set()
        busy = gpu.window(start.value + args.warmup, start.value + args.warmup + args.duration)
        done = [q.get(timeout=args.http_timeout + 60) for _ in procs]
    except BaseException:  # a client failed, or SIGTERM: no waiting for the others
        for p in procs:
            p.kill()
        raise
    for p in procs:
        p.join()
    lat = np.concatenate([np.frombuffer(d["lat"], dtype=np.float64) for d in done])
    errors = sum((Counter(d["errors"]) for d in done), Counter())
    rps = len(lat) / args.duration
    return {
        "concurrency": concurrency,
        "processes": nproc,
        "requests": len(lat),
        "requests_per_s": round(rps, 1),
        "items_per_s": round(rps * args.spec.per_request, 1),
        **{f"latency_us_{k}": v for k, v in percentiles_us(lat).items()},
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        **busy,
    }


# --- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument(
        "--accelerator", choices=["cuda", "cpu"], default="cuda", help="LitServer accelerator (one device)"
    )
    ap.add_argument("--workers-per-device", type=int, default=1, help="LitServer workers_per_device")
    ap.add_argument(
        "--api-servers", type=int, help="LitServer.run num_api_servers (default: LitServe's, one per worker)"
    )
    ap.add_argument(
        "--max-batch-size",
        type=int,
        help="LitAPI max_batch_size, in requests (default 8, or fewer where the export's batch "
        "dim takes fewer: MODEL.json dims.batch)",
    )
    ap.add_argument("--batch-timeout", type=float, default=0.005, help="LitAPI batch_timeout, seconds")
    ap.add_argument(
        "--fast-queue",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LitServer fast_queue (ZeroMQ between API servers and workers)",
    )
    ap.add_argument(
        "--payload",
        choices=["json", "base64"],
        default="json",
        help="inputs as flat JSON lists (default) or base64 bytes inside the JSON",
    )
    ap.add_argument(
        "--concurrency", default="1,8,32,64", help="requests in flight, one point each (comma separated)"
    )
    ap.add_argument("--processes", type=int, help="client processes per point (default min(8, concurrency))")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each measured window")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    ap.add_argument("--http-timeout", type=float, default=120.0, help="client socket timeout, seconds")
    ap.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds to wait for GET /health -> 200"
    )
    ap.add_argument(
        "--server-log", type=Path, help="the server's output (default: a file in /tmp, path printed)"
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)  # internal: run the server on this port
    args = ap.parse_args(argv)
    args.spec, bounds = resolve(args.models, args.model)
    if args.max_batch_size is None:
        most = bounds.get("batch", 8 * args.spec.per_request) // args.spec.per_request
        args.max_batch_size = max(1, min(8, most))
    try:
        args.concurrency_list = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}")
    if not args.concurrency_list or min(args.concurrency_list) < 1:
        ap.error("--concurrency: every point needs at least one request in flight")
    for name in ("workers_per_device", "max_batch_size", "processes", "api_servers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_timeout < 0 or args.warmup < 0 or args.duration <= 0 or args.http_timeout <= 0:
        ap.error("--batch-timeout and --warmup must be >= 0, --duration and --http-timeout > 0")
    if why := check_bounds(args.spec, bounds, args.max_batch_size):
        ap.error(f"--max-batch-size: {why}")
    args.path = model_path(args.models, args.spec, args.program)
    if not args.path.is_file():
        ap.error(f"no model file {args.path} (scripts/export_models.py writes it)")
    return args


def table(result: dict[str, Any]) -> str:
    spec = MODELS[result["model"]]
    s = result["settings"]
    lines = [
        f"LitServe {result['litserve']} | {result['model_file']} ({result['program']}) on "
        f"{result['device_name']} | {s['accelerator']}, {s['workers_per_device']} worker(s)/device, "
        f"API servers {s['api_servers'] or 'default'}, max_batch_size {s['max_batch_size']}, "
        f"batch_timeout {s['batch_timeout']:g} s, fast_queue {'on' if s['fast_queue'] else 'off'}",
        f"request: {spec.per_request} {spec.unit} as {s['payload']} "
        f"({result['request_bytes']:,} bytes); reply: {spec.served} only, JSON "
        f"({(result['check'] or {}).get('reply_bytes', '-')} bytes)",
        f"{'concurrency':>11} {'procs':>5} {'requests/s':>11} {spec.unit + '/s':>12} {'p50 us':>9} "
        f"{'p90 us':>9} {'p99 us':>9} {'errors':>6} {'GPU busy':>9}",
    ]

    def us(v: float | None) -> str:
        return f"{v:,.0f}" if v is not None else "-"

    for p in result["points"]:
        if "error" in p:
            lines.append(f"{p['concurrency']:>11}  ERROR {p['error']}")
            continue
        busy = f"{p['gpu_busy']:.1%}" if p["gpu_busy"] is not None else "-"
        lines.append(
            f"{p['concurrency']:>11} {p['processes']:>5} {p['requests_per_s']:>11,.1f} "
            f"{p['items_per_s']:>12,.0f} {us(p['latency_us_p50']):>9} {us(p['latency_us_p90']):>9} "
            f"{us(p['latency_us_p99']):>9} {p['errors']:>6} {busy:>9}"
            + (f"  {p['error_kinds']}" if p["errors"] else "")
        )
    lines += [f"ERROR {e}" for e in result["errors"]]
    return "\n".join(lines)


def measure(
    args: argparse.Namespace, result: dict[str, Any], inputs: dict[str, np.ndarray], body: bytes
) -> None:
    """Reference, server, check, then every concurrency point, into `result`; the server is always stopped."""
    spec: ModelSpec = args.spec
    device = "cuda:0" if args.accelerator == "cuda" else "cpu"
    print(f"reference: {spec.file} ({args.program}) in a child process on {device}", flush=True)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        try:
            reference, facts = ex.submit(
                _reference, args.model, str(args.path), args.program, device, inputs
            ).result()
        except Exception as exc:
            raise RuntimeError(f"the in-process reference run failed: {type(exc).__name__}: {exc}") from exc
    result.update(facts)
    if args.server_log:
        log = args.server_log
    else:
        fd, name = tempfile.mkstemp(prefix="litserve-", suffix=".log")
        os.close(fd)
        log = Path(name)
    result["server_log"] = str(log)
    port = free_port()
    gpu = GpuBusy(args.accelerator == "cuda")
    print(f"server: 127.0.0.1:{port}, log {log}", flush=True)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            server_argv(args, port),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=tempfile.gettempdir(),
        )
    try:
        result["ready_s"] = round(wait_ready(proc, port, args.ready_timeout, log), 1)
        result["check"] = check_first(port, body, reference, spec, args.http_timeout)
        if not result["check"]["ok"]:
            result["errors"].append(result["check"]["error"])
            return
        for c in args.concurrency_list:
            try:
                point = run_point(args, port, body, c, gpu)
            except Exception as exc:  # recorded; the next point may still run
                point = {"concurrency": c, "error": f"{type(exc).__name__}: {exc}"}
            result["points"].append(point)
            print(json.dumps(point), flush=True)
    finally:
        result["server_stop"] = stop_server(proc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_port is not None:
        serve(args)
        return 0
    try:
        version = importlib.metadata.version("litserve")
    except importlib.metadata.PackageNotFoundError:
        print(
            "bench_litserve: litserve is not installed here; install the carried wheels with\n"
            "  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl\n"
            "and run with PYTHONPATH=/tmp/site",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a step's timeout: the server is stopped on exit
    spec: ModelSpec = args.spec
    inputs = make_inputs(spec, 1)
    body = encode_request(inputs, args.payload)
    settings = {
        k: getattr(args, k)
        for k in (
            "accelerator",
            "workers_per_device",
            "api_servers",
            "max_batch_size",
            "batch_timeout",
            "fast_queue",
            "payload",
            "warmup",
            "duration",
        )
    }
    result: dict[str, Any] = {
        "machine": machine_info(),
        "litserve": version,
        "model": args.model,
        "model_file": str(args.path),
        "program": args.program,
        "device_name": "-",
        "settings": settings,
        "per_request": spec.per_request,
        "unit": spec.unit,
        "reply_output": spec.served,
        "request_bytes": len(body),
        "check": None,
        "points": [],
        "errors": [],
    }
    try:
        measure(args, result, inputs, body)
    except SystemExit:  # SIGTERM
        result["errors"].append("stopped by SIGTERM before the end")
        raise
    except Exception as exc:  # the reference, the server's start or the check request failed
        result["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:  # also on SIGTERM: what was measured is written
        print(table(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1, default=str))
            print(f"wrote {args.json}")
    failed = result["errors"] or any("error" in p or p["errors"] for p in result["points"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
