"""Wire format of the data and control planes: msgpack headers plus one raw frame per tensor.

Imported by clients, workers and the supervisor (no process-specific state here). Never pickle.

Data plane, client DEALER -> worker ROUTER:
  request  [header, tensor_0, ..., tensor_n-1]
           header = msgpack [VERSION, Kind.INFER, request_id, timeout_ms, [[name, dtype, shape], ...]]
  reply    [header, tensor_0, ...]
           header = msgpack [VERSION, code, request_id, [[name, dtype, shape], ...] | "error message"]
The worker's ROUTER sees the client identity as an extra first frame; it is not part of this format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Any

import msgpack
import numpy as np

from orchestrator.errors import ErrorCode, ProtocolError

VERSION = 1
# Dtype kinds allowed on the wire: bool, signed/unsigned int, float. Object, string and void never.
_ALLOWED_KINDS = frozenset("biuf")
_MAX_TENSORS = 64
_MAX_DIMS = 8
_MAX_HEADER_BYTES = 1 << 16


class Kind(IntEnum):
    INFER = 1


class DecodeError(ProtocolError):
    """A request could not be decoded; `request_id` is set when the header was readable."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


def wire_dtype(dtype: np.dtype) -> str:
    """The dtype string sent on the wire, e.g. '<f4'. Refuses object/str/void dtypes."""
    if dtype.kind not in _ALLOWED_KINDS:
        raise TypeError(f"dtype {dtype} cannot be sent: only bool, integer and float tensors are supported")
    return dtype.str


def parse_dtype(text: Any) -> np.dtype:
    if not isinstance(text, str) or len(text) > 8:
        raise ValueError(f"bad dtype {text!r}")
    dt = np.dtype(text)  # raises TypeError on garbage
    if dt.kind not in _ALLOWED_KINDS or dt.hasobject:
        raise ValueError(f"dtype {text!r} is not allowed")
    return dt


# --- requests -----------------------------------------------------------------------------------


def encode_request(request_id: int, tensors: Mapping[str, np.ndarray], timeout_ms: int = 0) -> list:
    """Frames for one request. Arrays are made C-contiguous; their buffers go out zero-copy."""
    specs = []
    frames: list = [b""]
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        specs.append([name, wire_dtype(arr.dtype), list(arr.shape)])
        frames.append(arr.data if arr.nbytes else b"")
    frames[0] = msgpack.packb([VERSION, Kind.INFER, request_id, int(timeout_ms), specs])
    return frames


class RequestHeader:
    __slots__ = ("request_id", "timeout_ms", "specs")

    def __init__(self, request_id: int, timeout_ms: int, specs: list[tuple[str, np.dtype, tuple[int, ...]]]):
        self.request_id = request_id
        self.timeout_ms = timeout_ms
        self.specs = specs


def decode_request_header(data: bytes | memoryview) -> RequestHeader:
    """Parse and sanity-check a request header. Raises DecodeError with the matching code."""
    if len(data) > _MAX_HEADER_BYTES:
        raise DecodeError(ErrorCode.BAD_HEADER, f"header of {len(data)} bytes exceeds {_MAX_HEADER_BYTES}")
    try:
        head = msgpack.unpackb(data, use_list=True, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(ErrorCode.BAD_HEADER, f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(head, list) or len(head) != 5:
        raise DecodeError(ErrorCode.BAD_HEADER, "header must be a 5-element msgpack array")
    version, kind, request_id, timeout_ms, specs = head
    rid = request_id if isinstance(request_id, int) and not isinstance(request_id, bool) else None
    if version != VERSION:
        raise DecodeError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version!r}, expected {VERSION}", rid)
    if rid is None or not (0 <= rid < 1 << 63):
        raise DecodeError(ErrorCode.BAD_HEADER, "request id must be a non-negative integer")
    if kind != Kind.INFER:
        raise DecodeError(ErrorCode.BAD_HEADER, f"unknown message kind {kind!r}", rid)
    if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms < 0:
        raise DecodeError(ErrorCode.BAD_HEADER, "timeout_ms must be a non-negative integer", rid)
    if not isinstance(specs, list) or len(specs) > _MAX_TENSORS:
        raise DecodeError(ErrorCode.BAD_HEADER, "tensor list missing or too long", rid)
    parsed = []
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)):
            raise DecodeError(ErrorCode.BAD_HEADER, "each tensor spec must be [name, dtype, shape]", rid)
        name, dtype_text, shape = spec
        try:
            dtype = parse_dtype(dtype_text)
        except Exception as exc:  # numpy raises TypeError, ValueError, even SyntaxError (for ",") on garbage
            raise DecodeError(ErrorCode.INVALID_INPUT, f"tensor {name!r}: {exc}", rid) from None
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape)
        ):
            raise DecodeError(ErrorCode.BAD_HEADER, f"tensor {name!r}: bad shape {shape!r}", rid)
        parsed.append((name, dtype, tuple(shape)))
    return RequestHeader(rid, timeout_ms, parsed)


