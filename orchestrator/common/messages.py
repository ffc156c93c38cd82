"""Typed messages of the internal channels: msgspec Structs, one decoder per channel.

Imported by the supervisor, the workers and the client; no process-specific state here, and nothing of the
supervisor, the monitor or CUDA. The data plane (client <-> worker) is orchestrator/common/protocol.py's.

  channel                                        encoding                     kinds
  worker PUSH -> supervisor inbox PULL           msgpack map                  ready, failed, hb, stall, state
  supervisor -> worker: <run_dir>/specs/ID.json  JSON object                  spec
  supervisor events PUB -> client SUB            [topic, msgpack map]         worker, supervisor
  control DEALER -> supervisor ROUTER            msgpack map                  request
  supervisor ROUTER -> control DEALER            msgpack map                  reply

Every message is a map carrying `v` (VERSION) and `kind` (a Kind value: msgspec's tag, so each channel's
one decoder returns the right Struct). A channel's decode() raises MessageError, naming the channel and what
is wrong (not msgpack, another version, an unknown kind, a missing field or one of the wrong type); the
receiver logs it and drops the message, or answers it with an error on the control plane: never a crash.
Maps rather than arrays, so that a field added later is skipped by an older reader (msgspec ignores unknown
fields); VERSION changes only when a field changes meaning or type, or goes. A map without `v` reads as
version 1, the first; on a channel of one kind (the spec file, control requests, control replies) a map
without `kind` reads as that kind. So the control plane still answers, and is answered by, the untyped
envelope of earlier releases ({"id", "cmd", "args"}; {"id", "ok", "code", "error", "data"}).

Typed fully, except three free-form payloads that the supervisor only passes on: the telemetry report of a
heartbeat and a stall candidate (workers/telemetry.py; the monitor reads them as dicts) and the engine's
describe() facts in READY. A control reply's `data` is the command's own answer (status, endpoints...).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from orchestrator.common.errors import ErrorCode, ProtocolError

VERSION = 1


class Kind(StrEnum):
    """The `kind` of every internal message (the msgspec tag)."""

    READY = "ready"  # worker -> supervisor: loaded, warmed up, serving at `endpoint`
    FAILED = "failed"  # worker -> supervisor: start-up failed (its last words)
    HEARTBEAT = "hb"  # worker -> supervisor: liveness, progress, telemetry
    STALL = "stall"  # worker -> supervisor: a stall candidate to attribute
    STATE = "state"  # worker -> supervisor: draining, stopped
    SPEC = "spec"  # supervisor -> worker (a file): what to serve, where
    WORKER_EVENT = "worker"  # supervisor -> clients: a worker's state changed
    SUPERVISOR_EVENT = "supervisor"  # supervisor -> clients: its beat, or that it is stopping
    REQUEST = "request"  # control: a command
    REPLY = "reply"  # control: its answer


class WorkerState(StrEnum):
    """A worker slot's state, as the supervisor tracks it and publishes it."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class SupervisorState(StrEnum):
    ALIVE = "alive"
    STOPPING = "stopping"


class MessageError(ProtocolError):
    """An internal message was refused: unreadable, another version, an unknown kind or a bad field.
    `code` is UNSUPPORTED_VERSION for another version, BAD_HEADER otherwise (control replies carry it)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_HEADER) -> None:
        super().__init__(message)
        self.code = code


class Message(msgspec.Struct, kw_only=True, tag_field="kind"):
    """Base of every internal message: `v` on the wire; `kind` is the subclass's tag."""

    v: int = VERSION

    @property
    def kind(self) -> Kind:
        return Kind(str(self.__struct_config__.tag))


# --- worker -> supervisor (the inbox) ---------------------------------------------------------------------

#: A tensor as READY lists it: [name, dtype string, item shape]; a dynamic dimension is named by a string.
TensorInfo = tuple[str, str, list[int | str]]
#: A dynamic dimension as READY lists it: [name, lo, hi, buckets].
DimInfo = tuple[str, int, int, list[int]]


class FromWorker(Message, kw_only=True):
    id: str  # the worker slot, "w0"...
    pid: int  # the sending process: a message from an earlier process of the slot is ignored


