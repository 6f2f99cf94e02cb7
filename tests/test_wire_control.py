"""Control channel codecs: round trips, strictness under fuzzing, snapshot parts."""

from __future__ import annotations

import dataclasses
import itertools
import random
import struct
from fractions import Fraction
from ipaddress import IPv4Address, IPv6Address
from typing import Literal, get_args

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from manycast import policy
from manycast.space import SHARE_SCALE, AddressSpace, Allocation, held_weights, shares_digest
from manycast.wire import WireError, control
from manycast.wire.control import (
    MAX_BUCKET_LOADS,
    Ack,
    AddServerOp,
    BucketLoad,
    Command,
    Commit,
    ConnectionKey,
    ControlMessage,
    Forwarded,
    Heartbeat,
    MembersOp,
    MessageType,
    PolicyOp,
    Proposal,
    RebalanceOp,
    Redirect,
    RemoveServerOp,
    ReplaceOp,
    Run,
    ServerState,
    SetShareOp,
    Snapshot,
    SnapshotRequest,
    SnapshotState,
    StateQuery,
    StateReply,
    assemble,
    decode,
    decode_op,
    encode,
    encode_op,
    snapshot_parts,
)
from manycast.wire.control.envelope import registered_types

# --- strategies -------------------------------------------------------------------------

LONGEST_IDS = ["a" * 64, "é" * 32, "𝄞" * 16, "服务器" * 7 + "x"]
ids = st.one_of(
    st.text(min_size=1, max_size=64).filter(lambda s: len(s.encode()) <= 64),
    st.sampled_from(LONGEST_IDS),
)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
digests = st.binary(min_size=8, max_size=8).map(bytes.hex)
addresses = st.ip_addresses()
loads = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
shares = st.fractions(min_value=0, max_value=1, max_denominator=0xFFFFFFFF)


@st.composite
def keys(draw: st.DrawFn) -> ConnectionKey:
    version: Literal[4, 6] = draw(st.sampled_from([4, 6]))
    return ConnectionKey(
        draw(st.ip_addresses(v=version)),
        draw(u16),
        draw(st.ip_addresses(v=version)),
        draw(u16),
    )


@st.composite
def bucket_loads(draw: st.DrawFn) -> tuple[BucketLoad, ...]:
    buckets = sorted(draw(st.sets(u32, max_size=40)))
    return tuple(BucketLoad(b, draw(loads)) for b in buckets)


@st.composite
def members_ops(draw: st.DrawFn) -> MembersOp:
    names = draw(st.sets(ids, max_size=12))  # none: the same state again
    removed = draw(st.sets(st.sampled_from(sorted(names)))) if names else set()
    added = names - removed
    return MembersOp(tuple(sorted(removed)), tuple(sorted(added)))


ops: st.SearchStrategy[PolicyOp] = st.one_of(
    st.builds(AddServerOp, ids, st.none() | shares),
    st.builds(RemoveServerOp, ids),
    st.builds(SetShareOp, ids, shares),
    st.builds(
        RebalanceOp,
        st.floats(min_value=1.0, allow_nan=False, allow_infinity=False),
        bucket_loads(),
    ),
    st.builds(ReplaceOp, u64, digests),
    members_ops(),
)


@st.composite
def spaces(draw: st.DrawFn) -> AddressSpace:
    family: Literal[4, 6] = draw(st.sampled_from([4, 6]))
    width = 32 if family == 4 else 128
    bits = draw(st.integers(1, 12))
    length = draw(st.integers(0, width - bits))
    index: Literal["low", "high"] = draw(st.sampled_from(["low", "high"]))
    host_bits = width - length
    base = int(draw(st.ip_addresses(v=family))) >> host_bits << host_bits
    network = IPv4Address(base) if family == 4 else IPv6Address(base)
    return AddressSpace.create(f"{network}/{length}", bits, index)


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    space = draw(spaces())
    servers = tuple(sorted(draw(st.sets(ids, min_size=1, max_size=8))))
    shares = tuple(
        draw(st.one_of(st.integers(0, SHARE_SCALE), st.sampled_from([0, SHARE_SCALE])))
        for _ in servers
    )
    cuts = sorted(draw(st.sets(st.integers(0, space.buckets), min_size=2, max_size=12)))
    runs = tuple(
        Run(a, b, draw(st.integers(0, len(servers) - 1)))
        for a, b in itertools.pairwise(cuts)
        if draw(st.booleans())
    )
    count = draw(st.integers(1, 0xFFFF))
    return Snapshot(
        draw(ids),
        draw(u32),
        draw(u64),
        draw(digests),
        draw(st.integers(0, count - 1)),
        count,
        space,
        servers,
        shares,
        runs,
    )


