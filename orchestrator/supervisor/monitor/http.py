"""The supervisor's HTTP server: /livez, /readyz, /startupz for orchestration systems (Kubernetes probes)
and /metrics for Prometheus (when prometheus-client is installed; the probes work without it).

Runs in the supervisor: a ThreadingHTTPServer on a daemon thread, started by the monitor on
`monitor.metrics_port` at `monitor.http_host`. Handlers only read: the health verdict comes from a
callable that reads the supervisor's state (orchestrator/supervisor/core.py `health`), never blocking its
loop.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

PROBES = ("/livez", "/readyz", "/startupz")


def probe_reply(health: dict[str, Any], path: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of one probe from a health verdict {live, ready, started, reason, ...}."""
    key = {"/livez": "live", "/readyz": "ready", "/startupz": "started"}[path]
    ok = bool(health.get(key))
    body: dict[str, Any] = {
        "ok": ok,
        **({} if ok else {"reason": health.get(f"{key}_reason") or health.get("reason") or "not yet"}),
        **{k: health[k] for k in ("ready_workers", "workers", "min_ready_workers") if k in health},
    }
    return (200 if ok else 503), body


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        path = self.path.split("?", 1)[0]
        if path in PROBES:
            try:
                code, body = probe_reply(self.server.health(), path)
            except Exception as exc:  # the verdict itself failed: say so, as a failed probe
                code, body = 503, {"ok": False, "reason": f"health check failed: {exc}"}
            self._send(code, "application/json", json.dumps(body).encode() + b"\n")
        elif path == "/metrics":
            metrics = self.server.metrics
            if metrics is None:
                self._send(503, "text/plain", f"{self.server.metrics_error}\n".encode())
            else:
                content_type, payload = metrics()
                self._send(200, content_type, payload)
        else:
            self._send(404, "text/plain", b"not found: /livez /readyz /startupz /metrics\n")

    def _send(self, code: int, content_type: str, payload: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes every few seconds: not logged
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    health: Callable[[], dict[str, Any]]
    metrics: Callable[[], tuple[str, bytes]] | None
    metrics_error: str


def _prometheus(metrics_data: Callable[[], dict]) -> tuple[Callable[[], tuple[str, bytes]] | None, str]:
    try:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        from orchestrator.supervisor.monitor.metrics import make_registry
    except ImportError:
        return (
            None,
            "prometheus-client is not installed: pip install prometheus-client (the probes work without it)",
        )
    registry = make_registry(metrics_data)
    return (lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))), ""


def start_http_server(
    host: str, port: int, health: Callable[[], dict[str, Any]], metrics_data: Callable[[], dict]
) -> ThreadingHTTPServer:
    """Serve the probes and /metrics on host:port from a daemon thread; returns the server (shutdown())."""
    server = _Server((host, port), _Handler)
    server.health = health
    server.metrics, server.metrics_error = _prometheus(metrics_data)
    threading.Thread(target=server.serve_forever, name="orchestrator-http", daemon=True).start()
    log.info(
        "[monitor] HTTP on http://%s:%d: /livez /readyz /startupz /metrics%s",
        host,
        server.server_address[1],
        "" if server.metrics else " (off: prometheus-client missing)",
    )
    return server
