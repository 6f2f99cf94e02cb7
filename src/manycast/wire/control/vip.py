"""Messages of the virtual-IP pool: label-switched trees, flow tags and load (Fig 17-19).

A server tells its attachment router that it serves the VIP (`ServerHello`);
routers tell their neighbours the labels they bound for each server's tree
(`LabelMapping`, downstream-unsolicited in the spirit of LDP, RFC 5036); VIP
routers announce themselves (`VipAdvert`) and, for a new flow, tell the client's
edge router to push the label of the chosen server's tree (`FlowTag`, Fig 18)
until the flow ends (`FlowUntag`); servers report their load to the VIP routers
(`LoadReport`, Fig 19).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from manycast.wire.control.envelope import Envelope, MessageType, control_message
from manycast.wire.control.fields import (
    U16,
    U32,
    Address,
    check_address,
    check_real,
    check_uint,
    read_address,
    read_count,
    records,
    set_field,
    write_address,
)
from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError
from manycast.wire.label import FIRST_UNRESERVED, MAX_LABEL

# A mapping of MAX_BINDINGS IPv6 bindings (21 bytes each) still fits one datagram.
MAX_BINDINGS = 2048
MAX_FLOW_KEYS = 1024
U8 = 0xFF
_BINDING_MIN = 1 + 4 + 4  # family, IPv4 address, label
_FLOW_MIN = 1 + 5 + 2 + 5 + 2  # protocol, two IPv4 addresses and two ports


def _address_order(value: Address) -> tuple[int, int]:
    # IPv4Address and IPv6Address do not compare with each other: IPv4 sorts first.
    return value.version, int(value)


@control_message
@dataclass(frozen=True, slots=True)
class ServerHello(Envelope):
    """A server tells its attachment router it serves `vip` at `server`, the egress of
    its label-switched tree, for `hold_ms` unless it says so again."""

    TYPE: ClassVar[MessageType] = MessageType.SERVER_HELLO
    server: Address
    vip: Address
    hold_ms: int

    def _check(self, what: str) -> None:
        check_address(what, "server", self.server)
        check_address(what, "vip", self.vip)
        check_uint(what, "hold_ms", self.hold_ms, U32, low=1)

    def _write_body(self, w: Writer) -> None:
        write_address(w, self.server)
        write_address(w, self.vip)
        w.u32(self.hold_ms)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> ServerHello:
        server = read_address(r, "server")
        vip = read_address(r, "vip")
        return cls(sender, seq, server, vip, r.u32("hold"))


class Binding(NamedTuple):
    """A router's local label for the tree of the server at `fec`."""

    fec: Address
    label: int


@control_message
@dataclass(frozen=True, slots=True)
class LabelMapping(Envelope):
    """A router's whole table of local label bindings, one per server tree, sent to each
    neighbouring router periodically and on change; valid for `hold_ms`. An empty table
    withdraws every binding. Bindings are sorted by fec (IPv4 first), no fec or label twice."""

    TYPE: ClassVar[MessageType] = MessageType.LABEL_MAPPING
    router: Address
    hold_ms: int
    bindings: tuple[Binding, ...]

    def _check(self, what: str) -> None:
        check_address(what, "router", self.router)
        check_uint(what, "hold_ms", self.hold_ms, U32, low=1)
        bindings = records(what, "bindings", self.bindings, Binding)
        set_field(self, "bindings", bindings)
        if len(bindings) > MAX_BINDINGS:
            raise WireError(f"{what}: {len(bindings)} bindings, at most {MAX_BINDINGS}")
        labels: set[int] = set()
        previous: tuple[int, int] | None = None
        for fec, label in bindings:
            check_address(what, "fec", fec)
            check_uint(what, f"label of {fec}", label, MAX_LABEL, low=FIRST_UNRESERVED)
            order = _address_order(fec)
            if previous is not None and order <= previous:
                raise WireError(f"{what}: bindings must be sorted by fec, each once ({fec})")
            if label in labels:
                raise WireError(f"{what}: label {label} bound to two fecs")
            previous = order
            labels.add(label)

    @classmethod
    def of(
        cls, sender: str, seq: int, router: Address, hold_ms: int, table: Mapping[Address, int]
    ) -> LabelMapping:
        """A mapping of `table` (fec to label), put in the canonical order."""
        try:
            ordered = sorted(table.items(), key=lambda item: _address_order(item[0]))
        except (AttributeError, TypeError):
            raise WireError(f"label mapping: fecs must be addresses, not {table!r}") from None
        return cls(sender, seq, router, hold_ms, tuple(Binding(f, label) for f, label in ordered))

    def table(self) -> dict[Address, int]:
        return dict(self.bindings)

    def _write_body(self, w: Writer) -> None:
        write_address(w, self.router)
        w.u32(self.hold_ms).u16(len(self.bindings))
        for fec, label in self.bindings:
            write_address(w, fec)
            w.u32(label)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> LabelMapping:
        router = read_address(r, "router")
        hold = r.u32("hold")
        count = read_count(r, "bindings", _BINDING_MIN, MAX_BINDINGS)
        bindings = tuple(Binding(read_address(r, "fec"), r.u32("label")) for _ in range(count))
        return cls(sender, seq, router, hold, bindings)