@st.composite
def proposals(draw: st.DrawFn) -> Proposal:
    base = draw(st.integers(0, (1 << 64) - 2))
    epoch = draw(st.integers(base + 1, (1 << 64) - 1))
    return Proposal(
        draw(ids), draw(u32), epoch, base, draw(digests), draw(digests), draw(u32), draw(ops)
    )


@st.composite
def stateful_replies(draw: st.DrawFn) -> StateReply:
    found = draw(st.booleans())
    blobs = st.binary(max_size=64) if found else st.just(b"")
    held = False if found else draw(st.booleans())
    return StateReply(
        draw(ids), draw(u32), draw(u64), draw(keys()), found, draw(blobs), draw(blobs), held
    )


packets = st.tuples(st.sampled_from([0x45, 0x60, 0x4F, 0x6A]), st.binary(max_size=200)).map(
    lambda t: bytes([t[0]]) + t[1]
)

messages: st.SearchStrategy[ControlMessage] = st.one_of(
    st.builds(
        Heartbeat,
        ids,
        u32,
        u64,
        digests,
        st.sampled_from(ServerState),
        addresses,
        loads,
        u32,
        st.integers(1, 0xFFFFFFFF),
    ),
    st.builds(Command, ids, u32, u64, ops),
    proposals(),
    st.builds(Ack, ids, u32, u64, digests),
    st.builds(Commit, ids, u32, u64, digests),
    st.builds(SnapshotRequest, ids, u32, u64),
    snapshots(),
    st.builds(Forwarded, ids, u32, addresses, packets),
    st.builds(Redirect, ids, u32, addresses, u16, u16, addresses, u16),
    st.builds(StateQuery, ids, u32, u64, keys()),
    stateful_replies(),
    st.builds(
        control.Probe,
        ids,
        u32,
        st.sampled_from(control.ProbeKind),
        u32,
        ids,
        addresses,
        u64,
        u64,
        u64,
        digests,
        st.sampled_from(ServerState),
        addresses,
        loads,
        u32,
    ),
    st.builds(
        control.MemberNotice,
        ids,
        u32,
        st.sampled_from(control.MemberStatus),
        ids,
        addresses,
        u64,
        st.sampled_from(ServerState),
    ),
)


def decodes_strictly(data: bytes) -> None:
    """Decoding either fails with WireError or yields a message that re-encodes to `data`."""
    try:
        message = decode(data)
    except WireError:
        return
    assert encode(message) == data


# --- round trips ------------------------------------------------------------------------


@given(messages)
def test_round_trip(message: ControlMessage) -> None:
    data = message.to_wire()
    assert data[:2] == b"MC" and data[2] == 1 and data[3] == message.TYPE
    decoded = decode(data)
    assert decoded == message
    assert type(decoded) is type(message)
    assert decoded.to_wire() == data
    assert type(message).from_wire(data) == message


@given(ops)
def test_op_round_trip(op: PolicyOp) -> None:
    data = encode_op(op)
    assert decode_op(data) == op
    assert type(op).from_wire(data) == op
    assert decode_op(data).to_wire() == data


@pytest.mark.parametrize("sender", LONGEST_IDS)
def test_longest_sender_ids(sender: str) -> None:
    assert len(sender.encode()) == 64
    message = Commit(sender, 7, 1, "00" * 8)
    assert decode(message.to_wire()).sender == sender
    with pytest.raises(WireError, match=r"not 1\.\.64"):
        Commit(sender + "a", 7, 1, "00" * 8)


