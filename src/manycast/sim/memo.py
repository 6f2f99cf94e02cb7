"""Parse each distinct datagram once: what makes a pool of a thousand servers
affordable on the memory driver, changing no outcome.

The host's IP and UDP parsers and the control decoder are pure functions of their
bytes, and a multicast datagram reaches many servers as the same bytes object.
Likewise every server computes the same proposal's result from the same state
(`apply_op` is deterministic): computed once per (state held, operation). Failures
are not memoized (they raise as before). The patches hold only inside the `with`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from manycast.protocol import coordination
from manycast.protocol.host import HostStack
from manycast.wire import control
from manycast.wire.ip import IPv4Packet, UDPDatagram

RESULTS_KEPT = 64  # proposals' results remembered (a pool has one change going at a time)


@contextlib.contextmanager
def memoized_decoders(limit: int = 8192) -> Iterator[None]:
    """Within the block, equal datagrams are parsed once and equal proposals applied once
    (`limit`: distinct datagrams remembered per parser before it starts afresh)."""
    parse, parse_udp, decode = HostStack.parse, HostStack.parse_udp, control.decode
    apply_op = coordination.apply_op
    results: dict[tuple[int, control.PolicyOp], tuple[object, object]] = {}

    def fast_apply_op(state: Any, op: control.PolicyOp) -> Any:
        key = (id(state), op)
        found = results.get(key)
        if found is not None and found[0] is state:
            return found[1]
        result = apply_op(state, op)
        if len(results) >= RESULTS_KEPT:
            results.clear()
        results[key] = (state, result)
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

    HostStack.parse = fast_parse  # type: ignore[method-assign]
    HostStack.parse_udp = fast_parse_udp  # type: ignore[method-assign]
    control.decode = fast_decode
    coordination.apply_op = fast_apply_op
    try:
        yield
    finally:
        coordination.apply_op = apply_op
        HostStack.parse = parse  # type: ignore[method-assign]
        HostStack.parse_udp = parse_udp  # type: ignore[method-assign]
        control.decode = decode
