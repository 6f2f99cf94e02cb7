"""Forwarding rate of one manycast router on the overlay driver, against plain relays.

Shape of every relay run, all on 127.0.0.1:

    load generator (this process, CPU 0)          relay under test (child, CPU 1)
      tx socket  --- inner IPv4/UDP packets --->    in socket
      sink sockets <--- forwarded packets ------    out socket

Relays compared in the same run, interleaved round by round (each round runs
every case once, in an order drawn at random per round), medians reported:
- `router`: a manycast `Router` hosted by `AsyncOverlay`. Two servers (the two
  sink sockets) join the group with masked source-specific joins that split the
  clients on the lowest address bit, so every packet is matched, TTL-decremented
  and sent to its owner.
- `raw_relay`, the headline baseline: the same hop written the way the overlay
  driver reads (non-blocking socket, `loop.add_reader`, up to 256 datagrams per
  wake-up, each read into one reused buffer with `recv_into`), with no router
  logic. Same batching, same sockets: the only difference is the router's own
  per-packet work. `ratio_vs_raw_relay` (router
  over raw relay, ratio of the medians) is the headline figure.
- `asyncio_relay`: the same hop written with asyncio's standard UDP API
  (`create_datagram_endpoint` + a `DatagramProtocol` sending each datagram on),
  which reads one datagram per loop pass: what a plain asyncio program gets.
  `ratio_vs_asyncio_protocol_relay` compares with it; it is the weaker baseline,
  since the router drains a batch per wake-up and this relay does not.
- `sender`: the load generator straight into its own sink, no relay: its
  capacity, which must be well above every relay for the figures to mean anything.

The generator keeps a fixed window of packets in flight (sent, not yet back at a
sink), so it runs exactly as fast as the relay drains and never overruns a socket
buffer; losses would still show (`loss` counts everything sent and never seen).

Each relay also reports its own CPU time over the measured interval. Packets per
CPU-second is its cost per packet, which holds when other work shares the two
cores and wall-clock rates do not; `busy` (CPU over wall time) shows which side
set the pace. Loopback delivery done in softirq is charged to no process, so it
is left out of every relay alike.

Also: events per second of the memory driver running the built-in demo pool.

Output: progress on stderr, then the result as one json object, the last line on stdout.
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import asyncio
import ipaddress
import multiprocessing
import os
import random
import select
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _plots
from _common import progress, run_and_emit
from manycast.drivers.links import Attachment, LinkSpec
from manycast.drivers.memory import MemoryNetwork
from manycast.drivers.overlay import BUFFER_SIZE, AsyncOverlay
from manycast.protocol.membership import record_for
from manycast.protocol.node import Interface
from manycast.protocol.router import Router
from manycast.runtime import PoolRun
from manycast.space import Portion, PortionSet
from manycast.topology import builtin
from manycast.wire.ip import IPPROTO_UDP, IPv4Packet, UDPDatagram
from manycast.wire.membership import IGMPv3Report, RecordType, igmp_packet

ROUNDS = 7
WARMUP_S = 0.5
MEASURE_S = 2.0
# After the last send, ends early once all is back; long enough for a relay
# descheduled by other work to catch up: anything not back by then counts as lost.
DRAIN_S = 2.0
# In flight at once: far above the relays' 256-datagram batch, so a relay descheduled by
# other work on the machine finds plenty queued when it runs again; well below the
# ~10000 of these datagrams a 4 MiB socket buffer holds, so nothing overflows.
WINDOW = 4096
STALL_MS = 500
# The relay waits no longer than this for "stop": every run ends by itself.
CHILD_LIMIT_S = 30.0
MEMORY_VIRTUAL_S = 5.0

LOCALHOST = "127.0.0.1"
GROUP = ipaddress.IPv4Address("232.1.1.1")
CLIENTS = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking range
SOURCES = 8192  # distinct client addresses, cycled; a power of two
PAYLOAD = b"manycast bench payload 32 bytes!"
UPSTREAM = ipaddress.IPv4Network("10.0.0.0/24")
SERVERS = ipaddress.IPv4Network("10.1.0.0/24")
# Server i owns the clients whose lowest address bit is i (Fig 7C's masks).
OWNERS = (("s1", Portion(4, 0, 1)), ("s2", Portion(4, 1, 1)))

Endpoint = tuple[str, int]


# --- the packets ------------------------------------------------------------------


def client_packets() -> list[bytes]:
    """One UDP packet to the group from each of SOURCES client addresses."""
    packets = []
    for i in range(SOURCES):
        src = CLIENTS[7 * i + 1]  # spread over the range, both parities
        udp = UDPDatagram(40000 + i % 1000, 7000, PAYLOAD).to_wire(src, GROUP)
        packets.append(IPv4Packet.make(src, GROUP, IPPROTO_UDP, udp, ttl=64).to_wire())
    return packets


def join_packet(server: int) -> bytes:
    """Server `server`'s IGMPv3 report joining GROUP for the clients it owns."""
    record = record_for(GROUP, PortionSet((OWNERS[server][1],)), RecordType.CHANGE_TO_INCLUDE_MODE)
    return igmp_packet(IGMPv3Report((record,)), SERVERS[server + 1]).to_wire()