def test_heartbeat_layout_is_byte_exact() -> None:
    message = Heartbeat(
        "s1", 5, 3, "0123456789abcdef", ServerState.ACTIVE, IPv4Address("10.0.0.1"), 1.5, 7, 1000
    )
    assert message.to_wire() == (
        b"MC\x01\x01"
        + b"\x02s1"
        + (5).to_bytes(4, "big")
        + (3).to_bytes(8, "big")
        + bytes.fromhex("0123456789abcdef")
        + b"\x02"
        + b"\x04\x0a\x00\x00\x01"
        + struct.pack("!d", 1.5)
        + (7).to_bytes(4, "big")
        + (1000).to_bytes(4, "big")
    )


def test_type_numbers() -> None:
    assert {m.name: int(m) for m in MessageType} == {
        "HEARTBEAT": 1,
        "COMMAND": 2,
        "PROPOSAL": 3,
        "ACK": 4,
        "COMMIT": 5,
        "SNAPSHOT_REQUEST": 6,
        "SNAPSHOT": 7,
        "FORWARDED": 8,
        "REDIRECT": 9,
        "STATE_QUERY": 10,
        "STATE_REPLY": 11,
        "SERVER_HELLO": 14,
        "LABEL_MAPPING": 15,
        "FLOW_TAG": 16,
        "FLOW_UNTAG": 17,
        "VIP_ADVERT": 18,
        "LOAD_REPORT": 19,
        "MOVE_CONNECTION": 20,
        "MOVE_ACK": 21,
        "MEMBER_DOWN": 22,
        "PROBE": 23,
        "MEMBER_NOTICE": 24,
    }


@pytest.mark.parametrize("retired", [12, 13])
def test_retired_pin_types_are_refused(retired: int) -> None:
    # R4's per-hop PinRequest and Unpin: R4 now tags connections onto label trees.
    with pytest.raises(WireError, match="control message type"):
        decode(b"MC\x01" + bytes([retired]) + b"\x02s1\x00\x00\x00\x00\x00\x00")


def test_friendly_inputs_are_normalised() -> None:
    op = RebalanceOp(1.5, [(1, 2.0), (3, 0)])  # type: ignore[arg-type]
    assert op.loads == (BucketLoad(1, 2.0), BucketLoad(3, 0))
    assert decode_op(op.to_wire()) == op
    assert SetShareOp("s", 1).share == Fraction(1)  # type: ignore[arg-type]
    forwarded = Forwarded("s", 1, IPv4Address("10.0.0.2"), bytearray(b"\x45\x00"))  # type: ignore[arg-type]
    assert forwarded.packet == b"\x45\x00"


# --- fuzzing ----------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    decodes_strictly(data)


@given(st.integers(1, 16), st.binary(max_size=300))
def test_random_bodies(kind: int, body: bytes) -> None:
    decodes_strictly(b"MC\x01" + bytes([kind, 2]) + b"s1" + body)


@given(st.binary(max_size=100))
def test_random_ops(data: bytes) -> None:
    try:
        op = decode_op(data)
    except WireError:
        return
    assert encode_op(op) == data


@given(messages)
def test_every_truncation_fails(message: ControlMessage) -> None:
    data = message.to_wire()
    for end in range(len(data)):
        with pytest.raises(WireError):
            decode(data[:end])
    with pytest.raises(WireError, match="trailing"):
        decode(data + b"\x00")


@given(messages, st.data())
def test_bit_flips(message: ControlMessage, data: st.DataObject) -> None:
    raw = message.to_wire()
    positions = list(range(len(raw) * 8))
    if len(positions) > 256:
        positions = data.draw(st.lists(st.sampled_from(positions), max_size=256))
    for bit in positions:
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        decodes_strictly(bytes(flipped))


