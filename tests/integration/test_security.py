"""Security defaults: 0700 run directory and 0600 sockets, TCP control that refuses `stop`, CURVE
authentication (an authorised client works; clients without keys or with unknown keys are refused)."""

from __future__ import annotations

import socket
import stat

import numpy as np
import pytest

from orchestrator.client import Client
from orchestrator.client.control import ControlClient
from orchestrator.common.config import ConfigError, parse_config
from orchestrator.common.errors import ControlError, UnavailableError
from orchestrator.common.security import ClientKeys, keygen
from tests.conftest import write_config

pytestmark = pytest.mark.timeout(120)


def free_port_pair() -> int:
    """A port p such that p and p+1 were free a moment ago (control socket and events socket)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
        if p >= 65535:
            continue
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def base(**transport: object) -> dict:
    return {
        "workers": {"count": 1},
        "model": {"kind": "synthetic", "item_shape": [4], "max_batch": 8},
        "transport": transport,
    }


def test_run_dir_and_socket_permissions(short_tmp, orchestrator_factory) -> None:
    orch = orchestrator_factory(write_config(short_tmp, base()))
    assert stat.S_IMODE(orch.run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((orch.run_dir / "control.sock").stat().st_mode) == 0o660  # for users let into the dir
    for name in ("events.sock", "supervisor.sock"):
        assert stat.S_IMODE((orch.run_dir / name).stat().st_mode) == 0o600, name


def test_tcp_without_curve_on_loopback_and_stop_refused_remotely(short_tmp, orchestrator_factory) -> None:
    port = free_port_pair()
    orch = orchestrator_factory(write_config(short_tmp, base(kind="tcp", control_port=port)))
    (w,) = orch.status()["workers"]
    assert w["endpoint"].startswith("tcp://127.0.0.1:")
    x = np.ones((2, 4), np.float32)
    with Client(f"tcp://127.0.0.1:{port}") as c:
        np.testing.assert_array_equal(c.infer(x)["y"], x)
    with ControlClient(f"tcp://127.0.0.1:{port}") as ctl:
        assert ctl.call("ping")["pong"]
        with pytest.raises(ControlError, match="only accepted on the local control socket"):
            ctl.call("stop")
    assert orch.status()["stopping"] is False


def test_non_loopback_tcp_needs_curve() -> None:
    with pytest.raises(ConfigError, match="without curve = true"):
        parse_config({"transport": {"kind": "tcp", "host": "0.0.0.0"}})
    parse_config({"transport": {"kind": "tcp", "host": "0.0.0.0", "insecure": True}})


def test_curve_admits_authorised_clients_only(short_tmp, orchestrator_factory) -> None:
    keys = short_tmp / "keys"
    _, server_secret = keygen(keys, "server")
    _, alice_secret = keygen(short_tmp / "clients-pending", "alice")
    _, mallory_secret = keygen(short_tmp / "others", "mallory")
    allowed = short_tmp / "allowed"
    allowed.mkdir()
    (allowed / "alice.key").write_bytes((short_tmp / "clients-pending" / "alice.key").read_bytes())
    port = free_port_pair()
    cfg = write_config(
        short_tmp,
        base(
            kind="tcp",
            control_port=port,
            curve=True,
            curve_server_secret=str(server_secret),
            curve_clients_dir=str(allowed),
        ),
    )
    orchestrator_factory(cfg)
    target = f"tcp://127.0.0.1:{port}"
    server_public = keys / "server.key"
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with Client(target, curve=ClientKeys(server_public, alice_secret)) as c:
        np.testing.assert_array_equal(c.infer(x)["y"], x)
        np.testing.assert_array_equal(c.submit(x).result(10)["y"], x)
    with pytest.raises(UnavailableError):
        Client(target, connect_timeout=1.5)  # no keys: the CURVE handshake never completes
    with pytest.raises(UnavailableError):
        Client(target, connect_timeout=1.5, curve=ClientKeys(server_public, mallory_secret))  # unknown key
