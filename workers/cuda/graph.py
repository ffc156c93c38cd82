"""CUDA graphs: stream capture, instantiation (journaled) and launch.

Runs in a GPU worker: capture and instantiate on the serving thread during warm-up; launch per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cuda.bindings import driver

from workers.cuda.errors import CudaError, check
from workers.cuda.stream import Stream
from workers.driver_journal import JOURNAL

log = logging.getLogger(__name__)

# THREAD_LOCAL: only unsafe calls from the capturing thread invalidate the capture (trtexec's choice).
# GLOBAL would also fail the capture if another thread of the worker (telemetry, stall injection) made
# a "potentially unsafe" call such as cuMemAlloc meanwhile.
_CAPTURE_MODE = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL


class GraphExec:
    """An instantiated, uploaded graph: replaying it costs one launch call for all of its nodes."""

    def __init__(self, handle: Any, detail: str) -> None:
        self.handle = handle
        self.detail = detail

    def launch(self, stream: Stream) -> None:
        err = driver.cuGraphLaunch(self.handle, stream.handle)[0]
        if err:
            check((err,), "cuGraphLaunch")

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(driver.cuGraphExecDestroy(handle), "cuGraphExecDestroy")


def capture(stream: Stream, enqueue: Callable[[], Any], detail: str = "") -> GraphExec | None:
    """Record what `enqueue()` puts on `stream` into a graph, instantiate and upload it.

    Returns None when `enqueue` returns False or the capture is invalidated (an operation that is not
    capturable, e.g. a TensorRT engine needing host sync); the caller then falls back to eager launches.
    The capture is always ended, even on error, or the stream would stay in capture mode for good.
    """
    check(driver.cuStreamBeginCapture(stream.handle, _CAPTURE_MODE), "cuStreamBeginCapture")
    ok: Any = True
    failure: BaseException | None = None
    try:
        ok = enqueue()
    except BaseException as exc:  # end the capture first, then re-raise
        failure = exc
    err, graph = driver.cuStreamEndCapture(stream.handle)
    if failure is not None:
        if not err:
            driver.cuGraphDestroy(graph)
        raise failure
    if err or ok is False:
        if not err:
            driver.cuGraphDestroy(graph)
        log.warning(
            "[cuda] graph capture of %s failed (%s); running it without a graph",
            detail,
            err.name if err else "enqueue returned False",
        )
        return None
    try:
        with JOURNAL.timed("graph_instantiate", detail):
            exec_handle = check(driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
    finally:
        driver.cuGraphDestroy(graph)  # the executable graph does not need its template
    gexec = GraphExec(exec_handle, detail)
    try:
        # Upload now so the first real launch does not pay for it.
        check(driver.cuGraphUpload(exec_handle, stream.handle), "cuGraphUpload")
    except CudaError:
        gexec.destroy()
        raise
    return gexec
