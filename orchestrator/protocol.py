"""Wire format of the data and control planes: msgpack headers plus one raw frame per tensor.

Imported by clients, workers and the supervisor (no process-specific state here). Never pickle.

Data plane, client DEALER -> worker ROUTER:
  request  [header, tensor_0, ..., tensor_n-1]
           header = msgpack [VERSION, Kind.INFER, request_id, timeout_ms, [[name, dtype, shape], ...]]
  reply    [header, tensor_0, ...]
           header = msgpack [VERSION, code, request_id, [[name, dtype, shape], ...] | "error message"]
Shared memory (orchestrator/shm.py), the same header with a sixth element and no tensor frames:
  infer    [VERSION, Kind.INFER, id, timeout_ms, [[name, dtype, shape, offset], ...], [lease_id, out_offset]]
           inputs at the offsets, outputs written one after another from out_offset (each 256-byte
           aligned), all relative to the lease; the reply is the usual header with no frames.
  many     [VERSION, Kind.INFER_MANY, 0, timeout_ms, [], [lease_id, [[id, rows, [in_offset, ...], out_offset], ...]]]
           several shared-memory requests in one message, each with the model's own dtypes and item shapes
           (inputs in the model's order); their completions may come back together as
           [VERSION, OK, 0, [[id, rows], ...]] (outputs in each request's span, as above).
  attach   [VERSION, Kind.ATTACH, id, 0, [], [pid, nbytes]] -> reply payload {lease, path, offset, size}
  detach   [VERSION, Kind.DETACH, id, 0, [], [lease_id]]   -> reply payload "detached"
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
    ATTACH = 2
    DETACH = 3
    INFER_MANY = 4


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


_DTYPES: dict[str, np.dtype] = {}  # accepted dtype strings, parsed once (np.dtype() costs ~1 us)


def parse_dtype(text: Any) -> np.dtype:
    dt = _DTYPES.get(text) if isinstance(text, str) else None
    if dt is not None:
        return dt
    if not isinstance(text, str) or len(text) > 8:
        raise ValueError(f"bad dtype {text!r}")
    dt = np.dtype(text)  # raises TypeError on garbage
    if dt.kind not in _ALLOWED_KINDS or dt.hasobject:
        raise ValueError(f"dtype {text!r} is not allowed")
    if len(_DTYPES) < 64:  # bounded: a hostile client cannot grow it
        _DTYPES[text] = dt
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


def encode_shm_request(
    request_id: int, specs: list[list], lease_id: int, out_offset: int, timeout_ms: int
) -> list:
    """One frame: a request whose tensors already lie in the lease (`specs` = [name, dtype, shape, offset])."""
    return [msgpack.packb([VERSION, Kind.INFER, request_id, int(timeout_ms), specs, [lease_id, out_offset]])]


def encode_shm_many(entries: list[list], lease_id: int, timeout_ms: int) -> list:
    """One frame carrying several shared-memory requests: entries are [id, rows, [in_offsets], out_offset]."""
    return [msgpack.packb([VERSION, Kind.INFER_MANY, 0, int(timeout_ms), [], [lease_id, entries]])]


def encode_completions(done: list[list[int]]) -> bytes:
    """The header of a combined reply: requests [[id, rows], ...] completed, outputs in their spans."""
    return msgpack.packb([VERSION, ErrorCode.OK, 0, done])


def encode_attach(request_id: int, pid: int, nbytes: int) -> list:
    return [msgpack.packb([VERSION, Kind.ATTACH, request_id, 0, [], [pid, nbytes]])]


def encode_detach(request_id: int, lease_id: int) -> list:
    return [msgpack.packb([VERSION, Kind.DETACH, request_id, 0, [], [lease_id]])]


def encode_payload(request_id: int, payload: Any) -> list:
    """A successful reply carrying a small msgpack payload instead of tensors (attach, detach)."""
    return [msgpack.packb([VERSION, ErrorCode.OK, request_id, payload])]


class RequestHeader:
    __slots__ = ("request_id", "timeout_ms", "specs", "kind", "shm", "offsets")

    def __init__(
        self,
        request_id: int,
        timeout_ms: int,
        specs: list[tuple[str, np.dtype, tuple[int, ...]]],
        kind: int = Kind.INFER,
        shm: list | None = None,
        offsets: list | None = None,
    ):
        self.request_id = request_id
        self.timeout_ms = timeout_ms
        self.specs = specs
        self.kind = kind
        self.shm = shm  # the sixth header element: [lease_id, out_offset], [pid, nbytes] or [lease_id]
        self.offsets = offsets  # shared-memory inputs: each tensor's offset in the lease (unchecked)


def decode_request_header(data: bytes | memoryview) -> RequestHeader:
    """Parse and sanity-check a request header. Raises DecodeError with the matching code."""
    if len(data) > _MAX_HEADER_BYTES:
        raise DecodeError(ErrorCode.BAD_HEADER, f"header of {len(data)} bytes exceeds {_MAX_HEADER_BYTES}")
    try:
        head = msgpack.unpackb(data, use_list=True, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(ErrorCode.BAD_HEADER, f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(head, list) or len(head) not in (5, 6):
        raise DecodeError(ErrorCode.BAD_HEADER, "header must be a 5- or 6-element msgpack array")
    version, kind, request_id, timeout_ms, specs = head[:5]
    shm = head[5] if len(head) == 6 else None
    rid = request_id if isinstance(request_id, int) and not isinstance(request_id, bool) else None
    if version != VERSION:
        raise DecodeError(
            ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version!r}, expected {VERSION}", rid
        )
    if rid is None or not (0 <= rid < 1 << 63):
        raise DecodeError(ErrorCode.BAD_HEADER, "request id must be a non-negative integer")
    if kind not in (Kind.INFER, Kind.ATTACH, Kind.DETACH, Kind.INFER_MANY) or isinstance(kind, bool):
        raise DecodeError(ErrorCode.BAD_HEADER, f"unknown message kind {kind!r}", rid)
    if shm is not None and not (isinstance(shm, list) and 1 <= len(shm) <= 2):
        raise DecodeError(
            ErrorCode.BAD_HEADER, "the shared-memory element must be a 1- or 2-element array", rid
        )
    if kind != Kind.INFER and shm is None:
        raise DecodeError(ErrorCode.BAD_HEADER, f"message kind {kind} needs its sixth header element", rid)
    if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms < 0:
        raise DecodeError(ErrorCode.BAD_HEADER, "timeout_ms must be a non-negative integer", rid)
    if not isinstance(specs, list) or len(specs) > _MAX_TENSORS:
        raise DecodeError(ErrorCode.BAD_HEADER, "tensor list missing or too long", rid)
    parsed = []
    width = 4 if shm is not None and kind == Kind.INFER else 3
    offsets: list | None = [] if width == 4 else None
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == width and isinstance(spec[0], str)):
            raise DecodeError(
                ErrorCode.BAD_HEADER,
                "each tensor spec must be [name, dtype, shape]" + (", offset]" if width == 4 else ""),
                rid,
            )
        name, dtype_text, shape = spec[:3]
        if offsets is not None:
            offsets.append(spec[3])
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
    return RequestHeader(rid, timeout_ms, parsed, kind, shm, offsets)


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
        if (
            math.prod(d or 1 for d in shape) * dtype.itemsize > 1 << 40
        ):  # np.empty refuses [0, 2**31-1, 2**31-1, ...]
            raise DecodeError(
                ErrorCode.MALFORMED, f"tensor {name!r}: shape {list(shape)} is too large", header.request_id
            )
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


_RESULT_PREFIX = b"\x94" + msgpack.packb(VERSION) + msgpack.packb(int(ErrorCode.OK))  # a 4-element array


def result_head(request_id: int, packed_specs: bytes) -> bytes:
    """encode_result's header for outputs already in place (shared memory): [VERSION, OK, id, specs]
    with the specs packed once per shape by the caller."""
    return _RESULT_PREFIX + msgpack.packb(request_id) + packed_specs


def encode_error(request_id: int | None, code: ErrorCode, message: str) -> list:
    return [msgpack.packb([VERSION, int(code), request_id if request_id is not None else -1, message[:2000]])]


class Reply:
    __slots__ = ("request_id", "code", "message", "tensors")

    def __init__(self, request_id: int, code: int, message: str, tensors: dict[str, np.ndarray]):
        self.request_id = request_id
        self.code = code
        self.message = message
        self.tensors = tensors


def decode_reply(frames: Sequence, shm_of: Any = None) -> Reply:
    """Parse a reply (client side). Raises ProtocolError if the worker sent something unreadable.

    `shm_of(request_id)` returns (lease, out_offset) for a shared-memory request (else None): the
    frameless reply then becomes read-only views of the outputs in that orchestrator.shm.ClientLease;
    the span they share goes back to the lease when the last of them is gone."""
    if not frames:
        raise ProtocolError("empty reply")
    try:
        head = msgpack.unpackb(frames[0], use_list=True, raw=False)
        version, code, request_id, payload = head
    except Exception:
        raise ProtocolError("reply header is not a msgpack [version, code, id, payload] array") from None
    if version != VERSION:
        raise ProtocolError(f"reply protocol version {version!r}, expected {VERSION}")
    shm = shm_of(request_id) if shm_of is not None else None
    if code != ErrorCode.OK:
        return Reply(request_id, int(code), str(payload), {})
    tensors: dict[str, np.ndarray] = {}
    if isinstance(payload, dict):  # attach/detach (encode_payload): the map is the answer
        return Reply(request_id, 0, payload, {})  # type: ignore[arg-type]
    if request_id == 0:  # completions of INFER_MANY requests (encode_completions): [[id, rows], ...]
        return Reply(0, 0, payload, {})  # type: ignore[arg-type]
    if shm is not None:
        return Reply(request_id, 0, "", shm_outputs(payload, *shm))
    if not isinstance(payload, list) or len(payload) != len(frames) - 1:
        raise ProtocolError("reply frame count does not match its header")
    for (name, dtype_text, shape), frame in zip(payload, frames[1:], strict=True):
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        arr = np.frombuffer(buf, dtype=np.dtype(dtype_text)).reshape(shape)
        arr.flags.writeable = False  # a view of the received message, read-only as results are documented
        tensors[name] = arr
    return Reply(request_id, 0, "", tensors)


def shm_layout(specs: Sequence[tuple[Any, np.dtype, Sequence[int]]]) -> tuple[list[int], int]:
    """Offsets of tensors laid out one after another, each 256-byte aligned, and the total bytes."""
    offs, total = [], 0
    for _, dtype, shape in specs:
        offs.append(total)
        total += -(-(math.prod(shape) * dtype.itemsize) // 256) * 256
    return offs, total


def shm_outputs(payload: Any, lease: Any, out_offset: int) -> dict[str, np.ndarray]:
    try:
        specs = [(name, parse_dtype(dt), tuple(shape)) for name, dt, shape in payload]
    except Exception:
        raise ProtocolError("shared-memory reply header does not list [name, dtype, shape] outputs") from None
    offs, total = shm_layout(specs)
    whole = lease.view(out_offset, np.dtype(np.uint8), (total,), readonly=True)
    out: dict[str, np.ndarray] = {}
    for (name, dtype, shape), off in zip(specs, offs, strict=True):
        n = math.prod(shape) * dtype.itemsize
        out[name] = whole[off : off + n].view(dtype).reshape(shape)
    return out


# --- control plane ------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj)


def unpack(data: bytes | memoryview, max_size: int = 1 << 20) -> Any:
    """Decode a control-plane message; ValueError if it is larger than `max_size` bytes."""
    if len(data) > max_size:
        raise ValueError(f"message of {len(data)} bytes exceeds {max_size}")
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
