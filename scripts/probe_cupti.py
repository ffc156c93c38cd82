"""Does the CUPTI driver journal (workers/cupti_journal.py) work on this GPU, and what does it cost?

    python3 scripts/probe_cupti.py --out DIR        # every check below, each in a fresh process; DIR/cupti.json

- basic: CUPTI started before the context, verified with a pinned allocation; a side thread registers a
  64 MiB numpy buffer with cuMemHostRegister (cuda-bindings, not workers/cuda) and torch allocates and
  frees 64 MiB on another: each must appear in the journal with its API name and thread, and its CUPTI
  start/end must match the caller's own monotonic clock readings around the call. Also the cost of an
  empty flush.
- lazy: CUDA_MODULE_LOADING=LAZY, a 50-kernel module loaded with cuModuleLoadData and each kernel launched
  once: the lazy function loads must appear as `lazy_load`.
- launch: host cost of cuLaunchKernel, cuGraphLaunch, an 8 KiB cuMemcpyHtoDAsync and cuEventRecord with the
  journal off and on (separate processes, alternated, three each): the journal must not touch launches.
  `--part torchcost` measures the same in processes with torch and bert-tiny loaded first.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.cuda.errors import check  # noqa: E402  (after the path: run as a script)
from workers.inject import MODULE_KERNELS, MODULE_SOURCE  # noqa: E402  (the lazy_module injection's module)

#: The core every launch-cost process runs on.
PROBE_CORE = 2


def _entries() -> list[dict[str, Any]]:
    from workers.driver_journal import JOURNAL

    JOURNAL.sync()
    return [
        {
            "op": e.op,
            "api": e.api,
            "thread": e.thread,
            "library": e.library,
            "source": e.source,
            "t0_ns": e.t0_ns,
            "t1_ns": e.t1_ns,
            "dur_us": (e.t1_ns - e.t0_ns) / 1e3,
            "fault": e.fault,
        }
        for e in JOURNAL.since(0)
    ]


def basic() -> dict[str, Any]:
    import numpy as np
    from cuda.bindings import driver

    from workers import cupti_journal
    from workers.cuda import memory
    from workers.cuda.context import get_context
    from workers.driver_journal import JOURNAL

    out: dict[str, Any] = {}
    cj = cupti_journal.start("cupti")
    ctx = get_context("spin")
    cupti_journal.verify(lambda: memory.PinnedBuffer(4096, "journal check").free())
    out["mode"], out["note"] = JOURNAL.mode, JOURNAL.note
    try:
        from importlib.metadata import version

        from cuda.pathfinder import load_nvidia_dynamic_lib

        out["libcupti"] = str(load_nvidia_dynamic_lib("cupti"))
        out["cupti_python"] = version("cupti-python")
    except Exception as exc:
        out["libcupti"] = f"{type(exc).__name__}: {exc}"
    out["stats_after_verify"] = cj.stats() if cj else None
    JOURNAL.mark_ready()
    calls: dict[str, tuple[int, int]] = {}
    buf = np.ones(64 << 20, dtype=np.uint8)

    def register() -> None:
        ctx.make_current()
        ptr = buf.ctypes.data
        a = time.monotonic_ns()
        check(driver.cuMemHostRegister(ptr, buf.nbytes, 0), "cuMemHostRegister")
        b = time.monotonic_ns()
        check(driver.cuMemHostUnregister(ptr), "cuMemHostUnregister")
        c = time.monotonic_ns()
        calls["register"] = (a, b)
        calls["unregister"] = (b, c)

    # Each library thread lives until the journal was flushed, as a library's thread does: a thread gone by
    # then is named by the kernel's name for it (python3 here), not Python's.
    called, flushed = threading.Event(), threading.Event()

    def lives_until_flushed(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            finally:
                called.set()
                flushed.wait(30)

        return run

    def in_library_thread(fn: Any, name: str) -> None:
        called.clear()
        flushed.clear()
        t = threading.Thread(target=lives_until_flushed(fn), name=name)
        t.start()
        called.wait(60)
        JOURNAL.sync()
        flushed.set()
        t.join()

    in_library_thread(register, "library-register")
    try:
        import torch

        def torch_alloc() -> None:
            x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
            del x
            torch.cuda.synchronize()
            a = time.monotonic_ns()
            torch.cuda.empty_cache()
            y = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
            b = time.monotonic_ns()
            del y
            torch.cuda.empty_cache()
            calls["torch_alloc"] = (a, b)

        in_library_thread(torch_alloc, "library-torch")
    except ImportError as exc:
        out["torch"] = f"not installed: {exc}"
    entries = _entries()
    out["entries_after_ready"] = [e for e in entries if e["fault"]]
    out["faults"] = JOURNAL.faults
    # clock alignment: the CUPTI (or merged) entry of each call vs the caller's own readings
    align: dict[str, Any] = {}
    for name, (a, b) in calls.items():
        want = "host_register" if name == "register" else "host_unregister" if name == "unregister" else None
        cands = [
            e
            for e in entries
            if e["fault"]
            and (e["op"] == want if want else e["op"] == "device_alloc")
            and e["t0_ns"] >= a - 5_000_000
        ]
        if cands:
            e = min(cands, key=lambda e: abs(e["t0_ns"] - a))
            align[name] = {
                "api": e["api"],
                "thread": e["thread"],
                "library": e["library"],
                "cupti_start_minus_caller_us": (e["t0_ns"] - a) / 1e3,
                "caller_end_minus_cupti_end_us": (b - e["t1_ns"]) / 1e3,
                "dur_us": e["dur_us"],
            }
        else:
            align[name] = None
    out["alignment"] = align
    # empty flush cost
    n = 2000
    a = time.perf_counter_ns()
    for _ in range(n):
        JOURNAL.sync()
    out["empty_flush_us"] = (time.perf_counter_ns() - a) / n / 1e3
    out["stats"] = cj.stats() if cj else None
    return out


def lazy() -> dict[str, Any]:
    from cuda.bindings import driver

    from workers import cupti_journal
    from workers.cuda import memory
    from workers.cuda.context import get_context
    from workers.cuda.module import compile_cubin
    from workers.driver_journal import JOURNAL

    cupti_journal.start("cupti")
    ctx = get_context("spin")
    cupti_journal.verify(lambda: memory.PinnedBuffer(4096, "journal check").free())
    cubin = compile_cubin(MODULE_SOURCE, "probe.cu", ctx.info.arch)
    dev = check(driver.cuMemAlloc(256), "cuMemAlloc")
    stream = check(driver.cuStreamCreate(0), "cuStreamCreate")
    JOURNAL.mark_ready()
    t0 = time.monotonic_ns()
    mod = check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
    t1 = time.monotonic_ns()
    arg = ctypes.c_void_p(int(dev))
    params = (ctypes.c_void_p * 1)(ctypes.addressof(arg))
    for i in range(MODULE_KERNELS):
        fn = check(driver.cuModuleGetFunction(mod, f"k{i}".encode()), "cuModuleGetFunction")
        check(
            (driver.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, stream, ctypes.addressof(params), 0)[0], None),
            "launch",
        )
    t2 = time.monotonic_ns()
    check(driver.cuStreamSynchronize(stream), "sync")
    check(driver.cuModuleUnload(mod), "unload")
    entries = [e for e in _entries() if e["fault"]]
    return {
        "loading_mode": ctx.loading_mode,
        "module_load_us": (t1 - t0) / 1e3,
        "first_launches_us": (t2 - t1) / 1e3,
        "by_op": {op: sum(1 for e in entries if e["op"] == op) for op in {e["op"] for e in entries}},
        "lazy_entries": [e for e in entries if e["op"] == "lazy_load"][:5],
        "lazy_total_us": sum(e["dur_us"] for e in entries if e["op"] == "lazy_load"),
        "all": entries[:12],
    }


class _Graph:
    """The 50-kernel module, a stream, kernel k0's parameters and a graph of 8 launches of it (a small
    model's), made once before the measured loops."""

    def __init__(self, ctx: Any) -> None:
        from cuda.bindings import driver

        from workers.cuda.module import compile_cubin

        self.cubin = compile_cubin(MODULE_SOURCE, "probe.cu", ctx.info.arch)
        mod = check(driver.cuModuleLoadData(self.cubin), "cuModuleLoadData")
        self.fn = check(driver.cuModuleGetFunction(mod, b"k0"), "cuModuleGetFunction")
        self.stream = check(driver.cuStreamCreate(0), "cuStreamCreate")
        self.arg = ctypes.c_void_p(int(check(driver.cuMemAlloc(256), "cuMemAlloc")))
        self.params = (ctypes.c_void_p * 1)(ctypes.addressof(self.arg))
        self.pp = ctypes.addressof(self.params)
        mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL
        check(driver.cuStreamBeginCapture(self.stream, mode), "cuStreamBeginCapture")
        for _ in range(8):
            driver.cuLaunchKernel(self.fn, 1, 1, 1, 1, 1, 1, 0, self.stream, self.pp, 0)
        graph = check(driver.cuStreamEndCapture(self.stream), "cuStreamEndCapture")
        self.gexec = check(driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")


def _bare() -> None:
    """Switch every callback and record off again after start: CUPTI subscribed with nothing enabled."""
    from workers import cupti_journal

    cj = cupti_journal.active()
    if cj is None:
        return
    if cj.activity:
        cj.cupti.activity_disable(cj.cupti.ActivityKind.OVERHEAD)
    cj.enable_functions(runtime=True, on=False)


def _load_torch_model() -> str:
    """Import torch and run the bert-tiny ExportedProgram once (models/bert-tiny.ep.pt2), as a torch worker
    does before READY: thousands of kernels loaded in the process. Returns what was loaded."""
    import torch

    path = ROOT / "models" / "bert-tiny.ep.pt2"
    torch.cuda.init()
    ids = torch.zeros((16, 128), dtype=torch.int64, device="cuda")
    if path.is_file():
        mod = torch.export.load(str(path)).module()
        with torch.no_grad():
            mod(ids, torch.ones_like(ids))
        what = f"torch {torch.__version__} + {path.name}"
    else:
        (ids.float() @ torch.ones((128, 128), device="cuda")).sum().item()
        what = f"torch {torch.__version__} (no {path.name}: one matmul)"
    torch.cuda.synchronize()
    return what


def lazy_serve() -> dict[str, Any]:
    """A serving-like loop (graph launches on the main thread) beside the lazy_module injection, CUPTI on
    and recording the injecting thread's launches too: which records overlap each slow launch."""
    from cuda.bindings import driver

    from workers import cupti_journal
    from workers.cuda import memory
    from workers.cuda.context import get_context
    from workers.driver_journal import JOURNAL

    cj = cupti_journal.start("cupti")
    assert cj is not None
    ctx = get_context("spin")
    cupti_journal.verify(lambda: memory.PinnedBuffer(4096, "journal check").free())
    cupti = cj.cupti
    launch_ids = {
        int(m): m.name
        for m in cupti.Driver_api_trace_cbid
        if m.name.startswith(("cuLaunchKernel", "cuGraphLaunch"))
    }
    seen: list[tuple[str, int, int, int]] = []  # launches CUPTI recorded: (api, tid, t0, t1)
    original = cj._completed

    def completed(acts: list[Any]) -> None:
        assert cj.clock is not None
        for a in acts:
            if int(a.kind) == int(cupti.ActivityKind.DRIVER) and int(a.cbid) in launch_ids:
                seen.append(
                    (launch_ids[int(a.cbid)], int(a.thread_id), cj.clock(int(a.start)), cj.clock(int(a.end)))
                )
        original(acts)

    cupti.activity_register_callbacks(cj._requested, completed)
    for cbid in list(launch_ids):
        try:
            cupti.activity_enable_driver_api(cbid, 1)
        except Exception:  # ids this driver does not trace
            launch_ids.pop(cbid)
    g = _Graph(ctx)
    cubin, stream, pp, gexec = g.cubin, g.stream, g.pp, g.gexec
    driver.cuGraphLaunch(gexec, stream)
    driver.cuStreamSynchronize(stream)
    JOURNAL.mark_ready()
    stop = threading.Event()
    periods: list[tuple[int, int]] = []

    def inject() -> None:
        ctx.make_current()
        s2 = check(driver.cuStreamCreate(0), "cuStreamCreate")
        while not stop.wait(0.2):
            a = time.monotonic_ns()
            m = check(driver.cuModuleLoadData(cubin), "load")
            for i in range(MODULE_KERNELS):
                f = check(driver.cuModuleGetFunction(m, f"k{i}".encode()), "get")
                driver.cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, s2, pp, 0)
            driver.cuStreamSynchronize(s2)
            driver.cuModuleUnload(m)
            periods.append((a, time.monotonic_ns()))

    t = threading.Thread(target=inject, name="inject")
    t.start()
    spans: list[tuple[int, int]] = []
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        for _ in range(4):
            a = time.monotonic_ns()
            driver.cuGraphLaunch(gexec, stream)
            spans.append((a, time.monotonic_ns()))
        driver.cuStreamSynchronize(stream)
    stop.set()
    t.join()
    JOURNAL.sync()
    entries = JOURNAL.since(0)
    me = threading.get_native_id()
    slow = sorted((b - a, a, b) for a, b in spans if b - a > 300_000)[-12:]
    out: dict[str, Any] = {
        "launches": len(spans),
        "over_300us": sum(1 for a, b in spans if b - a > 300_000),
        "over_1ms": sum(1 for a, b in spans if b - a > 1_000_000),
        "inject_periods_ms": [round((b - a) / 1e6, 2) for a, b in periods][:10],
        "slow": [],
    }
    for d, a, b in slow:
        near: list[dict[str, Any]] = [
            {
                "op": e.name,
                "thread": e.thread,
                "from_launch_us": round((e.t0_ns - a) / 1e3),
                "dur_us": round((e.t1_ns - e.t0_ns) / 1e3),
            }
            for e in entries
            if e.t0_ns <= b + 200_000 and e.t1_ns >= a - 200_000
        ]
        near += [
            {
                "op": api,
                "thread": f"tid {tid}",
                "from_launch_us": round((x0 - a) / 1e3),
                "dur_us": round((x1 - x0) / 1e3),
            }
            for api, tid, x0, x1 in seen
            if tid != me and x0 <= b + 200_000 and x1 >= a - 200_000
        ][:8]
        out["slow"].append({"launch_us": round(d / 1e3), "overlapping": near[:16]})
    return out


