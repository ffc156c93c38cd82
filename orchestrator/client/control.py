"""Control plane, the caller's side: the synchronous client the CLI, `orchestrator bench` and client discovery
use to call the supervisor's commands (orchestrator/supervisor/control.py).

The envelope is typed (orchestrator/common/messages.py): a ControlRequest out, a ControlReply back. A
refusal's code maps back to its exception through errors.error_from_code, the one mapping the data plane uses
too.
Imports nothing of the supervisor.
"""

from __future__ import annotations

import itertools
from typing import Any

import zmq

from orchestrator.common import messages
from orchestrator.common.errors import ErrorCode, UnavailableError, error_from_code
from orchestrator.common.messages import ControlRequest
from orchestrator.common.security import ClientKeys


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
