"""The worker's garbage-collection journal: freezing before READY, recording real collections, and the
window lookup stall candidates use."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest

from workers.gc_journal import Collection, GcJournal, entry


@pytest.fixture
def journal() -> Iterator[GcJournal]:
    j = GcJournal(keep=8, min_us=0)  # keep every collection
    yield j
    j.stop()
    gc.unfreeze()


def _cycles(n: int) -> None:
    for _ in range(n):
        a: list = []
        a.append(a)  # garbage only the cycle collector frees


def test_freeze_moves_survivors_out_of_later_collections(journal: GcJournal) -> None:
    keep = [[i] for i in range(50_000)]  # tracked objects a full collection would walk
    journal.freeze()
    assert journal.frozen >= len(keep)
    assert gc.get_freeze_count() == journal.frozen
    assert journal.full_us_before > 0 and journal.full_us_after >= 0
    assert "objects frozen" in journal.describe()
    stats = msgpack.unpackb(msgpack.packb(journal.stats()))
    assert stats["frozen"] == journal.frozen and len(stats["collections"]) == 3


def test_records_each_collection_with_its_generation_and_thread(journal: GcJournal) -> None:
    journal.start()
    t0 = time.monotonic_ns()
    _cycles(10)
    gc.collect(1)

    def other() -> None:
        gc.collect(2)

    th = threading.Thread(target=other, name="side")
    th.start()
    th.join()
    t1 = time.monotonic_ns()
    seen = journal.overlapping(t0, t1)
    assert [(c.generation, c.thread) for c in seen][-2:] == [
        (1, threading.current_thread().name),
        (2, "side"),
    ]
    assert all(t0 <= c.t0_ns <= c.t1_ns <= t1 for c in seen)
    assert seen[-2].collected >= 10  # the cycles made above
    assert journal.count >= 2 and journal.slow == journal.count
    journal.stop()
    before = journal.count
    gc.collect(0)
    assert journal.count == before  # nothing recorded once stopped


def test_short_collections_are_counted_not_kept() -> None:
    j = GcJournal(min_us=10_000_000)  # 10 s: nothing is that slow
    j.start()
    try:
        gc.collect(0)
    finally:
        j.stop()
    assert j.count == 1 and j.slow == 0 and j.overlapping(0, time.monotonic_ns()) == []


def test_overlapping_returns_the_window_oldest_first() -> None:
    j = GcJournal(keep=4)
    for t in (10, 20, 30, 40, 50):  # the oldest falls out of the ring
        j._kept.append(Collection(t, t + 5, 0, "MainThread", 0))
    assert [c.t0_ns for c in j.overlapping(0, 100)] == [20, 30, 40, 50]
    assert [c.t0_ns for c in j.overlapping(26, 41)] == [30, 40]
    assert j.overlapping(56, 60) == []
    assert entry(j.overlapping(26, 31)[0]) == {
        "t0_ns": 30,
        "t1_ns": 35,
        "generation": 0,
        "thread": "MainThread",
        "collected": 0,
    }
