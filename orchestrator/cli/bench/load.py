"""Load from client processes: closed loop (a fixed number of requests in flight) or open loop (requests
sent on a schedule at a fixed rate), measured over a window that excludes the warm-up.

Runs in the CLI process (`ClientPool`: starts the processes, hands each its share of a point, merges what
they measured) and in the client processes it spawns (`_child_main`: one `Client` each, kept for the whole
sweep, with requests in flight through `Client.submit()` as scripts/loadgen.py did).

A request belongs to the window when its reply arrived inside it; its latency runs from when it was sent
(closed loop) or from when it was due to be sent (open loop, so that a client that falls behind does not
hide the wait: no coordinated omission). Replies chosen by the check plan are compared with a reference;
a wrong reply is counted as wrong, never as throughput.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any

import numpy as np

from orchestrator.common.errors import OrchestratorError

#: Requests one process keeps in flight at most in open loop; beyond it sending waits (and the waiting
#: shows in the latencies, which count from the schedule).
OPEN_LOOP_CAP = 4096
#: Seconds for the client processes to start and connect.
START_TIMEOUT_S = 60.0


class LoadError(OrchestratorError):
    """The load could not run or went wrong midway (the target stopped, a client process died)."""


@dataclass(frozen=True)
class PoolSpec:
    """What every client process gets (pickled once, at spawn)."""

    target: str
    inputs: list[Any]  # requests: dict name -> array, or one array for a one-input model
    references: list[dict[str, np.ndarray]] | None = None  # one per request; None = no check
    check_every: int = 0
    rtol: float | None = None
    atol: float | None = None
    shm: bool | str = "auto"
    shm_lease_mb: int | None = None
    curve: tuple[str, str] | None = None  # (server public key file, client secret key file)
    timeout: float = 30.0
    cpus: tuple[int, ...] | None = None


@dataclass
class PointLoad:
    """What the client processes measured over one point's window."""

    seconds: float
    ok: int = 0  # replies in the window that were results (and, where checked, right)
    rows: int = 0
    sent: int = 0  # requests sent (closed loop) or due (open loop) in the window
    late: int = 0  # open loop: requests of the window sent more than 1 ms after they were due
    errors: dict[str, int] = field(default_factory=dict)
    latencies_us: np.ndarray = field(default_factory=lambda: np.zeros(0))
    checked: int = 0
    wrong: int = 0
    wrong_example: str | None = None
    client_cpu: float | None = None  # the busiest client process: CPU seconds per second (1.0 = a core)
    fatal: str | None = None

    @property
    def throughput(self) -> float:
        """Replies per second (results only)."""
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float | None:
        return float(np.percentile(self.latencies_us, p)) if self.latencies_us.size else None


# --- client process -------------------------------------------------------------------------------------


