"""Wire format of the data plane: msgpack headers plus one raw frame per tensor.

Imported by clients, workers and the supervisor (no process-specific state here). Never pickle.

Data plane, client DEALER -> worker ROUTER:
  request  [header, tensor_0, ..., tensor_n-1]
           header = msgpack [VERSION, Kind.INFER, request_id, timeout_ms, [[name, dtype, shape], ...]]
  reply    [header, tensor_0, ...]
           header = msgpack [VERSION, code, request_id, [[name, dtype, shape], ...] | "error message"]
Shared memory (orchestrator/common/shm.py), the same header with a sixth element and no tensor frames:
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
import re
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Annotated, Any

import msgpack
import msgspec
import numpy as np
from msgspec import Meta

from orchestrator.common.errors import ErrorCode, ProtocolError

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


class RequestHeader(msgspec.Struct):
    """A decoded request header (decode_request_header)."""

    request_id: int
    timeout_ms: int
    specs: list[tuple[str, np.dtype, tuple[int, ...]]]  # (name, dtype, shape) per tensor
    kind: int = Kind.INFER
    shm: list | None = None  # the sixth header element: [lease_id, out_offset], [pid, nbytes] or [lease_id]
    offsets: list[int] | None = None  # shared-memory inputs: each tensor's offset in the lease


# Typed header decoding: msgspec checks the array's layout, types and bounds in one pass (1.1-1.5 us a
# header where the isinstance checks it replaced took 3.0-3.4: scripts/bench_host_paths.py header). The two
# hot headers, INFER with frames ([1, 1, ...] of 5 elements) and INFER in shared memory ([1, 1, ...] of 6),
# are recognised by their first three bytes and decoded in one step. Any other header, and any that step
# refuses, goes the general way: the fixed fields first, then the tensor list (kept raw until then) as wide
# as the kind needs. Only what that refuses reaches the cold path (_refused, _bad_specs), which reads the
# message again with plain msgpack to find the request id and the code the checks would give it.

_RequestId = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
_Timeout = Annotated[int, Meta(ge=0)]
_Dim = Annotated[int, Meta(ge=0, lt=1 << 31)]
_Shape = Annotated[tuple[_Dim, ...], Meta(max_length=_MAX_DIMS)]
_DType = Annotated[str, Meta(max_length=8)]  # longer is never a dtype we accept
# [lease_id, out_offset], [pid, nbytes], [lease_id] or [lease_id, entries]: the worker checks the contents
_Shm = Annotated[list[Any], Meta(min_length=1, max_length=2)]


class _Spec(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    name: str
    dtype: _DType
    shape: _Shape


class _ShmSpec(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    name: str
    dtype: _DType
    shape: _Shape
    offset: int  # in the lease: the worker checks the span against it (InvalidInputError)


_Specs = Annotated[list[_Spec], Meta(max_length=_MAX_TENSORS)]
_ShmSpecs = Annotated[list[_ShmSpec], Meta(max_length=_MAX_TENSORS)]


class _Head(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """Any header: [VERSION, kind, request_id, timeout_ms, specs(, shm)], the specs raw until the kind is known."""

    version: int
    kind: Kind
    request_id: _RequestId
    timeout_ms: _Timeout
    specs: msgspec.Raw
    shm: _Shm | None = None


class _FramesInfer(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    version: int
    kind: int
    request_id: _RequestId
    timeout_ms: _Timeout
    specs: _Specs


class _ShmInfer(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    version: int
    kind: int
    request_id: _RequestId
    timeout_ms: _Timeout
    specs: _ShmSpecs
    shm: _Shm


_HEAD = msgspec.msgpack.Decoder(_Head)
_SPECS = msgspec.msgpack.Decoder(_Specs)
_SHM_SPECS = msgspec.msgpack.Decoder(_ShmSpecs)
_FRAMES_INFER = msgspec.msgpack.Decoder(_FramesInfer)
_SHM_INFER = msgspec.msgpack.Decoder(_ShmInfer)
# msgpack: a fixarray of 5 or 6, then positive fixints VERSION and Kind.INFER
_FRAMES_PREFIX = bytes([0x95, VERSION, Kind.INFER])
_SHM_PREFIX = bytes([0x96, VERSION, Kind.INFER])
_WHERE = re.compile(r"at `\$\[(\d+)\](?:\[(\d+)\])?")  # a tensor-list error: which spec, which field


def decode_request_header(data: bytes | memoryview) -> RequestHeader:
    """Parse and sanity-check a request header. Raises DecodeError with the matching code."""
    if len(data) > _MAX_HEADER_BYTES:
        raise DecodeError(ErrorCode.BAD_HEADER, f"header of {len(data)} bytes exceeds {_MAX_HEADER_BYTES}")
    prefix = data[:3]
    try:
        if prefix == _FRAMES_PREFIX:
            f = _FRAMES_INFER.decode(data)
            return _header(f.request_id, f.timeout_ms, f.specs, Kind.INFER, None, None)
        if prefix == _SHM_PREFIX:
            s = _SHM_INFER.decode(data)
            return _header(
                s.request_id, s.timeout_ms, s.specs, Kind.INFER, s.shm, [x.offset for x in s.specs]
            )
    except msgspec.DecodeError:
        pass  # the general way says what is wrong
    try:
        head = _HEAD.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise _refused(data, exc) from None
    rid, shm, kind = head.request_id, head.shm, head.kind
    if head.version != VERSION:
        raise DecodeError(
            ErrorCode.UNSUPPORTED_VERSION, f"protocol version {head.version!r}, expected {VERSION}", rid
        )
    if kind != Kind.INFER and shm is None:
        raise DecodeError(ErrorCode.BAD_HEADER, f"message kind {kind} needs its sixth header element", rid)
    wide = shm is not None and kind == Kind.INFER  # shared-memory INFER: each spec has an offset
    try:
        if wide:
            shm_specs = _SHM_SPECS.decode(head.specs)
            return _header(rid, head.timeout_ms, shm_specs, kind, shm, [x.offset for x in shm_specs])
        return _header(rid, head.timeout_ms, _SPECS.decode(head.specs), kind, shm, None)
    except msgspec.DecodeError as exc:
        raise _bad_specs(head.specs, exc, rid, 4 if wide else 3) from None


def _header(
    rid: int, timeout_ms: int, specs: list[_Spec] | list[_ShmSpec], kind: int, shm: Any, offsets: Any
) -> RequestHeader:
    parsed = []
    for s in specs:
        dtype = _DTYPES.get(s.dtype)
        if dtype is None:
            try:
                dtype = parse_dtype(s.dtype)
            except (
                Exception
            ) as exc:  # numpy raises TypeError, ValueError, even SyntaxError (for ",") on garbage
                raise DecodeError(ErrorCode.INVALID_INPUT, f"tensor {s.name!r}: {exc}", rid) from None
        parsed.append((s.name, dtype, s.shape))
    return RequestHeader(rid, timeout_ms, parsed, kind, shm, offsets)


def _refused(data: bytes | memoryview, exc: Exception) -> DecodeError:
    """Cold path: the code and request id for a header msgspec refused, from a plain msgpack read."""
    try:
        head = msgpack.unpackb(data, use_list=True, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types on garbage
        return DecodeError(ErrorCode.BAD_HEADER, f"header is not msgpack: {type(err).__name__}")
    if not isinstance(head, list) or len(head) not in (5, 6):
        return DecodeError(ErrorCode.BAD_HEADER, "header must be a 5- or 6-element msgpack array")
    version, request_id = head[0], head[2]
    rid = request_id if request_id.__class__ is int and 0 <= request_id < 1 << 63 else None
    if version != VERSION:
        return DecodeError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r}, expected {VERSION}",
            request_id if request_id.__class__ is int else None,
        )
    return DecodeError(ErrorCode.BAD_HEADER, f"bad header: {exc}", rid)


def _bad_specs(raw: msgspec.Raw, exc: msgspec.DecodeError, rid: int, width: int) -> DecodeError:
    """Cold path: the code for a tensor list msgspec refused, as the checks would find it going spec by spec
    and, within one, its layout, its dtype, its shape: a bad dtype met before the malformed part that
    stopped msgspec is what the client hears of (INVALID_INPUT), as is an offset that is not an integer."""
    where = str(exc)
    m = _WHERE.search(where) if isinstance(exc, msgspec.ValidationError) else None
    try:
        specs = msgpack.unpackb(raw, raw=False, strict_map_key=True) if m is not None else None
    except Exception:  # garbage further on that msgspec did not reach
        specs = None
    if m is None or not isinstance(specs, list):  # not msgpack, or the list itself is no list or too long
        return DecodeError(ErrorCode.BAD_HEADER, f"bad tensor list: {where}", rid)
    index, field = int(m.group(1)), m.group(2)
    for spec in specs[: index + 1]:  # those before `index` are well-formed but for their dtypes
        if not (isinstance(spec, list) and len(spec) == width and isinstance(spec[0], str)):
            break
        try:
            parse_dtype(spec[1])
        except Exception as err:  # numpy raises TypeError, ValueError, even SyntaxError (for ",") on garbage
            return DecodeError(ErrorCode.INVALID_INPUT, f"tensor {spec[0]!r}: {err}", rid)
    else:
        if field == "3":
            return DecodeError(ErrorCode.INVALID_INPUT, f"tensor {index}: offset: {where}", rid)
    return DecodeError(ErrorCode.BAD_HEADER, f"bad tensor list: {where}", rid)


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
    frameless reply then becomes read-only views of the outputs in that orchestrator.client.lease.ClientLease;
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


# --- msgpack -------------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    """msgpack of a plain value (the worker packs its shared-memory reply specs once per shape with it). The
    control plane and the other internal channels are typed: orchestrator/common/messages.py."""
    return msgpack.packb(obj)
