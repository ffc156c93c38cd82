"""Wire format: requests and replies round-trip; malformed input raises DecodeError with the right code."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from orchestrator import protocol
from orchestrator.errors import ErrorCode


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
