"""The data path through real spawned orchestrators over ipc: results, futures, asyncio, coalescing,
overload, deadlines and clean stop with requests in flight (CPU engines)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from orchestrator.client import AsyncClient, Client
from orchestrator.common.errors import (
    BatchTooLargeError,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    ShuttingDownError,
)
from tests.conftest import DEMO_MODEL, cli, write_config
from workers.engines.synthetic_math import reference

pytestmark = pytest.mark.timeout(120)


def onnx_config(tmp: Path, **pipeline: object) -> Path:
    return write_config(
        tmp,
        {
            "workers": {"device": "cpu", "count": 2},
            "model": {"kind": "onnx", "path": str(DEMO_MODEL), "max_batch": 64},
            "pipeline": {"depth": 2, **pipeline},
        },
    )


def synthetic_config(tmp: Path, work: int, count: int = 1, **pipeline: object) -> Path:
    return write_config(
        tmp,
        {
            "workers": {"device": "cpu", "count": count},
            "model": {"kind": "synthetic", "item_shape": [256], "work": work, "max_batch": 64},
            "pipeline": {"depth": 2, **pipeline},
        },
    )


def test_results_match_onnxruntime_and_status_shows_ready_workers(short_tmp, orchestrator_factory) -> None:
    orch = orchestrator_factory(onnx_config(short_tmp))
    status = orch.status()
    assert [w["state"] for w in status["workers"]] == ["ready", "ready"]
    sess = ort.InferenceSession(str(DEMO_MODEL), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    worst = 0.0
    with Client(orch.config) as c:
        assert c.inputs == ["features"] and c.outputs == ["logits", "probs"]
        for _ in range(50):
            x = rng.standard_normal((int(rng.integers(1, 65)), 64)).astype(np.float32)
            out = c.infer({"features": x})
            ref = sess.run(None, {"features": x})
            worst = max(
                worst, float(np.abs(out["logits"] - ref[0]).max()), float(np.abs(out["probs"] - ref[1]).max())
            )
            assert out["logits"].shape == (x.shape[0], 16)
    assert worst < 1e-5
    st = orch.wait_status(lambda s: sum(w["requests"] for w in s["workers"]) >= 50)
    assert sum(w["requests"] for w in st["workers"]) == 50


def test_futures_infer_many_async_and_typed_errors(short_tmp, orchestrator_factory) -> None:
    orch = orchestrator_factory(synthetic_config(short_tmp, work=3, count=2))
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((int(rng.integers(1, 9)), 256)).astype(np.float32) for _ in range(40)]
    with Client(orch.config) as c:
        futs = [c.submit(b) for b in batches]  # a single array works for a single-input model
        for f, b in zip(futs, batches, strict=True):
            np.testing.assert_array_equal(f.result(10)["y"], reference(b, 3))
        for out, b in zip(c.infer_many(batches, max_in_flight=8), batches, strict=True):
            np.testing.assert_array_equal(out["y"], reference(b, 3))
        with pytest.raises(InvalidInputError, match="unknown tensor"):
            c.infer({"nope": batches[0]})
        with pytest.raises(InvalidInputError, match="dtype float64"):
            c.infer(batches[0].astype(np.float64))
        with pytest.raises(BatchTooLargeError):
            c.infer(np.zeros((65, 256), np.float32))

    async def run_async() -> list[np.ndarray]:
        async with AsyncClient(orch.config) as ac:
            outs = await asyncio.gather(*(ac.infer({"x": b}) for b in batches[:10]))
            streamed = [o async for o in ac.infer_many(batches[10:20], max_in_flight=4)]
            return [o["y"] for o in outs + streamed]

    for got, b in zip(asyncio.run(run_async()), batches[:20], strict=True):
        np.testing.assert_array_equal(got, reference(b, 3))


def test_coalescing_concurrent_clients_each_get_exactly_their_rows(short_tmp, orchestrator_factory) -> None:
    # One worker, a few ms per batch; 8 clients each put 15 requests in flight at once, so requests queue
    # up behind the running batch and must be merged; every client checks it got exactly its own rows.
    orch = orchestrator_factory(synthetic_config(short_tmp, work=300, count=1, max_queue_delay_us=2000))
    errors: list[BaseException] = []
    per_client = 15

    def client_thread(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with Client(orch.config) as c:
                xs = [
                    (rng.standard_normal((int(rng.integers(1, 9)), 256)) + seed).astype(np.float32)
                    for _ in range(per_client)
                ]
                futs = [c.submit(x) for x in xs]
                for x, f in zip(xs, futs, strict=True):
                    np.testing.assert_array_equal(f.result(60)["y"], reference(x, 300))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[0]
    (w,) = orch.wait_status(lambda s: s["workers"][0]["requests"] >= 8 * per_client)["workers"]
    assert w["requests"] == 8 * per_client
    assert w["batches"] < w["requests"] * 0.5, (
        f"no coalescing: {w['batches']} batches for {w['requests']} requests"
    )


def test_overload_answers_at_once_and_every_request_gets_one_reply(short_tmp, orchestrator_factory) -> None:
    orch = orchestrator_factory(synthetic_config(short_tmp, work=300, count=1, max_queue=2))
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    expected = reference(x, 300)
    with Client(orch.config, max_in_flight=64) as c:
        futs = [c.submit(x) for _ in range(30)]
        done, not_done = wait(futs, timeout=60)
    assert not not_done
    ok = [f for f in futs if f.exception() is None]
    overloaded = [f for f in futs if isinstance(f.exception(), OverloadedError)]
    assert len(ok) + len(overloaded) == 30 and overloaded and ok
    for f in ok:
        np.testing.assert_array_equal(f.result()["y"], expected)


def test_deadline_is_enforced(short_tmp, orchestrator_factory) -> None:
    orch = orchestrator_factory(synthetic_config(short_tmp, work=20000, count=1))
    x = np.zeros((64, 256), np.float32) + 0.5
    with Client(orch.config) as c:
        with pytest.raises(DeadlineExceededError):
            c.infer(x, timeout=0.05)


def test_clean_stop_answers_every_request_in_flight(short_tmp, orchestrator_factory) -> None:
    orch = orchestrator_factory(synthetic_config(short_tmp, work=400, count=2))
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    expected = reference(x, 400)
    c = Client(orch.config, max_in_flight=256, failover=False)
    try:
        futs = [c.submit(x) for _ in range(60)]
        proc = cli("stop", str(orch.config), timeout=60)
        assert proc.returncode == 0, proc.stderr
        done, not_done = wait(futs, timeout=30)
        assert not not_done
        results = [f.exception() or f.result() for f in futs]
        ok = [r for r in results if isinstance(r, dict)]
        stopped = [r for r in results if isinstance(r, ShuttingDownError)]
        assert len(ok) + len(stopped) == 60, [type(r) for r in results if not isinstance(r, dict)]
        assert ok, "the in-flight work should have been finished, not dropped"
        for r in ok:
            np.testing.assert_array_equal(r["y"], expected)
    finally:
        c.close()
    run = orch.run_dir
    assert not list(run.glob("*.sock")), list(run.glob("*.sock"))
