"""The process-wide driver-operation journal: CUPTI activity records of every lock-taking CUDA call.

Runs in a GPU worker process. workers/cuda/ journals only the orchestrator's own calls; in a real
deployment the driver's write lock is mostly taken elsewhere: a library thread registering host memory,
torch's caching allocator growing, a lazy module load inside a library. CUPTI (NVIDIA's profiling
interface, through the official `cupti-python` bindings) records those from any thread and any library.

What is recorded, and what is not:
- Activity records of exactly the driver and runtime functions that take the write lock (LOCKING, by
  function name: memory allocation and free, host allocation and registration, module and library load
  and unload, graph instantiation and destruction, context and stream creation and destruction), plus
  CUPTI's overhead records of lazy function loading (a kernel's code loaded at its first launch).
  Launches, copies and synchronisation are left out: CUPTI keeps no record of them, so the serving
  thread's calls cost what they cost without the journal (measured: see docs/design.md).
- Each record carries the API function, start and end on CUPTI's clock (lined up with
  time.monotonic_ns() at every flush), and the calling thread's kernel id, named from Python's threads or
  /proc. CUPTI does not say which library made the call: the thread name is the clue.
- Records reach the journal when the serving thread flushes (DriverJournal.sync(): at every report and
  before a stall candidate is built). Otherwise CUPTI calls into Python only to ask for an empty buffer
  (_requested, which returns a constant): a 1 MiB buffer holds over 20,000 records, far more than the
  few lock-taking calls a worker makes between two reports.

start() attaches it to the journal before the engine loads (the threads CUPTI starts then are told apart
and, at READY, moved off the worker's cores: isolate()); before_ready() checks that it records. When CUPTI
cannot be used (not installed, no driver, another subscriber such as a profiler) the worker keeps the own
journal and status says why.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from workers.driver_journal import JOURNAL, DriverJournal, DriverOp

log = logging.getLogger(__name__)

#: What CUPTI records (a diagnostic switch, read once at start; `status --json` shows it): "full" (the driver
#: functions, their runtime twins, lazy-load overhead records), "no-runtime" (no runtime twins: a runtime
#: call's driver call inside it is still recorded), "no-overhead" (no lazy-load records), "driver-only".
VARIANT_ENV = "ORCHESTRATOR_CUPTI_VARIANT"
#: variant -> (runtime twins recorded, lazy-load overhead records recorded)
VARIANTS: dict[str, tuple[bool, bool]] = {
    "full": (True, True),
    "no-runtime": (False, True),
    "no-overhead": (True, False),
    "driver-only": (False, False),
}

#: Driver and runtime functions that take the driver's write lock, by name, and the journal's operation.
#: Stream-ordered allocation (cuMemAllocAsync, pools) is left out: it does not take the lock per call.
LOCKING: tuple[tuple[str, str], ...] = (
    (r"cuMemHostRegister|cudaHostRegister", "host_register"),
    (r"cuMemHostUnregister|cudaHostUnregister", "host_unregister"),
    (r"cuMemAllocHost|cuMemHostAlloc|cudaMallocHost|cudaHostAlloc", "pinned_alloc"),
    (r"cuMemFreeHost|cudaFreeHost", "pinned_free"),
    (
        r"cuMemAlloc(_v2|Pitch|Managed)?$|cuMemAlloc(Pitch)?_v2$|cuMemCreate|cuMemMap$|cuMemAddressReserve"
        r"|cuMemSetAccess|cuIpcOpenMemHandle|cuArray(3D)?Create|cuMipmappedArrayCreate|cuMemPoolCreate"
        r"|cudaMalloc(Pitch|Managed|Array|3D|3DArray|MipmappedArray)?(_v\d+)?$",
        "device_alloc",
    ),
    (
        r"cuMemFree(_v2)?$|cuMemRelease|cuMemUnmap$|cuMemAddressFree|cuIpcCloseMemHandle|cuArrayDestroy"
        r"|cuMipmappedArrayDestroy|cuMemPoolDestroy|cuMemPoolTrimTo"
        r"|cudaFree(Array|MipmappedArray)?(_v\d+)?$",
        "device_free",
    ),
    (r"cuModuleLoad|cuLibraryLoad|cuLinkComplete", "module_load"),
    (r"cuModuleUnload|cuLibraryUnload", "module_unload"),
    (r"cuGraphInstantiate|cudaGraphInstantiate", "graph_instantiate"),
    (r"cuGraphExecDestroy|cudaGraphExecDestroy", "graph_destroy"),
    (r"cuCtxCreate|cuDevicePrimaryCtxRetain|cuGreenCtxCreate", "context_create"),
    (r"cuCtxDestroy|cuDevicePrimaryCtxRelease|cuDevicePrimaryCtxReset|cuGreenCtxDestroy", "context_destroy"),
    (r"cuStreamCreate|cudaStreamCreate", "stream_create"),
    (r"cuStreamDestroy|cudaStreamDestroy", "stream_destroy"),
)
_LOCKING = [(re.compile(rf"^(?:{pat})"), op) for pat, op in LOCKING]
#: CUPTI overhead kinds that are the driver loading code on a launch's behalf.
LAZY_OVERHEADS = ("LAZY_FUNCTION_LOADING", "RUNTIME_TRIGGERED_MODULE_LOADING")
BUFFER_BYTES = 1 << 20


def _tids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def classify(name: str) -> str | None:
    """The journal operation of a CUDA driver or runtime function, or None when it takes no write lock."""
    if name.endswith("Async") or "Async_" in name:
        return None
    for pat, op in _LOCKING:
        if pat.match(name):
            return op
    return None


class CuptiUnavailable(Exception):
    """CUPTI cannot feed the journal here; the message says why in one line."""


class ThreadNames:
    """Kernel thread id -> name: Python's thread names first, else /proc's comm (a C++ library's thread)."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def __call__(self, tid: int) -> str:
        name = self._names.get(tid)
        if name is None:
            for t in threading.enumerate():
                if t.native_id == tid:
                    name = t.name
                    break
            else:
                try:
                    with open(f"/proc/self/task/{tid}/comm") as fh:
                        name = f"{fh.read().strip()} (tid {tid})"
                except OSError:
                    name = f"tid {tid}"
            self._names[tid] = name
        return name


class Clock:
    """CUPTI timestamps -> time.monotonic_ns(): the offset from the tightest of a few paired readings."""

    def __init__(self, cupti_now: Callable[[], int]) -> None:
        self._now = cupti_now
        self.offset_ns = 0
        self.uncertainty_ns = 0
        self.sync()

    def sync(self) -> None:
        best: tuple[int, int] | None = None
        for _ in range(5):
            a = time.monotonic_ns()
            c = self._now()
            b = time.monotonic_ns()
            if best is None or b - a < best[0]:
                best = (b - a, (a + b) // 2 - c)
        assert best is not None
        self.uncertainty_ns, self.offset_ns = best

    def __call__(self, t: int) -> int:
        return t + self.offset_ns


def entries_from(
    activities: list[Any], cupti: Any, names: dict[int, str], clock: Clock, thread_name: ThreadNames
) -> list[DriverOp]:
    """The journal entries of one CUPTI buffer (seq and fault are set by DriverJournal.add_foreign)."""
    kinds = cupti.ActivityKind
    api_kinds = (int(kinds.DRIVER), int(kinds.RUNTIME))
    lazy = {int(getattr(cupti.ActivityOverheadKind, k)) for k in LAZY_OVERHEADS}
    out: list[DriverOp] = []
    for a in activities:
        kind = int(a.kind)
        if kind in api_kinds:
            cbid = int(a.cbid)
            api = names.get(cbid if kind == api_kinds[0] else -cbid, "")  # runtime ids are kept negated
            op = classify(api) if api else None
            if op is None or not a.start:
                continue
            tid = int(a.thread_id)
        elif kind == int(kinds.OVERHEAD) and int(a.overhead_kind) in lazy:
            api = cupti.ActivityOverheadKind(int(a.overhead_kind)).name.lower()
            op = "lazy_load"
            try:
                tid = int(a.object_id.pt.thread_id)
            except AttributeError:
                tid = 0
        else:
            continue
        out.append(
            DriverOp(
                0, op, clock(int(a.start)), clock(int(a.end)), "", thread_name(tid), False, api, tid, "cupti"
            )
        )
    return out


class CuptiJournal:
    """Feeds a DriverJournal from CUPTI's activity records. One per process (CUPTI's callbacks are global)."""

    def __init__(self, journal: DriverJournal) -> None:
        self.journal = journal
        self.cupti: Any = None
        self.names: dict[int, str] = {}  # cbid -> function name (runtime cbids negated)
        self.clock: Clock | None = None
        self.thread_name = ThreadNames()
        self.records = 0  # journal entries delivered
        self.flushes = 0
        self.flush_ns = 0
        self.variant = os.environ.get(VARIANT_ENV) or "full"
        self.own_tids: set[int] = set()  # the threads CUPTI started (seen new right after start)
        self.moved: dict[int, list[int]] = {}  # ... and where isolate() moved them

    # --- set-up ------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.variant not in VARIANTS:
            raise CuptiUnavailable(f"{VARIANT_ENV}={self.variant!r}: expected one of {', '.join(VARIANTS)}")
        try:
            from cupti import cupti  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise CuptiUnavailable(
                f"cupti-python is not installed (pip install 'orchestrator[gpu]'): {exc}"
            ) from None
        except Exception as exc:  # the bindings load libcupti at import: a missing or broken library
            raise CuptiUnavailable(f"CUPTI could not be loaded: {type(exc).__name__}: {exc}") from None
        self.cupti = cupti
        before = _tids()
        try:
            cupti.set_thread_id_type(cupti.ActivityThreadIdType.SYSTEM)  # gettid(), as /proc and Python
            cupti.activity_register_callbacks(self._requested, self._completed)
            runtime, overhead = VARIANTS[self.variant]
            wanted = self.enable_functions(runtime)
            log.info("[journal] CUPTI records %d driver functions that take the write lock", wanted)
            if overhead:
                cupti.activity_enable(cupti.ActivityKind.OVERHEAD)
            self.clock = Clock(cupti.get_timestamp)
            cupti.activity_flush_all(
                0
            )  # a first flush, so threads CUPTI makes for it exist before the engine's
        except Exception as exc:
            self._disable_quietly()
            raise CuptiUnavailable(f"CUPTI refused the activity API: {type(exc).__name__}: {exc}") from None
        # Started before the engine, so nothing else in the process makes threads meanwhile.
        self.own_tids = _tids() - before - {t.native_id for t in threading.enumerate()}

    def enable_functions(self, runtime: bool, on: bool = True) -> int:
        """Switch records of the lock-taking driver functions (and, with `runtime`, their runtime twins) on
        or off; returns how many driver functions that is."""
        cupti = self.cupti
        if not self.names:
            for member in cupti.Driver_api_trace_cbid:
                self.names[int(member)] = member.name
            for member in cupti.Runtime_api_trace_cbid:
                self.names[-int(member)] = member.name
        n = 0
        for cbid, name in self.names.items():
            if cbid > 0 and classify(name):
                cupti.activity_enable_driver_api(cbid, int(on))
                n += 1
            elif cbid < 0 and runtime and classify(name):
                cupti.activity_enable_runtime_api(-cbid, int(on))
        return n

    # --- CUPTI callbacks (records are delivered on the flushing thread: the serving thread) -----------

    @staticmethod
    def _requested() -> tuple[int, int]:
        return BUFFER_BYTES, 0

    def _completed(self, activities: list[Any]) -> None:
        try:
            assert self.clock is not None
            ops = entries_from(activities, self.cupti, self.names, self.clock, self.thread_name)
            if ops:
                self.records += len(ops)
                self.journal.add_foreign(ops)
        except Exception:  # never let a journal problem reach CUPTI's caller
            log.exception("[journal] could not read a CUPTI buffer")

    # --- flushing ------------------------------------------------------------------------------------

    def flush(self, forced: bool = False) -> None:
        """Deliver every completed record now (the serving thread, a few times a second and on stalls);
        `forced` also hands over buffers CUPTI still fills (CUPTI_ACTIVITY_FLAG_FLUSH_FORCED)."""
        t0 = time.monotonic_ns()
        assert self.clock is not None
        self.clock.sync()
        self.cupti.activity_flush_all(1 if forced else 0)
        self.flushes += 1
        self.flush_ns += time.monotonic_ns() - t0

    def verify(self, probe: Callable[[], None]) -> str | None:
        """Run `probe` (a pinned allocation and free through workers/cuda) and check CUPTI saw it. Returns
        None when it did, else why not.

        On the H200, CUPTI started before the engine delivered the probe's records (and the engine's) at
        the first flush; started just before READY instead, the first flush delivered nothing. So the probe
        is tried up to three times, the last with a forced flush (incomplete buffers too). Falling back to
        the whole DRIVER kind (every function that takes no lock switched off again) was tried and dropped:
        docs/design.md, "Driver journal", says what it cost.
        """
        for attempt in range(3):
            before = self.records
            probe()
            self.flush(forced=attempt == 2)
            if self.records > before:
                return None
        return "CUPTI delivered no record of three pinned allocations made to test it"

    def isolate(self) -> None:
        """Move the threads CUPTI started in this process off the worker's cores.

        CUPTI runs threads of its own (two in a worker on the H200: buffer delivery, host-device
        bookkeeping) that inherit the worker's affinity and so compete with the serving thread for its
        cores. They go where the supervisor's threads are (the parent's cores), or else to any core that is
        not this worker's. Measured (docs/design.md, "Driver journal"): before the move, a clean 60 s run
        had 5 launches over 1 ms with CUPTI (each a 4.0 ms run-queue wait) and none with the own journal;
        after it, two 30 s pairs had 3 with CUPTI and 4 without: the host's own noise.
        """
        mine = os.sched_getaffinity(0)
        try:
            target = os.sched_getaffinity(os.getppid()) - mine
        except OSError:
            target = set()
        if not target:
            target = set(range(os.cpu_count() or 1)) - mine
        new = sorted(self.own_tids - set(self.moved))
        for tid in new:
            try:
                os.sched_setaffinity(tid, target or mine)
                self.moved[tid] = sorted(target or mine)
            except OSError:  # ended meanwhile, or cores we may not use
                pass
        if new:
            log.info("[journal] CUPTI's threads %s moved to cores %s", new, sorted(target))

    def stop(self) -> None:
        if self.cupti is None:
            return
        try:
            self.cupti.activity_flush_all(1)
        except Exception:
            pass
        self._disable_quietly()

    def _disable_quietly(self) -> None:
        cupti = self.cupti
        for kind in ("DRIVER", "RUNTIME", "OVERHEAD"):
            try:
                cupti.activity_disable(getattr(cupti.ActivityKind, kind))
            except Exception:
                pass

    def stats(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "records": self.records,
            "flushes": self.flushes,
            "flush_us_mean": round(self.flush_ns / self.flushes / 1e3, 2) if self.flushes else None,
            "clock_offset_ns": self.clock.offset_ns if self.clock else None,
            "clock_uncertainty_ns": self.clock.uncertainty_ns if self.clock else None,
            "cupti_threads": {str(t): self.thread_name(t) for t in self.moved},
            "cupti_threads_cores": sorted({c for cs in self.moved.values() for c in cs}),
        }


_ACTIVE: CuptiJournal | None = None
_MODE: str | None = None  # what start() was asked for; None until it ran


def start(mode: str, journal: DriverJournal = JOURNAL) -> CuptiJournal | None:
    """Attach CUPTI to the journal as `monitor.driver_journal` asks ("auto", "cupti", "own"). "cupti" raises
    CuptiUnavailable when it cannot; "auto" falls back and says why once. Idempotent: CUPTI's callbacks are
    process-wide, so a second engine in the process (the GPU tests) shares the first one's journal."""
    global _ACTIVE, _MODE
    if _MODE is not None:  # once per process: CUPTI's callbacks are process-wide
        return _ACTIVE
    _MODE = mode
    if mode == "own":
        journal.attach(
            "own",
            None,
            'monitor.driver_journal = "own": only the orchestrator\'s own calls ("auto" adds every library\'s, '
            "through CUPTI)",
        )
        return None
    if os.environ.get("CUDA_INJECTION64_PATH") or os.environ.get("NSYS_PROFILING_SESSION_ID"):
        why = "a profiler (Nsight) owns CUPTI in this process"
        if mode == "cupti":
            raise CuptiUnavailable(why)
        journal.attach("own", None, f"CUPTI not used: {why}")
        log.warning("[journal] own calls only: %s", why)
        return None
    cj = CuptiJournal(journal)
    try:
        cj.start()
    except CuptiUnavailable as exc:
        if mode == "cupti":
            raise
        journal.attach("own", None, f"CUPTI not used: {exc}")
        log.warning("[journal] own calls only: %s", exc)
        return None
    journal.attach("cupti", cj.flush)
    _ACTIVE = cj
    return cj


def verify(probe: Callable[[], None], journal: DriverJournal = JOURNAL) -> None:
    """Before READY: check CUPTI records what it should; if it does not, fall back to the own journal (or
    raise CuptiUnavailable under monitor.driver_journal = "cupti")."""
    global _ACTIVE
    cj = _ACTIVE
    if cj is None:
        return
    why = cj.verify(probe)
    if why is None:
        cj.isolate()  # CUPTI's threads exist by now (the first record and flush are done)
        log.info("[journal] CUPTI journal active: %s", cj.stats())
        return
    cj.stop()
    _ACTIVE = None
    if _MODE == "cupti":
        raise CuptiUnavailable(why)
    journal.attach("own", None, f"CUPTI not used: {why}")
    log.warning("[journal] own calls only: %s", why)


def before_ready(mode: str, probe: Callable[[], None], journal: DriverJournal = JOURNAL) -> None:
    """What a GPU engine does just before READY: check CUPTI with `probe` (starting it first where the
    worker did not, as in the in-process GPU tests) and move its threads off the worker's cores."""
    start(mode, journal)  # nothing to do where the worker started it already (or chose the own journal)
    verify(probe, journal)


def active() -> CuptiJournal | None:
    return _ACTIVE


def stop() -> None:
    global _ACTIVE, _MODE
    if _ACTIVE is not None:
        _ACTIVE.stop()
        _ACTIVE = None
    _MODE = None
