"""Where the supervisor runs (issue 15): its process and every one of its threads (the poll loop, the NVML
sampler and monitor, ZeroMQ's I/O threads) on cores no worker is pinned to, as `orchestrator.cpu_affinity`
says, and `status` showing each process's cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import cli, write_config


def thread_cores(pid: int) -> dict[int, set[int]]:
    """Each thread of `pid` and the cores it may run on."""
    return {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to keep one for the supervisor")
def test_supervisor_threads_stay_off_the_workers_cores(short_tmp: Path, orchestrator_factory) -> None:
    first, last = min(os.sched_getaffinity(0)), max(os.sched_getaffinity(0))
    cfg = write_config(
        short_tmp,
        {
            "orchestrator": {"name": "placement", "cpu_affinity": [last]},
            "workers": {"count": 1, "cpu_affinity": [[first]]},
            "model": {"kind": "synthetic", "item_shape": [4], "max_batch": 4},
            "monitor": {"metrics_port": 0},
        },
    )
    orch = orchestrator_factory(cfg)
    st = orch.status()
    assert st["cpu_affinity"] == [last]
    threads = thread_cores(st["pid"])
    assert len(threads) > 1  # the loop, ZeroMQ's I/O thread, the monitor's
    assert all(cores == {last} for cores in threads.values()), threads
    (w,) = st["workers"]
    assert w["cpu_affinity"] == [first]
    assert all(cores == {first} for cores in thread_cores(w["pid"]).values())
    shown = cli("status", str(cfg), "--once", check=True).stdout
    assert f"on cores {last}" in shown


def test_auto_gives_the_supervisor_only_cores_no_worker_has(short_tmp: Path, orchestrator_factory) -> None:
    cfg = write_config(
        short_tmp,
        {
            "orchestrator": {"name": "placement-auto"},
            "workers": {"count": 1},
            "model": {"kind": "synthetic", "item_shape": [4], "max_batch": 4},
        },
    )
    st = orchestrator_factory(cfg).status()
    (w,) = st["workers"]
    if st["cpu_affinity"] is None:  # one physical core per worker at most here: nothing to keep aside
        assert set(w["cpu_affinity"]) == os.sched_getaffinity(0)
        return
    assert not set(st["cpu_affinity"]) & set(w["cpu_affinity"])
    assert all(cores == set(st["cpu_affinity"]) for cores in thread_cores(st["pid"]).values())
