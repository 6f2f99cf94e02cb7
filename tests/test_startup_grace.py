"""A pool's configured servers do not start at the same instant: one heard a little
late (its process slower to start on a busy host) is not removed while the pool
forms (`[pool] startup_grace_ms`), one never heard is removed once the grace is
over, and one heard and then silent is judged by its silence as before."""

from __future__ import annotations

import dataclasses
import ipaddress
import random

from manycast.protocol.coordination import Coordinator, PoolSettings, initial_apportionment
from manycast.space import AddressSpace
from manycast.topology import loads
from manycast.wire import control
from manycast.wire.control import ServerState
from pooltools import pool_toml

SETTINGS = PoolSettings(
    group=ipaddress.IPv4Address("232.1.1.1"),
    port=7000,
    control_group=ipaddress.IPv4Address("239.255.77.1"),
    control_port=7946,
    space=AddressSpace.create("10.0.0.0/8", bits=8),
    members=("s1", "s2", "s3"),
    heartbeat_s=0.1,
    heartbeat_misses=3,  # dead after 0.3 s of silence
    startup_grace=1.0,
)
STEP = 0.01


def heartbeat(sender: str, seq: int, digest: str) -> control.Heartbeat:
    address = ipaddress.IPv4Address(f"192.0.2.{sender[1:]}")
    return control.Heartbeat(sender, seq, 1, digest, ServerState.ACTIVE, address, 0.0, 0, 100)


def first_removal(
    settings: PoolSettings, heard: dict[str, tuple[float, float]], until: float = 2.0
) -> tuple[float, control.PolicyOp] | None:
    """Run s1 (the coordinator: smallest id) on the virtual clock, hearing each peer's
    heartbeats every 0.1 s from its first to its last time; the first change it
    proposes, and when."""
    s1 = Coordinator(
        "s1",
        ipaddress.IPv4Address("192.0.2.1"),
        settings,
        random.Random(1),
        initial=initial_apportionment(settings),
    )
    s1.start(0.0)
    digest, seq = s1.digest, 0
    for tick in range(int(until / STEP) + 1):
        now = tick * STEP
        for peer, (since, last) in heard.items():
            if since <= now <= last and tick % 10 == 0:
                seq += 1
                s1.on_message(heartbeat(peer, seq, digest), now)
        if (deadline := s1.next_deadline()) is not None and deadline <= now:
            s1.on_timer(now)
        for message in s1.take_messages():
            if isinstance(message, control.Proposal):
                return now, message.op
    return None


def test_a_server_first_heard_at_0_8_s_is_kept_while_the_pool_forms() -> None:
    heard = {"s2": (0.0, 9.0), "s3": (0.8, 9.0)}
    assert first_removal(SETTINGS, heard) is None
    # Without the grace (one timeout, as before), s3 was removed before it was heard:
    early = first_removal(dataclasses.replace(SETTINGS, startup_grace=0.3), heard)
    assert early is not None and early[0] < 0.8
    assert "s3" in str(early[1])


def test_a_server_never_heard_is_removed_once_the_grace_is_over() -> None:
    removal = first_removal(SETTINGS, {"s2": (0.0, 9.0)})
    assert removal is not None
    at, op = removal
    assert 1.0 <= at <= 1.1
    assert "s3" in str(op) and "s2" not in str(op)


def test_a_server_heard_then_silent_is_judged_by_its_silence_not_the_grace() -> None:
    removal = first_removal(SETTINGS, {"s2": (0.0, 0.2), "s3": (0.0, 9.0)})
    assert removal is not None
    at, op = removal
    assert 0.5 <= at <= 0.6  # last heard at 0.2 s, dead 0.3 s later
    assert "s2" in str(op)


def test_the_grace_is_read_from_the_topology() -> None:
    topology = loads(pool_toml(pool={"startup_grace_ms": 2500}))
    assert topology.pool.startup_grace == 2.5
    assert loads(pool_toml()).pool.startup_grace == 1.0
