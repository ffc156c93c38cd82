"""The client's I/O thread: owns one DEALER per worker and, per host, the supervisor's event SUB socket.

Runs in the user's process, on a background thread started by orchestrator.client.Client. User threads
hand it requests through a deque plus an eventfd wake-up; it balances across the ready workers of every
host by outstanding requests, resolves futures, enforces deadlines and fails requests over when a worker
or a whole host dies. A host is one orchestrator (one supervisor's control endpoint); with several, worker
ids are prefixed with the host's label (`10.0.0.2:7000/w0`), and the host set may follow a DNS name.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import zmq

from orchestrator.common import messages, protocol
from orchestrator.common.errors import (
    BatchTooLargeError,
    DeadlineExceededError,
    ErrorCode,
    ShuttingDownError,
    UnavailableError,
    WorkerDeadError,
    error_from_code,
)
from orchestrator.common.procstat import process_state

log = logging.getLogger(__name__)

_RETRYABLE = (ErrorCode.SHUTTING_DOWN,)
_SUSPECT_MIN_S = 0.5  # a worker is suspect once its oldest request is older than this...
_SUSPECT_FACTOR = 20.0  # ...and than this many times the recent request latency
# A remote client's verdict on a supervisor it cannot see: no heartbeat (every 0.25 s) this long. With
# several hosts, this is how soon a host that vanished stops getting new requests (its in-flight ones fail
# over then too).
_REMOTE_SILENCE_S = 1.5
_MANY_PER_MESSAGE = 256  # shared-memory requests sent together in one INFER_MANY message


def reachable(endpoint: str, control: str) -> str:
    """An endpoint a host advertised, as this client reaches it: a host bound to every interface
    (0.0.0.0, ::, in a Kubernetes pod) advertises that wildcard, which means "here" to whoever connects; the
    address the control endpoint reached is the one to use."""
    if not endpoint or not endpoint.startswith("tcp://") or not control.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint[6:].rpartition(":")
    if host.strip("[]") not in ("0.0.0.0", "::", "*"):
        return endpoint
    return f"tcp://{control[6:].rpartition(':')[0]}:{port}"


def _process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    return process_state(pid) not in (None, b"Z", b"X")


@dataclass(eq=False)
class Pending:
    request_id: int
    frames: list
    future: Future
    deadline: float  # time.monotonic()
    timeout_ms: int
    attempts: int = 0
    worker: str | None = None
    tried: set[str] = field(default_factory=set)
    # Shared memory: the lease the request's spans are in (its worker is `target`), where the outputs
    # go, and the caller's arrays, re-sent as frames if the request must fail over to another worker.
    lease: Any = None
    out_off: int = 0
    target: str | None = None
    tensors: Any = None
    entry: list | None = None  # [id, rows, [input offsets], output offset]: may share a message (INFER_MANY)
    sent_at: float = 0.0  # time.monotonic() of the last send


class _Worker:
    __slots__ = (
        "id",
        "endpoint",
        "sock",
        "outstanding",
        "ready",
        "generation",
        "abandoned",
        "sync_started",
        "stopped_cleanly",
        "sent",
    )

    def __init__(self, wid: str, endpoint: str) -> None:
        self.id = wid
        self.endpoint = endpoint
        self.sock: zmq.Socket | None = None
        self.outstanding: dict[int, Pending] = {}
        self.ready = False
        self.generation = 0  # bumped when the worker dies: blocking callers waiting on it give up
        self.stopped_cleanly = False  # its last exit was a clean stop (state "stopped"), not a crash
        self.abandoned: dict[
            int, Any
        ] = {}  # shared-memory requests past their deadline -> lease (spans held)
        # Blocking infer() calls in flight here (request id -> time sent), kept by user threads: a dict's
        # item set and pop are atomic, so the I/O thread's reads need no lock (and see no torn counter).
        self.sync_started: dict[int, float] = {}
        self.sent = 0  # requests sent here, by either path (a racy count from two threads: a statistic only)

    def oldest(self) -> float | None:
        """When the oldest request still in flight on this worker was sent (time.monotonic()), or None.
        Both maps are filled in send order, so their first entries are the oldest: O(1) on every pick."""
        try:  # another thread may add or remove one meanwhile: then this pick simply skips the check
            first = next(iter(self.outstanding.values()), None)
            sync = next(iter(self.sync_started.values()), None)
        except RuntimeError:
            return None
        times = [t for t in (first.sent_at if first is not None else None, sync) if t is not None]
        return min(times, default=None)

    @property
    def load(self) -> int:
        return len(self.outstanding) + len(self.sync_started)


class _Host:
    """One orchestrator: its control endpoint (discovery), its events (supervisor heartbeats and worker
    states) and its liveness. `lost` holds why it is not usable (dead, not reached yet); while lost, its
    control socket is asked for endpoints once a second. A host the DNS name no longer lists is `retired`:
    it gets no new work, and what it has in flight is still answered."""

    __slots__ = (
        "label",
        "control",
        "events",
        "sub",
        "monitor",
        "pid",
        "beat_s",
        "local",
        "last_event",
        "lost",
        "rediscover",
        "rediscover_at",
        "resync",
        "fresh",
        "retired",
        "workers",
        "refused",
    )

    def __init__(self, label: str, control: str) -> None:
        self.label = label
        self.control = control
        self.events: str | None = None
        self.sub: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None  # the events connection's DISCONNECTED events (remote hosts)
        self.pid: int | None = None
        self.beat_s: float | None = None
        self.local = control.startswith("ipc://")
        self.last_event = time.monotonic()
        self.lost: str | None = None
        self.rediscover: zmq.Socket | None = None  # an `endpoints` question in flight on the control socket
        self.rediscover_at = 0.0
        # Worker states reach a client two ways: the `endpoints` answer (a snapshot) and events on the SUB
        # (changes, published once). An answer may predate an event that arrives before it, and a SUB misses
        # what was published before its subscription took (a new SUB, or one reconnecting after its host was
        # lost): `resync` asks once more after the answer in flight, and `fresh` (no event since the SUB
        # (re)connected) asks once more when the first event arrives.
        self.resync = False
        self.fresh = False
        self.retired = False
        self.workers: set[str] = set()
        self.refused = 0  # events that did not decode (a supervisor of another release): logged once

    @property
    def asking(self) -> bool:
        """Its control socket is to be asked for endpoints, or is being asked (rediscovery ticks run)."""
        return self.lost is not None or self.rediscover is not None or self.resync


class ClientIO(threading.Thread):
    def __init__(
        self,
        ctx: zmq.Context,
        hosts: list[tuple[str, dict | None]],
        failover: bool,
        max_retries: int,
        max_message_bytes: int,
        curve: Any = None,
        multi: bool = False,
    ) -> None:
        """`hosts`: (control endpoint, its `endpoints` answer or None if it did not answer yet). `multi`:
        prefix worker ids with the host's label (several hosts, or a host set that may grow)."""
        super().__init__(name="orchestrator-client-io", daemon=True)
        self.ctx = ctx
        # Supervisor liveness, per host: its heartbeats on the events socket (every beat_s). After a silence,
        # a local client checks the supervisor's pid; a remote one waits _REMOTE_SILENCE_S. A lost host's
        # requests fail over to the other hosts (or fail with UnavailableError when none is left), and its
        # control socket is asked for endpoints until an orchestrator answers there again.
        self.curve = curve  # orchestrator.common.security.ClientKeys or None
        self.failover = failover
        self.max_retries = max_retries
        self.max_message_bytes = max_message_bytes
        self.multi = multi
        self.workers: dict[str, _Worker] = {}
        self.hosts: dict[str, _Host] = {}
        self.lost: str | None = None  # set while no host is usable: why
        self._host_updates: deque[list[str]] = deque()  # new host sets from the DNS resolver thread
        self.poller = zmq.Poller()
        for control, info in hosts:
            h = self._add_host(control)
            if info is None:
                h.lost = f"the orchestrator at {control} did not answer yet"
            else:
                self._adopt(h, info)
        self._update_lost()
        self.submissions: deque[Pending] = deque()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ids = itertools.count(1)
        self._rotation = itertools.count()
        self.closing = False
        self.stray_replies = 0
        self.on_worker_lost: Any = (
            None  # callback(worker id), from the I/O thread: the client drops its lease
        )
        self.latency_s = 0.01  # recent request latency (EWMA over both paths)
        self.out_specs: list = []  # the model's outputs (name, dtype string, item shape), for INFER_MANY replies
        self._out_specs_cache: dict[int, list] = {}
        self.finish: Any = lambda tensors: tensors  # applied to results (Client(copy_results=True) copies)

    # --- called from user threads ---------------------------------------------------------------

    def submit(self, p: Pending) -> None:
        self.submissions.append(p)  # deque.append is atomic under the GIL
        os.eventfd_write(self.wake_fd, 1)

    def close(self) -> None:
        self.closing = True
        os.eventfd_write(self.wake_fd, 1)

    def ready_count(self) -> int:
        return sum(w.ready for w in self.workers.values())

    def set_hosts(self, controls: list[str]) -> None:
        """From the DNS resolver thread: the control endpoints the name resolves to now."""
        self._host_updates.append(controls)
        os.eventfd_write(self.wake_fd, 1)

    def host_states(self) -> dict[str, dict[str, Any]]:
        """label -> {"state": "up", "retired" or why it is lost, "sent": requests sent to its workers}
        (a snapshot; read from any thread)."""
        return {
            h.label: {
                "state": "retired" if h.retired else h.lost or "up",
                "sent": sum(self.workers[w].sent for w in list(h.workers)),
            }
            for h in list(self.hosts.values())
        }

    # --- hosts ------------------------------------------------------------------------------------

    @staticmethod
    def label_of(control: str) -> str:
        return control.split("://", 1)[-1]

    def _add_host(self, control: str) -> _Host:
        h = self.hosts[control] = _Host(self.label_of(control), control)
        return h

    def _wid(self, h: _Host, wid: str) -> str:
        return f"{h.label}/{wid}" if self.multi else wid

    def _adopt(self, h: _Host, info: dict) -> None:
        """A host's `endpoints` answer: its events endpoint and liveness facts, and its workers (new ones
        created, ready ones connected). Called at start and when a lost host answers again."""
        h.lost = None
        h.last_event = time.monotonic()
        h.pid = info.get("pid")
        h.beat_s = info.get("beat_s")
        events = reachable(info.get("events") or "", h.control) or None
        if events != h.events or h.sub is None:
            self._close_sub(h)
            h.events = events
            if events:
                sub = h.sub = self.ctx.socket(zmq.SUB)
                sub.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
                if self.curve is not None:
                    self.curve.apply(sub)
                if not h.local:
                    # A host whose process died drops its TCP connections at once (the kernel closes them):
                    # hearing of it now beats waiting out the heartbeat silence.
                    h.monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                    self.poller.register(h.monitor, zmq.POLLIN)
                sub.connect(events)
                self.poller.register(sub, zmq.POLLIN)
                h.fresh = True
        for d in info.get("workers", []):
            wid = self._wid(h, d["id"])
            endpoint = reachable(d["endpoint"], h.control)
            w = self.workers.get(wid)
            if w is None:
                w = self.workers[wid] = _Worker(wid, endpoint)
                h.workers.add(wid)
            if d.get("state") == "ready" and w.sock is None and not h.retired:
                w.endpoint = endpoint
                self._connect(w)

    def _close_sub(self, h: _Host) -> None:
        if h.monitor is not None:
            self.poller.unregister(h.monitor)
            h.sub.disable_monitor()  # type: ignore[union-attr]
            h.monitor.close(0)
            h.monitor = None
        if h.sub is not None:
            self.poller.unregister(h.sub)
            h.sub.close(0)
            h.sub = None

    def _update_lost(self) -> None:
        usable = [h for h in self.hosts.values() if not h.lost and not h.retired]
        if usable:
            self.lost = None
        elif len(self.hosts) == 1:
            self.lost = next(iter(self.hosts.values())).lost
        else:
            reasons = "; ".join(f"{h.label}: {h.lost or 'retired'}" for h in self.hosts.values())
            self.lost = f"none of the {len(self.hosts)} orchestrators is usable ({reasons})"

    def _apply_hosts(self, controls: list[str]) -> None:
        """A new host set from DNS: new hosts are discovered through their control sockets; hosts no longer
        listed are retired (no new work); a listed retired host comes back."""
        wanted = set(controls)
        for control in controls:
            h = self.hosts.get(control)
            if h is None:
                h = self._add_host(control)
                h.lost = "being discovered"
                log.info("orchestrator host %s appeared", h.label)
            elif h.retired:
                h.retired = False
                for wid in h.workers:
                    w = self.workers[wid]
                    if w.sock is not None:
                        w.ready = True
        for control, h in self.hosts.items():
            if control not in wanted and not h.retired:
                h.retired = True
                log.info("orchestrator host %s is no longer listed: no new work for it", h.label)
                for wid in h.workers:
                    self.workers[wid].ready = False
        self._update_lost()

    # --- I/O thread -----------------------------------------------------------------------------

    def _connect(self, w: _Worker) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, 0)  # our own in-flight bound is the flow control, not ZeroMQ's
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(w.endpoint)
        w.sock = sock
        w.ready = True
        self.poller.register(sock, zmq.POLLIN)

    def _disconnect(self, w: _Worker) -> None:
        if w.sock is not None:
            self.poller.unregister(w.sock)
            w.sock.close(0)  # drops anything still queued for the dead worker: we retry or fail it
            w.sock = None
        w.ready = False

    def pick(self, tried: set[str]) -> _Worker | None:
        """The ready worker with the least outstanding work, avoiding those already tried when possible.
        Called from the I/O thread and from blocking callers: it only reads."""
        if self.lost:
            return None
        ws = list(self.workers.values())
        k = next(self._rotation) % len(ws)  # rotate the start so ties spread round-robin
        ready = [w for w in ws[k:] + ws[:k] if w.ready]
        # A worker whose oldest request has waited far longer than requests usually take is frozen or
        # stuck (SIGSTOP, a hung device): send it nothing new while others can serve. The requests already
        # there wait for it to resume or to be declared dead and fail over.
        limit = time.monotonic() - max(_SUSPECT_MIN_S, _SUSPECT_FACTOR * self.latency_s)
        healthy = [w for w in ready if (t := w.oldest()) is None or t > limit] or ready
        candidates = [w for w in healthy if w.id not in tried] or healthy
        return min(candidates, key=lambda w: w.load, default=None)

    def retryable(self, code: int, w: _Worker) -> bool:
        """The one retry rule of both request paths: a worker that is stopping (SHUTTING_DOWN) hands the
        request on, when another worker is ready to take it and failover is on."""
        return (
            self.failover
            and code in _RETRYABLE
            and any(x.ready and x.id != w.id for x in self.workers.values())
        )

    def note_latency(self, seconds: float) -> None:
        """A request's round trip, for the frozen-worker threshold (an EWMA; races only blur it)."""
        self.latency_s += 0.05 * (seconds - self.latency_s)

    def _dispatch(self, p: Pending) -> None:
        if p.future.done():  # cancelled by the user
            if p.lease is not None:
                p.lease.settle(p.request_id)
            return
        if p.lease is not None:
            w = self.workers.get(p.target)  # type: ignore[arg-type]
            if p.attempts == 0 and w is not None and w.ready and not p.lease.dropped:
                self._send(p, w)
                return
            # Its worker is gone (or this is a retry): the spans are void; fail over as frames.
            p.lease.settle(p.request_id)
            p.lease = None
            try:
                self.check_size(p.tensors)
            except BatchTooLargeError as exc:
                p.future.set_exception(exc)
                return
            p.frames = protocol.encode_request(p.request_id, p.tensors, p.timeout_ms)
        w = self.pick(p.tried)
        if w is None:
            p.future.set_exception(UnavailableError(self.lost or "no ready worker to send the request to"))
            return
        self._send(p, w)

    def _dispatch_all(self) -> None:
        """Send every submission; shared-memory requests for the same worker that arrived together go in one
        message (Kind.INFER_MANY): one receive and one header decode on the worker for all of them."""
        groups: dict[str, list[Pending]] = {}
        while self.submissions:
            p = self.submissions.popleft()
            if p.entry is not None and p.attempts == 0 and not p.future.done() and not p.lease.dropped:
                w = self.workers.get(p.target)  # type: ignore[arg-type]
                if w is not None and w.ready:
                    groups.setdefault(w.id, []).append(p)
                    continue
            self._dispatch(p)
        for wid, group in groups.items():
            w = self.workers[wid]
            for i in range(0, len(group), _MANY_PER_MESSAGE):
                self._send_many(w, group[i : i + _MANY_PER_MESSAGE])

    def _send_many(self, w: _Worker, ps: list[Pending]) -> None:
        if len(ps) == 1:
            self._send(ps[0], w)
            return
        now = time.monotonic()
        w.sent += len(ps)
        for p in ps:
            p.sent_at = now
            p.attempts += 1
            p.worker = w.id
            p.tried.add(w.id)
            w.outstanding[p.request_id] = p
        entries = [p.entry for p in ps if p.entry is not None]  # every one of them has an entry
        lease = ps[0].lease
        assert lease is not None
        frames = protocol.encode_shm_many(entries, lease.lease_id, max(p.timeout_ms for p in ps))
        w.sock.send_multipart(frames, copy=False)  # type: ignore[union-attr]

    def _send(self, p: Pending, w: _Worker) -> None:
        p.sent_at = time.monotonic()
        p.attempts += 1
        p.worker = w.id
        p.tried.add(w.id)
        w.outstanding[p.request_id] = p
        w.sent += 1
        w.sock.send_multipart(p.frames, copy=False)  # type: ignore[union-attr]

    def _retry_or_fail(self, p: Pending, exc: Exception) -> None:
        if p.future.done():
            return
        if (
            self.failover
            and p.attempts <= self.max_retries
            and time.monotonic() < p.deadline
            and self.ready_count()
        ):
            self._dispatch(p)
        else:
            p.future.set_exception(exc)

    def _on_reply(self, w: _Worker) -> None:
        sock = w.sock
        if sock is None:
            return
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            found: list[Pending] = []

            def shm_of(rid: Any, w: _Worker = w, found: list = found) -> tuple | None:
                p = w.outstanding.pop(rid, None) if isinstance(rid, int) else None
                if p is not None:
                    found.append(p)
                    if p.lease is not None:
                        return p.lease, p.out_off
                return None

            try:
                reply = protocol.decode_reply(frames, shm_of)
            except Exception as exc:  # a corrupt reply fails only its request, if we can tell which
                log.warning("unreadable reply from %s: %s", w.id, exc)
                if found:
                    self._fail_unreadable(found[0], exc)
                continue
            rid = reply.request_id
            if rid == 0 and reply.code == ErrorCode.OK and isinstance(reply.message, list):
                self._on_completions(w, reply.message)
                continue
            p = found[0] if found else None
            lease = p.lease if p is not None else None
            if p is None:
                self.stray_replies += 1  # e.g. a late reply for a request already failed over
                late = w.abandoned.pop(rid, None)
                if late is not None:
                    late.settle(rid)  # the worker is done with its spans at last
                continue
            if lease is not None:
                lease.settle(rid, keep=p.out_off if reply.code == ErrorCode.OK else None)
            if p.future.done():
                continue
            if reply.code == ErrorCode.OK:
                self.note_latency(time.monotonic() - p.sent_at)
                p.future.set_result(self.finish(reply.tensors))
            elif self.retryable(reply.code, w):
                self._retry_or_fail(p, error_from_code(reply.code, reply.message))
            else:
                p.future.set_exception(error_from_code(reply.code, reply.message))

    def _on_completions(self, w: _Worker, done: list) -> None:
        """A combined reply to INFER_MANY requests: [[id, rows], ...], each one's outputs in its span."""
        for item in done:
            try:
                rid, rows = item
                p = w.outstanding.pop(rid, None)
            except (TypeError, ValueError):
                log.warning("unreadable completion from %s: %r", w.id, item)
                continue
            if p is None or p.lease is None:
                self.stray_replies += 1
                late = w.abandoned.pop(rid, None) if isinstance(rid, int) else None
                if late is not None:
                    late.settle(rid)
                continue
            try:
                tensors = protocol.shm_outputs(self.out_specs_for(rows), p.lease, p.out_off)
            except Exception as exc:  # a malformed completion fails only its request
                self._fail_unreadable(p, exc)
                continue
            p.lease.settle(rid, keep=p.out_off)
            self.note_latency(time.monotonic() - p.sent_at)
            if not p.future.done():
                p.future.set_result(self.finish(tensors))

    def out_specs_for(self, rows: int) -> list:
        """[[name, dtype, [rows, *item_shape]], ...] of the model's outputs (cached per row count)."""
        specs = self._out_specs_cache.get(rows)
        if specs is None:
            specs = self._out_specs_cache[rows] = [[n, d, [rows, *shape]] for n, d, shape in self.out_specs]
        return specs

    @staticmethod
    def _fail_unreadable(p: Pending, exc: Exception) -> None:
        if p.lease is not None:
            p.lease.settle(p.request_id)
        if not p.future.done():
            p.future.set_exception(exc)

    def _on_event(self, h: _Host) -> None:
        for _ in range(100):
            try:
                topic, payload = h.sub.recv_multipart(zmq.NOBLOCK)  # type: ignore[union-attr]
            except zmq.Again:
                return
            except ValueError:
                continue
            h.last_event = now = time.monotonic()
            if h.fresh:  # the subscription took: an answer to a question asked from now on misses nothing
                h.fresh = False
                if h.lost or any(self.workers[wid].sock is None for wid in h.workers):
                    self._ask_endpoints(h, now)
            try:
                msg = messages.EVENTS.decode(payload)
            except messages.MessageError as exc:
                h.refused += 1
                (log.warning if h.refused == 1 else log.debug)("events from %s refused: %s", h.control, exc)
                continue
            if not isinstance(msg, messages.WorkerEvent):  # the supervisor's heartbeat, or "stopping"
                continue
            if h.rediscover is not None:  # the answer in flight may predate this change
                h.resync = True
            if h.lost:  # a host coming back is re-read through its control socket, not from events
                continue
            w = self.workers.get(self._wid(h, msg.id))
            if w is None:
                continue
            state = msg.state
            if state == messages.WorkerState.READY and not w.ready and not h.retired:
                if w.sock is not None:  # it was draining: the same socket serves again
                    w.ready = True
                else:
                    w.endpoint = reachable(msg.endpoint or w.endpoint, h.control)
                    self._connect(w)
            elif state in (messages.WorkerState.FAILED, messages.WorkerState.STOPPED) and w.sock is not None:
                # A stopping worker answers everything it accepted before it says "stopped", and those
                # replies usually travel ahead of this event (which goes through the supervisor): take
                # them first. One still in transit is answered ShuttingDownError (or retried elsewhere),
                # as the worker itself would have: a clean stop never reads as a dead worker.
                self._on_reply(w)
                w.stopped_cleanly = state == messages.WorkerState.STOPPED
                self._worker_gone(
                    w,
                    lambda wid, st=state, clean=w.stopped_cleanly: (
                        ShuttingDownError(f"worker {wid} stopped before answering this request")
                        if clean
                        else WorkerDeadError(
                            f"worker {wid} {st} with this request in flight and no retry was possible"
                        )
                    ),
                )
            elif state == messages.WorkerState.DRAINING:
                w.ready = False  # stop sending new work there; replies still arrive

    def _on_disconnect(self, h: _Host) -> None:
        """The events connection to a remote host dropped: its supervisor died (or the network did). Lost
        now; if it is still there, it answers the rediscovery within a second and serves again."""
        dropped = False
        monitor = h.monitor
        assert monitor is not None
        while True:
            try:
                monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            dropped = True
        if dropped and not h.lost:
            self._lose(h, f"the connection to the orchestrator at {h.label} dropped")

    def _worker_gone(self, w: _Worker, error: Any) -> None:
        """A worker died, stopped, or went with its host: drop its socket and lease; its requests fail over
        (or fail with error(worker id) when they cannot)."""
        w.generation += 1
        self._disconnect(w)
        w.abandoned.clear()  # its arena is gone with it; the client drops that lease
        if self.on_worker_lost is not None:
            self.on_worker_lost(w.id)
        lost = list(w.outstanding.values())
        w.outstanding.clear()
        for p in lost:
            self._retry_or_fail(p, error(w.id))

    def _expire(self, now: float) -> float:
        """Fail requests past their deadline; return the next deadline."""
        nearest = now + 1.0
        for w in self.workers.values():
            expired = [p for p in w.outstanding.values() if p.deadline <= now]
            for p in expired:
                del w.outstanding[p.request_id]
                if p.lease is not None:  # the worker may still use the spans: keep them until it answers
                    w.abandoned[p.request_id] = p.lease
                if not p.future.done():
                    p.future.set_exception(
                        DeadlineExceededError(f"no reply from {w.id} within {p.timeout_ms / 1000:g}s")
                    )
            for p in w.outstanding.values():
                nearest = min(nearest, p.deadline)
        return nearest

    def run(self) -> None:
        self.poller.register(self.wake_fd, zmq.POLLIN)
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        next_check = time.monotonic()
        timeout = 100
        while not self.closing:
            events = dict(self.poller.poll(timeout))
            if self.wake_fd in events:
                try:
                    os.eventfd_read(self.wake_fd)
                except BlockingIOError:
                    pass
            while self._host_updates:
                self._apply_hosts(self._host_updates.popleft())
            if self.submissions:
                self._dispatch_all()
            for w in list(self.workers.values()):
                if w.sock is not None and w.sock in events:
                    self._on_reply(w)
            now = time.monotonic()
            for h in list(self.hosts.values()):
                if h.sub is not None and h.sub in events:
                    self._on_event(h)
                if h.monitor is not None and h.monitor in events:
                    self._on_disconnect(h)
                if h.rediscover is not None and h.rediscover in events:
                    self._on_rediscovered(h)
                if h.asking:
                    self._rediscover_tick(h, now)
                if h.lost is None and h.beat_s and now - h.last_event > max(4 * h.beat_s, 1.0):
                    self._check_supervisor(h, now)
            if now >= next_check:
                next_check = self._expire(now)
            beats = [h.beat_s for h in self.hosts.values() if h.beat_s]
            if beats:
                next_check = min(next_check, now + min(beats))
            if any(h.asking for h in self.hosts.values()):
                next_check = min(next_check, now + 0.25)  # rediscovery ticks
            timeout = max(1, int((next_check - time.monotonic()) * 1000) + 1)

    # --- supervisor liveness ----------------------------------------------------------------------

    @staticmethod
    def _supervisor_gone(h: _Host, silence: float) -> bool:
        if h.local and h.pid:
            return not _process_alive(h.pid)
        return silence > _REMOTE_SILENCE_S

    def _check_supervisor(self, h: _Host, now: float) -> None:
        silence = now - h.last_event
        if self._supervisor_gone(h, silence):
            where = f" at {h.label}" if self.multi else ""
            why = (
                f"the orchestrator's supervisor (pid {h.pid}) is gone"
                if h.local
                else f"the orchestrator{where} sent no heartbeat for {silence:.1f}s"
            )
            self._lose(h, f"{why}; its workers exit with it")

    def _rediscover_tick(self, h: _Host, now: float) -> None:
        """While a host is lost, ask its control socket for endpoints once a second; a question that is not
        answered within a second is asked again (also for a host that is not lost, see `_Host.resync`)."""
        if h.rediscover is not None:
            if now >= h.rediscover_at:  # nobody answered within a second: ask again
                self._close_rediscover(h)
                h.resync = h.resync or not h.lost
        elif h.resync or (h.lost and now >= h.rediscover_at):
            self._ask_endpoints(h, now)

    def _ask_endpoints(self, h: _Host, now: float) -> None:
        """Send `endpoints` to a host's control socket; with a question already in flight, whose answer may
        predate what we just learnt, ask again once it is answered."""
        if h.rediscover is not None:
            h.resync = True
            return
        h.resync = False
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(h.control)
        sock.send(messages.encode(messages.ControlRequest(id=1, cmd="endpoints")))
        self.poller.register(sock, zmq.POLLIN)
        h.rediscover, h.rediscover_at = sock, now + 1.0

    def _close_rediscover(self, h: _Host) -> None:
        if h.rediscover is not None:
            self.poller.unregister(h.rediscover)
            h.rediscover.close(0)
            h.rediscover = None

    def _on_rediscovered(self, h: _Host) -> None:
        """An orchestrator answers on a lost host's control socket (restarted, or reached at last)."""
        try:
            reply = messages.CONTROL_REPLIES.decode(h.rediscover.recv(zmq.NOBLOCK))  # type: ignore[union-attr]
            info = reply.data
            if not isinstance(info.get("workers"), list):
                raise ValueError("no workers")
        except Exception:  # not an answer we can use: ask again later
            return
        finally:
            self._close_rediscover(h)
        was_lost = h.lost
        self._adopt(h, info)
        self._update_lost()
        if was_lost:
            log.info("orchestrator at %s answers: connected", h.control)

    def _lose(self, h: _Host, reason: str) -> None:
        """A host's supervisor is gone: its requests fail over to other hosts now (or fail, when there is
        none) rather than at each deadline."""
        h.lost = reason
        h.rediscover_at = time.monotonic() + 1.0
        h.fresh = True  # its SUB reconnects by itself: the first event after this one tells it took
        self._update_lost()
        for wid in h.workers:
            w = self.workers[wid]
            if w.sock is not None:
                self._worker_gone(w, lambda _wid, r=reason: UnavailableError(r))
        log.warning("%s", reason)

    def _shutdown(self) -> None:
        err = ShuttingDownError("client closed")
        for h in self.hosts.values():
            self._close_rediscover(h)  # every socket of the context must be closed, or Context.term() waits
            self._close_sub(h)
        for w in self.workers.values():
            for p in w.outstanding.values():
                if not p.future.done():
                    p.future.set_exception(err)
            if w.sock is not None:
                w.sock.close(0)
        while self.submissions:
            p = self.submissions.popleft()
            if not p.future.done():
                p.future.set_exception(err)
        os.close(self.wake_fd)

    def new_pending(self, tensors: Mapping[str, Any], timeout_s: float, encode: Any = None) -> Pending:
        """A request ready to dispatch. `encode(rid, timeout_ms, deadline)`, when given, lays it out in a
        shared-memory lease and returns (frames, lease, out_off, worker id); None means send frames."""
        rid = next(self.ids)
        timeout_ms = max(1, int(timeout_s * 1000))
        deadline = time.monotonic() + timeout_s
        shm = encode(rid, timeout_ms, deadline) if encode is not None else None
        if shm is not None:
            frames, lease, out_off, entry, target = shm
            return Pending(
                rid,
                frames,
                Future(),
                deadline,
                timeout_ms,
                lease=lease,
                out_off=out_off,
                target=target,
                tensors=tensors,
                entry=entry,
            )
        self.check_size(tensors)
        frames = protocol.encode_request(rid, tensors, timeout_ms)
        return Pending(rid, frames, Future(), deadline, timeout_ms)

    def check_size(self, tensors: Any) -> None:
        """Refuse at once a request whose frames would exceed the message limit: ZeroMQ would drop the
        connection (failing the other requests on it) and the caller would wait out its deadline."""
        total = sum(getattr(a, "nbytes", 0) for a in tensors.values()) + 1024  # + the header, generously
        if total > self.max_message_bytes:
            raise BatchTooLargeError(
                f"request of {total:,} B exceeds the {self.max_message_bytes:,} B message limit "
                "(transport.max_message_bytes on the orchestrator, Client(max_message_bytes=...)); split the batch"
            )