def _commit_bytes(**changes: bytes) -> bytes:
    parts = {
        "magic": b"MC",
        "version": b"\x01",
        "type": bytes([MessageType.COMMIT]),
        "sender": b"\x02s1",
        "seq": b"\x00\x00\x00\x01",
        "body": b"\x00" * 7 + b"\x01" + b"\xab" * 8,
    }
    parts.update(changes)
    return b"".join(parts.values())


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_commit_bytes(magic=b"MX"), "bad magic"),
        (_commit_bytes(version=b"\x02"), "version 2"),
        (_commit_bytes(type=b"\x63"), "unknown control message type 99"),
        (_commit_bytes(sender=b"\x00"), "sender length 0"),
        (_commit_bytes(sender=b"\x41" + b"a" * 65), "sender length 65"),
        (_commit_bytes(sender=b"\x02\xc3\x28"), "not valid UTF-8"),
        (_commit_bytes(body=b"\x00" * 15), "truncated"),
        (_commit_bytes(body=b"\x00" * 17), "trailing"),
        (b"", "truncated"),
    ],
)
def test_envelope_errors(data: bytes, error: str) -> None:
    assert decode(_commit_bytes()) == Commit("s1", 1, 1, "ab" * 8)
    with pytest.raises(WireError, match=error):
        decode(data)


def _op_bytes(kind: int, *fields: bytes) -> bytes:
    return bytes([kind]) + b"".join(fields)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_op_bytes(9), "unknown policy op kind 9"),
        (_op_bytes(3, b"\x01s", struct.pack("!II", 1, 0)), "denominator is zero"),
        (_op_bytes(3, b"\x01s", struct.pack("!II", 3, 2)), "not between 0 and 1"),
        (_op_bytes(3, b"\x01s", struct.pack("!II", 2, 4)), "lowest terms"),
        (_op_bytes(3, b"\x01s", struct.pack("!II", 0, 2)), "lowest terms"),
        (_op_bytes(1, b"\x01s", b"\x02"), "0 or 1"),
        (_op_bytes(4, struct.pack("!d", 0.5), b"\x00\x00"), "at least 1.0"),
        (_op_bytes(4, struct.pack("!d", float("nan")), b"\x00\x00"), "finite"),
        (_op_bytes(4, struct.pack("!dH", 1.0, 2), b"\x00" * 12), "need at least 24"),
        (_op_bytes(4, struct.pack("!dH", 1.0, MAX_BUCKET_LOADS + 1)), "at most 1024"),
        (
            _op_bytes(4, struct.pack("!dHIdId", 1.0, 2, 5, 1.0, 5, 1.0)),
            "increasing order",
        ),
        (
            _op_bytes(4, struct.pack("!dHId", 1.0, 1, 5, float("-inf"))),
            "finite",
        ),
        (_op_bytes(7, b"\x00\x02\x01t\x01s\x00\x00"), "once each, in order"),
        (_op_bytes(7, b"\x00\x02\x01s\x01s\x00\x00"), "once each, in order"),
        (_op_bytes(7, b"\x00\x01\x01s\x00\x01\x01s"), "both removed and added"),
        (_op_bytes(7, b"\x04\x01"), "at most 1024"),
    ],
)
def test_op_errors(data: bytes, error: str) -> None:
    with pytest.raises(WireError, match=error):
        decode_op(data)


def _message(kind: MessageType, body: bytes) -> bytes:
    return b"MC\x01" + bytes([kind]) + b"\x02s1\x00\x00\x00\x00" + body


V4 = b"\x04\x0a\x00\x00\x01"
DIGEST = b"\x01" * 8


Z4 = b"\x00" * 4