def udp_socket(port: int = 0) -> socket.socket:
    """A non-blocking UDP socket on loopback with the overlay driver's buffer sizes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_SIZE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_SIZE)
    sock.setblocking(False)
    sock.bind((LOCALHOST, port))
    return sock


# --- the relays (each in a child process) ------------------------------------------


def router_node() -> Router:
    interfaces = {
        "up": Interface("up", "upstream", UPSTREAM[254], UPSTREAM),
        "down": Interface("down", "servers", SERVERS[254], SERVERS),
    }
    # Clients sit beyond the upstream neighbour. A long hold time: nothing in the
    # run refreshes the joins, and expiry is not what is measured.
    return Router(
        "r", interfaces, [(CLIENTS, "up", UPSTREAM[1])], router_ifaces=(), hold_time=3600.0
    )


def router_links() -> list[LinkSpec]:
    def at(node: str, iface: str, address: ipaddress.IPv4Address) -> Attachment:
        return Attachment(node, iface, int(address))

    return [
        LinkSpec("upstream", (at("tx", "eth0", UPSTREAM[1]), at("r", "up", UPSTREAM[254]))),
        LinkSpec(
            "servers",
            (
                at("r", "down", SERVERS[254]),
                at("s1", "eth0", SERVERS[1]),
                at("s2", "eth0", SERVERS[2]),
            ),
        ),
    ]


class Meter:
    """The relay's own CPU time and packets forwarded between the parent's "from"
    and "to" marks. Packets per CPU-second is the relay's cost per packet whatever
    else runs on the machine; `busy` near 1 means the relay set the pace."""

    def __init__(self, forwarded: Callable[[], int]) -> None:
        self.forwarded = forwarded
        self.marks: dict[str, tuple[float, float, int]] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = (time.perf_counter(), time.process_time(), self.forwarded())

    def report(self) -> dict[str, Any]:
        (w0, c0, n0), (w1, c1, n1) = self.marks["from"], self.marks["to"]
        return {
            "forwarded": self.forwarded(),
            "measured": n1 - n0,
            "busy": (c1 - c0) / (w1 - w0),
            "pps_per_cpu_s": (n1 - n0) / (c1 - c0),
        }


def control(
    loop: asyncio.AbstractEventLoop, conn: Connection, meter: Meter
) -> asyncio.Future[None]:
    """Handles the parent's marks; resolves at "stop" (or when the parent goes away)."""
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            message = conn.recv()
        except EOFError:
            message = "stop"
        if message == "stop":
            loop.remove_reader(conn.fileno())
            if not done.done():
                done.set_result(None)
        else:
            meter.mark(message)

    loop.add_reader(conn.fileno(), readable)
    return done


async def host_router(conn: Connection, tx: Endpoint, sinks: Sequence[Endpoint]) -> dict[str, Any]:
    router = router_node()
    endpoints: dict[tuple[str, str], Endpoint | int] = {
        ("tx", "eth0"): tx,
        ("s1", "eth0"): sinks[0],
        ("s2", "eth0"): sinks[1],
        ("r", "up"): 0,
        ("r", "down"): 0,
    }
    net = AsyncOverlay(router_links(), endpoints, [router])
    net.start()
    loop = asyncio.get_running_loop()
    conn.send((net.endpoints[("r", "up")], net.endpoints[("r", "down")]))

    async def announce_ready() -> None:
        # The parent's joins come in over the servers' link; say when both are in.
        while len(router.members.get(int(GROUP), {})) < len(OWNERS):
            await asyncio.sleep(0.002)
        conn.send("ready")

    ready = asyncio.create_task(announce_ready())
    meter = Meter(lambda: router.stats.multicast_forwarded)
    stop = control(loop, conn, meter)
    stop.add_done_callback(lambda _: net.close())
    try:
        await net.run_for(CHILD_LIMIT_S)  # returns at "stop" (close), raises a node's error
    finally:
        ready.cancel()
        net.close()
    stats = router.stats
    return {
        **meter.report(),
        "no_member": stats.no_member,
        "malformed": stats.malformed,
        "joins_accepted": stats.joins_accepted,
        "received": net.counters["upstream"].received,
        "dropped": net.counters["servers"].dropped,
    }


