"""Holding a moving TCP flow's packets: at the edge in an NFQUEUE, at the old server behind a drop.

While a connection moves, its packets must wait, or the old server (its socket
gone) or the new one (no socket yet) would answer them with a reset. Both
places act on the flow's conntrack entry, so a move costs one netlink message
per flow, no rule change:

* At the client's edge router a static iptables rule queues (NFQUEUE) every
  packet to the VIP whose conntrack mark is `HOLD_MARK`. `EdgeHold.hold` sets
  that mark on the flow's entry (its tag, `srv6.py`, is the mark too: the flow
  leaves its old server's segment); `release` sets the new server's mark and
  lets the queued packets go with it, in the order they came (a packet that comes
  meanwhile may overtake them; TCP puts it back in order).
* At the old server static rules drop what a flow's socket sends once the
  flow's conntrack mark is `MUTE_MARK` (`ServerGuard.mute`, set as the service
  freezes the socket: nothing it sends from then on can tell the client more
  than the dump says), and drop both ways once it is `GONE_MARK`
  (`ServerGuard.gone`, set once the socket is dumped: what comes later is not
  in the dump). Packets that arrive before the dump still reach the socket and
  are in it. A late packet is dropped, never answered with a reset; the
  entry's timeout is shortened so it does not linger; a failed move clears
  the mark (`back`).

The NFQUEUE client (`NfQueue`) speaks nfnetlink_queue directly: bind a queue,
copy the first bytes of each packet (addresses and ports), give verdicts one
packet at a time with a new packet mark. (This kernel has iptables' NFQUEUE
target but not nftables' `queue`.)

Everything follows the VIP's family: an IPv6 VIP's rules go through ip6tables,
its conntrack messages carry IPv6 tuples, and its queued packets are read as
IPv6 (the TCP header right after the fixed header: the lab's clients send no
extension headers). A queue number is one queue for both families, so an IPv6
hold queues in `QUEUE_NUM6`: an edge of a dual-stack pool holds both families'
flows side by side, and a server's guard marks each flow in its own family.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import select
import shutil
import socket
import struct
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_NEW, NFCTAttrTuple, nfct_msg

from manycast.errors import DriverError

NETLINK_NETFILTER = 12
HOLD_MARK = 0x7E57  # at the edge: the flow is moving, queue its packets
GONE_MARK = 0x60DE  # at the old server: the flow has left, drop its packets
MUTE_MARK = 0x60DF  # ... it is leaving: drop what its socket sends
_GONE_OR_MUTE = f"{GONE_MARK:#x}/{0xFFFFFFFF ^ (GONE_MARK ^ MUTE_MARK):#x}"
QUEUE_NUM = 7100
QUEUE_NUM6 = 7101  # an IPv6 hold's queue (the numbers are shared by both families)
GONE_TIMEOUT_S = 30  # how long a moved-away flow's entry (and its drop) lasts
ACK_TIMEOUT_S = 1.0
COPY_BYTES = 48  # an IPv4 header with room for options, or IPv6's, and the TCP ports
IPV6_HEADER = 40
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQA_CFG_MASK, NFQA_CFG_FLAGS = 4, 5
NFQA_CFG_F_GSO = 1 << 2  # a GSO packet is queued whole, not cut into segments first
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META, NFQNL_COPY_PACKET = 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_PAYLOAD = 1, 2, 3, 10
NF_DROP, NF_ACCEPT = 0, 1
QUEUE_MAXLEN = 1 << 16
SO_RCVBUFFORCE = 33

Flow = tuple[str, int]  # the client's address and port (the VIP and its port are known)


class HoldError(DriverError):
    """The edge or a server cannot hold a flow (no rule, no conntrack entry, no queue)."""


# -- rules --------------------------------------------------------------------------------
def family_of(address: str) -> socket.AddressFamily:
    """The address family of `address` (an IPv4 or IPv6 address as text)."""
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def iptables(name: str = "iptables") -> str:
    """The path of `name` (iptables, or ip6tables for an IPv6 VIP's rules)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise HoldError(f"moving TCP connections needs {name} (NFQUEUE): apt-get install iptables")
    return found


def queue_of(address: str) -> int:
    """The NFQUEUE number of the edge hold for a VIP of `address`'s family."""
    return QUEUE_NUM6 if family_of(address) == socket.AF_INET6 else QUEUE_NUM


def iptables_for(address: str) -> str:
    """The iptables program of `address`'s family."""
    return iptables("ip6tables" if family_of(address) == socket.AF_INET6 else "iptables")


def install(enter: Callable[[], None], rules: list[list[str]], binary: str | None = None) -> None:
    """Add `rules` (each `-A` or `-t TABLE -A ...`) inside a namespace, `enter` run
    between fork and exec; a rule already there is not added again. `binary`: another
    program of the family (ip6tables, `iptables_for`), else iptables."""
    binary = binary or iptables()

    def run(rule: list[str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [binary, "-w", *rule], preexec_fn=enter, capture_output=True, timeout=20, check=False
        )

    for rule in rules:
        if run(["-C" if word == "-A" else word for word in rule]).returncode == 0:
            continue
        done = run(rule)
        if done.returncode != 0:
            problem = done.stderr.decode(errors="replace").strip()
            raise HoldError(f"{Path(binary).name} {' '.join(rule)}: {problem}")


def edge_rules(vip: str, port: int, queue: int | None = None) -> list[list[str]]:
    """The edge router's one rule: a held flow's packets to the VIP wait in `queue`
    (default: the VIP family's, `queue_of`; no listener: dropped, which the client's
    retransmission covers)."""
    queue = queue_of(vip) if queue is None else queue
    return [
        ["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-d", vip, "--dport", str(port),
         "-m", "connmark", "--mark", str(HOLD_MARK), "-j", "NFQUEUE", "--queue-num", str(queue)],
    ]  # fmt: skip


def server_rules(vip: str, port: int) -> list[list[str]]:
    """A server's rules: a flow that has left is dropped both ways, one that is
    leaving on the way out. A client may open a new connection from the same port
    while the old entry lasts: conntrack ignores its SYN (no entry, so no drop) and
    takes the server's SYN-ACK into the old entry, whose mark that SYN-ACK clears
    (in mangle, before the drop), as it would a SYN that meets the entry."""
    gone = ["-m", "connmark", "--mark", f"{GONE_MARK:#x}", "-j", "DROP"]
    gone_or_mute = ["-m", "connmark", "--mark", _GONE_OR_MUTE]
    clear = ["-j", "CONNMARK", "--set-mark", "0"]
    inbound = ["-p", "tcp", "-d", vip, "--dport", str(port)]
    outbound = ["-p", "tcp", "-s", vip, "--sport", str(port)]
    return [
        ["-t", "mangle", "-A", "PREROUTING", *inbound, "--syn", *gone_or_mute, *clear],
        ["-t", "mangle", "-A", "OUTPUT", *outbound, "--tcp-flags", "SYN,ACK", "SYN,ACK",
         *gone_or_mute, *clear],
        ["-A", "INPUT", *inbound, *gone],
        ["-A", "OUTPUT", *outbound, *gone_or_mute, "-j", "DROP"],
    ]  # fmt: skip


# -- conntrack marks ----------------------------------------------------------------------
_SENTINEL_SOURCE = {socket.AF_INET: "198.51.100.253", socket.AF_INET6: "2001:db8:5e:a1::fd"}
_SENTINEL_PORT = 0xBEEF
_SENTINEL_MARK = 0x5EA1F00D
_SENTINEL_TIMEOUT = 0x7E0D7E0D
_SENTINEL_SEQ = 0x0C0FFEE1


def _template(daddr: str, dport: int, timeout: bool) -> tuple[bytes, list[int]]:
    """One CT_NEW (update) message with sentinels where the flow's source, port, mark,
    timeout and sequence number go, and their offsets (as `ctmark.py` does); the
    tuple's family is `daddr`'s."""
    family = family_of(daddr)
    source = _SENTINEL_SOURCE[family]
    msg = nfct_msg.create_from(
        mark=_SENTINEL_MARK,
        timeout=_SENTINEL_TIMEOUT if timeout else None,
        tuple_orig=NFCTAttrTuple(
            family=family,
            saddr=source,
            daddr=daddr,
            proto=socket.IPPROTO_TCP,
            sport=_SENTINEL_PORT,
            dport=dport,
        ),
    )
    msg["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = _SENTINEL_SEQ
    msg["nfgen_family"] = family
    msg.encode()
    data = bytes(msg.data)
    offsets = [
        data.index(struct.pack("=I", _SENTINEL_SEQ)),
        data.index(socket.inet_pton(family, source)),
        data.index(struct.pack("!H", _SENTINEL_PORT)),
        data.index(struct.pack("!I", _SENTINEL_MARK)),
    ]
    if timeout:
        offsets.append(data.index(struct.pack("!I", _SENTINEL_TIMEOUT)))
    return data, offsets


class CtMarks:
    """Sets conntrack marks of flows to (VIP, port) in this namespace and waits for the
    kernel's answers (open it inside the namespace)."""

    def __init__(self, vip: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        # Room for the answers to a batch of hundreds (each echoes its request).
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self.sock.bind((0, 0))
        self.sock.setblocking(False)
        self.vip, self.port = vip, port
        self.family = family_of(vip)
        self._plain = _template(vip, port, timeout=False)
        self._timed = _template(vip, port, timeout=True)
        self._seq = 0
        self.sent = 0
        self.missing = 0
        self.failed = 0

    def mark(
        self, flows: Iterable[Flow], mark: int, timeout: int | None = None, wait: bool = True
    ) -> dict[Flow, int]:
        """Set `mark` (and a new `timeout`, seconds) on each flow's entry; with `wait`,
        each flow's answer: 0, or the errno (ENOENT: conntrack knows no such flow)."""
        data, offsets = self._plain if timeout is None else self._timed
        pending: dict[int, Flow] = {}
        results: dict[Flow, int] = {}
        for count, flow in enumerate(flows, 1):
            message = bytearray(data)
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            struct.pack_into("=I", message, offsets[0], self._seq)
            packed = socket.inet_pton(self.family, flow[0])
            message[offsets[1] : offsets[1] + len(packed)] = packed
            struct.pack_into("!H", message, offsets[2], flow[1])
            struct.pack_into("!I", message, offsets[3], mark)
            if timeout is not None:
                struct.pack_into("!I", message, offsets[4], timeout)
            try:
                self.sock.send(message)
            except OSError:
                self.failed += 1
                continue
            self.sent += 1
            pending[self._seq] = flow
            if count % 64 == 0:
                self._drain(pending, results, 0.0)  # the answers so far: none is lost
        if not wait:
            self._drain(pending, results, 0.0)
            return results
        self._drain(pending, results, ACK_TIMEOUT_S)
        for flow in pending.values():
            results[flow] = errno.ETIMEDOUT
        return results

    def _drain(self, pending: dict[int, Flow], results: dict[Flow, int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    continue  # answers were lost: their flows time out, counted
                if not isinstance(exc, BlockingIOError):
                    raise
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    return
                select.select([self.sock], [], [], left)
                continue
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, seq = struct.unpack_from("=IHHI", data, offset)
                if kind == NLMSG_ERROR and offset + 20 <= len(data):
                    code = -struct.unpack_from("=i", data, offset + 16)[0]
                    flow = pending.pop(seq, None)
                    if flow is not None:
                        results[flow] = code
                    if code == errno.ENOENT:
                        self.missing += 1
                    elif code:
                        self.failed += 1
                if length < 16:
                    break
                offset += (length + 3) & ~3

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- NFQUEUE ------------------------------------------------------------------------------
def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int, seq: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    msg_type = (NFNL_SUBSYS_QUEUE << 8) | kind
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


@dataclass(frozen=True, slots=True)
class Queued:
    packet_id: int
    flow: Flow


class NfQueue:
    """One nfnetlink queue of this namespace, bound at construction. `copy_bytes` 0
    copies no packet bytes (metadata only: `read_ids`); `maxlen` bounds the kernel's
    queue (beyond it the kernel drops, and counts the drop); `flags` are NFQA_CFG_F_*;
    `family` is the queued packets' (AF_INET or AF_INET6)."""

    def __init__(
        self,
        num: int = QUEUE_NUM,
        *,
        copy_bytes: int = COPY_BYTES,
        maxlen: int = QUEUE_MAXLEN,
        flags: int = 0,
        family: int = socket.AF_INET,
    ) -> None:
        self.num = num
        self.family = family
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self.sock.bind((0, 0))
        self._seq = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, family)))
        mode = NFQNL_COPY_PACKET if copy_bytes else NFQNL_COPY_META
        params = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_bytes, mode))
        params += _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
        if flags:
            params += _attr(NFQA_CFG_FLAGS, struct.pack("!I", flags))
            params += _attr(NFQA_CFG_MASK, struct.pack("!I", flags))
        self._config(params)
        self.sock.setblocking(False)
        self.verdicts = 0
        self.unparsed = 0
        self.overruns = 0  # times the socket's buffer was full (the kernel dropped packets)

    def _config(self, attrs: bytes) -> None:
        self._seq += 1
        self.sock.send(
            _message(NFQNL_MSG_CONFIG, self.num, attrs, NLM_F_REQUEST | NLM_F_ACK, self._seq)
        )
        self.sock.settimeout(ACK_TIMEOUT_S)
        try:
            while True:
                data = self.sock.recv(1 << 16)
                _, kind, _, seq = struct.unpack_from("=IHHI", data)
                if kind == NLMSG_ERROR and seq == self._seq:
                    code = -struct.unpack_from("=i", data, 16)[0]
                    if code:
                        raise HoldError(
                            f"cannot bind NFQUEUE {self.num}: {errno.errorcode.get(code, code)}"
                        )
                    return
        except TimeoutError:
            raise HoldError(f"no answer binding NFQUEUE {self.num}") from None

    def _messages(self) -> Iterator[bytes]:
        """The attributes of every packet message queued since the last call, in order."""
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1  # the kernel counts the packets (user_dropped)
                continue
            offset = 0
            while offset + 20 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    yield data[offset + 20 : offset + length]
                if length < 16:
                    break
                offset += (length + 3) & ~3

    def read(self) -> list[Queued]:
        """Every packet queued since the last call, in the order the kernel queued them."""
        found: list[Queued] = []
        for attrs in self._messages():
            packet = self._parse(attrs, self.family == socket.AF_INET6)
            if packet is None:
                self.unparsed += 1
            else:
                found.append(packet)
        return found

    def read_ids(self) -> list[int]:
        """The ids of every packet queued since the last call, in order (any copy mode)."""
        found: list[int] = []
        for attrs in self._messages():
            packet_id = self._packet_id(attrs)
            if packet_id is None:
                self.unparsed += 1
            else:
                found.append(packet_id)
        return found

    @staticmethod
    def _packet_id(attrs: bytes) -> int | None:
        offset = 0
        while offset + 4 <= len(attrs):
            length, kind = struct.unpack_from("=HH", attrs, offset)
            if length < 4:
                return None
            if kind & 0x7FFF == NFQA_PACKET_HDR and length >= 8:
                packet_id: int = struct.unpack_from("!I", attrs, offset + 4)[0]
                return packet_id
            offset += (length + 3) & ~3
        return None

    @staticmethod
    def _parse(attrs: bytes, v6: bool = False) -> Queued | None:
        packet_id: int | None = None
        flow: Flow | None = None
        offset = 0
        while offset + 4 <= len(attrs):
            length, kind = struct.unpack_from("=HH", attrs, offset)
            if length < 4:
                break
            value = attrs[offset + 4 : offset + length]
            kind &= 0x7FFF
            if kind == NFQA_PACKET_HDR and len(value) >= 4:
                packet_id = struct.unpack_from("!I", value)[0]
            elif kind == NFQA_PAYLOAD and v6 and len(value) >= IPV6_HEADER + 2:
                source = str(ipaddress.IPv6Address(value[8:24]))
                flow = (source, struct.unpack_from("!H", value, IPV6_HEADER)[0])
            elif kind == NFQA_PAYLOAD and not v6 and len(value) >= 20:
                header = (value[0] & 0xF) * 4
                if len(value) >= header + 2:
                    source = str(ipaddress.IPv4Address(value[12:16]))
                    flow = (source, struct.unpack_from("!H", value, header)[0])
            offset += (length + 3) & ~3
        if packet_id is None or flow is None:
            return None
        return Queued(packet_id, flow)

    def verdict(self, packet_id: int, accept: bool, mark: int | None = None) -> None:
        attrs = _attr(
            NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT if accept else NF_DROP, packet_id)
        )
        if mark is not None:
            attrs += _attr(NFQA_MARK, struct.pack("!I", mark))
        self._seq += 1
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.num, attrs, NLM_F_REQUEST, self._seq))
        self.verdicts += 1

    def accept_through(self, packet_id: int) -> None:
        """One batch verdict: accept every packet still queued up to `packet_id`."""
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        self._seq += 1
        self.sock.send(_message(NFQNL_MSG_VERDICT_BATCH, self.num, attrs, NLM_F_REQUEST, self._seq))
        self.verdicts += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- the two ends -------------------------------------------------------------------------
