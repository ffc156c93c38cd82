"""The device-agnostic pipeline with a fake asynchronous engine: coalescing, bounded queue, in-order
completion, deferred sync, bucket padding, deadlines and request validation."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.common.errors import BatchTooLargeError, InvalidInputError
from workers.engines.base import Engine, Slot, TensorSpec
from workers.pipeline import Pipeline, Request


class FakeAsyncEngine(Engine):
    """Doubles its input; a batch finishes only when the test says so (like a GPU stream)."""

    kind = "fake"

    def __init__(self, max_batch: int = 8, pads: bool = False) -> None:
        self.inputs = (TensorSpec("x", np.dtype(np.float32), (2,)),)
        self.outputs = (TensorSpec("y", np.dtype(np.float32), (2,)),)
        self.max_batch = max_batch
        self.pads_to_buckets = pads
        self.finished: set[int] = set()
        self.launches: list[tuple[int, int]] = []
        self.waits = 0

    def create_slots(self, depth: int) -> list[Slot]:
        return [
            Slot(
                i,
                {"x": np.zeros((self.max_batch, 2), np.float32)},
                {"y": np.zeros((self.max_batch, 2), np.float32)},
            )
            for i in range(depth)
        ]

    def launch(self, slot: Slot, rows: int) -> None:
        slot.outputs["y"][:rows] = slot.inputs["x"][:rows] * 2
        self.finished.discard(slot.index)
        self.launches.append((slot.index, rows))

    def done(self, slot: Slot) -> bool:
        return slot.index in self.finished

    def wait(self, slot: Slot) -> None:
        self.waits += 1
        self.finished.add(slot.index)


def req(i: int, rows: int, t: int = 0, deadline: int = 0) -> Request:
    x = np.full((rows, 2), i, np.float32)
    return Request(f"id{i}", i, {"x": x}, rows, t, deadline)


def test_coalesces_whole_requests_up_to_max_batch_and_slices_rows_back() -> None:
    eng = FakeAsyncEngine(max_batch=8)
    p = Pipeline(eng, depth=2, max_queue=16, max_queue_delay_us=0, buckets=(8,))
    for i, rows in enumerate([3, 4, 2]):
        assert p.offer(req(i, rows))
    batch = p.launch_next(0, on_expired=lambda r: None)
    assert [(r.request_id, off) for r, off in batch.parts] == [(0, 0), (1, 3)]  # 3+4 fit, +2 would not
    assert batch.rows == 7 and len(p.queue) == 1 and p.queued_rows == 2
    eng.finished.add(batch.slot.index)
    got = {}
    p.complete_oldest(
        lambda b: got.update({r.request_id: b.slot.outputs["y"][o : o + r.rows].copy() for r, o in b.parts})
    )
    np.testing.assert_array_equal(got[0], np.full((3, 2), 0.0))
    np.testing.assert_array_equal(got[1], np.full((4, 2), 2.0))


def test_bounded_queue_refuses_when_full() -> None:
    p = Pipeline(FakeAsyncEngine(), depth=1, max_queue=2, max_queue_delay_us=0, buckets=(8,))
    assert p.offer(req(0, 1)) and p.offer(req(1, 1))
    assert not p.offer(req(2, 1))


def test_in_order_completion_and_deferred_sync_only_on_oldest() -> None:
    eng = FakeAsyncEngine(max_batch=2)
    p = Pipeline(eng, depth=3, max_queue=16, max_queue_delay_us=0, buckets=(2,))
    for i in range(3):
        p.offer(req(i, 2))
        assert p.should_launch(0)
        p.launch_next(0, lambda r: None)
    assert len(p.inflight) == 3 and not p.free
    eng.finished.add(p.inflight[2].slot.index)  # the newest finishes first...
    assert not p.oldest_done()  # ...but completion follows submission order
    p.wait_oldest()
    order = []
    while p.oldest_done():
        p.complete_oldest(lambda b: order.append(b.parts[0][0].request_id))
    assert order == [0] and eng.waits == 1
    p.wait_oldest()
    p.complete_oldest(lambda b: order.append(b.parts[0][0].request_id))
    p.complete_oldest(lambda b: order.append(b.parts[0][0].request_id))
    assert order == [0, 1, 2] and len(p.free) == 3


def test_holds_partial_batch_while_busy_until_delay() -> None:
    eng = FakeAsyncEngine(max_batch=8)
    p = Pipeline(eng, depth=2, max_queue=16, max_queue_delay_us=100, buckets=(8,))
    p.offer(req(0, 1, t=0))
    assert p.should_launch(0)  # device idle: launch at once
    p.launch_next(0, lambda r: None)
    p.offer(req(1, 1, t=1000))
    assert not p.should_launch(50_000)  # busy and under the delay: hold to coalesce
    assert p.hold_until_ns() == 101_000
    assert p.should_launch(101_000)
    for i in range(2, 9):
        p.offer(req(i, 1, t=2000))
    assert p.should_launch(3000)  # a full batch goes at once


def test_pads_to_bucket() -> None:
    eng = FakeAsyncEngine(max_batch=8, pads=True)
    p = Pipeline(eng, depth=1, max_queue=16, max_queue_delay_us=0, buckets=(1, 4, 8))
    p.offer(req(0, 3))
    b = p.launch_next(0, lambda r: None)
    assert (b.rows, b.padded, eng.launches[-1][1]) == (3, 4, 4)


def test_expired_requests_are_not_run() -> None:
    p = Pipeline(FakeAsyncEngine(), depth=1, max_queue=16, max_queue_delay_us=0, buckets=(8,))
    p.offer(req(0, 1, deadline=10))
    p.offer(req(1, 1, deadline=0))
    expired = []
    b = p.launch_next(20, expired.append)
    assert [r.request_id for r in expired] == [0] and [r.request_id for r, _ in b.parts] == [1]


def test_check_validates_names_dtypes_shapes_and_batch() -> None:
    p = Pipeline(FakeAsyncEngine(max_batch=4), depth=1, max_queue=4, max_queue_delay_us=0, buckets=(4,))
    assert p.check({"x": np.zeros((3, 2), np.float32)}) == 3
    with pytest.raises(InvalidInputError, match="unknown tensor"):
        p.check({"z": np.zeros((3, 2), np.float32)})
    with pytest.raises(InvalidInputError, match="dtype float64"):
        p.check({"x": np.zeros((3, 2), np.float64)})
    with pytest.raises(InvalidInputError, match=r"shape \[3, 5\]"):
        p.check({"x": np.zeros((3, 5), np.float32)})
    with pytest.raises(InvalidInputError, match="empty batch"):
        p.check({"x": np.zeros((0, 2), np.float32)})
    with pytest.raises(BatchTooLargeError, match="max batch 4"):
        p.check({"x": np.zeros((5, 2), np.float32)})
