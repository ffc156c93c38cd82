"""cpu_hog stall injection: busy processes pinned to this process's cores, gone after stop() (and by
themselves once their parent dies). Spawns real processes; runs on any host."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from orchestrator.common.config import parse_config
from workers import inject


@pytest.mark.timeout(30)
def test_cpu_hog_pins_busy_processes_and_stops_them() -> None:
    cfg = parse_config({"workers": {"device": "cpu"}, "debug": {"inject": "cpu_hog"}}, check_files=False)
    inj = inject.start(cfg)
    assert inj is not None
    pids = inj.hog_pids
    try:
        cores = sorted(os.sched_getaffinity(0))
        assert len(pids) == len(cores)
        procs = [psutil.Process(pid) for pid in pids]
        time.sleep(0.5)
        for p in procs:
            assert sorted(p.cpu_affinity()) == cores
            assert p.cpu_times().user > 0.05  # it really burns CPU
    finally:
        inj.stop()
    assert not [pid for pid in pids if psutil.pid_exists(pid)]  # killed and reaped
    assert not [p for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE]
