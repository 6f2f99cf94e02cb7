"""Fuzz every wire decoder and the two state decoders; time signed-join admission.

The contract under test (DESIGN.md, "Wire codecs are symmetric and strict"): on
any input a decoder returns a value or raises `WireError`, nothing else. Where a
decoder also promises that whatever it accepts re-encodes to the same bytes, that
is checked on every accepted input; the routers' fast paths are checked against
the strict decoder they stand in for, and an imported session state must be a
connection that can run.

Inputs are structure-aware: each decoder starts from valid encodings (drawn from
the Hypothesis strategies of tests/test_wire_*.py, plus generators here for what
those do not build: real session states, counter states, snapshot part sets,
kernel-captured reports), then gets every truncation of its seeds, the
ones'-complement twin of a zero checksum, and stacked mutations: bit flips,
byte insertions and deletions, length and count fields set to boundary values,
arithmetic on fields, splices between seeds, random tails and plain random bytes.
After a mutation, half of the inputs of a checksummed format get their checksum
recomputed, or nearly all of them would stop at the checksum.

When atheris is installed (it is not a project dependency), each byte decoder
then also gets a short coverage-guided run in a child process, from the same
seeds and with the same checksum repair in its mutator.

`unexpected_exceptions` counts every way a decoder broke its contract: exceptions
other than `WireError`, round-trip violations, fast paths that disagree with the
strict decoder, imported session states that do not run, and atheris children that
ended without a result (a crash, a timeout, out of memory: libFuzzer stops at the
first, so each counts once); `unexpected_by_kind` splits it.

Last: the router's admission check (`Admission.check`) on freshly signed IGMPv3
joins to a private group whose key is known, against raw Ed25519 verification of
the same messages, interleaved and repeated, medians reported.
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import dataclasses
import heapq
import importlib
import itertools
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import _plots
from _common import interleaved_medians, progress, run_and_emit
from manycast import auth, policy
from manycast.apps.counter import CounterService
from manycast.protocol.admission import Admission
from manycast.protocol.tcp import Connection, Demultiplexer, SessionConfig, SessionError, State
from manycast.space import AddressSpace
from manycast.wire import control, ip, label, membership, membership_query, session_state, transport
from manycast.wire.cursor import Reader, internet_checksum
from manycast.wire.errors import WireError

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"

INPUTS_PER_DECODER = 100_000
SEEDS_PER_STRATEGY = 150
TRUNCATION_SHARE = 0.2  # of each decoder's inputs: every prefix of its seeds, in order
SHOW = 5  # reproducers kept per kind of failure
HEX_LIMIT = 2048  # characters of hex shown per reproducer

V4 = (IPv4Address("192.0.2.1"), IPv4Address("233.252.0.7"))
V6 = (IPv6Address("2001:db8::1"), IPv6Address("ff3e::8000:1"))
MLD_HOSTS = (
    (IPv6Address("fe80::1"), membership.MLD_V2_ROUTERS),
    (IPv6Address("fe80::848d:fbff:fe91:7ef4"), membership.MLD_V2_ROUTERS),
)
# Queriers: the Linux bridge of the capture below to all nodes, a router to a group.
MLD_QUERIERS = (
    (IPv6Address("fe80::ff:fe00:1"), membership_query.ALL_NODES),
    (IPv6Address("fe80::1"), IPv6Address("ff3e::8000:1")),
)
# Captured from Linux (tests/test_wire_membership.py): real bytes among the seeds.
KERNEL_IGMP_PACKET = bytes.fromhex(
    "46c0002c00004000010241f4c0000201e0000016940400002200c4bd0000000105000001e8010203c6336407"
)
KERNEL_MLD_PACKET = bytes.fromhex(
    "6000000000340001fe80000000000000848dfbfffe917ef4ff020000000000000000000000000016"
    "3a00050200000100"
    "8f00c2e80000000105000001ff3e000000000000000000008000000120010db8000000000000000000000007"
)
# A Linux bridge's MLDv2 General Query (tests/test_wire_membership_query.py).
KERNEL_MLD_QUERY_PACKET = bytes.fromhex(
    "6000000000240001fe80000000000000000000fffe000001ff020000000000000000000000000001"
    "3a00050200000000"
    "820057962710000000000000000000000000000000000000027d0000"
)

# Boundary values for length, count and offset fields.
INTERESTING = (
    *range(10), 15, 16, 17, 20, 31, 32, 40, 60, 63, 64, 65, 127, 128, 255, 256, 1024,
    0x7FFF, 0x8000, 0xFFFE, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
    1 << 63, (1 << 64) - 1,
)  # fmt: skip


# --- checksums -------------------------------------------------------------------------


@dataclass(frozen=True)
class Checksum:
    """Where a format keeps its ones'-complement checksum and what it covers."""

    offset: int
    prefix: Callable[[tuple[Any, ...], bytes], bytes]  # pseudo-header, given context and data
    end: Callable[[bytes], int] = len  # covered bytes: data[:end(data)]
    zero_sent_as: int | None = None  # UDP: a computed 0 goes out as 0xFFFF

    def fix(self, ctx: tuple[Any, ...], data: bytes) -> bytes:
        """`data` with the checksum the encoder would have written."""
        o, end = self.offset, min(self.end(data), len(data))
        if end < o + 2:
            return data
        zeroed = data[:o] + b"\0\0" + data[o + 2 :]
        value = internet_checksum(self.prefix(ctx, zeroed) + zeroed[:end])
        if value == 0 and self.zero_sent_as is not None:
            value = self.zero_sent_as
        return zeroed[:o] + value.to_bytes(2, "big") + zeroed[o + 2 :]

    def twin(self, ctx: tuple[Any, ...], data: bytes, rng: random.Random) -> bytes | None:
        """`data` altered so its computed checksum is 0, with the field holding the
        other ones'-complement zero: 0xFFFF (or 0, "none", where 0 is sent as 0xFFFF).

        A strict decoder refuses it or re-encodes it unchanged; an 'all words sum to
        zero' check accepts it and then re-encodes a different field.
        """
        o, end = self.offset, min(self.end(data), len(data))
        words = [k for k in range(0, end - 1, 2) if k not in (o, o + 1)]
        if end < o + 2 or not words:
            return None
        buf = bytearray(data[:o] + b"\0\0" + data[o + 2 :])
        c = internet_checksum(self.prefix(ctx, bytes(buf)) + bytes(buf[:end]))
        # Adding c to any aligned word (end-around carry) makes the sum 0xFFFF, since
        # 2**16 == 1 mod 0xFFFF; the pseudo-headers are of even length.
        k = rng.choice(words)
        total = int.from_bytes(buf[k : k + 2], "big") + c
        buf[k : k + 2] = (total - 0xFFFF if total > 0xFFFF else total).to_bytes(2, "big")
        if internet_checksum(self.prefix(ctx, bytes(buf)) + bytes(buf[:end])) != 0:
            return None
        buf[o : o + 2] = b"\0\0" if self.zero_sent_as is not None else b"\xff\xff"
        return bytes(buf)


def _no_prefix(ctx: tuple[Any, ...], data: bytes) -> bytes:
    return b""


def _v4_header_end(data: bytes) -> int:
    return max((data[0] & 0x0F) * 4, ip.IPV4_HEADER_LEN) if data else 0


def _udp_prefix(ctx: tuple[Any, ...], data: bytes) -> bytes:
    return ip.pseudo_header(ctx[0], ctx[1], ip.IPPROTO_UDP, len(data) & 0xFFFF)


def _mld_prefix(ctx: tuple[Any, ...], data: bytes) -> bytes:
    return ip.pseudo_header(ctx[0], ctx[1], ip.IPPROTO_ICMPV6, len(data))


def _tcp_prefix(ctx: tuple[Any, ...], data: bytes) -> bytes:
    return transport.pseudo_header(ctx[0], ctx[1], len(data))


IPV4_SUM = Checksum(10, _no_prefix, _v4_header_end)
IGMP_SUM = Checksum(2, _no_prefix)
MLD_SUM = Checksum(2, _mld_prefix)
UDP_SUM = Checksum(6, _udp_prefix, zero_sent_as=0xFFFF)
TCP_SUM = Checksum(16, _tcp_prefix)


# --- targets ----------------------------------------------------------------------------


Check = Callable[[tuple[Any, ...], bytes, Any], str | None]


