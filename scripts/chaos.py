"""Chaos run: client processes send N requests while one worker is SIGKILLed every half second and another
is SIGSTOPped once; checks that every request gets exactly one reply (all correct with failover on), that
killed workers come back, and reports the time to detect and to recover.

    python scripts/chaos.py --requests 10000 --out benchmarks/results/chaos-cpu.md

Runs in the calling process (the chaos monkey, an event-stream listener thread and the report), in spawned
client processes (threads calling infer() and threads keeping submit() futures in flight), and in the
orchestrator it starts from a CPU synthetic-engine config in a temporary run directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.benchlib import cli  # noqa: E402

ITEM = 16  # row width of the synthetic model used here


@dataclass
class ChaosOptions:
    requests: int = 10_000
    procs: int = 2  # client processes
    threads: int = 4  # threads per client process: even ones call infer(), odd ones keep submit() futures
    window: int = 4  # futures in flight per submit() thread
    rate: float = 500.0  # requests per second offered in total (paces the run so the chaos has time to act)
    workers: int = 4  # w0 and w2 are killed in turn, w1 is stopped once, w3 is left alone
    work: int = 20  # synthetic iterations per element
    kill: tuple[str, ...] = ("w0", "w2")  # SIGKILLed in turn, one every kill_every seconds (a ready one)
    kill_every: float = 0.5
    stop: str | None = "w1"  # SIGSTOPped once, stop_at seconds into the run
    stop_at: float = 1.0
    hang_timeout_s: float = 1.5
    failover: bool = True
    max_retries: int = 3
    timeout_s: float = 30.0  # the clients' per-request deadline
    recover_timeout_s: float = 60.0


@dataclass
class ClientTally:
    sent: int = 0
    answered: int = 0  # requests with exactly one outcome
    unanswered: int = 0
    duplicates: int = 0  # requests with more than one outcome
    correct: int = 0
    wrong: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    untyped: int = 0  # errors that are not the package's typed errors (OrchestratorError)
    examples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    stray_replies: int = 0


# --- client processes --------------------------------------------------------------------------------


def _input(proc: int, thread: int, seq: int) -> np.ndarray:
    rng = np.random.default_rng((proc, thread, seq))
    return rng.standard_normal((1 + seq % 8, ITEM)).astype(np.float32)


class _Book:
    """Per-process record of outcomes by request key; thread-safe (futures resolve on the I/O thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: dict[tuple[int, int], list[Any]] = {}
        self.sent_at: dict[tuple[int, int], float] = {}
        self.lat: dict[tuple[int, int], float] = {}

    def sent(self, key: tuple[int, int]) -> None:
        with self.lock:
            self.sent_at[key] = time.monotonic()
            self.outcomes[key] = []

    def answer(self, key: tuple[int, int], outcome: Any) -> None:
        now = time.monotonic()
        with self.lock:
            self.outcomes[key].append(outcome)
            self.lat.setdefault(key, now - self.sent_at[key])


def _pace(t0: float, i: int, per_s: float) -> None:
    delay = t0 + i / per_s - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _infer_thread(c: Any, book: _Book, proc: int, thread: int, n: int, per_s: float, t0: float) -> None:
    for seq in range(n):
        _pace(t0, seq, per_s)
        key = (thread, seq)
        book.sent(key)
        try:
            book.answer(key, c.infer(_input(proc, thread, seq)))
        except Exception as exc:  # every typed error is an answer; anything else is reported by type
            book.answer(key, exc)


def _submit_thread(
    c: Any, book: _Book, proc: int, thread: int, n: int, per_s: float, t0: float, window: int
) -> None:
    inflight: deque[Future] = deque()
    for seq in range(n):
        _pace(t0, seq, per_s)
        while len(inflight) >= window:
            inflight.popleft().exception(c.timeout + 10)
        key = (thread, seq)
        book.sent(key)
        try:
            fut = c.submit(_input(proc, thread, seq))
        except Exception as exc:
            book.answer(key, exc)
            continue
        fut.add_done_callback(lambda f, key=key: book.answer(key, f.exception() or f.result()))
        inflight.append(fut)
    for fut in inflight:
        fut.exception(c.timeout + 10)


def client_main(spec: dict) -> None:
    """A client process (`chaos.py --client SPEC`): say "ready", wait for "go" on stdin, run, print the tally."""
    from orchestrator.client import Client
    from orchestrator.common.errors import OrchestratorError
    from workers.engines.synthetic_math import reference

    config, proc, n = spec["config"], spec["proc"], spec["n"]
    o = ChaosOptions(**spec["options"])
    book = _Book()
    c = Client(
        config,
        timeout=o.timeout_s,
        failover=o.failover,
        max_retries=o.max_retries,
        max_in_flight=o.threads * (o.window + 1),
    )
    print("ready", flush=True)
    sys.stdin.readline()
    shares = [n // o.threads + (i < n % o.threads) for i in range(o.threads)]
    per_thread_rate = o.rate / (o.procs * o.threads)
    t0 = time.monotonic()
    threads = []
    for t, share in enumerate(shares):
        if t % 2 == 0:
            target, args = _infer_thread, (c, book, proc, t, share, per_thread_rate, t0)
        else:
            target, args = _submit_thread, (c, book, proc, t, share, per_thread_rate, t0, o.window)
        threads.append(threading.Thread(target=target, args=args, daemon=True))
    for th in threads:
        th.start()
    deadline = time.monotonic() + n / per_thread_rate / o.threads + o.timeout_s * (o.max_retries + 2) + 30
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    tally = ClientTally(sent=len(book.sent_at), stray_replies=c._io.stray_replies)
    with book.lock:
        for key, outs in book.outcomes.items():
            if not outs:
                tally.unanswered += 1
                continue
            if len(outs) > 1:
                tally.duplicates += 1
                continue
            tally.answered += 1
            out = outs[0]
            tally.latencies_ms.append(book.lat[key] * 1e3)
            if isinstance(out, BaseException):
                name = type(out).__name__
                tally.errors[name] = tally.errors.get(name, 0) + 1
                tally.untyped += not isinstance(out, OrchestratorError)
                if len(tally.examples) < 5:
                    tally.examples.append(f"{name}: {out}")
            elif np.array_equal(out["y"], reference(_input(proc, *key), o.work)):
                tally.correct += 1
            else:
                tally.wrong += 1
    hung = [th.name for th in threads if th.is_alive()]
    if hung:
        tally.examples.append(f"client threads still waiting at the end: {hung}")
    else:
        c.close()
    print("done " + json.dumps(asdict(tally)), flush=True)
    if hung:
        os._exit(0)  # a hung call must not keep this process alive; the tally above reports it


# --- the orchestrator and its event stream -------------------------------------------------------------


class EventLog(threading.Thread):
    """Listens to the supervisor's event PUB; keeps (monotonic time, id, state, pid) and current states."""

    def __init__(self, endpoint: str, initial: dict[str, dict]) -> None:
        super().__init__(name="chaos-events", daemon=True)
        self.endpoint = endpoint
        self.events: list[tuple[float, str, str, int | None]] = []
        self.state = {wid: (w["state"], w["pid"]) for wid, w in initial.items()}
        self.lock = threading.Lock()
        self.closing = False

    def run(self) -> None:
        from orchestrator.common import messages

        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"worker")
        sub.connect(self.endpoint)
        try:
            while not self.closing:
                if not sub.poll(100):
                    continue
                _topic, payload = sub.recv_multipart()
                now = time.monotonic()
                msg = messages.EVENTS.decode(payload)
                if not isinstance(msg, messages.WorkerEvent):
                    continue
                with self.lock:
                    self.events.append((now, msg.id, msg.state.value, msg.pid))
                    self.state[msg.id] = (msg.state.value, msg.pid)
        finally:
            sub.close(0)

    def current(self, wid: str) -> tuple[str, int | None]:
        with self.lock:
            return self.state[wid]

    def after(self, t: float, wid: str, state: str, pid: int | None = None) -> float | None:
        with self.lock:
            for when, ew, es, ep in self.events:
                if when >= t and ew == wid and es == state and (pid is None or ep == pid):
                    return when
        return None


def write_config(tmp: Path, o: ChaosOptions) -> Path:
    cfg = tmp / "chaos.toml"
    cfg.write_text(f"""[orchestrator]
name = "chaos"
run_dir = "{tmp}/run"
stop_timeout_s = 5

[workers]
device = "cpu"
count = {o.workers}
hang_timeout_s = {o.hang_timeout_s}

[model]
kind = "synthetic"
item_shape = [{ITEM}]
work = {o.work}
max_batch = 64

[restart]
# Restart fast and never quarantine: this run kills on purpose, far more often than flapping would allow.
backoff_initial_s = 0.1
backoff_max_s = 0.5
flap_max_crashes = 100000
""")
    return cfg


def _status(run_dir: Path) -> dict:
    from orchestrator.client.control import ControlClient
    from orchestrator.common.rundir import RunDir

    with ControlClient(RunDir(run_dir).control_endpoint(), timeout_s=5) as c:
        return c.call("status")


def _endpoints(run_dir: Path) -> dict:
    from orchestrator.client.control import ControlClient
    from orchestrator.common.rundir import RunDir

    with ControlClient(RunDir(run_dir).control_endpoint(), timeout_s=5) as c:
        return c.call("endpoints")


# --- the run ---------------------------------------------------------------------------------------------


def _monkey(o: ChaosOptions, events: EventLog, done: threading.Event, kills: list, stops: list) -> None:
    """Every kill_every seconds SIGKILL the next ready victim; SIGSTOP the stop victim once."""
    t0 = time.monotonic()
    tick = 0
    turn = 0
    while not done.is_set():
        tick += 1
        delay = t0 + tick * o.kill_every - time.monotonic()
        if delay > 0 and done.wait(delay):
            break
        now = time.monotonic()
        if o.stop and not stops and now - t0 >= o.stop_at:
            state, pid = events.current(o.stop)
            if state == "ready" and pid:
                os.kill(pid, signal.SIGSTOP)
                stops.append((o.stop, pid, time.monotonic()))
        for i in range(len(o.kill)):
            wid = o.kill[(turn + i) % len(o.kill)]
            state, pid = events.current(wid)
            if state == "ready" and pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                kills.append((wid, pid, time.monotonic()))
                turn = (turn + i + 1) % len(o.kill)
                break


def _read_lines(p: subprocess.Popen, out: queue.Queue) -> None:
    for line in p.stdout:
        out.put((p.pid, line.rstrip("\n")))
    out.put((p.pid, None))  # end of output: the process exited


def _collect(lines: queue.Queue, procs: list[subprocess.Popen], prefix: str, timeout: float) -> list[str]:
    """One line starting with `prefix` from every client process; fails fast if one exits without it."""
    got: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(procs):
        try:
            pid, line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(
                f"client processes did not report {prefix.strip()!r} within {timeout:g}s"
            ) from None
        if line is None and pid not in got:
            raise RuntimeError(f"client process {pid} exited before reporting {prefix.strip()!r}")
        if line is not None and line.startswith(prefix):
            got[pid] = line
    return [got[p.pid] for p in procs]


def _timings(events: EventLog, incidents: list) -> list[dict]:
    out = []
    for wid, pid, t in incidents:
        failed = events.after(t, wid, "failed", pid)
        ready = events.after(failed, wid, "ready") if failed is not None else None
        out.append(
            {
                "worker": wid,
                "pid": pid,
                "detect_s": None if failed is None else failed - t,
                "recover_s": None if ready is None else ready - t,
            }
        )
    return out


def run_chaos(o: ChaosOptions, keep: bool = False) -> dict:
    """Start an orchestrator, run the clients under chaos, stop it; return the measurements and verdict.
    `keep` leaves the temporary directory (config, run directory with the logs) in place."""
    tmp = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    cfg = write_config(tmp, o)
    run_dir = tmp / "run"
    procs: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []
    lines: queue.Queue = queue.Queue()
    started = cli("start", str(cfg), "--detach", timeout=120)
    if started.returncode != 0:
        raise RuntimeError(f"orchestrator did not start:\n{started.stderr}")
    events: EventLog | None = None
    done = threading.Event()
    kills: list = []
    stops: list = []
    try:
        initial = {w["id"]: w for w in _status(run_dir)["workers"]}
        events = EventLog(_endpoints(run_dir)["events"], initial)
        events.start()
        time.sleep(0.3)  # let the subscription reach the publisher before anything happens
        shares = [o.requests // o.procs + (i < o.requests % o.procs) for i in range(o.procs)]
        for i, n in enumerate(shares):
            spec = {"config": str(cfg), "proc": i, "n": n, "options": asdict(o)}
            p = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--client", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            procs.append(p)
            readers.append(threading.Thread(target=_read_lines, args=(p, lines), daemon=True))
            readers[-1].start()
        _collect(lines, procs, "ready", 120)
        monkey = threading.Thread(target=_monkey, args=(o, events, done, kills, stops), daemon=True)
        t0 = time.monotonic()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        monkey.start()
        limit = o.requests / o.rate + o.timeout_s * (o.max_retries + 2) + 90
        tallies = [json.loads(text[len("done ") :]) for text in _collect(lines, procs, "done ", limit)]
        wall = time.monotonic() - t0
        done.set()
        monkey.join(10)
        for p in procs:
            p.wait(30)
        t_end = time.monotonic()
        while time.monotonic() - t_end < o.recover_timeout_s:  # the killed and stopped workers come back
            back = all(t["recover_s"] is not None for t in _timings(events, kills + stops))
            if back and all(events.current(w)[0] == "ready" for w in initial):
                break
            time.sleep(0.05)
        back_s = time.monotonic() - t_end
        final = _status(run_dir)
        log_text = (run_dir / "supervisor.log").read_text(errors="replace")
        backoffs = [float(d) for d in re.findall(r"\[restart\] \S+: restart in ([0-9.]+)s", log_text)]
    finally:
        done.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)
        for t in readers:
            t.join(5)
        for p in procs:
            for f in (p.stdin, p.stdout):
                f.close()
        for _wid, pid, _t in stops:  # a stopped worker the supervisor failed to kill must not linger stopped
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stopped = cli("stop", str(cfg), timeout=120)
        if events is not None:
            events.closing = True
            events.join(5)
        if not keep:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    r = _summarise(o, tallies, wall, kills, stops, events, final, back_s, stopped.returncode == 0)
    r["restart_backoff"] = _stats(backoffs)
    return r


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.array(values) * 1e3
    return {
        "n": len(values),
        "min_ms": float(a.min()),
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "max_ms": float(a.max()),
    }


def _summarise(
    o: ChaosOptions,
    tallies: list[dict],
    wall: float,
    kills: list,
    stops: list,
    events: EventLog,
    final: dict,
    back_s: float,
    stopped_ok: bool,
) -> dict:
    total = ClientTally()
    errors: Counter = Counter()
    lat: list[float] = []
    for t in tallies:
        for k in (
            "sent",
            "answered",
            "unanswered",
            "duplicates",
            "correct",
            "wrong",
            "untyped",
            "stray_replies",
        ):
            setattr(total, k, getattr(total, k) + t[k])
        errors.update(t["errors"])
        total.examples += t["examples"]
        lat += t["latencies_ms"]
    kill_t = _timings(events, kills)
    stop_t = _timings(events, stops)
    workers = {w["id"]: {"state": w["state"], "restarts": w["restarts"]} for w in final["workers"]}
    checks = {
        "every request sent": total.sent == o.requests,
        "exactly one reply per request": total.answered == o.requests
        and not total.unanswered
        and not total.duplicates,
        "every reply a correct result" if o.failover else "every reply a result or a typed error": (
            total.correct == o.requests
        )
        if o.failover
        else (total.wrong == 0 and total.untyped == 0),
        "workers were killed": len(kills) > 0,
        "every kill detected and recovered": all(k["recover_s"] is not None for k in kill_t),
        "the stopped worker detected and recovered": all(s["recover_s"] is not None for s in stop_t)
        and len(stops) == (1 if o.stop else 0),
        "all workers ready at the end": all(w["state"] == "ready" for w in workers.values()),
        "clean stop": stopped_ok,
    }
    return {
        "options": asdict(o),
        "wall_s": wall,
        "throughput_rps": total.answered / wall if wall else 0.0,
        "sent": total.sent,
        "answered_once": total.answered,
        "unanswered": total.unanswered,
        "duplicates": total.duplicates,
        "correct": total.correct,
        "wrong": total.wrong,
        "errors": dict(errors),
        "untyped_errors": total.untyped,
        "error_examples": total.examples[:10],
        "stray_replies": total.stray_replies,
        "latency": _stats([v / 1e3 for v in lat]),
        "kills": kill_t,
        "stops": stop_t,
        "kill_detect": _stats([k["detect_s"] for k in kill_t if k["detect_s"] is not None]),
        "kill_recover": _stats([k["recover_s"] for k in kill_t if k["recover_s"] is not None]),
        "stop_detect": _stats([s["detect_s"] for s in stop_t if s["detect_s"] is not None]),
        "stop_recover": _stats([s["recover_s"] for s in stop_t if s["recover_s"] is not None]),
        "all_ready_after_s": back_s,
        "workers": workers,
        "checks": checks,
        "passed": all(checks.values()),
    }


# --- report ------------------------------------------------------------------------------------------------


def _row(name: str, s: dict) -> str:
    if not s.get("n"):
        return f"| {name} | 0 | | | | |"
    return f"| {name} | {s['n']} | {s['min_ms']:.0f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['max_ms']:.0f} |"


def report(r: dict, command: str) -> str:
    o = r["options"]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Chaos run on CPU ({date}): {'PASS' if r['passed'] else 'FAIL'}",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, load average at the end {os.getloadavg()[0]:.2f}",
        f"- command: `{command}`",
        f"- orchestrator: {o['workers']} CPU workers, synthetic engine (item {ITEM} float32, work {o['work']}), "
        f"hang_timeout_s {o['hang_timeout_s']}, heartbeat 200 ms, restart backoff 0.1 s doubling to 0.5 s, "
        "no quarantine",
        f"- clients: {o['procs']} processes x {o['threads']} threads (half blocking infer(), half submit() with "
        f"{o['window']} futures in flight), {o['rate']:g} requests/s offered, failover "
        f"{'on' if o['failover'] else 'off'} (max_retries {o['max_retries']}), deadline {o['timeout_s']:g} s",
        f"- chaos: every {o['kill_every']} s SIGKILL the next ready one of {list(o['kill'])}, in turn; SIGSTOP "
        f"{o['stop']} once at {o['stop_at']} s",
        "",
        "| requests | answered once | unanswered | answered twice | correct results | wrong | typed errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['sent']} | {r['answered_once']} | {r['unanswered']} | {r['duplicates']} | {r['correct']} | "
        f"{r['wrong']} | {r['errors'] or 'none'} |",
        "",
        f"Run time {r['wall_s']:.1f} s, {r['throughput_rps']:.0f} replies/s; client latency p50 "
        f"{r['latency'].get('p50_ms', 0):.1f} ms, p95 {r['latency'].get('p95_ms', 0):.1f} ms, max "
        f"{r['latency'].get('max_ms', 0):.0f} ms; late replies discarded by the client: {r['stray_replies']}.",
        "",
        "| incident -> event | n | min (ms) | p50 (ms) | p95 (ms) | max (ms) |",
        "| --- | --- | --- | --- | --- | --- |",
        _row("SIGKILL -> state failed (detect)", r["kill_detect"]),
        _row("SIGKILL -> ready again (recover)", r["kill_recover"]),
        _row("of which restart backoff (supervisor log)", r["restart_backoff"]),
        _row("SIGSTOP -> state failed (detect)", r["stop_detect"]),
        _row("SIGSTOP -> ready again (recover)", r["stop_recover"]),
        "",
        "Detect and recover are measured from the signal to the supervisor's `failed` and next `ready` events on its "
        "PUB socket. Recover includes the restart backoff and the new worker's start-up (interpreter, imports, "
        "warm-up); the backoff row shows how much of it is the supervisor's deliberate delay. A SIGSTOPped worker "
        "is declared hung hang_timeout_s after its last heartbeat, which may precede the signal by up to one "
        "heartbeat interval.",
        "",
        f"Workers at the end (all ready {r['all_ready_after_s']:.1f} s after the load ended): "
        + ", ".join(f"{k} {v['state']} after {v['restarts']} restarts" for k, v in r["workers"].items()),
        "",
        "| check | result |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {'PASS' if v else 'FAIL'} |" for k, v in r["checks"].items()]
    if r["error_examples"]:
        lines += ["", "Error examples:", *[f"- {e}" for e in r["error_examples"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        client_main(json.loads(sys.argv[2]))
        return
    d = ChaosOptions()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=d.requests)
    ap.add_argument("--procs", type=int, default=d.procs, help="client processes")
    ap.add_argument("--threads", type=int, default=d.threads, help="threads per client process")
    ap.add_argument("--rate", type=float, default=d.rate, help="requests per second offered in total")
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument("--work", type=int, default=d.work)
    ap.add_argument("--kill", default=",".join(d.kill), help="comma-separated worker ids to SIGKILL in turn")
    ap.add_argument("--kill-every", type=float, default=d.kill_every)
    ap.add_argument("--stop", default=d.stop, help="worker id to SIGSTOP once ('' for none)")
    ap.add_argument("--stop-at", type=float, default=d.stop_at)
    ap.add_argument("--hang-timeout", type=float, default=d.hang_timeout_s)
    ap.add_argument("--no-failover", action="store_true")
    ap.add_argument("--max-retries", type=int, default=d.max_retries)
    ap.add_argument("--out", type=Path, help="write the Markdown report here (and .json beside it)")
    a = ap.parse_args()
    o = ChaosOptions(
        requests=a.requests,
        procs=a.procs,
        threads=a.threads,
        rate=a.rate,
        workers=a.workers,
        work=a.work,
        kill=tuple(x for x in a.kill.split(",") if x),
        kill_every=a.kill_every,
        stop=a.stop or None,
        stop_at=a.stop_at,
        hang_timeout_s=a.hang_timeout,
        failover=not a.no_failover,
        max_retries=a.max_retries,
    )
    r = run_chaos(o)
    text = report(r, "python " + " ".join(sys.argv))
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(r, indent=2))
    sys.exit(0 if r["passed"] else 1)


if __name__ == "__main__":
    main()
