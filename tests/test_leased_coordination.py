"""The leased coordination (`[pool] coordination = "etcd"`) without etcd: the sans-I/O
state machine fed with what a store would say, the stored documents, and the topology
keys. The same machine against a real etcd cluster: test_etcd_coordination.py."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.errors import ConfigError
from manycast.protocol.coordination import COMMAND_PATIENCE, PoolSettings, initial_apportionment
from manycast.protocol.leased import LeasedCoordinator
from manycast.protocol.storestate import (
    Announce,
    Change,
    MemberRecord,
    Outcome,
    StoredState,
    StoreError,
    StoreView,
)
from manycast.runtime import PoolRun
from manycast.space import AddressSpace
from manycast.topology import TopologyError, loads
from manycast.wire import control
from pooltools import pool_toml

SPACE = AddressSpace.create("10.0.0.0/8", bits=8)
SETTINGS = PoolSettings(
    group=ipaddress.IPv4Address("232.1.1.1"),
    port=7000,
    control_group=ipaddress.IPv4Address("239.255.77.1"),
    control_port=7946,
    space=SPACE,
    members=("s1", "s2", "s3"),
)
LEASE = 2.0
START = initial_apportionment(SETTINGS)


def member(applied: int, index: int = 1) -> MemberRecord:
    return MemberRecord(ipaddress.IPv4Address(f"192.0.2.{index}"), applied)


def members(applied: dict[str, int]) -> dict[str, MemberRecord]:
    return {name: member(epoch, i + 1) for i, (name, epoch) in enumerate(sorted(applied.items()))}


def core(name: str = "s1") -> LeasedCoordinator:
    c = LeasedCoordinator(
        name,
        ipaddress.IPv4Address("192.0.2.1"),
        SETTINGS,
        random.Random(1),
        initial=START.allocation,
        lease_s=LEASE,
    )
    c.start(0.0)
    return c


def at_epoch(
    c: LeasedCoordinator, stored: StoredState, applied: dict[str, int], now: float
) -> None:
    c.on_store(StoreView(stored, members(applied)), now)
    c.on_timer(now)


def serves(c: LeasedCoordinator) -> int | None:
    """How many buckets the agent is handed to serve now (None: nothing new handed)."""
    allocation = c.take_new_allocation()
    if allocation is None:
        return None
    return allocation.count(c.name) if c.name in allocation.servers else 0


def run_until(c: LeasedCoordinator, until: float) -> None:
    """Fire the machine's timers up to `until`, as a driver would."""
    while (deadline := c.next_deadline()) is not None and deadline <= until:
        c.on_timer(deadline)


def changes(c: LeasedCoordinator) -> list[Change]:
    return [r for r in c.take_store_requests() if isinstance(r, Change)]


def test_the_first_server_writes_the_configured_state_and_all_serve_once_all_have_it() -> None:
    c = core("s1")
    c.on_lease(0.0 + LEASE, 0.01)
    c.on_store(StoreView(None, members({"s1": 0, "s2": 0, "s3": 0})), 0.01)
    [first] = changes(c)
    assert first.base_epoch == 0  # written only if the store holds no state yet
    assert first.stored.epoch == 1 and first.stored.state.digest() == START.digest()
    c.on_change_result(first.ident, Outcome.COMMITTED, 0.02)
    c.on_timer(0.02)
    # Epoch 1 is ours, but s2 and s3 have not said they keep within it yet.
    assert serves(c) == 0
    assert [r for r in c.take_store_requests() if isinstance(r, Announce)] == [
        Announce(MemberRecord(c.address, 1))
    ]
    at_epoch(c, first.stored, {"s2": 1, "s3": 1}, 0.03)
    assert serves(c) == START.allocation.count("s1") > 0


