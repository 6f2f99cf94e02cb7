"""A deterministic in-memory network on a virtual clock (the SimPy model).

One heap of events ordered by (time, sequence number): frame deliveries, node
deadlines and scheduled callbacks. Loss is drawn from a `random.Random` seeded
by the caller and the wall-clock base is fixed, so the same seed gives the same
run, event for event and byte for byte (`trace` records it when asked).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from manycast.drivers.contract import EffectHandler
from manycast.drivers.links import Attachment, LinkCounters, LinkSpec
from manycast.protocol.node import Frame, Node

T = TypeVar("T")
_DELIVER, _TIMER, _CALL = 0, 1, 2
# The wall clock at virtual time 0 (late 2023): what signed joins and reports carry.
WALL_BASE = 1.7e9


@dataclass
class MemoryNetwork:
    """Hosts nodes on links; `run_until(t)` advances the virtual clock to `t`.

    With `trace` set to a list, every delivery and timer is appended to it as
    (time, kind, node, interface, packet), so two runs can be compared whole."""

    links: dict[str, LinkSpec]
    seed: int = 0
    now: float = 0.0
    wall_base: float = WALL_BASE
    realtime: bool = False  # the clock is virtual: a lookup may not take real time
    nodes: dict[str, Node] = field(default_factory=dict)
    counters: dict[str, LinkCounters] = field(default_factory=dict)
    events_processed: int = 0
    trace: list[tuple[float, str, str, str, bytes]] | None = None
    on_effect: EffectHandler | None = None
    # A capture sink (`observe.pcap.Capture`): (link, time, packet) of every frame sent.
    capture: Callable[[str, float, bytes], None] | None = None
    _heap: list[tuple[float, int, int, Any]] = field(default_factory=list, repr=False)
    _seq: int = 0
    _armed: dict[str, float] = field(default_factory=dict, repr=False)
    _rng: random.Random = field(init=False, repr=False)
    # (node, iface) -> link name, for every attachment
    _link_of: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    # (link, sender) -> the link's other members, where a frame for all of them goes
    _fanout: dict[tuple[str, str], list[Attachment]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        for link in self.links.values():
            self.counters[link.name] = LinkCounters()
            for member in link.members:
                self._link_of[(member.node, member.iface)] = link.name

    @classmethod
    def build(
        cls, links: Iterable[LinkSpec], nodes: Iterable[Node], seed: int = 0
    ) -> MemoryNetwork:
        net = cls({link.name: link for link in links}, seed=seed)
        for node in nodes:
            net.add(node)
        return net

    # hosting ------------------------------------------------------------
    def add(self, node: Node) -> None:
        """Bring a node up now (also used to add a server while running)."""
        if node.name in self.nodes:
            raise ValueError(f"node {node.name} is already running")
        self.nodes[node.name] = node
        node.start(self.now)
        self._carry_out(node)

    def kill(self, name: str) -> Node:
        """Stop a node at once, as a crash would: nothing more is sent or delivered."""
        node = self.nodes.pop(name)
        self._armed.pop(name, None)
        return node

    def call_at(self, at: float, callback: Callable[[], object]) -> None:
        """Run `callback` at virtual time `at` (scenario steps, measurements)."""
        self._push(max(at, self.now), _CALL, callback)

    def defer(self, work: Callable[[], T], then: Callable[[T], object]) -> None:
        """Run `work` at once (the virtual clock does not move meanwhile) and
        `then(result)` as the next event at this instant."""
        result = work()
        self.call_at(self.now, lambda: then(result))

    def close(self) -> None:
        """Nothing to release: the heap is dropped with the network."""

    # the clock ------------------------------------------------------------
    def run_until(self, until: float, condition: Callable[[], bool] | None = None) -> bool:
        heap = self._heap
        trace = self.trace
        nodes, armed, pop, carry_out = self.nodes, self._armed, heapq.heappop, self._carry_out
        while heap and heap[0][0] <= until:
            at, _, kind, payload = pop(heap)
            self.now = at
            self.events_processed += 1
            if kind == _DELIVER:
                name, iface, packet = payload
                node = nodes.get(name)
                if node is not None:
                    if trace is not None:
                        trace.append((at, "deliver", name, iface, packet))
                    node.receive(iface, packet, at)
                    carry_out(node)
            elif kind == _TIMER:
                name = payload
                node = nodes.get(name)
                if node is not None and armed.get(name) == at:
                    del armed[name]
                    if trace is not None:
                        trace.append((at, "timer", name, "", b""))
                    node.on_timer(at)
                    carry_out(node)
            else:
                payload()
                for node in list(self.nodes.values()):
                    self._carry_out(node)
            if condition is not None and condition():
                return True
        self.now = max(self.now, until)
        return condition is not None and condition()

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # internals ----------------------------------------------------------
    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, payload))

    def _carry_out(self, node: Node) -> None:
        """`contract.carry_out`, inlined: this runs after every event."""
        if node.outbox:
            for frame in node.take_frames():
                self._send(node, frame)
        if node.effects:
            on_effect = self.on_effect
            for effect in node.take_effects():
                if on_effect is not None:
                    on_effect(node, effect)
        self._arm(node, node.next_deadline())

    def _send(self, node: Node, frame: Frame) -> None:
        link_name = self._link_of.get((node.name, frame.iface))
        if link_name is None:
            raise ValueError(f"{node.name} sent on {frame.iface}, which is on no link")
        link = self.links[link_name]
        counters = self.counters[link_name]
        if self.capture is not None:
            self.capture(link_name, self.now, frame.packet)  # once per frame, as on a wire
        if frame.next_hop is None:
            # Every other member of the link: the same list for every frame the node
            # sends there, worked out once.
            receivers = self._fanout.get((link_name, node.name))
            if receivers is None:
                receivers = self._fanout[(link_name, node.name)] = link.receivers(node.name, None)
        else:
            receivers = link.receivers(node.name, frame.next_hop)
        at = self.now + link.delay
        heap, packet = self._heap, frame.packet
        for member in receivers:
            counters.sent += 1
            if link.loss and self._rng.random() < link.loss:
                counters.lost += 1
                continue
            counters.received += 1
            self._seq += 1
            heapq.heappush(heap, (at, self._seq, _DELIVER, (member.node, member.iface, packet)))

    def _arm(self, node: Node, deadline: float | None) -> None:
        if deadline is not None and self._armed.get(node.name) != deadline:
            deadline = max(deadline, self.now)
            self._armed[node.name] = deadline
            self._push(deadline, _TIMER, node.name)
