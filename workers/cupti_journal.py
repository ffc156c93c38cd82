"""The process-wide driver-operation journal: every lock-taking CUDA call in the worker, seen through CUPTI.

Runs in a GPU worker process. workers/cuda/ journals only the orchestrator's own calls; in a real
deployment the driver's write lock is mostly taken elsewhere: a library thread registering host memory,
torch's caching allocator growing, a lazy module load inside a library. CUPTI (NVIDIA's profiling
interface; the official `cupti-python` bindings name its functions) sees those from any thread and any
library.

How (VARIANTS; "callback" unless ORCHESTRATOR_CUPTI_VARIANT says otherwise):
- "callback": CUPTI's callback API, enabled for exactly the driver functions that take the write lock and
  their runtime twins (LOCKING, by name: memory allocation and free, host allocation and registration,
  module and library load and unload, graph instantiation and destruction, context and stream creation
  and destruction). The callback is compiled C (workers/cupti_callback.c, built once per host by
  workers/cupti_native.py): inside the caller's driver call it takes the time at entry and exit, the
  thread's kernel id and the return addresses, and writes a lock-free ring; it never enters Python.
  Launches, copies and synchronisation are never enabled, so they reach no callback. The return addresses
  name the calling library (libc10_cuda.so (torch), cuda.bindings...). Where kernels can load lazily
  (CUDA_MODULE_LOADING is not EAGER), CUPTI's OVERHEAD activity records add the lazy function loads,
  which no API call shows.
- "activity": the journal before the callback, kept to compare against: activity records of the same
  functions (cuptiActivityEnableDriverApi) plus the lazy-load overhead records, delivered in buffers.
  It cost bert-tiny 60-170 us of host time a batch (docs/design.md, "Driver journal").
Records reach the journal when the serving thread flushes (DriverJournal.sync(): at every report and
before a stall candidate is built).

When (monitor.driver_journal):
- "auto" (the default): on demand. start() only checks that cupti-python is installed and builds the
  callback; nothing of CUPTI is loaded. The first stall that looks like a lock wait (on_stall():
  an enqueue stall whose launch was blocked, not waiting for a core) attaches and arms it for good: once
  attached, CUPTI makes every driver call slower, and unsubscribing did not give that back (measured:
  docs/design.md, "Driver journal"). The stall that armed it says so; the next ones name the operation.
- "cupti": attached by start() before the engine loads (threads CUPTI starts then are told apart and, at
  READY, moved off the worker's cores: isolate()); before_ready() checks that it records.
When CUPTI cannot be used (not installed, no driver, no C compiler for the callback, another subscriber
such as a profiler) the worker keeps the own journal and status says why.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from workers.driver_journal import JOURNAL, DriverJournal, DriverOp

log = logging.getLogger(__name__)

#: How CUPTI feeds the journal (a diagnostic switch, read once at start; `status --json` shows it).
VARIANT_ENV = "ORCHESTRATOR_CUPTI_VARIANT"
VARIANTS: dict[str, str] = {
    "callback": "CUPTI's callback API for the lock-taking functions, a compiled callback (the default)",
    "callback-driver": "the callback for the driver functions only, not their runtime twins (to compare)",
    "activity": "CUPTI's activity records of the lock-taking functions (the journal before; to compare)",
}
#: CUPTI's callback domains (CUpti_CallbackDomain)
DOMAIN_DRIVER, DOMAIN_RUNTIME = 1, 2

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


def locking_functions(names: dict[int, str]) -> dict[int, tuple[str, str]]:
    """The lock-taking functions among CUPTI's (cbid -> name; runtime cbids negated): cbid -> (name,
    operation). Classified once, when the journal is switched on, not per record on the serving thread."""
    out: dict[int, tuple[str, str]] = {}
    for cbid, name in names.items():
        op = classify(name)
        if op is not None:
            out[cbid] = (name, op)
    return out


class CuptiUnavailable(Exception):
    """CUPTI cannot feed the journal here; the message says why in one line."""


class ThreadNames:
    """Kernel thread id -> name: Python's thread names first, else the kernel's (the `comm` the callback
    recorded, or /proc's): a C++ library's thread, or one that ended before the journal was flushed."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def __call__(self, tid: int, comm: str = "") -> str:
        name = self._names.get(tid)
        if name is None:
            for t in threading.enumerate():
                if t.native_id == tid:
                    name = t.name
                    break
            else:
                if not comm:
                    try:
                        with open(f"/proc/self/task/{tid}/comm") as fh:
                            comm = fh.read().strip()
                    except OSError:
                        pass
                name = f"{comm} (tid {tid})" if comm else f"tid {tid}"
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
    activities: list[Any],
    cupti: Any,
    locking: dict[int, tuple[str, str]],
    clock: Clock,
    thread_name: ThreadNames,
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
            fn = locking.get(cbid if kind == api_kinds[0] else -cbid)  # runtime ids are kept negated
            if fn is None or not a.start:
                continue
            api, op = fn
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


def entries_from_callbacks(
    records: list[Any],
    locking: dict[int, tuple[str, str]],
    thread_name: ThreadNames,
    caller: Callable[[Any], str],
) -> list[DriverOp]:
    """The journal entries of the compiled callback's records (workers/cupti_native.OpRecord): already on
    the monotonic clock; `caller` names the library that made the call."""
    out: list[DriverOp] = []
    for r in records:
        cbid = int(r.cbid)
        fn = locking.get(cbid if r.domain == DOMAIN_DRIVER else -cbid)
        if fn is None:
            continue
        api, op = fn
        tid = int(r.tid)
        out.append(
            DriverOp(
                0,
                op,
                int(r.start_ns),
                int(r.end_ns),
                "",
                thread_name(tid, r.comm.decode(errors="replace")),
                False,
                api,
                tid,
                "cupti",
                caller(r),
            )
        )
    return out


class CuptiJournal:
    """Feeds a DriverJournal from CUPTI. One per process (CUPTI's callbacks are global)."""

    def __init__(self, journal: DriverJournal) -> None:
        self.journal = journal
        self.cupti: Any = None
        self.locking: dict[int, tuple[str, str]] = {}  # cbid (runtime negated) -> (function, operation)
        self.clock: Clock | None = None  # CUPTI's activity clock, where activity records are used
        self.thread_name = ThreadNames()
        self.records = 0  # journal entries delivered
        self.flushes = 0
        self.flush_ns = 0
        self.variant = os.environ.get(VARIANT_ENV) or "callback"
        self.native: Any = None  # workers.cupti_native.Native, in the callback variant
        self.subscriber: int | None = None  # the callback's CUPTI subscription
        self.activity = False  # activity records in use (the activity variant, or lazy-load records)
        self.on_demand = False  # "auto": attached and armed by the first lock-like stall (arm())
        self.armed = False  # attached to the driver, the lock-taking functions journaled (for good)
        self.arm_us = 0.0  # what arming took
        self.own_tids: set[int] = set()  # the threads CUPTI started (seen new right after start)
        self.moved: dict[int, list[int]] = {}  # ... and where isolate() moved them
        self._drain_lock = threading.Lock()

    # --- set-up ------------------------------------------------------------------------------------

    def start(self, attach: bool = True) -> None:
        """Load CUPTI's bindings and build the callback; with `attach`, also attach to the driver now (the
        journal armed). Without it ("auto") CUPTI is not even loaded until a stall arms it: once attached,
        CUPTI leaves the driver slower (cuGraphLaunch 1.0-1.6 us a call on the H200 after unsubscribing)."""
        if self.variant not in VARIANTS:
            raise CuptiUnavailable(f"{VARIANT_ENV}={self.variant!r}: expected one of {', '.join(VARIANTS)}")
        if attach:
            self._import_cupti()
        elif not cupti_installed():  # "auto": not even loaded until a stall asks for it
            raise CuptiUnavailable("cupti-python is not installed (pip install 'orchestrator[gpu]')")
        if self.variant.startswith("callback"):  # built (or found in the cache) before CUPTI is touched
            from workers import cupti_native

            try:
                self.native = cupti_native.load()
            except cupti_native.NativeUnavailable as exc:
                raise CuptiUnavailable(str(exc)) from None
        if attach:
            self._attach()

    def _import_cupti(self) -> None:
        """cupti-python's bindings (they load libcupti)."""
        if self.cupti is not None:
            return
        try:
            from cupti import cupti  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise CuptiUnavailable(
                f"cupti-python is not installed (pip install 'orchestrator[gpu]'): {exc}"
            ) from None
        except Exception as exc:  # the bindings load libcupti at import: a missing or broken library
            raise CuptiUnavailable(f"CUPTI could not be loaded: {type(exc).__name__}: {exc}") from None
        self.cupti = cupti

    def _attach(self) -> None:
        """Attach to the driver: subscribe the callback (or start activity records), lazy-load records where
        kernels can load lazily, and switch the lock-taking functions on. CUPTI's new threads are noted."""
        self._import_cupti()
        cupti, native = self.cupti, self.native
        before = _tids()
        try:
            cupti.get_timestamp()  # loads libcupti and finds the driver: a clear error here if either is missing
            if native is not None:
                self.subscriber = self._subscribe(native.callback_ptr)
            if native is None or lazy_loading_possible():
                self._start_activity()
            wanted = self.enable_functions(runtime=self.variant != "callback-driver")
            self.armed = True
            log.info(
                "[journal] CUPTI (%s) journals %d driver functions that take the write lock%s",
                self.variant,
                wanted,
                ", and lazy function loads" if self.activity else "",
            )
        except CuptiUnavailable:
            self._disable_quietly()
            raise
        except Exception as exc:
            self._disable_quietly()
            raise CuptiUnavailable(f"CUPTI refused the journal: {type(exc).__name__}: {exc}") from None
        # Nothing else in the process makes threads meanwhile (before the engine, or on the serving thread)
        self.own_tids |= _tids() - before - {t.native_id for t in threading.enumerate()}

    def _subscribe(self, callback_ptr: int) -> int:
        """cuptiSubscribe with the compiled callback, through ctypes (cupti-python's subscribe takes a
        Python callable). Returns the subscriber handle cupti-python's enable_callback takes."""
        lib = ctypes.CDLL(_libcupti_path())
        lib.cuptiSubscribe.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_void_p]
        lib.cuptiSubscribe.restype = ctypes.c_int
        handle = ctypes.c_void_p()
        rc = lib.cuptiSubscribe(ctypes.byref(handle), callback_ptr, None)
        if rc != 0:
            try:
                name = self.cupti.Result(rc).name
            except Exception:
                name = str(rc)
            why = " (another tool, such as a profiler, subscribed first)" if "MULTIPLE" in name else ""
            raise CuptiUnavailable(f"cuptiSubscribe refused the journal's callback: {name}{why}")
        assert handle.value is not None
        return int(handle.value)

    def _start_activity(self) -> None:
        """Activity records: the lock-taking functions' (activity variant) and lazy function loads."""
        cupti = self.cupti
        cupti.set_thread_id_type(cupti.ActivityThreadIdType.SYSTEM)  # gettid(), as /proc and Python
        cupti.activity_register_callbacks(self._requested, self._completed)
        cupti.activity_enable(cupti.ActivityKind.OVERHEAD)
        self.activity = True
        self.clock = Clock(cupti.get_timestamp)
        cupti.activity_flush_all(0)  # a first flush, so threads CUPTI makes for it exist before the engine's

    def enable_functions(self, runtime: bool, on: bool = True) -> int:
        """Switch the journal on or off for the lock-taking driver functions (and, with `runtime`, their
        runtime twins): callbacks in the callback variant, activity records in the other. Returns how many
        driver functions that is."""
        cupti = self.cupti
        if not self.locking:
            names = {int(m): m.name for m in cupti.Driver_api_trace_cbid}
            names.update({-int(m): m.name for m in cupti.Runtime_api_trace_cbid})
            self.locking = locking_functions(names)
        n = 0
        for cbid in self.locking:
            if cbid < 0 and not runtime:
                continue
            if self.subscriber is not None:
                domain = DOMAIN_DRIVER if cbid > 0 else DOMAIN_RUNTIME
                cupti.enable_callback(int(on), self.subscriber, domain, abs(cbid))
            elif cbid > 0:
                cupti.activity_enable_driver_api(cbid, int(on))
            else:
                cupti.activity_enable_runtime_api(-cbid, int(on))
            n += cbid > 0
        return n

    # --- on demand ("auto"): attached and armed by the first lock-like stall ---------------------------

    def arm(self) -> None:
        """Attach CUPTI and journal the lock-taking functions from now on (the serving thread, right after
        a stall). It stays armed: measured, unsubscribing again left the driver calls as slow as armed or
        slower (docs/design.md, "Driver journal"), and later stalls are then named."""
        if self.armed:
            return
        t0 = time.monotonic_ns()
        self._attach()
        self.isolate()
        self.arm_us = (time.monotonic_ns() - t0) / 1e3

    # --- CUPTI callbacks (records are delivered on the flushing thread: the serving thread) -----------

    @staticmethod
    def _requested() -> tuple[int, int]:
        return BUFFER_BYTES, 0

    def _completed(self, activities: list[Any]) -> None:
        try:
            assert self.clock is not None
            ops = entries_from(activities, self.cupti, self.locking, self.clock, self.thread_name)
            if ops:
                self.records += len(ops)
                self.journal.add_foreign(ops)
        except Exception:  # never let a journal problem reach CUPTI's caller
            log.exception("[journal] could not read a CUPTI buffer")

    # --- flushing ------------------------------------------------------------------------------------

    def flush(self, forced: bool = False) -> None:
        """Deliver every record made so far (the serving thread, a few times a second and on stalls): the
        callback's ring, then any activity buffers; `forced` also hands over activity buffers CUPTI still
        fills (CUPTI_ACTIVITY_FLAG_FLUSH_FORCED)."""
        t0 = time.monotonic_ns()
        if self.native is not None:
            with self._drain_lock:
                recs = self.native.drain()
                ops = (
                    entries_from_callbacks(recs, self.locking, self.thread_name, self.native.caller)
                    if recs
                    else []
                )
            if ops:
                self.records += len(ops)
                self.journal.add_foreign(ops)
        if self.activity:
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
            self.flush(forced=True)
        except Exception:
            pass
        self._disable_quietly()

    def _disable_quietly(self) -> None:
        cupti = self.cupti
        if cupti is None:
            return
        if self.subscriber is not None:
            try:
                cupti.unsubscribe(self.subscriber)
            except Exception:
                pass
            self.subscriber = None
        for kind in ("DRIVER", "RUNTIME", "OVERHEAD"):
            try:
                cupti.activity_disable(getattr(cupti.ActivityKind, kind))
            except Exception:
                pass
        self.activity = False

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "variant": self.variant,
            "records": self.records,
            "flushes": self.flushes,
            "flush_us_mean": round(self.flush_ns / self.flushes / 1e3, 2) if self.flushes else None,
            "lazy_load_records": self.activity,
            "on_demand": self.on_demand,
            "armed": self.armed,
            "arm_us": round(self.arm_us, 1),
        }
        if self.native is not None:
            ring = self.native.stats()
            out["callback_dropped"] = ring["dropped"]
            out["callback_library"] = str(self.native.path)
        if self.clock is not None:
            out["clock_offset_ns"] = self.clock.offset_ns
            out["clock_uncertainty_ns"] = self.clock.uncertainty_ns
        out["cupti_threads"] = {str(t): self.thread_name(t) for t in self.moved}
        out["cupti_threads_cores"] = sorted({c for cs in self.moved.values() for c in cs})
        return out