@dataclass
class EdgeStats:
    held: int = 0  # flows held
    released: int = 0
    packets_held: int = 0  # packets that waited in the queue
    hold_failed: int = 0  # flows conntrack did not know (not moved)


@dataclass
class EdgeHold:
    """A client edge router's side of moves: hold flows, then release them onto a
    server's segment. Open it inside the edge's namespace (`netns.run_in`)."""

    vip: str
    port: int
    queue_num: int | None = None  # default: the VIP family's (`queue_of`)
    stats: EdgeStats = field(default_factory=EdgeStats)

    def __post_init__(self) -> None:
        self.marks = CtMarks(self.vip, self.port)
        num = queue_of(self.vip) if self.queue_num is None else self.queue_num
        self.queue = NfQueue(num, family=family_of(self.vip))
        self._waiting: dict[Flow, list[int]] = defaultdict(list)

    def hold(self, flows: Iterable[Flow]) -> list[Flow]:
        """Queue the flows' packets from now on; the flows the edge could hold."""
        results = self.marks.mark(flows, HOLD_MARK)
        held = [flow for flow, code in results.items() if code == 0]
        self.stats.held += len(held)
        self.stats.hold_failed += len(results) - len(held)
        return held

    def _collect(self) -> None:
        for packet in self.queue.read():
            self._waiting[packet.flow].append(packet.packet_id)

    def release(self, flows: Iterable[Flow], mark: int) -> int:
        """Send the flows on with `mark` (a server's segment), their held packets first,
        in order; the number of packets that had waited."""
        flows = list(flows)
        # The mark first: a released packet passes the VIP rule (`srv6.nft_ruleset`)
        # again, which copies the conntrack mark onto it.
        self.marks.mark(flows, mark)
        self._collect()
        count = self._let_go(flows, mark)
        self.stats.released += len(flows)
        self.stats.packets_held += count
        return count

    def _let_go(self, flows: list[Flow], mark: int) -> int:
        count = 0
        for flow in flows:
            for packet_id in self._waiting.pop(flow, ()):
                self.queue.verdict(packet_id, True, mark)
                count += 1
        return count

    def close(self) -> None:
        # Anything still held goes nowhere: the kernel drops the queue with its socket.
        self.marks.close()
        self.queue.close()


