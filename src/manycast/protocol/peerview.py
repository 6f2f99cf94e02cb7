"""A server's view of its peers: who they are, what state each holds, who is alive
and who coordinates (the part of `coordination.Coordinator` that reads its peers).

With heartbeats a peer is alive while heard within the timeout. With the gossip
membership (`swim.py`) a peer is alive while the detector does not hold it dead; a
peer the detector has not heard of yet counts while the allocation holds it (a
newcomer learns the pool from the allocation), or within its first timeout.

What is derived from the view (the live set, the dead peers' addresses) is cached
until the view changes: a member's status, a peer's state, the allocation, our own
state. The time alone changes it only for a peer judged by when it was last heard,
and only such peers make the cache wait out the configured members' grace and our
own stalls. The coordinator is the first live ACTIVE peer in name order (or us), so
finding it looks at one or two peers, not all.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from manycast import policy
from manycast.protocol.falsealarm import FalseAlarms
from manycast.protocol.poolstate import PoolSettings
from manycast.protocol.swim import SwimDetector
from manycast.wire import control
from manycast.wire.control import ServerState

NO_DIGEST = "0" * 16
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
NO_ADDRESS = ipaddress.IPv4Address(0)  # a peer's, until heard from


@dataclass
class Peer:
    name: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    last_seen: float
    state: ServerState
    epoch: int
    digest: str
    load: float = 0.0
    sessions: int = 0
    # False for a configured member presumed alive (`last_seen` ahead of the clock)
    # until it is first heard: from then on it is judged by when it was heard.
    heard: bool = True


class PeerView:
    """The peers as heard, and the liveness, coordinator and newer states read from
    them; `Coordinator` builds on it."""

    # Set by the coordinator: the pool's settings, its state (epoch, allocation and
    # shares) and our own.
    settings: PoolSettings
    apportionment: policy.Apportionment | None
    # Heartbeats' removals that were undone at once, and the timeout they stretch.
    false_alarms: FalseAlarms
    epoch: int
    state: ServerState

    def __init__(self, name: str, observer: bool) -> None:
        self.name = name
        self.observer = observer
        self.peers: dict[str, Peer] = {}
        self._started = 0.0
        self._stalled_until = 0.0
        # The gossip membership (`membership = "swim"`), made at start; and what is
        # derived from it, cached until a member's status or state changes.
        self.swim: SwimDetector | None = None
        self._states_changed = 0
        self._installs = 0  # states installed: the allocation the live set is read against
        self._ordered: list[str] = []  # the peers' names in order (`coordinator`)
        # Peers whose state was greater than ours when last heard: where `_behind` looks.
        self._ahead: set[str] = set()
        # Peers the gossip membership may not hold (pruned as it hears of them).
        self._outside: set[str] = set()
        self._cached: dict[str, tuple[tuple[int, int, int, ServerState], object]] = {}

    @property
    def digest(self) -> str:
        """The state's digest: the allocation and the shares."""
        return self.apportionment.digest() if self.apportionment is not None else NO_DIGEST

    @property
    def view(self) -> tuple[int, str]:
        return (self.epoch, self.digest)

    def _limit(self, now: float) -> float:
        """Peers heard from since this time are alive. After we ourselves stalled
        (our timer fired late: a busy host), their heartbeats may still be queued
        unread, so nobody is judged until a full timeout has passed again."""
        if now < self._stalled_until:
            return float("-inf")
        return now - self.timeout(now)

    def timeout(self, now: float) -> float:
        """How long a peer judged by when it was heard may be silent: `dead_after`,
        stretched after our false removals (`falsealarm.py`; heartbeats only)."""
        if self.swim is not None:
            return self.settings.dead_after
        return self.false_alarms.timeout(now)

    def _peer_alive(self, peer: Peer, limit: float) -> bool:
        """Heard within the timeout; with the gossip membership, not declared dead. A
        member we have not heard from yet (a newcomer learns the pool from the probes
        it gets) counts while the allocation holds it, or within its first timeout."""
        swim = self.swim
        if swim is None:
            return peer.last_seen >= limit
        if peer.name in swim.members:
            return swim.alive(peer.name)
        state = self.apportionment  # its shares name the allocation's servers (a dict)
        return (state is not None and peer.name in state.weights) or peer.last_seen >= limit

    def _cache_key(self) -> tuple[int, int, int, ServerState] | None:
        """What the live set depends on besides the time: the gossip membership, the
        peers' states, the allocation and our own state (None: no gossip membership)."""
        swim = self.swim
        if swim is None:
            return None
        return (swim.generation, self._states_changed, self._installs, self.state)

    def _timeless(self, key: tuple[int, int, int, ServerState], now: float) -> bool:
        """Whether what is derived under `key` holds whatever the time: past every
        configured member's grace and our own stalls, or with no peer whose liveness
        hangs on when it was heard (each is a gossip member or in the allocation)."""
        if now >= self._stalled_until and now >= self._started + self._grace:
            return True
        cached = self._cached.get("timeless")
        if cached is None or cached[0] != key:
            swim, state = self.swim, self.apportionment
            assert swim is not None
            servers = state.weights if state is not None else {}
            timeless = all(name in swim.members or name in servers for name in self.peers)
            cached = self._cached["timeless"] = (key, timeless)
        return bool(cached[1])

    @property
    def _grace(self) -> float:
        return max(self.settings.dead_after, self.settings.startup_grace)

    def _derived(self, what: str, now: float, compute: Callable[[], object]) -> object:
        key = self._cache_key()
        if key is None:
            return compute()
        cached = self._cached.get(what)
        if cached is not None and cached[0] == key and self._timeless(key, now):
            return cached[1]
        value = compute()
        self._cached[what] = (key, value)
        return value

    def alive(self, now: float) -> list[str]:
        def compute() -> tuple[str, ...]:
            limit = self._limit(now)
            me = [] if self.observer else [self.name]
            return tuple(
                sorted(me + [p.name for p in self.peers.values() if self._peer_alive(p, limit)])
            )

        return list(cast(tuple[str, ...], self._derived("alive", now, compute)))

    def holds_alive(self, name: str, now: float) -> bool:
        """Whether our view counts the peer `name` alive now (one peer: O(1))."""
        if name == self.name:
            return not self.observer
        peer = self.peers.get(name)
        return peer is not None and self._peer_alive(peer, self._limit(now))

    def held_dead(self, name: str, now: float) -> bool:
        """Whether `name` is a peer our view does not count alive now (a name we have
        never heard of, such as a router's, is not one)."""
        peer = self.peers.get(name)
        return peer is not None and not self._peer_alive(peer, self._limit(now))

    def dead_addresses(self, now: float) -> set[Address]:
        """Unicast addresses of the peers we have stopped hearing from."""

        def compute() -> set[Address]:
            swim, peers = self.swim, self.peers
            limit = self._limit(now)
            if swim is None:
                dead = [p for p in peers.values() if not self._peer_alive(p, limit)]
            else:
                # Asked again whenever a member's status moves: the gossip membership's
                # dead (kept as they die), and of the peers it has not heard of (fewer
                # and fewer), those not alive; not a pass over every peer.
                # (A peer it has not heard of is alive while the allocation holds it:
                # a newcomer's are mostly those.)
                self._outside.difference_update(swim.members.keys())
                state = self.apportionment
                judged = self._outside.difference(state.weights if state is not None else ())
                dead = [peers[n] for n in swim.dead if n in peers]
                dead += [p for n in judged if not self._peer_alive(p := peers[n], limit)]
            return {p.address for p in dead}

        return cast(set[Address], self._derived("dead", now, compute))

    def coordinator(self, now: float) -> str | None:
        """The smallest id among the live ACTIVE servers (us included): the first such
        peer in name order, usually the first one looked at."""
        me = self.name if self.state == ServerState.ACTIVE and not self.observer else None
        limit = self._limit(now)
        for name in self._ordered:
            if me is not None and name > me:
                return me
            peer = self.peers[name]
            if peer.state == ServerState.ACTIVE and self._peer_alive(peer, limit):
                return name
        return me

    def is_coordinator(self, now: float) -> bool:
        return self.coordinator(now) == self.name

    def _update_peer(
        self,
        name: str,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address,
        state: ServerState,
        now: float,
        view: tuple[int, str, float, int] | None,
    ) -> None:
        peer = self.peers.get(name)
        if peer is None:
            peer = self._add_peer(Peer(name, address, now, state, 0, NO_DIGEST))
        elif peer.state != state:
            peer.state = state
            self._states_changed += 1
        if int(address):
            peer.address = address
        peer.last_seen = max(peer.last_seen, now) if peer.heard else now
        peer.heard = True
        if view is not None:
            peer.epoch, peer.digest, peer.load, peer.sessions = view
            self._note_view(peer)
        if self.false_alarms.remembering:
            self.false_alarms.heard(name, now, peer.epoch)

    def _add_peer(self, peer: Peer) -> Peer:
        self.peers[peer.name] = peer
        self._outside.add(peer.name)
        bisect.insort(self._ordered, peer.name)
        self._states_changed += 1
        return peer

    def _note_view(self, peer: Peer) -> None:
        if (peer.epoch, peer.digest) > self.view:
            self._ahead.add(peer.name)

    def _on_heartbeat(self, hb: control.Heartbeat, now: float) -> None:
        peer = self.peers.get(hb.sender)
        if peer is None:
            peer = self._add_peer(Peer(hb.sender, hb.address, now, hb.state, hb.epoch, hb.digest))
        peer.address, peer.state = hb.address, hb.state
        peer.last_seen = max(peer.last_seen, now) if peer.heard else now
        peer.heard = True
        peer.epoch, peer.digest, peer.load, peer.sessions = (
            hb.epoch,
            hb.digest,
            hb.load,
            hb.sessions,
        )
        self._note_view(peer)
        if self.false_alarms.remembering:
            self.false_alarms.heard(hb.sender, now, hb.epoch)

    def _heard_state(self, name: str, view: tuple[int, str]) -> None:
        """`name` holds `view` (a proposal's base, a commit): newer than we knew of it?"""
        peer = self.peers.get(name)
        if peer is not None and view > (peer.epoch, peer.digest):
            peer.epoch, peer.digest = view
            self._note_view(peer)