class Ready(FromWorker, kw_only=True, tag=Kind.READY.value):
    endpoint: str  # the data ROUTER as bound (a TCP port chosen by the kernel is filled in)
    engine: dict[str, Any]  # Engine.describe(): kind, device, module loading... (each engine its own facts)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    max_batch: int
    dims: list[DimInfo] = []
    buckets: list[int] = []
    depth: int = 1
    cpu_affinity: list[int] = []


class Failed(FromWorker, kw_only=True, tag=Kind.FAILED.value):
    code: int  # the ErrorCode of the start-up failure (INTERNAL for an unexpected exception)
    error: str  # "ExceptionType: message"


class ShmStats(msgspec.Struct, kw_only=True):
    """A worker's shared-memory arena (workers/arena.py Arena.stats()); counts since the process started."""

    arena_bytes: int
    free_bytes: int
    leases: int
    requests: int
    bytes: int
    path: str
    registered: bool
    refused: int = 0


class Heartbeat(FromWorker, kw_only=True, tag=Kind.HEARTBEAT.value):
    t_ns: int  # the worker's monotonic clock
    #: Batches completed since the process started: the counter hang detection watches (a worker with work
    #: queued or in flight whose progress stays put for workers.hang_timeout_s is killed and restarted).
    progress: int
    requests: int  # requests completed, both paths
    queued: int
    inflight: int  # batches on the device
    faults: int  # driver-lock operations after READY
    errors: dict[int, int] = {}  # error replies by ErrorCode
    dropped: int = 0  # messages with no usable reply address
    host_ns: int = 0  # serving-thread busy time
    #: workers/telemetry.py WorkerTelemetry.report(): the monitor's input, free-form (it evolves with the
    #: monitor and is versioned by its own "v").
    report: dict[str, Any] | None = None
    shm: ShmStats | None = None  # None: shared memory is off on this worker


class Stall(FromWorker, kw_only=True, tag=Kind.STALL.value):
    candidate: dict[str, Any]  # workers/telemetry.py: a batch to attribute (free-form, like the report)


class StateChange(FromWorker, kw_only=True, tag=Kind.STATE.value):
    state: WorkerState  # DRAINING once a stop began, STOPPED once drained


WorkerMessage = Ready | Failed | Heartbeat | Stall | StateChange


# --- supervisor -> worker (the spec file) -----------------------------------------------------------------


class WorkerSpec(Message, kw_only=True, tag=Kind.SPEC.value):
    """What one worker process serves and where: written by the supervisor, read at the worker's start."""

    id: str
    device: str  # "cpu" or "gpu:<index>"
    endpoint: str  # the data ROUTER to bind
    supervisor_endpoint: str  # the supervisor's inbox
    ppid: int  # the supervisor: the worker stops when it is gone
    run_dir: str
    config: dict[str, Any]  # orchestrator.common.config.to_dict(): parsed (and checked) again by from_dict
    cpu_affinity: list[int] | None = None
    gpu_uuid: str | None = None

    def run_path(self, configured: str | Path) -> Path:
        """The run directory the worker writes under: the spec's, else the config's `run_dir`."""
        return Path(self.run_dir or configured)


# --- supervisor -> clients (the events PUB; the topic frame is the kind, for SUB filters) -----------------


class WorkerEvent(Message, kw_only=True, tag=Kind.WORKER_EVENT.value):
    id: str
    state: WorkerState
    endpoint: str
    pid: int | None
    restarts: int
    t: float  # the supervisor's wall clock


class SupervisorEvent(Message, kw_only=True, tag=Kind.SUPERVISOR_EVENT.value):
    state: SupervisorState
    t: float
    pid: int | None = None


Event = WorkerEvent | SupervisorEvent


# --- the control envelope ---------------------------------------------------------------------------------


class ControlRequest(Message, kw_only=True, tag=Kind.REQUEST.value):
    id: int = 0  # echoed in the reply
    cmd: str  # a command name (orchestrator/supervisor/control.py COMMANDS)
    args: dict[str, Any] = {}


