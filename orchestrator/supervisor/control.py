"""Control plane, the supervisor's side: its commands (one small class each) and the dispatcher that runs
them.

Commands run on the supervisor's main thread, which owns the control ROUTER. The envelope is typed
(orchestrator/common/messages.py), both msgpack maps:
  request  ControlRequest {"kind": "request", "v": 1, "id": int, "cmd": str, "args": {...}}
  reply    ControlReply   {"kind": "reply", "v": 1, "id": int, "ok": bool, "code": int, "error": str, "data": any}
A failed command's `code` is an ErrorCode, mapped back to the exception by errors.error_from_code, the one
mapping the data plane uses too. The caller's side (the CLI, client discovery) is
orchestrator/client/control.py.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar, Protocol

from orchestrator.common import messages
from orchestrator.common.errors import ErrorCode
from orchestrator.common.messages import ControlReply


class Supervisor(Protocol):
    """What the commands ask of the supervisor (orchestrator/supervisor/core.py), named here so that this
    module does not import the one that imports it."""

    def status(self) -> dict[str, Any]: ...

    def endpoints(self, local: bool) -> dict[str, Any]: ...

    def request_stop(self, reason: str) -> None: ...


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