def launch(journal: bool) -> dict[str, Any]:
    """Host cost of the serving thread's driver calls (from Python, as the worker makes them), with the
    journal off or in one variant (PROBE_VARIANT: a journal variant; "bare": subscribed with nothing enabled;
    "auto": on demand, never armed; "armed-late": armed after the context exists, as a stall arms it;
    "disarmed": armed late, then unsubscribed), all on one core (PROBE_CORE), optionally with torch and
    the bert-tiny program loaded first (PROBE_TORCH=1)."""
    from cuda.bindings import driver

    from workers import cupti_journal
    from workers.cuda import memory
    from workers.cuda.context import get_context

    variant = os.environ.get("PROBE_VARIANT", "callback") if journal else "off"
    os.sched_setaffinity(0, {PROBE_CORE})  # every process on one core: per-call costs vary with the core
    if journal:
        os.environ[cupti_journal.VARIANT_ENV] = (
            "callback" if variant in ("bare", "auto", "armed-late", "disarmed") else variant
        )
        # "auto": monitor.driver_journal = "auto" before any stall (CUPTI untouched); "armed-late": the same
        # once a stall armed it; "disarmed": armed late, then unsubscribed again
        cupti_journal.start("auto" if variant in ("auto", "armed-late", "disarmed") else "cupti")
    ctx = get_context("spin")
    res: dict[str, Any] = {"journal": journal, "variant": variant}
    if os.environ.get("PROBE_TORCH") == "1":
        res["torch"] = _load_torch_model()
    if journal:
        cupti_journal.verify(lambda: memory.PinnedBuffer(4096, "journal check").free())
        if variant == "bare":
            _bare()
        if variant in ("armed-late", "disarmed"):  # as a stall arms it, after the context exists
            cj = cupti_journal.active()
            assert cj is not None
            cj.arm()
            if variant == "disarmed":  # what unsubscribing again gives back
                cj.enable_functions(runtime=True, on=False)
                cj.cupti.unsubscribe(cj.subscriber)
            res["stats"] = cj.stats()
    g = _Graph(ctx)
    fn, stream, pp, gexec = g.fn, g.stream, g.pp, g.gexec
    host = memory.PinnedBuffer(1 << 16, "probe copies")
    dev = memory.DeviceBuffer(1 << 16, "probe copies")
    event = check(driver.cuEventCreate(0), "cuEventCreate")
    for name, call in (
        ("launch_kernel_ns", lambda: driver.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, stream, pp, 0)),
        ("graph_launch_ns", lambda: driver.cuGraphLaunch(gexec, stream)),
        ("memcpy_htod_ns", lambda: memory.copy_htod_async(dev.ptr, host.ptr, 8192, stream)),
        ("event_record_ns", lambda: driver.cuEventRecord(event, stream)),
    ):
        rounds = []
        for _ in range(5):
            n = 4000
            a = time.perf_counter_ns()
            for _ in range(n):
                call()
            rounds.append((time.perf_counter_ns() - a) / n)
            driver.cuStreamSynchronize(stream)
        res[name] = statistics.median(rounds)
    return res


