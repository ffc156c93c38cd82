"""Checked load for the integration tests: client threads sending small synthetic requests (16 floats a row,
1-8 rows) until stopped, half through blocking infer() and half through submit() futures, every result
compared with the numpy reference. Counts what was sent, answered right, answered wrong, and raised."""

from __future__ import annotations

import threading

import numpy as np

from orchestrator.client import Client
from workers.engines.synthetic_math import reference

ITEM = 16  # row width of the synthetic model these tests configure


def rows(seed: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, ITEM)).astype(np.float32)


class Load:
    """Use as a context manager: threads run inside it; on exit they stop and must all have returned."""

    def __init__(self, client: Client, work: int, threads: int = 2, use_submit: bool = True) -> None:
        self.client = client
        self.work = work
        self.stop = threading.Event()
        self.sent = self.ok = self.wrong = 0
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        kinds = ["infer", "submit"] if use_submit else ["infer"]
        self.threads = [
            threading.Thread(target=self._run, args=(i, kinds[i % len(kinds)]), daemon=True)
            for i in range(threads)
        ]

    def _run(self, seed: int, kind: str) -> None:
        i = 0
        while not self.stop.is_set():
            x = rows(seed * 100_000 + i, 1 + i % 8)
            i += 1
            with self.lock:
                self.sent += 1
            try:
                if kind == "infer":
                    out = self.client.infer(x)
                else:
                    out = self.client.submit(x).result(self.client.timeout + 5)
                good = np.array_equal(out["y"], reference(x, self.work))
                with self.lock:
                    self.ok += good
                    self.wrong += not good
            except BaseException as exc:  # recorded and asserted on by the test
                with self.lock:
                    self.errors.append(exc)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.client.timeout + 10)
        assert not any(t.is_alive() for t in self.threads), "a client call did not return"
