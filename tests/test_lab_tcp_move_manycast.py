"""Live kernel TCP connections moved between the servers of a manycast (not VIP) lab pool.

The clients connect to the pool's TCP address; their edge router maps it onto the
group, and the routers' kernel multicast entries for (client, group) carry the
packets to a server, which maps them back. A move holds the client's packets at
the edge, hands the sockets over (TCP_REPAIR) and steers every router's
(client, group) entry to the new server before letting the packets go. Each test
runs on both families (demo.toml's pool, and demo6.toml's: MRT6 entries, the
pool's TCP address 2001:db8:70::70). The lab needs root (namespaces, TCP_REPAIR,
iptables' and ip6tables' NFQUEUE, nftables) and these tests skip elsewhere,
saying why.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from importlib.resources import files
from typing import Any

import pytest

from labcheck import lab_missing
from manycast.drivers.kernel import tcp_apps
from manycast.drivers.kernel.tcp_manycast import tcp_address

NEEDS_ROOT = "moving kernel TCP connections needs root (namespaces, TCP_REPAIR); CI runs as root"
TOOLS = ("nft", "iptables", "ip6tables")
NEEDS_TOOLS = "the TCP moves need nft, iptables and ip6tables (NFQUEUE): make lab-deps"
FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]
SERVERS = ["s1", "s2", "s3", "s4"]  # s1, s2 behind rs1; s3, s4 behind rs2
PORT = 7100


def demo_toml(family: int) -> str:
    """The bundled demo (demo6 on IPv6: a manycast pool, five routers) with two clients
    per LAN and no scenario: the moves are the scenario here."""
    name = "demo6.toml" if family == 6 else "demo.toml"
    return re.sub(
        r"\[\[scenario\]\].*?(?=\n\[run\])",
        "",
        files("manycast")
        .joinpath("topologies", name)
        .read_text()
        .replace("count = 120", "count = 2"),
        flags=re.S,
    )


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return NEEDS_ROOT
    missing = lab_missing()  # the kernel's multicast routing, which every lab router needs
    if missing is not None:
        return missing
    if not all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in TOOLS):
        return NEEDS_TOOLS
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(scope="module", params=FAMILIES)
def manycast_lab(tmp_path_factory: pytest.TempPathFactory, request: Any) -> Iterator[Any]:
    from manycast.drivers.kernel.tcp_move import TcpMover
    from manycast.lab import Lab

    family: int = request.param
    prefix = f"tmc{os.getpid() % 100000}f{family}"
    lab = Lab(prefix=prefix, run_root=tmp_path_factory.mktemp("tcpmc"))
    lab.down()
    topology = lab.up(demo_toml(family), "tcp-move-manycast-test.toml")
    mover = TcpMover(lab, topology)
    try:
        mover.start(SERVERS)
        yield lab, topology, mover
    finally:
        mover.close()
        lab.down()


def _connect(lab: Any, topology: Any, client: str) -> socket.socket:
    """A connection to the pool's TCP address from `client`'s namespace, once the
    servers' joins have reached the routers (until then the group's entries drop)."""
    from manycast.drivers import netns

    address = tcp_address(topology.pool.space.family)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    deadline = time.monotonic() + 30
    while True:
        sock = netns.socket_in(lab.ns(client), family, socket.SOCK_STREAM)
        sock.settimeout(3.0)
        try:
            sock.connect((str(address), PORT))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _other(server: str) -> str:
    """A server behind the other router: the path changes beyond the last hop."""
    return {"s1": "s3", "s2": "s4", "s3": "s2", "s4": "s1"}[server]


def _entry_outs(lab: Any, router: str, source: str, group: str) -> tuple[int, ...] | None:
    for entry in lab.mfc(router):
        if str(entry.source) == source and str(entry.group) == group:
            outs: tuple[int, ...] = entry.outs
            return outs
    return None


def test_an_echo_session_moves_between_servers_and_routers_follow(manycast_lab: Any) -> None:
    """Every line comes back numbered on, in order, across moves to a server behind
    another router and back; the server's router's entry for (client, group) goes
    to the new server; the old server keeps no socket."""
    lab, topology, mover = manycast_lab
    sock = _connect(lab, topology, "a1")
    reader = sock.makefile("rb")
    count = 0

    def line(text: str) -> None:
        nonlocal count
        sock.sendall(text.encode() + b"\n")
        count += 1
        assert reader.readline() == f"{count} {text}\n".encode()

    try:
        line("before any move")
        flow = (str(topology.address("a1")), sock.getsockname()[1])
        group = str(topology.pool.group)
        for i in range(6):
            old = mover.where([flow])[flow]
            new = _other(old)
            result = mover.move([flow], old, new)
            assert result.moved == [flow] and not result.steer_failed, result
            line(f"after move {i}")
            assert mover.where([flow]) == {flow: new}
            assert mover.connections(old) == []
            router = topology.servers[new].router
            iface = next(
                name
                for name, spec in topology.interfaces[router].items()
                if topology.address(new) in spec.network
            )
            vifs = lab.ask(router, "router", {"op": "status"})["vifs"]
            vif = int(next(v for v, name in vifs.items() if name == iface))
            outs = _entry_outs(lab, router, flow[0], group)
            assert outs is not None and vif in outs, (router, outs, vif)
    finally:
        reader.close()
        sock.close()


def test_a_download_moves_back_and_forth_with_no_byte_lost(manycast_lab: Any) -> None:
    """A paced download (every byte compared with its pattern) and a second connection
    of the same client move together at each move: the path is the client's."""
    lab, topology, mover = manycast_lab
    sock = _connect(lab, topology, "b1")
    other = _connect(lab, topology, "b1")
    rate = 4 << 20
    sock.sendall(f"GET /bytes/{1 << 40}?rate={rate} HTTP/1.1\r\nHost: pool\r\n\r\n".encode())
    state: dict[str, Any] = {"offset": 0, "error": None, "times": []}
    stop = threading.Event()

    def read() -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        data = head.split(b"\r\n\r\n", 1)[1]
        try:
            while not stop.is_set():
                if data:
                    if data != tcp_apps.body(state["offset"], len(data)):
                        state["error"] = f"wrong bytes at {state['offset']}"
                        return
                    state["offset"] += len(data)
                    state["times"].append(time.perf_counter())
                data = sock.recv(1 << 16)
                if not data:
                    if not stop.is_set():
                        state["error"] = "closed"
                    return
        except OSError as exc:
            if not stop.is_set():
                state["error"] = str(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    address = str(topology.address("b1"))
    flow = (address, sock.getsockname()[1])
    second = (address, other.getsockname()[1])
    pauses = []
    try:
        time.sleep(0.5)
        for _ in range(10):
            old = mover.where([flow])[flow]
            before = state["offset"]
            result = mover.move([flow], old, _other(old))
            assert sorted(result.moved) == sorted([flow, second]), result
            pauses.append(result.pause_ms)
            time.sleep(0.3)
            assert state["error"] is None, state["error"]
            assert state["offset"] > before  # still flowing on the new server
        other.sendall(b"the second connection\n")
        assert other.recv(100) == b"1 the second connection\n"
    finally:
        stop.set()
        sock.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=10)
        sock.close()
        other.close()
    assert state["error"] is None, state["error"]
    assert state["offset"] > rate  # several seconds' worth, every byte checked
    gaps = [b - a for a, b in zip(state["times"], state["times"][1:], strict=False)]
    # No lost packet: a restored socket's first retransmission would wait 1 s.
    assert max(gaps) < 1.0, max(gaps)
    print(f"pauses at the edge {sorted(pauses)}, longest read gap {max(gaps) * 1e3:.1f} ms")
