"""Parse each distinct datagram once: what makes a pool of a thousand servers
affordable on the memory driver, changing no outcome.

The host's IP and UDP parsers, the control decoder and the IGMPv3 report decoder
are pure functions of their bytes, and a multicast datagram reaches many servers
(a relayed report many routers) as the same bytes. The fewest portions that cover a
set of buckets (`AddressSpace.cover`) are a pure function of that set: after a
change most servers hold the buckets they held, and each computes its portions
again; the cover is memoized on the set's bits.
Likewise every server computes the same proposal's result from the same state
(`apply_op` is deterministic): computed once per (digest of the state held,
operation), and the servers then hold that one result (states are immutable), so
its digest and portions are computed once too. So is the state every configured
member starts from (`initial_apportionment`, a function of the pool's settings).
A coordinator answers every newcomer's snapshot request with the same parts
(`control.snapshot_parts`, made once per state; the sequence numbers they carry are
the server's, stamped on each as it goes out), and those parts reach each newcomer
as bytes that differ only in the envelope's sequence number: a control message is
decoded once per content, and a copy with the other sequence number serves the rest.
Failures are not memoized (they raise as before). The patches hold only inside the
`with`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Hashable, Iterator
from typing import Any, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

from manycast.protocol import coordination, poolstate
from manycast.protocol.host import HostStack
from manycast.space import AddressSpace
from manycast.wire import control
from manycast.wire.control.envelope import ENVELOPE_FIXED
from manycast.wire.ip import InnerPacket, UDPDatagram
from manycast.wire.membership import IGMPv3Report

RESULTS_KEPT = 64  # proposals' results remembered (a pool has one change going at a time)
COVERS_KEPT = 4096  # bucket sets' covers remembered: one per server of a pool of 1024, and more

P = ParamSpec("P")
R = TypeVar("R")


def remembering(function: Callable[P, R], key: Callable[P, Hashable], limit: int) -> Callable[P, R]:
    """`function` answering from memory for a key it has seen (a None answer, nothing
    parsed, is not remembered; an exception neither); the memory starts afresh when it
    holds `limit` keys."""
    table: dict[Hashable, R] = {}

    def remembered(*args: P.args, **kwargs: P.kwargs) -> R:
        name = key(*args, **kwargs)
        found = table.get(name)
        if found is None:
            found = function(*args, **kwargs)
            if found is not None:
                if len(table) >= limit:
                    table.clear()
                table[name] = found
        return found

    return remembered


def per_packet(
    parse_udp: Callable[[HostStack, InnerPacket], UDPDatagram | None], limit: int
) -> Callable[[HostStack, InnerPacket], UDPDatagram | None]:
    """`HostStack.parse_udp` answering from memory for an IP packet it has parsed: the
    same object, as the memoized `HostStack.parse` hands out for the same bytes (kept
    with the answer, so that no other packet can take its id meanwhile). Keyed by the
    payload and addresses it was hashing each address again for every packet."""
    table: dict[int, tuple[InnerPacket, UDPDatagram]] = {}

    def parsed(self: HostStack, ip: InnerPacket) -> UDPDatagram | None:
        entry = table.get(id(ip))
        if entry is not None and entry[0] is ip:
            return entry[1]
        found = parse_udp(self, ip)
        if found is not None:
            if len(table) >= limit:
                table.clear()
            table[id(ip)] = (ip, found)
        return found

    return parsed


def decoding_once(
    decode: Callable[[bytes | bytearray | memoryview], control.ControlMessage], limit: int
) -> Callable[[bytes | bytearray | memoryview], control.ControlMessage]:
    """`decode` answering from memory for bytes it has seen, and for bytes that differ
    from some it has seen only in the envelope's sequence number (a copy of that
    message with this one's number: the number is read as it is, never checked
    against anything else)."""
    exact: dict[bytes, control.ControlMessage] = {}
    by_content: dict[bytes, control.ControlMessage] = {}

    def decoded(data: bytes | bytearray | memoryview) -> control.ControlMessage:
        data = bytes(data)
        found = exact.get(data)
        if found is not None:
            return found
        # The envelope: magic, version, type, the sender's length and the sender, then
        # the sequence number (4 bytes).
        at = ENVELOPE_FIXED - 4 + (data[4] if len(data) > 4 else 0)
        content = data[:at] + data[at + 4 :] if len(data) >= at + 4 else None
        same = by_content.get(content) if content is not None else None
        if same is not None:
            found = copy.copy(same)
            object.__setattr__(found, "seq", int.from_bytes(data[at : at + 4], "big"))
        else:
            found = decode(data)
            if content is not None:
                if len(by_content) >= limit:
                    by_content.clear()
                by_content[content] = found
        if len(exact) >= limit:
            exact.clear()
        exact[data] = found
        return found

    return decoded


@contextlib.contextmanager
def memoized_decoders(limit: int = 8192) -> Iterator[None]:
    """Within the block, equal datagrams are parsed once, equal proposals applied once
    and equal bucket sets covered once (`limit`: distinct datagrams remembered per
    parser before it starts afresh)."""
    parse, parse_udp, decode = HostStack.parse, HostStack.parse_udp, control.decode
    apply_op = coordination.apply_op
    snapshot_parts = control.snapshot_parts
    initial = poolstate.initial_apportionment
    report_descriptor = IGMPv3Report.__dict__["from_wire"]  # the classmethod, put back after
    cover = AddressSpace.cover

    def ip_key(self: HostStack, packet: bytes) -> Hashable:
        return packet

    def bytes_key(data: bytes | bytearray | memoryview) -> Hashable:
        return bytes(data)

    def state_key(state: Any, op: control.PolicyOp) -> Hashable:
        return (state.digest(), op)

    def settings_key(settings: poolstate.PoolSettings) -> Hashable:
        weights = tuple(sorted(settings.weights.items()))
        return (settings.space, settings.members, settings.policy, settings.portions, weights)

    def parts_key(
        epoch: int,
        allocation: Any,
        max_bytes: int = control.SNAPSHOT_MAX_BYTES,
        *,
        sender: str,
        seq: int = 0,
        weights: Any = None,
    ) -> Hashable:
        shares = None if weights is None else tuple(sorted(weights.items()))
        return (epoch, allocation.digest(), max_bytes, sender, shares)  # (not seq)

    def cover_key(self: AddressSpace, selected: npt.NDArray[np.bool_]) -> Hashable:
        return (self, selected.shape, np.packbits(selected).tobytes())

    IGMPv3Report.from_wire = staticmethod(  # type: ignore[method-assign]
        remembering(IGMPv3Report.from_wire, bytes_key, limit)
    )
    AddressSpace.cover = remembering(cover, cover_key, COVERS_KEPT)  # type: ignore[method-assign]
    HostStack.parse = remembering(parse, ip_key, limit)  # type: ignore[method-assign]
    HostStack.parse_udp = per_packet(parse_udp, limit)  # type: ignore[method-assign, assignment]
    control.decode = decoding_once(decode, limit)  # type: ignore[assignment]
    control.snapshot_parts = remembering(snapshot_parts, parts_key, RESULTS_KEPT)
    coordination.apply_op = remembering(apply_op, state_key, RESULTS_KEPT)
    poolstate.initial_apportionment = remembering(initial, settings_key, RESULTS_KEPT)
    try:
        yield
    finally:
        IGMPv3Report.from_wire = report_descriptor  # type: ignore[method-assign]
        AddressSpace.cover = cover  # type: ignore[method-assign]
        coordination.apply_op = apply_op
        poolstate.initial_apportionment = initial
        HostStack.parse = parse  # type: ignore[method-assign]
        HostStack.parse_udp = parse_udp  # type: ignore[method-assign]
        control.decode = decode
        control.snapshot_parts = snapshot_parts
