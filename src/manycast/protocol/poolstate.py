"""The pool's agreed state and how it changes: what every server is configured with
(`PoolSettings`), the state it starts from, and each proposed operation applied to it.

The state is an `Apportionment`: the allocation and the share each server should
hold. Operations go through its methods, so the shares are kept exactly rather than
read back from the held buckets: after any sequence of changes every server holds
its share to within one bucket, and each change moves only the surplus buckets.
Everything here is deterministic, so every server computes the same state.
`members_op` makes the one change that removes (or adds) several servers at once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from manycast import policy
from manycast.space import AddressSpace, Allocation
from manycast.wire import control

# Bytes of server ids one change removing and adding servers carries (each id and its
# length byte): some 170 of our names, well within a datagram with the proposal.
MEMBERS_OP_BYTES = 1024


@dataclass(frozen=True)
class PoolSettings:
    """What every server of a pool is configured with."""

    group: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    control_group: ipaddress.IPv4Address | ipaddress.IPv6Address
    control_port: int
    space: AddressSpace
    members: tuple[str, ...]
    # The configured members' unicast addresses (those known): with the gossip
    # membership they start knowing each other, instead of learning each other from
    # every member's announcement to every other (N^2 deliveries at the start).
    member_addresses: Mapping[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = field(
        default_factory=dict
    )
    policy: str = "equal"
    # "manycast" (Fig 9-16) or "vip" (Fig 17-19: `group` is then the VIP, a unicast
    # address every server accepts as its own)
    approach: str = "manycast"
    portions: int = 30
    weights: Mapping[str, float] = field(default_factory=dict)
    technique: str = "R1"
    close_after_transaction: bool = False
    heartbeat_s: float = 0.1
    heartbeat_misses: int = 3
    # "heartbeat": every server hears every other each `heartbeat_s`; "swim": servers
    # probe each other (`swim.py`), a constant load per server at any size
    membership: str = "heartbeat"
    report_interval_s: float = 1.0
    wall_base: float = 1.7e9
    # Seconds a configured member not yet heard from counts alive after we start (at
    # least `dead_after`): servers started together do not start at the same instant
    # (a Python process takes a second or two to start on a busy host), and one heard
    # a little late must not be removed while the pool forms.
    startup_grace: float = 1.0
    # The closed loop (Fig 10, step 1020): rebalance when max/mean load stays above
    # `rebalance_above` for `rebalance_sustain` heartbeats (0 turns it off), aiming at
    # `rebalance_target`, then hold off for `rebalance_hold` seconds.
    rebalance_above: float = 0.0
    rebalance_target: float = 1.1
    rebalance_sustain: int = 3
    rebalance_hold_s: float = 3.0
    load_smoothing: float = 1.0  # seconds: time constant of the load average
    # A dual-stack pool: the IPv6 group and space beside `group` and `space` (one
    # allocation over both: the spaces have as many buckets), and every server's
    # IPv6 address (for member-down notices to the IPv6 routers).
    group6: ipaddress.IPv6Address | None = None
    space6: AddressSpace | None = None
    member_addresses6: Mapping[str, ipaddress.IPv6Address] = field(default_factory=dict)

    @property
    def vip(self) -> bool:
        return self.approach == "vip"

    @property
    def dead_after(self) -> float:
        return self.heartbeat_s * self.heartbeat_misses


def initial_allocation(settings: PoolSettings) -> Allocation:
    """The allocation every configured member computes at start (epoch 1)."""
    members = sorted(settings.members)
    if settings.policy == "weighted":
        return policy.weighted_split(
            settings.space, {m: settings.weights.get(m, 1.0) for m in members}
        )
    if settings.policy == "striped":
        return policy.striped(settings.space, members, max(settings.portions, len(members)))
    return policy.equal_split(settings.space, members)


def initial_apportionment(settings: PoolSettings) -> policy.Apportionment:
    """The state every configured member computes at start (epoch 1): the initial
    allocation and the shares the configuration asks for."""
    allocation = initial_allocation(settings)
    members = sorted(settings.members)
    if settings.policy == "striped":
        # A striped cut sizes its portions by the cut, not by a share asked of each
        # server: the shares are what it gives them.
        return policy.Apportionment.held(allocation)
    if settings.policy == "weighted":
        wanted: dict[str, policy.Weight] = {m: settings.weights.get(m, 1.0) for m in members}
    else:
        wanted = dict.fromkeys(members, 1)
    return policy.Apportionment(allocation, policy.apportion(policy.SCALE, wanted))


def starting_state(
    settings: PoolSettings, initial: Allocation | policy.Apportionment | None
) -> policy.Apportionment | None:
    """The state a server starts from: `initial` when it is one; the configured shares
    when `initial` is the configured initial allocation; else what it holds."""
    if initial is None or isinstance(initial, policy.Apportionment):
        return initial
    if initial.servers == tuple(sorted(settings.members)):
        configured = initial_apportionment(settings)
        if configured.allocation == initial:
            return configured
    # An allocation from elsewhere comes without the shares its servers should hold:
    # start from the shares they hold.
    return policy.Apportionment.held(initial)


def apply_op(state: policy.Apportionment, op: control.PolicyOp) -> policy.Apportionment:
    """The pool's state (allocation and shares) after `op`, through the Apportionment,
    so the shares are kept and not read back from the held buckets;
    policy.PolicyError if it does not apply."""
    if isinstance(op, control.AddServerOp):
        return state.add_server(op.server, op.share)
    if isinstance(op, control.RemoveServerOp):
        return state.remove_server(op.server)
    if isinstance(op, control.SetShareOp):
        return state.set_share(op.server, op.share)
    if isinstance(op, control.MembersOp):
        for server in op.removed:
            state = state.remove_server(server)
        for server in op.added:
            state = state.add_server(server, None)
        return state
    if isinstance(op, control.BalanceLoadsOp):
        return state.balance_loads(dict(op.loads), op.target, dict(op.hot))
    if isinstance(op, control.RebalanceOp):
        load = np.zeros(state.allocation.space.buckets)
        for bucket, value in op.loads:
            if 0 <= bucket < load.size:
                load[bucket] = value
        return state.rebalance(load, op.target)
    raise policy.PolicyError(f"{type(op).__name__} cannot be proposed")


def members_op(removed: list[str], added: list[str]) -> control.PolicyOp:
    """One change that removes `removed` and adds `added` (sorted), as many of them as
    one proposal carries (`MEMBERS_OP_BYTES`; the rest wait for the next change). A
    single server is the plain `RemoveServerOp` or `AddServerOp`."""
    if len(removed) + len(added) == 1:
        return control.RemoveServerOp(removed[0]) if removed else control.AddServerOp(added[0])
    size = 0
    taken: tuple[list[str], list[str]] = ([], [])
    for chosen, names in zip(taken, (removed, added), strict=True):
        for name in names:
            size += 1 + len(name.encode())
            if size > MEMBERS_OP_BYTES:
                break
            chosen.append(name)
    return control.MembersOp(tuple(taken[0]), tuple(taken[1]))


def describe_op(op: control.PolicyOp) -> str:
    if isinstance(op, control.MembersOp):
        said = [
            f"{verb} {', '.join(names)}"
            for verb, names in (("remove", op.removed), ("add", op.added))
            if names
        ]
        return "; ".join(said) or "the same state again"
    if isinstance(op, control.AddServerOp):
        return f"add {op.server}"
    if isinstance(op, control.RemoveServerOp):
        return f"remove {op.server}"
    if isinstance(op, control.SetShareOp):
        return f"set {op.server} to {float(op.share):.1%}"
    if isinstance(op, control.RebalanceOp | control.BalanceLoadsOp):
        return f"rebalance to max/mean {op.target}"
    return type(op).__name__


__all__ = [
    "MEMBERS_OP_BYTES",
    "PoolSettings",
    "apply_op",
    "describe_op",
    "initial_allocation",
    "initial_apportionment",
    "members_op",
    "starting_state",
]