@dataclass(frozen=True)
class Target:
    """One decoder: how to call it, what to check when it accepts, how to mutate for it."""

    name: str
    decode: Callable[[tuple[Any, ...], bytes], Any]
    check: Check | None = None
    check_kind: str = "roundtrip"
    contexts: tuple[tuple[Any, ...], ...] = ((),)  # address pairs some decoders take
    checksum: Checksum | None = None
    fields: tuple[tuple[int, int], ...] = ()  # known (offset, width) length/count fields


def _same(encoded: bytes, data: bytes) -> str | None:
    """None if `encoded` is `data`, else how it differs (the part before ":" names
    the kind of difference, so reproducers are kept per kind)."""
    if encoded == data:
        return None
    if len(encoded) != len(data):
        how = f"re-encoded {len(encoded) - len(data):+d} bytes"
    else:
        first = next(i for i, (a, b) in enumerate(zip(encoded, data, strict=True)) if a != b)
        how = f"re-encoded differs from byte {first}"
    return f"{how}: {encoded.hex()}"


def _plain(cls: Any) -> tuple[Callable[[tuple[Any, ...], bytes], Any], Check]:
    """Decoder and round-trip check of a class with from_wire(data) / to_wire()."""
    return (lambda ctx, data: cls.from_wire(data)), (lambda ctx, data, v: _same(v.to_wire(), data))


def _udp_check(ctx: tuple[Any, ...], data: bytes, value: Any) -> str | None:
    # A zero checksum field means "none" (IPv4 only); anything else is recomputed.
    return _same(value.to_wire(ctx[0], ctx[1], checksum=data[6:8] != b"\0\0"), data)


def _peek_v4_check(ctx: tuple[Any, ...], data: bytes, got: Any) -> str | None:
    try:
        packet = ip.IPv4Packet.from_wire(data)
    except WireError:
        return None
    h = packet.header
    want = (int(h.src), int(h.dst), h.protocol, h.ttl)
    return None if got == want else f"peek {got}, strict decode {want}"


def _decrement_ttl_check(ctx: tuple[Any, ...], data: bytes, out: Any) -> str | None:
    try:
        packet = ip.IPv4Packet.from_wire(data)
    except WireError:
        return None
    try:
        after = ip.IPv4Packet.from_wire(out)
    except WireError as exc:
        return f"patched packet does not decode: {exc}"
    want = dataclasses.replace(packet.header, ttl=packet.header.ttl - 1)
    return None if (after.header, after.payload) == (want, packet.payload) else "wrong patch"


def _forward_copy_check(ctx: tuple[Any, ...], data: bytes, out: Any) -> str | None:
    """The fast path's copy is the router's own: `decrement_ttl_v4` of a packet
    `peek_v4` takes with TTL above 1, and None for every other input."""
    try:
        forwards = ip.peek_v4(data)[3] > 1
    except WireError:
        forwards = False
    if not forwards:
        return None if out is None else "a copy of a packet the router would not forward"
    return None if out == ip.decrement_ttl_v4(data) else "differs from decrement_ttl_v4"


def _peek_v6_check(ctx: tuple[Any, ...], data: bytes, got: Any) -> str | None:
    try:
        packet = ip.IPv6Packet.from_wire(data)
    except WireError:
        return None
    h = packet.header
    want = (int(h.src), int(h.dst), h.next_header, h.hop_limit)
    return None if got == want else f"peek {got}, strict decode {want}"


def _decrement_hop_check(ctx: tuple[Any, ...], data: bytes, out: Any) -> str | None:
    try:
        packet = ip.IPv6Packet.from_wire(data)
    except WireError:
        return None
    try:
        after = ip.IPv6Packet.from_wire(out)
    except WireError as exc:
        return f"patched packet does not decode: {exc}"
    want = dataclasses.replace(
        packet, header=dataclasses.replace(packet.header, hop_limit=packet.header.hop_limit - 1)
    )
    return None if after == want else "wrong patch"


SWAP_LABEL = 1000
PUSH_LABEL = 2000


def _strict_mpls(data: bytes) -> label.MplsInUdp | None:
    try:
        return label.MplsInUdp.from_wire(data)
    except WireError:
        return None


def _label_swap_check(ctx: tuple[Any, ...], data: bytes, out: Any) -> str | None:
    strict = _strict_mpls(data)
    if strict is None:
        return None
    top, below = strict.stack.top, strict.stack.entries[1:]
    if top.ttl <= 1:
        return None if out is None else f"swapped a label whose TTL {top.ttl} ran out"
    if out is None:
        return f"dropped a label with TTL {top.ttl}"
    swapped = label.LabelEntry(SWAP_LABEL, top.tc, top.bottom, top.ttl - 1)
    want = label.MplsInUdp(label.LabelStack((swapped, *below)), strict.inner)
    got = _strict_mpls(out)
    return None if got == want else f"swap gave {out[:8].hex()}, want {want.to_wire()[:8].hex()}"


def _label_pop_check(ctx: tuple[Any, ...], data: bytes, out: Any) -> str | None:
    strict = _strict_mpls(data)
    if strict is None:
        return None
    top, below = strict.stack.top, strict.stack.entries[1:]
    if top.ttl <= 1:
        return None if out is None else f"popped a label whose TTL {top.ttl} ran out"
    if out is None:
        return f"dropped a label with TTL {top.ttl}"
    want = label.LabelStack(below).to_wire() + strict.inner if below else strict.inner
    return None if out == want else "wrong pop"


def _label_push_check(ctx: tuple[Any, ...], data: bytes, out: Any) -> str | None:
    want = label.MplsInUdp(label.LabelStack.of(PUSH_LABEL), data)
    return None if _strict_mpls(out) == want else "pushed payload does not decode to the label"


def _label_peek_check(ctx: tuple[Any, ...], data: bytes, got: Any) -> str | None:
    strict = _strict_mpls(data)
    if strict is None:
        return None
    top = strict.stack.top
    want = (top.label, top.tc, top.bottom, top.ttl)
    return None if got == want else f"peek {got}, strict decode {want}"


def _decapsulate_check(ctx: tuple[Any, ...], data: bytes, value: Any) -> str | None:
    header, stack, inner = value
    tail = label.MplsInUdp(stack, inner).to_wire()
    if not data.endswith(tail):
        return "stack and inner packet are not the end of the packet"
    return None if isinstance(header, ip.IPv4Header | ip.IPv6Header) else "no outer header"


_COUNTER = CounterService()
_COUNTER_KEY = "k"


def _counter_decode(ctx: tuple[Any, ...], data: bytes) -> Any:
    _COUNTER.restore(_COUNTER_KEY, data)
    return _COUNTER


def _counter_check(ctx: tuple[Any, ...], data: bytes, service: Any) -> str | None:
    return _same(service.export(_COUNTER_KEY), data)


_IMPORT_RNG = random.Random(0)
_IMPORT_NOW = 100.0


def _import_decode(ctx: tuple[Any, ...], data: bytes) -> Any:
    return Connection.import_state(data, _IMPORT_NOW, _IMPORT_RNG)


def _import_runs(ctx: tuple[Any, ...], data: bytes, conn: Any) -> str | None:
    """An imported state is a connection that can run: export it again, take an
    in-window segment and a stray one, fire its timers, hand out what to send."""
    conn.export_state()
    (_, local_port), (_, remote_port) = conn.key
    rcv = getattr(conn, "_rcv_nxt", 0) % (1 << 32)  # in window when the peer's ISN is known
    snd = getattr(conn, "_snd_nxt", 0) % (1 << 32)
    flags = transport.TcpFlags.ACK | transport.TcpFlags.PSH
    conn.receive(
        transport.TcpSegment(remote_port, local_port, rcv, snd, flags, 1000, payload=b"xy"),
        _IMPORT_NOW,
    )
    conn.receive(
        transport.TcpSegment(
            remote_port, local_port, 0, 0, transport.TcpFlags.ACK, 100, payload=b"x"
        ),
        _IMPORT_NOW,
    )
    conn.handle_timer(_IMPORT_NOW + 1000.0)
    conn.segments_to_send()
    conn.events()
    return None


