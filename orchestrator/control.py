"""Control plane: the supervisor's commands (one small class each) and the client the CLI uses to call them.

Commands run on the supervisor's main thread, which owns the control ROUTER. The envelope is typed
(orchestrator/messages.py), both msgpack maps:
  request  ControlRequest {"kind": "request", "v": 1, "id": int, "cmd": str, "args": {...}}
  reply    ControlReply   {"kind": "reply", "v": 1, "id": int, "ok": bool, "code": int, "error": str, "data": any}
A failed command's `code` is an ErrorCode, mapped back to the exception by errors.error_from_code, the one
mapping the data plane uses too.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar

import zmq

from orchestrator import messages
from orchestrator.errors import ErrorCode, UnavailableError, error_from_code
from orchestrator.messages import ControlReply, ControlRequest
from orchestrator.security import ClientKeys

if TYPE_CHECKING:
    from orchestrator.supervisor import Supervisor


class Command:
    name: ClassVar[str] = ""
    #: only accepted on the local ipc control socket (never over TCP)
    local_only: ClassVar[bool] = False

    def execute(self, sup: Supervisor, args: dict[str, Any], local: bool) -> Any:
        raise NotImplementedError


class Status(Command):
    """status: the supervisor's pid and uptime, every worker's state, and the monitor snapshot."""

    name = "status"

    def execute(self, sup: Supervisor, args: dict[str, Any], local: bool) -> Any:
        return sup.status()


class Endpoints(Command):
    """endpoints: where clients send batches (each worker's ROUTER), the model's tensors, the event stream."""

    name = "endpoints"

    def execute(self, sup: Supervisor, args: dict[str, Any], local: bool) -> Any:
        return sup.endpoints(local)


class Stop(Command):
    """stop: stop admission, drain in-flight work within stop_timeout_s, stop workers, exit. Local only."""

    name = "stop"
    local_only = True

    def execute(self, sup: Supervisor, args: dict[str, Any], local: bool) -> Any:
        sup.request_stop("stop command")
        return {"stopping": True, "pid": os.getpid()}


class Ping(Command):
    """ping: liveness of the supervisor's control loop."""

    name = "ping"

    def execute(self, sup: Supervisor, args: dict[str, Any], local: bool) -> Any:
        return {"pong": True, "pid": os.getpid()}


COMMANDS: dict[str, Command] = {c.name: c() for c in (Status, Endpoints, Stop, Ping)}


log = logging.getLogger(__name__)


def _refuse(req_id: int, code: ErrorCode, error: str) -> bytes:
    return messages.encode(ControlReply(id=req_id, ok=False, code=int(code), error=error))


def handle(sup: Supervisor, payload: bytes, local: bool) -> bytes:
    """Decode one control request, run it, encode the reply. Never raises for bad input."""
    try:
        req = messages.CONTROL_REQUESTS.decode(payload)
    except messages.MessageError as exc:  # garbage on the control socket: answer, never crash
        log.warning("[control] refused a request: %s", exc)
        return _refuse(0, exc.code, f"bad control message: {exc}")
    cmd = COMMANDS.get(req.cmd)
    if cmd is None:
        known = ", ".join(sorted(COMMANDS))
        return _refuse(req.id, ErrorCode.UNKNOWN_COMMAND, f"unknown command {req.cmd[:40]!r}; known: {known}")
    if cmd.local_only and not local:
        return _refuse(
            req.id, ErrorCode.FORBIDDEN, f"{cmd.name} is only accepted on the local control socket"
        )
    try:
        data = cmd.execute(sup, req.args, local)
    except Exception as exc:  # a command bug must not take the supervisor down
        return _refuse(req.id, ErrorCode.INTERNAL, str(exc))
    return messages.encode(ControlReply(id=req.id, ok=True, data=data))


class ControlClient:
    """Synchronous control-plane client (CLI, client discovery). One thread at a time."""

    _ids = itertools.count(1)

    def __init__(
        self,
        endpoint: str,
        ctx: zmq.Context | None = None,
        timeout_s: float = 5.0,
        keys: ClientKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 64 << 20)
        if keys is not None:
            keys.apply(self.sock)
        self.sock.connect(endpoint)

    def call(self, cmd: str, **args: Any) -> Any:
        """Run `cmd` and return its answer. A refusal raises the exception its code maps to (ControlError for
        FORBIDDEN and UNKNOWN_COMMAND); a reply from another release raises MessageError (a ProtocolError)."""
        req_id = next(self._ids)
        self.sock.send(messages.encode(ControlRequest(id=req_id, cmd=cmd, args=args)))
        deadline_ms = self.timeout_ms
        while True:
            if not self.sock.poll(deadline_ms):
                raise UnavailableError(
                    f"no answer from the supervisor at {self.endpoint} within {self.timeout_ms / 1000:g}s"
                )
            reply = messages.CONTROL_REPLIES.decode(self.sock.recv())
            if reply.id in (req_id, 0):
                break
        if not reply.ok:
            # The one code-to-exception mapping, the data plane's too.
            raise error_from_code(reply.code or ErrorCode.INTERNAL, reply.error or "command failed")
        return reply.data

    def close(self) -> None:
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
