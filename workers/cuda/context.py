"""CUDA initialisation: the eager-loading check, and the primary context on the worker's one visible GPU.

Runs in a GPU worker process: check_module_loading() before anything touches CUDA, then get_context() on
the serving thread; other threads that call CUDA (stall injection) call make_current() first.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Literal

from cuda.bindings import driver

from orchestrator.common.errors import EngineError
from workers.cuda.errors import CudaError, check
from workers.driver_journal import JOURNAL

log = logging.getLogger(__name__)

LOADING_ENV = "CUDA_MODULE_LOADING"
Sched = Literal["auto", "spin", "blocking"]

_SCHED_FLAGS = {
    "auto": driver.CUctx_flags.CU_CTX_SCHED_AUTO,
    "spin": driver.CUctx_flags.CU_CTX_SCHED_SPIN,
    "blocking": driver.CUctx_flags.CU_CTX_SCHED_BLOCKING_SYNC,
}

_lock = threading.Lock()
_context: CudaContext | None = None
_env_mode: str | None = None


def check_module_loading() -> str:
    """Read CUDA_MODULE_LOADING as cuInit will see it; warn loudly unless it is EAGER. Returns the mode.

    Call this BEFORE CUDA is initialised: the driver reads the variable once, in cuInit. Under LAZY
    loading (the default since CUDA 12.2 when the variable is unset) each kernel's module is loaded at its
    first launch, which takes the driver's write lock and stalled launches by 14-16 ms (FACTS.md).
    """
    global _env_mode
    raw = os.environ.get(LOADING_ENV, "").strip().upper()
    mode = raw or "LAZY"
    if _context is not None:
        log.warning("[cuda] %s checked after CUDA was initialised; the driver already read it", LOADING_ENV)
    if mode != "EAGER":
        shown = raw or "unset, so LAZY"
        log.warning(
            "[cuda] !!! %s=%s, not EAGER: kernels will load on first use and stall launches for "
            "milliseconds. Start the worker with %s=EAGER (the supervisor does). !!!",
            LOADING_ENV,
            shown,
            LOADING_ENV,
        )
    _env_mode = mode
    return mode


def module_loading_mode() -> str:
    """The loading mode in force: the driver's own answer once CUDA is up, else the environment's."""
    if _context is not None:
        return _context.loading_mode
    return _env_mode if _env_mode is not None else check_module_loading()


@dataclass(frozen=True)
class DeviceInfo:
    """Facts about the worker's GPU, for READY and status."""

    ordinal: int
    name: str
    uuid: str
    compute_capability: tuple[int, int]
    total_memory: int
    driver_version: str

    @property
    def arch(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"


def device_attribute(name: str) -> int:
    """A CU_DEVICE_ATTRIBUTE_<name> of the worker's device (ordinal 0), e.g. "MULTIPROCESSOR_COUNT"."""
    attr = getattr(driver.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}")
    dev = check(driver.cuDeviceGet(0), "cuDeviceGet")
    return int(check(driver.cuDeviceGetAttribute(attr, dev), f"cuDeviceGetAttribute({name})"))


def _format_uuid(raw: bytes) -> str:
    h = bytes(raw[:16]).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _init_driver() -> int:
    """cuInit(0) and the device count, with a clear error where no driver or no GPU is present."""
    try:
        check(driver.cuInit(0), "cuInit")
    except CudaError:
        raise
    except Exception as exc:  # cuda-pathfinder raises when libcuda.so is missing (no driver installed)
        raise EngineError(f"CUDA driver unavailable: {exc}") from exc
    count = check(driver.cuDeviceGetCount(), "cuDeviceGetCount")
    if count == 0:
        raise EngineError(
            f"no CUDA device visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    if count > 1:
        log.warning("[cuda] %d devices visible; a worker should see exactly one (using device 0)", count)
    return count


def _device_info(dev: Any) -> DeviceInfo:
    attr = driver.CUdevice_attribute
    name = check(driver.cuDeviceGetName(256, dev), "cuDeviceGetName")
    uuid = check(driver.cuDeviceGetUuid(dev), "cuDeviceGetUuid")
    major = check(
        driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
        "cuDeviceGetAttribute",
    )
    minor = check(
        driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
        "cuDeviceGetAttribute",
    )
    total = check(driver.cuDeviceTotalMem(dev), "cuDeviceTotalMem")
    ver = check(driver.cuDriverGetVersion(), "cuDriverGetVersion")
    return DeviceInfo(
        ordinal=0,
        name=name.split(b"\0", 1)[0].decode(errors="replace"),
        uuid=_format_uuid(uuid.bytes),
        compute_capability=(int(major), int(minor)),
        total_memory=int(total),
        driver_version=f"{ver // 1000}.{ver % 1000 // 10}",
    )


class CudaContext:
    """The primary context of device 0 (the worker's only visible GPU), current on the creating thread.

    The primary context is the one the CUDA runtime, and so TensorRT, uses too: everything in the worker
    shares one context. Use get_context(), not this constructor.
    """

    def __init__(self, sched: Sched = "auto") -> None:
        if _env_mode is None:
            check_module_loading()
        _init_driver()
        self.device = check(driver.cuDeviceGet(0), "cuDeviceGet")
        self.info = _device_info(self.device)
        # Scheduling flags decide how the driver waits in cuEventSynchronize for events WITHOUT the
        # blocking-sync flag: SPIN busy-waits (lowest latency), BLOCKING_SYNC sleeps on an OS primitive.
        # They must be set before the primary context becomes active to take effect.
        res = driver.cuDevicePrimaryCtxSetFlags(self.device, _SCHED_FLAGS[sched])
        if res[0]:
            log.warning("[cuda] could not set context scheduling %s: %s", sched, res[0].name)
        with JOURNAL.timed("context_create", self.info.name):
            self.handle = check(driver.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        check(driver.cuCtxSetCurrent(self.handle), "cuCtxSetCurrent")
        self.sched = sched
        mode = check(driver.cuModuleGetLoadingMode(), "cuModuleGetLoadingMode")
        self.loading_mode = "EAGER" if mode == driver.CUmoduleLoadingMode.CU_MODULE_EAGER_LOADING else "LAZY"
        if self.loading_mode != "EAGER" and _env_mode == "EAGER":
            log.warning("[cuda] %s=EAGER but the driver reports LAZY loading", LOADING_ENV)
        log.info(
            "[cuda] context on %s (%s, %s), driver %s, module loading %s, sched %s",
            self.info.name,
            self.info.uuid,
            self.info.arch,
            self.info.driver_version,
            self.loading_mode,
            sched,
        )

    def make_current(self) -> None:
        """Bind the context to the calling thread (each OS thread has its own current context)."""
        check(driver.cuCtxSetCurrent(self.handle), "cuCtxSetCurrent")

    def synchronize(self) -> None:
        check(driver.cuCtxSynchronize(), "cuCtxSynchronize")


def get_context(sched: Sched = "auto") -> CudaContext:
    """The process's one CudaContext, created on first use and made current on the calling thread."""
    global _context
    with _lock:
        if _context is None:
            _context = CudaContext(sched)
        else:
            if sched != _context.sched:
                log.debug("[cuda] context already created with sched %s; %s ignored", _context.sched, sched)
            _context.make_current()
        return _context


def current_context() -> CudaContext | None:
    """The context if CUDA was initialised in this process, else None (never initialises)."""
    return _context