def _reply_head(outcome: bytes) -> bytes:
    """A StateReply's body up to its outcome byte: query id, key, `outcome`."""
    return b"\x00" * 8 + V4 + b"\x00\x01" + V4 + b"\x00\x02" + outcome


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (_message(MessageType.REDIRECT, b"\x05" + b"\x00" * 20), "family 5"),
        (
            _message(
                MessageType.HEARTBEAT,
                b"\x00" * 8 + DIGEST + b"\x04" + V4 + b"\x00" * 16,
            ),
            "unknown server state 4",
        ),
        (
            _message(
                MessageType.HEARTBEAT,
                b"\x00" * 8 + DIGEST + b"\x02" + V4 + struct.pack("!dII", 1.0, 0, 0),
            ),
            "interval_ms 0",
        ),
        (
            _message(
                MessageType.HEARTBEAT,
                b"\x00" * 8 + DIGEST + b"\x02" + V4 + struct.pack("!dII", -1.0, 0, 10),
            ),
            "load",
        ),
        (_message(MessageType.FORWARDED, V4 + b"\x00\x00"), "packet of 0 bytes"),
        (_message(MessageType.FORWARDED, V4 + b"\x00\x01\x20"), "not IPv4 or IPv6"),
        (
            _message(
                MessageType.PROPOSAL,
                struct.pack("!QQ", 5, 5) + DIGEST * 2 + b"\x00" * 4 + b"\x02\x01a",
            ),
            "does not follow base",
        ),
        (
            _message(
                MessageType.STATE_REPLY,
                b"\x00" * 8 + V4 + b"\x00\x01" + b"\x06" + b"\x00" * 16 + b"\x00\x02",
            ),
            "mix families",
        ),
        (
            _message(MessageType.STATE_REPLY, _reply_head(b"\x00") + b"\x00\x00\x00\x01x" + Z4),
            "not found",
        ),
        (
            _message(MessageType.STATE_REPLY, _reply_head(b"\x02") + b"\x00\x00\x00\x01x" + Z4),
            "not found",
        ),
        (
            _message(
                MessageType.STATE_REPLY,
                _reply_head(b"\x03") + Z4 + Z4,
            ),
            "outcome must be 0, 1 or 2, not 3",
        ),
        (
            _message(
                MessageType.STATE_REPLY,
                b"\x00" * 8 + V4 + b"\x00\x01" + V4 + b"\x00\x02" + b"\x01" + b"\xff\xff\xff\xff",
            ),
            "truncated",
        ),
    ],
)
def test_message_errors(data: bytes, error: str) -> None:
    with pytest.raises(WireError, match=error):
        decode(data)


def test_from_wire_checks_the_type() -> None:
    data = Ack("s1", 1, 2, "00" * 8).to_wire()
    assert Ack.from_wire(data).epoch == 2
    with pytest.raises(WireError, match="expected a Commit, got a Ack"):
        Commit.from_wire(data)


def test_every_message_type_decodes_and_the_package_exports_the_old_names() -> None:
    # Each message module registers its classes with the one decoder.
    assert registered_types() == set(MessageType)
    assert get_args(ControlMessage) and {cls.TYPE for cls in get_args(ControlMessage)} == set(
        MessageType
    )
    # `control` was one module: every name it had is still there.
    for name in control.__all__:
        assert getattr(control, name) is not None
    assert control.SetShareOp("s", Fraction(1, 5)).to_wire() == encode_op(
        SetShareOp("s", Fraction(1, 5))
    )
    assert {"BalanceLoadsOp", "ServerLoad", "Address", "MAX_PACKET"} <= set(control.__all__)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Commit("", 1, 1, "00" * 8),
        lambda: Commit("s", 1 << 32, 1, "00" * 8),
        lambda: Commit("s", -1, 1, "00" * 8),
        lambda: Commit("s", True, 1, "00" * 8),
        lambda: Commit("s", 1, 1, "00" * 7),
        lambda: Commit("s", 1, 1, "0123456789ABCDEF"),
        lambda: Commit("\udc80", 1, 1, "00" * 8),
        lambda: SetShareOp("s", Fraction(1, 1 << 33)),
        lambda: SetShareOp("s", 0.5),  # type: ignore[arg-type]
        lambda: AddServerOp("s", Fraction(-1, 2)),
        lambda: Redirect("s", 1, "10.0.0.1", 1, 2, IPv4Address("10.0.0.2"), 3),  # type: ignore[arg-type]
        lambda: Redirect("s", 1, IPv4Address("10.0.0.1"), 1 << 16, 2, IPv4Address("10.0.0.2"), 3),
        lambda: RebalanceOp(2.0, tuple(BucketLoad(i, 1.0) for i in range(MAX_BUCKET_LOADS + 1))),
        lambda: RebalanceOp(2.0, (5,)),  # type: ignore[arg-type]
        lambda: Command("s", 1, 1, "add s2"),  # type: ignore[arg-type]
    ],
)
def test_constructors_validate(build: object) -> None:
    assert callable(build)
    with pytest.raises(WireError):
        build()


