"""Clients when the supervisor dies: calls in flight and new calls fail with UnavailableError within
seconds (not at their deadlines), a new Client fails at once, and a client reconnects when an orchestrator
is started again on the same run directory. Real processes over ipc (CPU workers)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import wait

import numpy as np
import pytest

from orchestrator.client import Client
from orchestrator.common.errors import UnavailableError
from tests.conftest import cli
from tests.integration.test_reliability import rows, synthetic_config, wait_until
from workers.engines.synthetic_math import reference

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("shm", [False, True])
def test_dead_supervisor_fails_calls_at_once_and_clients_reconnect(
    short_tmp, orchestrator_factory, shm: bool
) -> None:
    cfg = synthetic_config(
        short_tmp, work=100000, count=2
    )  # ~0.2 s batches: requests are queued when it dies
    orch = orchestrator_factory(cfg)
    sup_pid = orch.status()["pid"]
    x = rows(1, 64)
    c = Client(cfg, timeout=30, shm=shm)
    try:
        c.infer(x)
        futs = [c.submit(x) for _ in range(40)]
        blocking: dict[str, object] = {}
        started = threading.Event()

        def call() -> None:
            started.set()
            try:
                c.infer(x)
                blocking["outcome"] = "result"
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                blocking["outcome"] = exc
            blocking["t"] = time.monotonic()

        th = threading.Thread(target=call)
        th.start()
        started.wait(5)
        wait_until(
            lambda: futs[0].done(), 20, "the workers to be busy with the submitted requests", every=0.01
        )
        os.kill(sup_pid, signal.SIGKILL)
        t0 = time.monotonic()
        done, not_done = wait(futs, timeout=10)
        assert not not_done, "calls in flight waited for their deadlines"
        th.join(10)
        failed = [f.exception() for f in futs if f.exception() is not None]
        assert failed, "nothing was in flight when the supervisor died"
        assert all(isinstance(e, UnavailableError) for e in failed), [repr(e) for e in failed]
        assert "supervisor" in str(failed[0])
        if blocking.get("outcome") != "result":
            assert isinstance(blocking["outcome"], UnavailableError), repr(blocking.get("outcome"))
            assert blocking["t"] - t0 <= 3.0
        print(
            f"figure: {len(failed)} calls in flight failed with UnavailableError {time.monotonic() - t0:.2f} s "
            f"after the supervisor's SIGKILL at the latest"
        )
        t1 = time.monotonic()
        with pytest.raises(UnavailableError, match="supervisor"):
            c.infer(x)
        with pytest.raises(UnavailableError):
            c.submit(x).result(5)
        assert time.monotonic() - t1 < 1.0, (
            "new calls on a client that knows the supervisor is gone must fail at once"
        )
        assert time.monotonic() - t0 <= 3.0 + 1.0
        t2 = time.monotonic()
        with pytest.raises(UnavailableError):
            Client(cfg)
        assert time.monotonic() - t2 < 1.0, "a new Client must fail at once when no orchestrator runs"
        print(f"figure: a new Client failed after {time.monotonic() - t2:.3f} s")
        t3 = time.monotonic()
        # The orchestrator is started again on the same run directory: the old client reconnects.
        cli("start", str(cfg), "--detach", timeout=90, check=True)

        def served() -> bool:
            try:
                return bool(np.array_equal(c.infer(x, timeout=2)["y"], reference(x, 100000)))
            except UnavailableError:
                return False

        wait_until(served, 20, "the client to reconnect to the restarted orchestrator", every=0.2)
        print(f"figure: the old client served again {time.monotonic() - t3:.2f} s after `start` was called")
    finally:
        c.close()


def test_frozen_worker_costs_only_its_own_requests(short_tmp, orchestrator_factory) -> None:
    cfg = synthetic_config(short_tmp, work=5, count=3)
    orch = orchestrator_factory(cfg)
    frozen = orch.status()["workers"][0]["pid"]
    calls: list[tuple[float, float]] = []  # (start, duration) of every call, all threads
    errors: list[BaseException] = []
    stop = threading.Event()
    x = rows(3, 8)
    want = reference(x, 5)
    with Client(cfg, timeout=30) as c:

        def loop() -> None:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    out = c.infer(x)
                    assert np.array_equal(out["y"], want)
                except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                    errors.append(exc)
                calls.append((t, time.monotonic() - t))

        threads = [threading.Thread(target=loop) for _ in range(4)]
        for th in threads:
            th.start()
        wait_until(lambda: len(calls) > 200, 20, "load to get going")
        t_before = time.monotonic()
        n_before = len(calls)
        wait_until(lambda: len(calls) > n_before + 300, 20, "a baseline")
        before_rate = (len(calls) - n_before) / (time.monotonic() - t_before)
        os.kill(frozen, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            wait_until(lambda: time.monotonic() - t_stop > 6.0, 10, "the 6 s stop", every=0.1)
        finally:
            try:
                os.kill(frozen, signal.SIGCONT)
            except ProcessLookupError:  # the supervisor killed it as hung: expected
                pass
        t_end = time.monotonic()
        stop.set()
        for th in threads:
            th.join(30)
    during = [d for t, d in calls if t_stop <= t < t_end]
    assert not errors, errors[:3]
    rate = len(during) / (t_end - t_stop)
    assert rate >= 0.5 * before_rate, f"{rate:.0f} calls/s during the stop against {before_rate:.0f} before"
    slow = [d for t, d in calls if t_stop - 0.5 <= t < t_end and d > 2.0]
    assert not slow, f"{len(slow)} calls waited over 2 s, the longest {max(slow):.2f} s"
    print(
        f"figure: {rate:.0f} calls/s during the stop against {before_rate:.0f} before; longest call "
        f"{max(d for t, d in calls if t_stop - 0.5 <= t < t_end):.2f} s"
    )


@pytest.mark.slow
def test_supervisor_memory_stays_flat_as_clients_come_and_go(short_tmp, orchestrator_factory) -> None:
    import psutil

    cfg = synthetic_config(short_tmp, work=1, count=1)
    orch = orchestrator_factory(cfg)
    sup = psutil.Process(orch.status()["pid"])
    x = rows(4, 2)

    def clients(n: int) -> None:
        for _ in range(n):
            with Client(cfg) as c:  # discovery, events subscription, a shared-memory lease, one request
                c.infer(x)

    clients(300)  # warm-up: allocator pools and caches reach their working size
    before = sup.memory_info().rss
    clients(3000)
    grown = (sup.memory_info().rss - before) / 1e6
    assert grown < 5.0, f"the supervisor grew {grown:.1f} MB over 3,000 clients"
    print(f"figure: the supervisor grew {grown:.2f} MB over 3,000 clients")
    st = orch.wait_status(lambda st: st["workers"][0]["shm"]["leases"] == 0)  # counters come with heartbeats
    assert st["workers"][0]["shm"]["leases"] == 0
