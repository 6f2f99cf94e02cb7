"""Session transport: endpoints back to back through a virtual network.

The network carries real wire bytes (every segment goes through
`to_wire`/`from_wire`), with a delay, seeded random loss, duplication and
reordering, on a virtual clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import ipaddress
import itertools
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.errors import ConfigError, ManycastError
from manycast.protocol.tcp import (
    Address,
    ChangeDestinationReceived,
    Connected,
    Connection,
    ConnectionClosed,
    ConnectionReset,
    ConnectionTimedOut,
    ConnKey,
    DataReceived,
    Demultiplexer,
    EndpointEvent,
    SessionConfig,
    SessionError,
    State,
    StreamEnded,
    UnknownSegment,
)
from manycast.wire.errors import WireError
from manycast.wire.transport import (
    ChangeDestination,
    Destination,
    IPAddress,
    Mss,
    TagCookie,
    TcpFlags,
    TcpSegment,
)

CLIENT = ipaddress.IPv4Address("198.51.100.10")
GROUP = ipaddress.IPv4Address("233.252.0.1")  # the service address every server answers from
SERVER_N = ipaddress.IPv4Address("192.0.2.20")
CLIENT6 = ipaddress.IPv6Address("2001:db8:1::10")
GROUP6 = ipaddress.IPv6Address("2001:db8:ff::1")
PORT = 80

FAST = SessionConfig(rto_initial=0.5, rto_min=0.05, max_retries=12, time_wait=0.5)


def state_of(conn: Connection) -> State:
    """The state, read through a call so that the type checker does not pin it."""
    return conn.state


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --- virtual network --------------------------------------------------------------

App = Callable[["Host", ConnKey, EndpointEvent, float], None]


@dataclasses.dataclass
class Host:
    name: str
    ep: Demultiplexer
    app: App | None = None
    events: list[tuple[float, ConnKey, EndpointEvent]] = dataclasses.field(default_factory=list)

    def of(self, kind: type) -> list[tuple[float, ConnKey, Any]]:
        return [e for e in self.events if isinstance(e[2], kind)]


Tamper = Callable[[IPAddress, IPAddress, TcpSegment], TcpSegment | None]


class Net:
    def __init__(
        self,
        seed: int = 0,
        delay: float = 0.01,
        jitter: float = 0.0,
        loss: float = 0.0,
        dup: float = 0.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.delay, self.jitter, self.loss, self.dup = delay, jitter, loss, dup
        self.now = 0.0
        self.hosts: list[Host] = []
        self.route: dict[IPAddress, Host] = {}
        self.queue: list[tuple[float, int, IPAddress, IPAddress, bytes]] = []
        self.order = itertools.count()
        self.tamper: Tamper | None = None
        self.log: list[tuple[float, IPAddress, IPAddress, TcpSegment]] = []

    def add(
        self, name: str, *addresses: IPAddress, config: SessionConfig = FAST, app: App | None = None
    ) -> Host:
        host = Host(name, Demultiplexer(random.Random(name), config), app)
        self.hosts.append(host)
        for address in addresses:
            self.route[address] = host
        return host

    def settle(self) -> None:
        """Let apps react and put every queued segment on the wire."""
        moved = True
        while moved:
            moved = False
            for host in self.hosts:
                for key, event in host.ep.events():
                    host.events.append((self.now, key, event))
                    if host.app is not None:
                        host.app(host, key, event, self.now)
                    moved = True
                for src, dst, seg in host.ep.segments_to_send():
                    self._transmit(src, dst, seg)
                    moved = True

    def _transmit(self, src: IPAddress, dst: IPAddress, seg: TcpSegment) -> None:
        self.log.append((self.now, src, dst, seg))
        if self.tamper is not None:
            tampered = self.tamper(src, dst, seg)
            if tampered is None:
                return
            seg = tampered
        wire = seg.to_wire(src, dst)
        if self.rng.random() < self.loss:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            arrival = self.now + self.delay + self.rng.uniform(0, self.jitter)
            heapq.heappush(self.queue, (arrival, next(self.order), src, dst, wire))

    def run(self, until: float, done: Callable[[], bool] | None = None) -> bool:
        while True:
            self.settle()
            if done is not None and done():
                return True
            times = [self.queue[0][0]] if self.queue else []
            times += [d for h in self.hosts if (d := h.ep.next_deadline()) is not None]
            if not times or min(times) > until:
                self.now = until
                return False
            self.now = max(self.now, min(times))
            while self.queue and self.queue[0][0] <= self.now:
                _, _, src, dst, wire = heapq.heappop(self.queue)
                host = self.route.get(dst)
                if host is not None:
                    host.ep.receive(src, dst, TcpSegment.from_wire(wire, src, dst), self.now)
            for host in self.hosts:
                deadline = host.ep.next_deadline()
                if deadline is not None and deadline <= self.now:
                    host.ep.handle_timer(self.now)


class StreamApp:
    """Collects what arrives per connection; optionally sends on connect and closes on EOF."""

    def __init__(self, send_on_connect: bytes = b"", close_on_eof: bool = True) -> None:
        self.send_on_connect = send_on_connect
        self.close_on_eof = close_on_eof
        self.received: dict[ConnKey, bytearray] = defaultdict(bytearray)

    def __call__(self, host: Host, key: ConnKey, event: EndpointEvent, now: float) -> None:
        conn = host.ep.connection(key)
        if isinstance(event, Connected) and self.send_on_connect and conn is not None:
            conn.send(self.send_on_connect, now)
        elif isinstance(event, DataReceived):
            self.received[key] += event.data
        elif isinstance(event, StreamEnded) and self.close_on_eof and conn is not None:
            conn.close(now)


def resetter(host: Host, key: ConnKey, event: EndpointEvent, now: float) -> None:
    """R1: reset whatever arrives for a connection this host does not know."""
    if isinstance(event, UnknownSegment):
        host.ep.reset_for(event.src, event.dst, event.segment)


def client_key(port: int = 40000, group: IPAddress = GROUP, client: IPAddress = CLIENT) -> ConnKey:
    return ((client, port), (group, PORT))


def server_key(ckey: ConnKey) -> ConnKey:
    return (ckey[1], ckey[0])


# --- handshake and tag/cookie ----------------------------------------------------------


def test_handshake_echoes_tag_and_cookie() -> None:
    net = Net()
    client = net.add("client", CLIENT)
    server = net.add("server", GROUP)
    server.ep.listen(PORT)
    conn = client.ep.connect(*client_key(), now=0.0)
    assert net.run(5.0, lambda: bool(client.of(Connected)) and bool(server.of(Connected)))

    syn, syn_ack = net.log[0][3], net.log[1][3]
    assert syn.flags == TcpFlags.SYN and syn_ack.flags == TcpFlags.SYN | TcpFlags.ACK
    assert syn.option(TagCookie) == TagCookie(conn.tag or 0, conn.cookie or 0)
    assert syn_ack.option(TagCookie) == syn.option(TagCookie)
    sconn = server.ep.connection(server_key(client_key()))
    assert sconn is not None and (sconn.tag, sconn.cookie) == (conn.tag, conn.cookie)
    assert conn.state is State.ESTABLISHED and sconn.state is State.ESTABLISHED
    assert conn.destination is None  # this server advertises none


def _tamper_cookie(times: int) -> Tamper:
    left = [times]

    def tamper(src: IPAddress, dst: IPAddress, seg: TcpSegment) -> TcpSegment | None:
        echo = seg.option(TagCookie)
        if seg.flags & TcpFlags.ACK and echo is not None and left[0] > 0:
            left[0] -= 1
            forged = TagCookie(echo.tag, echo.cookie ^ 1)
            options = tuple(forged if o == echo else o for o in seg.options)
            return dataclasses.replace(seg, options=options)
        return seg

    return tamper


def test_syn_ack_with_wrong_cookie_is_ignored_until_the_real_one() -> None:
    net = Net()
    client = net.add("client", CLIENT)
    server = net.add("server", GROUP)
    server.ep.listen(PORT)
    net.tamper = _tamper_cookie(1)
    conn = client.ep.connect(*client_key(), now=0.0)
    net.run(0.4)
    assert conn.state is State.SYN_SENT and not client.of(Connected)
    # The server's SYN-ACK retransmission (after its 0.5 s initial RTO) carries the real cookie.
    assert net.run(5.0, lambda: bool(client.of(Connected)))
    assert client.of(Connected)[0][0] >= 0.5


def test_client_never_accepts_a_forged_cookie() -> None:
    net = Net()
    client = net.add("client", CLIENT, config=dataclasses.replace(FAST, max_retries=3))
    server = net.add("server", GROUP)
    server.ep.listen(PORT)
    net.tamper = _tamper_cookie(1000)
    client.ep.connect(*client_key(), now=0.0)
    net.run(60.0)
    assert not client.of(Connected)
    # Later SYN-ACK retransmissions find no connection: the owner would reset them.
    kinds = [type(e) for _, _, e in client.events if not isinstance(e, UnknownSegment)]
    assert kinds == [ConnectionTimedOut]


@pytest.mark.parametrize(
    ("client_ip", "group", "dest"),
    [
        (CLIENT, GROUP, (SERVER_N, 8080)),
        (CLIENT6, GROUP6, (ipaddress.IPv6Address("2001:db8:2::20"), 8080)),
    ],
)
def test_syn_ack_carries_destination(client_ip: IPAddress, group: IPAddress, dest: Address) -> None:
    net = Net()
    client = net.add("client", client_ip)
    server = net.add("server", group)
    server.ep.listen(PORT, destination=dest)
    conn = client.ep.connect(*client_key(client=client_ip, group=group), now=0.0)
    assert net.run(5.0, lambda: bool(client.of(Connected)))
    syn_ack = net.log[1][3]
    assert syn_ack.option(Destination) == Destination(*dest)
    assert conn.destination == dest
    if group.version == 6:
        # MSS + TAG_COOKIE + IPv6 DESTINATION exceed 40 bytes: MSS gives way.
        assert syn_ack.option(Mss) is None
        assert conn.mss == 1200 and min(1220, conn.config.mss) == conn.mss


def test_plain_syn_gets_plain_syn_ack() -> None:
    """A SYN without TAG_COOKIE (an unextended client) is served like TCP."""
    server = Demultiplexer(random.Random(1), FAST)
    server.listen(PORT, destination=(SERVER_N, 1))
    syn = TcpSegment(40000, PORT, 1000, 0, TcpFlags.SYN, 65535, options=(Mss(1000),))
    server.receive(CLIENT, GROUP, syn, 0.0)
    [(src, dst, syn_ack)] = server.segments_to_send()
    assert (src, dst) == (GROUP, CLIENT)
    assert syn_ack.options == (Mss(FAST.mss),)
    assert syn_ack.ack == 1001
    conn = server.connection(((GROUP, PORT), (CLIENT, 40000)))
    assert conn is not None and conn.tag is None and conn.mss == 1000


# --- data, loss, close -----------------------------------------------------------------


def _transfer(
    net: Net,
    upload: bytes,
    download: bytes,
    group: IPAddress = GROUP,
    client_ip: IPAddress = CLIENT,
) -> tuple[Host, Host, StreamApp, StreamApp]:
    server_app = StreamApp(send_on_connect=download)
    client_app = StreamApp(close_on_eof=False)
    client = net.add("client", client_ip, app=client_app)
    server = net.add("server", group, app=server_app)
    server.ep.listen(PORT)
    key = client_key(client=client_ip, group=group)
    conn = client.ep.connect(*key, now=0.0)
    conn.send(upload, 0.0)  # queued until the handshake completes
    conn.close(0.0)
    return client, server, client_app, server_app


@pytest.mark.parametrize("seed", range(4))
def test_bidirectional_transfer_over_a_lossy_network(seed: int) -> None:
    net = Net(seed=seed, delay=0.02, jitter=0.02, loss=0.1, dup=0.05)
    upload, download = blob(150_000, seed), blob(120_000, seed + 100)
    client, server, client_app, server_app = _transfer(net, upload, download)
    key = client_key()

    finished = lambda: bool(client.of(ConnectionClosed)) and bool(server.of(ConnectionClosed))  # noqa: E731
    assert net.run(300.0, finished)
    assert bytes(server_app.received[server_key(key)]) == upload
    assert bytes(client_app.received[key]) == download
    for host in (client, server):
        kinds = [type(e) for _, _, e in host.events]
        assert kinds.count(Connected) == 1 and kinds.count(StreamEnded) == 1
        assert kinds.count(ConnectionClosed) == 1
        assert ConnectionReset not in kinds and ConnectionTimedOut not in kinds
    # TIME_WAIT ends and the endpoints forget the connection.
    assert net.run(400.0, lambda: len(client.ep) == 0 and len(server.ep) == 0)
    # The duplicates and reordering really happened.
    seqs = [(s.seq, len(s.payload)) for _, src, _, s in net.log if src == CLIENT and s.payload]
    assert len(seqs) > len(set(seqs))


def test_transfer_over_ipv6_in_order_network() -> None:
    net = Net(delay=0.005)
    upload, download = blob(40_000, 1), blob(30_000, 2)
    client, server, client_app, server_app = _transfer(net, upload, download, GROUP6, CLIENT6)
    assert net.run(
        30.0, lambda: bool(client.of(ConnectionClosed)) and bool(server.of(ConnectionClosed))
    )
    key = client_key(client=CLIENT6, group=GROUP6)
    assert bytes(server_app.received[server_key(key)]) == upload
    assert bytes(client_app.received[key]) == download
    # No loss: nothing was sent twice.
    data = [(s.seq, s.payload) for _, _, _, s in net.log if s.payload]
    assert len(data) == len(set(data))


def test_rtt_estimate_follows_the_path() -> None:
    net = Net(delay=0.05)
    client, _, _, _ = _transfer(net, blob(50_000, 3), b"")
    conn = client.ep.connection(client_key())
    assert conn is not None
    net.run(2.0, lambda: conn.bytes_unacked == 0 and conn.state is not State.SYN_SENT)
    assert conn.srtt is not None and 0.09 <= conn.srtt <= 0.2
    assert conn.config.rto_min <= conn.rto <= 1.0


def test_simultaneous_close() -> None:
    net = Net()
    client = net.add("client", CLIENT)
    server = net.add("server", GROUP)
    server.ep.listen(PORT)
    conn = client.ep.connect(*client_key(), now=0.0)
    net.run(1.0, lambda: bool(server.of(Connected)))
    sconn = server.ep.connection(server_key(client_key()))
    assert sconn is not None
    conn.close(net.now)
    sconn.close(net.now)
    assert state_of(conn) is State.FIN_WAIT_1 and state_of(sconn) is State.FIN_WAIT_1
    net.run(net.now + 0.015)
    assert state_of(conn) is State.CLOSING and state_of(sconn) is State.CLOSING
    assert net.run(5.0, lambda: len(client.ep) == 0 and len(server.ep) == 0)
    for host in (client, server):
        assert [type(e) for _, _, e in host.events] == [Connected, StreamEnded, ConnectionClosed]


# --- reset and timeout -------------------------------------------------------------------


@pytest.mark.parametrize("who", ["client", "server"])
def test_abort_resets_the_peer(who: str) -> None:
    net = Net()
    client = net.add("client", CLIENT)
    server = net.add("server", GROUP)
    server.ep.listen(PORT)
    client.ep.connect(*client_key(), now=0.0)
    net.run(1.0, lambda: bool(server.of(Connected)))
    aborter, peer = (client, server) if who == "client" else (server, client)
    key = client_key() if who == "client" else server_key(client_key())
    conn = aborter.ep.connection(key)
    assert conn is not None
    conn.abort(net.now)
    assert net.run(2.0, lambda: bool(peer.of(ConnectionReset)))
    assert peer.of(ConnectionReset)[0][2] == ConnectionReset(remote=True)
    assert aborter.of(ConnectionReset)[0][2] == ConnectionReset(remote=False)
    assert len(client.ep) == 0 and len(server.ep) == 0


def sent_to_a_silent_server(config: SessionConfig, data: bytes) -> tuple[Net, Host, float]:
    """`data` sent on an established connection whose server then goes silent, run
    until the client times out: the network (its log), the client, and when the data
    was first sent."""
    net = Net(delay=0.01)
    client = net.add("client", CLIENT, config=config)
    server = net.add("server", GROUP, config=config)
    server.ep.listen(PORT)
    conn = client.ep.connect(*client_key(), now=0.0)
    net.run(1.0, lambda: bool(server.of(Connected)))
    assert conn.rto == pytest.approx(0.2)  # srtt 0.02 + 4 * 0.01, raised to rto_min
    net.tamper = lambda src, dst, seg: None if src == GROUP else seg  # the server goes silent
    sent_at = net.now
    conn.send(data, sent_at)
    assert net.run(60.0, lambda: bool(client.of(ConnectionTimedOut)))
    assert len(client.ep) == 0
    return net, client, sent_at


def test_retry_limit_times_out_with_exponential_backoff() -> None:
    config = SessionConfig(rto_initial=1.0, rto_min=0.2, max_retries=3)
    net, client, sent_at = sent_to_a_silent_server(config, b"hello")
    # Retransmissions after 0.2, 0.4, 0.8; the timeout after another 1.6.
    retransmits = [t - sent_at for t, src, _, s in net.log if src == CLIENT and s.payload]
    assert retransmits == pytest.approx([0.0, 0.2, 0.6, 1.4])
    assert client.of(ConnectionTimedOut)[0][0] - sent_at == pytest.approx(3.0)


def test_a_thin_stream_keeps_its_rto_for_its_linear_retries_then_backs_off() -> None:
    """Linux's thin-stream linear timeouts: one small segment in flight, so the first
    `thin_linear_retries` timeouts keep the RTO. It gives up when the same stream
    without them would (`max_retries` doublings after the first timeout, as Linux
    bounds retransmission by time): its linear timeouts are more tries, not less
    patience. Counting them against `max_retries` gave up at 2.0 s, not 12.6."""
    config = SessionConfig(rto_initial=1.0, rto_min=0.2, max_retries=5, thin_linear_retries=3)
    net, client, sent_at = sent_to_a_silent_server(config, b"hello")
    retransmits = [t - sent_at for t, src, _, s in net.log if src == CLIENT and s.payload]
    # Three timeouts 0.2 apart, then doubling (0.4, 0.8, 1.6, 3.2) until the
    # exponential stream's give-up, 0.2 * (2**6 - 1) = 12.6 s after sending.
    assert retransmits == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.2, 2.0, 3.6, 6.8])
    assert client.of(ConnectionTimedOut)[0][0] - sent_at == pytest.approx(12.6)
    plain = SessionConfig(rto_initial=1.0, rto_min=0.2, max_retries=5)
    _, plain_client, plain_sent = sent_to_a_silent_server(plain, b"hello")
    assert plain_client.of(ConnectionTimedOut)[0][0] - plain_sent == pytest.approx(12.6)


def test_a_stream_with_four_segments_in_flight_is_not_thin() -> None:
    config = SessionConfig(
        rto_initial=1.0, rto_min=0.2, max_retries=2, thin_linear_retries=6, mss=100
    )
    net, _, sent_at = sent_to_a_silent_server(config, b"x" * 400)  # four full segments
    first_seq = min(s.seq for t, src, _, s in net.log if src == CLIENT and s.payload)
    again = [
        t - sent_at
        for t, src, _, s in net.log
        if src == CLIENT and s.payload and s.seq == first_seq and t > sent_at
    ]
    assert again == pytest.approx([0.2, 0.6])  # exponential, as without the option


def test_syn_to_nobody_times_out() -> None:
    config = SessionConfig(rto_initial=1.0, max_retries=2)
    net = Net()
    client = net.add("client", CLIENT, config=config)
    net.add("silent", GROUP)  # not listening and not answering UnknownSegment
    client.ep.connect(*client_key(), now=0.0)
    assert net.run(60.0, lambda: bool(client.of(ConnectionTimedOut)))
    assert client.of(ConnectionTimedOut)[0][0] == pytest.approx(7.0)  # 1 + 2 + 4
    assert sum(1 for _, src, _, s in net.log if src == CLIENT) == 3


def test_a_syn_ack_nobody_acknowledges_gives_up_after_syn_retries() -> None:
    """Linux's tcp_synack_retries beside tcp_retries2: a half-open connection (a client
    that took another server's SYN-ACK, docs/soak.md finding 25) goes after
    `syn_retries` timeouts, an established one after `max_retries`."""
    config = SessionConfig(rto_initial=1.0, rto_min=0.2, max_retries=4, syn_retries=2)
    net = Net()
    client = net.add("client", CLIENT, config=config)
    server = net.add("server", GROUP, config=config)
    server.ep.listen(PORT)
    # The client's first SYN arrives; nothing of the client's is heard after it.
    net.tamper = lambda src, dst, seg: seg if src == CLIENT and net.now == 0.0 else None
    client.ep.connect(*client_key(), now=0.0)
    assert net.run(60.0, lambda: bool(server.of(ConnectionTimedOut)))
    assert server.of(ConnectionTimedOut)[0][0] == pytest.approx(0.01 + 7.0)  # 1 + 2 + 4
    assert sum(1 for _, src, _, s in net.log if src == GROUP and s.flags & TcpFlags.SYN) == 3
    assert len(server.ep) == 0
    # Established, the same connection's data is retransmitted for `max_retries`.
    _, client, sent_at = sent_to_a_silent_server(config, b"hello")
    assert client.of(ConnectionTimedOut)[0][0] - sent_at == pytest.approx(0.2 * (2**5 - 1))


def test_a_syn_seeded_with_an_earlier_round_trip_is_sent_again_after_it() -> None:
    """A new connection to a destination measured before starts from that SRTT and
    RTTVAR (a TCP metrics cache), not `rto_initial`: its lost SYN is sent again after
    max(rto_min, SRTT + 4 RTTVAR) and backs off from there."""
    config = SessionConfig(rto_initial=1.0, rto_min=0.05, max_retries=2)
    net = Net()
    client = net.add("client", CLIENT, config=config)
    net.add("silent", GROUP)
    conn = client.ep.connect(*client_key(), now=0.0, rtt=(0.02, 0.01))
    assert conn.rto == pytest.approx(0.06)  # 0.02 + 4 * 0.01
    assert conn.rtt_estimate == (0.02, 0.01)
    with pytest.raises(SessionError):
        conn.seed_rtt(0.02, 0.01)  # only before connect
    assert net.run(5.0, lambda: bool(client.of(ConnectionTimedOut)))
    assert client.of(ConnectionTimedOut)[0][0] == pytest.approx(0.06 + 0.12 + 0.24)


# --- unknown segments (R1) ----------------------------------------------------------------


def test_unknown_segment_is_reported_and_reset_for_resets_the_peer() -> None:
    net = Net()
    client = net.add("client", CLIENT)
    server = net.add("server", GROUP, app=resetter)
    server.ep.listen(PORT)
    conn = client.ep.connect(*client_key(), now=0.0)
    net.run(1.0, lambda: bool(server.of(Connected)))
    server.ep.release(server_key(client_key()))  # the server loses the connection
    conn.send(b"anyone there?", net.now)
    assert net.run(5.0, lambda: bool(client.of(ConnectionReset)))
    [(_, key, unknown)] = server.of(UnknownSegment)
    assert key == server_key(client_key())
    assert unknown.src == CLIENT and unknown.dst == GROUP
    assert unknown.segment.payload == b"anyone there?"
    rst = net.log[-1][3]
    assert rst.flags == TcpFlags.RST and rst.seq == unknown.segment.ack


def test_syn_to_a_closed_port_is_not_answered_unless_the_owner_resets_it() -> None:
    net = Net()
    client = net.add("client", CLIENT)
    server = net.add("server", GROUP)
    client.ep.connect(*client_key(), now=0.0)
    net.run(0.1)
    assert len(server.of(UnknownSegment)) == 1
    assert not [s for _, src, _, s in net.log if src == GROUP]
    server.app = resetter
    assert net.run(5.0, lambda: bool(client.of(ConnectionReset)))
    rst = next(s for _, src, _, s in net.log if src == GROUP)
    assert rst.flags == TcpFlags.RST | TcpFlags.ACK and rst.seq == 0


def test_reset_for_never_answers_a_reset() -> None:
    ep = Demultiplexer(random.Random(0))
    rst = TcpSegment(1, 2, 3, 4, TcpFlags.RST, 0)
    assert ep.reset_for(CLIENT, GROUP, rst) is None
    assert ep.segments_to_send() == []


def test_rst_must_match_exactly() -> None:
    """RFC 5961: an in-window RST that is not at RCV.NXT earns a challenge ACK."""
    net = Net()
    client = net.add("client", CLIENT)
    server = net.add("server", GROUP)
    server.ep.listen(PORT)
    conn = client.ep.connect(*client_key(), now=0.0)
    net.run(1.0, lambda: bool(server.of(Connected)))
    net.settle()
    expected = next(s for _, src, _, s in reversed(net.log) if src == CLIENT).ack
    blind = TcpSegment(PORT, 40000, (expected + 10) % 2**32, 0, TcpFlags.RST, 0)
    client.ep.receive(GROUP, CLIENT, blind, net.now)
    assert conn.state is State.ESTABLISHED
    challenge = client.ep.segments_to_send()
    assert [s.flags for _, _, s in challenge] == [TcpFlags.ACK]
    exact = dataclasses.replace(blind, seq=expected)
    client.ep.receive(GROUP, CLIENT, exact, net.now)
    assert [e for _, e in client.ep.events()] == [ConnectionReset()]


# --- state transfer (R3) --------------------------------------------------------------------


def _migrate(
    net: Net, old: Host, new: Host, key: ConnKey, old_app: StreamApp, new_app: StreamApp
) -> Connection:
    net.settle()
    conn = old.ep.connection(key)
    assert conn is not None
    state = conn.export_state()
    old.ep.release(key)
    moved = Connection.import_state(state, net.now, random.Random("moved"), FAST)
    assert moved.export_state() == state
    new.ep.adopt(moved)
    new_app.received[key] = old_app.received.pop(key, bytearray())  # the app moves its own state
    return moved


@pytest.mark.parametrize("seed", range(3))
def test_state_transfer_mid_transfer_continues_the_stream(seed: int) -> None:
    net = Net(seed=seed, delay=0.02, jitter=0.01, loss=0.05, dup=0.02)
    upload, download = blob(80_000, seed), blob(90_000, seed + 7)
    client, old, client_app, old_app = _transfer(net, upload, download)
    new_app = StreamApp()
    new = net.add("new", app=new_app)
    key = server_key(client_key())
    assert net.run(
        60.0,
        lambda: (
            len(old_app.received[key]) > 20_000 and len(client_app.received[client_key()]) > 20_000
        ),
    )
    conn = old.ep.connection(key)
    assert conn is not None and conn.bytes_in_flight > 0 and conn.bytes_unacked > 0
    moved = _migrate(net, old, new, key, old_app, new_app)
    assert moved.bytes_unacked == conn.bytes_unacked and (moved.tag, moved.cookie) == (
        conn.tag,
        conn.cookie,
    )
    net.route[GROUP] = new  # the allocation changed: the group address now reaches the new server

    assert net.run(
        300.0, lambda: bool(client.of(ConnectionClosed)) and bool(new.of(ConnectionClosed))
    )
    assert bytes(new_app.received[key]) == upload
    assert bytes(client_app.received[client_key()]) == download
    assert not new.of(UnknownSegment)
    assert not client.of(ConnectionReset)


def test_change_destination_moves_the_client_to_the_new_server() -> None:
    """Fig 20-21 at the transport level: the new server continues the connection,
    tells the client where to send, and both re-key to the new 4-tuple."""
    net = Net(delay=0.01)
    upload, download = blob(60_000, 5), blob(60_000, 6)
    client, old, client_app, old_app = _transfer(net, upload, download)
    new_app = StreamApp()
    new = net.add("new", SERVER_N, app=new_app)
    ckey, skey = client_key(), server_key(client_key())
    net.run(60.0, lambda: len(old_app.received[skey]) > 10_000)

    moved = _migrate(net, old, new, skey, old_app, new_app)
    net.route[GROUP] = new
    assert moved.tag is not None and moved.cookie is not None
    message = ChangeDestination(moved.tag, moved.cookie, SERVER_N, PORT, serial=1, timestamp_ms=0)
    forged = dataclasses.replace(message, cookie=moved.cookie ^ 1)
    moved.send_change_destination(forged, net.now)
    moved.send_change_destination(message, net.now)
    nkey = new.ep.rekey(skey, local=(SERVER_N, PORT))
    new_app.received[nkey] = new_app.received.pop(skey)

    def follow(host: Host, key: ConnKey, event: EndpointEvent, now: float) -> None:
        client_app(host, key, event, now)
        if isinstance(event, ChangeDestinationReceived):
            host.ep.rekey(key, remote=(event.message.address, event.message.port))
            client_app.received[(key[0], (SERVER_N, PORT))] = client_app.received.pop(key)

    client.app = follow
    done = lambda: bool(client.of(ConnectionClosed)) and bool(new.of(ConnectionClosed))  # noqa: E731
    assert net.run(120.0, done)
    assert [e.message for _, _, e in client.of(ChangeDestinationReceived)] == [message]
    assert bytes(new_app.received[nkey]) == upload
    assert bytes(client_app.received[(ckey[0], (SERVER_N, PORT))]) == download


def test_export_import_round_trip_in_every_state() -> None:
    net = Net()
    client = net.add("client", CLIENT)
    server = net.add("server", GROUP)
    server.ep.listen(PORT)
    conn = client.ep.connect(*client_key(), now=0.0)
    seen: set[State] = set()
    rng = random.Random(0)

    def check(c: Connection) -> None:
        seen.add(c.state)
        data = c.export_state()
        assert Connection.import_state(data, net.now, rng, c.config).export_state() == data

    check(conn)
    net.run(0.015)
    sconn = server.ep.connection(server_key(client_key()))
    assert sconn is not None
    check(sconn)
    net.run(1.0, lambda: conn.state is State.ESTABLISHED and sconn.state is State.ESTABLISHED)
    conn.send(blob(5000, 1), net.now)
    check(conn)
    conn.close(net.now)
    check(conn)
    while conn.state is not State.CLOSED:
        net.run(net.now + 0.005)
        for c in (conn, sconn):
            if c.state is not State.CLOSED:
                check(c)
        if sconn.state is State.CLOSE_WAIT:
            sconn.close(net.now)
    assert seen >= {
        State.SYN_SENT,
        State.SYN_RCVD,
        State.ESTABLISHED,
        State.FIN_WAIT_1,
        State.FIN_WAIT_2,
        State.CLOSE_WAIT,
        State.LAST_ACK,
        State.TIME_WAIT,
    }
    with pytest.raises(SessionError):
        conn.export_state()


def _sample_export() -> bytes:
    """A server-side state with unacknowledged data and out-of-order blocks."""
    net = Net(loss=0.2, seed=3)
    _, server, _, _ = _transfer(net, blob(30_000, 1), blob(30_000, 2))

    def interesting() -> bool:
        conn = server.ep.connection(server_key(client_key()))
        return conn is not None and bool(conn._ooo) and conn.bytes_in_flight > 0

    assert net.run(30.0, interesting)
    conn = server.ep.connection(server_key(client_key()))
    assert conn is not None
    return conn.export_state()


SAMPLE = _sample_export()


def test_export_truncations_are_refused() -> None:
    # Every cut inside the fixed fields and the first blocks, then a sample of the rest.
    for cut in [*range(300), *range(300, len(SAMPLE), 97)]:
        with pytest.raises(WireError):
            Connection.import_state(SAMPLE[:cut], 0.0, random.Random(0))
    with pytest.raises(WireError, match="trailing"):
        Connection.import_state(SAMPLE + b"\x00", 0.0, random.Random(0))
    with pytest.raises(WireError, match="magic"):
        Connection.import_state(b"MCS9" + SAMPLE[4:], 0.0, random.Random(0))


@given(st.binary(max_size=200))
def test_import_of_garbage_raises_only_wire_error(data: bytes) -> None:
    for candidate in (data, b"MCS1" + data, SAMPLE[:40] + data):
        with contextlib.suppress(WireError):
            Connection.import_state(candidate, 0.0, random.Random(0))


@given(st.integers(0, len(SAMPLE) - 1), st.integers(1, 255))
def test_import_of_corrupted_state_raises_only_wire_error(index: int, xor: int) -> None:
    corrupted = bytearray(SAMPLE)
    corrupted[index] ^= xor
    try:
        conn = Connection.import_state(bytes(corrupted), 0.0, random.Random(0))
    except WireError:
        return
    # Whatever decoded is a connection that can run.
    conn.receive(TcpSegment(PORT, 40000, 0, 0, TcpFlags.ACK, 100, payload=b"x"), 0.0)
    conn.handle_timer(100.0)
    conn.segments_to_send()


# --- endpoint --------------------------------------------------------------------------------


def test_many_connections_and_the_deadline_heap() -> None:
    net = Net(seed=9, delay=0.01, jitter=0.01, loss=0.02)
    server_app = StreamApp()
    client = net.add("client", CLIENT, app=StreamApp(close_on_eof=False))
    server = net.add("server", GROUP, app=server_app)
    server.ep.listen(PORT)
    uploads = {}
    for i in range(1000):
        key = client_key(port=10000 + i)
        conn = client.ep.connect(*key, now=0.0)
        uploads[server_key(key)] = blob(600, i)
        conn.send(uploads[server_key(key)], 0.0)
        conn.close(0.0)
    net.settle()
    assert len(server.ep) == 0 and len(client.ep) == 1000
    most = 0
    while len(server.of(ConnectionClosed)) < 1000:
        assert net.now < 60.0
        net.run(net.now + 0.004)
        for host in (client, server):
            conns = [host.ep.connection(k) for k in host.ep.keys()]
            deadlines = [d for c in conns if c is not None and (d := c.next_deadline()) is not None]
            assert host.ep.next_deadline() == min(deadlines, default=None)
        most = max(most, len(server.ep))
    assert most > 900
    assert {k: bytes(v) for k, v in server_app.received.items()} == uploads
    assert net.run(120.0, lambda: len(client.ep) == 0 and len(server.ep) == 0)
    assert len(server.ep._heap) <= 2 * len(server.ep._deadline) + 64


def test_endpoint_refuses_duplicates_and_closed_connections() -> None:
    ep = Demultiplexer(random.Random(0))
    ep.connect(*client_key(), now=0.0)
    with pytest.raises(SessionError):
        ep.connect(*client_key(), now=0.0)
    closed = Connection(*client_key(1), random.Random(0))
    with pytest.raises(SessionError):
        ep.adopt(closed)
    with pytest.raises(KeyError):
        ep.release(client_key(2))


def test_release_sends_what_was_queued_and_nothing_more() -> None:
    ep = Demultiplexer(random.Random(0), FAST)
    conn = ep.connect(*client_key(), now=0.0)
    released = ep.release(client_key())
    assert released is conn and len(ep) == 0
    [(src, dst, syn)] = ep.segments_to_send()
    assert (src, dst) == (CLIENT, GROUP) and syn.flags == TcpFlags.SYN
    assert ep.next_deadline() is None
    conn.handle_timer(10.0)  # the released connection no longer reports to the endpoint
    assert ep.segments_to_send() == []


# --- connection API ----------------------------------------------------------------------------


def test_user_calls_outside_their_states() -> None:
    conn = Connection(*client_key(), random.Random(0), FAST)
    with pytest.raises(SessionError):
        conn.send(b"x", 0.0)
    conn.connect(0.0)
    with pytest.raises(SessionError):
        conn.connect(0.0)
    conn.close(0.0)  # before the handshake: the FIN waits for it
    assert state_of(conn) is State.SYN_SENT
    with pytest.raises(SessionError):
        conn.send(b"x", 0.0)
    conn.abort(0.0)  # giving up on the attempt sends nothing
    assert [s.flags for s in conn.segments_to_send()] == [TcpFlags.SYN]
    assert conn.state == State.CLOSED and conn.events() == [ConnectionReset(remote=False)]
    assert conn.next_deadline() is None
    with pytest.raises(SessionError):
        conn.accept(TcpSegment(1, 2, 3, 4, TcpFlags.SYN | TcpFlags.ACK, 0), 0.0)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        SessionConfig(window=0)
    with pytest.raises(ValueError):
        SessionConfig(window=70000)
    with pytest.raises(ValueError):
        SessionConfig(rto_min=2.0, rto_initial=1.0)
    with pytest.raises(ValueError):
        SessionConfig(mss=0)
    with pytest.raises(ConfigError):
        SessionConfig(syn_retries=-1)


def test_sequence_numbers_wrap() -> None:
    """Both initial sequence numbers just below 2**32: the stream crosses the wrap."""
    net = Net(seed=4, delay=0.01, jitter=0.01, loss=0.05)
    upload, download = blob(20_000, 1), blob(20_000, 2)
    client, server, client_app, server_app = _transfer(net, upload, download)
    conn = client.ep.connection(client_key())
    assert conn is not None
    for ep in (client.ep, server.ep):
        ep._rng = _HighIss()
    client.ep.release(client_key())
    net.queue.clear()
    conn = client.ep.connect(*client_key(), now=0.0)
    conn.send(upload, 0.0)
    conn.close(0.0)
    assert net.run(
        100.0, lambda: bool(client.of(ConnectionClosed)) and bool(server.of(ConnectionClosed))
    )
    assert bytes(server_app.received[server_key(client_key())]) == upload
    assert bytes(client_app.received[client_key()]) == download
    assert any(s.seq < 10_000 for _, _, _, s in net.log if s.payload)


class _HighIss(random.Random):
    def getrandbits(self, k: int) -> int:
        return 2**32 - 5_000 if k == 32 else super().getrandbits(k)


# --- details, on a directly wired pair ------------------------------------------------------


def _pair(config: SessionConfig = FAST) -> tuple[Connection, Connection]:
    """An established client/server pair, segments handed over by `_shuttle`."""
    client = Connection(*client_key(), random.Random(1), config)
    server = Connection(*server_key(client_key()), random.Random(2), config)
    client.connect(0.0)
    [syn] = client.segments_to_send()
    server.accept(syn, 0.0)
    _shuttle(server, client, 0.01)
    _shuttle(client, server, 0.02)
    assert (client.state, server.state) == (State.ESTABLISHED, State.ESTABLISHED)
    client.events()
    server.events()
    return client, server


def _shuttle(src: Connection, dst: Connection, now: float) -> list[TcpSegment]:
    segments = src.segments_to_send()
    for seg in segments:
        dst.receive(seg, now)
    return segments


def test_time_wait_ignores_rst_and_abort_reports_nothing_more() -> None:
    client, server = _pair()
    client.close(1.0)
    _shuttle(client, server, 1.01)
    server.close(1.02)
    _shuttle(server, client, 1.03)
    assert client.state is State.TIME_WAIT
    assert client.events() == [StreamEnded(), ConnectionClosed()]
    seq = client.segments_to_send()[0].ack
    client.receive(TcpSegment(PORT, 40000, seq, 0, TcpFlags.RST, 0), 1.04)  # RFC 1337
    assert state_of(client) is State.TIME_WAIT and client.events() == []
    client.abort(1.05)
    assert state_of(client) is State.CLOSED
    assert client.events() == [] and client.segments_to_send() == []


def test_fin_wait_2_is_an_idle_timeout() -> None:
    config = dataclasses.replace(FAST, fin_wait_2_timeout=10.0)
    client, server = _pair(config)
    client.close(1.0)
    _shuttle(client, server, 1.01)
    _shuttle(server, client, 1.02)
    assert client.state is State.FIN_WAIT_2 and client.next_deadline() == pytest.approx(11.02)
    server.send(b"still talking", 9.0)
    _shuttle(server, client, 9.0)
    assert client.next_deadline() == pytest.approx(19.0)
    client.handle_timer(19.0)
    assert state_of(client) is State.CLOSED
    assert client.events() == [DataReceived(b"still talking"), ConnectionTimedOut()]


def test_an_ack_after_a_timeout_drops_the_backoff() -> None:
    client, server = _pair()
    base = client.rto
    client.send(b"x" * 100, 1.0)
    client.segments_to_send()  # lost
    for _ in range(3):
        deadline = client.next_deadline()
        assert deadline is not None
        client.handle_timer(deadline)
    assert client.rto == pytest.approx(8 * base)
    _shuttle(client, server, 2.0)
    _shuttle(server, client, 2.01)
    assert client.rto == pytest.approx(base) and client.srtt is not None
    assert client.bytes_unacked == 0 and client.next_deadline() is None


def test_zero_window_probe_and_window_respect() -> None:
    client, server = _pair(dataclasses.replace(FAST, mss=100))
    server_seq, client_next = server._snd_nxt % 2**32, client._snd_nxt % 2**32

    def ack(n: int, window: int) -> TcpSegment:
        return TcpSegment(PORT, 40000, server_seq, (client_next + n) % 2**32, TcpFlags.ACK, window)

    # The server advertises a 250-byte window: the client sends exactly that much.
    client.receive(ack(0, 250), 1.0)
    client.send(b"y" * 1000, 1.0)
    sent = client.segments_to_send()
    assert [len(s.payload) for s in sent] == [100, 100, 50]
    # A zero window: nothing until everything is acknowledged, then one-byte probes.
    client.receive(ack(250, 0), 1.1)
    [probe] = client.segments_to_send()
    assert len(probe.payload) == 1
    deadline = client.next_deadline()
    assert deadline is not None
    client.handle_timer(deadline)
    [again] = client.segments_to_send()
    assert again.seq == probe.seq and len(again.payload) == 1


def test_out_of_order_and_duplicates_deliver_once_in_order() -> None:
    client, server = _pair(dataclasses.replace(FAST, mss=10))
    data = bytes(range(100))
    client.send(data, 1.0)
    segments = client.segments_to_send()
    assert len(segments) == 10
    order = [9, 3, 3, 0, 5, 1, 2, 2, 8, 4, 6, 7, 0, 9]
    got = bytearray()
    for i in order:
        server.receive(segments[i], 1.1)
        for event in server.events():
            assert isinstance(event, DataReceived)
            got += event.data
    assert bytes(got) == data
    acks = server.segments_to_send()
    assert acks[-1].ack == (client._snd_nxt % 2**32)


@pytest.mark.parametrize(
    "hexdump",
    [
        # FIN_WAIT_2 with its FIN unacknowledged, ESTABLISHED with a FIN sent (bench/fuzz.py)
        "4d435331051f04c00002019f0a04e9fc00070050e8f9525eb35be71bd2f2269f04c00002011f905d4c3ea7"
        "000000000000000100000000000000020000000000000001ffff00000000000000010028000000004490cd05"
        "0000000000000001000000000000000000003ec999999999999a00",
        "4d435331037d04c0000201135904e9fc00070050e0c21cc66500438e188d7457b9f81ec8000000000000018000"
        "000000000001810000000000000180ffff0000000000000180002800000000dc741afe0000000000000126000000"
        "0000000126000000000000012500003fa651eb851eb8523f923d70a3d70a3e3fbd66666666666700",
    ],
)
def test_states_that_contradict_their_fins_are_refused(hexdump: str) -> None:
    with pytest.raises(WireError):
        Connection.import_state(bytes.fromhex(hexdump), 100.0, random.Random(0))


def test_session_errors_are_manycast_errors() -> None:
    assert issubclass(SessionError, ManycastError)
    client, _ = _pair()
    client.abort(1.0)
    with pytest.raises(ManycastError):
        client.export_state()


def test_an_old_ack_moves_no_window_and_the_state_still_moves() -> None:
    # RFC 9293 3.10.7.4: an ACK before SND.UNA updates nothing. Taking its window would
    # also put SND.WL2 before the ISS, where the session-state format cannot carry it.
    client, server = _pair()
    window = client.session_state().snd_wnd
    seq = server._snd_nxt % 2**32
    old_ack = (client._snd_nxt - 10) % 2**32
    client.receive(TcpSegment(PORT, 40000, seq, old_ack, TcpFlags.ACK, 7, payload=b"abc"), 1.0)
    assert client.events() == [DataReceived(b"abc")]
    state = client.session_state()
    assert state.snd_wnd == window and state.snd_wl2 >= state.iss
    moved = Connection.import_state(client.export_state(), 1.0, random.Random(0), FAST)
    assert moved.session_state() == state


def test_a_close_held_back_by_the_window_still_moves() -> None:
    # FIN_WAIT_1 with the FIN still waiting behind data: a state the importer must take.
    client, server = _pair(dataclasses.replace(FAST, mss=100))
    server_seq, client_next = server._snd_nxt % 2**32, client._snd_nxt % 2**32
    client.receive(TcpSegment(PORT, 40000, server_seq, client_next, TcpFlags.ACK, 100), 1.0)
    client.send(b"z" * 300, 1.0)
    client.close(1.0)
    assert client.state is State.FIN_WAIT_1
    state = client.session_state()
    assert state.close_requested and not state.fin_sent
    moved = Connection.import_state(client.export_state(), 1.0, random.Random(0), client.config)
    assert moved.session_state() == state
    # The segments the old owner queued are lost; the new one finishes the stream.
    now, received = 1.0, bytearray()
    while moved.state is State.FIN_WAIT_1 and now < 30.0:
        deadline = moved.next_deadline()
        assert deadline is not None
        now = max(now + 0.01, deadline)
        moved.handle_timer(now)
        _shuttle(moved, server, now)
        _shuttle(server, moved, now)
        received += b"".join(e.data for e in server.events() if isinstance(e, DataReceived))
    assert moved.state is State.FIN_WAIT_2 and server.state is State.CLOSE_WAIT
    assert bytes(received) == b"z" * 300
