"""The client's view of worker states when an `endpoints` answer and the events disagree in time.

A fake supervisor (a ROUTER control socket and a PUB events socket, in this process) drives the client's
I/O thread through the two races that left a client with no ready worker for good: a worker that turned
ready before the client's SUB had subscribed, and a READY event that arrived while the client, having
lost its supervisor, waited for an `endpoints` answer composed before it."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from orchestrator.client.io_thread import ClientIO
from orchestrator.common import messages
from orchestrator.common.messages import SupervisorState, WorkerState
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)


class FakeSupervisor:
    """Answers `endpoints` with the worker state its test chooses, and publishes what its test tells it."""

    def __init__(self, tmp: Path, pid: int) -> None:
        self.ctx = zmq.Context.instance()
        self.control = f"ipc://{tmp}/control.sock"
        self.events = f"ipc://{tmp}/events.sock"
        self.worker_endpoint = f"ipc://{tmp}/w0.sock"
        self.pid = pid
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.control)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.events)
        self.asked = 0
        self.clients: list[ClientIO] = []

    def client(self, state: WorkerState) -> ClientIO:
        """A client's I/O thread, started from an `endpoints` answer with w0 in `state`."""
        io = ClientIO(
            self.ctx,
            [(self.control, self.info(state))],
            failover=True,
            max_retries=1,
            max_message_bytes=1 << 20,
        )
        io.start()
        self.clients.append(io)
        return io

    def info(self, state: WorkerState) -> dict:
        return {
            "pid": self.pid,
            "beat_s": 0.05,
            "events": self.events,
            "workers": [{"id": "w0", "endpoint": self.worker_endpoint, "state": state.value}],
        }

    def publish(self, msg: messages.Event) -> None:
        self.pub.send_multipart([msg.kind.value.encode(), messages.encode(msg)])

    def worker(self, state: WorkerState) -> None:
        self.publish(
            messages.WorkerEvent(
                id="w0", state=state, endpoint=self.worker_endpoint, pid=1, restarts=0, t=time.time()
            )
        )

    def beat(self) -> None:
        self.publish(messages.SupervisorEvent(state=SupervisorState.ALIVE, pid=self.pid, t=time.time()))

    def question(self, timeout_s: float = 10.0) -> tuple[bytes, int]:
        """Wait for one `endpoints` question, beating meanwhile: (the asker's identity, the request id)."""
        deadline = time.monotonic() + timeout_s
        while not self.router.poll(20):
            assert time.monotonic() < deadline, "the client asked no `endpoints` question"
            self.beat()
        ident, raw = self.router.recv_multipart()
        req = messages.CONTROL_REQUESTS.decode(raw)
        assert req.cmd == "endpoints"
        self.asked += 1
        return ident, req.id

    def reply(self, ident: bytes, rid: int, state: WorkerState) -> None:
        msg = messages.ControlReply(id=rid, ok=True, data=self.info(state))
        self.router.send_multipart([ident, messages.encode(msg)])

    def close(self) -> None:
        for io in self.clients:
            io.close()
            io.join(5)
        self.router.close(0)
        self.pub.close(0)


@pytest.fixture
def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def fake(short_tmp: Path) -> Iterator[FakeSupervisor]:
    f = FakeSupervisor(short_tmp, os.getpid())
    yield f
    f.close()


def beat_until(fake: FakeSupervisor, pred, what: str, timeout: float = 5.0) -> None:
    """Keep the fake supervisor beating (and answering) until `pred` holds."""
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            fake.beat()
            if fake.router.poll(20):
                fake.reply(*fake.question(), WorkerState.READY)

    th = threading.Thread(target=serve)
    th.start()
    try:
        wait_until(pred, timeout, what)
    finally:
        stop.set()
        th.join(5)


def test_a_worker_ready_before_the_subscription_took_is_connected(fake: FakeSupervisor) -> None:
    # The answer the client starts from says "starting"; the worker turns ready before the client's SUB
    # exists, so that event is lost to it: only a second question, once its SUB delivers, can tell.
    fake.worker(WorkerState.READY)
    io = fake.client(WorkerState.STARTING)
    assert not io.workers["w0"].ready
    beat_until(fake, lambda: io.workers["w0"].ready, "the client to connect to the ready worker")
    assert fake.asked == 1


def test_a_ready_event_ahead_of_an_older_answer_is_not_lost(fake: FakeSupervisor, dead_pid: int) -> None:
    fake.pid = dead_pid  # the client finds this "supervisor" dead at the first silence
    io = fake.client(WorkerState.READY)
    w0 = io.workers["w0"]
    assert w0.ready
    wait_until(lambda: io.lost is not None, 5, "the client to find its supervisor gone")
    assert not w0.ready
    fake.pid = os.getpid()  # "restarted"
    # The client asks; the answer is composed while w0 still starts, and w0's READY reaches the client
    # before the answer does.
    ident, rid = fake.question()
    host = io.hosts[fake.control]
    heard = host.last_event
    fake.worker(WorkerState.READY)
    wait_until(lambda: host.last_event != heard, 5, "the client to take the READY event")
    fake.reply(ident, rid, WorkerState.STARTING)
    beat_until(fake, lambda: w0.ready, "the client to connect to the worker whose READY came first")
    assert io.lost is None