# --- snapshots --------------------------------------------------------------------------

SPACE = AddressSpace.create("10.0.0.0/8", bits=16)


@pytest.fixture(scope="module")
def thousand() -> Allocation:
    return policy.equal_split(SPACE, [f"server-{i:04d}" for i in range(1000)])


@pytest.fixture(scope="module")
def fragmented() -> Allocation:
    rng = random.Random(7)
    alloc = policy.equal_split(SPACE, [f"s{i}" for i in range(40)])
    for _ in range(150):
        server = rng.choice(alloc.servers)
        alloc = policy.set_share(alloc, server, Fraction(rng.randrange(0, 3000), 100_000))
    assert len(list(alloc.runs())) > 1000
    return alloc


@pytest.fixture(scope="module")
def kept() -> policy.Apportionment:
    """Shares kept beside an allocation, none of them what its servers hold."""
    rng = random.Random(3)
    state = policy.Apportionment.split(SPACE, {f"s{i}": 1 for i in range(30)})
    for _ in range(60):
        server = rng.choice(state.allocation.servers)
        state = state.set_share(server, Fraction(rng.randrange(1, 3000), 100_000))
    assert state.weights != held_weights(state.allocation)
    return state


def _round_trip(parts: list[Snapshot]) -> SnapshotState:
    return assemble(decode(p.to_wire()) for p in parts)  # type: ignore[misc]


@pytest.mark.parametrize("which", ["thousand", "fragmented"])
@pytest.mark.parametrize("max_bytes", [1400, 300])
def test_snapshot_parts_round_trip(
    which: str, max_bytes: int, request: pytest.FixtureRequest
) -> None:
    alloc: Allocation = request.getfixturevalue(which)
    parts = snapshot_parts(42, alloc, max_bytes, sender="é" * 32, seq=0xFFFFFFFE)
    assert len(parts) > 1
    assert all(len(p.to_wire()) <= max_bytes for p in parts)
    assert [p.part for p in parts] == list(range(len(parts)))
    assert {p.count for p in parts} == {len(parts)}
    assert [p.seq for p in parts[:3]] == [0xFFFFFFFE, 0xFFFFFFFF, 0]
    # Without shares given, the shares carried are what the servers hold.
    assert _round_trip(parts) == (alloc, held_weights(alloc))
    shuffled = parts[:]
    random.Random(1).shuffle(shuffled)
    assert assemble(shuffled) == (alloc, held_weights(alloc))


@pytest.mark.parametrize("max_bytes", [1400, 200])
def test_snapshot_carries_the_kept_shares(kept: policy.Apportionment, max_bytes: int) -> None:
    parts = snapshot_parts(5, kept.allocation, max_bytes, sender="s", weights=kept.weights)
    assert all(len(p.to_wire()) <= max_bytes for p in parts)
    assert {p.digest for p in parts} == {kept.digest()}
    carried = _round_trip(parts)
    assert carried.allocation == kept.allocation
    assert carried.weights == kept.weights
    # The digest covers the shares: the same buckets with the shares they hold differ.
    held = snapshot_parts(5, kept.allocation, max_bytes, sender="s")
    assert held[0].digest != parts[0].digest
    assert held[0].digest == policy.Apportionment.held(kept.allocation).digest()


