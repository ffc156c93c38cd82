"""Host load sampling (CPU, steal and interrupts, memory, load average, CPU pressure) for status and stall
attribution.

Runs in the supervisor on one daemon thread, `host-sampler`, about once a second; readers get a copy.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil

log = logging.getLogger(__name__)

PSI_CPU = "/proc/pressure/cpu"


def read_psi(path: str = PSI_CPU) -> dict[str, float]:
    """`some avg10/avg60` of CPU pressure (% of time runnable tasks waited for a CPU); {} if absent."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for item in rest.split():
            key, _, value = item.partition("=")
            if key in ("avg10", "avg60"):
                try:
                    out[f"psi_cpu_{kind}_{key}"] = float(value)
                except ValueError:
                    continue
    return out


def sample_host(cpu: bool = True) -> dict:
    """One host sample. cpu_pct is the average since the previous call (psutil keeps that state); with
    `cpu` False (no previous call yet) it is None rather than a meaningless 0."""
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    # Also since the previous call (psutil keeps this state apart from cpu_percent's): time the hypervisor
    # gave our virtual CPUs to someone else, and interrupt handling; both take a CPU without a switch.
    times = psutil.cpu_times_percent(interval=None)
    sample = {
        "t_ns": time.monotonic_ns(),
        "cpu_pct": psutil.cpu_percent(interval=None) if cpu else None,
        "steal_pct": getattr(times, "steal", None) if cpu else None,
        "irq_pct": getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0) if cpu else None,
        "mem_pct": psutil.virtual_memory().percent,
        "load1": load1,
        "ncpu": os.cpu_count(),
    }
    sample.update(read_psi())
    return sample


class HostSampler:
    """Keeps the latest host sample fresh; `latest()` never blocks on /proc reads."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self._latest: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        psutil.cpu_percent(interval=None)  # prime: the first call has no previous point and returns 0.0
        self.tick(cpu=False)  # memory, load and pressure are meaningful at once (and steal's count is primed)
        self._thread = threading.Thread(target=self._run, name="host-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.tick()

    def tick(self, cpu: bool = True) -> None:
        try:
            s = sample_host(cpu)
        except Exception:  # keep the last good sample; status shows its age through t_ns
            log.exception("[monitor] host sampling failed")
            return
        with self._lock:
            self._latest = s

    def latest(self) -> dict:
        with self._lock:
            return dict(self._latest)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
