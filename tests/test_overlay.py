"""The asyncio overlay driver on real UDP sockets on loopback.

Real time on a machine that may be busy: a test waits for the event it checks
(`run_until` with a condition) under a generous `DEADLINE` rather than assuming
how much happens in a few milliseconds. Only the checks that something does not
happen use short fixed runs, and those are ordered by the loop's timers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import multiprocessing
import os
import re
import socket
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest

from manycast.drivers.links import Attachment, LinkSpec
from manycast.drivers.overlay import (
    AsyncOverlay,
    LinkCounters,
    OverlayError,
    assign_endpoints,
)
from manycast.protocol.node import Interface, Node

# test nodes ---------------------------------------------------------------


@dataclass
class Recorder(Node):
    """Records every packet; sends whatever is queued in `script` at start."""

    script: list[tuple[str, bytes, int | None]] = field(default_factory=list)
    got: list[tuple[str, bytes, float]] = field(default_factory=list)

    def start(self, now: float) -> None:
        for iface, packet, hop in self.script:
            self.send(iface, packet, hop)

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        self.got.append((iface, packet, now))

    def on_timer(self, now: float) -> None:
        pass


@dataclass
class Echo(Recorder):
    """Sends every packet back on the link it came from."""

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        super().receive(iface, packet, now)
        self.send(iface, packet, None)


@dataclass
class Pinger(Node):
    """Ping-pong: one packet out, the next when the reply is back; resends the
    outstanding one every `retry` seconds until `count` replies have arrived."""

    count: int = 1
    retry: float = 0.05
    sent_at: dict[int, float] = field(default_factory=dict)
    rtts: list[float] = field(default_factory=list)

    def start(self, now: float) -> None:
        self._ping(0, now)

    def _ping(self, seq: int, now: float) -> None:
        self.sent_at.setdefault(seq, now)
        self.send("eth0", seq.to_bytes(4, "big") + b"ping" * 16, None)
        self.timers.arm("retry", now + self.retry)

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        seq = int.from_bytes(packet[:4], "big")
        if seq != len(self.rtts):
            return
        self.rtts.append(now - self.sent_at[seq])
        if len(self.rtts) < self.count:
            self._ping(seq + 1, now)
        else:
            self.timers.cancel("retry")

    def on_timer(self, now: float) -> None:
        if "retry" in self.timers.expired(now):
            self._ping(len(self.rtts), now)


@dataclass
class Ticker(Node):
    """Fires every `period` seconds, `ticks` times, sending a packet each time."""

    period: float = 0.02
    ticks: int = 5
    fired: list[tuple[float, float]] = field(default_factory=list)  # (deadline, now)
    got: list[bytes] = field(default_factory=list)

    def start(self, now: float) -> None:
        self.timers.arm("tick", now + self.period)

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        self.got.append(packet)

    def on_timer(self, now: float) -> None:
        deadline = self.timers.next_deadline()
        if "tick" not in self.timers.expired(now):
            return
        assert deadline is not None
        self.fired.append((deadline, now))
        self.send("eth0", b"tick %d" % len(self.fired), None)
        if len(self.fired) < self.ticks:
            self.timers.arm("tick", deadline + self.period)


@dataclass
class Faulty(Recorder):
    def receive(self, iface: str, packet: bytes, now: float) -> None:
        super().receive(iface, packet, now)
        if packet == b"boom":
            raise RuntimeError("node bug")


# topology helpers -----------------------------------------------------------

# How long a test waits for an event before it fails. An idle host needs
# milliseconds; a busy one may stall the loop for a long while.
DEADLINE = 10.0


def lan(
    name: str,
    subnet: int,
    members: Iterable[tuple[str, str]],
    delay: float = 0.0,
    loss: float = 0.0,
) -> tuple[LinkSpec, dict[str, Interface]]:
    """A link 10.0.<subnet>.0/24 with members .1, .2, ... in order; also the
    Interface of each member, by node name."""
    network = ipaddress.IPv4Network(f"10.0.{subnet}.0/24")
    attachments, ifaces = [], {}
    for i, (node, iface) in enumerate(members, start=1):
        address = network.network_address + i
        attachments.append(Attachment(node, iface, int(address)))
        ifaces[node] = Interface(iface, name, address, network)
    return LinkSpec(name, tuple(attachments), delay=delay, loss=loss), ifaces


def addr(ifaces: dict[str, Interface], node: str) -> int:
    return ifaces[node].address_int


def any_port(links: Iterable[LinkSpec]) -> dict[tuple[str, str], int]:
    """Every endpoint on a free port chosen at bind time (one process only)."""
    return {(m.node, m.iface): 0 for link in links for m in link.members}


def free_ports(links: Iterable[LinkSpec]) -> dict[tuple[str, str], tuple[str, int]]:
    """Ports free right now, for maps shared by several driver instances."""
    keys = [(m.node, m.iface) for link in links for m in link.members]
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in keys]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return {key: s.getsockname() for key, s in zip(keys, socks, strict=True)}
    finally:
        for s in socks:
            s.close()


def run(
    net: AsyncOverlay,
    seconds: float,
    during: Callable[[], None] | None = None,
    until: Callable[[], bool] | None = None,
) -> None:
    """Run the network for `seconds`, or with `until` only until that holds."""

    async def session() -> None:
        async with net:
            if during is not None:
                during()
            await net.run_until(seconds, until)

    asyncio.run(session())


async def until(predicate: Callable[[], bool], net: AsyncOverlay) -> None:
    """Run the network until `predicate` holds, at most `DEADLINE` (a bound, not an
    expectation: the assertions after it say what was expected)."""
    await net.run_until(net.now + DEADLINE, predicate)


# delivery -----------------------------------------------------------------


def test_frames_arrive_unchanged_on_the_receiving_interface() -> None:
    l1, i1 = lan("L1", 1, [("a", "eth0"), ("r", "eth0")])
    l2, i2 = lan("L2", 2, [("b", "eth0"), ("r", "eth1")])
    small = bytes(range(256)) * 5
    big = os.urandom(60_000)
    a = Recorder("a", {"eth0": i1["a"]}, script=[("eth0", small, addr(i1, "r"))])
    b = Recorder("b", {"eth0": i2["b"]}, script=[("eth0", big, None)])
    r = Recorder("r", {"eth0": i1["r"], "eth1": i2["r"]})
    net = AsyncOverlay([l1, l2], any_port([l1, l2]), [a, b, r])

    run(net, DEADLINE, until=lambda: len(r.got) == 2)

    assert sorted((iface, packet) for iface, packet, _ in r.got) == [
        ("eth0", small),
        ("eth1", big),
    ]
    assert a.got == [] and b.got == []
    assert net.counters["L1"] == LinkCounters(sent=1, received=1)
    assert net.counters["L2"] == LinkCounters(sent=1, received=1)
    assert all(port != 0 for _, port in net.endpoints.values())


def test_lan_fans_out_to_every_other_member_and_next_hop_to_one() -> None:
    link, i = lan("LAN", 3, [("a", "eth0"), ("b", "eth0"), ("c", "eth0")])
    script = [
        ("eth0", b"to all", None),
        ("eth0", b"to c", addr(i, "c")),
        ("eth0", b"to nobody", int(ipaddress.IPv4Address("10.0.3.99"))),
    ]
    a = Recorder("a", {"eth0": i["a"]}, script=script)
    b = Recorder("b", {"eth0": i["b"]})
    c = Recorder("c", {"eth0": i["c"]})
    net = AsyncOverlay({"LAN": link}, any_port([link]), [a, b, c])

    run(net, DEADLINE, until=lambda: len(b.got) == 1 and len(c.got) == 2)

    assert a.got == []
    assert [p for _, p, _ in b.got] == [b"to all"]
    assert sorted(p for _, p, _ in c.got) == [b"to all", b"to c"]
    assert net.counters["LAN"] == LinkCounters(sent=3, received=3, dropped=1)


def test_timers_fire_at_their_deadlines_and_call_at_flushes_frames() -> None:
    link, i = lan("L", 4, [("t", "eth0"), ("sink", "eth0")])
    ticker = Ticker("t", {"eth0": i["t"]}, period=0.02, ticks=5)
    sink = Recorder("sink", {"eth0": i["sink"]})
    net = AsyncOverlay([link], any_port([link]), [ticker, sink])
    seen: list[float] = []

    def poke() -> None:
        seen.append(net.now)
        ticker.send("eth0", b"poked", None)

    net.call_at(0.05, poke)  # scheduled before start: kept until the loop runs

    def delivered() -> bool:
        return {b"poked", b"tick 5"} <= {p for _, p, _ in sink.got}

    run(net, DEADLINE, until=delivered)

    assert len(ticker.fired) == 5
    # Never early; late only by what a busy host's loop takes to come round.
    for deadline, now in ticker.fired:
        assert deadline <= now < deadline + DEADLINE
    assert len(seen) == 1 and 0.05 <= seen[0] < 0.05 + DEADLINE
    payloads = [p for _, p, _ in sink.got]
    assert b"poked" in payloads and b"tick 5" in payloads


def test_a_timer_moved_earlier_is_rearmed() -> None:
    link, i = lan("L", 5, [("t", "eth0"), ("sink", "eth0")])
    ticker = Ticker("t", {"eth0": i["t"]}, period=100.0, ticks=1)
    sink = Recorder("sink", {"eth0": i["sink"]})
    net = AsyncOverlay([link], any_port([link]), [ticker, sink])

    moved: list[float] = []

    async def session() -> None:
        async with net:
            await net.run_for(0.02)
            assert ticker.fired == []
            # A node's own decision, seen by the driver after its next call.
            moved.append(net.now + 0.03)
            ticker.timers.arm("tick", moved[0])
            net.call_at(net.now, lambda: None)
            await until(lambda: bool(ticker.fired), net)

    asyncio.run(session())
    assert len(ticker.fired) == 1
    deadline, fired = ticker.fired[0]
    # It fired for the moved deadline (the first one was 100 s away), not before it.
    assert deadline == moved[0] and moved[0] <= fired < moved[0] + DEADLINE


# emulated loss and delay ------------------------------------------------------


def _lossy_run(seed: int) -> tuple[int, LinkCounters]:
    link, i = lan("L", 6, [("a", "eth0"), ("b", "eth0")], loss=0.5)
    script: list[tuple[str, bytes, int | None]] = [
        ("eth0", n.to_bytes(4, "big"), None) for n in range(2000)
    ]
    a = Recorder("a", {"eth0": i["a"]}, script=script)
    b = Recorder("b", {"eth0": i["b"]})
    net = AsyncOverlay([link], any_port([link]), [a, b], seed=seed)
    counters = net.counters["L"]

    def settled() -> bool:  # every datagram lost at the sender or read by b
        return counters.lost + counters.sent == 2000 and len(b.got) == counters.sent

    run(net, DEADLINE, until=settled)
    return len(b.got), counters


def test_loss_drops_about_half_and_is_seeded() -> None:
    got, counters = _lossy_run(seed=7)
    assert 850 <= got <= 1150
    assert counters.lost + counters.sent == 2000
    assert counters.received == got == counters.sent
    _, counters_again = _lossy_run(seed=7)
    assert counters_again.lost == counters.lost
    _, other = _lossy_run(seed=8)
    assert other.lost != counters.lost


def test_delay_is_applied_in_each_direction() -> None:
    # Long enough that a busy host's scheduling delays stay small beside it.
    delay = 0.1
    link, i = lan("L", 7, [("p", "eth0"), ("e", "eth0")], delay=delay)
    pinger = Pinger("p", {"eth0": i["p"]}, count=5, retry=1.0)
    echo = Echo("e", {"eth0": i["e"]})
    net = AsyncOverlay([link], any_port([link]), [pinger, echo])

    run(net, DEADLINE, until=lambda: len(pinger.rtts) == 5)

    assert len(pinger.rtts) == 5
    ratio = statistics.mean(pinger.rtts) / (2 * delay)
    assert 0.95 <= ratio <= 3.0, pinger.rtts
    assert min(pinger.rtts) >= 2 * delay * 0.95


def test_delayed_frames_of_a_killed_sender_are_never_sent() -> None:
    link, i = lan("L", 8, [("a", "eth0"), ("b", "eth0")], delay=0.05)
    a = Recorder("a", {"eth0": i["a"]}, script=[("eth0", b"late", None)])
    b = Recorder("b", {"eth0": i["b"]})
    net = AsyncOverlay([link], any_port([link]), [a, b])

    run(net, 0.15, during=lambda: net.call_at(0.01, lambda: net.kill("a")))

    assert b.got == []
    assert net.counters["L"].sent == 0
    assert "a" not in net.nodes


# crashes and restarts ---------------------------------------------------------


def test_kill_stops_delivery_both_ways_and_a_restart_resumes() -> None:
    link, i = lan("L", 9, [("t", "eth0"), ("e", "eth0")])
    ticker = Ticker("t", {"eth0": i["t"]}, period=0.01, ticks=1_000_000)
    echo = Echo("e", {"eth0": i["e"]})
    net = AsyncOverlay([link], any_port([link]), [ticker, echo])

    async def session() -> None:
        async with net:
            await until(lambda: len(ticker.got) >= 3, net)
            assert net.kill("e") is echo
            heard = len(echo.got)
            await net.run_for(0.005)  # an echo already in the kernel may still land
            answered = len(ticker.got)
            await net.run_for(0.1)
            assert len(echo.got) == heard  # nothing reaches a dead node
            assert len(ticker.got) == answered  # and nothing comes from it
            if sys.platform == "linux":
                # The ticker's next datagrams bounce off the closed port.
                await until(lambda: net.counters["L"].unreachable > 0, net)
                assert net.counters["L"].unreachable > 0

            again = Echo("e", {"eth0": i["e"]})
            net.add(again)
            await until(lambda: len(again.got) >= 2, net)
            assert len(ticker.got) > answered

    asyncio.run(session())


def test_a_destination_that_cannot_be_sent_to_is_counted() -> None:
    link, i = lan("L", 10, [("a", "eth0"), ("b", "eth0")])
    # b is not hosted here; the kernel refuses to send to a broadcast address
    # from a socket without SO_BROADCAST.
    endpoints: dict[tuple[str, str], tuple[str, int] | int] = {
        ("a", "eth0"): 0,
        ("b", "eth0"): ("255.255.255.255", 9),
    }
    script: list[tuple[str, bytes, int | None]] = [
        ("eth0", b"x", None),
        ("eth0", b"y" * 70_000, None),
    ]
    a = Recorder("a", {"eth0": i["a"]}, script=script)
    net = AsyncOverlay([link], endpoints, [a])

    run(net, 0.05)

    assert net.counters["L"] == LinkCounters(dropped=2)


def test_a_port_in_use_names_node_interface_and_address() -> None:
    link, i = lan("L", 11, [("a", "eth0"), ("b", "eth0")])
    endpoints = free_ports([link])
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(endpoints[("b", "eth0")])
    host, port = endpoints[("b", "eth0")]
    a = Recorder("a", {"eth0": i["a"]})
    b = Recorder("b", {"eth0": i["b"]})
    net = AsyncOverlay([link], endpoints, [a, b])
    try:
        with pytest.raises(
            OverlayError, match=re.escape(f"node b interface eth0: cannot bind {host}:{port}")
        ):
            run(net, 0.01)
    finally:
        busy.close()
    # a's endpoint was released again
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(endpoints[("a", "eth0")])
    probe.close()


def test_configuration_errors_are_reported() -> None:
    link, _ = lan("L", 12, [("a", "eth0"), ("b", "eth0")])
    with pytest.raises(ValueError, match="no endpoint for b/eth0"):
        AsyncOverlay([link], {("a", "eth0"): 0})
    with pytest.raises(ValueError, match="out of range"):
        AsyncOverlay([link], {("a", "eth0"): 0, ("b", "eth0"): 70000})
    with pytest.raises(ValueError, match=re.escape("same endpoint 127.0.0.1:4000")):
        AsyncOverlay([link], {("a", "eth0"): ("localhost", 4000), ("b", "eth0"): 4000})
    with pytest.raises(ValueError, match="does not resolve"):
        AsyncOverlay([link], {("a", "eth0"): ("no-such-host.invalid", 1), ("b", "eth0"): 2})


def test_an_exception_in_a_node_surfaces_from_run_and_the_network_goes_on() -> None:
    link, i = lan("L", 13, [("a", "eth0"), ("f", "eth0")])
    a = Recorder("a", {"eth0": i["a"]}, script=[("eth0", b"boom", None)])
    faulty = Faulty("f", {"eth0": i["f"]})
    net = AsyncOverlay([link], any_port([link]), [a, faulty])

    async def session() -> None:
        async with net:
            with pytest.raises(RuntimeError, match="node bug"):
                await net.run_for(DEADLINE)  # ends as soon as the node raises
            a.send("eth0", b"fine", None)
            net.call_at(net.now, lambda: None)
            await until(lambda: len(faulty.got) == 2, net)

    asyncio.run(session())
    assert [p for _, p, _ in faulty.got] == [b"boom", b"fine"]


# several driver instances ------------------------------------------------------


def test_two_instances_each_hosting_half_form_one_network() -> None:
    l1, i1 = lan("L1", 14, [("p", "eth0"), ("r", "eth0")])
    l2, i2 = lan("L2", 15, [("r", "eth1"), ("e", "eth0")])
    endpoints = free_ports([l1, l2])

    @dataclass
    class Relay(Recorder):
        def receive(self, iface: str, packet: bytes, now: float) -> None:
            super().receive(iface, packet, now)
            self.send("eth1" if iface == "eth0" else "eth0", packet, None)

    pinger = Pinger("p", {"eth0": i1["p"]}, count=20, retry=0.05)
    relay = Relay("r", {"eth0": i1["r"], "eth1": i2["r"]})
    echo = Echo("e", {"eth0": i2["e"]})
    left = AsyncOverlay([l1, l2], endpoints, [pinger])
    right = AsyncOverlay([l1, l2], endpoints, [relay, echo])

    async def session() -> None:
        async with right, left:
            await until(lambda: len(pinger.rtts) == 20, left)

    asyncio.run(session())
    assert len(pinger.rtts) == 20
    assert {iface for iface, _, _ in relay.got} == {"eth0", "eth1"}
    assert left.counters["L1"].received >= 20 and right.counters["L2"].received >= 20
    assert "e" not in left.nodes and "p" not in right.nodes


def _echo_process(endpoints: dict[tuple[str, str], tuple[str, int]], seconds: float) -> None:
    link, i = lan("L", 16, [("p", "eth0"), ("e", "eth0")])
    echo = Echo("e", {"eth0": i["e"]})
    AsyncOverlay([link], endpoints, [echo]).run_sync(seconds)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_form_one_network() -> None:
    link, i = lan("L", 16, [("p", "eth0"), ("e", "eth0")])
    endpoints = free_ports([link])
    child = multiprocessing.get_context("fork").Process(
        target=_echo_process, args=(endpoints, 3 * DEADLINE), daemon=True
    )
    child.start()
    try:
        pinger = Pinger("p", {"eth0": i["p"]}, count=50, retry=0.02)
        net = AsyncOverlay([link], endpoints, [pinger])

        async def session() -> None:
            async with net:
                await until(lambda: len(pinger.rtts) == 50, net)

        asyncio.run(session())
        assert len(pinger.rtts) == 50
    finally:
        child.terminate()
        child.join(5)


def test_run_sync_runs_a_fresh_loop_and_closes() -> None:
    link, i = lan("L", 17, [("p", "eth0"), ("e", "eth0")])
    pinger = Pinger("p", {"eth0": i["p"]}, count=10)
    net = AsyncOverlay([link], any_port([link]), [pinger, Echo("e", {"eth0": i["e"]})])
    # run_sync runs for a fixed time: ten loopback round trips take milliseconds idle,
    # and a busy host gets a second.
    net.run_sync(1.0)
    assert len(pinger.rtts) == 10
    assert net.nodes == {}
    with pytest.raises(RuntimeError, match="closed"):
        net.add(Echo("x", {}))


def test_assign_endpoints_is_deterministic() -> None:
    l1, _ = lan("L1", 18, [("r1", "eth0"), ("s1", "eth0")])
    l2, _ = lan("L2", 19, [("c1", "eth0"), ("r1", "eth1")])
    first = assign_endpoints([l1, l2], 40000, hosts={"s1": "10.1.1.1"})
    assert first == assign_endpoints([l2, l1], 40000, hosts={"s1": "10.1.1.1"})
    assert first == {
        ("c1", "eth0"): ("127.0.0.1", 40000),
        ("r1", "eth0"): ("127.0.0.1", 40001),
        ("r1", "eth1"): ("127.0.0.1", 40002),
        ("s1", "eth0"): ("10.1.1.1", 40003),
    }
    with pytest.raises(ValueError):
        assign_endpoints([l1, l2], 65534)
