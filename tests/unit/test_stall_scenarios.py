"""Stall detection and attribution end to end inside one process: the real Pipeline, ThreadProbe,
WorkerTelemetry and Monitor, disturbed by a thread that holds the engine's "driver lock" while it journals
a pinned allocation, or by a GIL-free CPU hog pinned to the serving thread's core. Threads only."""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from orchestrator.common.config import Config
from orchestrator.supervisor.monitor.monitor import Monitor
from workers.driver_journal import DriverJournal
from workers.engines.base import Engine, Slot, TensorSpec
from workers.pipeline import Pipeline, Request
from workers.telemetry import WorkerTelemetry


class LockEngine(Engine):
    """A CPU engine whose launch takes a lock, as a CUDA launch takes the driver's context lock."""

    kind = "lock"

    def __init__(self, lock: threading.Lock, spin: int = 0) -> None:
        self.inputs = (TensorSpec("x", np.dtype(np.float32), (16,)),)
        self.outputs = (TensorSpec("y", np.dtype(np.float32), (16,)),)
        self.max_batch = 8
        self.lock = lock
        self.spin = spin

    def create_slots(self, depth: int) -> list[Slot]:
        return [
            Slot(i, {"x": np.zeros((8, 16), np.float32)}, {"y": np.zeros((8, 16), np.float32)})
            for i in range(depth)
        ]

    def launch(self, slot: Slot, rows: int) -> None:
        with self.lock:
            x = 0
            for i in range(self.spin):  # host work inside the launch, exposed to preemption
                x += i
            slot.outputs["y"][:rows] = slot.inputs["x"][:rows] * 2

    def done(self, slot: Slot) -> bool:
        return True

    def wait(self, slot: Slot) -> None:
        pass


class Rig:
    def __init__(self, tmp: Path, spin: int) -> None:
        self.journal = DriverJournal()
        self.lock = threading.Lock()
        self.monitor = Monitor(Config(), tmp)
        self.monitor.start([])
        self.monitor.set_worker("w0", os.getpid(), None)
        self.tel = WorkerTelemetry("w0", Config().monitor, self.journal, "spin", max_candidates_per_s=1000.0)
        self.pipe = Pipeline(LockEngine(self.lock, spin), 2, 64, 0, (8,), probe=self.tel.probe)
        self.records: list[dict] = []
        self.slow: list[tuple[int, int]] = []  # launch windows of batches whose enqueue took > 1 ms

    def serve(self, seconds: float) -> None:
        x = np.ones((1, 16), np.float32)
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            i += 1
            self.pipe.offer(Request(None, i, {"x": x}, 1, time.monotonic_ns()))
            b = self.pipe.launch_next(time.monotonic_ns(), lambda r: None)
            self.pipe.complete_oldest(lambda b: None)
            if b.t_enqueued_ns - b.t_launch_ns > 1_000_000:
                self.slow.append((b.t_launch_ns, b.t_enqueued_ns))
            cand = self.tel.on_batch(b, None)
            if cand is not None:
                self.records.append(self.monitor.on_stall("w0", cand))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, spin=0)
    r.serve(0.1)  # warm-up and baseline
    yield r
    r.monitor.stop()


def test_launches_blocked_by_a_journaled_driver_op_are_flagged_and_blamed_on_it(rig: Rig) -> None:
    stop = threading.Event()

    def inject() -> None:
        while not stop.wait(0.08):
            with rig.journal.timed("pinned_alloc", "64 MiB"), rig.lock:
                time.sleep(0.02)

    t = threading.Thread(target=inject, name="inject")
    t.start()
    try:
        rig.serve(1.0)
    finally:
        stop.set()
        t.join()
    ops = rig.journal.since(0)
    blocked = [w for w in rig.slow if any(op.t0_ns <= w[1] and op.t1_ns >= w[0] for op in ops)]
    assert len(blocked) >= 5, (len(ops), len(rig.slow))
    flagged = {(r["candidate"]["launch_t0_ns"], r["candidate"]["launch_t1_ns"]): r for r in rig.records}
    assert all(w in flagged for w in blocked)  # every launch an injected op blocked was flagged ...
    assert all(flagged[w]["cause"] == "driver_lock" for w in blocked)  # ... and blamed on it first
    assert all(r["cause"] != "driver_lock" or r["candidate"]["journal"] for r in rig.records)


def test_preemption_by_a_cpu_hog_on_the_same_core_is_cpu_preemption(tmp_path: Path) -> None:
    rig = Rig(tmp_path, spin=2000)
    rig.serve(0.1)
    saved = os.sched_getaffinity(0)  # pid 0: this thread only
    core = min(saved)
    stop = threading.Event()
    data = b"x" * (32 << 20)

    def hog() -> None:  # hashlib drops the GIL on large inputs: a CPU competitor, not a lock holder
        os.sched_setaffinity(0, {core})
        while not stop.is_set():
            hashlib.sha256(data).digest()

    t = threading.Thread(target=hog, name="hog")
    os.sched_setaffinity(0, {core})
    t.start()
    try:
        rig.serve(1.0)
    finally:
        stop.set()
        t.join()
        os.sched_setaffinity(0, saved)
        rig.monitor.stop()
    causes = collections.Counter(r["cause"] for r in rig.records)
    assert len(rig.records) >= 3, causes
    assert causes["cpu_preemption"] >= 0.8 * len(rig.records), causes
    assert causes["driver_lock"] == 0