def _reader_script(ctx: tuple[Any, ...], data: bytes) -> int:
    """Drive the cursor itself: byte 0 is a script length, the script picks reads
    (the high bits of each script byte are the size), the rest is what is read."""
    n = data[0] if data else 0
    script, payload = data[1 : 1 + n], data[1 + n :]
    r = Reader(payload, "script")
    for b in script:
        op, arg = b & 7, b >> 3
        if op == 0:
            r.u8()
        elif op == 1:
            r.u16()
        elif op == 2:
            r.u32()
        elif op == 3:
            r.u64() if arg & 1 else r.f64()
        elif op == 4:
            r.bytes(arg - 4)  # negative sizes too
        elif op == 5:
            r.uint(arg % 17)
        elif op == 6:
            r = r.sub(arg, "sub")
        else:
            r.rest() if arg & 1 else r.expect_end()
        if r.remaining < 0:
            raise AssertionError("cursor moved past the end of its data")
    return r.offset


def targets() -> list[Target]:
    v4_decode, v4_check = _plain(ip.IPv4Header)
    p4_decode, p4_check = _plain(ip.IPv4Packet)
    hbh_decode, hbh_check = _plain(ip.HopByHop)
    v6_decode, v6_check = _plain(ip.IPv6Header)
    p6_decode, p6_check = _plain(ip.IPv6Packet)
    udph_decode, udph_check = _plain(ip.UDPHeader)
    igmp_decode, igmp_check = _plain(membership.IGMPv3Report)
    query_decode, query_check = _plain(membership_query.IGMPv3Query)
    cd_decode, cd_check = _plain(transport.ChangeDestination)
    ss_decode, ss_check = _plain(session_state.SessionState)
    entry_decode, entry_check = _plain(label.LabelEntry)
    stack_decode, stack_check = _plain(label.LabelStack)
    mpls_decode, mpls_check = _plain(label.MplsInUdp)
    pairs = (V4, V6)
    return [
        Target(
            "ip.IPv4Header.from_wire",
            v4_decode,
            v4_check,
            checksum=IPV4_SUM,
            fields=((0, 1), (2, 2)),
        ),
        Target(
            "ip.IPv4Packet.from_wire",
            p4_decode,
            p4_check,
            checksum=IPV4_SUM,
            fields=((0, 1), (2, 2)),
        ),
        Target("ip.HopByHop.from_wire", hbh_decode, hbh_check, fields=((1, 1), (3, 1))),
        Target("ip.IPv6Header.from_wire", v6_decode, v6_check, fields=((4, 2),)),
        Target("ip.IPv6Packet.from_wire", p6_decode, p6_check, fields=((4, 2), (6, 1), (41, 1))),
        Target("ip.UDPHeader.from_wire", udph_decode, udph_check, fields=((4, 2),)),
        Target(
            "ip.UDPDatagram.from_wire",
            lambda ctx, data: ip.UDPDatagram.from_wire(data, ctx[0], ctx[1]),
            _udp_check,
            contexts=pairs,
            checksum=UDP_SUM,
            fields=((4, 2),),
        ),
        Target(
            "ip.peek_v4",
            lambda ctx, data: ip.peek_v4(data),
            _peek_v4_check,
            "fast_path",
            checksum=IPV4_SUM,
            fields=((0, 1), (2, 2)),
        ),
        Target(
            "ip.decrement_ttl_v4",
            lambda ctx, data: ip.decrement_ttl_v4(data),
            _decrement_ttl_check,
            "fast_path",
            checksum=IPV4_SUM,
            fields=((0, 1), (8, 1)),
        ),
        Target(
            "ip.forward_copy_v4",
            lambda ctx, data: ip.forward_copy_v4(data),
            _forward_copy_check,
            "fast_path",
            checksum=IPV4_SUM,
            fields=((0, 1), (8, 1)),
        ),
        Target(
            "ip.peek_v6",
            lambda ctx, data: ip.peek_v6(data),
            _peek_v6_check,
            "fast_path",
            fields=((4, 2),),
        ),
        Target(
            "ip.decrement_hop_limit_v6",
            lambda ctx, data: ip.decrement_hop_limit_v6(data),
            _decrement_hop_check,
            "fast_path",
            fields=((4, 2), (7, 1)),
        ),
        Target(
            "membership.IGMPv3Report.from_wire",
            igmp_decode,
            igmp_check,
            checksum=IGMP_SUM,
            fields=((4, 2), (6, 2), (9, 1), (10, 2)),
        ),
        Target(
            "membership_query.IGMPv3Query.from_wire",
            query_decode,
            query_check,
            checksum=IGMP_SUM,
            fields=((1, 1), (8, 1), (10, 2)),
        ),
        Target(
            "membership.MLDv2Report.from_wire",
            lambda ctx, data: membership.MLDv2Report.from_wire(data, ctx[0], ctx[1]),
            lambda ctx, data, v: _same(v.to_wire(ctx[0], ctx[1]), data),
            contexts=MLD_HOSTS,
            checksum=MLD_SUM,
            fields=((4, 2), (6, 2), (9, 1), (10, 2)),
        ),
        Target(
            "membership_query.MLDv2Query.from_wire",
            lambda ctx, data: membership_query.MLDv2Query.from_wire(data, ctx[0], ctx[1]),
            lambda ctx, data, v: _same(v.to_wire(ctx[0], ctx[1]), data),
            contexts=MLD_QUERIERS,
            checksum=MLD_SUM,
            fields=((1, 1), (4, 2), (24, 1), (26, 2)),
        ),
        Target(
            "control.decode",
            lambda ctx, data: control.decode(data),
            lambda ctx, data, v: _same(control.encode(v), data),
            fields=((4, 1),),
        ),
        Target(
            "control.decode_op",
            lambda ctx, data: control.decode_op(data),
            lambda ctx, data, v: _same(control.encode_op(v), data),
            fields=((1, 1), (9, 2)),
        ),
        Target(
            "transport.decode_options",
            lambda ctx, data: transport.decode_options(data),
            lambda ctx, data, v: _same(transport.encode_options(v), data),
            fields=((1, 1),),
        ),
        Target(
            "transport.TcpSegment.from_wire",
            lambda ctx, data: transport.TcpSegment.from_wire(data, ctx[0], ctx[1]),
            lambda ctx, data, v: _same(v.to_wire(ctx[0], ctx[1]), data),
            contexts=pairs,
            checksum=TCP_SUM,
            fields=((12, 1), (21, 1)),
        ),
        Target(
            "transport.ChangeDestination.from_wire",
            cd_decode,
            cd_check,
            fields=((25, 1), (30, 2), (42, 2)),
        ),
        Target("label.LabelEntry.from_wire", entry_decode, entry_check, fields=((2, 1), (3, 1))),
        Target(
            "label.LabelStack.from_wire",
            stack_decode,
            stack_check,
            fields=((2, 1), (6, 1), (10, 1)),
        ),
        Target(
            "label.MplsInUdp.from_wire", mpls_decode, mpls_check, fields=((2, 1), (4, 1), (6, 1))
        ),
        Target(
            "label.split",
            lambda ctx, data: label.split(data),
            lambda ctx, data, v: _same(v[0].to_wire() + v[1], data),
            fields=((2, 1), (6, 1), (10, 1)),
        ),
        Target(
            "label.decapsulate",
            lambda ctx, data: label.decapsulate(data),
            _decapsulate_check,
            checksum=IPV4_SUM,
            fields=((0, 1), (2, 2), (22, 2), (24, 2), (30, 1)),
        ),
        Target(
            "label.peek_top",
            lambda ctx, data: label.peek_top(data),
            _label_peek_check,
            "fast_path",
            fields=((2, 1), (3, 1)),
        ),
        Target(
            "label.swap_top",
            lambda ctx, data: label.swap_top(data, SWAP_LABEL),
            _label_swap_check,
            "fast_path",
            fields=((2, 1), (3, 1), (4, 1)),
        ),
        Target(
            "label.pop",
            lambda ctx, data: label.pop(data),
            _label_pop_check,
            "fast_path",
            fields=((2, 1), (3, 1), (6, 1)),
        ),
        Target(
            "label.push",
            lambda ctx, data: label.push(data, PUSH_LABEL),
            _label_push_check,
            "fast_path",
            fields=((0, 1), (2, 2)),
        ),
        Target("cursor.Reader", _reader_script, fields=((0, 1),)),
        Target(
            "session_state.SessionState.from_wire",
            ss_decode,
            ss_check,
            fields=((4, 1), (5, 1), (6, 1)),
        ),
        Target(
            "tcp.Connection.import_state",
            _import_decode,
            _import_runs,
            "import_then_run",
            fields=((4, 1), (5, 1), (6, 1)),
        ),
        Target(
            "counter.CounterService.restore",
            _counter_decode,
            _counter_check,
            fields=((0, 1), (9, 4)),
        ),
    ]