class Forward(asyncio.DatagramProtocol):
    """The asyncio relay: each datagram is sent on as it arrives."""

    def __init__(self, out: asyncio.DatagramTransport, to: Endpoint) -> None:
        self.out = out
        self.to = to
        self.count = 0

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.out.sendto(data, self.to)
        self.count += 1


async def host_asyncio_relay(
    conn: Connection, tx: Endpoint, sinks: Sequence[Endpoint]
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    out, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=udp_socket())
    forward = Forward(out, sinks[0])
    inp, _ = await loop.create_datagram_endpoint(lambda: forward, sock=udp_socket())
    meter = Meter(lambda: forward.count)
    conn.send((inp.get_extra_info("sockname"), out.get_extra_info("sockname")))
    try:
        await asyncio.wait_for(control(loop, conn, meter), CHILD_LIMIT_S)
    finally:
        inp.close()
        out.close()
    return meter.report()


async def host_raw_relay(
    conn: Connection, tx: Endpoint, sinks: Sequence[Endpoint]
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    inp, out = udp_socket(), udp_socket()
    to = sinks[0]
    count = [0]

    buffer = bytearray(65535)
    view = memoryview(buffer)

    def readable() -> None:
        # As AsyncOverlay._readable: drain up to a batch per wake-up into one buffer
        # (recv_into: no new bytes object per datagram) and send each on from it.
        recv_into, sendto = inp.recv_into, out.sendto
        n = 0
        while n < 256:
            try:
                length = recv_into(buffer)
            except BlockingIOError:
                break
            n += 1
            sendto(view[:length], to)
        count[0] += n

    loop.add_reader(inp, readable)
    meter = Meter(lambda: count[0])
    conn.send((inp.getsockname(), out.getsockname()))
    try:
        await asyncio.wait_for(control(loop, conn, meter), CHILD_LIMIT_S)
    finally:
        loop.remove_reader(inp)
        inp.close()
        out.close()
    return meter.report()


RELAYS: dict[str, Callable[[Connection, Endpoint, Sequence[Endpoint]], Any]] = {
    "router": host_router,
    "raw_relay": host_raw_relay,
    "asyncio_relay": host_asyncio_relay,
}


def relay_process(
    kind: str, conn: Connection, tx: Endpoint, sinks: list[Endpoint], cpu: int | None
) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        stats = asyncio.run(RELAYS[kind](conn, tx, sinks))
    except BaseException as exc:
        conn.send(("error", f"{kind}: {exc!r}"))
        raise
    conn.send(("stats", stats))


# --- the load generator --------------------------------------------------------------


@dataclass
class Drive:
    pps: float  # packets back at the sinks per second, over the measured interval
    sent: int
    delivered: int
    per_sink: list[int]
    stalls: int  # times nothing came back for STALL_MS with packets in flight
    busy: float  # the generator's CPU time over wall time while measured

    @property
    def loss(self) -> float:
        return (self.sent - self.delivered) / self.sent if self.sent else 0.0


def flush(sinks: Sequence[socket.socket]) -> None:
    for sink in sinks:
        while True:
            try:
                sink.recv(65535)
            except BlockingIOError:
                break


def drive(
    tx: socket.socket,
    target: Endpoint,
    sinks: Sequence[socket.socket],
    packets: list[bytes],
    mark: Callable[[str], None] | None = None,
) -> Drive:
    """Send `packets` round robin to `target` with WINDOW in flight, count what comes
    back at `sinks`: WARMUP_S, then MEASURE_S measured (`mark` is told "from" and
    "to" at its ends), then DRAIN_S to collect."""
    flush(sinks)
    sendto = tx.sendto
    recvs = [sink.recv_into for sink in sinks]
    buf = bytearray(65535)
    poller = select.poll()
    for sink in sinks:
        poller.register(sink, select.POLLIN)
    mask = len(packets) - 1
    size = len(packets[0])  # every packet has the same length
    per_sink = [0] * len(sinks)
    sent = got = written_off = stalls = i = 0
    clock = time.perf_counter
    start = clock()
    measure_from, measure_to = start + WARMUP_S, start + WARMUP_S + MEASURE_S
    got_at = t_at = pps = cpu_at = busy = 0.0
    cpu_clock = time.process_time
    measuring = False
    while True:
        room = WINDOW - max(0, sent - got - written_off)
        for _ in range(room):
            sendto(packets[i & mask], target)
            i += 1
        sent += room
        drained = 0
        for k, recv in enumerate(recvs):
            n = 0
            try:
                while True:
                    # Only the generator's packets count: the router also sends
                    # its own General Queries to the servers' link (shorter).
                    if recv(buf) == size:
                        n += 1
            except BlockingIOError:
                pass
            per_sink[k] += n
            drained += n
        got += drained
        now = clock()
        if not measuring and now >= measure_from:
            measuring, got_at, t_at, cpu_at = True, got, now, cpu_clock()
            if mark is not None:
                mark("from")
        elif measuring and now >= measure_to:
            pps = (got - got_at) / (now - t_at)
            busy = (cpu_clock() - cpu_at) / (now - t_at)
            if mark is not None:
                mark("to")
            break
        if not drained and not poller.poll(STALL_MS):
            # Nothing back for so long that what is in flight must be lost: free the
            # window. A relay merely descheduled would be sent a second window on
            # top of the first and overflow its buffer, hence a long wait.
            stalls += 1
            written_off = sent - got
    deadline = clock() + DRAIN_S
    while got < sent and clock() < deadline:
        for k, recv in enumerate(recvs):
            try:
                while True:
                    if recv(buf) == size:
                        per_sink[k] += 1
                        got += 1
            except BlockingIOError:
                pass
        poller.poll(10)
    return Drive(pps, sent, got, per_sink, stalls, busy)


def receive_one(sinks: Sequence[socket.socket], timeout: float) -> tuple[int, bytes] | None:
    """The next datagram at any sink, with the sink's index."""
    poller = select.poll()
    for sink in sinks:
        poller.register(sink, select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        return None
    for k, sink in enumerate(sinks):
        try:
            return k, sink.recv(65535)
        except BlockingIOError:
            continue
    return None


def check_forwarding(
    tx: socket.socket, target: Endpoint, sinks: Sequence[socket.socket], packets: list[bytes]
) -> int:
    """Before timing: each client's packet reaches its owner only, TTL one less,
    header checksum valid, otherwise unchanged."""
    flush(sinks)
    checked = 0
    for packet in packets[:64]:
        tx.sendto(packet, target)
        arrived = receive_one(sinks, 1.0)
        if arrived is None:
            raise SystemExit("router check: a packet was not forwarded")
        k, forwarded = arrived
        ip = IPv4Packet.from_wire(forwarded)  # verifies the patched checksum
        sent = IPv4Packet.from_wire(packet)
        owner = next(i for i, (_, p) in enumerate(OWNERS) if p.contains(ip.header.src))
        if k != owner or ip.header.ttl != sent.header.ttl - 1 or ip.payload != sent.payload:
            raise SystemExit(f"router check: {ip.header.src} went to sink {k}, ttl {ip.header.ttl}")
        checked += 1
    if receive_one(sinks, 0.05) is not None:
        raise SystemExit("router check: a packet was delivered twice")
    return checked


@dataclass
class Run:
    drive: Drive
    relay: dict[str, Any]
    checked: int = 0


def expect(conn: Connection, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise SystemExit(f"relay: no {what} within {timeout} s")
    message = conn.recv()
    if isinstance(message, tuple) and message and message[0] == "error":
        raise SystemExit(f"relay failed: {message[1]}")
    return message


def run_relay(
    kind: str,
    tx: socket.socket,
    sinks: Sequence[socket.socket],
    packets: list[bytes],
    cpu: int | None,
) -> Run:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    addresses = [sink.getsockname() for sink in sinks]
    proc = ctx.Process(
        target=relay_process, args=(kind, child, tx.getsockname(), addresses, cpu), daemon=True
    )
    proc.start()
    child.close()
    try:
        inp, out = expect(parent, 10.0, "endpoints")
        checked = 0
        if kind == "router":
            for server, sink in enumerate(sinks[: len(OWNERS)]):
                sink.sendto(join_packet(server), out)
            if expect(parent, 5.0, "membership") != "ready":
                raise SystemExit("relay: unexpected message")
            checked = check_forwarding(tx, inp, sinks, packets)
        result = drive(tx, inp, sinks, packets, parent.send)
        parent.send("stop")
        message = expect(parent, 10.0, "stats")
        return Run(result, message[1], checked)
    finally:
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()


def memory_run() -> tuple[float, float, int]:
    """(events per wall second, virtual seconds per wall second, events) of the
    memory driver running the demo pool for MEMORY_VIRTUAL_S."""
    pool = PoolRun(builtin(), "memory", seed=1)
    start = time.perf_counter()
    pool.run(MEMORY_VIRTUAL_S)
    wall = time.perf_counter() - start
    network = pool.network
    assert isinstance(network, MemoryNetwork)
    events = network.events_processed
    return events / wall, MEMORY_VIRTUAL_S / wall, events


# --- the bench ------------------------------------------------------------------------

HEADLINE = "ratio_vs_raw_relay"
HEADLINE_BASELINE = (
    "raw_relay: the same hop with the overlay driver's batching (add_reader, up to 256 "
    "datagrams per wake-up, recv_into one buffer) and no router logic"
)


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Forwarding rate of each relay per round, and the router's ratio to the
    baselines per round."""
    fig, axes = _plots.grid(
        f"One hop on the overlay: {result['packet_bytes']}-byte packets, "
        f"{result['measure_s']} s per relay and round",
        2,
    )
    _plots.per_round(
        axes[0],
        {case: [v / 1e3 for v in values] for case, values in result["per_round_pps"].items()},
        ylabel="thousand packets / s",
    )
    # Results saved before the rename call the asyncio ratio plain `ratio`.
    vs_asyncio = result.get(
        "ratio_vs_asyncio_protocol_relay_per_round", result.get("ratio_per_round", [])
    )
    _plots.per_round(
        axes[1],
        {
            "router / raw relay, same batching (headline)": result["ratio_vs_raw_relay_per_round"],
            "router / asyncio DatagramProtocol relay": vs_asyncio,
        },
        ylabel="ratio (same round)",
    )
    _plots.reference(axes[1], 1.0, "parity")
    axes[1].legend(fontsize=8)
    return [_plots.save(fig, directory, "overlay_pps_per_round")]


def main() -> None:
    args = _plots.arguments(__doc__)  # before run_and_emit, so that --help prints on stdout

    def run() -> dict[str, Any]:
        summary = measure()
        _plots.write(summary, args.plots, plot)
        return summary

    run_and_emit("overlay", run)


def measure() -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    # Generator and relay each on a core of their own when there are two.
    gen_cpu, relay_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    if gen_cpu is not None:
        os.sched_setaffinity(0, {gen_cpu})
    packets = client_packets()
    tx = udp_socket()
    sinks = [udp_socket() for _ in OWNERS]
    cases = ("sender", "router", "raw_relay", "asyncio_relay")
    relays = cases[1:]
    # A fresh order each round, so that no case always runs right after another
    # (or always first, on a machine whose other load comes and goes).
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    progress(
        f"{ROUNDS} rounds of {'/'.join(cases)} in random order (seed {seed}), then memory; "
        f"{MEASURE_S} s measured after {WARMUP_S} s, window {WINDOW}, CPUs {cpus}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    rates: dict[str, list[float]] = {case: [] for case in cases}
    losses: dict[str, list[float]] = {case: [] for case in cases}
    stalls: dict[str, int] = dict.fromkeys(cases, 0)
    per_cpu: dict[str, list[float]] = {case: [] for case in relays}
    busy: dict[str, list[float]] = {case: [] for case in relays}
    gen_busy: dict[str, list[float]] = {case: [] for case in cases}
    memory: list[tuple[float, float, int]] = []
    orders: list[list[str]] = []
    split: list[float] = []
    checked = 0
    consistent = True
    try:
        for round_no in range(ROUNDS):
            order = rng.sample(cases, len(cases))
            orders.append(order)
            for case in order:
                if case == "sender":
                    result = drive(tx, sinks[0].getsockname(), sinks, packets)
                else:
                    run = run_relay(case, tx, sinks, packets, relay_cpu)
                    result = run.drive
                    per_cpu[case].append(run.relay["pps_per_cpu_s"])
                    busy[case].append(run.relay["busy"])
                    # Every packet the relay sent on arrived, and nothing else did.
                    consistent &= run.relay["forwarded"] == result.delivered + run.checked
                    if case == "router":
                        checked += run.checked
                        split.append(result.per_sink[0] / max(1, result.delivered))
                rates[case].append(result.pps)
                losses[case].append(result.loss)
                stalls[case] += result.stalls
                gen_busy[case].append(result.busy)
            memory.append(memory_run())
            progress(
                f"round {round_no + 1}: "
                + "  ".join(f"{case} {rates[case][-1] / 1e3:6.1f}k" for case in order)
                + f"  memory {memory[-1][0] / 1e3:5.1f}k ev/s"
            )
    finally:
        tx.close()
        for sink in sinks:
            sink.close()

    med = {case: statistics.median(values) for case, values in rates.items()}
    cpu_med = {case: statistics.median(values) for case, values in per_cpu.items()}
    fastest = max(med[case] for case in relays)
    if med["sender"] < 1.5 * fastest:
        progress("warning: the sender is not well above the relays; ratios may be capped")

    def per_round(a: str, b: str) -> list[float]:
        return [round(x / y, 3) for x, y in zip(rates[a], rates[b], strict=True)]

    vs_raw, vs_asyncio = per_round("router", "raw_relay"), per_round("router", "asyncio_relay")
    summary = {
        "bench": "overlay",
        # The figure to quote, and what it is measured against.
        "headline": HEADLINE,
        "headline_baseline": HEADLINE_BASELINE,
        "rounds": ROUNDS,
        "order_seed": seed,
        "order_per_round": orders,
        "measure_s": MEASURE_S,
        "warmup_s": WARMUP_S,
        "window": WINDOW,
        "sources": SOURCES,
        "packet_bytes": len(packets[0]),
        "cpus": len(cpus),
        "router_pps": round(med["router"]),
        "raw_relay_pps": round(med["raw_relay"]),
        "asyncio_relay_pps": round(med["asyncio_relay"]),
        "sender_pps": round(med["sender"]),
        # Ratios of the medians over the rounds; beside each, the median of the
        # ratios within a round (the same load on the machine for both sides).
        "ratio_vs_raw_relay": round(med["router"] / med["raw_relay"], 3),
        "ratio_vs_raw_relay_median_of_rounds": round(statistics.median(vs_raw), 3),
        "ratio_vs_asyncio_protocol_relay": round(med["router"] / med["asyncio_relay"], 3),
        "ratio_vs_asyncio_protocol_relay_median_of_rounds": round(statistics.median(vs_asyncio), 3),
        "ratio_vs_raw_relay_per_round": vs_raw,
        "ratio_vs_asyncio_protocol_relay_per_round": vs_asyncio,
        "sender_over_fastest_relay": round(med["sender"] / fastest, 2),
        "per_round_pps": {case: [round(r) for r in values] for case, values in rates.items()},
        # Packets per second of the relay's own CPU time: its cost per packet,
        # independent of how much CPU other work on the machine left it.
        "pps_per_relay_cpu_s": {case: round(v) for case, v in cpu_med.items()},
        "ratio_vs_raw_relay_per_cpu_s": round(cpu_med["router"] / cpu_med["raw_relay"], 3),
        "ratio_vs_asyncio_protocol_relay_per_cpu_s": round(
            cpu_med["router"] / cpu_med["asyncio_relay"], 3
        ),
        # CPU time over wall time while measured: near 1 for whichever side set
        # the pace; both well below 1 means other work on the machine took the CPU.
        "relay_busy": {case: round(statistics.median(v), 2) for case, v in busy.items()},
        "generator_busy": {c: round(statistics.median(v), 2) for c, v in gen_busy.items()},
        "loss": {case: round(max(values), 6) for case, values in losses.items()},
        "stalls": stalls,
        "router_checked_packets": checked,
        "forwarded_equals_delivered": consistent,
        "router_share_to_s1": round(statistics.median(split), 4),
        "memory_events_per_s": round(statistics.median(m[0] for m in memory)),
        "memory_virtual_s_per_wall_s": round(statistics.median(m[1] for m in memory), 3),
        "memory_events": memory[0][2],
    }
    progress(
        f"headline {HEADLINE} = {summary[HEADLINE]} (router over the same-batching raw relay, "
        f"ratio of medians); against the asyncio DatagramProtocol relay "
        f"{summary['ratio_vs_asyncio_protocol_relay']}"
    )
    return summary


if __name__ == "__main__":
    main()
