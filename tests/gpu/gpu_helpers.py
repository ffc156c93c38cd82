"""Helpers for the GPU tests: configs, output poisoning, a pipelined driver over workers.pipeline.Pipeline
(no sockets) and a bit-exact comparison. Imported by the tests in this folder (pytest process)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def gpu_config(**kw: Any) -> Any:
    """A validated GPU config; keyword `section__key=value` sets [section] key."""
    from orchestrator.common.config import parse_config

    raw: dict[str, dict[str, Any]] = {"workers": {"device": "gpu"}, "model": {"kind": "synthetic"}}
    for key, value in kw.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return parse_config(raw, check_files=False)


def poison(slots: list) -> None:
    """Fill every output buffer with NaN so stale or unwritten rows cannot pass for results."""
    for slot in slots:
        for arr in slot.outputs.values():
            arr.fill(np.nan)


def drive(
    pipe: Any, batches: list[dict[str, np.ndarray]], on_batch: Any = None
) -> dict[int, dict[str, np.ndarray]]:
    """Push requests through the pipeline as a worker would: launch while a slot is free, wait on the
    oldest only when no slot is free or nothing is left to launch. Returns outputs per request index."""
    from workers.pipeline import Request

    out: dict[int, dict[str, np.ndarray]] = {}
    names = [s.name for s in pipe.engine.outputs]

    def complete(batch: Any) -> None:
        if on_batch is not None:
            on_batch(batch)
        for req, off in batch.parts:
            out[req.request_id] = {n: batch.slot.outputs[n][off : off + req.rows].copy() for n in names}

    pending = list(enumerate(batches))
    pending.reverse()
    while pending or pipe.inflight:
        if pending and pipe.free:
            i, tensors = pending.pop()
            rows = next(iter(tensors.values())).shape[0]
            now = time.monotonic_ns()  # real clocks: the batch's enqueue timings are measured from these
            assert pipe.offer(Request(f"r{i}", i, tensors, rows, now))
            assert pipe.launch_next(now, lambda r: None) is not None
            continue
        pipe.wait_oldest()
        pipe.complete_oldest(complete)
    return out


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit-identical, except that any NaN equals any NaN (payloads may differ)."""
    gn, wn = np.isnan(got), np.isnan(want)
    return bool(
        np.array_equal(gn, wn) and np.array_equal(got[~gn].view(np.uint32), want[~wn].view(np.uint32))
    )
