"""Client library: submit numpy batches to an orchestrator's workers over ZeroMQ.

Runs in the user's process. `Client` is thread-safe (sync calls and futures); `AsyncClient` offers the
same calls as coroutines. Both ask the supervisor once for the worker endpoints, then talk to workers
directly through one I/O thread (orchestrator.client.io_thread).

    from orchestrator.client import Client
    with Client("configs/cpu.toml") as c:
        out = c.infer({"features": x})          # dict of named arrays (read-only, zero-copy views)

Local clients (a config, a run directory or ipc://) use shared memory by default (`shm="auto"`): each
worker leases the client a region of its arena; inputs are copied into it on the calling thread (or built
there with `empty()`), the worker moves them straight to the device and writes the outputs back into it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from orchestrator.client.control import ControlClient
from orchestrator.client.lease import ClientLease, describe_lease, span_lease
from orchestrator.common import protocol, shapes
from orchestrator.common.config import default_run_dir, load_config
from orchestrator.common.errors import (
    BatchTooLargeError,
    ConfigError,
    DeadlineExceededError,
    ErrorCode,
    InvalidInputError,
    OverloadedError,
    ShuttingDownError,
    UnavailableError,
    WorkerDeadError,
    error_from_code,
)
from orchestrator.common.rundir import RunDir
from orchestrator.common.security import ClientKeys

log = logging.getLogger(__name__)

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

    def __init__(
        self,
        target: str | os.PathLike | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_in_flight: int = 128,
        failover: bool = True,
        max_retries: int = 2,
        max_message_bytes: int = 256 << 20,
        connect_timeout: float = 5.0,
        curve: ClientKeys | None = None,
        shm: bool | str = "auto",
        shm_lease_mb: int | None = None,
        copy_results: bool = False,
        resolve: Callable[[str], list[str]] | None = None,
        resolve_interval_s: float = 5.0,
    ) -> None:
        """`target`: a config path, a run directory, or a control endpoint (ipc://..., tcp://host:port); or
        a list of tcp:// control endpoints, one per host; or tcp://NAME:port where NAME is a DNS name whose
        addresses are the hosts (a Kubernetes headless Service), re-resolved every `resolve_interval_s`
        (`resolve(name)` -> addresses replaces the system resolver, e.g. in tests). With several hosts the
        client balances over all their workers and fails over when a host goes; one that answers again
        (restarted, or newly listed) takes work as soon as its workers are ready.
        `curve`: keys for an orchestrator whose TCP endpoints use CURVE (see orchestrator.common.security).
        `shm`: "auto" (shared memory for local targets, frames for tcp://), True (shared memory or an
        error) or False (frames). `shm_lease_mb`: the lease to ask each worker for (default: room for 32
        of the model's largest requests, at least 1 MiB; the worker caps it at transport.shm_max_lease_mb).
        Results are read-only views: of the reply's frames, or of the lease, whose span is reused once
        the last array of that result is gone; `copy_results=True` returns copies instead."""
        if shm not in (True, False, "auto"):
            raise ValueError(f'shm must be True, False or "auto", got {shm!r}')
        from orchestrator.client.io_thread import (  # keeps `import orchestrator.client` light
            ClientIO,
            reachable,
        )

        self.timeout = timeout
        self.curve = curve
        self.ctx = zmq.Context(io_threads=1)
        self._resolver_stop = threading.Event()
        try:
            controls, dns = self._controls(target, resolve)
            answers = self._ask_hosts(controls, connect_timeout)
        except BaseException:
            self.ctx.term()
            raise
        multi = len(controls) > 1 or dns is not None
        answered = [info for info in answers if info is not None]
        if not answered:
            self.ctx.term()
            where = controls[0] if len(controls) == 1 else f"any of {', '.join(controls)}"
            raise UnavailableError(
                f"no orchestrator answers at {where} (is it started? with CURVE, are the keys right?)"
            )
        self.workers = [
            {
                **w,
                "id": f"{ClientIO.label_of(c)}/{w['id']}" if multi else w["id"],
                "endpoint": reachable(w["endpoint"], c),
            }
            for c, info in zip(controls, answers, strict=True)
            if info
            for w in info["workers"]
        ]
        ready = [w for w in self.workers if w["state"] == "ready"]
        if not ready:
            self.ctx.term()
            raise UnavailableError(
                f"the orchestrator at {controls[0] if len(controls) == 1 else ', '.join(controls)} "
                "has no ready worker"
            )
        models = {(repr(w["inputs"]), repr(w["outputs"])) for w in ready}
        if len(models) > 1:
            self.ctx.term()
            raise ConfigError(
                f"the orchestrators serve different models (inputs and outputs differ): {sorted(models)}"
            )
        self.inputs = [name for name, _, _ in ready[0]["inputs"]]
        self.outputs = [name for name, _, _ in ready[0]["outputs"]]
        self._out_specs = [(name, np.dtype(dt), tuple(shape)) for name, dt, shape in ready[0]["outputs"]]
        self._in_specs = [(name, np.dtype(dt), tuple(shape)) for name, dt, shape in ready[0]["inputs"]]
        self.max_batch = min(w["max_batch"] for w in ready)
        # Dynamic dimensions (e.g. [batch, seq] inputs): output sizes then follow each request's inputs.
        self._dynamic = any(shapes.is_dynamic(shape) for _, _, shape in self._in_specs + self._out_specs)
        if multi and shm is True:
            self.ctx.term()
            raise UnavailableError(
                "shared memory (shm=True) needs one local orchestrator; several hosts use frames"
            )
        self.shm = False if multi else self._shm_mode(shm, controls[0], answered[0])
        self._shm_forced = shm is True
        self.copy_results = copy_results
        self._lease_bytes = (shm_lease_mb << 20) if shm_lease_mb else self._default_lease(ready[0])
        self._leases: dict[str, tuple[int, ClientLease | None]] = {}  # worker id -> (generation, lease)
        self._lease_lock = threading.Lock()
        self.connect_timeout = connect_timeout
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self.max_in_flight = max_in_flight
        limits = [info.get("max_message_bytes") or max_message_bytes for info in answered]
        max_message_bytes = min(max_message_bytes, *limits)
        self._io = ClientIO(
            self.ctx,
            list(zip(controls, answers, strict=True)),
            failover,
            max_retries,
            max_message_bytes,
            curve,
            multi=multi,
        )
        self._io.on_worker_lost = self._drop_lease
        self._io.out_specs = [(n, d.str, shape) for n, d, shape in self._out_specs]
        if copy_results:
            self._io.finish = _copied
        self._io.start()
        if dns is not None:  # the host set follows the name: re-resolved every resolve_interval_s
            threading.Thread(
                target=self._follow_dns,
                args=(*dns, resolve or _resolve_addresses, resolve_interval_s),
                name="orchestrator-client-dns",
                daemon=True,
            ).start()
        self._closed = False
        self.failover = failover
        self.max_retries = max_retries
        self.max_message_bytes = max_message_bytes
        # Blocking infer() uses per-thread DEALER sockets: one ZeroMQ round trip, no hand-off to the I/O
        # thread. Sockets are never shared between threads; close() closes them all.
        self._local = threading.local()
        self._thread_sockets: list[zmq.Socket] = []
        self._sockets_lock = threading.Lock()

    # --- hosts ------------------------------------------------------------------------------------

    @staticmethod
    def _controls(target: Any, resolve: Callable[[str], list[str]] | None) -> tuple[list[str], tuple | None]:
        """The control endpoints to ask, and (name, port) when they come from a DNS name."""
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        if not targets:
            raise ValueError("Client: an empty list of endpoints")
        controls = [resolve_control_endpoint(t) for t in targets]
        if len(controls) == 1:
            c = controls[0]
            if c.startswith("ipc://") and not RunDir(Path(c[6:]).parent).is_running():
                raise UnavailableError(f"no orchestrator is running in {Path(c[6:]).parent}")
            name_port = _dns_name(c)
            if name_port is not None:
                name, port = name_port
                controls = _controls_of(name, port, resolve or _resolve_addresses)
                if not controls:
                    raise UnavailableError(f"{name} resolves to no address")
                return controls, name_port
        elif any(not c.startswith("tcp://") for c in controls):
            raise ValueError("Client: several endpoints must all be tcp://host:port control endpoints")
        return controls, None

    def _ask_hosts(self, controls: list[str], connect_timeout: float) -> list[dict | None]:
        """Every host's `endpoints` answer (None where none came within connect_timeout), asked together."""

        def ask(control: str) -> dict | None:
            ctl = ControlClient(control, self.ctx, connect_timeout, keys=self.curve)
            try:
                return ctl.call("endpoints")
            except UnavailableError:
                return None
            finally:
                ctl.close()  # before any term(): term() waits for every socket of the context

        if len(controls) == 1:
            return [ask(controls[0])]
        with ThreadPoolExecutor(max_workers=min(16, len(controls))) as pool:
            return list(pool.map(ask, controls))

    def _follow_dns(self, name: str, port: int, resolve: Callable[[str], list[str]], every: float) -> None:
        """Resolver thread: hand the I/O thread the host set the name resolves to, every `every` seconds."""
        while not self._resolver_stop.wait(every):
            try:
                controls = _controls_of(name, port, resolve)
            except Exception as exc:  # a failed lookup keeps the hosts we have
                log.warning("cannot resolve %s: %s; keeping the current hosts", name, exc)
                continue
            if controls:
                self._io.set_hosts(controls)

    @property
    def hosts(self) -> dict[str, dict[str, Any]]:
        """Each host (its control endpoint's host:port) -> {"state": "up", "retired" (no longer listed by
        DNS) or why it is not usable, "sent": requests this client sent to it}."""
        return self._io.host_states()

    # --- shared memory ----------------------------------------------------------------------------

    @staticmethod
    def _shm_mode(shm: bool | str, endpoint: str, info: dict) -> bool:
        arena_mb = info.get("shm_mb", 0)
        if shm is False:
            return False
        if shm == "auto":
            return endpoint.startswith("ipc://") and bool(arena_mb)
        if not arena_mb:
            raise UnavailableError(
                f"shared memory was asked for (shm=True) but the orchestrator at {endpoint} has it "
                "off (transport.shm_mb = 0)"
            )
        return True

    def _default_lease(self, worker: dict) -> int:
        largest = {d[0]: d[2] for d in worker.get("dims") or []}  # dynamic dimensions at their largest
        row = sum(
            math.prod(shapes.resolve(shape, largest)) * np.dtype(dt).itemsize
            for _, dt, shape in [*worker["inputs"], *worker["outputs"]]
        )
        return max(
            1 << 20,
            32 * (row * (worker["max_batch"] or 1) + 256 * (len(worker["inputs"]) + len(worker["outputs"]))),
        )

    def _drop_lease(self, worker_id: str) -> None:
        """The worker died or stopped (from the I/O thread): its arena, and our lease on it, are void. No
        lock: a user thread may hold it for a whole attach round trip, and the I/O thread must not wait
        (dict.pop is atomic)."""
        entry = self._leases.pop(worker_id, None)
        if entry is not None and entry[1] is not None:
            entry[1].dropped = True

    def _lease(self, w: Any, deadline: float) -> ClientLease | None:
        """This client's lease on worker `w`, attaching on first use (and after the worker restarted).
        None when shared memory is not used with it ("auto" and the attach was refused: logged once).
        A worker that does not answer within the call's deadline fails the call as any request would."""
        with self._lease_lock:
            entry = self._leases.get(w.id)
            if entry is not None and entry[0] == w.generation:
                return entry[1]
            gen = w.generation
            try:
                lease: ClientLease | None = self._attach(w, deadline)
            except DeadlineExceededError:
                raise
            except (UnavailableError, OverloadedError, OSError, ValueError) as exc:
                if self._shm_forced:
                    raise UnavailableError(f"cannot use shared memory with worker {w.id}: {exc}") from None
                log.warning("shared memory with worker %s refused (%s); sending it frames", w.id, exc)
                lease = None
            self._leases[w.id] = (gen, lease)
            return lease

    def _attach(self, w: Any, deadline: float) -> ClientLease:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(sock)
        try:
            sock.connect(w.endpoint)
            rid = next(self._io.ids)
            sock.send_multipart(protocol.encode_attach(rid, os.getpid(), self._lease_bytes))
            wait_s = min(self.connect_timeout, deadline - time.monotonic())
            if not sock.poll(int(max(0.0, wait_s) * 1000)):
                if wait_s < self.connect_timeout:
                    raise DeadlineExceededError(f"no answer from {w.id} to attach within the deadline")
                raise UnavailableError(f"no answer to attach within {self.connect_timeout:g}s")
            reply = protocol.decode_reply(sock.recv_multipart())
        finally:
            sock.close(0)
        if reply.code != ErrorCode.OK:
            raise error_from_code(reply.code, reply.message)
        lease_id, path, offset, size = describe_lease(reply.message)
        return ClientLease(w.id, lease_id, path, offset, size)

    def _detach_all(self) -> None:
        """Tell each worker we are done with its lease (a worker also ends leases of exited processes)."""
        with self._lease_lock:
            leases = [(wid, e[1]) for wid, e in self._leases.items() if e[1] is not None]
            self._leases.clear()
        for wid, lease in leases:
            lease.dropped = True
            w = self._io.workers.get(wid)
            if w is None or not w.ready:
                continue
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                self.curve.apply(sock)
            sock.connect(w.endpoint)
            sock.send_multipart(protocol.encode_detach(next(self._io.ids), lease.lease_id))
            sock.poll(500)  # the answer, or give up: the lease also ends when this process exits
            sock.close(0)

    def _shm_encode(
        self, w: Any, named: Mapping[str, np.ndarray], rid: int, timeout_ms: int, deadline: float
    ) -> tuple[list, ClientLease, int, list | None] | None:
        """Lay a request out in our lease on `w`: inputs copied into spans (unless they already lie in the
        lease: `empty()`), one span for all outputs. Returns (frames, lease, output offset, entry), where
        `entry` ([id, rows, [input offsets], output offset]) is set when the inputs are exactly the model's
        (names in order, dtypes, item shapes), so the I/O thread may send it with others in one message.
        None when `w` gets frames instead."""
        lease = self._lease(w, deadline)
        if lease is None:
            return None
        taken: list[int] = []
        try:
            specs = []
            rows = 1
            exact = len(named) == len(self._in_specs)
            for i, (name, arr) in enumerate(named.items()):
                arr = np.asarray(arr)
                wire = protocol.wire_dtype(arr.dtype)
                if i == 0:
                    rows = arr.shape[0] if arr.ndim else 1
                if exact:
                    want = self._in_specs[i]
                    exact = (
                        name == want[0]
                        and arr.dtype == want[1]
                        and arr.ndim >= 1
                        and arr.shape[0] == rows
                        and arr.shape[1:] == want[2]
                    )
                off = lease.contains(arr) if span_lease(arr) is lease else None
                if off is None:
                    off = lease.take(arr.nbytes, deadline)
                    taken.append(off)
                    np.copyto(
                        lease.raw(off, arr.nbytes).view(arr.dtype).reshape(arr.shape), arr, casting="no"
                    )
                specs.append([name, wire, list(arr.shape), off])
            _, total = protocol.shm_layout(self._out_shapes(rows, named))
            out_off = lease.take(total, deadline)
            taken.append(out_off)
        except BaseException:
            for off in taken:
                lease.release(off)
            raise
        lease.hold(rid, tuple(taken))
        entry = [rid, rows, [sp[3] for sp in specs], out_off] if exact and rows >= 1 else None
        return (
            protocol.encode_shm_request(rid, specs, lease.lease_id, out_off, timeout_ms),
            lease,
            out_off,
            entry,
        )

    def _out_shapes(
        self, rows: int, named: Mapping[str, np.ndarray]
    ) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """The outputs' full shapes for a request: with dynamic dimensions, their sizes come from the inputs."""
        if not self._dynamic:
            return [(n, d, (rows, *shape)) for n, d, shape in self._out_specs]
        try:
            dims = shapes.bind(
                [(n, shape) for n, _, shape in self._in_specs],
                {n: np.shape(named[n]) for n, _, _ in self._in_specs},
            )
            return [(n, d, (rows, *shapes.resolve(shape, dims))) for n, d, shape in self._out_specs]
        except (KeyError, IndexError):
            want = ", ".join(f"{n} {shapes.describe(shape)}" for n, _, shape in self._in_specs)
            raise InvalidInputError(
                f"inputs {sorted(named)} with shapes {[list(np.shape(a)) for a in named.values()]} "
                f"do not match the model's: {want}"
            ) from None

    def _lease_owner(self, named: Mapping[str, np.ndarray]) -> Any:
        """The worker whose lease holds one of the inputs (built with empty()), if it is still ready."""
        for arr in named.values():
            lease = span_lease(arr)
            if lease is not None and not lease.dropped:
                w = self._io.workers.get(lease.worker_id)
                return w if w is not None and w.ready else None
        return None

    def empty(self, shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """A writable array inside this client's shared-memory lease on the least busy worker: fill it and
        pass it as an input, and the request goes to that worker with no copy at all. Its span returns to
        the lease when the array (and every view of it) is gone. Needs shared memory (see `shm`)."""
        if not self.shm:
            raise UnavailableError(
                "empty() needs shared memory: this client sends frames (shm=False, a tcp:// "
                "target, or transport.shm_mb = 0)"
            )
        w = self._io.pick(set())
        if w is None:
            raise UnavailableError("no ready worker to lease shared memory from")
        lease = self._lease(w, time.monotonic() + self.timeout)
        if lease is None:
            raise UnavailableError(f"worker {w.id} refused a shared-memory lease (see the log)")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dt = np.dtype(dtype)
        protocol.wire_dtype(dt)
        off = lease.take(math.prod(shape) * dt.itemsize, time.monotonic() + self.timeout)
        return lease.view(off, dt, shape, readonly=False)

    def _named(self, inputs: Inputs) -> Mapping[str, np.ndarray]:
        if isinstance(inputs, np.ndarray):
            if len(self.inputs) != 1:
                raise TypeError(
                    f"the model takes {len(self.inputs)} inputs {self.inputs}: pass a dict of arrays"
                )
            return {self.inputs[0]: inputs}
        if not isinstance(inputs, Mapping):
            raise TypeError("inputs must be a numpy array or a dict of name -> numpy array")
        return inputs

    def _submit_unbounded(self, inputs: Inputs, timeout: float | None) -> Future:
        if self._closed:
            raise UnavailableError("client is closed")
        named = self._named(inputs)
        encode = None
        if self.shm:

            def encode(rid: int, timeout_ms: int, deadline: float) -> tuple | None:
                w = self._lease_owner(named) or self._io.pick(set())
                if w is None:
                    return None  # the I/O thread fails it: no ready worker
                out = self._shm_encode(w, named, rid, timeout_ms, deadline)
                return None if out is None else (*out, w.id)

        try:
            p = self._io.new_pending(named, self.timeout if timeout is None else timeout, encode)
        except (
            DeadlineExceededError,
            OverloadedError,
            BatchTooLargeError,
        ) as exc:  # the lease: a failed future
            fut: Future = Future()
            fut.set_exception(exc)
            return fut
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
        for attempt in range(1 + (self.max_retries if self.failover else 0)):
            w = (self._lease_owner(named) if self.shm and attempt == 0 else None) or self._io.pick(tried)
            if w is None:
                break
            tried.add(w.id)
            gen = w.generation
            sock = self._thread_socket(w)
            rid = next(self._io.ids)
            remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
            shm = self._shm_encode(w, named, rid, remaining_ms, deadline) if self.shm else None
            if shm is None:
                self._io.check_size(named)
                sock.send_multipart(protocol.encode_request(rid, named, remaining_ms), copy=False)
            else:
                sock.send_multipart(shm[0], copy=False)
            sent = w.sync_started[rid] = time.monotonic()
            w.sent += 1
            try:
                reply = self._await_reply(sock, rid, w, gen, deadline, shm)
            finally:
                w.sync_started.pop(rid, None)
            if reply is not None and reply.code == ErrorCode.OK:
                self._io.note_latency(time.monotonic() - sent)
            if reply is None:  # the worker died with our request: retry elsewhere or fail
                if self._io.lost:
                    raise UnavailableError(self._io.lost)
                self._drop_socket(sock)
                self._local.socks.pop(w.id, None)
                last_error = (
                    ShuttingDownError(f"worker {w.id} stopped before answering this request")
                    if w.stopped_cleanly
                    else WorkerDeadError(f"worker {w.id} died with this request in flight")
                )
                continue
            if reply.code == ErrorCode.OK:
                return _copied(reply.tensors) if self.copy_results else reply.tensors
            last_error = error_from_code(reply.code, reply.message)
            if not self._io.retryable(reply.code, w):
                raise last_error
        if self._io.lost:
            raise UnavailableError(self._io.lost)
        raise last_error or UnavailableError("no ready worker to send the request to")

    def _await_reply(
        self, sock: zmq.Socket, rid: int, w: Any, gen: int, deadline: float, shm: tuple | None = None
    ) -> Any:
        """Wait for reply `rid`; None if the worker died meanwhile. Skips late replies of earlier calls
        (releasing their shared-memory spans, which the worker no longer uses)."""
        lease = shm[1] if shm is not None else None

        def shm_of(got: Any) -> tuple | None:
            return (lease, shm[2]) if lease is not None and got == rid else None  # type: ignore[index]

        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"no reply from {w.id} within the deadline")  # spans stay held
            # Short slices so a worker death announced by the supervisor is noticed promptly.
            if sock.poll(int(min(remaining, 0.05) * 1000) or 1):
                reply = protocol.decode_reply(sock.recv_multipart(copy=False), shm_of)
                if reply.request_id == rid:
                    if lease is not None:
                        lease.settle(rid, keep=shm[2] if reply.code == ErrorCode.OK else None)  # type: ignore[index]
                    return reply
                late = self._leases.get(w.id)
                if late is not None and late[1] is not None:
                    late[1].settle(reply.request_id)
            elif w.generation != gen:
                return None

    def infer_many(
        self, batches: Iterable[Inputs], max_in_flight: int = 16, timeout: float | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
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
        self._resolver_stop.set()
        if self._closed:
            return
        self._closed = True
        self._io.close()
        self._io.join(5)
        self._detach_all()
        with self._sockets_lock:
            for sock in self._thread_sockets:
                sock.close(0)
            self._thread_sockets.clear()
        self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dns_name(control: str) -> tuple[str, int] | None:
    """(name, port) of tcp://NAME:port when NAME is a DNS name (not an address, not localhost)."""
    if not control.startswith("tcp://"):
        return None
    host, _, port = control[6:].rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or host == "localhost" or host == "*":
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        return host, int(port)


def _resolve_addresses(name: str) -> list[str]:
    """The system resolver: every address of `name` (A and AAAA records), in its order, once each."""
    out: list[str] = []
    for *_, sockaddr in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM):
        if str(sockaddr[0]) not in out:
            out.append(str(sockaddr[0]))
    return out


def _controls_of(name: str, port: int, resolve: Callable[[str], list[str]]) -> list[str]:
    return [f"tcp://[{a}]:{port}" if ":" in a else f"tcp://{a}:{port}" for a in resolve(name)]


def _copied(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Writable copies of a result (Client(copy_results=True)); the views, and their span, go at once."""
    return {name: np.array(arr) for name, arr in tensors.items()}


class AsyncClient:
    """The same calls as coroutines, for asyncio programs. Construct inside a running event loop."""

    def __init__(
        self, target: str | os.PathLike | None = None, *, max_in_flight: int = 128, **kwargs: Any
    ) -> None:
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

    async def infer_many(
        self, batches: Iterable[Inputs], max_in_flight: int = 16, timeout: float | None = None
    ):
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
