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
its digest and portions are computed once too. Failures are not memoized (they
raise as before). The patches hold only inside the `with`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from manycast.protocol import coordination
from manycast.protocol.host import HostStack
from manycast.space import AddressSpace, PortionSet
from manycast.wire import control
from manycast.wire.ip import IPv4Packet, UDPDatagram
from manycast.wire.membership import IGMPv3Report

RESULTS_KEPT = 64  # proposals' results remembered (a pool has one change going at a time)
COVERS_KEPT = 4096  # bucket sets' covers remembered: one per server of a pool of 1024, and more


@contextlib.contextmanager
def memoized_decoders(limit: int = 8192) -> Iterator[None]:
    """Within the block, equal datagrams are parsed once and equal proposals applied once
    (`limit`: distinct datagrams remembered per parser before it starts afresh)."""
    parse, parse_udp, decode = HostStack.parse, HostStack.parse_udp, control.decode
    apply_op = coordination.apply_op
    results: dict[tuple[str, control.PolicyOp], Any] = {}

    def fast_apply_op(state: Any, op: control.PolicyOp) -> Any:
        key = (state.digest(), op)
        found = results.get(key)
        if found is not None:
            return found
        result = apply_op(state, op)
        if len(results) >= RESULTS_KEPT:
            results.clear()
        results[key] = result
        return result

    ips: dict[bytes, IPv4Packet] = {}
    udps: dict[tuple[bytes, object, object], UDPDatagram] = {}
    messages: dict[bytes, control.ControlMessage] = {}

    def fast_parse(self: HostStack, packet: bytes) -> IPv4Packet | None:
        found = ips.get(packet)
        if found is None:
            found = parse(self, packet)
            if found is not None:
                if len(ips) >= limit:
                    ips.clear()
                ips[packet] = found
        return found

    def fast_parse_udp(self: HostStack, ip: IPv4Packet) -> UDPDatagram | None:
        key = (ip.payload, ip.header.src, ip.header.dst)
        found = udps.get(key)
        if found is None:
            found = parse_udp(self, ip)
            if found is not None:
                if len(udps) >= limit:
                    udps.clear()
                udps[key] = found
        return found

    def fast_decode(data: bytes | bytearray | memoryview) -> control.ControlMessage:
        key = bytes(data)
        found = messages.get(key)
        if found is None:
            found = decode(data)
            if len(messages) >= limit:
                messages.clear()
            messages[key] = found
        return found

    reports: dict[bytes, IGMPv3Report] = {}
    report_descriptor = IGMPv3Report.__dict__["from_wire"]  # the classmethod, put back after
    report_from_wire = IGMPv3Report.from_wire

    def fast_report(data: bytes) -> IGMPv3Report:
        key = bytes(data)
        found = reports.get(key)
        if found is None:
            found = report_from_wire(key)
            if len(reports) >= limit:
                reports.clear()
            reports[key] = found
        return found

    covers: dict[tuple[AddressSpace, bytes], PortionSet] = {}
    cover = AddressSpace.cover

    def fast_cover(space: AddressSpace, selected: npt.NDArray[np.bool_]) -> PortionSet:
        if selected.shape != (space.buckets,):
            return cover(space, selected)  # its own error
        key = (space, np.packbits(selected).tobytes())
        found = covers.get(key)
        if found is None:
            found = cover(space, selected)
            if len(covers) >= COVERS_KEPT:
                covers.clear()
            covers[key] = found
        return found

    IGMPv3Report.from_wire = staticmethod(fast_report)  # type: ignore[method-assign]
    AddressSpace.cover = fast_cover  # type: ignore[method-assign,assignment]
    HostStack.parse = fast_parse  # type: ignore[method-assign]
    HostStack.parse_udp = fast_parse_udp  # type: ignore[method-assign]
    control.decode = fast_decode
    coordination.apply_op = fast_apply_op
    try:
        yield
    finally:
        IGMPv3Report.from_wire = report_descriptor  # type: ignore[method-assign]
        AddressSpace.cover = cover  # type: ignore[method-assign]
        coordination.apply_op = apply_op
        HostStack.parse = parse  # type: ignore[method-assign]
        HostStack.parse_udp = parse_udp  # type: ignore[method-assign]
        control.decode = decode
