"""Hostile input at a real orchestrator: hypothesis throws malformed, truncated, oversized and random multipart
messages (10,000+ per endpoint) at a worker's data ROUTER and at the supervisor's control ROUTER, with valid
requests interleaved. Every message due a reply gets exactly one, valid requests still succeed, and no
process dies. Runs in the pytest process against a detached orchestrator (CPU synthetic engine)."""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from orchestrator.common import messages, protocol
from orchestrator.common.errors import ErrorCode
from orchestrator.common.rundir import RunDir
from tests.conftest import write_config

pytestmark = pytest.mark.timeout(180)

MAX_MSG = 1 << 20  # [transport] max_message_bytes for these tests
CONTROL_MAX = 1 << 16  # the supervisor's control socket limit
ITEM, MAX_BATCH = 8, 4
PER_EXAMPLE = 100  # messages per hypothesis example
EXAMPLES = 105  # > 10,000 messages per endpoint
REPLY_TIMEOUT_MS = 10_000

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# No shrinking: the system under test is a live process, so replaying shrunk inputs against a worker that a
# failing example may have killed would shrink towards the wrong culprit. Hypothesis prints the whole batch.


class Msg:
    """One message to send. A well-formed request carries `x` and gets a unique request id when sent."""

    def __init__(self, frames: list[bytes], x: np.ndarray | None = None, oversize: int = 0) -> None:
        self.frames = frames
        self.x = x
        self.valid: tuple[int, np.ndarray] | None = None  # (request id, x) once sent
        self.oversize = oversize  # > 0: one frame this large, beyond the socket's limit (the peer is dropped)

    def __repr__(self) -> str:  # keep hypothesis' falsifying-example output readable
        if self.oversize:
            return f"Msg(oversize={self.oversize})"
        if self.x is not None:
            return f"Msg(valid request, x of shape {self.x.shape})"
        return f"Msg({[f[:48] + (b'...' if len(f) > 48 else b'') for f in self.frames]})"


# --- message builders --------------------------------------------------------------------------------
# Hypothesis chooses, per message, its kind and a seed; the seed drives a plain random.Random for the bulk
# of the bytes. Drawing every byte through hypothesis costs ~25 us per draw: 10,000 structured messages
# per endpoint would take minutes, and this keeps each fuzz test within seconds.

