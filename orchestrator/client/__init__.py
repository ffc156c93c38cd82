"""The client library: send numpy batches straight to an orchestrator's workers.

    from orchestrator.client import AsyncClient, Client

Runs in the user's process and imports nothing of the supervisor, the monitor or the CLI (a client-only
install has neither onnxruntime nor rich nor prometheus-client). Modules: core (Client, AsyncClient,
discovery), io_thread (the I/O thread behind submit() and AsyncClient), lease (shared-memory leases),
control (the control-plane client the CLI uses too).
"""

from orchestrator.client.core import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
