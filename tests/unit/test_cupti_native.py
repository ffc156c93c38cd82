"""The compiled CUPTI callback (workers/cupti_callback.c) without a GPU: built with the host's compiler and
called as CUPTI calls it (entry, then exit, with CUPTI's callback data), from many threads at once."""

from __future__ import annotations

import ctypes
import threading
import time
from pathlib import Path

import pytest

from workers import cupti_journal, cupti_native
from workers.cupti_journal import DOMAIN_DRIVER, DOMAIN_RUNTIME, CuptiJournal
from workers.driver_journal import DriverJournal

pytestmark = pytest.mark.skipif(
    cupti_native.compiler() is None, reason="no C compiler here to build the CUPTI callback"
)


class CallbackData(ctypes.Structure):
    """CUPTI's CUpti_CallbackData (cupti_callbacks.h), as CUPTI hands it to a subscriber."""

    _fields_ = [
        ("callback_site", ctypes.c_int32),
        ("function_name", ctypes.c_char_p),
        ("function_params", ctypes.c_void_p),
        ("function_return_value", ctypes.c_void_p),
        ("symbol_name", ctypes.c_char_p),
        ("context", ctypes.c_void_p),
        ("context_uid", ctypes.c_uint32),
        ("correlation_data", ctypes.POINTER(ctypes.c_uint64)),
        ("correlation_id", ctypes.c_uint32),
    ]


