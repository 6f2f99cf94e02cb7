"""Label-switched trees, one per server (seed Fig 17-18): label bindings and where a label goes.

Every router binds a local label for every server it can reach and tells its
neighbouring routers (downstream-unsolicited distribution in the spirit of LDP,
RFC 5036, as our own `LabelMapping` message): the whole table, periodically and
whenever it changes, valid for a hold time. A router uses a neighbour's binding
for a server only when that neighbour is its next hop toward the server, so the
bindings follow the unicast routes and each server's tree is loop-free. The
router the server is attached to (its `ServerHello` arrives there) is the
tree's last hop: it pops the label and hands the inner packet to the server.

A server that stops saying hello, or a neighbour that stops refreshing, drops out
after the hold time and the trees are rebuilt from what remains. Labels are
sticky: a server that comes back gets the label it had.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from manycast.wire.label import FIRST_UNRESERVED

_HOPS_CACHED = 4096  # servers whose next hop is remembered between changes


@dataclass(frozen=True, slots=True)
class Hop:
    """Where a packet of a server's tree goes next: out of `iface` to `neighbor`,
    labelled `label`, or (label None) unlabelled to the server itself."""

    iface: str
    neighbor: int
    label: int | None


@dataclass(slots=True)
class _Egress:
    iface: str
    expires: float


@dataclass
class LabelTableStats:
    hellos: int = 0
    mappings: int = 0
    withdrawn: int = 0  # bindings that lapsed or were withdrawn by a neighbour


@dataclass
class LabelTable:
    """One router's label bindings. `route(address)` gives (interface, next hop) by the
    router's unicast routes; the table never sends anything itself."""

    route: Callable[[int], tuple[str, int] | None]
    stats: LabelTableStats = field(default_factory=LabelTableStats)
    # server address -> the label we bound for its tree (sticky, never reused)
    _label_of: dict[int, int] = field(default_factory=dict)
    _fec_of: dict[int, int] = field(default_factory=dict)
    _next_label: int = FIRST_UNRESERVED
    # servers attached to us: address -> their link and when their hello lapses
    _egress: dict[int, _Egress] = field(default_factory=dict)
    # neighbour router -> server -> (its label for that server's tree, expiry)
    _learned: dict[int, dict[int, tuple[int, float]]] = field(default_factory=dict)
    _advertised: tuple[tuple[int, int], ...] = ()
    # Something that may change our bindings happened since we last compared them
    # (checked per packet, so the comparison itself runs only after such events).
    _dirty: bool = True
    # Called when where packets go may have changed: a data plane that keeps per-hop
    # state (precomputed headers) drops it then.
    on_change: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    # server -> `toward(server)`, until the next change: packets ask per packet
    _hops: dict[int, Hop | None] = field(default_factory=dict)

    # -- what arrives --------------------------------------------------------------------
    def hello(self, server: int, iface: str, hold: float, now: float) -> None:
        """A server on our link `iface` serves the pool: we are its tree's last hop."""
        self.stats.hellos += 1
        held = self._egress.get(server)
        if held is None or held.iface != iface:
            self._changed()
        self._egress[server] = _Egress(iface, now + hold)

    def mapping(
        self, neighbor: int, bindings: Iterable[tuple[int, int]], hold: float, now: float
    ) -> None:
        """A neighbouring router's whole table: it replaces what it said before."""
        self.stats.mappings += 1
        fresh = {fec: (label, now + hold) for fec, label in bindings}
        before = self._learned.get(neighbor, {})
        self.stats.withdrawn += len(before.keys() - fresh.keys())
        if bindings_of(before) != bindings_of(fresh):
            self._changed()
        self._learned[neighbor] = fresh

    def forget(self, server: int) -> None:
        """A server said goodbye (or died where we could see it): its tree ends here."""
        if self._egress.pop(server, None) is not None:
            self._changed()

    def expire(self, now: float) -> None:
        for server in [s for s, e in self._egress.items() if e.expires <= now]:
            del self._egress[server]
            self._changed()
        for table in self._learned.values():
            lapsed = [fec for fec, (_, expires) in table.items() if expires <= now]
            for fec in lapsed:
                del table[fec]
            self.stats.withdrawn += len(lapsed)
            if lapsed:
                self._changed()

    def next_expiry(self) -> float | None:
        times = [e.expires for e in self._egress.values()]
        times += [expires for table in self._learned.values() for _, expires in table.values()]
        return min(times, default=None)

    # -- where packets go ----------------------------------------------------------------
    def toward(self, server: int) -> Hop | None:
        """The next hop of `server`'s tree from here (None: no tree through us now); the
        same `Hop` object until something changes (`on_change`)."""
        try:
            return self._hops[server]
        except KeyError:
            pass
        found: Hop | None = None
        egress = self._egress.get(server)
        if egress is not None:
            found = Hop(egress.iface, server, None)
        else:
            hop = self.route(server)
            learned = None if hop is None else self._learned.get(hop[1], {}).get(server)
            if hop is not None and learned is not None:
                found = Hop(hop[0], hop[1], learned[0])
        if len(self._hops) >= _HOPS_CACHED:
            self._hops.clear()  # asked of many addresses: stay bounded
        self._hops[server] = found
        return found

    def switch(self, label: int) -> Hop | None:
        """Where a packet arriving with our local `label` goes (None: not ours, or the
        tree broke: the packet is dropped)."""
        server = self._fec_of.get(label)
        return None if server is None else self.toward(server)

    def label_for(self, server: int) -> int | None:
        """Our local label for `server`'s tree, if we have a path for it."""
        return self._label_of.get(server) if self.toward(server) is not None else None

    def servers(self) -> set[int]:
        """Every server we have heard of, with a path or not."""
        known = set(self._egress)
        for table in self._learned.values():
            known.update(table)
        return known

    def bindings(self) -> tuple[tuple[int, int], ...]:
        """What we tell our neighbours: (server, our label) for every server we can
        reach now, sorted. Binding a label on first use keeps labels sticky."""
        out: list[tuple[int, int]] = []
        for server in sorted(self.servers()):
            if self.toward(server) is None:
                continue
            label = self._label_of.get(server)
            if label is None:
                label = self._label_of[server] = self._next_label
                self._fec_of[label] = server
                self._next_label += 1
            out.append((server, label))
        return tuple(out)

    def _changed(self) -> None:
        """Where some packets go may have changed."""
        self._dirty = True
        self._hops.clear()
        if self.on_change is not None:
            self.on_change()

    def changed(self) -> bool:
        """Whether our bindings differ from what we last advertised (then they are
        taken as advertised)."""
        if not self._dirty:
            return False
        self._dirty = False
        now = self.bindings()
        if now == self._advertised:
            return False
        self._advertised = now
        return True


def bindings_of(table: dict[int, tuple[int, float]]) -> dict[int, int]:
    return {fec: label for fec, (label, _) in table.items()}
