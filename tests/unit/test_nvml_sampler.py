"""The NVML sampler and GPU discovery against a fake pynvml module: reason decoding, caching of costly
calls, unsupported calls, foreign-process flagging, the no-NVML path, and the monitor using it."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.common.config import Config
from orchestrator.common.errors import UnavailableError
from orchestrator.supervisor.monitor import nvml_sampler
from orchestrator.supervisor.monitor.monitor import Monitor
from orchestrator.supervisor.monitor.nvml_sampler import (
    NvmlSampler,
    decode_reasons,
    discover_gpus,
    load_nvml,
    reason_table,
)


class FakeNvml:
    """Just enough of pynvml, with the naming quirks of the real module: the HW bits are spelled only
    `...ThrottleReason...` here, and `BoardLimit`/`Reliability` are absent."""

    NVML_SUCCESS = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_TEMPERATURE_GPU = 0
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
    NVML_FI_DEV_MEMORY_TEMP = 82
    NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP = 74
    NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN = 270
    nvmlClocksEventReasonGpuIdle = 0x1
    nvmlClocksEventReasonApplicationsClocksSetting = 0x2
    nvmlClocksEventReasonSwPowerCap = 0x4
    nvmlClocksThrottleReasonHwSlowdown = 0x8
    nvmlClocksEventReasonSyncBoost = 0x10
    nvmlClocksEventReasonSwThermalSlowdown = 0x20
    nvmlClocksThrottleReasonHwThermalSlowdown = 0x40
    nvmlClocksThrottleReasonHwPowerBrakeSlowdown = 0x80
    nvmlClocksEventReasonDisplayClockSetting = 0x100

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, n_gpus: int = 1, init_error: int | None = None) -> None:
        self.calls: Counter[str] = Counter()
        self.init_error = init_error
        self.unsupported: set[str] = set()
        self.gpus = [
            {
                "uuid": f"GPU-{i:04d}",
                "sm": 1980,
                "reasons": 0x1,
                "power_mw": 80_000,
                "procs": [],
                "counters": {74: 0, 270: 0},
            }
            for i in range(n_gpus)
        ]

    def _h(self, name: str, h: Any) -> dict:
        self.calls[name] += 1
        if name in self.unsupported:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return self.gpus[h]

    def nvmlInit(self) -> None:
        self.calls["init"] += 1
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.calls["shutdown"] += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes | str) -> int:
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        return next(i for i, g in enumerate(self.gpus) if g["uuid"] == uuid)

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._h("uuid", h)["uuid"]

    def nvmlDeviceGetName(self, h: int) -> bytes:
        self._h("name", h)
        return b"NVIDIA H200"

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        self._h("pci", h)
        return SimpleNamespace(busId=f"00000000:{h + 0x18:02X}:00.0".encode())

    def nvmlDeviceGetCpuAffinity(self, h: int, words: int) -> list[int]:
        self._h("affinity", h)
        return [0b11] + [0] * (words - 1)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        self._h("meminfo", h)
        return SimpleNamespace(total=143_771 << 20, used=1 << 30, free=0)

    def nvmlDeviceGetMaxClockInfo(self, h: int, kind: int) -> int:
        self._h("max_clock", h)
        return 1980 if kind == self.NVML_CLOCK_SM else 3201

    def nvmlDeviceGetTemperatureThreshold(self, h: int, kind: int) -> int:
        self._h("threshold", h)
        return 89

    def nvmlDeviceGetSupportedClocksEventReasons(self, h: int) -> int:
        self._h("supported", h)
        return 0x1FF

    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:
        g = self._h("clock", h)
        return g["sm"] if kind == self.NVML_CLOCK_SM else 3201

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._h("power", h)["power_mw"]

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        self._h("limit", h)
        return 700_000

    def nvmlDeviceGetTemperatureV(self, h: int, sensor: int) -> int:
        self._h("tempv", h)
        return 61

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        self._h("temp", h)
        return 60

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        return self._h("reasons", h)["reasons"]

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        self._h("util", h)
        return SimpleNamespace(gpu=97, memory=40)

    def nvmlDeviceGetFieldValues(self, h: int, ids: list[int]) -> list[Any]:
        g = self._h("fields", h)
        out = []
        for fid in ids:
            if fid == 82:
                out.append(
                    SimpleNamespace(fieldId=82, nvmlReturn=0, valueType=1, value=SimpleNamespace(uiVal=45))
                )
            elif fid in g["counters"]:
                out.append(
                    SimpleNamespace(
                        fieldId=fid,
                        nvmlReturn=0,
                        valueType=3,
                        value=SimpleNamespace(ullVal=g["counters"][fid]),
                    )
                )
            else:  # fields this GPU does not have come back with their own error code
                out.append(
                    SimpleNamespace(fieldId=fid, nvmlReturn=3, valueType=1, value=SimpleNamespace(uiVal=0))
                )
        return out

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return [SimpleNamespace(pid=p, usedGpuMemory=1 << 20) for p in self._h("procs", h)["procs"]]


GPU = {"index": 0, "uuid": "GPU-0000", "name": "NVIDIA H200", "pci_bus_id": "00000000:18:00.0"}


def names_of(pids: dict[int, str]):
    return lambda pid: pids.get(pid, "?")


def test_reason_names_resolve_from_either_spelling() -> None:
    table = reason_table(FakeNvml())
    assert dict((n, b) for b, n in table) == {
        "gpu_idle": 0x1,
        "clocks_setting": 0x2,
        "sw_power_cap": 0x4,
        "hw_slowdown": 0x8,
        "sync_boost": 0x10,
        "sw_thermal": 0x20,
        "hw_thermal": 0x40,
        "hw_power_brake": 0x80,
        "display_clocks": 0x100,
    }  # board_limit / reliability: absent from this module, so not guessed
    assert decode_reasons(0x4 | 0x40, table) == ["sw_power_cap", "hw_thermal"]
    assert decode_reasons(0x1 | 0x1000, table) == ["gpu_idle", "bit_0x1000"]
    assert decode_reasons(0, table) == [] and decode_reasons(None, table) == []


def test_costly_reads_are_cached() -> None:
    fake = FakeNvml()
    s = NvmlSampler([GPU], 50, set, fake, limit_refresh_s=10.0)
    assert s.open()
    for _ in range(20):
        s.tick_fast()
    assert fake.calls["max_clock"] == 2  # SM and memory, once each
    assert fake.calls["threshold"] == 1 and fake.calls["supported"] == 1
    assert fake.calls["limit"] == 1  # refreshed every 10 s only
    assert fake.calls["clock"] == 40 and fake.calls["power"] == 20
    refresh = FakeNvml()
    s2 = NvmlSampler([GPU], 50, set, refresh, limit_refresh_s=0.0)
    s2.open()
    for _ in range(3):
        s2.tick_fast()
    assert refresh.calls["limit"] == 3


def test_fast_sample_decodes_and_converts_units() -> None:
    fake = FakeNvml()
    fake.gpus[0].update(sm=1410, reasons=0x4 | 0x20, power_mw=693_500)
    s = NvmlSampler([GPU], 50, set, fake)
    s.open()
    s.tick_fast()
    g = s.view()[0]
    assert (g["sm_clock_mhz"], g["sm_clock_max_mhz"], g["mem_clock_max_mhz"]) == (1410, 1980, 3201)
    assert g["power_w"] == pytest.approx(693.5) and g["power_limit_w"] == pytest.approx(700.0)
    assert g["throttle_reasons"] == ["sw_power_cap", "sw_thermal"]
    assert g["temp_c"] == 61 and g["temp_slowdown_c"] == 89 and g["util_pct"] == 97
    assert g["mem_used_bytes"] == 1 << 30
    assert len(g["supported_reasons"]) == 9


def test_unsupported_call_falls_back_and_is_not_retried() -> None:
    fake = FakeNvml()
    fake.unsupported.add("tempv")
    s = NvmlSampler([GPU], 50, set, fake)
    s.open()
    for _ in range(5):
        s.tick_fast()
    assert fake.calls["tempv"] == 1 and fake.calls["temp"] == 5
    assert s.view()[0]["temp_c"] == 60


def test_lost_gpu_stops_reads_but_not_the_sampler() -> None:
    fake = FakeNvml(n_gpus=2)
    gpus = [GPU, {"index": 1, "uuid": "GPU-0001"}]
    s = NvmlSampler(gpus, 50, set, fake)
    s.open()

    def lost(h: int) -> int:
        if h == 0:
            raise fake.NVMLError(fake.NVML_ERROR_GPU_IS_LOST)
        return 50_000

    fake.nvmlDeviceGetPowerUsage = lost  # type: ignore[method-assign]
    s.tick_fast()
    s.tick_fast()
    view = {g["uuid"]: g for g in s.view()}
    assert view["GPU-0000"]["lost"] and not view["GPU-0001"]["lost"]
    assert view["GPU-0001"]["power_w"] == 50.0
    assert fake.calls["reasons"] == 2  # GPU 1 twice; GPU 0 is asked nothing once found lost


def test_slow_loop_flags_foreign_processes_and_diffs_counters() -> None:
    fake = FakeNvml()
    fake.gpus[0]["procs"] = [100, 200, 300]
    own = {100}
    s = NvmlSampler(
        [GPU],
        50,
        lambda: own,
        fake,
        process_name=names_of({100: "python", 200: "stress", 300: nvml_sampler.MPS_SERVER}),
    )
    s.open()
    s.tick_slow()
    fake.gpus[0]["counters"] = {74: 2_000_000_000, 270: 0}
    s.tick_slow()
    g = s.view()[0]
    assert g["foreign_pids"] == [200]
    assert [p["ours"] for p in g["processes"]] == [True, False, True]
    assert g["mem_temp_c"] == 45
    assert g["reason_counters_ns"] == {"sw_power_cap": 2_000_000_000, "hw_thermal": 0}
    assert s._slow["GPU-0000"]["reason_delta_ns"]["sw_power_cap"] == 2_000_000_000
    assert [p["pid"] for p in s.foreign("GPU-0000")] == [200]


def test_window_includes_the_nearest_samples_around_a_short_stall() -> None:
    fake = FakeNvml()
    s = NvmlSampler([GPU], 50, set, fake)
    s.open()
    ring = s._rings["GPU-0000"]
    for t in (100, 200, 300, 400):
        ring.append({"t_ns": t})
    assert [x["t_ns"] for x in s.window("GPU-0000", 210, 220)] == [200, 300]
    assert [x["t_ns"] for x in s.window("GPU-0000", 150, 320)] == [100, 200, 300, 400]
    assert s.window("GPU-unknown", 0, 1000) == []


def test_threads_sample_and_stop_cleanly() -> None:
    fake = FakeNvml()
    s = NvmlSampler([GPU], 10, set, fake, slow_period_s=0.02)
    assert s.start()
    deadline = time.monotonic() + 5
    while len(s._rings["GPU-0000"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.stop()
    assert len(s._rings["GPU-0000"]) >= 3 and fake.calls["procs"] >= 1
    assert fake.calls["shutdown"] == 1
    assert all(not t.is_alive() for t in s._threads)


def test_without_nvml_it_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(nvml_sampler, "_unavailable_logged", False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    caplog.set_level(logging.INFO)
    mod, why = load_nvml()
    assert mod is None and "nvidia-ml-py" in (why or "")
    assert not NvmlSampler([GPU], 50, set).start()
    no_driver = FakeNvml(init_error=FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED)
    second = NvmlSampler([GPU], 50, set, no_driver)
    assert not second.start() and "nvmlInit failed" in (second.unavailable_reason or "")
    assert sum("GPU telemetry unavailable" in r.getMessage() for r in caplog.records) == 1
    assert second.view() == [] and second.window("GPU-0000", 0, 1) == []


def test_discover_gpus() -> None:
    fake = FakeNvml(n_gpus=2)
    gpus = discover_gpus(fake)
    usable = os.sched_getaffinity(0)
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[1] == {
        "index": 1,
        "uuid": "GPU-0001",
        "name": "NVIDIA H200",
        "pci_bus_id": "00000000:19:00.0",
        "cpu_affinity": [c for c in (0, 1) if c in usable],
        "memory_total_bytes": 143_771 << 20,
    }
    assert fake.calls["init"] == fake.calls["shutdown"] == 1


def test_discover_gpus_without_nvml_raises_a_clear_error() -> None:
    with pytest.raises(UnavailableError, match="nvmlInit failed"):
        discover_gpus(FakeNvml(init_error=FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED))


def test_monitor_attributes_a_stall_to_throttling_on_its_gpu(tmp_path: Path) -> None:
    fake = FakeNvml()
    fake.gpus[0].update(sm=1100, reasons=0x40)
    fake.gpus[0]["procs"] = [os.getpid()]
    cfg = dataclasses.replace(Config(), monitor=dataclasses.replace(Config().monitor, interval_ms=10))
    mon = Monitor(cfg, tmp_path)
    mon._nvml_module = fake
    mon.set_worker("w0", os.getpid(), "GPU-0000")
    mon.start([GPU])
    try:
        deadline = time.monotonic() + 5
        while not mon.snapshot()["gpus"][0]["sm_clock_mhz"] and time.monotonic() < deadline:
            time.sleep(0.01)
        now = time.monotonic_ns()
        cand = {
            "worker_id": "w0",
            "kind": ["latency"],
            "t0_ns": now - 5_000_000,
            "t1_ns": now,
            "launch_t0_ns": now - 4_000_000,
            "launch_t1_ns": now - 3_990_000,
            "timings_us": {"gpu": 900.0, "latency": 5000.0, "enqueue": 10.0},
            "baseline_us": {"gpu": 200.0, "latency": 500.0},
            "journal": [],
        }
        rec = mon.on_stall("w0", cand)
        snap = mon.snapshot()
    finally:
        mon.stop()
    assert rec["cause"] == "throttling" and rec["gpu_index"] == 0 and rec["gpu_samples"]
    g = snap["gpus"][0]
    assert snap["nvml"] and g["throttle_reasons"] == ["hw_thermal"] and g["foreign_pids"] == []
    assert snap["workers"]["w0"]["last_stall_cause"] == "throttling"
    assert (tmp_path / "stalls.jsonl").read_text().count("\n") == 1