class Call:
    """One API call as CUPTI reports it: a correlation slot of its own, entry and exit callbacks."""

    def __init__(self, native: cupti_native.Native, domain: int, cbid: int) -> None:
        self.native, self.domain, self.cbid = native, domain, cbid
        self.slot = ctypes.c_uint64(0)
        self.data = CallbackData(correlation_data=ctypes.pointer(self.slot))

    def site(self, where: int) -> None:
        self.data.callback_site = where
        self.native.lib.orch_cb_callback(None, self.domain, self.cbid, ctypes.byref(self.data))

    def enter(self) -> None:
        self.site(0)

    def exit(self) -> None:
        self.site(1)


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> cupti_native.Native:
    return cupti_native.load(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def ring(native: cupti_native.Native) -> cupti_native.Native:
    native.drain()  # the ring is the library's, shared by every test in this process
    return native


def test_the_callback_is_built_once_and_the_cache_is_reused(monkeypatch, tmp_path: Path) -> None:
    lib = cupti_native.build(tmp_path)
    assert lib.parent == tmp_path and lib.name.startswith("cupti_callback-") and lib.stat().st_size > 0
    monkeypatch.setattr(cupti_native, "compiler", lambda: None)  # a second build would fail now
    assert cupti_native.build(tmp_path) == lib
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary file left behind


def test_a_compiler_error_is_one_line(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cupti_native, "SOURCE", _broken_source(tmp_path))
    with pytest.raises(
        cupti_native.NativeUnavailable,
        match=r"could not build the CUPTI callback \(exit 1\): .*error.*undefined_name",
    ) as err:
        cupti_native.build(tmp_path / "out")
    assert "\n" not in str(err.value)


def _broken_source(tmp_path: Path) -> Path:
    src = tmp_path / "broken.c"
    src.write_text("int f(void) { return undefined_name; }\n")
    return src


def test_a_call_is_one_record_from_entry_to_exit_on_the_monotonic_clock(ring: cupti_native.Native) -> None:
    call = Call(ring, DOMAIN_DRIVER, 42)
    t0 = time.monotonic_ns()
    call.enter()
    time.sleep(0.002)
    call.exit()
    t1 = time.monotonic_ns()
    (rec,) = ring.drain()
    assert t0 <= rec.start_ns and rec.end_ns <= t1 and rec.end_ns - rec.start_ns >= 2_000_000
    assert (rec.tid, rec.cbid, rec.domain) == (threading.get_native_id(), 42, DOMAIN_DRIVER)
    assert 0 < rec.nframes <= cupti_native.FRAMES
    # called through ctypes here, so the caller is ctypes' libffi (or _ctypes): never the callback itself
    assert ring.caller(rec) and not ring.caller(rec).startswith("cupti_callback-")
    assert ring.drain() == []


def test_a_runtime_call_and_the_driver_call_inside_it_keep_their_own_times(ring: cupti_native.Native) -> None:
    outer, inner = Call(ring, DOMAIN_RUNTIME, 3), Call(ring, DOMAIN_DRIVER, 7)
    outer.enter()
    time.sleep(0.001)
    inner.enter()
    inner.exit()
    time.sleep(0.001)
    outer.exit()
    first, second = ring.drain()
    assert (first.domain, first.cbid, second.domain, second.cbid) == (DOMAIN_DRIVER, 7, DOMAIN_RUNTIME, 3)
    assert second.start_ns < first.start_ns <= first.end_ns < second.end_ns


def test_an_exit_without_its_entry_is_not_recorded(ring: cupti_native.Native) -> None:
    Call(ring, DOMAIN_DRIVER, 5).exit()  # the call began before the journal subscribed
    assert ring.drain() == []


def test_many_threads_at_once_lose_nothing(ring: cupti_native.Native) -> None:
    before = ring.stats()
    per_thread, threads = 3000, 4
    got: list[int] = []
    done = threading.Event()

    def calls(k: int) -> None:
        call = Call(ring, DOMAIN_DRIVER, 100 + k)
        for _ in range(per_thread):
            call.enter()
            call.exit()

    def consumer() -> None:
        while not done.is_set():
            got.extend(r.cbid for r in ring.drain())

    c = threading.Thread(target=consumer)
    c.start()
    ts = [threading.Thread(target=calls, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    done.set()
    c.join()
    got.extend(r.cbid for r in ring.drain())
    assert sorted(set(got)) == [100, 101, 102, 103]
    assert all(got.count(100 + k) == per_thread for k in range(threads))
    after = ring.stats()
    assert after["written"] - before["written"] == per_thread * threads
    assert after["dropped"] == before["dropped"]


def test_a_full_ring_drops_and_counts_the_rest(ring: cupti_native.Native) -> None:
    size = ring.stats()["ring"]
    dropped = ring.stats()["dropped"]
    call = Call(ring, DOMAIN_DRIVER, 9)
    for _ in range(size + 10):
        call.enter()
        call.exit()
    assert ring.stats()["dropped"] - dropped == 10
    assert len(ring.drain()) == size
    call.enter()
    call.exit()
    assert len(ring.drain()) == 1  # room again once drained


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (
            "/usr/lib/python3/site-packages/cuda/bindings/_bindings/cydriver.cpython-312-x86_64-linux-gnu.so",
            "cuda.bindings._bindings.cydriver",
        ),
        ("/venv/lib/python3.12/site-packages/torch/lib/libc10_cuda.so", "libc10_cuda.so (torch)"),
        (
            "/venv/lib/python3.12/site-packages/tensorrt_libs/libnvinfer.so.10",
            "libnvinfer.so.10 (tensorrt_libs)",
        ),
        ("/usr/lib/x86_64-linux-gnu/libfoo.so.1", "libfoo.so.1"),
        ("/usr/lib/python3/dist-packages/mod.abi3.so", "mod"),
    ],
)
def test_calling_libraries_are_named_for_people(path: str, name: str) -> None:
    assert cupti_native.library_name(path) == name


def test_the_journal_gets_each_lock_taking_call_with_its_thread_and_library(
    ring: cupti_native.Native,
) -> None:
    journal = DriverJournal()
    cj = CuptiJournal(journal)
    cj.native = ring
    cj.locking = cupti_journal.locking_functions(
        {1: "cuMemHostRegister_v2", 2: "cuLaunchKernel", -3: "cudaMalloc_v3020"}
    )
    journal.attach("cupti", cj.flush)
    journal.mark_ready()

    called, flushed = threading.Event(), threading.Event()

    def library_thread() -> None:
        for cbid in (1, 2):  # a launch's record (never enabled in practice) is not a journal entry
            call = Call(ring, DOMAIN_DRIVER, cbid)
            call.enter()
            call.exit()
        call = Call(ring, DOMAIN_RUNTIME, 3)
        call.enter()
        call.exit()
        called.set()
        flushed.wait(10)

    t = threading.Thread(target=library_thread, name="library-register")
    t.start()
    assert called.wait(10)
    journal.sync()  # while the thread lives: Python's name for it
    flushed.set()
    t.join()
    entries = journal.since(0)
    assert [(e.api, e.op, e.source) for e in entries] == [
        ("cuMemHostRegister_v2", "host_register", "cupti"),
        ("cudaMalloc_v3020", "device_alloc", "cupti"),
    ]
    assert all(e.thread == "library-register" and e.tid == t.native_id and e.fault for e in entries)
    assert all(e.library for e in entries)
    assert journal.faults == 2 and cj.records == 2

    call = Call(ring, DOMAIN_DRIVER, 1)
    gone = threading.Thread(target=lambda: (call.enter(), call.exit()))
    gone.start()
    gone.join()
    journal.sync()  # the thread is gone: the kernel's name it had, recorded by the callback
    (last,) = journal.since(entries[-1].seq)
    assert last.thread == f"{_comm_of_new_threads()} (tid {gone.native_id})"
    assert cupti_journal.entries_from_callbacks([], cj.locking, cj.thread_name, ring.caller) == []


def _comm_of_new_threads() -> str:
    """The kernel's name of a thread Python starts: its parent's (CPython before 3.14 does not set it)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as fh:
        return fh.read().strip()