def test_snapshot_shares_must_agree_and_cover_the_space(kept: policy.Apportionment) -> None:
    parts = snapshot_parts(5, kept.allocation, 200, sender="s", weights=kept.weights)
    first, second = parts[0], next(p for p in parts[1:] if set(p.servers) & set(parts[0].servers))
    name = sorted(set(first.servers) & set(second.servers))[0]
    index = second.servers.index(name)
    other = list(second.shares)
    other[index] += 1
    changed = dataclasses.replace(second, shares=tuple(other))
    with pytest.raises(WireError, match=f"parts give {name} shares"):
        assemble([p if p is not second else changed for p in parts])
    bumped = [dataclasses.replace(p, shares=tuple(v + 1 for v in p.shares)) for p in parts]
    with pytest.raises(WireError, match="shares add up to"):
        assemble(bumped)
    with pytest.raises(WireError, match=r"share \d+ out of range"):
        dataclasses.replace(first, shares=(SHARE_SCALE + 1, *first.shares[1:]))
    with pytest.raises(WireError, match="shares for"):
        dataclasses.replace(first, shares=first.shares[1:])
    with pytest.raises(ValueError, match="add up to"):
        snapshot_parts(5, kept.allocation, sender="s", weights={**kept.weights, "s0": 0})
    with pytest.raises(ValueError, match="exactly the allocation's servers"):
        snapshot_parts(5, kept.allocation, sender="s", weights={"x": SHARE_SCALE})


def test_a_share_beyond_the_space_does_not_decode() -> None:
    alloc = policy.equal_split(AddressSpace.create("10.0.0.0/8", bits=4), ["a"])
    (part,) = snapshot_parts(1, alloc, sender="s")
    assert part.shares == (SHARE_SCALE,)
    data = bytearray(part.to_wire())
    share_at = data.index(b"\x01a") + 2
    assert data[share_at : share_at + 9] == SHARE_SCALE.to_bytes(9, "big")
    data[share_at + 8] = 1  # 2**64 + 1
    with pytest.raises(WireError, match="share 18446744073709551617 out of range"):
        decode(bytes(data))


def test_shares_digest_covers_the_shares() -> None:
    alloc = policy.equal_split(SPACE, ["a", "b", "c"])
    held = held_weights(alloc)
    other = {"a": held["a"] + 1, "b": held["b"] - 1, "c": held["c"]}
    assert shares_digest(alloc, held) == shares_digest(alloc, dict(held))
    assert shares_digest(alloc, held) != shares_digest(alloc, other)
    assert shares_digest(alloc, held) != alloc.digest()


def test_snapshot_keeps_idle_servers_and_ipv6() -> None:
    space = AddressSpace.create("2001:db8::/32", bits=10, index="high")
    state = policy.Apportionment.split(space, {"a": 1, "b": 0, "c": 2, "d": 0})
    parts = snapshot_parts(1, state.allocation, 120, sender="s", weights=state.weights)
    assert state.allocation.servers == ("a", "b", "c", "d")
    assert _round_trip(parts) == (state.allocation, state.weights)


