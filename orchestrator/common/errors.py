"""The exception tree and the integer error codes that carry errors across processes.

Used by every process: workers reply with a code and a message, clients map the code back to a class.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes on the wire. Never renumber: clients of another version rely on them."""

    OK = 0
    BAD_HEADER = 1  # header frame is not a msgpack request header
    UNSUPPORTED_VERSION = 2
    MALFORMED = 3  # frame count or frame size does not match the header
    INVALID_INPUT = 10  # unknown/missing tensor, wrong dtype or shape, empty batch
    BATCH_TOO_LARGE = 11
    OVERLOADED = 20
    SHUTTING_DOWN = 21
    DEADLINE_EXCEEDED = 22
    INTERNAL = 30  # the engine failed on a valid request
    UNKNOWN_COMMAND = 50  # control plane
    FORBIDDEN = 51  # control plane: command not allowed on this socket


class OrchestratorError(Exception):
    """Base of every error this package raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL


class ConfigError(OrchestratorError):
    """A configuration file is missing, unreadable or invalid. `errors` lists every problem found."""

    def __init__(self, errors: list[str] | str, source: str | None = None) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(self.errors))


class ProtocolError(OrchestratorError):
    """A message could not be decoded (bad header, wrong frame count or size, unknown version)."""

    code = ErrorCode.MALFORMED


class RequestError(OrchestratorError):
    """The request was decoded but its contents are not acceptable to this model."""

    code = ErrorCode.INVALID_INPUT


class InvalidInputError(RequestError):
    code = ErrorCode.INVALID_INPUT


class BatchTooLargeError(RequestError):
    code = ErrorCode.BATCH_TOO_LARGE


class OverloadedError(OrchestratorError):
    """The worker's bounded queue (or the client's) is full; retry later or slow down."""

    code = ErrorCode.OVERLOADED


class ShuttingDownError(OrchestratorError):
    """The orchestrator is stopping and did not run this request."""

    code = ErrorCode.SHUTTING_DOWN


class DeadlineExceededError(OrchestratorError, TimeoutError):
    """The request's deadline passed (in the client, or in the worker's queue)."""

    code = ErrorCode.DEADLINE_EXCEEDED


class EngineError(OrchestratorError):
    """The engine failed to load or to run a valid batch."""

    code = ErrorCode.INTERNAL


class UnavailableError(OrchestratorError):
    """No orchestrator answers at the target, or it has no ready worker."""


class WorkerStartupError(OrchestratorError):
    """A worker failed before reporting READY; the message carries its exit code and log tail."""


class WorkerDeadError(OrchestratorError):
    """The worker holding a request died and the request could not be retried elsewhere."""


class MpsError(OrchestratorError):
    """MPS cannot be used as configured: binary missing, compute mode, a foreign daemon, or no answer."""


class ControlError(OrchestratorError):
    """The supervisor refused or failed a control command."""


_BY_CODE: dict[int, type[OrchestratorError]] = {
    ErrorCode.BAD_HEADER: ProtocolError,
    ErrorCode.UNSUPPORTED_VERSION: ProtocolError,
    ErrorCode.MALFORMED: ProtocolError,
    ErrorCode.INVALID_INPUT: InvalidInputError,
    ErrorCode.BATCH_TOO_LARGE: BatchTooLargeError,
    ErrorCode.OVERLOADED: OverloadedError,
    ErrorCode.SHUTTING_DOWN: ShuttingDownError,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    ErrorCode.INTERNAL: EngineError,
    ErrorCode.UNKNOWN_COMMAND: ControlError,
    ErrorCode.FORBIDDEN: ControlError,
}


def error_from_code(code: int, message: str) -> OrchestratorError:
    """Build the exception a client raises for an error reply."""
    cls = _BY_CODE.get(code, OrchestratorError)
    try:
        name = ErrorCode(code).name
    except ValueError:
        name = f"code {code}"
    err = cls(f"{name}: {message}")
    err.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
    return err
