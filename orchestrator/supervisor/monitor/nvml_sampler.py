"""NVML telemetry per GPU (fast loop: clocks, power, temperature, reasons; slow loop: fields, processes)
and GPU discovery. Runs in the supervisor on threads `nvml-fast` and `nvml-slow`; pynvml is imported lazily,
and without it or a driver the monitor says so once and goes on."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

from orchestrator.common.errors import UnavailableError

log = logging.getLogger(__name__)

# (name, pynvml constant names newest first, bit to use when the installed pynvml lacks the names).
# nvml.h names some bits only as ...ThrottleReason..., newer ones only as ...EventReason... (MONITORING.md 1.3).
_REASONS: tuple[tuple[str, tuple[str, ...], int | None], ...] = (
    ("gpu_idle", ("nvmlClocksEventReasonGpuIdle", "nvmlClocksThrottleReasonGpuIdle"), 0x1),
    (
        "clocks_setting",
        (
            "nvmlClocksEventReasonApplicationsClocksSetting",
            "nvmlClocksThrottleReasonApplicationsClocksSetting",
        ),
        0x2,
    ),
    ("sw_power_cap", ("nvmlClocksEventReasonSwPowerCap", "nvmlClocksThrottleReasonSwPowerCap"), 0x4),
    ("hw_slowdown", ("nvmlClocksEventReasonHwSlowdown", "nvmlClocksThrottleReasonHwSlowdown"), 0x8),
    ("sync_boost", ("nvmlClocksEventReasonSyncBoost", "nvmlClocksThrottleReasonSyncBoost"), 0x10),
    (
        "sw_thermal",
        ("nvmlClocksEventReasonSwThermalSlowdown", "nvmlClocksThrottleReasonSwThermalSlowdown"),
        0x20,
    ),
    (
        "hw_thermal",
        ("nvmlClocksEventReasonHwThermalSlowdown", "nvmlClocksThrottleReasonHwThermalSlowdown"),
        0x40,
    ),
    (
        "hw_power_brake",
        ("nvmlClocksEventReasonHwPowerBrakeSlowdown", "nvmlClocksThrottleReasonHwPowerBrakeSlowdown"),
        0x80,
    ),
    (
        "display_clocks",
        ("nvmlClocksEventReasonDisplayClockSetting", "nvmlClocksThrottleReasonDisplayClockSetting"),
        0x100,
    ),
    ("board_limit", ("nvmlClocksEventReasonBoardLimit", "nvmlClocksThrottleReasonBoardLimit"), None),
    ("reliability", ("nvmlClocksEventReasonReliability", "nvmlClocksThrottleReasonReliability"), None),
)
REASON_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _REASONS)
# Field ids read by the slow loop; the counters are cumulative nanoseconds spent in each reason.
_MEM_TEMP_FIELD = ("NVML_FI_DEV_MEMORY_TEMP", 82)
_COUNTER_FIELDS = (
    ("sw_power_cap", "NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP", 74),
    ("sync_boost", "NVML_FI_DEV_CLOCKS_EVENT_REASON_SYNC_BOOST", 76),
    ("sw_thermal", "NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN", 269),
    ("hw_thermal", "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN", 270),
    ("hw_power_brake", "NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN", 271),
)
_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
# Errors meaning "this GPU or driver cannot answer this call": stop asking.
_UNSUPPORTED = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_NO_PERMISSION")
MPS_SERVER = "nvidia-cuda-mps-server"

_unavailable_logged = False
_unavailable_lock = threading.Lock()


def log_unavailable_once(reason: str) -> None:
    """Say once per process that GPU telemetry is off, and why."""
    global _unavailable_logged
    with _unavailable_lock:
        if _unavailable_logged:
            return
        _unavailable_logged = True
    log.warning(
        "[monitor] GPU telemetry unavailable (%s): serving and host/worker metrics go on without it", reason
    )


def load_nvml(module: Any = None) -> tuple[Any, str | None]:
    """(initialised pynvml-like module, None) or (None, why not). `module` injects a stand-in (tests)."""
    if module is None:
        try:
            import pynvml  # lazy: CPU hosts need not have nvidia-ml-py
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install 'orchestrator[gpu]')"
        module = pynvml
    try:
        module.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, OSError from ctypes...
        return None, f"nvmlInit failed: {exc}"
    return module, None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def reason_table(nvml: Any) -> list[tuple[int, str]]:
    """(bit, name) for every clock-event reason, resolved defensively from the installed pynvml."""
    out = []
    for name, attrs, default in _REASONS:
        bit = next((getattr(nvml, a) for a in attrs if isinstance(getattr(nvml, a, None), int)), default)
        if bit:
            out.append((bit, name))
    return out


def decode_reasons(mask: int | None, table: list[tuple[int, str]]) -> list[str]:
    """Names of the bits set in `mask`; bits the table does not know read as `bit_0x...`."""
    if not mask:
        return []
    names, known = [], 0
    for bit, name in table:
        known |= bit
        if mask & bit:
            names.append(name)
    rest = mask & ~known
    while rest:
        low = rest & -rest
        names.append(f"bit_{low:#x}")
        rest ^= low
    return names


def _cpus_from_words(words: Any) -> list[int]:
    cpus = [64 * i + b for i, w in enumerate(words) for b in range(64) if (int(w) >> b) & 1]
    try:
        usable = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return cpus
    return [c for c in cpus if c in usable]


def discover_gpus(nvml: Any = None) -> list[dict]:
    """GPUs in NVML (PCI bus) order: [{index, uuid, name, pci_bus_id, cpu_affinity, memory_total_bytes}].

    Raises UnavailableError when NVML cannot be loaded or initialised (no nvidia-ml-py, no driver); returns
    [] when NVML works but sees no GPU. `cpu_affinity` is the GPU's NUMA-local CPUs that this process may
    use ([] when unknown).
    """
    mod, why = load_nvml(nvml)
    if mod is None:
        raise UnavailableError(f"cannot discover GPUs: {why}")
    try:
        words = ((os.cpu_count() or 1) + 63) // 64
        gpus = []
        for i in range(mod.nvmlDeviceGetCount()):
            h = mod.nvmlDeviceGetHandleByIndex(i)
            try:
                cpus = _cpus_from_words(mod.nvmlDeviceGetCpuAffinity(h, words))
            except mod.NVMLError as exc:
                log.info("[monitor] GPU %d: no CPU affinity from NVML (%s)", i, exc)
                cpus = []
            gpus.append(
                {
                    "index": i,
                    "uuid": _text(mod.nvmlDeviceGetUUID(h)),
                    "name": _text(mod.nvmlDeviceGetName(h)),
                    "pci_bus_id": _text(mod.nvmlDeviceGetPciInfo(h).busId),
                    "cpu_affinity": cpus,
                    "memory_total_bytes": int(mod.nvmlDeviceGetMemoryInfo(h).total),
                }
            )
        return gpus
    finally:
        mod.nvmlShutdown()  # reference-counted: balances our nvmlInit only


class GpuReader:
    """NVML reads for one GPU. Costly values are read once (or every `limit_refresh_s`); calls the GPU
    does not support are remembered and skipped. Only the sampler threads call it."""

    def __init__(self, nvml: Any, gpu: dict, table: list[tuple[int, str]], limit_refresh_s: float) -> None:
        self.N = nvml
        self.gpu = dict(gpu)
        self.table = table
        self.limit_refresh_ns = int(limit_refresh_s * 1e9)
        self.unsupported: set[str] = set()
        self.errors = 0
        self.lost = False
        self._unsupported_codes = {getattr(nvml, n) for n in _UNSUPPORTED if hasattr(nvml, n)}
        self._lost_code = getattr(nvml, "NVML_ERROR_GPU_IS_LOST", 15)
        self.h: Any = None
        self.static: dict = {}
        self._limit_w: float | None = None
        self._limit_t = 0
        self._last_counters: dict[str, int] = {}

    def call(self, key: str, fn_name: str, *args: Any) -> Any:
        """One NVML call; None when unsupported or failing (never raises)."""
        if key in self.unsupported or self.lost:
            return None
        fn = getattr(self.N, fn_name, None)
        if fn is None:
            self.unsupported.add(key)
            return None
        try:
            return fn(self.h, *args)
        except self.N.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in self._unsupported_codes:
                self.unsupported.add(key)
                log.debug("[monitor] GPU %s: %s not available (%s)", self.gpu.get("index"), fn_name, exc)
            elif code == self._lost_code:
                self.lost = True
                log.error(
                    "[monitor] GPU %s (%s) is lost: NVML reads stopped",
                    self.gpu.get("index"),
                    self.gpu.get("uuid"),
                )
            else:
                self.errors += 1
                if self.errors <= 5:
                    log.warning("[monitor] GPU %s: %s failed: %s", self.gpu.get("index"), fn_name, exc)
            return None

    def open(self) -> None:
        """Get the handle and read what never changes (max clocks cost ~1 ms each: once only)."""
        N = self.N
        uuid = self.gpu.get("uuid")
        self.h = (
            N.nvmlDeviceGetHandleByUUID(uuid) if uuid else N.nvmlDeviceGetHandleByIndex(self.gpu["index"])
        )
        if not uuid:
            self.gpu["uuid"] = _text(N.nvmlDeviceGetUUID(self.h))
        if "name" not in self.gpu:
            self.gpu["name"] = _text(N.nvmlDeviceGetName(self.h))
        supported = self.call("supported", "nvmlDeviceGetSupportedClocksEventReasons")
        if supported is None:
            supported = self.call("supported_old", "nvmlDeviceGetSupportedClocksThrottleReasons")
        slowdown = getattr(N, "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN", 1)
        self.static = {
            "sm_clock_max_mhz": self.call(
                "max_sm", "nvmlDeviceGetMaxClockInfo", getattr(N, "NVML_CLOCK_SM", 1)
            ),
            "mem_clock_max_mhz": self.call(
                "max_mem", "nvmlDeviceGetMaxClockInfo", getattr(N, "NVML_CLOCK_MEM", 2)
            ),
            "temp_slowdown_c": self.call("threshold", "nvmlDeviceGetTemperatureThreshold", slowdown),
            "supported_reasons": decode_reasons(supported, self.table) if supported is not None else None,
        }

    def _power_limit(self, now: int) -> float | None:
        if self._limit_w is None or now - self._limit_t >= self.limit_refresh_ns:
            mw = self.call("limit", "nvmlDeviceGetEnforcedPowerLimit")
            self._limit_t = now
            if mw is not None:
                self._limit_w = mw / 1000.0
        return self._limit_w

    def _temperature(self) -> Any:
        gpu_sensor = getattr(self.N, "NVML_TEMPERATURE_GPU", 0)
        t = self.call("tempv", "nvmlDeviceGetTemperatureV", gpu_sensor)
        return t if t is not None else self.call("temp", "nvmlDeviceGetTemperature", gpu_sensor)

    def fast(self) -> dict:
        """Cheap reads (about 1 us each on an H200): one sample, stamped with time.monotonic_ns()."""
        N = self.N
        t0 = time.monotonic_ns()
        power = self.call("power", "nvmlDeviceGetPowerUsage")
        mask = self.call("reasons", "nvmlDeviceGetCurrentClocksEventReasons")
        if mask is None:
            mask = self.call("reasons_old", "nvmlDeviceGetCurrentClocksThrottleReasons")
        util = self.call("util", "nvmlDeviceGetUtilizationRates")
        mem = self.call("mem", "nvmlDeviceGetMemoryInfo")
        sample = {
            "t_ns": t0,
            "sm_clock_mhz": self.call("sm", "nvmlDeviceGetClockInfo", getattr(N, "NVML_CLOCK_SM", 1)),
            "mem_clock_mhz": self.call("memclk", "nvmlDeviceGetClockInfo", getattr(N, "NVML_CLOCK_MEM", 2)),
            "sm_clock_max_mhz": self.static.get("sm_clock_max_mhz"),
            "power_w": power / 1000.0 if power is not None else None,
            "power_limit_w": self._power_limit(t0),
            "temp_c": self._temperature(),
            "reasons_mask": mask,
            "throttle_reasons": decode_reasons(mask, self.table),
            "util_pct": getattr(util, "gpu", None),
            "mem_util_pct": getattr(util, "memory", None),
            "mem_used_bytes": getattr(mem, "used", None),
        }
        sample["read_us"] = (time.monotonic_ns() - t0) / 1e3
        return sample

    def _fields(self) -> dict[int, Any]:
        ids = [getattr(self.N, _MEM_TEMP_FIELD[0], _MEM_TEMP_FIELD[1])]
        ids += [getattr(self.N, attr, fid) for _, attr, fid in _COUNTER_FIELDS]
        values = self.call("fields", "nvmlDeviceGetFieldValues", ids)
        ok = getattr(self.N, "NVML_SUCCESS", 0)
        out = {}
        for v in values or ():
            if getattr(v, "nvmlReturn", ok) == ok and v.valueType in _VALUE_MEMBER:
                out[v.fieldId] = getattr(v.value, _VALUE_MEMBER[v.valueType])
        return out

    def slow(self, own_pids: Collection[int], names: Callable[[int], str]) -> dict:
        """Costly reads, once a second: memory temperature, reason counters, compute processes."""
        t0 = time.monotonic_ns()
        fields = self._fields()
        counters, deltas = {}, {}
        for name, attr, fid in _COUNTER_FIELDS:
            v = fields.get(getattr(self.N, attr, fid))
            if v is None:
                continue
            counters[name] = int(v)
            if name in self._last_counters:
                deltas[name] = max(0, int(v) - self._last_counters[name])
        self._last_counters = counters
        procs = []
        for p in self.call("procs", "nvmlDeviceGetComputeRunningProcesses") or ():
            pname = names(p.pid)
            ours = p.pid in own_pids or pname == MPS_SERVER
            procs.append(
                {
                    "pid": int(p.pid),
                    "name": pname,
                    "used_bytes": getattr(p, "usedGpuMemory", None),
                    "ours": ours,
                }
            )
        mem_temp = fields.get(getattr(self.N, _MEM_TEMP_FIELD[0], _MEM_TEMP_FIELD[1]))
        return {
            "t_ns": t0,
            "mem_temp_c": mem_temp,
            "reason_counters_ns": counters,
            "reason_delta_ns": deltas,
            "processes": procs,
            "foreign": [p for p in procs if not p["ours"]],
            "read_us": (time.monotonic_ns() - t0) / 1e3,
        }


def _process_name(pid: int) -> str:
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:  # gone, another PID namespace, or no permission: the pid is still reported
        return "?"


class NvmlSampler:
    """Samples every GPU on two daemon threads into per-GPU ring buffers; readers never touch NVML.

    NVML calls can block for tens of milliseconds (during large pins elsewhere), so they run only here:
    a slow call delays the next sample, never a reader. `own_pids` returns our worker pids, to flag
    compute processes that are not ours (NVML reports host pids: run the supervisor in the host's pid
    namespace, or every process looks foreign).
    """

    def __init__(
        self,
        gpus: list[dict],
        interval_ms: int,
        own_pids: Callable[[], Collection[int]],
        nvml: Any = None,
        *,
        slow_period_s: float = 1.0,
        limit_refresh_s: float = 10.0,
        ring_s: float = 60.0,
        process_name: Callable[[int], str] = _process_name,
    ) -> None:
        self._gpus = [dict(g) for g in gpus]
        self.interval_s = interval_ms / 1000.0
        self.slow_period_s = slow_period_s
        self.limit_refresh_s = limit_refresh_s
        self._own_pids = own_pids
        self._nvml_in = nvml
        self._process_name = process_name
        self._maxlen = max(16, int(ring_s / self.interval_s))
        self.N: Any = None
        self.available = False
        self.unavailable_reason: str | None = None
        self.readers: list[GpuReader] = []
        self._rings: dict[str, deque[dict]] = {}
        self._slow: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.overruns = 0

    # --- lifecycle --------------------------------------------------------------------------------

    def open(self) -> bool:
        """Initialise NVML and read each GPU's static facts. False (logged once) when NVML is unusable."""
        self.N, why = load_nvml(self._nvml_in)
        if self.N is None:
            self.unavailable_reason = why
            log_unavailable_once(why or "unknown")
            return False
        table = reason_table(self.N)
        for g in self._gpus:
            r = GpuReader(self.N, g, table, self.limit_refresh_s)
            try:
                r.open()
            except Exception as exc:  # one bad GPU must not blind the monitor to the others
                log.error(
                    "[monitor] GPU %s (%s): cannot open in NVML: %s", g.get("index"), g.get("uuid"), exc
                )
                continue
            self.readers.append(r)
            self._rings[r.gpu["uuid"]] = deque(maxlen=self._maxlen)
        self.available = bool(self.readers)
        if self.available:
            log.info(
                "[monitor] NVML sampling %d GPU(s) every %.0f ms", len(self.readers), self.interval_s * 1e3
            )
        return self.available

    def start(self) -> bool:
        if not self.open():
            return False
        for name, fn, period in (
            ("nvml-fast", self.tick_fast, self.interval_s),
            ("nvml-slow", self.tick_slow, self.slow_period_s),
        ):
            t = threading.Thread(target=self._loop, args=(fn, period), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return True

    def _loop(self, tick: Callable[[], None], period: float) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                tick()
            except Exception:  # a bug in one read must not end sampling for good
                log.exception("[monitor] NVML sampling error")
            next_t += period
            now = time.monotonic()
            if next_t < now:  # a blocked NVML call: skip the missed ticks rather than burst
                self.overruns += 1
                next_t = now + period
            self._stop.wait(next_t - now)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        alive = False
        for t in self._threads:
            t.join(timeout)
            alive = alive or t.is_alive()
        self._threads.clear()
        if self.N is not None and not alive:  # never shut NVML down under a call still in flight
            try:
                self.N.nvmlShutdown()
            except Exception as exc:
                log.debug("[monitor] nvmlShutdown: %s", exc)
            self.N = None

    # --- sampling (sampler threads; tests call these directly) ---------------------------------

    def tick_fast(self) -> None:
        for r in self.readers:
            s = r.fast()
            with self._lock:
                self._rings[r.gpu["uuid"]].append(s)

    def tick_slow(self) -> None:
        own = set(self._own_pids())
        for r in self.readers:
            s = r.slow(own, self._process_name)
            with self._lock:
                self._slow[r.gpu["uuid"]] = s

    # --- readers (any thread) ---------------------------------------------------------------------

    def window(self, uuid: str | None, t0_ns: int, t1_ns: int) -> list[dict]:
        """Samples inside [t0, t1] plus the nearest one on each side (samples are ~interval apart, a stall
        can be shorter than that)."""
        with self._lock:
            ring = list(self._rings.get(uuid or "", ()))
        inside = [s for s in ring if t0_ns <= s["t_ns"] <= t1_ns]
        before = [s for s in ring if s["t_ns"] < t0_ns][-1:]
        after = [s for s in ring if s["t_ns"] > t1_ns][:1]
        return before + inside + after

    def foreign(self, uuid: str | None) -> list[dict]:
        with self._lock:
            return list((self._slow.get(uuid or "") or {}).get("foreign", ()))

    def view(self) -> list[dict]:
        """Per GPU: identity, cached facts, latest fast and slow readings (for status and metrics)."""
        out = []
        with self._lock:
            for r in self.readers:
                uuid = r.gpu["uuid"]
                ring = self._rings.get(uuid)
                latest = ring[-1] if ring else {}
                slow = self._slow.get(uuid, {})
                out.append(
                    {
                        "index": r.gpu.get("index"),
                        "uuid": uuid,
                        "name": r.gpu.get("name"),
                        "pci_bus_id": r.gpu.get("pci_bus_id"),
                        **r.static,
                        **latest,
                        "mem_temp_c": slow.get("mem_temp_c"),
                        "reason_counters_ns": dict(slow.get("reason_counters_ns", {})),
                        "processes": list(slow.get("processes", ())),
                        "foreign_pids": [p["pid"] for p in slow.get("foreign", ())],
                        "lost": r.lost,
                        "nvml_errors": r.errors,
                    }
                )
        return out
