"""The shared-memory data path through real spawned orchestrators (CPU workers): the same results as
frames for every CPU engine and for coalesced requests of several clients; hostile spans answered with
typed errors while the worker keeps serving; leases freed when clients detach or are killed; the arena
file's owner and mode; a full lease waits, then fails with a typed error."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from concurrent.futures import wait
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from orchestrator.client import AsyncClient, Client
from orchestrator.common import protocol
from orchestrator.common.errors import BatchTooLargeError, ErrorCode, OverloadedError, UnavailableError
from tests.conftest import DEMO_MODEL, write_config
from workers.engines.synthetic_math import reference

pytestmark = pytest.mark.timeout(300)


def synthetic(tmp: Path, work: int = 3, count: int = 1, **transport: object) -> Path:
    return write_config(
        tmp,
        {
            "workers": {"device": "cpu", "count": count},
            "model": {"kind": "synthetic", "item_shape": [256], "work": work, "max_batch": 64},
            "pipeline": {"depth": 2, "max_queue_delay_us": 2000},
            "transport": {"shm_mb": 32, "shm_max_lease_mb": 4, **transport},
        },
    )


def shm_of(orch, i: int = 0) -> dict:
    return orch.status()["workers"][i]["shm"]


def test_same_results_as_frames_for_every_cpu_engine(short_tmp, orchestrator_factory) -> None:
    onnx = write_config(
        short_tmp,
        {
            "workers": {"device": "cpu", "count": 2},
            "model": {"kind": "onnx", "path": str(DEMO_MODEL), "max_batch": 64},
            "transport": {"shm_mb": 16, "shm_max_lease_mb": 8},
        },
        name="onnx.toml",
    )
    for config, name in ((synthetic(short_tmp), "x"), (onnx, "features")):
        orch = orchestrator_factory(config)
        rng = np.random.default_rng(1)
        width = 256 if name == "x" else 64
        with Client(config, shm=True) as s, Client(config, shm=False) as f:
            assert s.shm and not f.shm
            for rows in (1, 7, 64):
                x = rng.standard_normal((rows, width)).astype(np.float32)
                a, b = s.infer({name: x}), f.infer({name: x})
                assert a.keys() == b.keys()
                for k in a:
                    assert np.array_equal(a[k], b[k]), f"{config.name} {k} rows {rows}"
                    assert not a[k].flags.writeable
            z = s.empty((5, width))  # built in the lease: sent with no copy at all
            z[...] = rng.standard_normal((5, width)).astype(np.float32)
            got, want = s.infer({name: z}), f.infer({name: np.array(z)})
            assert all(np.array_equal(got[k], want[k]) for k in got)
        st = orch.wait_status(lambda st: sum(w["shm"]["requests"] for w in st["workers"]) >= 4)
        assert sum(w["shm"]["requests"] for w in st["workers"]) == 4
        orch.stop()


def test_coalesced_requests_of_several_clients(short_tmp, orchestrator_factory) -> None:
    config = synthetic(short_tmp, work=40)
    orch = orchestrator_factory(config)
    rng = np.random.default_rng(2)
    clients = [Client(config, shm=True) for _ in range(3)] + [Client(config, shm=False)]
    try:
        jobs = []
        for i in range(120):
            x = rng.random((int(rng.integers(1, 9)), 256), dtype=np.float32)
            jobs.append((x, clients[i % 4].submit({"x": x}, timeout=60)))
        wait([f for _, f in jobs], timeout=120)
        for x, fut in jobs:
            assert np.array_equal(fut.result()["y"], reference(x, 40))
    finally:
        for c in clients:
            c.close()
    st = orch.wait_status(lambda st: st["workers"][0]["requests"] >= 120)
    w = st["workers"][0]
    assert w["batches"] < 120, "requests were not coalesced"
    assert w["shm"]["requests"] == 90
    orch.wait_status(lambda st: st["workers"][0]["shm"]["leases"] == 0)


def test_async_client_and_infer_many_use_shared_memory(short_tmp, orchestrator_factory) -> None:
    config = synthetic(short_tmp)
    orch = orchestrator_factory(config)
    xs = [np.full((2, 256), i / 10, np.float32) for i in range(20)]
    with Client(config) as c:  # "auto": a local target uses shared memory
        assert c.shm
        outs = list(c.infer_many(xs, max_in_flight=4))
    assert all(np.array_equal(o["y"], reference(x, 3)) for o, x in zip(outs, xs, strict=True))

    async def run() -> list:
        async with AsyncClient(config) as ac:
            return [await ac.infer(x) for x in xs[:5]]

    outs = asyncio.run(run())
    assert all(np.array_equal(o["y"], reference(x, 3)) for o, x in zip(outs, xs[:5], strict=True))
    st = orch.wait_status(lambda st: st["workers"][0]["shm"]["requests"] >= 25)
    assert st["workers"][0]["shm"]["requests"] == 25


def test_mode_and_errors_of_the_client(short_tmp, orchestrator_factory) -> None:
    off = write_config(
        short_tmp,
        {
            "workers": {"device": "cpu"},
            "model": {"kind": "synthetic", "max_batch": 64},
            "transport": {"shm_mb": 0},
        },
        name="off.toml",
    )
    orchestrator_factory(off)
    with Client(off) as c:
        assert not c.shm  # "auto" and no arena: frames
        c.infer(np.zeros((1, 256), np.float32))
        with pytest.raises(UnavailableError, match="shared memory"):
            c.empty((1, 256))
    with pytest.raises(UnavailableError, match="shm_mb = 0"):
        Client(off, shm=True)


def test_full_lease_waits_then_fails_and_oversized_fails_at_once(short_tmp, orchestrator_factory) -> None:
    config = synthetic(short_tmp)
    orchestrator_factory(config)
    with Client(config, shm=True, shm_lease_mb=1) as c:
        held = [c.infer(np.ones((64, 256), np.float32)) for _ in range(7)]  # results hold 7 x 64 KiB
        t0 = time.monotonic()
        with pytest.raises(BatchTooLargeError, match="lease"):
            c.infer(np.ones((64, 256 * 20), np.float32))
        assert time.monotonic() - t0 < 0.5
        hog = [c.empty((64, 256)) for _ in range(8)]  # the rest of the lease, held by the caller
        t0 = time.monotonic()
        with pytest.raises(OverloadedError, match="lease"):
            c.infer(np.ones((64, 256), np.float32), timeout=0.5)
        assert 0.4 < time.monotonic() - t0 < 3
        del hog, held  # the views go: their spans come back
        out = c.infer(np.ones((64, 256), np.float32))
        assert np.array_equal(out["y"], reference(np.ones((64, 256), np.float32), 3))


class Raw:
    """A raw DEALER speaking the wire protocol, for hostile messages."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.rid = 100

    def call(self, head: list) -> protocol.Reply:
        """Send one header-only message; the reply's code and payload (no tensors are read)."""
        self.rid += 1
        head[2] = self.rid
        self.sock.send_multipart([msgpack.packb(head)])
        assert self.sock.poll(5000), "no reply"
        _, code, rid, payload = msgpack.unpackb(self.sock.recv_multipart()[0], raw=False)
        assert rid == self.rid
        return protocol.Reply(rid, code, payload, {})

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_hostile_spans_get_typed_errors_and_the_worker_keeps_serving(short_tmp, orchestrator_factory) -> None:
    config = synthetic(short_tmp)
    orch = orchestrator_factory(config)
    endpoint = orch.status()["workers"][0]["endpoint"]
    raw = Raw(endpoint)
    try:
        a = raw.call([protocol.VERSION, 2, 0, 0, [], [os.getpid(), 1 << 20]])
        b = raw.call([protocol.VERSION, 2, 0, 0, [], [os.getpid(), 1 << 20]])
        assert a.code == 0 and b.code == 0
        la, lb = a.message["lease"], b.message["lease"]
        size = a.message["size"]
        assert size == 1 << 20 and a.message["offset"] != b.message["offset"]
        row = 256 * 4

        def infer(lease: int, in_off: object, out_off: object, rows: int = 1, dtype: str = "<f4") -> int:
            head = [protocol.VERSION, 1, 0, 0, [["x", dtype, [rows, 256], in_off]], [lease, out_off]]
            return raw.call(head).code

        assert infer(la, 0, row) == ErrorCode.OK
        cases = {
            "out of range": (la, size, 0),
            "negative": (la, -row, row),
            "overlapping the end": (la, size - row // 2, 0),
            "output past the end": (la, 0, size - row // 2),
            "another client's lease": (la + 1 if la + 1 != lb else la + 2, 0, row),
            "not an integer": (la, "0", row),
            "huge count": (la, 0, row, 1 << 30),
        }
        for what, args in cases.items():
            code = infer(*args)
            assert code in (ErrorCode.INVALID_INPUT, ErrorCode.BATCH_TOO_LARGE), f"{what}: code {code}"
        assert (
            raw.call([protocol.VERSION, 1, 0, 0, [["x", "<f4", [1, 256], 0, 9]], [la, 0]]).code
            == ErrorCode.BAD_HEADER
        )
        # Several requests in one message (INFER_MANY): the good ones complete together, each bad one gets
        # its own typed error, an entry without a usable id is dropped.
        raw.rid += 1
        entries = [
            [901, 1, [0], row],
            [902, 2, [size], 3 * row],
            [903, 0, [0], row],
            [904, 1, [0, 0], row],
            [905, 1, [4 * row], 5 * row],
            ["x", 1, [0], row],
            [906, 10**6, [0], row],
        ]
        raw.sock.send_multipart([msgpack.packb([protocol.VERSION, 4, 0, 0, [], [la, entries]])])
        got: dict[int, int] = {}
        while len(got) < 6:
            assert raw.sock.poll(5000), f"missing replies, got {got}"
            _, code, rid, payload = msgpack.unpackb(raw.sock.recv_multipart()[0], raw=False)
            if rid == 0:
                got.update({r: code for r, _ in payload})
            else:
                got[rid] = code
        assert got == {
            901: 0,
            905: 0,
            902: ErrorCode.INVALID_INPUT,
            903: ErrorCode.INVALID_INPUT,
            904: ErrorCode.INVALID_INPUT,
            906: ErrorCode.BATCH_TOO_LARGE,
        }
        assert raw.call([protocol.VERSION, 3, 0, 0, [], [la]]).code == ErrorCode.OK  # detach
        assert infer(la, 0, row) == ErrorCode.INVALID_INPUT, "a detached lease must be refused"
        assert infer(lb, 0, row) == ErrorCode.OK
        assert raw.call([protocol.VERSION, 2, 0, 0, [], [os.getpid(), -5]]).code == ErrorCode.INVALID_INPUT
        assert (
            raw.call([protocol.VERSION, 2, 0, 0, [], [1 << 30, 4096]]).code == ErrorCode.INVALID_INPUT
        )  # no such pid
        assert raw.call([protocol.VERSION, 3, 0, 0, [], [lb]]).code == ErrorCode.OK
    finally:
        raw.close()
    with Client(config, shm=True) as c:  # still serving, through shared memory
        x = np.ones((3, 256), np.float32)
        assert np.array_equal(c.infer(x)["y"], reference(x, 3))
    shm = orch.wait_status(lambda st: st["workers"][0]["shm"]["leases"] == 0)["workers"][0]["shm"]
    assert shm["leases"] == 0 and shm["free_bytes"] == shm["arena_bytes"]


def test_arena_file_owner_and_mode(short_tmp, orchestrator_factory) -> None:
    orch = orchestrator_factory(synthetic(short_tmp))
    path = Path(shm_of(orch)["path"])
    st = path.stat()
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert st.st_size == 32 << 20
    orch.stop()
    assert not path.exists(), "the arena outlived its worker"


def _client_child(config: Path, wfd: int) -> None:
    """A forked client: attach, send a request, say so ("1", or "0" and the error), and wait to be killed."""
    try:
        c = Client(config, shm=True, shm_lease_mb=1, connect_timeout=30)
        fut = c.submit(np.ones((8, 256), np.float32), timeout=60)
        os.write(wfd, b"1")
        fut.result(60)
        time.sleep(60)  # killed long before
    except BaseException as exc:
        os.write(wfd, b"0" + repr(exc).encode()[:200])
    finally:
        os._exit(0)


@pytest.mark.slow
def test_killed_clients_leave_no_lease_behind(short_tmp, orchestrator_factory) -> None:
    config = synthetic(short_tmp, work=300, shm_mb=128)  # ~ms per batch: requests are in flight when killed
    orch = orchestrator_factory(config)
    start = shm_of(orch)
    assert start["free_bytes"] == start["arena_bytes"]
    total, wave = 1000, 25
    killed = 0
    failures: list[bytes] = []
    for _ in range(total // wave):
        children = []
        for _ in range(wave):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _client_child(config, w)
            os.close(w)
            children.append((pid, r))
        for pid, r in children:
            got = os.read(r, 256)  # the request is sent (or the child failed: then it says why)
            os.close(r)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if got == b"1":
                killed += 1
            else:
                failures.append(got)
    assert killed == total, failures[:5]
    st = orch.wait_status(
        lambda st: (
            st["workers"][0]["shm"]["leases"] == 0
            and st["workers"][0]["shm"]["free_bytes"] == start["free_bytes"]
        ),
        timeout=30,
    )
    end = st["workers"][0]["shm"]
    assert end["leases"] == 0
    assert end["free_bytes"] == start["free_bytes"]
    with Client(config) as c:  # and it still serves
        x = np.ones((2, 256), np.float32)
        assert np.array_equal(c.infer(x)["y"], reference(x, 300))


def test_oversized_frames_request_fails_at_once_and_others_succeed(short_tmp, orchestrator_factory) -> None:
    config = write_config(
        short_tmp,
        {
            "workers": {"device": "cpu"},
            "model": {"kind": "synthetic", "item_shape": [256], "max_batch": 100000},
            "transport": {"max_message_bytes": 1 << 20, "shm_mb": 0},
        },
    )
    orchestrator_factory(config)
    big = np.ones((2048, 256), np.float32)  # 2 MiB: over the 1 MiB limit
    small = np.ones((4, 256), np.float32)
    with Client(config) as c:
        t0 = time.monotonic()
        with pytest.raises(BatchTooLargeError, match="message limit"):
            c.infer(big)
        assert time.monotonic() - t0 < 1.0
        print(f"figure: an oversized request failed after {time.monotonic() - t0:.4f} s")
        futs = [c.submit(small) for _ in range(50)]
        futs.insert(25, c.submit(big))
        futs += [c.submit(small) for _ in range(50)]
        done, _ = wait(futs, timeout=30)
        assert time.monotonic() - t0 < 30
        errors = [f.exception() for f in futs if f.exception() is not None]
        assert len(errors) == 1 and isinstance(errors[0], BatchTooLargeError)
        assert all(
            np.array_equal(f.result()["y"], reference(small, 0)) for f in futs if f.exception() is None
        )
