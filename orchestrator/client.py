"""Client library: submit numpy batches to an orchestrator's workers over ZeroMQ.

Runs in the user's process. `Client` is thread-safe (sync calls and futures); `AsyncClient` offers the
same calls as coroutines. Both ask the supervisor once for the worker endpoints, then talk to workers
directly through one I/O thread (orchestrator.client_io).

    from orchestrator.client import Client
    with Client("configs/cpu.toml") as c:
        out = c.infer({"features": x})          # dict of named arrays (read-only, zero-copy views)
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from orchestrator import protocol
from orchestrator.config import default_run_dir, load_config
from orchestrator.control import ControlClient
from orchestrator.errors import (
    ConfigError,
    DeadlineExceededError,
    ErrorCode,
    OverloadedError,
    UnavailableError,
    WorkerDeadError,
    error_from_code,
)
from orchestrator.rundir import RunDir
from orchestrator.security import ClientKeys

DEFAULT_TIMEOUT_S = 30.0
Inputs = Mapping[str, np.ndarray] | np.ndarray


def resolve_control_endpoint(target: str | os.PathLike | None) -> str:
    """A config path, a run directory or a control endpoint -> the control endpoint."""
    if target is None:
        return RunDir(default_run_dir("orchestrator")).control_endpoint()
    text = str(target)
    if text.startswith(("ipc://", "tcp://")):
        return text
    path = Path(text)
    if path.is_dir():
        return RunDir(path).control_endpoint()
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return RunDir(load_config(path, check_files=False).run_dir).control_endpoint()
    raise UnavailableError(f"{text!r} is not a config file, a run directory or an ipc:// or tcp:// endpoint")


class Client:
    """Thread-safe client. Every call has a finite deadline (`timeout`, default 30 s)."""

    def __init__(self, target: str | os.PathLike | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_in_flight: int = 128, failover: bool = True, max_retries: int = 2,
                 max_message_bytes: int = 256 << 20, connect_timeout: float = 5.0,
                 curve: ClientKeys | None = None) -> None:
        """`target`: a config path, a run directory, or a control endpoint (ipc://..., tcp://host:port).
        `curve`: keys for an orchestrator whose TCP endpoints use CURVE (see orchestrator.security)."""
        from orchestrator.client_io import ClientIO  # keeps `import orchestrator.client` light

        self.timeout = timeout
        self.curve = curve
        self.ctx = zmq.Context(io_threads=1)
        endpoint = resolve_control_endpoint(target)
        ctl = ControlClient(endpoint, self.ctx, connect_timeout, keys=curve)
        try:
            info = ctl.call("endpoints")
        except UnavailableError:
            ctl.close()  # before term(): term() waits for every socket of the context to close
            self.ctx.term()
            raise UnavailableError(f"no orchestrator answers at {endpoint} (is it started? with CURVE, are "
                                   "the keys right?)") from None
        ctl.close()
        self.workers = info["workers"]
        ready = [w for w in self.workers if w["state"] == "ready"]
        if not ready:
            self.ctx.term()
            raise UnavailableError(f"the orchestrator at {endpoint} has no ready worker")
        self.inputs = [name for name, _, _ in ready[0]["inputs"]]
        self.outputs = [name for name, _, _ in ready[0]["outputs"]]
        self.max_batch = ready[0]["max_batch"]
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self.max_in_flight = max_in_flight
        self._io = ClientIO(self.ctx, self.workers, info.get("events"), failover, max_retries, max_message_bytes,
                            curve)
        self._io.start()
        self._closed = False
        self.failover = failover
        self.max_retries = max_retries
        self.max_message_bytes = max_message_bytes
        # Blocking infer() uses per-thread DEALER sockets: one ZeroMQ round trip, no hand-off to the I/O
        # thread. Sockets are never shared between threads; close() closes them all.
        self._local = threading.local()
        self._thread_sockets: list[zmq.Socket] = []
        self._sockets_lock = threading.Lock()

    def _named(self, inputs: Inputs) -> Mapping[str, np.ndarray]:
        if isinstance(inputs, np.ndarray):
            if len(self.inputs) != 1:
                raise TypeError(f"the model takes {len(self.inputs)} inputs {self.inputs}: pass a dict of arrays")
            return {self.inputs[0]: inputs}
        if not isinstance(inputs, Mapping):
            raise TypeError("inputs must be a numpy array or a dict of name -> numpy array")
        return inputs

    def _submit_unbounded(self, inputs: Inputs, timeout: float | None) -> Future:
        if self._closed:
            raise UnavailableError("client is closed")
        p = self._io.new_pending(self._named(inputs), self.timeout if timeout is None else timeout)
        self._io.submit(p)
        return p.future

    def submit(self, inputs: Inputs, timeout: float | None = None) -> Future:
        """Send one batch; the Future resolves to a dict of output arrays or raises a typed error.

        Blocks while `max_in_flight` requests are outstanding (the client's own backpressure), for at most
        `timeout`, then raises OverloadedError. Do not modify the input arrays until the future is done:
        they are sent zero-copy."""
        t = self.timeout if timeout is None else timeout
        if not self._slots.acquire(timeout=t):
            raise OverloadedError(f"{self.max_in_flight} requests already in flight for {t:g}s")
        try:
            fut = self._submit_unbounded(inputs, t)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _f: self._slots.release())
        return fut

    def infer(self, inputs: Inputs, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run one batch and wait for its outputs (a dict name -> array), on the calling thread."""
        t = self.timeout if timeout is None else timeout
        if self._closed:
            raise UnavailableError("client is closed")
        named = self._named(inputs)
        if not self._slots.acquire(timeout=t):
            raise OverloadedError(f"{self.max_in_flight} requests already in flight for {t:g}s")
        try:
            return self._infer_direct(named, t)
        finally:
            self._slots.release()

    def _thread_socket(self, worker: Any) -> zmq.Socket:
        socks = getattr(self._local, "socks", None)
        if socks is None:
            socks = self._local.socks = {}
        entry = socks.get(worker.id)
        if entry is None or entry[1] != worker.generation:
            if entry is not None:
                self._drop_socket(entry[0])
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
            if self.curve is not None:
                self.curve.apply(sock)
            sock.connect(worker.endpoint)
            with self._sockets_lock:
                self._thread_sockets.append(sock)
            entry = socks[worker.id] = (sock, worker.generation)
        return entry[0]

    def _drop_socket(self, sock: zmq.Socket) -> None:
        with self._sockets_lock:
            if sock in self._thread_sockets:
                self._thread_sockets.remove(sock)
        sock.close(0)

    def _infer_direct(self, named: Mapping[str, np.ndarray], t: float) -> dict[str, np.ndarray]:
        deadline = time.monotonic() + t
        tried: set[str] = set()
        last_error: Exception | None = None
        for _attempt in range(1 + (self.max_retries if self.failover else 0)):
            w = self._io.pick(tried)
            if w is None:
                break
            tried.add(w.id)
            gen = w.generation
            sock = self._thread_socket(w)
            rid = next(self._io.ids)
            remaining = deadline - time.monotonic()
            sock.send_multipart(protocol.encode_request(rid, named, max(1, int(remaining * 1000))), copy=False)
            w.sync_load += 1
            try:
                reply = self._await_reply(sock, rid, w, gen, deadline)
            finally:
                w.sync_load -= 1
            if reply is None:  # the worker died with our request: retry elsewhere or fail
                self._drop_socket(sock)
                self._local.socks.pop(w.id, None)
                last_error = WorkerDeadError(f"worker {w.id} died with this request in flight")
                continue
            if reply.code == ErrorCode.OK:
                return reply.tensors
            last_error = error_from_code(reply.code, reply.message)
            if reply.code != ErrorCode.SHUTTING_DOWN:
                raise last_error
        raise last_error or UnavailableError("no ready worker to send the request to")

    def _await_reply(self, sock: zmq.Socket, rid: int, w: Any, gen: int, deadline: float) -> Any:
        """Wait for reply `rid`; None if the worker died meanwhile. Skips late replies of earlier calls."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"no reply from {w.id} within the deadline")
            # Short slices so a worker death announced by the supervisor is noticed promptly.
            if sock.poll(min(remaining, 0.05) * 1000):
                reply = protocol.decode_reply(sock.recv_multipart(copy=False))
                if reply.request_id == rid:
                    return reply
            elif w.generation != gen:
                return None

    def infer_many(self, batches: Iterable[Inputs], max_in_flight: int = 16,
                   timeout: float | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield the outputs of `batches` in order, keeping up to `max_in_flight` of them in flight."""
        window: deque[Future] = deque()
        t = self.timeout if timeout is None else timeout
        for inputs in batches:
            if len(window) >= max_in_flight:
                yield window.popleft().result(t + 1.0)
            window.append(self.submit(inputs, t))
        while window:
            yield window.popleft().result(t + 1.0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._io.close()
        self._io.join(5)
        with self._sockets_lock:
            for sock in self._thread_sockets:
                sock.close(0)
            self._thread_sockets.clear()
        self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same calls as coroutines, for asyncio programs. Construct inside a running event loop."""

    def __init__(self, target: str | os.PathLike | None = None, *, max_in_flight: int = 128, **kwargs: Any) -> None:
        self._client = Client(target, max_in_flight=1 << 30, **kwargs)  # bounded here, without blocking
        self._sem = asyncio.Semaphore(max_in_flight)
        self.inputs = self._client.inputs
        self.outputs = self._client.outputs

    async def submit(self, inputs: Inputs, timeout: float | None = None) -> asyncio.Future:
        await self._sem.acquire()
        try:
            fut = asyncio.wrap_future(self._client._submit_unbounded(inputs, timeout))
        except BaseException:
            self._sem.release()
            raise
        fut.add_done_callback(lambda _f: self._sem.release())
        return fut

    async def infer(self, inputs: Inputs, timeout: float | None = None) -> dict[str, np.ndarray]:
        return await (await self.submit(inputs, timeout))

    async def infer_many(self, batches: Iterable[Inputs], max_in_flight: int = 16,
                         timeout: float | None = None):
        window: deque[asyncio.Future] = deque()
        for inputs in batches:
            if len(window) >= max_in_flight:
                yield await window.popleft()
            window.append(await self.submit(inputs, timeout))
        while window:
            yield await window.popleft()

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