def test_a_server_stops_serving_before_its_lease_can_run_out_and_resumes_on_renewal() -> None:
    c = core("s1")
    stored = StoredState(1, START, "s2", "initial state")
    c.on_lease(0.0 + LEASE, 0.0)
    at_epoch(c, stored, {"s2": 1, "s3": 1}, 0.01)
    assert serves(c) == START.allocation.count("s1")
    # No renewal answered since the one sent at 0: fenced a guard time before 0 + LEASE,
    # when the store could expire the lease at the earliest.
    fence = LEASE - c.guard
    run_until(c, fence - 0.01)
    assert serves(c) is None and c.serving() == START.allocation.count("s1")
    run_until(c, fence)
    assert serves(c) == 0
    assert not c.lease_valid(fence) and c.alive(fence) == ["s2", "s3"]
    c.on_lease(fence + LEASE, fence + 0.1)  # renewed again (its lease had not expired)
    c.on_timer(fence + 0.1)
    assert serves(c) == START.allocation.count("s1")


def test_a_server_back_with_a_new_lease_takes_nothing_up_from_a_view_older_than_its_key() -> None:
    """Found by test_etcd_coordination's partition test (one run in about ten): s3, cut
    off from the quorum, fenced itself; its lease expired and the others took its
    buckets without waiting for it. Back, with a new lease, it still held its view from
    before the cut (epoch 1, everyone applied): it took its old buckets up again
    while s1 served them, until the fresh view arrived 20 ms later."""
    c = core("s3")
    stored = StoredState(1, START, "s1", "initial state")
    c.on_registered(5, 0.0)
    c.on_lease(LEASE, 0.0)
    c.on_store(StoreView(stored, members({"s1": 1, "s2": 1}), revision=6), 0.01)
    c.on_timer(0.01)
    assert serves(c) == START.allocation.count("s3") > 0
    run_until(c, LEASE)  # cut off: no renewal answered, so fenced
    assert serves(c) == 0
    c.on_lease_lost(3.0)  # the store expired the lease (the others removed s3 meanwhile)
    c.on_registered(40, 3.5)  # a new lease, our key written again at revision 40
    c.on_lease(3.5 + LEASE, 3.5)
    c.on_timer(3.5)
    assert c.serving() == 0 and serves(c) in (None, 0)  # the view of revision 6 decides nothing
    c.on_store(StoreView(stored, members({"s1": 1, "s2": 1}), revision=39), 3.51)
    c.on_timer(3.51)
    assert c.serving() == 0  # nor one read before our key was there
    c.on_store(StoreView(stored, members({"s1": 1, "s2": 1}), revision=40), 3.52)
    c.on_timer(3.52)
    assert serves(c) == START.allocation.count("s3")  # (a store still at epoch 1: ours again)


def test_buckets_taken_are_left_at_once_and_buckets_given_wait_for_their_last_owner() -> None:
    one = StoredState(1, START, "s1", "initial state")
    two = StoredState(2, START.set_share("s1", Fraction(1, 2)), "s1", "set s1")
    gainer, loser = core("s1"), core("s2")
    for c in (gainer, loser):
        c.on_lease(LEASE, 0.0)
        at_epoch(c, one, {"s1": 1, "s2": 1, "s3": 1}, 0.01)
        serves(c)
    # Epoch 2 gives s1 buckets of s2's and s3's. s2 leaves them at once...
    at_epoch(loser, two, {"s1": 1, "s3": 1}, 0.1)
    assert serves(loser) == two.state.allocation.count("s2") < START.allocation.count("s2")
    # ... s1 keeps what it had and waits for s2 and s3 to have applied epoch 2.
    at_epoch(gainer, two, {"s2": 2, "s3": 1}, 0.1)
    assert serves(gainer) is None or gainer.serving() == START.allocation.count("s1")
    at_epoch(gainer, two, {"s2": 2, "s3": 2}, 0.2)
    assert serves(gainer) == two.state.allocation.count("s1") == SPACE.buckets // 2


def test_a_member_that_has_moved_past_our_epoch_holds_our_gains_back() -> None:
    """A server that skipped ahead may hold what our (older) epoch gives us."""
    one = StoredState(1, START, "s1", "initial state")
    two = StoredState(2, START.set_share("s1", Fraction(1, 2)), "s1", "set s1")
    c = core("s1")
    c.on_lease(LEASE, 0.0)
    at_epoch(c, one, {"s1": 1, "s2": 1, "s3": 1}, 0.01)
    serves(c)
    at_epoch(c, two, {"s2": 3, "s3": 2}, 0.1)
    assert c.serving() == START.allocation.count("s1")