def cupti_installed() -> bool:
    """cupti-python can be imported (without importing it: that loads libcupti)."""
    if sys.modules.get("cupti") is not None:
        return True
    try:
        return importlib.util.find_spec("cupti") is not None
    except (ImportError, ValueError):
        return False


def lazy_loading_possible() -> bool:
    """Kernels may load at their first launch: CUDA_MODULE_LOADING is not EAGER (the driver's default
    is LAZY; the supervisor starts workers EAGER)."""
    return os.environ.get("CUDA_MODULE_LOADING", "").upper() != "EAGER"


def _libcupti_path() -> str:
    """The libcupti cupti-python loaded (the callback must subscribe to the same CUPTI), from the process's
    mappings; else the one cuda-pathfinder finds."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.rsplit(None, 1)[-1]
                if "/libcupti.so" in path:
                    return path
    except OSError:
        pass
    from cuda.pathfinder import load_nvidia_dynamic_lib

    found = load_nvidia_dynamic_lib("cupti")
    if not found.abs_path:
        raise CuptiUnavailable("libcupti is loaded but its path is not known")
    return str(found.abs_path)


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
        cj.start(attach=mode == "cupti")
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
    if not cj.armed:  # "auto": CUPTI stays untouched until a stall that looks like a lock wait
        cj.on_demand = True
        journal.note = (
            "CUPTI on demand: attached at the first launch blocked like a lock wait, then armed for good "
            '("cupti": armed from start-up)'
        )
        log.info("[journal] CUPTI ready on demand (callback %s)", getattr(cj.native, "path", "-"))
        return
    why = cj.verify(probe)
    if why is None:
        cj.isolate()  # CUPTI's threads exist by now (the first record and flush are done)
        log.info("[journal] CUPTI journal ready: %s", cj.stats())
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


#: A launch blocked at least this long (off the CPU, not waiting to run) arms the on-demand journal.
ARM_BLOCKED_US = 500.0


def looks_like_a_lock(candidate: dict[str, Any]) -> bool:
    """A stall the driver's lock could explain: the launch itself was slow (an enqueue stall) and its thread
    slept, not waiting for a core and not robbed of it. Run-queue waits (the host's noise; cpu_preemption),
    time taken without a switch (cpu_stolen: the hypervisor or interrupts) and slow GPU work leave CUPTI
    unattached: measured, a clean 60 s run had seven 4-6 ms run-queue stalls, and arming on them cost the
    serving thread 5.5 us a batch for nothing. A lock wait sleeps in the kernel: on an H200, 329 of 330
    launches blocked behind a journaled driver operation counted a voluntary switch."""
    if "enqueue" not in (candidate.get("kind") or ()):
        return False
    probe = candidate.get("probe_launch") or {}
    blocked = float(probe.get("blocked_us") or 0.0)
    return (
        blocked >= ARM_BLOCKED_US
        and blocked > float(probe.get("runq_us") or 0.0)
        and int(probe.get("vcsw") or 0) > 0
    )


def on_stall(candidate: dict[str, Any]) -> bool:
    """The serving thread built a stall candidate: under "auto", when it looks like a lock wait and the
    journal is not armed yet, arm it so the next such stalls name the operation. Returns True when this
    call armed it."""
    cj = _ACTIVE
    if cj is None or not cj.on_demand or cj.armed or not looks_like_a_lock(candidate):
        return False
    try:
        cj.arm()
    except Exception as exc:  # CUPTI refused now: keep serving on the own journal, say so once
        _give_up(cj, f"CUPTI could not be armed: {type(exc).__name__}: {exc}")
        return False
    probe = candidate.get("probe_launch") or {}
    cj.journal.note = (
        f"CUPTI armed at {time.strftime('%H:%M:%S')} by a launch blocked "
        f"{float(probe.get('blocked_us') or 0) / 1e3:.1f} ms; it stays armed"
    )
    log.info(
        "[journal] CUPTI armed by a stall (took %.0f us): the next stalls name the driver operation",
        cj.arm_us,
    )
    return True


def _give_up(cj: CuptiJournal, why: str) -> None:
    """CUPTI failed mid-run: back to the own journal, and say so (status shows the journal's note)."""
    cj.on_demand = False
    cj.journal.attach("own", None, why)
    log.warning("[journal] %s; own calls only", why)


def active() -> CuptiJournal | None:
    return _ACTIVE


def stop() -> None:
    global _ACTIVE, _MODE
    if _ACTIVE is not None:
        _ACTIVE.stop()
        _ACTIVE = None
    _MODE = None