def test_single_part_allocation() -> None:
    alloc = policy.equal_split(SPACE, ["a", "b"])
    (part,) = snapshot_parts(3, alloc, sender="s")
    assert part.count == 1 and part.servers == ("a", "b")
    assert part.shares == (SHARE_SCALE // 2, SHARE_SCALE // 2)
    assert assemble([part]).allocation == alloc


def test_missing_duplicated_and_wrong_parts(fragmented: Allocation) -> None:
    parts = snapshot_parts(9, fragmented, sender="s")
    with pytest.raises(WireError, match=r"1 of \d+ parts missing: 3"):
        assemble(parts[:3] + parts[4:])
    with pytest.raises(WireError, match=r"parts \[2\] given more than once"):
        assemble([*parts, parts[2]])
    with pytest.raises(WireError, match="no parts"):
        assemble([])
    wrong = [dataclasses.replace(p, digest="0" * 16) for p in parts]
    with pytest.raises(WireError, match="hash to"):
        assemble(wrong)
    with pytest.raises(WireError, match="epoch"):
        assemble([*parts[:-1], dataclasses.replace(parts[-1], epoch=10)])
    other_space = AddressSpace.create("10.0.0.0/8", bits=16, index="high")
    with pytest.raises(WireError, match="another address space"):
        assemble([*parts[:-1], dataclasses.replace(parts[-1], space=other_space)])


def test_runs_must_cover_exactly_once() -> None:
    space = AddressSpace.create("10.0.0.0/8", bits=4)

    half = SHARE_SCALE // 2

    def part(index: int, runs: tuple[Run, ...]) -> Snapshot:
        return Snapshot("s", 0, 1, "00" * 8, index, 2, space, ("a", "b"), (half, half), runs)

    with pytest.raises(WireError, match="overlap at bucket 6"):
        assemble([part(0, (Run(0, 8, 0),)), part(1, (Run(6, 16, 1),))])
    with pytest.raises(WireError, match="leave a gap at bucket 8"):
        assemble([part(0, (Run(0, 8, 0),)), part(1, (Run(9, 16, 1),))])
    with pytest.raises(WireError, match="cover 8 of 16"):
        assemble([part(0, (Run(0, 8, 0),)), part(1, ())])
    with pytest.raises(WireError, match="in order"):
        part(0, (Run(8, 16, 0), Run(0, 8, 1)))
    with pytest.raises(WireError, match="run stop 17"):
        part(0, (Run(0, 17, 0),))
    with pytest.raises(WireError, match="run server 2"):
        part(0, (Run(0, 16, 2),))
    with pytest.raises(WireError, match="sorted and distinct"):
        Snapshot("s", 0, 1, "00" * 8, 0, 1, space, ("b", "a"), (half, half), ())


def test_snapshot_space_errors() -> None:
    alloc = policy.equal_split(AddressSpace.create("10.0.0.0/8", bits=4), ["a"])
    data = bytearray(snapshot_parts(1, alloc, sender="s")[0].to_wire())
    space_at = data.index(b"\x04\x0a\x00\x00\x00\x08")
    bad_prefix = bytearray(data)
    bad_prefix[space_at + 3] = 1  # a host bit set below the /8
    with pytest.raises(WireError, match="bad address space"):
        decode(bytes(bad_prefix))
    too_long = bytearray(data)
    too_long[space_at + 5] = 33
    with pytest.raises(WireError, match="prefix length 33"):
        decode(bytes(too_long))
    bad_flag = bytearray(data)
    bad_flag[space_at + 8] = 2
    with pytest.raises(WireError, match="interleave flag"):
        decode(bytes(bad_flag))


def test_max_bytes_too_small(thousand: Allocation) -> None:
    with pytest.raises(ValueError, match="cannot hold one run"):
        snapshot_parts(1, thousand, 60, sender="s")


@given(snapshots())
@example(
    Snapshot(
        "𝄞" * 16,
        0,
        0,
        "ff" * 8,
        0xFFFE,
        0xFFFF,
        AddressSpace.create("::/0", 24),
        ("a",),
        (SHARE_SCALE,),
        (),
    )
)
def test_snapshot_message_round_trip(part: Snapshot) -> None:
    assert decode(part.to_wire()) == part


def test_a_nack_round_trips_and_an_unknown_probe_kind_is_refused() -> None:
    """NACK (kind 4): an indirect probe's helper telling its asker that the target did
    not answer it either; kind 5 is nothing yet."""
    nack = control.Probe(
        "s2",
        7,
        control.ProbeKind.NACK,
        0xDEADBEEF,
        "s3",
        IPv4Address("10.0.0.3"),
        0,
        1_700_000_000_000,
        4,
        "ab" * 8,
        ServerState.ACTIVE,
        IPv4Address("10.0.0.2"),
        0.5,
        12,
    )
    data = nack.to_wire()
    assert decode(data) == nack
    kind_at = data.index(bytes([control.ProbeKind.NACK]) + (0xDEADBEEF).to_bytes(4, "big"))
    bad = data[:kind_at] + b"\x05" + data[kind_at + 1 :]
    with pytest.raises(WireError, match="unknown probe kind 5"):
        decode(bad)
