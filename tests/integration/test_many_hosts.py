"""Many hosts, simulated on this machine: three orchestrators, each on its own loopback address
(127.0.0.2-4) with TCP and CURVE as a Kubernetes host would run them, one Client over all three. Load
spreads over every host with every result checked; a host SIGKILLed under load costs nothing (no request
lost or answered twice) and gets no new work within 2 s; restarted, it takes load within 5 s of its /readyz
turning 200. With a DNS name (a test resolver), hosts that appear take load and hosts that leave get none."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from orchestrator.client import Client
from orchestrator.common.security import ClientKeys, keygen
from tests.conftest import cli, wait_until, write_config
from tests.integration.load import ITEM, Load
from workers.engines.synthetic_math import reference

pytestmark = pytest.mark.timeout(240)

ADDRS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
WORK = 50


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 free on every test address a moment ago."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n > 65535:
            continue
        try:
            socks = []
            for addr in ADDRS:
                for q in range(p, p + n):
                    s = socket.socket()
                    socks.append(s)
                    s.bind((addr, q))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


class Hosts:
    """Three orchestrators sharing one CURVE server key (one Kubernetes Secret) and one authorised client."""

    def __init__(self, tmp: Path, factory) -> None:
        keys = tmp / "keys"
        _, self.server_secret = keygen(keys, "server")
        _, client_secret = keygen(tmp / "client", "app")
        allowed = tmp / "allowed"
        allowed.mkdir()
        (allowed / "app.key").write_bytes((tmp / "client" / "app.key").read_bytes())
        self.keys = ClientKeys(keys / "server.key", client_secret)
        self.port = free_ports(3)  # control, events, metrics: the same ports on every host, as in a DaemonSet
        for addr in ADDRS:
            (tmp / addr).mkdir()
        self.configs = [
            write_config(
                tmp / addr,
                {
                    "orchestrator": {"name": f"h{i}", "stop_timeout_s": 5},
                    "workers": {"device": "cpu", "count": 1},
                    "model": {"kind": "synthetic", "item_shape": [ITEM], "work": WORK, "max_batch": 32},
                    "transport": {
                        "kind": "tcp",
                        "host": addr,
                        "control_port": self.port,
                        "curve": True,
                        "curve_server_secret": str(self.server_secret),
                        "curve_clients_dir": str(allowed),
                        "shm_mb": 0,
                    },
                    "monitor": {"metrics_port": self.port + 2, "http_host": addr},
                    "restart": {"backoff_initial_s": 0.2},
                },
            )
            for i, addr in enumerate(ADDRS)
        ]
        self.orchs = [factory(c) for c in self.configs]

    def endpoint(self, i: int) -> str:
        return f"tcp://{ADDRS[i]}:{self.port}"

    def label(self, i: int) -> str:
        return f"{ADDRS[i]}:{self.port}"

    def served(self, i: int) -> int:
        return sum(w["requests"] for w in self.orchs[i].status()["workers"])

    def readyz(self, i: int) -> int:
        try:
            with urllib.request.urlopen(f"http://{ADDRS[i]}:{self.port + 2}/readyz", timeout=1) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0


def test_host_lost_and_restarted_under_load(short_tmp: Path, orchestrator_factory) -> None:
    hosts = Hosts(short_tmp, orchestrator_factory)
    with (
        Client([hosts.endpoint(i) for i in range(3)], curve=hosts.keys, timeout=30) as c,
        Load(c, work=WORK, threads=4) as load,
    ):
        assert set(c.hosts) == {hosts.label(i) for i in range(3)}
        wait_until(lambda: all(hosts.served(i) > 0 for i in range(3)), 30, "every host to serve")
        victim = hosts.orchs[1].status()["pid"]
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)  # the host's workers die with their supervisor
        wait_until(
            lambda: c.hosts[hosts.label(1)]["state"] != "up", 5, "the client to give the host up", every=0.005
        )
        dropped_after = time.monotonic() - t_kill
        at_loss = load.ok
        wait_until(
            lambda: load.ok > at_loss + 20, 30, "load to go on"
        )  # a pick made just before is sent by now
        sent_at_loss = c.hosts[hosts.label(1)]["sent"]
        wait_until(lambda: load.ok > at_loss + 120, 30, "load to go on without the host")
        assert c.hosts[hosts.label(1)]["sent"] == sent_at_loss  # nothing new for the lost host
        # The host comes back (same address and ports, new worker endpoints).
        wait_until(
            lambda: cli("start", str(hosts.configs[1]), "--detach", timeout=60).returncode == 0,
            60,
            "restart",
            every=0.5,
        )
        wait_until(lambda: hosts.readyz(1) == 200, 30, "/readyz 200 on the restarted host")
        t_ready = time.monotonic()
        wait_until(
            lambda: c.hosts[hosts.label(1)]["sent"] > sent_at_loss,
            10,
            "load on the restarted host",
            every=0.005,
        )
        took_load = time.monotonic() - t_ready
    assert not load.errors, load.errors[:3]
    assert load.wrong == 0 and load.ok == load.sent, (load.ok, load.sent)  # none lost, each answered once
    assert dropped_after < 2.0, f"the dead host kept getting work for {dropped_after:.2f}s"
    assert took_load < 5.0, f"the restarted host took load {took_load:.2f}s after /readyz"
    print(
        f"\nhost dropped after {dropped_after * 1000:.0f} ms; restarted host took load {took_load * 1000:.0f} ms "
        f"after /readyz 200; {load.ok} requests, 0 lost"
    )


def test_hosts_follow_a_dns_name(short_tmp: Path, orchestrator_factory) -> None:
    hosts = Hosts(short_tmp, orchestrator_factory)
    listed = [ADDRS[0], ADDRS[1]]
    lookups: list[str] = []

    def resolve(name: str) -> list[str]:
        lookups.append(name)
        return list(listed)

    target = f"tcp://orchestrator.test.svc:{hosts.port}"
    with (
        Client(target, curve=hosts.keys, resolve=resolve, resolve_interval_s=0.1, timeout=30) as c,
        Load(c, work=WORK, threads=4) as load,
    ):
        assert lookups[0] == "orchestrator.test.svc" and set(c.hosts) == {hosts.label(0), hosts.label(1)}
        assert all(h["state"] == "up" for h in c.hosts.values())
        wait_until(lambda: hosts.served(0) > 0 and hosts.served(1) > 0, 30, "both listed hosts to serve")
        assert hosts.served(2) == 0
        listed.append(ADDRS[2])  # a new host appears in DNS
        wait_until(lambda: hosts.served(2) > 0, 10, "the new host to take load")
        listed.remove(ADDRS[0])  # and one leaves: it gets no new work
        wait_until(lambda: c.hosts[hosts.label(0)]["state"] == "retired", 5, "the host to be retired")
        mark = load.ok
        wait_until(lambda: load.ok > mark + 20, 30, "load to go on")  # a pick made just before is sent by now
        before = c.hosts[hosts.label(0)]["sent"]
        at = c.hosts[hosts.label(2)]["sent"]
        wait_until(lambda: c.hosts[hosts.label(2)]["sent"] > at + 50, 30, "load to go on")
        assert c.hosts[hosts.label(0)]["sent"] == before, "a host no longer listed got new work"


def test_status_json_of_a_host(short_tmp: Path, orchestrator_factory) -> None:
    hosts = Hosts(short_tmp, orchestrator_factory)
    with urllib.request.urlopen(f"http://{ADDRS[2]}:{hosts.port + 2}/readyz", timeout=2) as r:
        assert json.loads(r.read()) == {"ok": True, "ready_workers": 1, "workers": 1, "min_ready_workers": 1}


def test_a_host_bound_to_every_interface_is_reached_at_the_address_used(
    short_tmp: Path, orchestrator_factory
) -> None:
    """A pod binds 0.0.0.0 and advertises it; the client connects to the address its control endpoint reached."""
    keys = short_tmp / "keys"
    _, server_secret = keygen(keys, "server")
    _, client_secret = keygen(short_tmp / "client", "app")
    port = free_ports(2)
    config = write_config(
        short_tmp,
        {
            "workers": {"device": "cpu", "count": 1},
            "model": {"kind": "synthetic", "item_shape": [ITEM], "work": WORK, "max_batch": 8},
            "transport": {
                "kind": "tcp",
                "host": "0.0.0.0",
                "control_port": port,
                "curve": True,
                "curve_server_secret": str(server_secret),
                "shm_mb": 0,
            },
        },
    )
    orch = orchestrator_factory(config)
    assert orch.status()["workers"][0]["endpoint"].startswith("tcp://0.0.0.0:")
    x = np.ones((2, ITEM), np.float32)
    with Client(f"tcp://{ADDRS[0]}:{port}", curve=ClientKeys(keys / "server.key", client_secret)) as c:
        assert c.workers[0]["endpoint"].startswith(f"tcp://{ADDRS[0]}:")
        assert c._io.workers["w0"].endpoint.startswith(
            f"tcp://{ADDRS[0]}:"
        )  # what the I/O thread connects to
        assert np.array_equal(c.infer(x)["y"], reference(x, WORK))
        assert np.array_equal(c.submit(x).result(30)["y"], reference(x, WORK))


def test_a_silent_host_is_given_up_and_taken_back(short_tmp: Path, orchestrator_factory) -> None:
    """No connection drops when a host goes silent (a partition; here its supervisor is SIGSTOPped): its
    heartbeats stop, and the client gives it up within 2 s all the same; when it speaks again, it is back."""
    hosts = Hosts(short_tmp, orchestrator_factory)
    with (
        Client([hosts.endpoint(i) for i in range(3)], curve=hosts.keys, timeout=30) as c,
        Load(c, work=WORK, threads=4) as load,
    ):
        wait_until(lambda: all(h["sent"] > 0 for h in c.hosts.values()), 30, "every host to take work")
        pid = hosts.orchs[2].status()["pid"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(
                lambda: c.hosts[hosts.label(2)]["state"] != "up",
                5,
                "the silent host to be given up",
                every=0.005,
            )
            silent_after = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: c.hosts[hosts.label(2)]["state"] == "up", 10, "the host back")
        back = c.hosts[hosts.label(2)]["sent"]
        wait_until(lambda: c.hosts[hosts.label(2)]["sent"] > back, 10, "work for it again")
    assert not load.errors, load.errors[:3]
    assert load.wrong == 0 and load.ok == load.sent
    assert silent_after < 2.0, f"a silent host kept its place for {silent_after:.2f}s"
    print(f"\nsilent host given up after {silent_after * 1000:.0f} ms")