ASSEMBLE = "control.assemble"


# --- seeds -------------------------------------------------------------------------------


Seed = tuple[int, bytes]  # (context index, valid encoding)


def _draw(strategy: Any, n: int, run_seed: int) -> list[Any]:
    """`n` examples of a Hypothesis strategy, reproducibly for one run seed."""
    out: list[Any] = []

    @hypothesis_seed(run_seed)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Any) -> None:
        out.append(value)

    collect()
    return out


def _strategies() -> dict[str, Any]:
    sys.path.insert(0, str(TESTS))
    wc = importlib.import_module("test_wire_control")
    wi = importlib.import_module("test_wire_ip")
    wm = importlib.import_module("test_wire_membership")
    wt = importlib.import_module("test_wire_transport")
    ws = importlib.import_module("test_wire_session_state")
    wl = importlib.import_module("test_wire_label")
    wv = importlib.import_module("test_wire_control_vip")
    # The control tests build no BALANCE_LOADS operation; it is drawn here.
    balance = st.builds(
        control.BalanceLoadsOp,
        st.floats(min_value=1.0, allow_nan=False, allow_infinity=False),
        st.dictionaries(wc.ids, wc.loads, max_size=8).map(lambda d: tuple(sorted(d.items()))),
    )
    ops = st.one_of(wc.ops, balance)
    return {
        "messages": st.one_of(
            wc.messages,
            wv.messages,
            st.builds(control.Command, wc.ids, wc.u32, wc.u64, balance),
        ),
        "ops": ops,
        "v4_packets": wi.v4_packets(),
        "v6_packets": wi.v6_packets(),
        "hop_by_hops": wi.hop_by_hops(),
        "udp": st.tuples(wi.udp_datagrams, st.integers(0, 1), st.booleans()),
        "udp_headers": st.builds(ip.UDPHeader, wi.u16, wi.u16, wi.u16, wi.u16),
        "igmp": wm.igmp_reports(),
        "mld": st.tuples(wm.mld_reports(), st.integers(0, len(MLD_HOSTS) - 1)),
        "segments": st.tuples(wt.segments, st.integers(0, 1)),
        "options": wt.option_lists,
        "change_destinations": wt.change_destinations,
        "session_states": ws.session_states(),
        "label_stacks": wl.stacks(),
        "mpls_payloads": wl.mpls_payloads(),
        "mpls_packets": wl.encapsulated(),
        "inner_packets": wl.inner_packets(),
    }


def _queries(rng: random.Random, n: int) -> list[bytes]:
    """General, group- and source-specific IGMPv3 queries with random codes."""
    out = []
    for i in range(n):
        group = IPv4Address(0) if i % 3 == 0 else IPv4Address(0xE8000000 | rng.getrandbits(24))
        sources = (
            ()
            if i % 3 != 2
            else tuple(IPv4Address(rng.getrandbits(32)) for _ in range(rng.randrange(1, 6)))
        )
        query = membership_query.IGMPv3Query(
            group,
            sources,
            rng.randrange(256),
            rng.random() < 0.5,
            rng.randrange(8),
            rng.randrange(256),
        )
        out.append(query.to_wire())
    return out


def _mld_queries(rng: random.Random, n: int) -> list[Seed]:
    """General (to all nodes), address- and source-specific MLDv2 queries, random codes."""
    out: list[Seed] = []
    for i in range(n):
        ctx = 0 if i % 3 == 0 else 1
        group = membership_query.ANY_ADDRESS if ctx == 0 else MLD_QUERIERS[1][1]
        sources = (
            ()
            if i % 3 != 2
            else tuple(IPv6Address(rng.getrandbits(128)) for _ in range(rng.randrange(1, 4)))
        )
        query = membership_query.MLDv2Query(
            group,
            sources,
            rng.choice((rng.randrange(0x8000), rng.randrange(0x8000, 0x10000))),
            rng.random() < 0.5,
            rng.randrange(8),
            rng.randrange(256),
        )
        out.append((ctx, query.to_wire(*MLD_QUERIERS[ctx])))
    out.append((0, KERNEL_MLD_QUERY_PACKET[48:]))
    return out


def _signed_reports(rng: random.Random, n: int) -> list[membership.IGMPv3Report]:
    """Reports as servers and clients send them: masks and a real Ed25519 signature."""
    key = auth.generate()
    group = IPv4Address("232.1.2.3")
    out = []
    for i in range(n):
        width = rng.choice((1, 2, 3))
        masks = tuple(
            membership.MaskPair(v, (1 << width) - 1) for v in range(rng.randrange(1, 1 << width))
        )
        records = [
            membership.GroupRecord(membership.RecordType.MODE_IS_EXCLUDE, IPv4Address("232.0.0.9")),
            membership.GroupRecord(
                membership.RecordType(rng.randrange(1, 7)), group, include_masks=masks
            ),
        ][rng.randrange(2) :]
        signed = membership.SignedJoin(
            1_700_000_000_000 + i, IPv4Address(rng.getrandbits(32)), rng.randbytes(8)
        )
        out.append(auth.sign_join(membership.IGMPv3Report(tuple(records), signed), key))
    return out


def _session_states(rng: random.Random, want: int) -> list[bytes]:
    """Exported states of real connections: two endpoints over a lossy, reordering
    in-memory link, sending, closing and exporting at random moments."""
    out: dict[bytes, None] = {}
    tiebreak = itertools.count()
    can_send = (State.SYN_SENT, State.SYN_RCVD, State.ESTABLISHED, State.CLOSE_WAIT)
    while len(out) < want:
        config = SessionConfig(
            mss=rng.choice((40, 100, 536)), rto_initial=0.2, rto_min=0.05, time_wait=0.3
        )
        v6 = rng.random() < 0.3
        client_ip, server_ip = V6 if v6 else V4
        client = Demultiplexer(random.Random(rng.random()), config)
        server = Demultiplexer(random.Random(rng.random()), config)
        moved = (V6[0] if v6 else V4[0], 8080) if rng.random() < 0.5 else None
        server.listen(80, destination=moved)
        client.connect((client_ip, rng.randrange(1024, 65536)), (server_ip, 80), 0.0)
        loss, now = rng.choice((0.0, 0.1, 0.3)), 0.0
        wire: list[tuple[float, int, Demultiplexer, Any, Any, Any]] = []
        for _ in range(rng.randrange(3, 120)):
            for ep, peer in ((client, server), (server, client)):
                for src, dst, segment in ep.segments_to_send():
                    if rng.random() >= loss:
                        at = now + 0.01 + rng.random() * 0.03
                        heapq.heappush(wire, (at, next(tiebreak), peer, src, dst, segment))
            now += 0.01
            while wire and wire[0][0] <= now:
                _, _, peer, src, dst, segment = heapq.heappop(wire)
                peer.receive(src, dst, segment, now)
            for ep in (client, server):
                ep.handle_timer(now)
                ep.events()
                for key in ep.keys():
                    conn = ep.connection(key)
                    if conn is None or conn.state is State.CLOSED:
                        continue
                    roll = rng.random()
                    try:
                        if roll < 0.25 and conn.state in can_send:
                            conn.send(rng.randbytes(rng.randrange(1, 300)), now)
                        elif roll < 0.3 and conn.state in can_send:
                            conn.close(now)
                        if rng.random() < 0.08:
                            exported = conn.export_state()
                            if len(exported) <= 1500:
                                out[exported] = None
                    except SessionError:
                        pass
    return list(out)[:want]


def _counter_states(rng: random.Random, n: int) -> list[bytes]:
    service, out = CounterService(), []
    for i in range(n):
        service.open(i)
        requests = b"".join(
            struct.pack("!II", j, rng.getrandbits(rng.choice((1, 8, 32))))
            for j in range(rng.randrange(0, 6))
        )
        service.on_data(i, requests + rng.randbytes(rng.randrange(0, 8)))
        out.append(service.export(i))
    return out