class ControlReply(Message, kw_only=True, tag=Kind.REPLY.value):
    id: int  # the request's; 0 when the request was unreadable
    ok: bool
    code: int = (
        0  # an ErrorCode when not ok: orchestrator.common.errors.error_from_code maps it to the exception
    )
    error: str = ""
    data: Any = None  # the command's answer


# --- encoding and decoding --------------------------------------------------------------------------------


def _enc_hook(obj: Any) -> Any:
    """What msgspec does not encode itself but msgpack did, in the free-form payloads: subclasses of the
    scalar types (torch.__version__ is a str subclass; numpy.float64 a float one) and numpy scalars."""
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, bytes):
        return bytes(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, int):
        return int(obj)
    if hasattr(obj, "item"):  # numpy.int64 and the like
        return obj.item()
    raise TypeError(f"{type(obj).__name__} cannot go into an internal message")


_MSGPACK = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_JSON = msgspec.json.Encoder(enc_hook=_enc_hook)


def encode(msg: Message) -> bytes:
    """A message as msgpack (every channel but the spec file)."""
    return _MSGPACK.encode(msg)


def encode_json(msg: Message) -> bytes:
    """A message as JSON (the spec file)."""
    return _JSON.encode(msg)


class _Head(msgspec.Struct):
    """What the cold path reads of a refused message to say why: its version and kind, when it has them."""

    v: Any = None
    kind: Any = None


M = TypeVar("M", bound=Message)


class Channel(Generic[M]):
    """The one decoder of one channel: decode() returns one of its Structs or raises MessageError."""

    def __init__(self, name: str, types: tuple[type[Message], ...], json: bool = False) -> None:
        self.name = name
        self.kinds = tuple(str(t.__struct_config__.tag) for t in types)
        module = msgspec.json if json else msgspec.msgpack
        union: Any = types[0] if len(types) == 1 else _union(types)
        self._decode = module.Decoder(union).decode
        self._head = module.Decoder(_Head).decode
        self._format = "JSON" if json else "msgpack"

    def decode(self, data: bytes | memoryview) -> M:
        try:
            msg = self._decode(data)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise self._refusal(data, exc) from None
        if msg.v != VERSION:
            raise MessageError(
                f"{self.name}: a {msg.kind.value!r} message of version {msg.v!r}, and this release speaks "
                f"version {VERSION} (a peer from another release?)",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        return msg  # type: ignore[no-any-return]

    def _refusal(self, data: bytes | memoryview, exc: Exception) -> MessageError:
        """Cold path: why a message did not decode, reading only its version and kind."""
        try:
            head = self._head(data)
        except msgspec.DecodeError:
            return MessageError(f"{self.name}: not a {self._format} map ({exc})")
        if head.v is not None and head.v != VERSION:
            return MessageError(
                f"{self.name}: a message of version {head.v!r}, and this release speaks version {VERSION} "
                "(a peer from another release?)",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        if head.kind not in self.kinds:
            what = "no kind" if head.kind is None else f"unknown kind {str(head.kind)[:40]!r}"
            return MessageError(f"{self.name}: {what}; expected one of {', '.join(self.kinds)}")
        return MessageError(f"{self.name}: bad {head.kind!r} message: {exc}")


def _union(types: tuple[type[Message], ...]) -> Any:
    out: Any = types[0]
    for t in types[1:]:
        out = out | t
    return out


#: The supervisor's inbox: what workers send.
WORKER_MESSAGES: Channel[WorkerMessage] = Channel(
    "worker message", (Ready, Failed, Heartbeat, Stall, StateChange)
)
#: The spec file a worker reads at start (JSON).
WORKER_SPEC: Channel[WorkerSpec] = Channel("worker spec", (WorkerSpec,), json=True)
#: The supervisor's events, as clients read them.
EVENTS: Channel[Event] = Channel("supervisor event", (WorkerEvent, SupervisorEvent))
#: Control requests (the supervisor reads them) and replies (the CLI and clients read them).
CONTROL_REQUESTS: Channel[ControlRequest] = Channel("control request", (ControlRequest,))
CONTROL_REPLIES: Channel[ControlReply] = Channel("control reply", (ControlReply,))
