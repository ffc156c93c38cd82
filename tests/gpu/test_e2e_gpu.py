"""End to end on a GPU: the real supervisor, GPU worker processes and the client over ipc, for the
synthetic and torch engines. Results match the model run in-process for random requests of every bucket;
a GPU worker SIGKILLed under load is restarted while clients fail over with nothing lost; status shows the
GPU's telemetry and the loading mode; a bad TensorRT plan through `start` is one clear line and exit 1."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.client import Client
from tests.conftest import cli, write_config
from tests.gpu.gpu_helpers import same_bits
from workers.engines import synthetic_math

pytestmark = pytest.mark.timeout(600)

WORK, ITEM, MAX_BATCH = 40, 512, 16


def synthetic(tmp: Path, per_gpu: int = 1, **restart: object) -> Path:
    return write_config(
        tmp,
        {
            "workers": {"device": "gpu", "gpus": [0], "per_gpu": per_gpu},
            "model": {"kind": "synthetic", "item_shape": [ITEM], "work": WORK, "max_batch": MAX_BATCH},
            "pipeline": {"depth": 2, "cuda_graphs": True},
            "transport": {"shm_mb": 64, "shm_max_lease_mb": 8},
            "restart": {"backoff_initial_s": 0.2, **restart},
        },
    )


def test_synthetic_every_bucket_and_status(short_tmp: Path, orchestrator_factory) -> None:
    config = synthetic(short_tmp)
    orch = orchestrator_factory(config)
    rng = np.random.default_rng(1)
    wrong = 0
    for shm in (True, False):
        with Client(config, shm=shm) as c:
            for rows in range(1, MAX_BATCH + 1):  # every bucket, and every size padded up to one
                x = rng.random((rows, ITEM), dtype=np.float32)
                wrong += not same_bits(c.infer(x)["y"], synthetic_math.reference(x, WORK))
    assert wrong == 0
    st = orch.wait_status(lambda s: s["monitor"].get("gpus") and s["workers"][0]["requests"] >= 2 * MAX_BATCH)
    w = st["workers"][0]
    assert w["module_loading"] == "EAGER" and w["engine"]["cuda_graphs"] is True, w
    assert w["faults"] == 0
    assert st["monitor"]["nvml"] is True
    gpu = (
        next(iter(st["monitor"]["gpus"].values()))
        if isinstance(st["monitor"]["gpus"], dict)
        else st["monitor"]["gpus"][0]
    )
    assert gpu.get("sm_clock_mhz") and gpu.get("power_w") is not None, gpu
    text = cli("status", str(config), "--once").stdout
    assert "ready" in text and "EAGER" in cli("status", str(config), "--once", "--json").stdout


def test_sigkilled_gpu_worker_under_load_loses_nothing(short_tmp: Path, orchestrator_factory) -> None:
    config = synthetic(short_tmp, per_gpu=2)
    orch = orchestrator_factory(config)
    before = {w["id"]: w for w in orch.status()["workers"]}
    done, wrong, errors = [0], [0], []
    stop = threading.Event()

    def load(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(config, shm=seed % 2 == 0, timeout=30) as c:
            while not stop.is_set():
                x = rng.random((int(rng.integers(1, MAX_BATCH + 1)), ITEM), dtype=np.float32)
                try:
                    y = c.infer(x)["y"]
                except Exception as exc:  # nothing may be lost: any error fails the test
                    errors.append(repr(exc))
                    return
                wrong[0] += not same_bits(y, synthetic_math.reference(x, WORK))
                done[0] += 1

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while done[0] < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(before["w1"]["pid"], signal.SIGKILL)
    st = orch.wait_status(
        lambda s: (
            {w["id"]: w for w in s["workers"]}["w1"]["state"] == "ready"
            and {w["id"]: w for w in s["workers"]}["w1"]["pid"] != before["w1"]["pid"]
        ),
        timeout=120,
    )
    at_restart = done[0]
    deadline = time.monotonic() + 30
    while done[0] < at_restart + 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    w1 = {w["id"]: w for w in st["workers"]}["w1"]
    assert w1["state"] == "ready" and w1["restarts"] == 1, w1
    assert not errors, errors[:3]
    assert wrong[0] == 0 and done[0] >= at_restart + 200


def test_torch_program_end_to_end(short_tmp: Path, orchestrator_factory) -> None:
    torch = pytest.importorskip("torch")
    from tests.gpu import torch_models as tm

    model = tm.encoder()
    path = tm.export(model, short_tmp, aoti=False)  # AOTInductor packages: see test_torch_gpu.py
    config = write_config(
        short_tmp,
        {
            "workers": {"device": "gpu", "gpus": [0]},
            "model": {
                "kind": "torch",
                "path": str(path),
                "max_batch": tm.MAX_BATCH,
                "dims": [{"name": "seq", "buckets": [8, 16, 32]}],
            },
            "pipeline": {"depth": 2, "cuda_graphs": True},
            "transport": {"shm_mb": 64, "shm_max_lease_mb": 8},
        },
        name="torch.toml",
    )
    orch = orchestrator_factory(config)
    rng = np.random.default_rng(2)
    for shm in (True, False):
        with Client(config, shm=shm) as c:
            futs = []
            for rows in range(1, tm.MAX_BATCH + 1):
                for length in (1, 8, 9, 17, 32):
                    ids = rng.integers(0, tm.VOCAB, (rows, length), dtype=np.int64)
                    mask = np.ones((rows, length), np.int64)
                    futs.append(((ids, mask), c.submit({"input_ids": ids, "attention_mask": mask})))
            for (ids, mask), fut in futs:
                got = fut.result(timeout=60)
                with torch.no_grad():
                    want = model(torch.from_numpy(ids).cuda(), torch.from_numpy(mask).cuda())
                for name, w in zip(tm.OUTPUTS, want, strict=True):
                    np.testing.assert_allclose(
                        got[name].astype(np.float32), w.float().cpu().numpy(), atol=2e-2, rtol=2e-2
                    )
    st = orch.wait_status(lambda s: s["workers"][0]["requests"] >= 80)
    w = st["workers"][0]
    assert w["engine"]["graphs"] == "on" and w["engine"]["program"] == "exported_program", w["engine"]
    assert w["faults"] == 0, "a driver operation or allocator growth after READY"


def test_bad_tensorrt_plan_through_start(short_tmp: Path) -> None:
    plan = short_tmp / "bad.plan"
    plan.write_bytes(b"this is not a TensorRT plan" * 10)
    config = write_config(
        short_tmp,
        {
            "workers": {"device": "gpu", "gpus": [0]},
            "model": {"kind": "tensorrt", "path": str(plan), "max_batch": 8},
            "restart": {"enabled": False},
        },
    )
    proc = cli("start", str(config), "--detach", timeout=180)
    if proc.returncode == 2:  # no TensorRT runtime on this host: refused before any worker starts
        assert "needs TensorRT" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        return
    assert proc.returncode == 1, proc.stderr
    first = next(ln for ln in proc.stderr.splitlines() if "w0" in ln)
    assert "TensorRT" in first or "plan" in first, proc.stderr
    assert "Traceback" not in proc.stderr.split("--- last lines")[0], proc.stderr
