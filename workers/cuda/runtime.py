"""The CUDA layer as one object that GPU engines receive, so tests can hand them a stand-in.

Runs in a GPU worker process (serving thread). Engines call only what this object exposes.
"""

from __future__ import annotations

from typing import Any

from workers.cuda import context, graph, memory, stream


class CudaRuntime:
    """Facade over workers.cuda: buffers, streams, events, copies, graph capture and the context."""

    PinnedBuffer = memory.PinnedBuffer
    DeviceBuffer = memory.DeviceBuffer
    HostRegistration = memory.HostRegistration
    Stream = stream.Stream
    Event = stream.Event
    copy_htod_async = staticmethod(memory.copy_htod_async)
    copy_dtoh_async = staticmethod(memory.copy_dtoh_async)
    capture = staticmethod(graph.capture)

    def context(self, sched: context.Sched) -> Any:
        """The process's CudaContext (created on first call); exposes .info and .loading_mode."""
        return context.get_context(sched)