def _child(what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", what]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:  # a flush that never returns would end here
        return {"error": "timed out after 60 s", "stderr": str(exc.stderr)[-3000:]}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "no JSON", "stdout": proc.stdout[-2000:], "stderr": proc.stderr[-2000:]}


def _launch_costs(env: dict[str, str], variants: tuple[str, ...]) -> dict[str, Any]:
    """Launch cost with the journal off and in each variant, three processes each, alternated: the runs
    and the median per variant."""
    runs = []
    for _ in range(int(os.environ.get("PROBE_ROUNDS", "3"))):
        runs.append(_child("launch-off", env))
        for v in variants:
            runs.append(_child("launch-on", {**env, "PROBE_VARIANT": v}))
    out: dict[str, Any] = {"launch_runs": runs}
    for key in ("launch_kernel_ns", "graph_launch_ns", "memcpy_htod_ns", "event_record_ns"):
        out[key] = {
            v: statistics.median(
                [r[key] for r in runs if r.get("variant") == v and key in r] or [float("nan")]
            )
            for v in ("off", *variants)
        }
    return out


def _emit(result: dict[str, Any], out: Path | None, name: str) -> None:
    """Print the result (its first 12,000 characters) and write it whole to OUT/name."""
    text = json.dumps(result, indent=1, default=str)
    print(text[:12000])
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--part",
        choices=("all", "cost", "torchcost", "lazy"),
        default="all",
        help="cost: launch cost per journal variant; torchcost: the same with torch and bert-tiny loaded "
        "first (two processes each); lazy: the lazy-loading diagnosis alone",
    )
    args = ap.parse_args()
    if args.child:
        fn = {
            "basic": basic,
            "lazy": lazy,
            "lazy-serve": lazy_serve,
            "launch-on": lambda: launch(True),
            "launch-off": lambda: launch(False),
        }
        print(json.dumps(fn[args.child](), default=str))
        return
    eager = {"CUDA_MODULE_LOADING": "EAGER"}
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        result["libcupti"] = str(load_nvidia_dynamic_lib("cupti"))
    except Exception as exc:
        result["libcupti"] = f"{type(exc).__name__}: {exc}"
    if args.part == "lazy":
        result["lazy_serve"] = _child("lazy-serve", {"CUDA_MODULE_LOADING": "LAZY"})
        _emit(result, args.out, "cupti-lazy.json")
        return
    if args.part == "torchcost":  # does a process with torch's kernels loaded pay more per call?
        variants = ("callback", "activity")
        result.update(_launch_costs({**eager, "PROBE_ROUNDS": "2", "PROBE_TORCH": "1"}, variants))
        _emit(result, args.out, "cupti-torchcost.json")
        return
    if args.part == "cost":  # launch cost: off and each journal variant, alternated
        result.update(_launch_costs(eager, ("callback", "auto", "armed-late", "disarmed")))
        result["lazy_serve"] = _child("lazy-serve", {"CUDA_MODULE_LOADING": "LAZY"})
        _emit(result, args.out, "cupti-cost.json")
        return
    result["basic"] = _child("basic", eager)
    print(json.dumps(result["basic"], indent=1, default=str)[:4000], flush=True)
    result["lazy"] = _child("lazy", {"CUDA_MODULE_LOADING": "LAZY"})
    print(json.dumps(result["lazy"], indent=1, default=str)[:3000], flush=True)
    result.update(_launch_costs(eager, ("callback",)))
    _emit(result, args.out, "cupti.json")


if __name__ == "__main__":
    main()