def _child_main(index: int, spec: PoolSpec, conn: Connection, stop: Any, counts: Any) -> None:
    """A client process: connect, then run each point the parent sends until it says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    try:
        if spec.cpus:
            os.sched_setaffinity(0, spec.cpus)
        from orchestrator.client import Client
        from orchestrator.common.security import ClientKeys

        keys = ClientKeys(*spec.curve) if spec.curve else None
        client = Client(
            spec.target,
            shm=spec.shm,
            shm_lease_mb=spec.shm_lease_mb,
            max_in_flight=1 << 20,  # the loops below bound what is in flight
            curve=keys,
            timeout=spec.timeout,
        )
    except Exception as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    try:
        with client:
            conn.send({"ready": True, "shm": client.shm})
            while True:
                try:
                    cmd = conn.recv()
                except EOFError:  # the parent is gone
                    return
                if cmd.get("op") != "run":
                    return
                conn.send(_Point(client, spec, cmd, stop, counts, index).run())
    except Exception as exc:  # a bug or a broken pipe: say so rather than die silently
        try:
            conn.send({"error": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass


class _Point:
    """One point in one client process."""

    def __init__(self, client: Any, spec: PoolSpec, cmd: dict, stop: Any, counts: Any, index: int) -> None:
        from orchestrator.cli.bench.check import check_plan

        self.client = client
        self.spec = spec
        self.cmd = cmd
        self.stop = stop
        self.counts = counts
        self.index = index
        self.inputs = spec.inputs
        self.n = len(spec.inputs)
        first = spec.inputs[0]
        self.rows_per = int((first if isinstance(first, np.ndarray) else next(iter(first.values()))).shape[0])
        self.checking: Callable[[int], bool] | None = (
            check_plan(spec.check_every, self.n) if spec.references is not None else None
        )
        self.t_start, self.t_end = cmd["t_start"], cmd["t_end"]
        self.deadline = cmd["t_end"] + cmd["grace_s"]
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.lat = array("d")
        self.errors: dict[str, int] = {}
        self.ok = self.checked = self.wrong = self.sent = self.late = 0
        self.example: str | None = None
        self.fatal: str | None = None
        self.k = 0
        self.inflight = 0

    def stopping(self) -> bool:
        return bool(self.stop.value) or self.fatal is not None or time.monotonic() > self.deadline

    def submit(self, t_ref: float) -> None:
        """Send request k (t_ref: when it counts from); a refusal counts as an at once failed request."""
        from orchestrator.common.errors import UnavailableError

        k = self.k
        self.k += 1
        self.inflight += 1
        if self.t_start <= t_ref < self.t_end:
            self.sent += 1
        put = self.done.put
        try:
            fut = self.client.submit(self.inputs[k % self.n])
        except UnavailableError as exc:
            self.fatal = str(exc)
            put((None, exc, t_ref, time.monotonic(), k))
            return
        except OrchestratorError as exc:
            put((None, exc, t_ref, time.monotonic(), k))
            return
        fut.add_done_callback(lambda f: put((f, None, t_ref, time.monotonic(), k)))

    def complete(self, item: tuple) -> None:
        fut, exc, t_ref, t_done, k = item
        self.inflight -= 1
        self.counts[self.index] += 1
        if fut is not None:
            exc = fut.exception()
        in_window = self.t_start <= t_done < self.t_end
        if exc is not None:
            from orchestrator.common.errors import UnavailableError

            if isinstance(exc, UnavailableError) and self.fatal is None:
                self.fatal = str(exc)
            if in_window:
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
            return
        if self.checking is not None and self.checking(k):
            from orchestrator.cli.bench.check import compare

            refs = self.spec.references
            assert refs is not None
            why = compare(fut.result(), refs[k % self.n], self.spec.rtol, self.spec.atol)
            if in_window:
                self.checked += 1
                if why is not None:
                    self.wrong += 1
                    self.example = self.example or why
            if why is not None:
                return
        if in_window:
            self.ok += 1
            self.lat.append((t_done - t_ref) * 1e6)

    def run(self) -> dict:
        cpu0, wall0 = time.process_time(), time.monotonic()
        if self.cmd.get("rate"):
            self._open_loop(float(self.cmd["rate"]), float(self.cmd["t_begin"]) + float(self.cmd["phase"]))
        else:
            self._closed_loop(int(self.cmd["concurrency"]))
        while self.inflight:  # drain: every request has a deadline, so this ends
            try:
                self.complete(self.done.get(timeout=self.spec.timeout + 10.0))
            except queue.Empty:
                self.fatal = (
                    self.fatal or f"{self.inflight} request(s) never answered, not even past their deadline"
                )
                break
        wall = time.monotonic() - wall0
        return {
            "ok": self.ok,
            "rows": self.ok * self.rows_per,
            "sent": self.sent,
            "late": self.late,
            "errors": self.errors,
            "lat": self.lat.tobytes(),
            "checked": self.checked,
            "wrong": self.wrong,
            "wrong_example": self.example,
            "client_cpu": (time.process_time() - cpu0) / wall if wall > 0 else None,
            "fatal": self.fatal,
        }

    def _closed_loop(self, concurrency: int) -> None:
        for _ in range(concurrency):
            self.submit(time.monotonic())
        get = self.done.get
        while self.inflight:
            try:
                item = get(timeout=0.05)
            except queue.Empty:
                if self.stopping():
                    return
                continue
            self.complete(item)
            if self.stopping():
                return
            self.submit(time.monotonic())

    def _open_loop(self, rate: float, t_first: float) -> None:
        interval = 1.0 / rate
        due = t_first
        get = self.done.get
        while not self.stopping():
            now = time.monotonic()
            if now >= due and self.inflight < OPEN_LOOP_CAP:
                if now - due > 1e-3 and self.t_start <= due < self.t_end:
                    self.late += 1
                self.submit(due)
                due += interval
                continue
            try:  # wait for a reply until the next request is due (or a while, when at the cap)
                self.complete(get(timeout=max(0.0, min(due - now, 0.05)) if now < due else 0.05))
            except queue.Empty:
                pass
            while True:  # replies that arrived meanwhile
                try:
                    self.complete(get(block=False))
                except queue.Empty:
                    break


# --- the parent -------------------------------------------------------------------------------------------


class ClientPool:
    """`processes` spawned client processes, connected once and reused for every point of a sweep."""

    def __init__(self, spec: PoolSpec, processes: int = 1) -> None:
        ctx = mp.get_context("spawn")
        self.spec = spec
        self.stop = ctx.RawValue("i", 0)
        self.counts = ctx.RawArray("q", processes)
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.shm = False
        try:
            for i in range(processes):
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=_child_main,
                    args=(i, spec, child, self.stop, self.counts),
                    name=f"orchestrator-bench-client-{i}",
                    daemon=True,
                )
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            answers = [self._recv(i, START_TIMEOUT_S, "to connect") for i in range(processes)]
        except BaseException:
            self.close()
            raise
        self.shm = all(a.get("shm") for a in answers)

    def _recv(self, i: int, timeout: float, what: str) -> dict:
        conn, p = self.conns[i], self.procs[i]
        try:
            if not conn.poll(timeout):
                raise LoadError(f"client process {i} did not answer within {timeout:g}s ({what})")
            msg = conn.recv()
        except (EOFError, OSError):
            p.join(1)
            raise LoadError(
                f"client process {i} exited (code {p.exitcode}) before it answered ({what})"
            ) from None
        if "error" in msg:
            raise LoadError(msg["error"])
        return msg

    @property
    def completed(self) -> int:
        """Replies received so far by every process (all points, warm-up included): for progress."""
        return int(sum(self.counts))

    def run(
        self,
        *,
        concurrency: int | None = None,
        rate: float | None = None,
        warmup: float = 0.0,
        duration: float = 5.0,
        at_start: Callable[[], Any] | None = None,
        at_end: Callable[[float], Any] | None = None,
        tick: Callable[[], None] | None = None,
    ) -> PointLoad:
        """One point: load from now, measured over [now + warmup, + duration]. `at_start()` runs as the
        window opens, `at_end(t_end)` as it closes, while the load goes on (telemetry snapshots); `tick()`
        several times a second (progress)."""
        if (concurrency is None) == (rate is None):
            raise ValueError("give either a concurrency or a rate")
        n = len(self.procs)
        self.stop.value = 0
        t_begin = time.monotonic() + 0.01
        t_start = t_begin + warmup
        t_end = t_start + duration
        active: list[int] = []
        for i, conn in enumerate(self.conns):
            cmd: dict[str, Any] = {
                "op": "run",
                "t_begin": t_begin,
                "t_start": t_start,
                "t_end": t_end,
                "grace_s": 60.0 + self.spec.timeout,  # a parent that never says stop
            }
            if rate is not None:
                cmd.update(rate=rate / n, phase=i / rate)
            else:
                share = concurrency // n + (i < concurrency % n)  # type: ignore[operator]
                if not share:
                    continue
                cmd.update(concurrency=share)
            conn.send(cmd)
            active.append(i)
        early: dict[int, dict] = {}
        try:
            self._wait_until(t_start, active, early, tick)
            if at_start is not None and not early:
                at_start()
            self._wait_until(t_end, active, early, tick)
            if at_end is not None and not early:
                at_end(t_end)
        finally:
            self.stop.value = 1
        parts = [early.get(i) or self._recv(i, self.spec.timeout + 30.0, "with its results") for i in active]
        return self._merge(parts, duration)

    def _wait_until(
        self, t: float, active: list[int], early: dict[int, dict], tick: Callable[[], None] | None
    ) -> None:
        """Until monotonic time `t`; a process that answers before being told to stop has failed."""
        conns = {self.conns[i]: i for i in active if i not in early}
        while not early:
            left = t - time.monotonic()
            if left <= 0:
                return
            for conn in wait_any(list(conns), timeout=min(0.1, left)):
                i = conns[conn]  # type: ignore[index]
                early[i] = self._recv(i, 0.1, "during the point")
            if tick is not None:
                tick()

    def _merge(self, parts: list[dict], duration: float) -> PointLoad:
        out = PointLoad(seconds=duration)
        lats = []
        cpus = []
        for r in parts:
            out.ok += r["ok"]
            out.rows += r["rows"]
            out.sent += r["sent"]
            out.late += r["late"]
            out.checked += r["checked"]
            out.wrong += r["wrong"]
            out.wrong_example = out.wrong_example or r["wrong_example"]
            out.fatal = out.fatal or r["fatal"]
            for k, v in r["errors"].items():
                out.errors[k] = out.errors.get(k, 0) + v
            lats.append(np.frombuffer(r["lat"], dtype=np.float64))
            if r["client_cpu"] is not None:
                cpus.append(r["client_cpu"])
        out.latencies_us = np.concatenate(lats) if lats else np.zeros(0)
        out.client_cpu = max(cpus) if cpus else None
        if out.fatal:
            raise LoadError(out.fatal)
        return out

    def close(self) -> None:
        self.stop.value = 1
        for conn in self.conns:
            try:
                conn.send({"op": "stop"})
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_load(
    target: str | os.PathLike,
    inputs: list[Any],
    *,
    concurrency: int,
    duration: float,
    processes: int = 1,
    warmup: float = 0.0,
    cpus: list[int] | None = None,
    shm: bool | str = "auto",
) -> PointLoad:
    """One closed-loop point, no telemetry and no check: `concurrency` requests in flight in all (spread
    over `processes` client processes, optionally pinned to `cpus`), cycling through `inputs`."""
    spec = PoolSpec(str(target), list(inputs), shm=shm, cpus=tuple(cpus) if cpus else None)
    with ClientPool(spec, processes) as pool:
        return pool.run(concurrency=concurrency, warmup=warmup, duration=duration)
