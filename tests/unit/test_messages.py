"""The typed internal messages (orchestrator/common/messages.py): each channel's one decoder returns the
right Struct, refuses another version, an unknown kind or a bad field with a reason (never an exception of
another type), and the receivers log or answer a refusal instead of crashing."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import msgspec
import pytest
import zmq

from orchestrator.client.control import ControlClient
from orchestrator.common import messages
from orchestrator.common.config import Config
from orchestrator.common.errors import (
    ControlError,
    EngineError,
    ErrorCode,
    InvalidInputError,
    OverloadedError,
    ProtocolError,
    error_from_code,
)
from orchestrator.common.messages import Kind, WorkerState
from orchestrator.common.rundir import RunDir
from orchestrator.supervisor import control
from orchestrator.supervisor.core import Supervisor
from orchestrator.supervisor.devices import WorkerPlan
from orchestrator.supervisor.worker_handle import State, WorkerHandle
from workers.worker import run_worker, title

PID = 4321

SAMPLES: list[messages.Message] = [
    messages.Ready(
        id="w0",
        pid=PID,
        endpoint="ipc:///tmp/w0.sock",
        engine={"kind": "synthetic"},
        inputs=[("x", "<f4", [8]), ("ids", "<i8", ["seq"])],
        outputs=[("y", "<f4", [8])],
        max_batch=64,
        dims=[("seq", 1, 128, [32, 64, 128])],
        buckets=[1, 2, 4],
        depth=2,
        cpu_affinity=[0, 1],
    ),
    messages.Failed(id="w0", pid=PID, code=int(ErrorCode.INTERNAL), error="EngineError: no model"),
    messages.Heartbeat(
        id="w0",
        pid=PID,
        t_ns=1,
        progress=7,
        requests=9,
        queued=1,
        inflight=2,
        faults=0,
        errors={10: 3},
        report={"v": 1, "interval": {"batches": 7}},
        shm=messages.ShmStats(
            arena_bytes=1 << 20,
            free_bytes=1 << 19,
            leases=1,
            requests=5,
            bytes=80,
            path="/dev/shm/a",
            registered=False,
        ),
    ),
    messages.Stall(id="w0", pid=PID, candidate={"kind": ["enqueue"], "t0_ns": 1, "t1_ns": 2}),
    messages.StateChange(id="w0", pid=PID, state=WorkerState.DRAINING),
    messages.WorkerEvent(id="w0", state=WorkerState.READY, endpoint="ipc://x", pid=PID, restarts=0, t=1.5),
    messages.SupervisorEvent(state=messages.SupervisorState.ALIVE, pid=PID, t=2.5),
    messages.ControlRequest(id=3, cmd="status", args={"verbose": True}),
    messages.ControlReply(id=3, ok=True, data={"workers": []}),
]
CHANNEL = {
    messages.Ready: messages.WORKER_MESSAGES,
    messages.Failed: messages.WORKER_MESSAGES,
    messages.Heartbeat: messages.WORKER_MESSAGES,
    messages.Stall: messages.WORKER_MESSAGES,
    messages.StateChange: messages.WORKER_MESSAGES,
    messages.WorkerEvent: messages.EVENTS,
    messages.SupervisorEvent: messages.EVENTS,
    messages.ControlRequest: messages.CONTROL_REQUESTS,
    messages.ControlReply: messages.CONTROL_REPLIES,
}


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_each_message_round_trips_through_its_channel_as_a_versioned_map(msg: messages.Message) -> None:
    raw = messages.encode(msg)
    as_map = msgpack.unpackb(raw, strict_map_key=False)
    assert as_map["v"] == messages.VERSION and as_map["kind"] == msg.kind.value
    back = CHANNEL[type(msg)].decode(raw)
    assert type(back) is type(msg) and back == msg


def test_every_kind_has_one_struct() -> None:
    tags = [m.__struct_config__.tag for m in CHANNEL] + [messages.WorkerSpec.__struct_config__.tag]
    assert sorted(tags) == sorted(k.value for k in Kind)


def test_the_worker_spec_is_a_json_file(tmp_path: Path) -> None:
    spec = messages.WorkerSpec(
        id="w3",
        device="gpu:3",
        endpoint="ipc://w3",
        supervisor_endpoint="ipc://inbox",
        ppid=1,
        run_dir="/run/o",
        config={"workers": {"gpus": [3]}},
        cpu_affinity=[6, 7],
        gpu_uuid="GPU-3",
    )
    text = messages.encode_json(spec)
    assert msgspec.json.decode(text)["kind"] == "spec"
    assert messages.WORKER_SPEC.decode(text) == spec
    assert title(spec) == "orchestrator: worker w3 gpu 3 in /run/o"


def _map(**fields: Any) -> bytes:
    return msgpack.packb(fields)


@pytest.mark.parametrize(
    ("raw", "code", "says"),
    [
        (_map(kind="hb", v=2, id="w0"), ErrorCode.UNSUPPORTED_VERSION, "version 2, and this release speaks"),
        (
            messages.encode(messages.StateChange(id="w0", pid=1, state=WorkerState.STOPPED, v=3)),
            ErrorCode.UNSUPPORTED_VERSION,
            "'state' message of version 3",
        ),
        (_map(kind="gossip", v=1, id="w0"), ErrorCode.BAD_HEADER, "unknown kind 'gossip'; expected one of"),
        (_map(v=1, id="w0", progress=3), ErrorCode.BAD_HEADER, "no kind"),
        (_map(kind="hb", v=1, id="w0", pid=1), ErrorCode.BAD_HEADER, "bad 'hb' message: Object missing"),
        (
            msgpack.packb(msgspec.to_builtins(SAMPLES[2]) | {"progress": "7"}),
            ErrorCode.BAD_HEADER,
            "Expected `int`, got `str` - at `$.progress`",
        ),
        (b"\xc1garbage", ErrorCode.BAD_HEADER, "not a msgpack map"),
        (msgpack.packb([1, 2, 3]), ErrorCode.BAD_HEADER, "not a msgpack map"),
    ],
)
def test_refusals_say_why(raw: bytes, code: ErrorCode, says: str) -> None:
    with pytest.raises(messages.MessageError) as ei:
        messages.WORKER_MESSAGES.decode(raw)
    assert ei.value.code == code and says in str(ei.value), str(ei.value)
    assert str(ei.value).startswith("worker message: ")
    assert isinstance(ei.value, ProtocolError)


def test_an_event_is_not_a_worker_message() -> None:
    with pytest.raises(messages.MessageError, match="unknown kind 'worker'"):
        messages.WORKER_MESSAGES.decode(messages.encode(SAMPLES[5]))


def test_a_map_without_a_version_reads_as_version_1() -> None:
    raw = msgspec.to_builtins(SAMPLES[4])
    del raw["v"]
    assert messages.WORKER_MESSAGES.decode(msgpack.packb(raw)) == SAMPLES[4]


# --- the supervisor's inbox -------------------------------------------------------------------------------


def _handle(tmp_path: Path) -> WorkerHandle:
    w = WorkerHandle(WorkerPlan("w0", "cpu", "ipc://w0", None), Config(), RunDir(tmp_path))
    w.proc = SimpleNamespace(pid=PID)  # type: ignore[assignment]  # spawned, as far as the messages go
    w.pidfd = -1  # the sentinel is never polled here
    w.state = State.READY
    return w


def _supervisor(w: WorkerHandle) -> Any:
    sup = SimpleNamespace(workers={w.id: w}, monitor=None, stopping=False, _set_state=lambda w, s: None)
    sup._on_inbox = lambda msg: Supervisor._on_inbox(sup, msg)  # type: ignore[arg-type]
    return sup


def test_the_inbox_logs_and_drops_what_it_refuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = _handle(tmp_path)
    sup = _supervisor(w)
    with caplog.at_level(logging.WARNING, logger="orchestrator.supervisor"):
        Supervisor._receive(sup, _map(kind="hb", v=9, id="w0", pid=PID))
        Supervisor._receive(sup, b"\x00\x01")
    assert [r.getMessage() for r in caplog.records] == [
        "[inbox] refused a message: worker message: a message of version 9, and this release speaks version 1 "
        "(a peer from another release?)",
        "[inbox] refused a message: worker message: not a msgpack map (Expected `object`, got `int`)",
    ]
    assert w.heartbeat is None
    Supervisor._receive(sup, messages.encode(SAMPLES[2]))
    assert w.heartbeat is not None and w.heartbeat.progress == 7


def test_messages_of_an_earlier_process_of_the_slot_are_ignored(tmp_path: Path) -> None:
    w = _handle(tmp_path)
    sup = _supervisor(w)
    Supervisor._receive(sup, messages.encode(messages.Failed(id="w0", pid=PID + 1, code=10, error="late")))
    assert w.last_error == "" and w.startup_failure is None
    Supervisor._receive(sup, messages.encode(messages.Failed(id="w0", pid=PID, code=10, error="bad input")))
    assert w.last_error == "bad input"


@pytest.mark.parametrize(
    ("code", "cls"), [(ErrorCode.INTERNAL, EngineError), (ErrorCode.INVALID_INPUT, InvalidInputError)]
)
def test_a_start_up_failure_is_rebuilt_with_the_code_mapping_of_both_planes(
    tmp_path: Path, code: ErrorCode, cls: type
) -> None:
    w = _handle(tmp_path)
    Supervisor._on_inbox(_supervisor(w), messages.Failed(id="w0", pid=PID, code=int(code), error="E: why"))
    assert type(w.startup_failure) is cls is type(error_from_code(int(code), "x"))
    assert w.startup_failure.code == code and "E: why" in str(w.startup_failure)


def test_hang_detection_watches_the_heartbeat_progress_counter(tmp_path: Path) -> None:
    """A worker with work queued whose `progress` stays put for hang_timeout_s is hung; one that moves is not."""
    w = _handle(tmp_path)
    limit = w.cfg.workers.hang_timeout_s
    t0 = time.monotonic()

    def beat(progress: int, queued: int, now: float) -> None:
        hb = messages.Heartbeat(
            id="w0", pid=PID, t_ns=0, progress=progress, requests=0, queued=queued, inflight=0, faults=0
        )
        w.on_heartbeat(hb, now)

    beat(5, 3, t0)
    beat(6, 3, t0 + limit * 0.9)  # progress: the clock restarts
    beat(6, 3, t0 + limit * 1.5)
    assert w.hung(t0 + limit * 1.5) is None
    beat(6, 3, t0 + limit * 2.0)
    assert "3 requests waiting and no progress" in (w.hung(t0 + limit * 2.0) or "")
    beat(6, 0, t0 + limit * 2.0)  # idle: an unchanged counter is no hang
    assert w.hung(t0 + limit * 2.0) is None


# --- the control plane ------------------------------------------------------------------------------------


def _control(payload: bytes, local: bool = True) -> messages.ControlReply:
    return messages.CONTROL_REPLIES.decode(control.handle(None, payload, local=local))  # type: ignore[arg-type]


def test_control_requests_are_typed_and_refusals_answered_with_their_code() -> None:
    pong = _control(messages.encode(messages.ControlRequest(id=5, cmd="ping")))
    assert pong.ok and pong.id == 5 and pong.data["pong"] is True
    other = _control(_map(kind="request", v=2, id=6, cmd="ping"))
    assert (other.ok, other.id, other.code) == (False, 0, ErrorCode.UNSUPPORTED_VERSION)
    assert "version 2" in other.error
    # The envelope before it was typed: no kind (the channel has one) and no version (1) is still answered.
    assert _control(_map(id=7, cmd="ping", args={})).ok
    reply = _control(_map(kind="reply", v=1, id=7, ok=True))
    assert (reply.ok, reply.code) == (False, ErrorCode.BAD_HEADER)
    assert (
        reply.error == "bad control message: control request: unknown kind 'reply'; expected one of request"
    )
    bad_args = _control(_map(kind="request", v=1, id=8, cmd="ping", args=[1]))
    assert bad_args.code == ErrorCode.BAD_HEADER and "$.args" in bad_args.error
    unknown = _control(messages.encode(messages.ControlRequest(id=9, cmd="dance")))
    assert (unknown.id, unknown.code) == (9, ErrorCode.UNKNOWN_COMMAND)
    remote_stop = _control(messages.encode(messages.ControlRequest(id=10, cmd="stop")), local=False)
    assert (remote_stop.id, remote_stop.code) == (10, ErrorCode.FORBIDDEN)


@pytest.mark.parametrize(
    ("reply", "cls"),
    [
        (messages.ControlReply(id=0, ok=False, code=int(ErrorCode.FORBIDDEN), error="no"), ControlError),
        (
            messages.ControlReply(id=0, ok=False, code=int(ErrorCode.OVERLOADED), error="busy"),
            OverloadedError,
        ),
        (messages.ControlReply(id=0, ok=True, data=1, v=2), messages.MessageError),
    ],
)
def test_the_control_client_raises_what_the_code_maps_to(reply: messages.ControlReply, cls: type) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://control")

    def answer() -> None:
        ident, payload = router.recv_multipart()
        assert messages.CONTROL_REQUESTS.decode(payload).cmd == "status"
        router.send_multipart([ident, messages.encode(reply)])

    t = threading.Thread(target=answer)
    t.start()
    try:
        with ControlClient("inproc://control", ctx=ctx) as c, pytest.raises(cls):
            c.call("status")
    finally:
        t.join(5)
        router.close(0)
        ctx.term()


def test_a_worker_refuses_a_spec_file_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "w0.json"
    path.write_bytes(msgspec.json.encode({"kind": "spec", "v": 2, "id": "w0"}))
    assert run_worker(str(path)) == 2
    assert "cannot use" in capsys.readouterr().err


def test_free_form_payloads_take_what_msgpack_took() -> None:
    """Engine facts and telemetry hold scalar subclasses (torch.__version__ is a str subclass) and numpy
    scalars: they go out as the plain values, as with msgpack; anything else is refused by name."""
    import numpy as np

    class Version(str):
        pass

    facts = {
        "torch": Version("2.11.0"),
        "gpu_us": np.float64(1.5),
        "slots": np.int64(3),
        "ok": np.bool_(True),
    }
    ready = msgspec.structs.replace(SAMPLES[0], engine=facts)
    back = messages.WORKER_MESSAGES.decode(messages.encode(ready))
    assert isinstance(back, messages.Ready)
    assert back.engine == {"torch": "2.11.0", "gpu_us": 1.5, "slots": 3, "ok": True}
    with pytest.raises(TypeError, match="Path cannot go into an internal message"):
        messages.encode(msgspec.structs.replace(SAMPLES[0], engine={"path": Path("/m")}))
