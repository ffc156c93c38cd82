"""Control plane: the supervisor's commands (one small class each) and the client the CLI uses to call them.

Commands run on the supervisor's main thread, which owns the control ROUTER. Envelope, both msgpack maps:
  request  {"id": int, "cmd": str, "args": {...}}
  reply    {"id": int, "ok": bool, "code": int, "error": str, "data": any}
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Any, ClassVar

import zmq

from orchestrator import protocol
from orchestrator.errors import ErrorCode, UnavailableError, error_from_code
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


def handle(sup: Supervisor, payload: bytes, local: bool) -> bytes:
    """Decode one control request, run it, encode the reply. Never raises for bad input."""
    try:
        msg = protocol.unpack(payload, max_size=1 << 16)
        if not isinstance(msg, dict) or not isinstance(msg.get("cmd"), str):
            raise ValueError("expected a map with a 'cmd' string")
        req_id = msg.get("id", 0)
        args = msg.get("args") or {}
        if not isinstance(args, dict):
            raise ValueError("'args' must be a map")
    except Exception as exc:  # garbage on the control socket: answer, never crash
        return protocol.pack(
            {"id": 0, "ok": False, "code": int(ErrorCode.BAD_HEADER), "error": f"bad control message: {exc}"}
        )
    cmd = COMMANDS.get(msg["cmd"])
    if cmd is None:
        return protocol.pack(
            {
                "id": req_id,
                "ok": False,
                "code": int(ErrorCode.UNKNOWN_COMMAND),
                "error": f"unknown command {msg['cmd'][:40]!r}; known: {', '.join(sorted(COMMANDS))}",
            }
        )
    if cmd.local_only and not local:
        return protocol.pack(
            {
                "id": req_id,
                "ok": False,
                "code": int(ErrorCode.FORBIDDEN),
                "error": f"{cmd.name} is only accepted on the local control socket",
            }
        )
    try:
        data = cmd.execute(sup, args, local)
    except Exception as exc:  # a command bug must not take the supervisor down
        return protocol.pack({"id": req_id, "ok": False, "code": int(ErrorCode.INTERNAL), "error": str(exc)})
    return protocol.pack({"id": req_id, "ok": True, "code": 0, "error": "", "data": data})


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
        req_id = next(self._ids)
        self.sock.send(protocol.pack({"id": req_id, "cmd": cmd, "args": args}))
        deadline_ms = self.timeout_ms
        while True:
            if not self.sock.poll(deadline_ms):
                raise UnavailableError(
                    f"no answer from the supervisor at {self.endpoint} within {self.timeout_ms / 1000:g}s"
                )
            reply = protocol.unpack(self.sock.recv(), max_size=64 << 20)
            if reply.get("id") in (req_id, 0):
                break
        if not reply.get("ok"):
            # The one code-to-exception mapping of the data plane (FORBIDDEN and UNKNOWN_COMMAND: ControlError).
            raise error_from_code(
                int(reply.get("code") or ErrorCode.INTERNAL), reply.get("error", "command failed")
            )
        return reply.get("data")

    def close(self) -> None:
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