def test_the_coordinator_removes_a_server_whose_key_is_gone_and_adds_a_new_member() -> None:
    c = core("s1")
    stored = StoredState(1, START, "s1", "initial state")
    c.on_lease(LEASE, 0.0)
    at_epoch(c, stored, {"s2": 1, "s3": 1}, 0.01)
    assert c.is_coordinator(0.01)
    c.on_lease(1.0 + LEASE, 1.0)
    at_epoch(c, stored, {"s2": 1}, 1.0)  # s3's lease expired: its key is gone
    [remove] = changes(c)
    assert remove.base_epoch == 1 and remove.stored.state.allocation.servers == ("s1", "s2")
    assert remove.stored.why == "remove s3" and remove.stored.by == "s1"
    c.on_change_result(remove.ident, Outcome.COMMITTED, 1.01)
    at_epoch(c, remove.stored, {"s2": 2, "s4": 0}, 1.02)
    [add] = changes(c)
    assert add.base_epoch == 2 and "s4" in add.stored.state.allocation.servers


def test_a_server_never_seen_is_given_a_grace_time_before_it_is_removed() -> None:
    c = core("s1")
    stored = StoredState(1, START, "s1", "initial state")
    c.on_lease(LEASE, 0.0)
    at_epoch(c, stored, {"s2": 1}, 0.05)  # s3 is starting: not registered yet
    assert changes(c) == []
    c.on_lease(3 * LEASE, 2 * LEASE)
    at_epoch(c, stored, {"s2": 1}, 2 * LEASE)
    [remove] = changes(c)
    assert "s3" not in remove.stored.state.allocation.servers


def test_a_command_that_loses_the_race_is_tried_again_from_the_state_that_won() -> None:
    c = core("s2")
    one = StoredState(1, START, "s1", "initial state")
    c.on_lease(LEASE, 0.0)
    at_epoch(c, one, {"s1": 1, "s3": 1}, 0.01)
    c.command(control.SetShareOp("s2", Fraction(1, 2)), 0.1)
    [mine] = changes(c)
    assert mine.base_epoch == 1
    c.on_change_result(mine.ident, Outcome.CONFLICT, 0.11)
    other = StoredState(2, START.set_share("s3", Fraction(1, 4)), "s1", "set s3")
    at_epoch(c, other, {"s1": 2, "s3": 2}, 0.12)
    [again] = changes(c)
    assert again.base_epoch == 2
    weights = again.stored.state.weights
    assert Fraction(weights["s2"], sum(weights.values())) == Fraction(1, 2)
    before = other.state.weights
    # s3's change stays: the others keep their proportions when s2's share is set
    assert weights["s3"] / weights["s1"] == pytest.approx(before["s3"] / before["s1"])
    assert before["s3"] / before["s1"] != pytest.approx(1.0)


def test_without_a_live_lease_a_server_proposes_nothing_and_its_command_lapses() -> None:
    c = core("s2")
    one = StoredState(1, START, "s1", "initial state")
    c.on_lease(LEASE, 0.0)
    at_epoch(c, one, {"s1": 1, "s3": 1}, 0.01)
    later = LEASE + 1.0  # no renewal answered since 0: cut off from the store's quorum
    c.command(control.SetShareOp("s2", Fraction(1, 2)), later)
    c.on_timer(later)
    assert changes(c) == []
    c.on_timer(later + COMMAND_PATIENCE)
    assert changes(c) == [] and c.stats.rejected_ops == 1


# -- what the store holds ------------------------------------------------------------