def decode_tensors(header: RequestHeader, frames: Sequence, nbytes_of=len) -> dict[str, np.ndarray]:
    """Zero-copy numpy views over the tensor frames, after checking count and sizes against the header."""
    if len(frames) != len(header.specs):
        raise DecodeError(
            ErrorCode.MALFORMED,
            f"header lists {len(header.specs)} tensors but {len(frames)} frames followed",
            header.request_id,
        )
    out: dict[str, np.ndarray] = {}
    for (name, dtype, shape), frame in zip(header.specs, frames, strict=True):
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        if math.prod(d or 1 for d in shape) * dtype.itemsize > 1 << 40:  # np.empty refuses [0, 2**31-1, 2**31-1, ...]
            raise DecodeError(ErrorCode.MALFORMED, f"tensor {name!r}: shape {list(shape)} is too large", header.request_id)
        expected = math.prod(shape) * dtype.itemsize  # Python ints: a hostile shape cannot wrap around
        if len(buf) != expected:
            raise DecodeError(
                ErrorCode.MALFORMED,
                f"tensor {name!r}: frame has {len(buf)} bytes, shape {list(shape)} of {dtype} needs {expected}",
                header.request_id,
            )
        if name in out:
            raise DecodeError(ErrorCode.INVALID_INPUT, f"tensor {name!r} given twice", header.request_id)
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if expected else np.empty(shape, dtype)
    return out


# --- replies ------------------------------------------------------------------------------------


def encode_result(request_id: int, tensors: Sequence[tuple[str, np.ndarray]]) -> list:
    """Reply frames for a successful request. Arrays must be C-contiguous."""
    specs = [[name, arr.dtype.str, list(arr.shape)] for name, arr in tensors]
    frames: list = [msgpack.packb([VERSION, ErrorCode.OK, request_id, specs])]
    frames.extend(arr.data if arr.nbytes else b"" for _, arr in tensors)
    return frames


def encode_error(request_id: int | None, code: ErrorCode, message: str) -> list:
    return [msgpack.packb([VERSION, int(code), request_id if request_id is not None else -1, message[:2000]])]


class Reply:
    __slots__ = ("request_id", "code", "message", "tensors")

    def __init__(self, request_id: int, code: int, message: str, tensors: dict[str, np.ndarray]):
        self.request_id = request_id
        self.code = code
        self.message = message
        self.tensors = tensors


def decode_reply(frames: Sequence) -> Reply:
    """Parse a reply (client side). Raises ProtocolError if the worker sent something unreadable."""
    if not frames:
        raise ProtocolError("empty reply")
    try:
        head = msgpack.unpackb(frames[0], use_list=True, raw=False)
        version, code, request_id, payload = head
    except Exception:
        raise ProtocolError("reply header is not a msgpack [version, code, id, payload] array") from None
    if version != VERSION:
        raise ProtocolError(f"reply protocol version {version!r}, expected {VERSION}")
    if code != ErrorCode.OK:
        return Reply(request_id, int(code), str(payload), {})
    tensors: dict[str, np.ndarray] = {}
    if len(payload) != len(frames) - 1:
        raise ProtocolError("reply frame count does not match its header")
    for (name, dtype_text, shape), frame in zip(payload, frames[1:], strict=True):
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        tensors[name] = np.frombuffer(buf, dtype=np.dtype(dtype_text)).reshape(shape)
    return Reply(request_id, 0, "", tensors)


# --- control plane ------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj)


def unpack(data: bytes | memoryview, max_size: int = 1 << 20) -> Any:
    """Decode a control-plane message; ValueError if it is larger than `max_size` bytes."""
    if len(data) > max_size:
        raise ValueError(f"message of {len(data)} bytes exceeds {max_size}")
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
