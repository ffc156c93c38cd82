"""Bad input never takes a worker down: each malformed message gets its typed error reply, and the worker
keeps serving (raw DEALER to a real worker)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from orchestrator.common import protocol
from orchestrator.common.errors import ErrorCode
from tests.conftest import write_config

pytestmark = pytest.mark.timeout(90)

X = np.ones((2, 8), np.float32)


def frames_for(case: str) -> list:
    good = protocol.encode_request(5, {"x": X})
    if case == "unknown tensor":
        return protocol.encode_request(5, {"y": X})
    if case == "wrong dtype":
        return protocol.encode_request(5, {"x": X.astype(np.int32)})
    if case == "wrong shape":
        return protocol.encode_request(5, {"x": np.ones((2, 9), np.float32)})
    if case == "batch over max":
        return protocol.encode_request(5, {"x": np.ones((5, 8), np.float32)})
    if case == "empty batch":
        return protocol.encode_request(5, {"x": np.ones((0, 8), np.float32)})
    if case == "header not msgpack":
        return [b"\xc1\xc1garbage", bytes(good[1])]
    if case == "truncated multipart":
        return good[:1]
    if case == "unknown version":
        return [msgpack.packb([9, 1, 5, 0, [["x", "<f4", [2, 8]]]]), bytes(good[1])]
    if case == "frame size mismatch":
        return [good[0], bytes(good[1])[:-4]]
    if case == "extra frame":
        return [*good, b"spare"]
    if case == "empty header":
        return [b""]
    raise AssertionError(case)


CASES = {
    "unknown tensor": ErrorCode.INVALID_INPUT,
    "wrong dtype": ErrorCode.INVALID_INPUT,
    "wrong shape": ErrorCode.INVALID_INPUT,
    "batch over max": ErrorCode.BATCH_TOO_LARGE,
    "empty batch": ErrorCode.INVALID_INPUT,
    "header not msgpack": ErrorCode.BAD_HEADER,
    "truncated multipart": ErrorCode.MALFORMED,
    "unknown version": ErrorCode.UNSUPPORTED_VERSION,
    "frame size mismatch": ErrorCode.MALFORMED,
    "extra frame": ErrorCode.MALFORMED,
    "empty header": ErrorCode.BAD_HEADER,
}


def test_every_bad_input_gets_a_typed_error_and_the_worker_keeps_serving(
    short_tmp, orchestrator_factory
) -> None:
    cfg = write_config(
        short_tmp,
        {"workers": {"count": 1}, "model": {"kind": "synthetic", "item_shape": [8], "max_batch": 4}},
    )
    orch = orchestrator_factory(cfg)
    (w,) = orch.status()["workers"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(w["endpoint"])
    try:
        for case, code in CASES.items():
            sock.send_multipart(frames_for(case))
            assert sock.poll(5000), f"no reply for {case}"
            reply = protocol.decode_reply(sock.recv_multipart())
            assert reply.code == code, (case, reply.code, reply.message)
            assert reply.message, case
            # and a valid request right after still works
            sock.send_multipart(protocol.encode_request(99, {"x": X}))
            assert sock.poll(5000)
            ok = protocol.decode_reply(sock.recv_multipart())
            assert ok.code == 0 and ok.request_id == 99
            np.testing.assert_array_equal(ok.tensors["y"], X)
    finally:
        sock.close()
        ctx.term()
    after = orch.wait_status(lambda s: sum(s["workers"][0]["errors"].values()) >= len(CASES))["workers"][0]
    assert after["pid"] == w["pid"] and after["state"] == "ready" and after["restarts"] == 0
    assert sum(after["errors"].values()) == len(CASES)