def _reader_scripts(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        script = rng.randbytes(rng.randrange(0, 12))
        out.append(bytes([len(script)]) + script + rng.randbytes(rng.randrange(0, 64)))
    return out


def _allocation_parts(rng: random.Random, n: int) -> list[tuple[bytes, ...]]:
    """Complete sets of Snapshot parts of real allocations, split small so that
    most sets have several parts."""
    out = []
    for i in range(n):
        family = rng.choice((4, 6))
        bits = rng.randrange(1, 9)
        prefix = "198.51.100.0/24" if family == 4 else "2001:db8::/64"
        space = AddressSpace.create(prefix, bits, rng.choice(("low", "high")))
        count = rng.randrange(1, min(8, space.buckets) + 1)
        names = sorted({f"s{rng.randrange(100)}" for _ in range(count)})
        shape = rng.randrange(3)
        if shape == 0:
            alloc = policy.equal_split(space, names)
        elif shape == 1:
            alloc = policy.weighted_split(space, {s: rng.randrange(0, 4) or 1 for s in names})
        else:
            alloc = policy.striped(space, names, rng.randrange(len(names), space.buckets + 1))
        if rng.random() < 0.3 and len(names) > 1:
            alloc = policy.set_share(alloc, names[0], Fraction(rng.randrange(0, 3), 4))
        parts = control.snapshot_parts(i, alloc, rng.choice((90, 120, 200, 1400)), sender="s0")
        out.append(tuple(part.to_wire() for part in parts))
    return out


def build_seeds(run_seed: int) -> tuple[dict[str, list[Seed]], list[tuple[bytes, ...]]]:
    rng = random.Random(run_seed)
    s = _strategies()
    n = SEEDS_PER_STRATEGY
    v4 = [p.to_wire() for p in _draw(s["v4_packets"], n, run_seed)]
    signed = _signed_reports(rng, 40)
    v4 += [KERNEL_IGMP_PACKET]
    v4 += [
        membership.igmp_packet(r, IPv4Address(rng.getrandbits(32))).to_wire() for r in signed[:20]
    ]
    v6_packets = _draw(s["v6_packets"], n, run_seed)
    v6 = [p.to_wire() for p in v6_packets] + [KERNEL_MLD_PACKET, KERNEL_MLD_QUERY_PACKET]
    igmp = [r.to_wire() for r in _draw(s["igmp"], n, run_seed) + signed]
    igmp.append(KERNEL_IGMP_PACKET[24:])
    mld = [(c, r.to_wire(*MLD_HOSTS[c])) for r, c in _draw(s["mld"], n, run_seed)]
    mld.append((1, KERNEL_MLD_PACKET[48:]))
    udp = [
        (c, d.to_wire(*(V4, V6)[c], checksum=bool(c) or summed))
        for d, c, summed in _draw(s["udp"], n, run_seed)
    ]
    segments = [(c, seg.to_wire(*(V4, V6)[c])) for seg, c in _draw(s["segments"], n, run_seed)]
    change = [m.to_wire() for m in _draw(s["change_destinations"], n, run_seed)]
    key = auth.generate()
    for m in _draw(s["change_destinations"], 20, run_seed + 1):
        change.append(dataclasses.replace(m, signature=key.sign(m.signed_bytes())).to_wire())
    messages = [control.encode(m) for m in _draw(s["messages"], 2 * n, run_seed)]
    parts = _allocation_parts(rng, 60)
    sessions = _session_states(rng, 120)
    drawn_sessions = [x.to_wire() for x in _draw(s["session_states"], n, run_seed)]
    messages += [p for group in parts[:20] for p in group]
    stacks = [x.to_wire() for x in _draw(s["label_stacks"], n, run_seed)]
    mpls_payloads = _draw(s["mpls_payloads"], n, run_seed)
    mpls = [x.to_wire() for x in mpls_payloads]
    # Most outer IPv4 packets without a UDP checksum (RFC 7510 allows it), so that a
    # mutated payload reaches the label decoder; IPV4_SUM repairs the IP header.
    mpls_packets = [p for p, _, _ in _draw(s["mpls_packets"], n, run_seed)]
    mpls_packets += [
        label.encapsulate(*V4, x.stack, x.inner, rng.randrange(256), checksum=False)
        for x in mpls_payloads
    ]
    inner = _draw(s["inner_packets"], n, run_seed)
    plain = lambda xs: [(0, x) for x in xs]  # noqa: E731
    seeds: dict[str, list[Seed]] = {
        "ip.IPv4Header.from_wire": plain([w[: _v4_header_end(w)] for w in v4]),
        "ip.IPv4Packet.from_wire": plain(v4),
        "ip.HopByHop.from_wire": plain([h.to_wire() for h in _draw(s["hop_by_hops"], n, run_seed)]),
        "ip.IPv6Header.from_wire": plain([w[:40] for w in v6]),
        "ip.IPv6Packet.from_wire": plain(v6),
        "ip.UDPHeader.from_wire": plain(
            [h.to_wire() for h in _draw(s["udp_headers"], n, run_seed)]
        ),
        "ip.UDPDatagram.from_wire": udp,
        "ip.peek_v4": plain(v4),
        "ip.decrement_ttl_v4": plain(v4),
        "ip.forward_copy_v4": plain(v4),
        "ip.peek_v6": plain(v6),
        "ip.decrement_hop_limit_v6": plain(v6),
        "membership.IGMPv3Report.from_wire": plain(igmp),
        "membership.MLDv2Report.from_wire": mld,
        "membership_query.IGMPv3Query.from_wire": plain(_queries(rng, n)),
        # Its own generator, so the seeds drawn after it stay those of earlier runs.
        "membership_query.MLDv2Query.from_wire": _mld_queries(random.Random(run_seed + 130), n),
        "control.decode": plain(messages),
        "control.decode_op": plain([control.encode_op(o) for o in _draw(s["ops"], n, run_seed)]),
        "transport.decode_options": plain(
            [transport.encode_options(o) for o in _draw(s["options"], n, run_seed)]
        ),
        "transport.TcpSegment.from_wire": segments,
        "transport.ChangeDestination.from_wire": plain(change),
        "label.LabelEntry.from_wire": plain([x[:4] for x in stacks]),
        "label.LabelStack.from_wire": plain(stacks),
        "label.MplsInUdp.from_wire": plain(mpls),
        "label.split": plain(mpls + stacks),
        "label.decapsulate": plain(mpls_packets),
        "label.peek_top": plain(mpls),
        "label.swap_top": plain(mpls),
        "label.pop": plain(mpls),
        "label.push": plain(inner + v4[:20] + v6[:20]),
        "cursor.Reader": plain(_reader_scripts(rng, n)),
        "session_state.SessionState.from_wire": plain(sessions + drawn_sessions),
        "tcp.Connection.import_state": plain(sessions),
        "counter.CounterService.restore": plain(_counter_states(rng, n)),
    }
    return seeds, parts


# --- results ---------------------------------------------------------------------------------


@dataclass
class Stats:
    """Counts for one decoder, with the shortest reproducer of each kind of failure."""

    inputs: int = 0
    accepted: int = 0
    unexpected: int = 0
    violations: dict[str, int] = field(default_factory=dict)
    examples: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)

    def _keep(self, signature: tuple[str, ...], example: dict[str, Any]) -> None:
        old = self.examples.get(signature)
        if old is None:
            if sum(k[0] == signature[0] for k in self.examples) < 2 * SHOW:
                self.examples[signature] = {**example, "count": 1}
        else:
            old["count"] += 1
            if example["length"] < old["length"]:
                self.examples[signature] = {**example, "count": old["count"]}

    def unexpected_exception(self, target: str, case: Any, ctx: Any, exc: BaseException) -> None:
        self.unexpected += 1
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        self._keep(
            ("unexpected", type(exc).__name__, where),
            {
                "decoder": target,
                "exception": f"{type(exc).__name__}: {exc}"[:300],
                "at": where,
                **_describe(case, ctx),
            },
        )

    def violation(self, kind: str, target: str, case: Any, ctx: Any, problem: str) -> None:
        self.violations[kind] = self.violations.get(kind, 0) + 1
        sort = problem.split(":")[0] if problem.startswith("re-encoded") else problem[:80]
        self._keep(
            (kind, sort),
            {"decoder": target, "kind": kind, "problem": problem[:300], **_describe(case, ctx)},
        )

    def merge(self, other: dict[str, Any]) -> None:
        self.inputs += other["inputs"]
        self.accepted += other["accepted"]
        self.unexpected += other["unexpected"]
        for kind, n in other["violations"].items():
            self.violations[kind] = self.violations.get(kind, 0) + n
        for signature, example in other["examples"]:
            key = tuple(signature)
            if key in self.examples:
                self.examples[key]["count"] += example["count"]
            else:
                self.examples[key] = example

    def as_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "accepted": self.accepted,
            "unexpected": self.unexpected,
            "violations": self.violations,
            "examples": [[list(k), v] for k, v in self.examples.items()],
        }