DTYPES = [
    "<f4",
    "<f4",
    "f4",
    "<f8",
    "|b1",
    "?",
    "<i4",
    "u1",
    "<f2",
    "f16",
    "O",
    "V8",
    "S3",
    "U2",
    "(2)f",
    "f4,f4",
    "M8",
    "c8",
    "",
    "a",
    "float32",
    "xx",
    "<f4 ",
    "()f",
    ",",
    ",f4",
    "(,)f",
    "[f4",
    "(2",
]
HUGE_DIMS = [
    0,
    1,
    2**16,
    2**30,
    2**31 - 1,
    2**31 - 1,
]  # element counts that overflow int64, or huge next to a zero
ODD_DIMS = [-1, 2**31, True, 1.0, None, "4", [2]]


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-encodable value: scalars of every type at their edges, nested lists and maps."""
    k = rng.randrange(10 if depth < 3 else 7)
    if k == 0:
        return None
    if k == 1:
        return rng.random() < 0.5
    if k == 2:
        return rng.choice([0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randint(-(2**40), 2**40)])
    if k == 3:
        return rng.choice([0.0, -0.0, math.inf, -math.inf, math.nan, rng.uniform(-1e9, 1e9)])
    if k == 4:
        return "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x10FFFF) & ~0x800]))
            for _ in range(rng.randrange(12))
        )
    if k in (5, 6):
        return rng.randbytes(rng.randrange(16))
    if k in (7, 8):
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {
        rng.choice([rand_str(rng), rng.randint(-3, 3)]): rand_value(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def rand_str(rng: random.Random) -> str:
    return "".join(chr(rng.randint(32, 126)) for _ in range(rng.randrange(8)))


def rand_frames(rng: random.Random, lo: int, hi: int, size: int) -> list[bytes]:
    return [rng.randbytes(rng.randrange(size)) for _ in range(rng.randint(lo, hi))]


def rand_spec(rng: random.Random) -> Any:
    if rng.random() < 0.15:  # not [name, dtype, shape] at all
        return [rand_value(rng) for _ in range(rng.randint(0, 4))]
    name = rng.choice(["x", "x", "x", "y", "", rand_str(rng)])
    dtype = rng.choice(DTYPES) if rng.random() < 0.9 else rand_value(rng)
    if rng.random() < 0.3:
        shape: Any = [rng.choice(HUGE_DIMS) for _ in range(rng.randint(3, 8))]
    elif rng.random() < 0.1:
        shape = rand_value(rng)
    else:
        shape = [
            rng.randint(0, 9) if rng.random() < 0.9 else rng.choice(ODD_DIMS)
            for _ in range(rng.randint(0, 9))
        ]
    return [name, dtype, shape]


def sized_frames(rng: random.Random, specs: Any) -> list[bytes]:
    """Tensor frames whose sizes match the specs as a naive decoder computes them (int64 wrap-around and
    all) when that is small, otherwise random."""
    out = []
    for spec in specs if isinstance(specs, list) else []:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                n = int(np.prod(spec[2], dtype=np.int64)) * np.dtype(spec[1]).itemsize
        except Exception:
            n = -1
        out.append(bytes(n) if 0 <= n <= 4096 else rng.randbytes(rng.randrange(32)))
    return out


def mostly(rng: random.Random, good: Any, bad: list[Any]) -> Any:
    """`good` most of the time, so that messages get past one check and reach the next one."""
    return good if rng.random() < 0.85 else rng.choice(bad)


def header_message(rng: random.Random) -> Msg:
    head: list[Any] = [
        mostly(rng, protocol.VERSION, [0, 2, -1, None, "1", 1.0]),
        mostly(rng, 1, [0, 2, None, "infer"]),
        mostly(
            rng, rng.choice([rng.randint(0, 2**64 - 1), rng.randint(0, 1000)]), [-1, None, 1.5, "7", True]
        ),
        mostly(rng, rng.choice([0, 0, rng.randint(0, 2**64 - 1)]), [-1, None, 0.5, "x", False]),
        mostly(rng, [rand_spec(rng) for _ in range(rng.randint(0, 3))], [rand_value(rng)]),
    ]
    if rng.random() < 0.1:  # wrong length
        head = head[: rng.randint(0, 4)] + [rand_value(rng) for _ in range(rng.randint(0, 2))]
    if len(head) == 5 and rng.random() < 0.6:
        frames = sized_frames(rng, head[4])
    else:
        frames = rand_frames(rng, 0, 4, 32)
    return Msg([msgpack.packb(head)] + frames)


def rand_x(rng: random.Random) -> np.ndarray:
    rows = rng.randint(1, MAX_BATCH)
    return np.arange(rows * ITEM, dtype=np.float32).reshape(rows, ITEM) * np.float32(rng.uniform(-4, 4))


def mutated_request(rng: random.Random) -> Msg:
    frames = [bytes(f) for f in protocol.encode_request(rng.randint(0, 2**40), {"x": rand_x(rng)})]
    op = rng.choice(
        ["cut header", "drop frame", "cut tensor", "grow tensor", "extra frame", "flip", "empties"]
    )
    if op == "cut header":
        frames[0] = frames[0][: rng.randrange(len(frames[0]))]
    elif op == "drop frame":
        frames = frames[:1]
    elif op == "cut tensor":
        frames[1] = frames[1][: rng.randrange(len(frames[1]))]
    elif op == "grow tensor":
        frames[1] += rng.randbytes(rng.randint(1, 16))
    elif op == "extra frame":
        frames.append(rng.randbytes(rng.randrange(16)))
    elif op == "flip":
        i = rng.randrange(len(frames[0]))
        frames[0] = frames[0][:i] + bytes([rng.randrange(256)]) + frames[0][i + 1 :]
    else:
        frames = [b""] * rng.randint(1, 4)
    return Msg(frames)  # may still be valid by chance (a flipped request id): then it gets a result


def data_message(kind: str, seed: int) -> Msg:
    rng = random.Random(seed)
    if kind == "random":
        return Msg(rand_frames(rng, 1, 6, 80))
    if kind == "msgpack":
        return Msg([msgpack.packb(rand_value(rng))] + rand_frames(rng, 0, 3, 32))
    if kind == "header":
        return header_message(rng)
    if kind == "mutated":
        return mutated_request(rng)
    return Msg([], x=rand_x(rng))


def control_message(kind: str, seed: int) -> Msg:
    rng = random.Random(seed)
    if kind == "random":
        return Msg([rng.randbytes(rng.randrange(120))])
    if kind == "msgpack":
        value = rand_value(rng)
        if isinstance(value, dict) and value.get("cmd") == "stop":  # never the one command that ends the test
            value["cmd"] = "ping"
        return Msg([msgpack.packb(value)])
    if kind == "multipart":  # the supervisor answers single-frame requests only; these get no reply
        return Msg(rand_frames(rng, 2, 5, 40))
    cmd = rng.choice(
        ["status", "endpoints", "ping", "STOP", "stop ", "", "nope", rand_str(rng), rand_value(rng)]
    )
    if cmd == "stop":  # the one command that would end the test
        cmd = "ping"
    env = {
        "kind": mostly(rng, "request", ["reply", "", None, rand_value(rng)]),
        "v": mostly(rng, messages.VERSION, [0, 2, None, "1"]),
        "id": rand_value(rng) if rng.random() < 0.5 else rng.randint(0, 1000),
        "cmd": cmd,
        "args": rand_value(rng) if rng.random() < 0.7 else {},
    }
    for key in rng.sample(["kind", "v", "id", "cmd", "args"], rng.choice([0, 0, 0, 1, 2])):
        del env[key]
    return Msg([msgpack.packb(env)])


DATA_KINDS = ["random", "msgpack", "header", "header", "header", "mutated", "mutated", "valid"]
CONTROL_KINDS = ["random", "msgpack", "envelope", "envelope", "envelope", "multipart"]


def batches(build: Any, kinds: list[str], big: int) -> st.SearchStrategy[list[Msg]]:
    """PER_EXAMPLE messages; sometimes one frame just under the limit, sometimes one over it."""

    @st.composite
    def strategy(draw: Any) -> list[Msg]:
        recipe = draw(
            st.lists(
                st.tuples(st.sampled_from(kinds), st.integers(0, 2**32 - 1)),
                min_size=PER_EXAMPLE,
                max_size=PER_EXAMPLE,
            )
        )
        msgs = [build(kind, seed) for kind, seed in recipe]
        if draw(st.integers(0, 3)) == 0:  # large but allowed: answered like any other bad message
            msgs[draw(st.integers(0, PER_EXAMPLE - 1))] = Msg([bytes(big - draw(st.integers(0, 1000)))])
        if draw(st.integers(0, 3)) == 0:
            msgs.insert(
                draw(st.integers(0, PER_EXAMPLE)), Msg([], oversize=MAX_MSG + draw(st.integers(1, 4096)))
            )
        return msgs

    return strategy()


_ids = iter(range(1 << 50, 1 << 51))


# --- the sending side ---------------------------------------------------------------------------------


class Peer:
    """A DEALER to one endpoint that is recreated after an oversized message (ZeroMQ drops the peer)."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.sock = self._open()
        self.sent = 0
        self.oversized = 0

    def _open(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def send(self, msg: Msg) -> None:
        if msg.x is not None:  # unique ids, far from the ones hypothesis draws for malformed messages
            msg.valid = (next(_ids), msg.x)
            msg.frames = [bytes(f) for f in protocol.encode_request(msg.valid[0], {"x": msg.x})]
        self.sock.send_multipart(msg.frames)
        self.sent += 1

    def recv(self, n: int) -> list[list[bytes]]:
        """Exactly n replies, then nothing more."""
        out = []
        for _ in range(n):
            assert self.sock.poll(REPLY_TIMEOUT_MS), f"only {len(out)} of {n} replies arrived"
            out.append(self.sock.recv_multipart())
        assert not self.sock.poll(5), "more replies than messages that were due one"
        return out

    def send_oversized(self, size: int) -> None:
        """Send one frame over the limit and wait until the server drops the connection; then reconnect."""
        mon = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            self.sock.send_multipart([b"\xa5" * size])
            assert mon.poll(REPLY_TIMEOUT_MS), f"a {size}-byte message did not get the peer disconnected"
        finally:
            self.sock.disable_monitor()
            mon.close(0)
            self.sock.close(0)
        self.sock = self._open()
        self.sent += 1
        self.oversized += 1

    def close(self) -> None:
        self.sock.close(0)


def start(short_tmp: Path, orchestrator_factory: Any) -> tuple[Any, dict]:
    cfg = write_config(
        short_tmp,
        {
            "workers": {"count": 1},
            "model": {"kind": "synthetic", "item_shape": [ITEM], "max_batch": MAX_BATCH},
            "transport": {"max_message_bytes": MAX_MSG},
        },
    )
    orch = orchestrator_factory(cfg)
    return orch, orch.status()


def worker_crash(orch: Any) -> str:
    """The last traceback in the worker's log, if it has one (for a readable failure)."""
    text = (orch.run_dir / "logs" / "w0.log").read_text(errors="replace")
    i = text.rfind("Traceback")
    return text[i:][-3000:] if i >= 0 else "(no traceback in the worker log)"


def assert_nothing_died(orch: Any, before: dict) -> dict:
    after = orch.status()
    assert after["pid"] == before["pid"]
    for b, a in zip(before["workers"], after["workers"], strict=True):
        assert (a["pid"], a["state"], a["restarts"]) == (b["pid"], "ready", 0), a
    return after


def check_data_replies(msgs: list[Msg], replies: list[list[bytes]]) -> int:
    """Each valid request got its correct result; every reply is a readable reply. Returns results seen."""
    decoded = [protocol.decode_reply(r) for r in replies]
    by_id = {}
    for rep in decoded:
        if rep.code == ErrorCode.OK:
            by_id[rep.request_id] = rep
        else:
            assert rep.code in ErrorCode._value2member_map_ and rep.message, (rep.code, rep.message)
    for m in msgs:
        if m.valid is not None:
            rid, x = m.valid
            assert rid in by_id, f"valid request {rid} got no result"
            np.testing.assert_array_equal(by_id[rid].tensors["y"], x)  # work = 0: the identity
    return len(by_id)


def _fresh_valid() -> Msg:
    return Msg([], x=np.full((2, ITEM), 3.5, np.float32))


# --- tests --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_worker_data_endpoint(short_tmp, orchestrator_factory) -> None:
    orch, before = start(short_tmp, orchestrator_factory)
    ctx = zmq.Context()
    peer = Peer(ctx, before["workers"][0]["endpoint"])
    seen = {"results": 0}

    @FUZZ
    @given(batches(data_message, DATA_KINDS, MAX_MSG))
    def fuzz(msgs: list[Msg]) -> None:
        due: list[Msg] = []
        for m in msgs + [_fresh_valid()]:  # and a valid request at the end of every batch
            if m.oversize:
                seen["results"] += check_data_replies(due, peer.recv(len(due)))  # replies first: the
                due = []  # disconnect would lose them
                peer.send_oversized(m.oversize)
            else:
                peer.send(m)
                due.append(m)
        seen["results"] += check_data_replies(due, peer.recv(len(due)))

    try:
        fuzz()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- worker log ---\n{worker_crash(orch)}") from None
    finally:
        peer.close()
        ctx.term()
    assert peer.sent >= 10_000 and peer.oversized > 0, (peer.sent, peer.oversized)
    assert seen["results"] >= EXAMPLES
    after = assert_nothing_died(orch, before)
    assert after["workers"][0]["errors"], "the worker counted no bad input at all"


@pytest.mark.slow
def test_fuzz_control_endpoint(short_tmp, orchestrator_factory) -> None:
    orch, before = start(short_tmp, orchestrator_factory)
    ctx = zmq.Context()
    ctl = Peer(ctx, RunDir(orch.run_dir).control_endpoint())
    data = Peer(ctx, before["workers"][0]["endpoint"])
    pings = iter(range(1 << 40, 1 << 41))

    @FUZZ
    @given(batches(control_message, CONTROL_KINDS, CONTROL_MAX // 2))
    def fuzz(msgs: list[Msg]) -> None:
        due = 0
        ping_ids = []
        raw: list[list[bytes]] = []
        for i, m in enumerate(msgs):
            if m.oversize:
                raw += ctl.recv(due)  # replies first: the disconnect would lose them
                due = 0
                ctl.send_oversized(m.oversize)
                continue
            ctl.send(m)
            due += len(m.frames) == 1
            if i % 10 == 0:  # valid commands interleaved
                ping_ids.append(next(pings))
                ping = messages.ControlRequest(id=ping_ids[-1], cmd="ping")
                ctl.send(Msg([messages.encode(ping)]))
                due += 1
        replies = [msgpack.unpackb(r[0], raw=False, strict_map_key=False) for r in raw + ctl.recv(due)]
        for rep in replies:
            assert isinstance(rep, dict) and set(rep) >= {"id", "ok", "code"}, rep
        pongs = {
            r["id"]: r
            for r in replies
            if type(r["id"]) is int and r["ok"] and isinstance(r.get("data"), dict) and "pong" in r["data"]
        }
        for pid in ping_ids:
            assert pongs[pid]["data"]["pid"] == before["pid"]
        v = _fresh_valid()  # and the data plane is unaffected
        data.send(v)
        check_data_replies([v], data.recv(1))

    try:
        fuzz()
    finally:
        ctl.close()
        data.close()
        ctx.term()
    assert ctl.sent >= 10_000 and ctl.oversized > 0, (ctl.sent, ctl.oversized)
    assert_nothing_died(orch, before)


def test_headers_that_numpy_chokes_on_get_an_error_reply_not_a_dead_worker(
    short_tmp, orchestrator_factory
) -> None:
    """Found by the fuzz tests above. A shape whose element count overflows int64 (or is huge next to a zero
    dimension) made numpy raise ValueError, and dtype strings such as "," made np.dtype raise SyntaxError,
    inside the worker's receive path: one two-frame message killed the worker."""
    orch, before = start(short_tmp, orchestrator_factory)
    ctx = zmq.Context()
    peer = Peer(ctx, before["workers"][0]["endpoint"])
    cases = [
        ("<f4", [65536, 65536, 65536, 65536]),
        ("<f4", [0, 2**31 - 1, 2**31 - 1, 2**31 - 1]),
        ("<f4", [2**30, 2**30, 16, 1]),
        (",", [2, 8]),
        (",f4", [2, 8]),
        ("(,)f", [2, 8]),
    ]
    try:
        for i, (dtype, shape) in enumerate(cases):
            head = msgpack.packb([protocol.VERSION, 1, 10 + i, 0, [["x", dtype, shape]]])
            peer.send(Msg([head, b""]))
            (reply,) = peer.recv(1)
            rep = protocol.decode_reply(reply)
            assert rep.code != ErrorCode.OK and rep.request_id == 10 + i, (
                dtype,
                shape,
                rep.code,
                rep.message,
            )
            v = _fresh_valid()
            peer.send(v)
            check_data_replies([v], peer.recv(1))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- worker log ---\n{worker_crash(orch)}") from None
    finally:
        peer.close()
        ctx.term()
    assert_nothing_died(orch, before)


@pytest.mark.filterwarnings("ignore:Data type alias:DeprecationWarning")
@settings(max_examples=2000, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(
            st.text(max_size=8) | st.sampled_from(DTYPES),
            st.lists(st.integers(0, 2**31 - 1) | st.sampled_from(HUGE_DIMS), max_size=9),
        ),
        max_size=3,
    ),
    st.lists(st.binary(max_size=64), max_size=3),
)
def test_request_decoding_raises_only_typed_errors(specs: list, frames: list[bytes]) -> None:
    """In-process companion of the fuzz tests: whatever the header holds, decoding and admission raise only
    the request-scoped errors the worker answers with (anything else would escape its receive loop)."""
    head = msgpack.packb([protocol.VERSION, 1, 7, 0, [["x", d, s] for d, s in specs]])
    try:
        header = protocol.decode_request_header(head)
        protocol.decode_tensors(header, frames)
    except protocol.DecodeError:
        pass