@dataclass(frozen=True, slots=True)
class FlowKey:
    """One client flow to the VIP: protocol, client address and port, VIP and port."""

    protocol: int
    client: Address
    client_port: int
    vip: Address
    vip_port: int

    def __post_init__(self) -> None:
        what = "flow key"
        check_uint(what, "protocol", self.protocol, U8)
        check_address(what, "client", self.client)
        check_address(what, "vip", self.vip)
        if self.client.version != self.vip.version:
            raise WireError(f"{what}: client {self.client} and vip {self.vip} mix families")
        check_uint(what, "client_port", self.client_port, U16)
        check_uint(what, "vip_port", self.vip_port, U16)

    def _write(self, w: Writer) -> None:
        w.u8(self.protocol)
        write_address(w, self.client)
        w.u16(self.client_port)
        write_address(w, self.vip)
        w.u16(self.vip_port)

    @classmethod
    def _read(cls, r: Reader) -> FlowKey:
        protocol = r.u8("protocol")
        client = read_address(r, "client")
        client_port = r.u16("client port")
        vip = read_address(r, "vip")
        return cls(protocol, client, client_port, vip, r.u16("vip port"))


@control_message
@dataclass(frozen=True, slots=True)
class FlowTag(Envelope):
    """Fig 18: a VIP router tells the client's edge router to push the label of `server`'s
    tree onto this flow's next packets, until the flow ends or idles for `idle_ms`."""

    TYPE: ClassVar[MessageType] = MessageType.FLOW_TAG
    flow: FlowKey
    server: Address
    idle_ms: int

    def _check(self, what: str) -> None:
        if not isinstance(self.flow, FlowKey):
            raise WireError(f"{what}: flow must be a FlowKey, not {self.flow!r}")
        check_address(what, "server", self.server)
        check_uint(what, "idle_ms", self.idle_ms, U32, low=1)

    def _write_body(self, w: Writer) -> None:
        self.flow._write(w)
        write_address(w, self.server)
        w.u32(self.idle_ms)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> FlowTag:
        flow = FlowKey._read(r)
        server = read_address(r, "server")
        return cls(sender, seq, flow, server, r.u32("idle"))


def _as_flows(what: str, flows: object) -> tuple[FlowKey, ...]:
    if isinstance(flows, bytes | str | FlowKey) or not isinstance(flows, Iterable):
        raise WireError(f"{what}: flows must be a sequence of FlowKey, not {flows!r}")
    keys = tuple(flows)
    if not 1 <= len(keys) <= MAX_FLOW_KEYS:
        raise WireError(f"{what}: {len(keys)} flows, not 1..{MAX_FLOW_KEYS}")
    for key in keys:
        if not isinstance(key, FlowKey):
            raise WireError(f"{what}: flows must be FlowKeys, not {key!r}")
    if len(set(keys)) != len(keys):
        raise WireError(f"{what}: a flow is listed twice")
    return keys


@control_message
@dataclass(frozen=True, slots=True)
class FlowUntag(Envelope):
    """These flows ended: their edge router stops pushing labels onto them."""

    TYPE: ClassVar[MessageType] = MessageType.FLOW_UNTAG
    flows: tuple[FlowKey, ...]

    def _check(self, what: str) -> None:
        set_field(self, "flows", _as_flows(what, self.flows))

    def _write_body(self, w: Writer) -> None:
        w.u16(len(self.flows))
        for flow in self.flows:
            flow._write(w)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> FlowUntag:
        count = read_count(r, "flows", _FLOW_MIN, MAX_FLOW_KEYS)
        return cls(sender, seq, tuple(FlowKey._read(r) for _ in range(count)))


@control_message
@dataclass(frozen=True, slots=True)
class VipAdvert(Envelope):
    """A VIP router at `router` serves `vip` for `hold_ms`: routers send unlabelled
    traffic for the VIP to the nearest live one."""

    TYPE: ClassVar[MessageType] = MessageType.VIP_ADVERT
    vip: Address
    router: Address
    hold_ms: int

    def _check(self, what: str) -> None:
        check_address(what, "vip", self.vip)
        check_address(what, "router", self.router)
        check_uint(what, "hold_ms", self.hold_ms, U32, low=1)

    def _write_body(self, w: Writer) -> None:
        write_address(w, self.vip)
        write_address(w, self.router)
        w.u32(self.hold_ms)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> VipAdvert:
        vip = read_address(r, "vip")
        router = read_address(r, "router")
        return cls(sender, seq, vip, router, r.u32("hold"))


@control_message
@dataclass(frozen=True, slots=True)
class LoadReport(Envelope):
    """Fig 19: a server's load (requests per second, any finite value from 0) and open
    sessions, to the VIP routers, whose policy turns them into shares of new flows."""

    TYPE: ClassVar[MessageType] = MessageType.LOAD_REPORT
    server: Address
    load: float
    sessions: int

    def _check(self, what: str) -> None:
        check_address(what, "server", self.server)
        check_real(what, "load", self.load, 0.0)
        check_uint(what, "sessions", self.sessions, U32)

    def _write_body(self, w: Writer) -> None:
        write_address(w, self.server)
        w.f64(self.load).u32(self.sessions)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> LoadReport:
        server = read_address(r, "server")
        load = r.f64("load")
        return cls(sender, seq, server, load, r.u32("sessions"))
