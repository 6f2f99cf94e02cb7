"""Real kernel TCP connections that move between the VIP pool's servers (TCP_REPAIR) in the lab.

Unchanged clients (curl, socat, wrk) keep their connections while the lab moves
them from server to server: the edge holds the flow's packets, the old server
freezes and dumps the socket and hands it, signed, to the new one, the edge
releases the packets onto the new server's segment. The lab tests run on both
families (vip.toml's pool, and vip6.toml's with an IPv6 VIP). They need root
(namespaces, TCP_REPAIR, iptables' and ip6tables' NFQUEUE) and skip elsewhere,
saying why; the service's state hooks and the transfer's signature are checked
everywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib.resources import files
from ipaddress import ip_address
from typing import Any

import pytest

from labcheck import lab_missing
from manycast import auth
from manycast.drivers.kernel import tcp_apps
from manycast.drivers.kernel.tcp_transfer import (
    Connection,
    export_connection,
    import_connection,
    sign,
    verify,
)
from manycast.wire.tcpstate import NONCE_BYTES, StateTransfer, TcpState, TransferReply, Window

NEEDS_ROOT = "moving kernel TCP connections needs root (namespaces, TCP_REPAIR); CI runs as root"
TOOLS = ("nft", "iptables", "ip6tables", "curl", "socat", "wrk")
NEEDS_TOOLS = (
    "the TCP move tests need nft, iptables, ip6tables, curl, socat and wrk: make lab-deps,"
    " and apt-get install iptables (the NFQUEUE target)"
)
FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]


def vip_toml(family: int) -> str:
    """The bundled vip.toml (vip6.toml on IPv6: two VIP routers, four servers and a
    standby) with two clients per LAN and without its scenario: the moves are the
    scenario here."""
    name = "vip6.toml" if family == 6 else "vip.toml"
    return re.sub(
        r"\[\[scenario\]\].*?(?=\n\[run\])",
        "",
        files("manycast")
        .joinpath("topologies", name)
        .read_text()
        .replace("count = 60", "count = 2"),
        flags=re.S,
    )


def host(address: object) -> str:
    """An address as a URL or socat address writes it (an IPv6 one in brackets)."""
    text = str(address)
    return f"[{text}]" if ":" in text else text


def family_of(address: object) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in str(address) else socket.AF_INET


SERVERS = ["s1", "s2", "s3", "s4"]


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return NEEDS_ROOT
    missing = lab_missing()  # the kernel's multicast routing, which every lab router needs
    if missing is not None:
        return missing
    if not all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in TOOLS):
        return NEEDS_TOOLS
    return None


needs_lab = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _wait(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- the service's hooks and the signature, everywhere ---------------------------------
def test_line_counter_state_moves_with_a_partial_line() -> None:
    app = tcp_apps.LineCounter()
    assert app.received(b"one\ntw") == b"1 one\n"
    moved = tcp_apps.APPS["echo"].import_state(app.export_state())
    assert moved.received(b"o\nthree\n") == b"2 two\n3 three\n"


def test_http_download_resumes_where_it_was_and_keeps_its_pipelined_request() -> None:
    app = tcp_apps.HttpApp()
    head = app.received(b"GET /bytes/3000000 HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\n")
    assert b"Content-Length: 3000000" in head
    first = app.more(1_000_000)
    moved = tcp_apps.APPS["http"].import_state(app.export_state())
    assert isinstance(moved, tcp_apps.HttpApp)
    moved.server = "s9"
    rest = bytearray()
    while moved.streaming:
        rest += moved.more(1 << 20)
    assert hashlib.sha256(first + rest).hexdigest() == tcp_apps.digest(3_000_000)
    # The pipelined request, completed after the move, is answered after the body.
    answer = moved.received(b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"s9 2 /after\n")


def test_a_download_takes_back_its_unsent_tail_but_not_its_headers() -> None:
    """What the old socket had not sent need not move: the download gives it again."""
    app = tcp_apps.HttpApp()
    head = app.received(b"GET /bytes/1000 HTTP/1.1\r\n\r\n")
    given = app.more(600)
    assert not app.take_back(601)  # that would reach into the headers
    assert app.take_back(100) and app.more(1000) == given[500:] + tcp_apps.body(600, 400)
    assert not app.take_back(1)  # the body is finished: nothing to give again
    assert head.startswith(b"HTTP/1.1 200") and tcp_apps.LineCounter().take_back(0)
    assert not tcp_apps.LineCounter().take_back(1)


def test_http_range_and_bad_requests() -> None:
    app = tcp_apps.HttpApp()
    out = app.received(b"GET /bytes/10?from=4 HTTP/1.1\r\n\r\n")
    assert b"Content-Length: 6" in out and app.more(100) == tcp_apps.body(4, 6)
    bad = tcp_apps.HttpApp()
    assert bad.received(b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400") and bad.closing
    with pytest.raises(tcp_apps.AppStateError):
        tcp_apps.HttpApp.import_state(b"short")


def test_framework_state_carries_the_unwritten_output() -> None:
    conn = Connection(socket.socket(), ("10.1.0.2", 4000), tcp_apps.LineCounter(5, b"par"))
    conn.pending += b"6 waiting\n"
    try:
        name, data = export_connection(conn)
    finally:
        conn.sock.close()
    state = TcpState(
        local=(ip_address("203.0.113.80"), 7100),
        remote=(ip_address("10.1.0.2"), 4000),
        write_seq=1,
        unsent=0,
        send_queue=b"",
        rcv_nxt=1,
        recv_queue=b"",
        mss=1460,
        window=Window(1, 1, 1, 1, 1),
        app=name,
        app_state=data,
    )
    app, pending = import_connection(state)
    assert isinstance(app, tcp_apps.LineCounter) and (app.count, app.partial) == (5, b"par")
    assert pending == b"6 waiting\n"


def test_transfers_verify_only_with_the_pool_key() -> None:
    key, other = auth.generate(), auth.generate()
    state = TcpState(
        local=(ip_address("203.0.113.80"), 7100),
        remote=(ip_address("10.1.0.2"), 4000),
        write_seq=1,
        unsent=0,
        send_queue=b"x" * 100_000,
        rcv_nxt=1,
        recv_queue=b"",
        mss=1460,
        window=Window(1, 1, 1, 1, 1),
    )
    transfer = StateTransfer("s1", bytes(NONCE_BYTES), 1, (state,))
    wire = sign(transfer, key)
    decoded = StateTransfer.from_wire(wire)
    assert verify(wire, decoded, key.public_key())
    assert not verify(wire, decoded, other.public_key())
    unsigned = transfer.to_wire()
    assert not verify(unsigned, StateTransfer.from_wire(unsigned), key.public_key())
    tampered = bytearray(wire)
    tampered[200] ^= 1
    assert not verify(bytes(tampered), StateTransfer.from_wire(bytes(tampered)), key.public_key())


# -- the lab ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FAMILIES)
def moving_lab(tmp_path_factory: pytest.TempPathFactory, request: Any) -> Iterator[Any]:
    from manycast.drivers import netns
    from manycast.drivers.kernel.tcp_move import TcpMover
    from manycast.lab import Lab

    family: int = request.param
    lab = Lab(prefix=f"tm{os.getpid()}f{family}", run_root=tmp_path_factory.mktemp("tcpmove"))
    lab.down()
    topology = lab.up(vip_toml(family), "tcp-move-test.toml")
    mover = TcpMover(lab, topology)
    try:
        # The download's client keeps a small receive buffer, so that the servers'
        # send queues are full when the connection moves (the default holds 30 MB).
        # (One setting for both families: IPv6's TCP reads net.ipv4.tcp_rmem too.)
        netns.sysctl(lab.ns("a1"), {"net.ipv4.tcp_rmem": "4096 65536 262144"})
        mover.start(SERVERS)

        def following() -> bool:
            return all(
                len(lab.ask(v, "vip_router", {"op": "status"})["alive"]) >= 4
                for v in topology.vip_routers
            )

        _wait(following, what="the VIP routers to follow the servers")
        yield lab, topology, mover
    finally:
        mover.close()
        lab.down()


class _Echo:
    """A line session from a client's namespace, through the VIP."""

    def __init__(self, lab: Any, topology: Any, client: str) -> None:
        from manycast.drivers import netns

        vip = topology.pool.vip
        self.sock = netns.socket_in(lab.ns(client), family_of(vip), socket.SOCK_STREAM)
        self.sock.settimeout(5.0)
        self.sock.connect((str(vip), 7100))
        self.flow = (str(topology.address(client)), self.sock.getsockname()[1])
        self.file = self.sock.makefile("rb")
        self.count = 0

    def line(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")
        self.count += 1
        assert self.file.readline() == f"{self.count} {text}\n".encode()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _next(server: str, skip: str | None = None) -> str:
    others = [s for s in SERVERS if s not in (server, skip)]
    return others[SERVERS.index(server) % len(others)]


def _tcp_rsts(lab: Any, node: str) -> int:
    """RSTs the node's TCP has sent (its namespace's own counters)."""
    from manycast.drivers import netns

    lines = [line.split() for line in netns.read_in(lab.ns(node), "/proc/net/snmp").splitlines()]
    names, values = [line for line in lines if line[0] == "Tcp:"][:2]
    return int(values[names.index("OutRsts")])


def _sockets_of(lab: Any, node: str, port: int) -> list[str]:
    """/proc/net/tcp and tcp6 lines of `node` whose remote port is `port` (any state)."""
    from manycast.drivers import netns

    found = []
    table = netns.read_in(lab.ns(node), "/proc/net/tcp")
    table += netns.read_in(lab.ns(node), "/proc/net/tcp6")
    for line in table.splitlines():
        if line.split()[0] == "sl":
            continue
        remote = line.split()[2]
        if int(remote.split(":")[1], 16) == port:
            found.append(line)
    return found


@needs_lab
def test_curl_socat_and_wrk_keep_their_connections_across_moves(moving_lab: Any) -> None:
    """curl downloading at a limited rate (its bytes' sha256 match), socat's
    interactive session (every line back, numbered, in order) and wrk (no socket
    error) run at once while each one's connections move from server to server
    at least 20 times; nothing on the client side knows."""
    lab, topology, mover = moving_lab
    vip = host(topology.pool.vip)
    size = 24_000_000
    out = lab.run_dir / "download.bin"
    curl = lab.popen(
        "a1",
        ["curl", "-sS", "--limit-rate", "3M", "-o", str(out), f"http://{vip}:7100/bytes/{size}"],
        stderr=subprocess.PIPE,
    )
    socat = lab.popen(
        "a2",
        ["socat", "-", f"TCP:{vip}:7100"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wrk = lab.popen(
        "b1",
        ["wrk", "-t", "1", "-c", "4", "-d", "8s", "--timeout", "3s", f"http://{vip}:7100/"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert socat.stdin is not None and socat.stdout is not None
    lines = [f"line {i} of the interactive session" for i in range(200)]
    echoed: list[bytes] = []

    def talk() -> None:
        assert socat.stdin is not None
        for text in lines:
            socat.stdin.write(text.encode() + b"\n")
            socat.stdin.flush()
            time.sleep(0.03)

    def listen() -> None:
        assert socat.stdout is not None
        for raw in socat.stdout:
            echoed.append(raw)

    threads = [threading.Thread(target=talk), threading.Thread(target=listen)]
    for thread in threads:
        thread.start()
    clients = {"a1": "curl", "a2": "socat", "b1": "wrk"}
    addresses = {str(topology.address(c)): name for c, name in clients.items()}
    moves = dict.fromkeys(clients.values(), 0)
    pauses: list[float] = []
    try:
        _wait(
            lambda: {addresses.get(f[0]) for f in mover.where(_all_flows(mover))} >= set(moves),
            what="curl, socat and wrk to connect",
        )
        deadline = time.monotonic() + 30
        while min(moves.values()) < 22 and time.monotonic() < deadline:
            here = mover.where(_all_flows(mover))
            for name in moves:
                flows = [f for f, s in here.items() if addresses.get(f[0]) == name]
                if not flows or (name == "curl" and curl.poll() is not None):
                    continue
                server = here[flows[0]]
                flows = [f for f in flows if here[f] == server]
                result = mover.move(flows, server, _next(server))
                assert result.moved == flows, result.refused
                moves[name] += 1
                pauses.append(result.pause_ms)
            time.sleep(0.05)
    finally:
        talker, listener = threads
        talker.join(timeout=30)
        socat.stdin.close()  # socat sends our FIN, the service closes, socat ends
        listener.join(timeout=30)
    assert min(moves.values()) >= 20, moves
    assert curl.wait(timeout=60) == 0, curl.stderr.read() if curl.stderr else ""
    assert out.stat().st_size == size
    assert hashlib.sha256(out.read_bytes()).hexdigest() == tcp_apps.digest(size)
    socat.wait(timeout=10)
    assert echoed == [f"{i + 1} {text}\n".encode() for i, text in enumerate(lines)]
    report = wrk.communicate(timeout=30)[0].decode(errors="replace")
    assert wrk.returncode == 0, report
    assert "Socket errors" not in report and "Non-2xx" not in report, report
    requests = re.search(r"(\d+) requests in", report)
    assert requests is not None and int(requests.group(1)) > 100, report
    print(f"moves {moves}, pause median {sorted(pauses)[len(pauses) // 2]:.1f} ms")


def _all_flows(mover: Any) -> list[tuple[str, int]]:
    return [flow for server in SERVERS for flow in mover.connections(server)]


@needs_lab
def test_after_a_move_the_old_server_holds_no_trace_and_sent_no_reset(moving_lab: Any) -> None:
    lab, topology, mover = moving_lab
    echo = _Echo(lab, topology, "b2")
    try:
        echo.line("before")
        old = mover.where([echo.flow])[echo.flow]
        new = _next(old)
        resets = _tcp_rsts(lab, old)
        assert len(_sockets_of(lab, old, echo.flow[1])) == 1
        result = mover.move([echo.flow], old, new)
        assert result.moved == [echo.flow], result.refused
        echo.line("after")
        assert mover.where([echo.flow]) == {echo.flow: new}
        assert _sockets_of(lab, old, echo.flow[1]) == []  # no socket in any state
        assert _tcp_rsts(lab, old) == resets
        assert mover.status(old)["connections"] == []
        # And back again: the flow returns to a server it left.
        assert mover.move([echo.flow], new, old).moved == [echo.flow]
        echo.line("back")
        assert _sockets_of(lab, new, echo.flow[1]) == []
    finally:
        echo.close()


@needs_lab
def test_a_client_port_reused_after_a_move_reaches_its_server_again(moving_lab: Any) -> None:
    """The old server keeps a moved flow's entry marked gone for a while; a new
    connection from the same client port (after a reset) must still get through."""
    from manycast.drivers import netns

    lab, topology, mover = moving_lab
    echo = _Echo(lab, topology, "b2")
    port = echo.flow[1]
    echo.line("first life")
    home = mover.where([echo.flow])[echo.flow]
    assert mover.move([echo.flow], home, _next(home)).moved == [echo.flow]
    echo.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    echo.close()  # a reset: no TIME_WAIT, the port is free at once
    again = netns.socket_in(lab.ns("b2"), family_of(echo.flow[0]), socket.SOCK_STREAM)
    with again:
        again.settimeout(5.0)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((echo.flow[0], port))
        again.connect((str(topology.pool.vip), 7100))
        again.sendall(b"second life\n")
        assert again.recv(100) == b"1 second life\n"
        assert mover.where([echo.flow]) == {echo.flow: home}  # by the allocation, as before


@needs_lab
@pytest.mark.parametrize("failure", ["refused", "dies", "down"])
def test_a_failed_move_leaves_the_connection_with_the_old_server(
    moving_lab: Any, failure: str
) -> None:
    """The new server refuses the state, dies after reading it, or is not there:
    the old server thaws the socket and the edge puts the flow back on its segment;
    the session carries on, counted, without a lost or doubled line."""
    lab, topology, mover = moving_lab
    echo = _Echo(lab, topology, "a2")
    try:
        echo.line("first")
        old = mover.where([echo.flow])[echo.flow]
        new = _next(old)
        aborted = mover.status(old)["stats"]["moves_aborted"]
        if failure == "refused":
            mover.ask(new, {"op": "refuse_next"})
        elif failure == "dies":
            mover.ask(new, {"op": "die_next"})
        else:
            mover.kill_server(new)
        result = mover.move([echo.flow], old, new)
        assert result.moved == [] and list(result.refused) == [f"{echo.flow[0]}:{echo.flow[1]}"]
        for i in range(3):
            echo.line(f"still here {i}")
        assert mover.where([echo.flow]) == {echo.flow: old}
        assert mover.status(old)["stats"]["moves_aborted"] == aborted + 1
        if failure != "refused":
            mover.start_server(new)
        # The next move goes through.
        assert mover.move([echo.flow], old, new).moved == [echo.flow]
        echo.line("moved at last")
    finally:
        echo.close()


@needs_lab
def test_unsigned_or_forged_state_is_refused_and_counted(moving_lab: Any) -> None:
    """A state transfer without the pool key's signature (none, another key's, or
    bytes that do not decode) restores nothing: the agent refuses and counts it."""
    from manycast.drivers import netns
    from manycast.drivers.kernel.tcp_transfer import frame, read_frame

    lab, topology, mover = moving_lab
    state = TcpState(
        local=(topology.pool.vip, 7100),
        remote=(ip_address(str(topology.address("a1"))), 4242),
        write_seq=1000,
        unsent=0,
        send_queue=b"",
        rcv_nxt=2000,
        recv_queue=b"",
        mss=1460,
        window=Window(2000, 65535, 65535, 65535, 2000),
        app="echo",
        app_state=b"\0\0\0\0" + bytes(8),
    )
    transfer = StateTransfer("s1", os.urandom(NONCE_BYTES), int(time.time() * 1000), (state,))
    forged = sign(transfer, auth.generate())
    target = str(topology.address("s3"))

    def send(data: bytes) -> TransferReply | None:
        sock = netns.socket_in(lab.ns("s1"), family_of(target), socket.SOCK_STREAM)
        with sock:
            sock.settimeout(5)
            sock.connect((target, 7101))
            sock.sendall(frame(data))
            try:
                return TransferReply.from_wire(read_frame(sock))
            except OSError:
                return None

    before = mover.status("s3")["stats"]
    unsigned = send(transfer.to_wire())
    assert unsigned is not None and unsigned.refused == ("unsigned",)
    bad = send(forged)
    assert bad is not None and bad.refused == ("bad signature",)
    garbage = send(b"MCKT" + os.urandom(40))
    assert garbage is not None and garbage.restored == 0
    after = mover.status("s3")["stats"]
    assert after["refused_unsigned"] == before["refused_unsigned"] + 1
    assert after["refused_bad_signature"] == before["refused_bad_signature"] + 1
    assert after["refused_malformed"] == before["refused_malformed"] + 1
    assert after["moved_in"] == before["moved_in"]
    assert all(c[1] != 4242 for c in mover.status("s3")["connections"])


@needs_lab
def test_a_moved_flow_whose_edge_forgets_it_reaches_its_new_server(moving_lab: Any) -> None:
    """The VIP routers are told of each move. When the edge forgets a moved flow (its
    conntrack entry, and the tag with it, gone), the flow's next packet reaches a VIP
    router, which sends it on to the server the flow moved to, not to the one it left
    (which drops it): the session carries on."""
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    from manycast.drivers import netns

    lab, topology, mover = moving_lab
    echo = _Echo(lab, topology, "b2")
    try:
        echo.line("before")
        old = mover.where([echo.flow])[echo.flow]
        new = _next(old)
        result = mover.move([echo.flow], old, new)
        assert result.moved == [echo.flow]
        assert result.vip_routers_told == len(topology.vip_routers)
        echo.line("moved")

        def forget() -> None:
            family = family_of(echo.flow[0])
            key = NFCTAttrTuple(
                family=family,
                saddr=echo.flow[0],
                daddr=str(topology.pool.vip),
                proto=socket.IPPROTO_TCP,
                sport=echo.flow[1],
                dport=7100,
            )
            with NFCTSocket(nfgen_family=family) as ct:
                ct.entry("del", tuple_orig=key)

        def through_vip_routers() -> int:
            return sum(
                lab.ask(v, "vip_router", {"op": "status"})["stats"]["first_packets"]
                for v in topology.vip_routers
            )

        netns.run_in(lab.ns(topology.router_of("b2")), forget)
        before = through_vip_routers()
        echo.line("after the edge forgot the flow")
        echo.line("and on")
        assert through_vip_routers() > before  # it did go through a VIP router
        assert mover.where([echo.flow]) == {echo.flow: new}
    finally:
        echo.close()
