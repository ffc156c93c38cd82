"""Wire format: requests and replies round-trip; malformed input raises DecodeError with the right code."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from orchestrator.common import protocol
from orchestrator.common.errors import ErrorCode


def test_request_round_trip_zero_copy() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.array([[1], [2], [3]], dtype=np.int64)
    frames = protocol.encode_request(42, {"x": x, "ids": ids}, timeout_ms=1500)
    head = protocol.decode_request_header(frames[0])
    assert (head.request_id, head.timeout_ms) == (42, 1500)
    tensors = protocol.decode_tensors(head, [bytes(f) for f in frames[1:]])
    np.testing.assert_array_equal(tensors["x"], x)
    np.testing.assert_array_equal(tensors["ids"], ids)


def test_non_contiguous_input_is_made_contiguous() -> None:
    x = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    frames = protocol.encode_request(1, {"x": x})
    head = protocol.decode_request_header(frames[0])
    np.testing.assert_array_equal(protocol.decode_tensors(head, [bytes(f) for f in frames[1:]])["x"], x)


def test_object_dtype_refused() -> None:
    with pytest.raises(TypeError, match="cannot be sent"):
        protocol.encode_request(1, {"x": np.array(["a"], dtype=object)})


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (b"\xc1not msgpack", ErrorCode.BAD_HEADER),
        (msgpack.packb({"a": 1}), ErrorCode.BAD_HEADER),
        (msgpack.packb([99, 1, 5, 0, []]), ErrorCode.UNSUPPORTED_VERSION),
        (msgpack.packb([1, 7, 5, 0, []]), ErrorCode.BAD_HEADER),
        (msgpack.packb([1, 1, -3, 0, []]), ErrorCode.BAD_HEADER),
        (msgpack.packb([1, 1, 5, 0, [["x", "|O", [1]]]]), ErrorCode.INVALID_INPUT),
        (msgpack.packb([1, 1, 5, 0, [["x", "<f4", [-1, 2]]]]), ErrorCode.BAD_HEADER),
        (msgpack.packb([1, 1, 5, 0, [["x", "<f4", [1] * 9]]]), ErrorCode.BAD_HEADER),
        (b"\x00" * 70000, ErrorCode.BAD_HEADER),
    ],
)
def test_bad_headers(header: bytes, code: ErrorCode) -> None:
    with pytest.raises(protocol.DecodeError) as ei:
        protocol.decode_request_header(header)
    assert ei.value.code == code


def test_version_error_keeps_request_id() -> None:
    with pytest.raises(protocol.DecodeError) as ei:
        protocol.decode_request_header(msgpack.packb([2, 1, 77, 0, []]))
    assert ei.value.request_id == 77


def test_frame_count_and_size_mismatch() -> None:
    frames = protocol.encode_request(3, {"x": np.zeros((2, 3), np.float32)})
    head = protocol.decode_request_header(frames[0])
    with pytest.raises(protocol.DecodeError, match="frames followed") as ei:
        protocol.decode_tensors(head, [])
    assert ei.value.code == ErrorCode.MALFORMED
    with pytest.raises(protocol.DecodeError, match="needs 24") as ei:
        protocol.decode_tensors(head, [b"\x00" * 23])
    assert ei.value.code == ErrorCode.MALFORMED


def test_reply_round_trip_and_error() -> None:
    y = np.ones((2, 3), np.float16)
    rep = protocol.decode_reply([bytes(f) for f in protocol.encode_result(9, [("y", y)])])
    assert rep.code == 0 and rep.request_id == 9
    np.testing.assert_array_equal(rep.tensors["y"], y)
    err = protocol.decode_reply(protocol.encode_error(4, ErrorCode.OVERLOADED, "full"))
    assert (err.code, err.message, err.request_id) == (ErrorCode.OVERLOADED, "full", 4)


# --- typed header decoding: the checks the isinstance code made, and the codes it gave ------------------


def _array16(items: list) -> bytes:
    """The same header with its outer array as msgpack array16 (valid, not what msgpack-python writes): it
    misses the one-step decoding of the two hot headers and goes the general way."""
    return b"\xdc" + len(items).to_bytes(2, "big") + b"".join(msgpack.packb(x) for x in items)


SHM_HEAD = [1, 1, 77, 250, [["ids", "<i8", [4, 16], 0], ["mask", "|b1", [4, 16], 512]], [3, 1024]]
FRAMES_HEAD = [1, 1, 78, 0, [["x", "<f4", [2, 8]], ["n", "u1", []]]]


@pytest.mark.parametrize(
    "items", [SHM_HEAD, FRAMES_HEAD, [1, 2, 5, 0, [], [1234, 4096]], [1, 3, 6, 0, [], [9]]]
)
def test_every_encoding_of_a_header_decodes_alike(items: list) -> None:
    a = protocol.decode_request_header(msgpack.packb(items))
    b = protocol.decode_request_header(memoryview(_array16(items)))
    assert a == b and a.request_id == items[2] and a.kind == items[1] and a.shm == (items[5:] or [None])[0]
    width = 4 if len(items) == 6 and items[1] == protocol.Kind.INFER else 3
    assert a.specs == [(n, np.dtype(d), tuple(s)) for n, d, s, *_ in items[4]]
    assert a.offsets == ([s[3] for s in items[4]] if width == 4 else None)


@pytest.mark.parametrize(
    ("items", "code", "rid"),
    [
        ([1, 1, 5, 0, [], [1, 2], "extra"], ErrorCode.BAD_HEADER, None),  # 7 elements
        ([1, 1, 5, 0], ErrorCode.BAD_HEADER, None),
        ([1, 2, 5, 0, []], ErrorCode.BAD_HEADER, 5),  # attach without its sixth element
        ([1, 1, 5, 0, [], [1, 2, 3]], ErrorCode.BAD_HEADER, 5),
        ([1, True, 5, 0, []], ErrorCode.BAD_HEADER, 5),
        ([1, 1, 2**63, 0, []], ErrorCode.BAD_HEADER, None),
        ([1, 1, 5, -1, []], ErrorCode.BAD_HEADER, 5),
        ([1, 1, 5, 0, [["x", "<f4", [2**31]]]], ErrorCode.BAD_HEADER, 5),
        ([1, 1, 5, 0, [["x", "<f4", [True]]]], ErrorCode.BAD_HEADER, 5),
        ([1, 1, 5, 0, [["x", "<f4", [2], 0]]], ErrorCode.BAD_HEADER, 5),  # frames: no offset
        ([1, 1, 5, 0, [["x", "<f4", [2]]], [1, 0]], ErrorCode.BAD_HEADER, 5),  # shared memory: one
        ([1, 1, 5, 0, [[1, "<f4", [2]]]], ErrorCode.BAD_HEADER, 5),
        ([1, 1, 5, 0, [["x", "<f4", [2]]] * 65], ErrorCode.BAD_HEADER, 5),
        ([1, 1, 5, 0, [["x", 4, [2]]]], ErrorCode.INVALID_INPUT, 5),  # a dtype that is no string
        ([1, 1, 5, 0, [["x", "float1234", [2]]]], ErrorCode.INVALID_INPUT, 5),
        ([1, 1, 5, 0, [["x", "<f4", [2], "0"]], [1, 0]], ErrorCode.INVALID_INPUT, 5),  # offset: no integer
        # checked spec by spec, and in a spec layout, dtype, shape: the first fault found is reported
        ([1, 1, 5, 0, [["x", "|O", [2]], ["y", "<f4", [-1]]]], ErrorCode.INVALID_INPUT, 5),
        ([1, 1, 5, 0, [["x", "|O", [-1]]]], ErrorCode.INVALID_INPUT, 5),
        ([1, 1, 5, 0, [["x", "<f4", [-1]], ["y", "|O", [2]]]], ErrorCode.BAD_HEADER, 5),
        ([1, 1, 5, 0, [["x", "|O", [2], 0]]], ErrorCode.BAD_HEADER, 5),  # too wide before a bad dtype
        ([3, 1, 5, 0, [["x", "<f4", [-1]]]], ErrorCode.UNSUPPORTED_VERSION, 5),
        ([3, 9, -5, "x", 7], ErrorCode.UNSUPPORTED_VERSION, -5),  # the version first, whatever follows
    ],
)
def test_header_faults_get_the_code_and_request_id_of_the_checks(
    items: list, code: ErrorCode, rid: int
) -> None:
    for data in (msgpack.packb(items), _array16(items)):
        with pytest.raises(protocol.DecodeError) as ei:
            protocol.decode_request_header(data)
        assert (ei.value.code, ei.value.request_id) == (code, rid), str(ei.value)
