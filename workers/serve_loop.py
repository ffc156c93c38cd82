"""The worker's serving loop: receive and validate requests, drive the pipeline, send replies, heartbeat.

Runs on the worker process's main (serving) thread, which owns the data ROUTER and supervisor PUSH
sockets. Requests arriving while the device is busy queue up and are coalesced into the next batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np
import zmq

from orchestrator.common import messages, protocol
from orchestrator.common.config import Config
from orchestrator.common.errors import (
    BatchTooLargeError,
    EngineError,
    ErrorCode,
    InvalidInputError,
    OrchestratorError,
    RequestError,
)
from orchestrator.common.protocol import Kind
from orchestrator.common.security import secure_server, stop_authenticator
from orchestrator.common.shapes import is_dynamic
from workers import cupti_journal
from workers.arena import Arena
from workers.driver_journal import JOURNAL
from workers.engines.base import Engine, Slot
from workers.gc_journal import GcJournal
from workers.pipeline import Batch, Pipeline, Request, ShmSpans
from workers.telemetry import WorkerTelemetry

log = logging.getLogger(__name__)

_RECV_BURST = 256  # messages drained per poll wake-up before the pipeline gets a turn
_MAX_MANY = 4096  # requests in one INFER_MANY message (the client sends at most 256)
_FEED_EVERY = 4  # GPU workers: give the pipeline a turn after this many when it can use one


class CompletionWaiter:
    """Waits on the oldest in-flight batch on a helper thread (GIL released in engine.wait) and wakes the
    serving thread through an eventfd it polls. Used only when sync = "blocking" and batches finish
    asynchronously, so the serving thread can keep receiving while the device works."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cv = threading.Condition()
        self._target: Slot | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="completion-waiter", daemon=True)
        self._thread.start()

    def arm(self, slot: Slot) -> None:
        with self._cv:
            if self._target is not slot:
                self._target = slot
                self._cv.notify()

    def consume(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._target is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                slot = self._target
            assert slot is not None
            self.engine.wait(slot)
            with self._cv:
                if self._target is slot:
                    self._target = None
            os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()


class ServeLoop:
    """Owns the data socket and the pipeline of one worker."""

    def __init__(
        self, spec: messages.WorkerSpec, cfg: Config, engine: Engine, ctx: zmq.Context, sup: zmq.Socket
    ) -> None:
        self.id = spec.id
        self.pid = os.getpid()  # in every message to the supervisor (which ignores an earlier process's)
        self.spec = spec
        self.cfg = cfg
        self.engine = engine
        self.sup = sup
        self.ctx = ctx
        # Constructed on the serving thread: its probe reads this thread's scheduler counters.
        self.collections = GcJournal()
        self.telemetry = WorkerTelemetry(
            self.id, cfg.monitor, JOURNAL, cfg.pipeline.sync, collections=self.collections
        )
        self.arena = self._make_arena(spec, cfg, engine)
        self.pipeline = Pipeline(
            engine,
            cfg.pipeline.depth,
            cfg.pipeline.max_queue,
            cfg.pipeline.max_queue_delay_us,
            cfg.buckets,
            probe=self.telemetry.probe,
            arena=self.arena,
        )
        engine.warmup(self.pipeline.slots, self.pipeline.buckets)
        # Bytes per row of each input (0 where a dynamic dimension makes it depend on the request).
        self._in_row_bytes = [
            0
            if is_dynamic(s.item_shape)
            else int(np.prod([int(d) for d in s.item_shape], dtype=np.int64)) * s.dtype.itemsize
            for s in engine.inputs
        ]
        self._out_specs = [(s.name, s.dtype, s.item_shape) for s in engine.outputs]
        self._in_row_total = sum(self._in_row_bytes)
        # (rows, dynamic sizes) -> output offsets and bytes in a span
        self._out_layouts: dict[tuple[int, tuple[int, ...]], tuple[list[int], int]] = {}
        # Reply headers of shared-memory requests: the msgpack of [VERSION, OK, id, specs] with the specs
        # for each row count packed once (only the request id differs).
        self._shm_heads: dict[tuple[int, tuple[int, ...]], bytes] = {}
        self.data = ctx.socket(zmq.ROUTER)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.setsockopt(zmq.MAXMSGSIZE, cfg.transport.max_message_bytes)
        self.data.setsockopt(zmq.RCVHWM, 100_000)
        self.data.setsockopt(zmq.SNDHWM, 100_000)
        self.endpoint = self._bind(spec.endpoint)
        self.spin = cfg.pipeline.sync == "spin"
        self.waiter: CompletionWaiter | None = None
        self.dropped = 0  # messages with no usable reply address
        # Serving-thread time spent working (receive, stage + launch, reply + account), excluding waits and
        # spinning: the "host time per batch" of the benchmarks is its increase over the batches served.
        self.host_ns = 0
        self.errors_by_code: dict[int, int] = {}
        self.draining = False
        self.hang = False  # debug.inject = hang_after reached: stop making progress, keep heartbeats
        self.hang_armed = cfg.debug.inject == "hang_after" and cfg.debug.applies_to(self.id)
        engine.mark_ready()
        # Last before READY: what start-up built is frozen out of every later collection's walk.
        self.collections.freeze()
        self.collections.start()
        log.info("[ready] gc: %s", self.collections.describe())
        self._send_ready()

    @staticmethod
    def _make_arena(spec: messages.WorkerSpec, cfg: Config, engine: Engine) -> Arena | None:
        """The shared-memory arena (transport.shm_mb), registered with the GPU before warm-up and READY."""
        t = cfg.transport
        if not t.shm_mb:
            return None
        arena = Arena(spec.run_path(cfg.run_dir), spec.id, t.shm_mb, t.shm_max_lease_mb)
        try:
            arena.registered = engine.attach_arena(arena.addr, arena.size)
        except EngineError as exc:
            arena.close()
            raise EngineError(
                f"cannot register the {t.shm_mb} MiB shared-memory arena as pinned memory: {exc} "
                "(lower transport.shm_mb, or 0 to turn shared memory off)"
            ) from None
        return arena

    def _bind(self, endpoint: str) -> str:
        if self.cfg.transport.kind == "tcp":
            secure_server(self.ctx, self.data, self.cfg.transport)  # no-op unless curve = true
        self.data.bind(endpoint)
        return self.data.getsockopt_string(zmq.LAST_ENDPOINT)

    def _send_ready(self) -> None:
        eng = self.engine
        msg = messages.Ready(
            id=self.id,
            pid=self.pid,
            endpoint=self.endpoint,
            engine=eng.describe(),
            inputs=[(s.name, s.dtype.str, list(s.item_shape)) for s in eng.inputs],
            outputs=[(s.name, s.dtype.str, list(s.item_shape)) for s in eng.outputs],
            max_batch=eng.max_batch,
            dims=[(d.name, d.lo, d.hi, list(d.buckets)) for d in eng.dims],
            buckets=list(self.pipeline.buckets),
            depth=self.pipeline.depth,
            cpu_affinity=sorted(os.sched_getaffinity(0)),
        )
        self.sup.send(messages.encode(msg))

    # --- receive --------------------------------------------------------------------------------

    def _reply_error(self, identity: Any, request_id: int | None, code: ErrorCode, message: str) -> None:
        self.errors_by_code[int(code)] = self.errors_by_code.get(int(code), 0) + 1
        self.telemetry.note_failure(int(code))
        self.data.send_multipart([identity, *protocol.encode_error(request_id, code, message)])

    def _receive(self) -> None:
        data = self.data
        pipeline = self.pipeline
        feed = not self.engine.synchronous
        start, base = time.monotonic_ns(), self.host_ns
        for n in range(_RECV_BURST):
            # Draining many requests per wake-up amortises the poll and lets the saturated loop run
            # complete/launch back to back, but a long burst (~10 us per request) must not outlast the work
            # queued on an asynchronous device. So GPU workers drain at most _FEED_EVERY requests while a
            # launch is due (pipeline.should_launch: the device would idle, the batch is full, or the oldest
            # request has waited max_queue_delay_us) or the oldest batch has finished (measured on an H200,
            # 128 KiB batches: draining everything left 110 us batches 86% of the bare limit; returning
            # after every request cost 20-35 us of host time per batch on 30 us batches). While another
            # batch runs and the next is not yet due, they keep draining, so the next batch grows: breaking
            # whenever a slot was free capped bert-tiny's batches at _FEED_EVERY requests (64 of 256 rows)
            # while the GPU needed 400 us for them. CPU engines always drain, to coalesce.
            if (
                feed
                and n
                and n % _FEED_EVERY == 0
                and (pipeline.oldest_done() or pipeline.should_launch(time.monotonic_ns()))
            ):
                break
            # Check readiness first: a NOBLOCK recv that raises zmq.Again costs several microseconds.
            if not data.get(zmq.EVENTS) & zmq.POLLIN:
                break
            frames = data.recv_multipart(copy=False)
            now = time.monotonic_ns()
            if len(frames) < 2:
                self.dropped += 1  # identity only: nothing to answer
                continue
            identity = frames[0]
            shm = None
            try:
                header = protocol.decode_request_header(frames[1].buffer)
                if header.kind == Kind.INFER_MANY:
                    self._receive_many(identity, header, len(frames), now)
                    continue
                if header.kind != Kind.INFER:
                    self._lease_message(identity, header, len(frames))
                    continue
                if header.shm is None:
                    tensors = protocol.decode_tensors(header, frames[2:])
                    rows = pipeline.check(tensors)
                else:
                    tensors = None
                    if len(frames) != 2:
                        raise InvalidInputError("a shared-memory request carries no tensor frames")
                    rows = pipeline.check_specs(header.specs)
                    shm = self._shm_spans(header, rows, pipeline.bound)
            except protocol.DecodeError as exc:
                self._reply_error(identity, exc.request_id, exc.code, str(exc))
                continue
            except RequestError as exc:
                self._reply_error(identity, header.request_id, exc.code, str(exc))
                continue
            if self.draining:
                self._reply_error(identity, header.request_id, ErrorCode.SHUTTING_DOWN, "worker is stopping")
                continue
            deadline = now + header.timeout_ms * 1_000_000 if header.timeout_ms else 0
            req = Request(identity, header.request_id, tensors, rows, now, deadline, frames, shm)
            if pipeline.dims:
                req.dims = pipeline.bound
                req.key = pipeline.key_of(req.dims)
            if not pipeline.offer(req):
                self._reply_error(
                    identity,
                    header.request_id,
                    ErrorCode.OVERLOADED,
                    f"worker queue full ({pipeline.max_queue} requests)",
                )
            elif shm is not None:
                self.arena.begin(shm.lease)  # type: ignore[union-attr]
        self.host_ns = base + (time.monotonic_ns() - start)  # serving-thread work: the whole burst

    # --- shared memory ----------------------------------------------------------------------------

    def _shm_spans(self, header: protocol.RequestHeader, rows: int, dims: tuple[int, ...]) -> ShmSpans:
        """Resolve a checked shared-memory request's spans against its lease (RequestError if any lies
        outside it). Inputs come in header order; ShmSpans lists them in the engine's order."""
        arena = self.arena
        if arena is None:
            raise InvalidInputError("shared memory is off on this worker (transport.shm_mb = 0): send frames")
        shm = header.shm
        if len(shm) != 2:  # type: ignore[arg-type]
            raise InvalidInputError("a shared-memory request names [lease, output offset]")
        lease = arena.lease_for(shm[0])  # type: ignore[index]
        span = arena.span
        offsets = header.offsets
        if self.pipeline.dims:  # bytes per row depend on the request's sizes of the dynamic dimensions
            given = {name: off for (name, _, _), off in zip(header.specs, offsets, strict=True)}  # type: ignore[arg-type]
            row_bytes = self.pipeline.input_row_bytes(dims)
            ins = [
                span(lease, given[s.name], rows * rb, s.name)
                for s, rb in zip(self.engine.inputs, row_bytes, strict=True)
            ]
            return self._spans(lease, ins, shm[1], rows, dims)  # type: ignore[index]
        if len(self._in_row_bytes) == 1:  # one input: check_specs made sure it is the model's
            ins = [span(lease, offsets[0], rows * self._in_row_bytes[0], self.engine.inputs[0].name)]  # type: ignore[index]
        else:
            given = {name: off for (name, _, _), off in zip(header.specs, offsets, strict=True)}  # type: ignore[arg-type]
            ins = [
                span(lease, given[s.name], rows * rb, s.name)
                for s, rb in zip(self.engine.inputs, self._in_row_bytes, strict=True)
            ]
        return self._spans(lease, ins, shm[1], rows)  # type: ignore[index]

    def _spans(self, lease: Any, ins: list[int], out: Any, rows: int, dims: tuple[int, ...] = ()) -> ShmSpans:
        """ShmSpans for checked input spans and the outputs laid out from lease offset `out` (checked here)."""
        layout = self._out_layouts.get((rows, dims))
        if layout is None:
            layout = self._out_layouts[(rows, dims)] = protocol.shm_layout(self._out_shapes(rows, dims))
        offs, total = layout
        start = self.arena.span(lease, out, total, "outputs")  # type: ignore[union-attr]
        in_bytes = rows * (sum(self.pipeline.input_row_bytes(dims)) if dims else self._in_row_total)
        return ShmSpans(lease, ins, [start + o for o in offs], in_bytes + total)

    def _out_shapes(self, rows: int, dims: tuple[int, ...]) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """The outputs' (name, dtype, full shape) for a request of `rows` rows and dynamic sizes `dims`."""
        if not dims:
            return [(n, d, (rows, *(int(x) for x in shape))) for n, d, shape in self._out_specs]
        return [(s.name, s.dtype, (rows, *self.pipeline.item_shape(s, dims))) for s in self.engine.outputs]

    def _receive_many(self, identity: Any, header: protocol.RequestHeader, nframes: int, now: int) -> None:
        """Several shared-memory requests in one message (Kind.INFER_MANY), each with the model's own dtypes
        and item shapes: each becomes its own Request, checked and answered on its own."""
        arena, pipeline = self.arena, self.pipeline
        entries = header.shm[1] if header.shm is not None and len(header.shm) == 2 else None
        if not isinstance(entries, list) or len(entries) > _MAX_MANY:
            self._reply_error(identity, None, ErrorCode.BAD_HEADER, "INFER_MANY needs [lease, [entries]]")
            return
        try:
            if nframes != 2:
                raise InvalidInputError("shared-memory requests carry no tensor frames")
            if pipeline.dims:
                raise InvalidInputError(
                    "INFER_MANY carries no shapes, and this model has dynamic dimensions: "
                    "send each request on its own"
                )
            if arena is None:
                raise InvalidInputError(
                    "shared memory is off on this worker (transport.shm_mb = 0): send frames"
                )
            lease = arena.lease_for(header.shm[0])  # type: ignore[index]
        except RequestError as exc:
            for e in entries:
                if isinstance(e, list) and e and e[0].__class__ is int:
                    self._reply_error(identity, e[0], exc.code, str(exc))
            return
        span, n_in = arena.span, len(self._in_row_bytes)
        deadline = now + header.timeout_ms * 1_000_000 if header.timeout_ms else 0
        max_batch = self.engine.max_batch
        for e in entries:
            if not (isinstance(e, list) and len(e) == 4 and e[0].__class__ is int and 0 <= e[0] < 1 << 63):
                self.dropped += 1  # no usable request id: nothing to answer
                continue
            rid, rows, ins, out = e
            try:
                if rows.__class__ is not int or rows < 1:
                    raise InvalidInputError(f"rows must be a positive integer, got {rows!r}")
                if rows > max_batch:
                    raise BatchTooLargeError(
                        f"batch of {rows} rows exceeds the model's max batch {max_batch}"
                    )
                if not isinstance(ins, list) or len(ins) != n_in:
                    raise InvalidInputError(f"expected {n_in} input offset(s)")
                in_offs = [
                    span(lease, o, rows * rb, s.name)
                    for o, rb, s in zip(ins, self._in_row_bytes, self.engine.inputs, strict=True)
                ]
                shm = self._spans(lease, in_offs, out, rows)
            except RequestError as exc:
                self._reply_error(identity, rid, exc.code, str(exc))
                continue
            if self.draining:
                self._reply_error(identity, rid, ErrorCode.SHUTTING_DOWN, "worker is stopping")
                continue
            req = Request(identity, rid, None, rows, now, deadline, None, shm)
            req.many = True
            if not pipeline.offer(req):
                self._reply_error(
                    identity, rid, ErrorCode.OVERLOADED, f"worker queue full ({pipeline.max_queue} requests)"
                )
            else:
                arena.begin(lease)

    def _lease_message(self, identity: Any, header: protocol.RequestHeader, nframes: int) -> None:
        """ATTACH (a new lease for a local client) or DETACH (end one)."""
        arena, rid = self.arena, header.request_id
        try:
            if nframes != 2:
                raise InvalidInputError("attach and detach carry no tensor frames")
            if arena is None:
                raise InvalidInputError("shared memory is off on this worker (transport.shm_mb = 0)")
            if header.kind == Kind.ATTACH:
                if self.draining:
                    self._reply_error(identity, rid, ErrorCode.SHUTTING_DOWN, "worker is stopping")
                    return
                if len(header.shm) != 2:  # type: ignore[arg-type]
                    raise InvalidInputError("attach names [pid, bytes]")
                lease = arena.attach(*header.shm)  # type: ignore[misc]
                payload: Any = {
                    "lease": lease.id,
                    "path": str(arena.path),
                    "offset": lease.offset,
                    "size": lease.size,
                }
            else:
                payload = {"detached": arena.detach(header.shm[0])}  # type: ignore[index]
        except OrchestratorError as exc:
            self._reply_error(identity, rid, exc.code, str(exc))
            return
        self.data.send_multipart([identity, *protocol.encode_payload(rid, payload)])

    def _answered(self, req: Request) -> None:
        """Bookkeeping once a shared-memory request has its reply: its lease may now be freed."""
        if req.shm is not None:
            self.arena.end(req.shm.lease)  # type: ignore[union-attr]

    # --- complete -------------------------------------------------------------------------------

    def _on_complete(self, batch: Batch) -> None:
        outputs = batch.slot.outputs
        names = [s.name for s in self.engine.outputs]
        send = self.data.send_multipart
        together: dict[bytes, tuple[Any, list[list[int]]]] = {}
        dynamic = bool(self.pipeline.dims)
        for req, off in batch.parts:
            end = off + req.rows
            if req.shm is not None and req.many:  # answered together with the others of its client
                key = req.identity.bytes
                group = together.get(key)
                if group is None:
                    group = together[key] = (req.identity, [])
                group[1].append([req.request_id, req.rows])
                self.arena.served(req.shm)  # type: ignore[union-attr]
                continue
            if req.shm is not None:  # the outputs are already in the client's lease
                specs = self._shm_heads.get((req.rows, req.dims))
                if specs is None:
                    specs = self._shm_heads[(req.rows, req.dims)] = protocol.pack(
                        [[n, d.str, list(shape)] for n, d, shape in self._out_shapes(req.rows, req.dims)]
                    )
                send([req.identity, protocol.result_head(req.request_id, specs)], copy=False)
                self.arena.served(req.shm)  # type: ignore[union-attr]
                continue
            if dynamic:  # the request's rows, cut back to its own sizes: contiguous copies
                out_view = self.pipeline.output_view
                frames = protocol.encode_result(
                    req.request_id, [(n, np.ascontiguousarray(out_view(batch, n, off, req))) for n in names]
                )
            else:
                frames = protocol.encode_result(req.request_id, [(n, outputs[n][off:end]) for n in names])
            # copy=True: the slot's buffers are reused by the next batch, so ZeroMQ must own a copy.
            send([req.identity, *frames], copy=True)
        for identity, done in together.values():
            send([identity, protocol.encode_completions(done)], copy=False)

    def _on_expired(self, req: Request) -> None:
        self._reply_error(
            req.identity, req.request_id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued"
        )
        self._answered(req)

    def _complete(self) -> None:
        """Reply to the oldest finished batch, then account it (telemetry after the replies are out)."""
        t0 = time.monotonic_ns()
        batch = self.pipeline.complete_oldest(self._on_complete)
        slot = batch.slot
        span = self.engine.gpu_span_ns(slot)
        # The batch's GPU time is its span's length: no second cuEventElapsedTime on this path.
        gpu_us = (span[1] - span[0]) / 1e3 if span is not None else self.engine.gpu_time_us(slot)
        candidate = self.telemetry.on_batch(batch, gpu_us, span)
        if candidate is not None:
            if cupti_journal.on_stall(candidate):
                candidate["journal_armed_now"] = True  # this stall's journal predates CUPTI: say so
            try:
                stall = messages.Stall(id=self.id, pid=self.pid, candidate=candidate)
                self.sup.send(messages.encode(stall), zmq.NOBLOCK)
            except zmq.Again:
                pass
        self.host_ns += time.monotonic_ns() - t0

    def _pump(self) -> None:
        """Complete finished batches in order, then launch as many as the pipeline allows."""
        p = self.pipeline
        while p.oldest_done():
            self._complete()
        if self.hang:
            return
        now = time.monotonic_ns()
        while p.should_launch(now):
            p.launch_next(now, self._on_expired)
            self.host_ns += time.monotonic_ns() - now
            while p.oldest_done():  # CPU engines finish inside launch
                self._complete()
            now = time.monotonic_ns()
        inj = self.cfg.debug
        if self.hang_armed and p.completed_batches >= inj.inject_after_batches:
            log.warning(
                "[stall] injected hang after %d batches (debug.inject = hang_after)", p.completed_batches
            )
            self.hang = True
            self.hang_armed = False

    def _saturated(self) -> bool:
        p = self.pipeline
        return bool(p.queue) and not p.free and bool(p.inflight)

    # --- loop -----------------------------------------------------------------------------------

    def _timeout_ms(self, next_beat_ns: int) -> int:
        p = self.pipeline
        now = time.monotonic_ns()
        wake = next_beat_ns
        hold = p.hold_until_ns()
        if hold is not None:
            wake = min(wake, hold)
        if p.inflight and not self.hang:
            if self.spin:
                return 0
            if self.waiter is None:
                self.waiter = CompletionWaiter(self.engine)
                self.poller.register(self.waiter.fd, zmq.POLLIN)
            self.waiter.arm(p.inflight[0].slot)
        return max(0, (wake - now + 999_999) // 1_000_000)

    def run(self, wake_fd: int, stop_flag: dict[str, bool]) -> None:
        self.poller = zmq.Poller()
        self.poller.register(self.data, zmq.POLLIN)
        self.poller.register(wake_fd, zmq.POLLIN)
        beat_ns = self.cfg.workers.heartbeat_interval_ms * 1_000_000
        next_beat = time.monotonic_ns()
        drain_deadline = 0
        while True:
            events = dict(self.poller.poll(self._timeout_ms(next_beat)))
            if wake_fd in events:
                try:
                    os.read(wake_fd, 512)
                except BlockingIOError:
                    pass
            if self.waiter is not None and self.waiter.fd in events:
                self.waiter.consume()
            if self.data in events:
                self._receive()
            self._pump()
            while self._saturated() and not self.hang:
                self.pipeline.wait_oldest()  # deferred sync: all slots busy and work is waiting
                self._pump()
            now = time.monotonic_ns()
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + beat_ns
                if os.getppid() != self.spec.ppid:
                    log.error("[shutdown] supervisor %d is gone; stopping", self.spec.ppid)
                    stop_flag["stop"] = True
            if stop_flag["stop"] and not self.draining:
                self.draining = True
                orphaned = os.getppid() != self.spec.ppid
                # Orphaned (the supervisor died, by any means): nobody will restart us or route new work
                # here, so finish what is on the device and leave within a second rather than the full drain.
                grace = 1.0 if orphaned else self.cfg.orchestrator.stop_timeout_s
                drain_deadline = now + int(grace * 1e9)
                log.info(
                    "[shutdown] draining: %d queued, %d in flight",
                    len(self.pipeline.queue),
                    len(self.pipeline.inflight),
                )
                self._send_state("draining")
            if self.draining and (not self.pipeline.busy or now >= drain_deadline or self.hang):
                self._finish_drain()
                return

    def _finish_drain(self) -> None:
        for req in self.pipeline.drain_queue():
            self._reply_error(
                req.identity,
                req.request_id,
                ErrorCode.SHUTTING_DOWN,
                "worker stopped before running this request",
            )
            self._answered(req)
        p = self.pipeline
        while p.inflight and not self.hang:
            p.wait_oldest()
            self._complete()
        for batch in list(p.inflight):  # hung: answer rather than leave clients waiting
            for req, _ in batch.parts:
                self._reply_error(req.identity, req.request_id, ErrorCode.SHUTTING_DOWN, "worker stopped")
                self._answered(req)
        log.info("[shutdown] drained after %d batches", p.completed_batches)
        self._send_state("stopped")

    def _send_state(self, state: str) -> None:
        try:
            msg = messages.StateChange(id=self.id, pid=self.pid, state=messages.WorkerState(state))
            self.sup.send(messages.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _heartbeat(self) -> None:
        """Liveness plus progress (for hang detection) and the telemetry report, in one message. Also ends
        the shared-memory leases of client processes that exited since the last one."""
        p = self.pipeline
        if self.arena is not None:
            reaped = self.arena.reap()
            if reaped:
                log.info("[shm] %d lease(s) ended: their client process exited", reaped)
        self.telemetry.note_queue(len(p.queue), len(p.inflight))
        msg = messages.Heartbeat(
            id=self.id,
            pid=self.pid,
            t_ns=time.monotonic_ns(),
            progress=p.completed_batches,
            requests=p.completed_requests,
            queued=len(p.queue),
            inflight=len(p.inflight),
            faults=self.engine.faults(),
            errors=self.errors_by_code,
            dropped=self.dropped,
            host_ns=self.host_ns,
            report=self.telemetry.report(),
            shm=self.arena.stats() if self.arena is not None else None,
        )
        try:
            self.sup.send(messages.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        if self.waiter is not None:
            self.waiter.close()
        self.data.close(linger=500)  # let the last replies leave
        stop_authenticator(self.ctx)
        self.telemetry.close()
        self.collections.stop()
        self.engine.close()  # unregisters the arena on GPU workers
        if self.arena is not None:
            self.arena.close()
