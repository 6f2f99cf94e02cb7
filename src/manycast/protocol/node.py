"""The one interface every node offers, so any driver can host any node.

A node is a sans-I/O state machine: a driver hands it packets that arrived on
one of its interfaces and tells it when its deadline has passed; the node hands
back frames to put on its links. It never reads a clock: every entry point is
given `now` (seconds, from the driver's clock, virtual or real).
"""

from __future__ import annotations

import heapq
import ipaddress
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from manycast.errors import ConfigError


def ipv4_only(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, what: str
) -> ipaddress.IPv4Address:
    """`address`, for a part that serves IPv4 pools only so far; ConfigError naming
    `what` for an IPv6 one (the topology compiler refuses those combinations first)."""
    if not isinstance(address, ipaddress.IPv4Address):
        raise ConfigError(f"{what} is not supported yet for IPv6 ({address})")
    return address


@dataclass(frozen=True, slots=True)
class Interface:
    """One attachment of a node to a link: its address and the link's network, and
    on a dual-stack link (a dual-stack pool's) its IPv6 address and network too."""

    name: str
    link: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    address6: ipaddress.IPv6Address | None = None
    network6: ipaddress.IPv6Network | None = None

    @property
    def address_int(self) -> int:
        return int(self.address)

    def of_family(self, version: int) -> Interface | None:
        """This attachment as seen by one family's logic (one address), or None
        when it has no address of that family."""
        if self.address.version == version:
            return (
                self
                if self.address6 is None
                else Interface(self.name, self.link, self.address, self.network)
            )
        if version == 6 and self.address6 is not None and self.network6 is not None:
            return Interface(self.name, self.link, self.address6, self.network6)
        return None


def family_view(interfaces: dict[str, Interface], version: int) -> dict[str, Interface]:
    """The interfaces that have an address of `version`, each with that address only."""
    view = {name: iface.of_family(version) for name, iface in interfaces.items()}
    return {name: iface for name, iface in view.items() if iface is not None}


@dataclass(frozen=True, slots=True)
class Frame:
    """A packet for a link. `next_hop` is the neighbour's address on that link (an
    integer IPv4 or IPv6 address); None means every other node on the link."""

    iface: str
    packet: bytes
    next_hop: int | None


class Timers:
    """Named deadlines of one node; re-arming a name replaces its deadline."""

    __slots__ = ("_due", "_heap")

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def arm(self, name: str, at: float) -> None:
        self._due[name] = at
        heapq.heappush(self._heap, (at, name))

    def cancel(self, name: str) -> None:
        self._due.pop(name, None)

    def armed(self, name: str) -> bool:
        return name in self._due

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expired(self, now: float) -> list[str]:
        """Names whose deadline is at or before `now`, each removed once."""
        fired: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, name = heapq.heappop(heap)
            if self._due.get(name) == at:
                del self._due[name]
                fired.append(name)
        return fired


@dataclass
class Node(ABC):
    """Base of routers, servers and clients: interfaces, an outbox, effects and timers.

    Effects are what a driver must act on besides frames (a router's `KeyNeeded`,
    `GroupChanged`): plain data, handed out in order by `take_effects()`."""

    name: str
    interfaces: dict[str, Interface]
    outbox: list[Frame] = field(default_factory=list, init=False, repr=False)
    effects: list[object] = field(default_factory=list, init=False, repr=False)
    timers: Timers = field(default_factory=Timers, init=False, repr=False)

    @abstractmethod
    def start(self, now: float) -> None:
        """Called once when the node comes up."""

    @abstractmethod
    def receive(self, iface: str, packet: bytes, now: float) -> None:
        """A packet arrived on `iface`."""

    @abstractmethod
    def on_timer(self, now: float) -> None:
        """The node's deadline has passed (it may be called early; check your timers)."""

    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    def take_frames(self) -> list[Frame]:
        # Emptied in place: helpers (a host stack) hold a reference to this list.
        frames = self.outbox[:]
        self.outbox.clear()
        return frames

    def take_effects(self) -> list[object]:
        effects, self.effects = self.effects, []
        return effects

    def send(self, iface: str, packet: bytes, next_hop: int | None) -> None:
        self.outbox.append(Frame(iface, packet, next_hop))
