"""A deterministic in-memory network on a virtual clock (the SimPy model).

One heap of events ordered by (time, sequence number): frame deliveries, node
deadlines and scheduled callbacks. Loss is drawn from a `random.Random` seeded
by the caller, so the same seed gives the same run, event for event.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from manycast.drivers.links import LinkSpec
from manycast.protocol.node import Node

_DELIVER, _TIMER, _CALL = 0, 1, 2


@dataclass
class LinkCounters:
    sent: int = 0
    delivered: int = 0
    lost: int = 0


@dataclass
class MemoryNetwork:
    """Hosts nodes on links; `run_until(t)` advances the virtual clock to `t`."""

    links: dict[str, LinkSpec]
    seed: int = 0
    now: float = 0.0
    nodes: dict[str, Node] = field(default_factory=dict)
    counters: dict[str, LinkCounters] = field(default_factory=dict)
    events_processed: int = 0
    _heap: list[tuple[float, int, int, Any]] = field(default_factory=list, repr=False)
    _seq: int = 0
    _armed: dict[str, float] = field(default_factory=dict, repr=False)
    _rng: random.Random = field(init=False, repr=False)
    # (node, iface) -> link name, for every attachment
    _link_of: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)

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
        self._after_call(node)

    def kill(self, name: str) -> Node:
        """Stop a node at once, as a crash would: nothing more is sent or delivered."""
        node = self.nodes.pop(name)
        self._armed.pop(name, None)
        return node

    def call_at(self, at: float, callback: Callable[[], None]) -> None:
        """Run `callback` at virtual time `at` (scenario steps, measurements)."""
        self._push(max(at, self.now), _CALL, callback)

    # the clock ------------------------------------------------------------
    def run_until(self, until: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= until:
            at, _, kind, payload = heapq.heappop(heap)
            self.now = at
            self.events_processed += 1
            if kind == _DELIVER:
                name, iface, packet = payload
                node = self.nodes.get(name)
                if node is not None:
                    node.receive(iface, packet, at)
                    self._after_call(node)
            elif kind == _TIMER:
                name = payload
                node = self.nodes.get(name)
                if node is not None and self._armed.get(name) == at:
                    del self._armed[name]
                    node.on_timer(at)
                    self._after_call(node)
            else:
                payload()
                for node in list(self.nodes.values()):
                    self._after_call(node)
        self.now = max(self.now, until)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # internals ----------------------------------------------------------
    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, payload))

    def _after_call(self, node: Node) -> None:
        """Put the node's frames on its links and re-arm its deadline."""
        for frame in node.take_frames():
            link_name = self._link_of.get((node.name, frame.iface))
            if link_name is None:
                raise ValueError(f"{node.name} sent on {frame.iface}, which is on no link")
            link = self.links[link_name]
            counters = self.counters[link_name]
            for member in link.receivers(node.name, frame.next_hop):
                counters.sent += 1
                if link.loss and self._rng.random() < link.loss:
                    counters.lost += 1
                    continue
                counters.delivered += 1
                self._push(
                    self.now + link.delay, _DELIVER, (member.node, member.iface, frame.packet)
                )
        deadline = node.next_deadline()
        if deadline is not None and self._armed.get(node.name) != deadline:
            deadline = max(deadline, self.now)
            self._armed[node.name] = deadline
            self._push(deadline, _TIMER, node.name)