def _describe(case: Any, ctx: Any) -> dict[str, Any]:
    if isinstance(case, tuple):  # a set of snapshot parts
        hexes = [p.hex() for p in case]
        return {"parts_hex": [h[:HEX_LIMIT] for h in hexes], "length": sum(map(len, case))}
    described: dict[str, Any] = {"hex": case.hex()[:HEX_LIMIT], "length": len(case)}
    if ctx:
        described["context"] = [str(a) for a in ctx]
    return described


def run_case(target: Target, ctx_index: int, data: bytes, stats: Stats) -> None:
    ctx = target.contexts[ctx_index % len(target.contexts)]
    stats.inputs += 1
    try:
        value = target.decode(ctx, data)
    except WireError:
        return
    except Exception as exc:
        stats.unexpected_exception(target.name, data, ctx, exc)
        return
    stats.accepted += 1
    if target.check is None:
        return
    try:
        problem = target.check(ctx, data, value)
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        stats.violation(target.check_kind, target.name, data, ctx, problem)


# --- mutation engine -----------------------------------------------------------------------


def _corrupt_field(rng: random.Random, buf: bytearray, fields: Sequence[tuple[int, int]]) -> None:
    """Set a length/count field (a known one, or any aligned-or-not run of 1-8 bytes)
    to a boundary value or one derived from the data's real size."""
    n = len(buf)
    usable = [(o, w) for o, w in fields if o + w <= n]
    if usable and rng.random() < 0.5:
        offset, width = rng.choice(usable)
    else:
        width = rng.choice((1, 2, 2, 4, 4, 8))
        if n < width:
            return
        offset = rng.randrange(n - width + 1)
    current = int.from_bytes(buf[offset : offset + width], "big")
    rest = n - offset - width
    value = rng.choice(
        (
            *INTERESTING,
            n,
            n + 1,
            n - 1,
            rest,
            rest + 1,
            rest - 1,
            rest // 4,
            rest // 8,
            current + 1,
            current - 1,
            current * 2,
            current // 2,
            current + rng.randrange(2, 64),
        )
    )
    buf[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "big")


def _chunk(rng: random.Random) -> int:
    return rng.choice((1, 1, 1, 2, 3, 4, 8, rng.randrange(1, 65)))