class ServerGuard:
    """A server's side: mark a flow gone (its packets dropped both ways) or back.
    `vips`: the pool's address, or one of each family (a dual-stack pool's): each
    flow is marked with the tuple of its client's family."""

    def __init__(self, vips: str | Iterable[str], port: int) -> None:
        vips = [vips] if isinstance(vips, str) else list(vips)
        self.marks = {family_of(vip): CtMarks(vip, port) for vip in vips}

    def _mark(self, flows: Iterable[Flow], mark: int, **how: Any) -> None:
        by_family: dict[socket.AddressFamily, list[Flow]] = defaultdict(list)
        for flow in flows:
            by_family[family_of(flow[0])].append(flow)
        for family, group in by_family.items():
            marks = self.marks.get(family)
            if marks is not None:  # (no flow of another family reaches the service)
                marks.mark(group, mark, **how)

    def mute(self, flows: Iterable[Flow]) -> None:
        # Not waited for: the kernel has taken the mark when the message is sent.
        self._mark(flows, MUTE_MARK, wait=False)

    def gone(self, flows: Iterable[Flow]) -> None:
        self._mark(flows, GONE_MARK, timeout=GONE_TIMEOUT_S, wait=False)

    def back(self, flows: Iterable[Flow]) -> None:
        self._mark(flows, 0, wait=True)

    def close(self) -> None:
        for marks in self.marks.values():
            marks.close()


__all__ = [
    "GONE_MARK",
    "HOLD_MARK",
    "MUTE_MARK",
    "QUEUE_NUM",
    "QUEUE_NUM6",
    "CtMarks",
    "EdgeHold",
    "Flow",
    "HoldError",
    "NfQueue",
    "ServerGuard",
    "edge_rules",
    "family_of",
    "install",
    "iptables_for",
    "queue_of",
    "server_rules",
]
