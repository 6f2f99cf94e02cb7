"""Fuzzing the dynamic destination (Fig 20-21): its decoders and a live client's handling.

The contract of every wire decoder (DESIGN.md): on any input it returns a value
that re-encodes to the same bytes, or raises `WireError`, nothing else. Here for
the change-destination message and technique D's control messages. Then a live
client gets thousands of change-destination segments built to be wrong in every
way (mutated fields and bytes, other keys, garbage): it never raises, never
moves its connection, counts each one under one reason, and goes on being served.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections import Counter
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from manycast.auth import public_bytes
from manycast.pool import pool_keys
from manycast.protocol.destination import DestinationGuard, Verdict, sign_change
from manycast.protocol.refusal import RedirectRefusal
from manycast.wire import control
from manycast.wire.control import ConnectionKey, MoveAck, MoveConnection, decode
from manycast.wire.errors import WireError
from manycast.wire.transport import ChangeDestination
from pooltools import assert_all_served_since, run_to
from pooltools import start as start_traced
from test_dynamic_destination import ATTACKERS, d_pool, hijack_segment, inject, remote
from test_techniques import CLEAN, outcome

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
change_destinations = st.builds(
    ChangeDestination,
    tag=u32,
    cookie=u64,
    address=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    port=u16,
    serial=u32,
    timestamp_ms=u64,
    signature=st.binary(max_size=80),
)


@st.composite
def connection_keys(draw: st.DrawFn) -> ConnectionKey:
    version = draw(st.sampled_from([4, 6]))
    return ConnectionKey(
        draw(st.ip_addresses(v=version)), draw(u16), draw(st.ip_addresses(v=version)), draw(u16)
    )


ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
moves = st.builds(
    MoveConnection,
    ids,
    u32,
    st.ip_addresses(),
    u64,
    connection_keys(),
    st.integers(1, 0xFFFFFFFF),
    st.binary(min_size=1, max_size=200),
    st.binary(max_size=60),
)
acks = st.builds(MoveAck, ids, u32, connection_keys(), st.integers(1, 0xFFFFFFFF))


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Stacked mutations: bit flips, insertions, deletions, truncation, boundary bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out.insert(rng.randint(0, len(out)), rng.randrange(256))
        elif kind == 2 and out:
            del out[rng.randrange(len(out))]
        elif kind == 3:
            del out[rng.randint(0, len(out)) :]
        elif kind == 4 and out:
            i = rng.randrange(len(out))
            out[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        else:
            out += rng.randbytes(rng.randint(1, 16))
    return bytes(out)


def strictly(decoder: Any, data: bytes) -> None:
    try:
        value = decoder(data)
    except WireError:
        return
    assert value.to_wire() == data


# -- the decoders -------------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_change_destination_decoder_on_random_bytes(data: bytes) -> None:
    strictly(ChangeDestination.from_wire, data)


@settings(max_examples=300)
@given(change_destinations, st.integers(0, 2**32))
def test_change_destination_decoder_on_mutated_messages(
    message: ChangeDestination, seed: int
) -> None:
    assert ChangeDestination.from_wire(message.to_wire()) == message
    rng = random.Random(seed)
    for _ in range(20):
        strictly(ChangeDestination.from_wire, mutate(message.to_wire(), rng))


@given(st.one_of(moves, acks))
def test_move_messages_round_trip(message: MoveConnection | MoveAck) -> None:
    assert decode(message.to_wire()) == message
    assert type(message).from_wire(message.to_wire()) == message


@settings(max_examples=300)
@given(st.one_of(moves, acks), st.integers(0, 2**32))
def test_move_messages_decoder_on_mutated_messages(
    message: MoveConnection | MoveAck, seed: int
) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        strictly(decode, mutate(message.to_wire(), rng))


@given(st.sampled_from([20, 21]), st.binary(max_size=120))
def test_move_messages_decoder_on_random_bodies(kind: int, body: bytes) -> None:
    strictly(decode, b"MC\x01" + bytes([kind]) + b"\x02s1" + bytes(4) + body)


def test_move_messages_refuse_what_cannot_be_built() -> None:
    key = ConnectionKey(ipaddress.IPv4Address("10.0.0.1"), 1, ipaddress.IPv4Address("10.0.0.2"), 2)
    origin = ipaddress.IPv4Address("10.0.0.2")
    for bad in (
        lambda: MoveConnection("s", 0, origin, 2, key, 0, b"x"),  # serial 0: never a move
        lambda: MoveConnection("s", 0, origin, 2, key, 1, b""),  # no state
        lambda: MoveConnection("s", 0, origin, -1, key, 1, b"x"),  # no such epoch
        lambda: MoveAck("s", 0, key, 0),
        lambda: MoveConnection("s", 0, origin, 2, "key", 1, b"x"),  # type: ignore[arg-type]
    ):
        try:
            bad()
        except WireError:
            continue
        raise AssertionError("built a message that cannot be decoded")
    assert control.MessageType.MOVE_CONNECTION == 20 and control.MessageType.MOVE_ACK == 21


# -- the guard: nothing but the pool's signature moves a connection ----------------------

POOL_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@settings(max_examples=300)
@given(change_destinations, st.booleans())
def test_the_guard_accepts_nothing_the_pool_did_not_sign(
    message: ChangeDestination, other_key: bool
) -> None:
    guard = DestinationGuard(wall_base=message.timestamp_ms / 1000)
    guard.provide_key(public_bytes(POOL_KEY), 300.0, 0.0, None)
    if other_key:
        message = sign_change(message, Ed25519PrivateKey.from_private_bytes(bytes(32)))
    remote = ipaddress.ip_address("10.0.0.1" if message.address.version == 4 else "2001:db8::1")
    verdict = guard.check(message, remote, 0.0)
    assert verdict is not Verdict.ACCEPT and verdict is not Verdict.WAIT
    assert isinstance(verdict, RedirectRefusal) and sum(guard.stats.refused.values()) == 1
    signed = sign_change(message, POOL_KEY)
    valid = (
        signed.serial > 0
        and not signed.address.is_multicast
        and not signed.address.is_unspecified
        and signed.address.version == remote.version
        and signed.address != ipaddress.ip_address("255.255.255.255")
    )
    assert (guard.check(signed, remote, 0.0) is Verdict.ACCEPT) == valid


# -- a live client under a storm of bad change-destinations -------------------------------


def random_address(
    rng: random.Random, family: int
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == 4:
        return ipaddress.IPv4Address(rng.getrandbits(32))
    return ipaddress.IPv6Address(rng.getrandbits(128))


def storm(
    client: Any, key: Ed25519PrivateKey, wall_ms: int, rng: random.Random, family: int
) -> list[Any]:
    """Change-destination payloads a client must refuse, each wrong in some way."""
    conn = client.endpoint.connection(client.conn_key)
    base = ChangeDestination(conn.tag, conn.cookie, ATTACKERS[family], 7000, 1, wall_ms)
    other = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    fields = dataclasses.replace
    out: list[Any] = []
    for _ in range(200):
        kind = rng.randrange(6)
        if kind == 0:  # mutated bytes of a message the pool signed
            wire = sign_change(fields(base, serial=rng.randrange(1, 100)), key).to_wire()
            mutated = mutate(wire, rng)
            out.append(mutated if mutated != wire else mutated + b"\x00")
        elif kind == 1:  # random fields, signed with another key
            message = ChangeDestination(
                rng.choice((conn.tag, rng.getrandbits(32))),
                rng.choice((conn.cookie, rng.getrandbits(64))),
                random_address(rng, family),
                rng.getrandbits(16),
                rng.getrandbits(32),
                rng.choice((wall_ms, rng.getrandbits(64))),
            )
            out.append(sign_change(message, other))
        elif kind == 2:  # random signature bytes
            out.append(fields(base, signature=rng.randbytes(rng.choice((1, 63, 64, 65)))))
        elif kind == 3:  # garbage
            out.append(rng.randbytes(rng.randint(0, 80)))
        elif kind == 4:  # the pool's signature, but too old or too new
            shift = rng.choice((-1, 1)) * rng.randint(31_000, 10**9)
            out.append(sign_change(fields(base, timestamp_ms=max(0, wall_ms + shift)), key))
        else:  # the pool's signature over another connection's tag or cookie
            out.append(
                sign_change(fields(base, cookie=conn.cookie ^ (rng.getrandbits(64) | 1)), key)
            )
    return out


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_a_client_refuses_a_storm_of_bad_change_destinations_and_goes_on(family: int) -> None:
    run, _ = start_traced(d_pool(clients=4, family=family))
    run_to(run, 2.0)
    key, _ = pool_keys(run.topology, 1)
    rng = random.Random(20)
    wall = run.network.wall_base
    for client in run.nodes.clients.values():
        before = client.conn_key
        server = remote(client)[0]
        payloads = storm(client, key, int((wall + run.now) * 1000), rng, family)
        for index, payload in enumerate(payloads):
            source = rng.choice((server, ATTACKERS[family], random_address(rng, family)))
            inject(run, client, source, hijack_segment(client, payload, rng.choice((0, 0, 1, -1))))
            assert client.conn_key == before, index
        refused: Counter[RedirectRefusal] = client.stats.redirects_refused
        assert sum(refused.values()) == len(payloads), refused
        assert client.stats.destination_changes == 0
    at = run.now
    run_to(run, at + 1.5)
    assert outcome(run) == CLEAN
    assert_all_served_since(run, at + 0.5)
