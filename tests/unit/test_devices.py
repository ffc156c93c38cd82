"""Worker planning: NUMA-local cores from NVML are shared out so that no two workers use the same core,
the GPU environment is set, and explicit affinity overrides NVML."""

from __future__ import annotations

import pytest

from orchestrator.common.config import ConfigError, parse_config
from orchestrator.common.rundir import RunDir
from orchestrator.supervisor.devices import plan_workers


def gpus(affinities: list[list[int]]) -> list[dict]:
    return [
        {"index": i, "uuid": f"GPU-{i}", "name": "H200", "cpu_affinity": a} for i, a in enumerate(affinities)
    ]


def plan(gpu_list: list[dict], supervisor: object = "none", **workers: object) -> list:
    """Plans for these GPUs; the supervisor's core is not set aside unless `supervisor` says so (the tests of
    that reservation are below)."""
    cfg = parse_config(
        {
            "orchestrator": {"cpu_affinity": supervisor},
            "workers": {"device": "gpu", **workers},
            "model": {"kind": "synthetic"},
        },
        check_files=False,
    )
    return plan_workers(cfg, RunDir("/tmp/orch-plan"), gpu_list)


def test_gpus_sharing_all_cores_get_disjoint_quarters() -> None:
    plans = plan(gpus([list(range(64))] * 4))
    cores = [set(p.cpu_affinity) for p in plans]
    assert [len(c) for c in cores] == [16, 16, 16, 16]
    assert set().union(*cores) == set(range(64)) and sum(map(len, cores)) == 64
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    assert all(
        p.env["CUDA_MODULE_LOADING"] == "EAGER" and p.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" for p in plans
    )


def test_two_numa_nodes_split_within_each_node() -> None:
    node0, node1 = list(range(0, 32)), list(range(32, 64))
    plans = plan(gpus([node0, node0, node1, node1]), per_gpu=2)
    assert len(plans) == 8
    for p in plans:
        assert len(p.cpu_affinity) == 8
        assert set(p.cpu_affinity) <= set(node0 if p.gpu_index < 2 else node1)
    assert len({c for p in plans for c in p.cpu_affinity}) == 64
    assert plans[0].shares_gpu_with == ("w1",)


def test_explicit_affinity_overrides_nvml_and_is_checked() -> None:
    plans = plan(gpus([list(range(4))] * 2), cpu_affinity=[[0], [1]])
    assert [p.cpu_affinity for p in plans] == [(0,), (1,)]
    with pytest.raises(
        ConfigError, match="2 core lists given for 1 workers|1 core lists given for 2 workers"
    ):
        plan(gpus([list(range(4))] * 2), cpu_affinity=[[0]])


def test_smt_siblings_stay_together_so_no_two_workers_share_a_physical_core() -> None:
    from orchestrator.supervisor.devices import _split

    # 16 physical cores with two threads each, numbered as Linux does: core k is CPUs k and k + 16.
    def core_of(cpu: int) -> tuple[int, int]:
        return 0, cpu % 16

    parts = _split(list(range(32)), 4, core_of)
    assert parts[0] == (0, 1, 2, 3, 16, 17, 18, 19)
    physical = [{core_of(c) for c in p} for p in parts]
    assert all(len(p) == 4 for p in physical) and len(set().union(*physical)) == 16  # disjoint cores
    # Fewer physical cores than workers: logical CPUs are split (sharing a core cannot be avoided).
    assert _split(list(range(4)), 4, lambda cpu: (0, cpu % 2)) == [(0,), (1,), (2,), (3,)]
    # No topology: every CPU is its own unit, as before.
    assert _split(list(range(8)), 2, lambda cpu: None) == [(0, 1, 2, 3), (4, 5, 6, 7)]


def _by_pairs(cpu: int) -> tuple[int, int]:
    """16 physical cores with two threads each, numbered as Linux does: core k is CPUs k and k + 16."""
    return (0, cpu % 16)


def test_auto_keeps_one_physical_core_for_the_supervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.supervisor import devices

    monkeypatch.setattr(devices, "physical_core_of", _by_pairs)
    plans = plan(gpus([list(range(32))] * 4), supervisor="auto")
    used = {c for p in plans for c in p.cpu_affinity}
    assert used == set(range(32)) - {15, 31}  # the last physical core, both its threads
    assert all(len(p.cpu_affinity) >= 6 for p in plans)
    cfg = parse_config({"orchestrator": {"cpu_affinity": "auto"}}, check_files=False)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(32)))
    assert devices.supervisor_cores(cfg, plans) == (15, 31)


def test_no_core_is_set_aside_when_workers_need_every_physical_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.supervisor import devices

    monkeypatch.setattr(devices, "physical_core_of", _by_pairs)
    plans = plan(gpus([list(range(32))] * 4), supervisor="auto", per_gpu=4)  # 16 workers, 16 physical cores
    assert {c for p in plans for c in p.cpu_affinity} == set(range(32))
    cfg = parse_config({"orchestrator": {"cpu_affinity": "auto"}}, check_files=False)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(32)))
    assert devices.supervisor_cores(cfg, plans) is None  # shared: status shows "any"


def test_configured_supervisor_cores_are_kept_off_the_workers_and_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator.supervisor import devices

    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(8)))
    plans = plan(gpus([list(range(8))]), supervisor=[7], per_gpu=2)
    assert {c for p in plans for c in p.cpu_affinity} == set(range(7))
    cfg = parse_config({"orchestrator": {"cpu_affinity": [7]}}, check_files=False)
    assert devices.supervisor_cores(cfg, plans) == (7,)
    bad = parse_config({"orchestrator": {"cpu_affinity": [9]}}, check_files=False)
    with pytest.raises(ConfigError, match=r"orchestrator.cpu_affinity: cores \[9\] are not available"):
        devices.supervisor_cores(bad, plans)
    none = parse_config({"orchestrator": {"cpu_affinity": "none"}}, check_files=False)
    assert devices.supervisor_cores(none, plans) is None