def test_a_stored_state_reads_back_as_written() -> None:
    stored = StoredState(7, START.set_share("s2", Fraction(1, 5)), "s3", "set s2 to 20.0%")
    again = StoredState.decode(stored.encode(), SPACE)
    assert (again.epoch, again.by, again.why) == (7, "s3", "set s2 to 20.0%")
    assert again.state.allocation == stored.state.allocation
    assert dict(again.state.weights) == dict(stored.state.weights)
    for address in ("192.0.2.9", "2001:db8::9"):
        record = MemberRecord(ipaddress.ip_address(address), 4)
        assert MemberRecord.decode(record.encode()) == record


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(space="0.0.0.0/0 interleaved"), "over '0.0.0.0/0"),
        (lambda d: d.update(epoch=0), "'epoch' must be a whole number of at least 1"),
        (lambda d: d["runs"].pop(), "the runs cover"),
        (lambda d: d["runs"][0].__setitem__(2, 9), "does not continue"),
        (lambda d: d["weights"].update(s1=1), "shares"),
        (lambda d: d.update(servers="s1"), "'servers' must be a list"),
    ],
)
def test_a_stored_state_that_does_not_add_up_is_refused(change, message) -> None:  # type: ignore[no-untyped-def]
    document = json.loads(StoredState(1, START, "s1", "initial state").encode())
    change(document)
    with pytest.raises(StoreError, match=message):
        StoredState.decode(json.dumps(document).encode(), SPACE)
    with pytest.raises(StoreError, match="not JSON"):
        StoredState.decode(b"\xff{", SPACE)
    for address in (b'"nowhere"', b"3232235521", b'"10.1.1.1/24"'):
        with pytest.raises(StoreError, match="is not an IP address"):
            MemberRecord.decode(b'{"address": ' + address + b', "applied": 1}')


# -- the topology keys ---------------------------------------------------------------

ETCD = {"coordination": "etcd", "etcd": ["http://127.0.0.1:2379"]}


def test_an_etcd_pool_reads_its_keys_and_a_server_may_name_its_own_members() -> None:
    topology = loads(pool_toml(pool={**ETCD, "lease_s": 3}))
    assert str(topology.pool.coordination) == "etcd"
    assert topology.pool.etcd == ("http://127.0.0.1:2379",)
    assert topology.pool.lease_s == 3
    assert str(loads(pool_toml()).pool.coordination) == "channel"
    text = pool_toml(pool=ETCD).replace(
        'name = "s1"\n', 'name = "s1"\netcd = ["http://127.0.0.1:2479"]\n'
    )
    assert loads(text).servers["s1"].etcd == ("http://127.0.0.1:2479",)


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ({"coordination": "zookeeper"}, "coordination 'zookeeper': expected one of channel, etcd"),
        ({"coordination": "etcd"}, "needs 'etcd', the etcd cluster's client URLs"),
        ({"etcd": ["http://127.0.0.1:2379"]}, "'etcd' is for coordination = \"etcd\""),
        ({**ETCD, "etcd": ["127.0.0.1:2379"]}, "is not an http:// or https:// URL"),
        ({**ETCD, "etcd": []}, "at least one etcd client URL"),
        ({**ETCD, "lease_s": 1.5}, "etcd's leases are whole seconds"),
        ({**ETCD, "lease_s": 0}, "'lease_s' = 0.0 is outside"),
    ],
)
def test_bad_coordination_keys_are_refused_with_the_line(pool, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TopologyError, match=r"<topology>:\d+: .*" + re.escape(message)):
        loads(pool_toml(pool=pool))


def test_a_server_naming_etcd_members_in_a_channel_pool_is_refused() -> None:
    text = pool_toml().replace('name = "s1"\n', 'name = "s1"\netcd = ["http://127.0.0.1:2479"]\n')
    with pytest.raises(TopologyError, match="a server's 'etcd' is for"):
        loads(text)


def test_an_etcd_pool_on_the_virtual_clock_is_refused() -> None:
    with pytest.raises(ConfigError, match="runs on the overlay driver"):
        PoolRun(loads(pool_toml(pool=ETCD)), "memory")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.binary(max_size=64))
def test_any_bytes_read_as_a_state_or_member_fail_only_with_store_error(raw: bytes) -> None:
    for decode in (lambda: StoredState.decode(raw, SPACE), lambda: MemberRecord.decode(raw)):
        with contextlib.suppress(StoreError):
            decode()


@given(st.sampled_from(["epoch", "by", "why", "space", "servers", "weights", "runs"]), JSON)
def test_a_stored_state_with_any_field_replaced_reads_or_fails_with_store_error(
    key: str, value: object
) -> None:
    document = json.loads(StoredState(1, START, "s1", "initial state").encode())
    document[key] = value
    with contextlib.suppress(StoreError):
        StoredState.decode(json.dumps(document).encode(), SPACE)
