"""ZeroMQ CURVE for TCP endpoints: key generation, server-side set-up with an authenticator, client set-up.

Used by the supervisor and workers (servers) and by clients. ipc sockets need none of this: they live in
the 0700 run directory, so the file system already restricts who can connect.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from orchestrator.common.config import TransportSection
from orchestrator.common.errors import ConfigError

_AUTHENTICATORS: dict[int, ThreadAuthenticator] = {}


def keygen(directory: str | os.PathLike, name: str = "server") -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600) into `directory`; return both paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = zmq.auth.create_certificates(str(d), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def _load(path: str | os.PathLike, need_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE certificate {path}: {exc}") from None
    if need_secret and secret is None:
        raise ConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def secure_server(ctx: zmq.Context, sock: zmq.Socket, t: TransportSection) -> None:
    """Make `sock` a CURVE server (call before bind). Starts one ZAP authenticator per context, which
    admits only the client certificates in curve_clients_dir (or any client holding the server key)."""
    if not t.curve:
        return
    if not zmq.has("curve"):
        raise ConfigError("transport.curve = true but this libzmq was built without CURVE support")
    public, secret = _load(t.curve_server_secret, need_secret=True)
    auth = _AUTHENTICATORS.get(id(ctx))
    if auth is None:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        location = t.curve_clients_dir or zmq.auth.CURVE_ALLOW_ANY
        auth.configure_curve(domain="*", location=location)
        _AUTHENTICATORS[id(ctx)] = auth
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def stop_authenticator(ctx: zmq.Context) -> None:
    auth = _AUTHENTICATORS.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


class ClientKeys:
    """What a client needs to talk to a CURVE-protected orchestrator: the server's public key and its own
    key pair (a .key_secret file from `orchestrator keygen DIR --name CLIENT`)."""

    def __init__(self, server_public: str | os.PathLike, client_secret: str | os.PathLike) -> None:
        self.server_public, _ = _load(server_public, need_secret=False)
        self.public, self.secret = _load(client_secret, need_secret=True)

    def apply(self, sock: zmq.Socket) -> None:
        """Call before connect."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
