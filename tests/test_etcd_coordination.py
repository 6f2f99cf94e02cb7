"""A pool whose liveness and allocation live in etcd (`[pool] coordination = "etcd"`),
against a real three-member etcd cluster on loopback, the pool on the overlay driver.

Every test watches what each server itself serves (the portions its agent joins), at
every change of any server, and fails on the first bucket two running servers serve
at once. Runs on real time on a machine that may be busy: each waits for the outcome
it checks under a deadline.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import numpy.typing as npt
import pytest

from etcdcluster import ETCD_MISSING, EtcdCluster, etcd_path, post
from manycast.drivers.etcd import key_prefix
from manycast.ports import free_base_port
from manycast.protocol.leased import LeasedCoordinator
from manycast.protocol.server import Server
from manycast.protocol.storestate import MEMBERS, STATE_KEY, MemberRecord, StoredState
from manycast.runtime import PoolRun
from manycast.space import AddressSpace
from manycast.topology import Topology, loads
from manycast.wire import control
from pooltools import patient, pool_toml, served_now

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(etcd_path() is None, reason=ETCD_MISSING),
]

LEASE = 2  # seconds
WAIT = 20.0  # the longest any outcome below is waited for (normally a few seconds)


@pytest.fixture(scope="module")
def cluster() -> EtcdCluster:  # type: ignore[misc]
    with EtcdCluster(3) as running:
        yield running


FAMILIES = (4, 6)
family = pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])


def in_family(text: str, family: int) -> str:
    """pooltools' IPv4 topology, or the same on an IPv6 network (its group IPv6, every
    subnet numbered from 2001:db8::/32 by the address plan)."""
    if family == 4:
        return text
    text = text.replace('group = "232.1.1.1"', 'group = "ff3e::8000:1"')
    return re.sub(r'^subnet = "[0-9./]+"\n', "", text, flags=re.MULTILINE)


def topology(
    name: str,
    endpoints: list[str],
    own: dict[str, list[str]] | None = None,
    standby: int = 0,
    family: int = 4,
) -> Topology:
    """Four servers s1..s4 (and `standby` more) and 12 clients (pooltools' shape), the
    pool in etcd, on an IPv4 or an IPv6 network."""
    text = pool_toml(
        servers=4,
        standby=standby,
        clients=12,
        rate=4.0,
        pool={
            "name": name,
            "coordination": "etcd",
            "etcd": endpoints,
            "lease_s": LEASE,
            "index_bits": 8,
        },
    )
    for server, urls in (own or {}).items():
        listed = ", ".join(f'"{u}"' for u in urls)
        text = text.replace(f'name = "{server}"\n', f'name = "{server}"\netcd = [{listed}]\n')
    topo = loads(in_family(text, family))
    assert topo.pool.space.family == family
    return topo


def start(topo: Topology) -> PoolRun:
    return patient(
        PoolRun(topo, "overlay", seed=3, base_port=free_base_port(topo.attachment_count))
    )


@dataclass
class Ownership:
    """What each running server serves, checked at every change of any server's portions:
    `overlaps` lists every moment two of them served one bucket."""

    run: PoolRun
    space: AddressSpace
    served: dict[str, npt.NDArray[np.bool_]] = field(default_factory=dict)
    timeline: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    overlaps: list[tuple[float, int, list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for server in self.run.nodes.servers.values():
            self.watch(server)

    def watch(self, server: Server) -> None:
        self.served[server.name] = np.zeros(self.space.buckets, dtype=bool)
        self.timeline[server.name] = []
        server._apply = self._watching(server)  # type: ignore[method-assign]

    def _watching(self, server: Server) -> Callable[..., None]:
        apply = server._apply

        def watched(allocation: object, now: float) -> None:
            apply(allocation, now)  # type: ignore[arg-type]
            self.served[server.name] = self._buckets(server)
            self.timeline[server.name].append((now, int(self.served[server.name].sum())))
            self.check(now)

        return watched

    def _buckets(self, server: Server) -> npt.NDArray[np.bool_]:
        mask = np.zeros(self.space.buckets, dtype=bool)
        portions = server.portions
        if portions is not None:
            for portion in portions.include:
                mask |= self.space.buckets_of(portion)
            for portion in portions.exclude:
                mask &= ~self.space.buckets_of(portion)
        return mask

    def report(self, run: PoolRun) -> str:
        """The first overlaps, each server's serving timeline and its adopted changes:
        what a failure needs to be understood."""
        lines = [f"overlaps (first 10): {self.overlaps[:10]}"]
        for name, timeline in self.timeline.items():
            core = run.nodes.servers[name].coordinator
            changes = core.changes if isinstance(core, LeasedCoordinator) else []
            lines.append(f"{name} served {timeline} changes {changes}")
        return "\n".join(lines)

    def check(self, now: float) -> None:
        running = [n for n in self.served if n in self.run.network.nodes]  # type: ignore[attr-defined]
        count = sum(self.served[n].astype(int) for n in running)
        for bucket in np.flatnonzero(count > 1)[:5]:
            owners = [n for n in running if self.served[n][bucket]]
            self.overlaps.append((now, int(bucket), owners))

    def covered(self, names: list[str]) -> bool:
        """Every bucket served by one of `names`."""
        total = sum(self.served[n].astype(int) for n in names)
        return bool((total == 1).all())

    def nothing_since(self, name: str) -> float | None:
        """When `name` last went to serving nothing (None: it serves something)."""
        timeline = self.timeline[name]
        if not timeline or timeline[-1][1]:
            return None
        at = timeline[-1][0]
        for when, count in reversed(timeline):
            if count:
                break
            at = when
        return at


def history(url: str, pool: str, space: AddressSpace) -> list[StoredState]:
    """Every state etcd ever held for the pool, oldest first (read back revision by
    revision from the member at `url`)."""
    key = base64.b64encode((key_prefix(pool) + STATE_KEY).encode()).decode()
    found: list[StoredState] = []
    revision = 0
    while True:
        body: dict[str, object] = {"key": key}
        if revision:
            body["revision"] = str(revision)
        kvs = post(url, "/v3/kv/range", body).get("kvs")
        if not isinstance(kvs, list) or not kvs:
            return found[::-1]
        kv = kvs[0]
        found.append(StoredState.decode(base64.b64decode(kv["value"]), space))
        revision = int(kv["mod_revision"]) - 1


def member(url: str, pool: str, name: str) -> MemberRecord:
    """What the member key of server `name` says in etcd now."""
    key = base64.b64encode((key_prefix(pool) + MEMBERS + name).encode()).decode()
    kvs = post(url, "/v3/kv/range", {"key": key}).get("kvs")
    assert isinstance(kvs, list) and len(kvs) == 1, f"no member key for {name}"
    return MemberRecord.decode(base64.b64decode(kvs[0]["value"]))


def coordination(run: PoolRun, name: str) -> LeasedCoordinator:
    core = run.nodes.servers[name].coordinator
    assert isinstance(core, LeasedCoordinator)
    return core


def settled(run: PoolRun, watch: Ownership, names: list[str]) -> Callable[[], bool]:
    """Every one of `names` alive and at one epoch, whose allocation is theirs, each
    serving all it gives it, none waiting for the outcome of a change (a commit's
    answer may come after the state it wrote was seen), and every client answered."""

    def check() -> bool:
        cores = [coordination(run, n) for n in names]
        if len({c.epoch for c in cores}) != 1 or cores[0].allocation is None:
            return False
        allocation = cores[0].allocation
        return (
            not any(c.changing for c in cores)
            and all(sorted(c.alive(run.now)) == sorted(names) for c in cores)
            and allocation.servers == tuple(sorted(names))
            and all(watch.served[n].sum() == allocation.count(n) for n in names)
            and watch.covered(names)
            and served_now(run)
        )

    return check


@family
def test_clients_are_served_and_a_dead_server_is_replaced_when_its_lease_expires(
    cluster: EtcdCluster, family: int
) -> None:
    pool = f"kill{family}.etcd.test"
    run = start(topology(pool, cluster.urls, family=family))
    watch = Ownership(run, run.topology.pool.space)
    net = run.network
    try:
        everyone = ["s1", "s2", "s3", "s4"]
        assert net.run_until(WAIT, settled(run, watch, everyone)), watch.timeline
        space = run.topology.pool.space
        [initial] = history(cluster.urls[0], pool, space)
        assert initial.epoch == 1 and initial.state.allocation.servers == tuple(everyone)
        for name in everyone:  # each member key holds its server's address, of the family
            address = member(cluster.urls[0], pool, name).address
            assert address == run.topology.address(name) and address.version == family
        killed_at = net.now
        run.kill_server("s2")
        survivors = ["s1", "s3", "s4"]
        assert net.run_until(net.now + WAIT, settled(run, watch, survivors)), watch.timeline
        removal = next(
            at for at, _, why in coordination(run, "s1").changes if why.startswith("remove s2")
        )
        # Removed once its lease ran out: at least a lease time after its last renewal
        # (at most a third of a lease before the kill), and not long after.
        assert LEASE * 2 / 3 <= removal - killed_at <= LEASE + 3.0
        states = history(cluster.urls[0], pool, space)
        assert [s.epoch for s in states] == [1, 2]
        assert states[-1].why == "remove s2" and states[-1].state.allocation.servers == tuple(
            survivors
        )
        for name in survivors:  # each serves what the last state gives it
            assert watch.served[name].sum() == states[-1].state.allocation.count(name)
    finally:
        run.close()
    assert watch.overlaps == [], watch.report(run)


@family
def test_share_changes_commit_through_transactions_on_the_epoch(
    cluster: EtcdCluster, family: int
) -> None:
    pool = f"share{family}.etcd.test"
    run = start(topology(pool, cluster.urls, family=family))
    watch = Ownership(run, run.topology.pool.space)
    net = run.network
    everyone = ["s1", "s2", "s3", "s4"]
    try:
        assert net.run_until(WAIT, settled(run, watch, everyone)), watch.timeline
        # Two servers change shares at the same instant, both from epoch 1: one
        # transaction wins, the other finds the epoch moved and is tried again from it.
        at = net.now
        run.command("s3", control.SetShareOp("s1", Fraction(1, 2)))
        run.command("s4", control.SetShareOp("s2", Fraction(1, 8)))

        def both_applied() -> bool:
            return (
                all(coordination(run, n).epoch == 3 for n in everyone)
                and settled(run, watch, everyone)()
            )

        assert net.run_until(net.now + WAIT, both_applied), [
            coordination(run, n).changes for n in everyone
        ]
        states = history(cluster.urls[0], pool, run.topology.pool.space)
        assert [s.epoch for s in states] == [1, 2, 3]
        assert sorted((s.by, s.why) for s in states[1:]) == [
            ("s3", "set s1 to 50.0%"),
            ("s4", "set s2 to 12.5%"),
        ]
        # The later change holds exactly (the earlier one's others keep their proportions).
        last = states[-1]
        target = {"s3": ("s1", 128), "s4": ("s2", 32)}[last.by]  # of 256 buckets
        assert last.state.allocation.count(target[0]) == target[1]
        for name in everyone:
            assert watch.served[name].sum() == last.state.allocation.count(name)
        assert coordination(run, "s1").changes[-1][0] - at < WAIT
    finally:
        run.close()
    assert watch.overlaps == [], watch.report(run)


@family
def test_a_server_started_later_registers_and_is_given_its_share(
    cluster: EtcdCluster, family: int
) -> None:
    pool = f"add{family}.etcd.test"
    run = start(topology(pool, cluster.urls, standby=1, family=family))
    watch = Ownership(run, run.topology.pool.space)
    net = run.network
    try:
        assert net.run_until(WAIT, settled(run, watch, ["s1", "s2", "s3", "s4"])), watch.timeline
        run.start_server("s5")
        watch.watch(run.nodes.servers["s5"])
        everyone = ["s1", "s2", "s3", "s4", "s5"]
        assert net.run_until(net.now + WAIT, settled(run, watch, everyone)), watch.timeline
        last = history(cluster.urls[0], pool, run.topology.pool.space)[-1]
        assert (last.epoch, last.why, last.by) == (2, "add s5", "s1")
        assert watch.served["s5"].sum() == last.state.allocation.count("s5") > 0
    finally:
        run.close()
    assert watch.overlaps == [], watch.report(run)


@family
def test_a_partition_gives_no_bucket_two_owners_and_the_minority_changes_nothing(
    cluster: EtcdCluster, family: int
) -> None:
    """s3 and s4 talk only to one etcd member, which is then stopped (SIGSTOP): it
    neither answers them nor reaches its peers, so s3 and s4 are cut off from the
    quorum while s1 and s2, on the other two members, keep it."""
    cut = cluster.follower()
    majority = [m.client_url for m in cluster.members if m is not cut]
    pool = f"split{family}.etcd.test"
    own = {"s3": [cut.client_url], "s4": [cut.client_url]}
    topo = topology(pool, majority, own=own, family=family)
    space = topo.pool.space
    run = start(topo)
    watch = Ownership(run, space)
    net = run.network
    everyone = ["s1", "s2", "s3", "s4"]
    try:
        assert net.run_until(WAIT, settled(run, watch, everyone)), watch.timeline
        before = history(majority[0], pool, space)
        minority = ("s3", "s4")
        commits_before = [coordination(run, n).stats.commits for n in minority]
        cut_at = net.now
        cluster.pause(cut)
        try:
            # The minority asks for a change it cannot commit.
            run.command("s3", control.SetShareOp("s3", Fraction(7, 10)))
            assert net.run_until(net.now + WAIT, settled(run, watch, ["s1", "s2"])), watch.timeline
            net.run_until(net.now + LEASE)  # the minority has had every chance to commit
            tried = coordination(run, "s3").stats.proposals
            committed = [coordination(run, n).stats.commits for n in minority]
            minority_epochs = {coordination(run, n).epoch for n in ("s3", "s4")}
            during = history(majority[0], pool, space)
        finally:
            cluster.resume(cut)
        # The minority stopped serving within one lease time of the cut; the majority
        # took its buckets only once its leases had expired, after that.
        taken = min(
            at for at, _, why in coordination(run, "s1").changes if why.startswith("remove s")
        )
        assert taken - cut_at >= LEASE * 2 / 3
        for name in ("s3", "s4"):
            stopped = watch.nothing_since(name)
            assert stopped is not None, watch.timeline[name]
            assert stopped - cut_at <= LEASE and stopped <= taken, watch.timeline[name]
        # The minority tried, committed nothing and adopted nothing new; every state
        # written meanwhile is the majority's, and none has s3's share.
        assert tried >= 1 and committed == commits_before, [
            (n, coordination(run, n).changes) for n in minority
        ]
        assert minority_epochs == {before[-1].epoch}
        new = during[len(before) :]
        assert new, "the majority removed nobody"
        assert all(s.by in ("s1", "s2") for s in new), [(s.by, s.why) for s in new]
        assert new[-1].state.allocation.servers == ("s1", "s2")
        # Healed: s3 and s4 register again with new leases and are added back.
        assert net.run_until(net.now + WAIT, settled(run, watch, everyone)), watch.timeline
    finally:
        run.close()
    assert watch.overlaps == [], watch.report(run)