def _mutate_once(
    rng: random.Random, buf: bytearray, other: bytes, fields: Sequence[tuple[int, int]]
) -> bytearray:
    n = len(buf)
    op = rng.randrange(10)
    if op == 0 and n:  # bit flips
        for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
    elif op == 1 and n:  # one byte set to a boundary or random value
        buf[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    elif op == 2:  # insertion
        i = rng.randrange(n + 1)
        buf[i:i] = rng.randbytes(_chunk(rng)) if rng.random() < 0.7 else bytes(_chunk(rng))
    elif op == 3 and n:  # deletion
        i = rng.randrange(n)
        del buf[i : i + _chunk(rng)]
    elif op in (4, 5):  # length and count fields
        _corrupt_field(rng, buf, fields)
    elif op == 6 and n:  # arithmetic on a field of 1, 2 or 4 bytes
        width = rng.choice((1, 2, 4))
        if n >= width:
            i = rng.randrange(n - width + 1)
            value = int.from_bytes(buf[i : i + width], "big") + rng.choice((-1, 1)) * _chunk(rng)
            buf[i : i + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
    elif op == 7:  # splice with another seed
        buf = buf[: rng.randrange(n + 1)] + other[rng.randrange(len(other) + 1) :]
    elif op == 8 and n:  # a chunk duplicated elsewhere
        i = rng.randrange(n)
        piece = buf[i : i + _chunk(rng)]
        j = rng.randrange(n + 1)
        buf[j:j] = piece
    else:  # random tail after a valid prefix
        del buf[rng.randrange(n + 1) :]
        buf += rng.randbytes(rng.randrange(0, 2 * n + 9))
    return buf


def mutate(
    rng: random.Random, target: Target, start: Seed, pool: Sequence[Seed], longest: int
) -> Seed:
    """`start` mutated 1-6 times (splices take from `pool`), or plain random bytes."""
    ctx, data = start
    if rng.random() < 0.03:  # plain random bytes, any context
        return rng.randrange(len(target.contexts)), rng.randbytes(rng.randrange(longest + 16))
    buf = bytearray(data)
    stack = 1 if rng.random() < 0.6 else rng.choice((2, 2, 3, 4, 6))
    for _ in range(stack):
        buf = _mutate_once(rng, buf, rng.choice(pool)[1], target.fields)
    out = bytes(buf)
    if target.checksum is not None and rng.random() < 0.5:
        out = target.checksum.fix(target.contexts[ctx], out)
    return ctx, out


def schedule(
    target: Target, seeds: Sequence[Seed], budget: int, rng: random.Random
) -> Iterator[Seed]:
    """The seeds, every truncation of them (as many seeds as a fifth of the budget
    covers; checksummed formats also with the checksum repaired), checksum twins,
    then mutations up to the budget."""
    yield from seeds
    used, truncations = len(seeds), int(budget * TRUNCATION_SHARE)
    for ctx, data in seeds:
        if used >= truncations:
            break
        for n in range(len(data)):
            yield ctx, data[:n]
            used += 1
            if target.checksum is not None:
                yield ctx, target.checksum.fix(target.contexts[ctx], data[:n])
                used += 1
    if target.checksum is not None:
        for ctx, data in seeds:
            twin = target.checksum.twin(target.contexts[ctx], data, rng)
            if twin is not None:
                yield ctx, twin
                used += 1
    longest = max(len(d) for _, d in seeds)
    while used < budget:
        yield mutate(rng, target, rng.choice(seeds), seeds, longest)
        used += 1


def fuzz_target(target: Target, seeds: Sequence[Seed], budget: int, rng: random.Random) -> Stats:
    stats = Stats()
    for ctx, data in schedule(target, seeds, budget, rng):
        run_case(target, ctx, data, stats)
    return stats


# --- snapshot parts: control.assemble --------------------------------------------------------


def _assemble_case(parts: Sequence[bytes], stats: Stats) -> None:
    """Decode each part as a receiver would (dropping what does not decode), then
    assemble what is left."""
    stats.inputs += 1
    decoded = []
    for raw in parts:
        try:
            message = control.decode(raw)
        except WireError:
            continue
        except Exception as exc:
            stats.unexpected_exception(ASSEMBLE + " (part decode)", tuple(parts), None, exc)
            return
        if isinstance(message, control.Snapshot):
            decoded.append(message)
    try:
        control.assemble(decoded)
    except WireError:
        return
    except Exception as exc:
        stats.unexpected_exception(ASSEMBLE, tuple(parts), None, exc)
        return
    stats.accepted += 1


def fuzz_assemble(sets: Sequence[tuple[bytes, ...]], budget: int, rng: random.Random) -> Stats:
    """Sets of parts: whole, with one part truncated at every length, or mutated at
    the byte level (one part) or the set level (parts dropped, repeated, reordered,
    or taken from another allocation)."""
    stats = Stats()
    flat = [(0, p) for group in sets for p in group]
    # Sender length, part, count and server count (IPv4 or IPv6 space), sender "s0".
    fields = ((4, 1), (27, 2), (29, 2), (40, 2), (52, 2))
    mutator = Target(ASSEMBLE, lambda ctx, d: None, fields=fields)
    longest = max(len(p) for _, p in flat)
    for group in sets:
        _assemble_case(group, stats)
    for group in sets:
        if stats.inputs >= budget * TRUNCATION_SHARE:
            break
        i = rng.randrange(len(group))
        for n in range(len(group[i])):
            _assemble_case((*group[:i], group[i][:n], *group[i + 1 :]), stats)
    while stats.inputs < budget:
        parts = list(rng.choice(sets))
        for _ in range(1 if rng.random() < 0.7 else rng.randrange(2, 4)):
            op = rng.randrange(6)
            if op <= 2 and parts:
                i = rng.randrange(len(parts))
                parts[i] = mutate(rng, mutator, (0, parts[i]), flat, longest)[1]
            elif op == 3 and parts:
                del parts[rng.randrange(len(parts))]
            elif op == 4 and parts:
                parts.insert(rng.randrange(len(parts) + 1), rng.choice(parts))
            else:
                other = rng.choice(sets)
                parts.insert(rng.randrange(len(parts) + 1), rng.choice(other))
        if rng.random() < 0.2:
            rng.shuffle(parts)
        _assemble_case(parts, stats)
    return stats


# --- atheris ------------------------------------------------------------------------------------


_WORKER = """
import sys
import atheris
sys.path.insert(0, {bench!r})
with atheris.instrument_imports(include=["manycast"]):
    import fuzz
fuzz.atheris_worker(sys.argv[1:])
"""


def atheris_available() -> str | None:
    """The installed atheris version, or None."""
    try:
        from importlib.metadata import version

        importlib.import_module("atheris")
        return version("atheris")
    except Exception:
        return None


def atheris_worker(argv: list[str]) -> None:
    """Child process: a coverage-guided run of one decoder, seeded with its corpus,
    until `seconds` pass; results go to `out` as JSON."""
    import atheris

    name, seconds, corpus, out, run_seed = argv[0], float(argv[1]), argv[2], argv[3], int(argv[4])
    artifacts = argv[5] if len(argv) > 5 else str(Path(out).parent)
    target = {t.name: t for t in targets()}[name]
    stats = Stats()
    deadline = time.monotonic() + seconds
    multi = len(target.contexts) > 1

    def finish() -> None:
        Path(out).write_text(json.dumps(stats.as_json()))
        os._exit(0)  # libFuzzer would otherwise run on; nothing else needs cleaning up

    def one_input(data: bytes) -> None:
        # With several contexts the first byte picks one, so every input is plain bytes.
        ctx, body = (data[0], data[1:]) if multi and data else (0, data)
        run_case(target, ctx, body, stats)
        if stats.inputs % 128 == 0 and time.monotonic() > deadline:
            finish()

    def mutator(data: bytes, max_size: int, mutation_seed: int) -> bytes:
        data = atheris.Mutate(data, max_size)
        if target.checksum is not None and mutation_seed & 1:
            if multi and data:
                fixed = target.checksum.fix(
                    target.contexts[data[0] % len(target.contexts)], data[1:]
                )
                data = data[:1] + fixed
            else:
                data = target.checksum.fix(target.contexts[0], data)
        return data

    atheris.Setup(
        [
            "fuzz",
            f"-seed={run_seed}",
            "-max_len=4096",
            "-timeout=30",
            "-rss_limit_mb=2048",
            "-print_final_stats=0",
            f"-artifact_prefix={artifacts}/",
            corpus,
        ],
        one_input,
        custom_mutator=mutator,
    )
    atheris.Fuzz()
    finish()


# libFuzzer names the input that ended a run by what happened (crash-, timeout-, oom-...).
ARTIFACT_KINDS = (
    ("crash-", "crash"),
    ("timeout-", "timeout"),
    ("oom-", "out_of_memory"),
    ("leak-", "leak"),
    ("slow-unit-", "timeout"),
)


def atheris_error_kind(returncode: int | None, stderr: str, artifacts: Sequence[str]) -> str:
    """What ended an atheris child without a result, from libFuzzer's artifact names
    and report (None as the return code: it ran past the parent's limit)."""
    for prefix, kind in ARTIFACT_KINDS:
        if any(Path(a).name.startswith(prefix) for a in artifacts):
            return kind
    if returncode is None or "libFuzzer: timeout" in stderr:
        return "timeout"
    if "out-of-memory" in stderr or "rss limit" in stderr.lower():
        return "out_of_memory"
    if "Uncaught Python exception" in stderr:
        return "uncaught_exception"
    if "deadly signal" in stderr or returncode < 0:
        return "crash"
    return "no_result"


def run_atheris(
    target: Target, seeds: Sequence[Seed], seconds: float, run_seed: int
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The child's counts, or None and what ended it (kind, report tail, and the
    input libFuzzer saved, if any)."""
    multi = len(target.contexts) > 1
    with tempfile.TemporaryDirectory(prefix="manycast-fuzz-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        artifacts = Path(tmp) / "artifacts"
        artifacts.mkdir()
        for i, (ctx, data) in enumerate(seeds):
            (corpus / f"seed{i:05d}").write_bytes(bytes([ctx]) + data if multi else data)
        out = Path(tmp) / "result.json"
        command = [
            sys.executable,
            "-c",
            _WORKER.format(bench=str(BENCH)),
            target.name,
            str(seconds),
            str(corpus),
            str(out),
            str(run_seed),
            str(artifacts),
        ]
        returncode: int | None
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=seconds + 120, cwd=tmp
            )
            returncode, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired as exc:
            returncode = None
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            stderr += f"\nno result after {seconds + 120:.0f} s"
        if out.exists() and returncode == 0:
            return json.loads(out.read_text()), None
        saved = sorted(str(a) for a in artifacts.iterdir())
        error: dict[str, Any] = {
            "kind": atheris_error_kind(returncode, stderr, saved),
            "exit": returncode,
            "report": stderr[-2000:],
        }
        if saved:
            data = Path(saved[0]).read_bytes()
            error.update(artifact=Path(saved[0]).name, hex=data.hex()[:HEX_LIMIT], length=len(data))
        return None, error


def unexpected_by_kind(
    results: Mapping[str, Stats], atheris_errors: Mapping[str, Any]
) -> dict[str, int]:
    """Every contract breach, by kind: the parts of `unexpected_exceptions`."""
    out = {
        "exception": sum(s.unexpected for s in results.values()),
        **{
            kind: sum(s.violations.get(kind, 0) for s in results.values())
            for kind in ("roundtrip", "fast_path", "import_then_run")
        },
        "atheris_child": len(atheris_errors),
    }
    return out


def unexpected_per_decoder(
    results: Mapping[str, Stats], atheris_errors: Mapping[str, Any]
) -> dict[str, int]:
    """Contract breaches of every kind, per decoder (those with any)."""
    counts = {
        name: s.unexpected + sum(s.violations.values()) + (name in atheris_errors)
        for name, s in results.items()
    }
    return {name: n for name, n in counts.items() if n}


# --- admission ----------------------------------------------------------------------------


def admission_rates(joins: int, repeats: int, rng: random.Random) -> dict[str, Any]:
    """`Admission.check` of signed joins against raw `Ed25519PublicKey.verify` of the
    same signed bytes. Every join has its own timestamp and random key, and every
    timed pass gets a fresh Admission (with the key already provided), so the
    replay cache admits them all and the signature is checked every time."""
    key = auth.generate()
    raw = auth.public_bytes(key)
    public = auth.public_key(raw)
    group = IPv4Address("232.10.20.30")
    now = 1_700_000_000.0
    reports = []
    for i in range(joins):
        portion = membership.MaskPair(i % 4, 3)  # one server's quarter of the clients
        record = membership.GroupRecord(
            membership.RecordType.MODE_IS_INCLUDE, group, include_masks=(portion,)
        )
        signed = membership.SignedJoin(
            int(now * 1000) - i, IPv4Address(0xC6336400 + i % 250), rng.randbytes(8)
        )
        reports.append(auth.sign_join(membership.IGMPv3Report((record,), signed), key))
    messages = [(r.signed.signature, r.signed_bytes()) for r in reports if r.signed]

    def fresh() -> Admission:
        admission = Admission()
        admission.provide_key(int(group), raw, ttl=1e9, now=now)
        return admission

    # Correctness before speed: all admitted, a replay and a forgery refused.
    first = fresh()
    admitted = sum(first.check(r, True, now).admitted for r in reports)
    replay = first.check(reports[0], True, now).reason
    original = reports[1].signed
    assert original is not None
    forged_join = dataclasses.replace(original, random_key=b"\0" * 8)
    forged = fresh().check(dataclasses.replace(reports[1], signed=forged_join), True, now).reason
    if admitted != joins or replay != "duplicate" or forged != "bad signature":
        raise SystemExit(f"admission misbehaves: {admitted=} {replay=} {forged=}")

    passes = iter([fresh() for _ in range(repeats)])
    verdicts: list[int] = []

    def admission_pass() -> None:
        admission = next(passes)
        verdicts.append(sum(admission.check(r, True, now).admitted for r in reports))

    def raw_pass() -> None:
        for signature, message in messages:
            public.verify(signature, message)

    medians = interleaved_medians({"admission": admission_pass, "raw": raw_pass}, repeats)
    if verdicts != [joins] * repeats:
        raise SystemExit(f"a timed pass refused joins: {verdicts}")
    return {
        "joins_verified_per_s": round(joins / medians["admission"]),
        "raw_verify_per_s": round(joins / medians["raw"]),
        "ratio_admission_vs_raw_verify": round(medians["raw"] / medians["admission"], 3),
    }


# --- main -----------------------------------------------------------------------------------


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Inputs each decoder got and accepted (any unexpected exception or violation
    would be a red bar), and signed-join admission against raw Ed25519 verification."""
    names = list(result["inputs_per_decoder"])
    fig, ax = _plots.figure(
        f"Fuzzed decoders: {result['inputs']:,} inputs, "
        f"{result['unexpected_exceptions']} unexpected exceptions or violations "
        f"({result['roundtrip_violations']} round-trip)",
        width=9.0,
        height=0.28 * len(names) + 1.5,
    )
    ys = range(len(names))
    ax.barh(ys, [result["inputs_per_decoder"][n] for n in names], color="#9fb3d9", label="inputs")
    ax.barh(
        ys, [result["accepted_per_decoder"][n] for n in names], color="#2f6fde", label="accepted"
    )
    every_kind = "unexpected_by_kind" in result  # older results counted exceptions only
    bad = {
        n: result["unexpected_exceptions_per_decoder"].get(n, 0)
        + (0 if every_kind else result["roundtrip_violations_per_decoder"].get(n, 0))
        for n in names
    }
    ax.barh(ys, [bad[n] for n in names], color="#d33a2c", label="unexpected or violation")
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("symlog")
    ax.set_xlabel("inputs (symlog)")
    ax.legend(fontsize=8)
    paths = [_plots.save(fig, directory, "fuzz_decoders")]

    fig, ax = _plots.figure(f"Signed-join admission ({result['joins']} joins)")
    _plots.bars(
        ax,
        {
            "Admission.check": result["joins_verified_per_s"],
            "raw Ed25519 verify": result["raw_verify_per_s"],
        },
        ylabel="joins / s",
        fmt="{:,.0f}",
    )
    paths.append(_plots.save(fig, directory, "fuzz_admission"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--inputs", type=int, default=INPUTS_PER_DECODER, help="mutation-engine inputs per decoder"
    )
    parser.add_argument(
        "--atheris-seconds",
        type=float,
        default=60.0,
        help="total time for the coverage-guided runs (0: none)",
    )
    parser.add_argument("--joins", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--only", default="", help="comma-separated parts of decoder names")
    _plots.add_argument(parser)
    args = parser.parse_args()
    run_and_emit("fuzz", lambda: measure(args))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()

    progress("building seeds")
    seeds, part_sets = build_seeds(args.seed)
    all_targets = targets()
    if set(seeds) != {t.name for t in all_targets}:
        raise SystemExit("seeds and decoders disagree")
    wanted = [w for w in args.only.split(",") if w]

    def chosen(name: str) -> bool:
        return not wanted or any(w in name for w in wanted)

    all_targets = [t for t in all_targets if chosen(t.name)]
    progress(
        f"{sum(map(len, seeds.values())) + len(part_sets)} seeds in "
        f"{time.perf_counter() - started:.1f} s"
    )

    rng = random.Random(args.seed)
    results: dict[str, Stats] = {}
    for target in all_targets:
        start = time.perf_counter()
        stats = fuzz_target(target, seeds[target.name], args.inputs, rng)
        results[target.name] = stats
        elapsed = time.perf_counter() - start
        progress(
            f"{target.name:40} {stats.inputs:>7} inputs {stats.inputs / elapsed:>8.0f}/s"
            f"  accepted {stats.accepted:>6}  unexpected {stats.unexpected}"
            f"  violations {sum(stats.violations.values())}"
        )
    if chosen(ASSEMBLE):
        start = time.perf_counter()
        results[ASSEMBLE] = stats = fuzz_assemble(part_sets, args.inputs, rng)
        elapsed = time.perf_counter() - start
        progress(
            f"{ASSEMBLE:40} {stats.inputs:>7} inputs {stats.inputs / elapsed:>8.0f}/s"
            f"  accepted {stats.accepted:>6}  unexpected {stats.unexpected}"
        )
    engine_inputs = {name: s.inputs for name, s in results.items()}

    atheris_version = atheris_available()
    atheris_inputs: dict[str, int] = {}
    atheris_errors: dict[str, dict[str, Any]] = {}
    if atheris_version and args.atheris_seconds > 0:
        share = args.atheris_seconds / len(all_targets)
        progress(f"atheris {atheris_version}: {share:.1f} s per decoder")
        for target in all_targets:
            found, error = run_atheris(target, seeds[target.name], share, args.seed)
            if found is None:
                assert error is not None
                atheris_errors[target.name] = error
                progress(
                    f"  {target.name}: atheris child ended without a result ({error['kind']}): "
                    f"{error['report'][-300:]}"
                )
                continue
            results[target.name].merge(found)
            atheris_inputs[target.name] = found["inputs"]
            progress(
                f"  {target.name:40} {found['inputs']:>7} inputs  accepted "
                f"{found['accepted']:>6}  unexpected {found['unexpected']}"
            )
    elif not atheris_version:
        progress("atheris not installed: mutation engine only")

    progress(f"admission: {args.joins} joins x {args.repeats} interleaved repeats")
    rates = admission_rates(args.joins, args.repeats, random.Random(args.seed))
    progress(
        f"  Admission.check {rates['joins_verified_per_s']}/s, "
        f"raw verify {rates['raw_verify_per_s']}/s"
    )

    def reproducers(kinds: tuple[str, ...], per_decoder: int) -> list[dict[str, Any]]:
        """The first reproducers of these kinds for each decoder (each the shortest
        input found for its kind of failure)."""
        out = []
        for s in results.values():
            found = [e for k, e in s.examples.items() if k[0] in kinds]
            out += sorted(found, key=lambda e: -e["count"])[:per_decoder]
        return out

    sections = (
        ("UNEXPECTED EXCEPTION", ("unexpected",)),
        ("ROUNDTRIP VIOLATION", ("roundtrip",)),
        ("CHECK FAILURE", ("fast_path", "import_then_run")),
    )
    for title, kinds in sections:
        for example in reproducers(kinds, SHOW):
            progress(f"{title}: {json.dumps(example)}")

    def total(kind: str) -> int:
        return sum(s.violations.get(kind, 0) for s in results.values())

    result = {
        "bench": "fuzz",
        "seed": args.seed,
        "decoders": list(results),
        "inputs": sum(s.inputs for s in results.values()),
        "inputs_per_decoder": {name: s.inputs for name, s in results.items()},
        "engine_inputs_per_decoder": engine_inputs,
        "accepted_per_decoder": {name: s.accepted for name, s in results.items()},
        "atheris": atheris_version or "not installed",
        "atheris_inputs_per_decoder": atheris_inputs,
        "atheris_errors": atheris_errors,
        "unexpected_exceptions": sum(unexpected_by_kind(results, atheris_errors).values()),
        "unexpected_by_kind": unexpected_by_kind(results, atheris_errors),
        "decoder_exceptions": sum(s.unexpected for s in results.values()),
        "unexpected_examples": reproducers(("unexpected",), 2)[: 2 * SHOW],
        "roundtrip_checked": [
            t.name for t in all_targets if t.check_kind == "roundtrip" and t.check
        ],
        "roundtrip_violations": total("roundtrip"),
        "roundtrip_violations_per_decoder": {
            name: s.violations["roundtrip"]
            for name, s in results.items()
            if s.violations.get("roundtrip")
        },
        "unexpected_exceptions_per_decoder": unexpected_per_decoder(results, atheris_errors),
        "roundtrip_examples": reproducers(("roundtrip",), 2)[: 2 * SHOW],
        "fast_path_disagreements": total("fast_path"),
        "import_then_run_failures": total("import_then_run"),
        "check_failure_examples": reproducers(("fast_path", "import_then_run"), 2)[: 2 * SHOW],
        **rates,
        "joins": args.joins,
        "repeats": args.repeats,
        "seconds": round(time.perf_counter() - started, 1),
    }
    _plots.write(result, args.plots, plot)
    return result


if __name__ == "__main__":
    main()
