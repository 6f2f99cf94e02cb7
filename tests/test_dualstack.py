"""Dual-stack pools: one pool name serving IPv4 and IPv6 clients at once (issue 16).

The pool's `space` and `group` list one of each family; its one allocation, over
as many buckets in either space, gives each server the same buckets in both, which
it joins with IGMPv3 masks on the IPv4 group and MLDv2 masks on the IPv6 group.
One coordination (the IPv4 control channel) serves both. Routers and servers are
dual-stack; each client LAN is of one family.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import dns.rdatatype
import pytest

from etcdcluster import ETCD_MISSING, EtcdCluster, etcd_path
from manycast.dns import EmbeddedServer, KnotServer, knot_available
from manycast.errors import LabError
from manycast.naming import TsigKey, lookup_key
from manycast.naming.records import record_rrsets
from manycast.ports import free_base_port
from manycast.protocol.dualstack import DualStackRouter, in_space
from manycast.protocol.fastpath import FastPath
from manycast.protocol.querier import QUERY_RESPONSE_S
from manycast.runtime import PoolRun
from manycast.topology import TopologyError, builtin, bundled, loads
from pooltools import DEADLINE, Settled, every, patient, requests_ok, run_pool_until, served_now
from test_lab import _lab_possible

GROUPS = ("232.1.1.1", "ff3e::8000:1")
LANS = {4: ("c", "10.1.0.0/24"), 6: ("d", "2001:db8:d::/64")}


def dual_text(
    *,
    technique: str = "R1",
    clients: int = 12,
    scenario: Sequence[tuple[float, str, str, str]] = (),
    pool: dict[str, Any] | None = None,
    misses: int = 3,
    run: str = "",
    extra: str = "",
) -> str:
    """clients c1.. (IPv4) and d1.. (IPv6) -- ra -- core -- rs1 (s1, s3) / rs2 (s2, s4),
    every router and server dual-stack."""
    keys: dict[str, Any] = {
        "space": ["10.0.0.0/8", "2001:db8::/32"],
        "group": list(GROUPS),
        "technique": technique,
        "heartbeat_ms": 100,
        "heartbeat_misses": misses,
        "report_interval_ms": 500,
        **(pool or {}),
    }
    text = "[pool]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
    text += "".join(f'[[router]]\nname = "{r}"\n' for r in ("ra", "core", "rs1", "rs2"))
    for a, b, delay in (("ra", "core", 2), ("core", "rs1", 1), ("core", "rs2", 3)):
        text += f'[[link]]\nbetween = ["{a}", "{b}"]\ndelay_ms = {delay}\n'
    for i in range(1, 5):
        text += f'[[server]]\nname = "s{i}"\nrouter = "rs{2 - i % 2}"\n'
    for name, subnet in LANS.values():
        text += f'[[clients]]\nname = "{name}"\ncount = {clients}\nrouter = "ra"\nrate = 4.0\n'
        text += f'subnet = "{subnet}"\n'
    for at, action, server, more in scenario:
        text += f'[[scenario]]\nat = {at}\naction = "{action}"\nserver = "{server}"\n{more}\n'
    return text + extra + f"[run]\nduration = 6.0\n{run}"


def _toml(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value).lower()


def outcome(run: PoolRun) -> dict[str, int]:
    clients = run.nodes.clients.values()
    return {
        "resets": sum(c.stats.resets for c in clients),
        "failed": sum(c.stats.requests_failed for c in clients),
        "state_lost": sum(c.stats.state_lost for c in clients),
        "timeouts": sum(c.stats.timeouts for c in clients),
    }


# -- the topology ------------------------------------------------------------------------


def test_routers_and_servers_are_dual_stack_and_each_lan_of_one_family() -> None:
    topo = loads(dual_text())
    assert topo.pool.dual and topo.pool.families == (4, 6)
    assert (str(topo.pool.group), str(topo.pool.group6)) == GROUPS
    assert topo.pool.space6 is not None and topo.pool.space.buckets == topo.pool.space6.buckets
    documentation = ipaddress.IPv6Network("2001:db8::/32")
    for node in [*topo.routers, *topo.servers]:
        for iface in topo.interfaces[node].values():
            if iface.link.endswith(("-c", "-d")):
                continue  # a router's client LAN: one family
            assert iface.address.version == 4, (node, iface)
            assert iface.address6 in documentation and iface.network6 is not None
            assert iface.network6.prefixlen == 64  # one /64 per link
    networks6 = [
        i.network6 for ifaces in topo.interfaces.values() for i in ifaces.values() if i.network6
    ]
    assert len(set(networks6)) == len(topo.links) - 2  # every link but the two LANs
    for family, (group, subnet) in LANS.items():
        for i in (1, 12):
            address = topo.address(f"{group}{i}")
            assert address.version == family and address in ipaddress.ip_network(subnet)
    # Each family's routes, toward each family's addresses.
    ra_routes = {r.network for r in topo.routes["ra"]}
    assert ipaddress.ip_network("2001:db8:d::/64") in ra_routes
    assert any(isinstance(n, ipaddress.IPv6Network) and n.prefixlen == 64 for n in ra_routes)
    assert topo.gateways6["s1"] == topo.interfaces["rs1"]["eth1"].address6


def test_a_dual_stack_link_takes_the_subnet_named_and_the_other_family_from_the_plan() -> None:
    text = dual_text().replace(
        '[[server]]\nname = "s1"\nrouter = "rs1"\n',
        '[[server]]\nname = "s1"\nrouter = "rs1"\nsubnet = "2001:db8:77::/64"\n',
    )
    text = text.replace(
        'between = ["ra", "core"]\n', 'between = ["ra", "core"]\nsubnet = "10.9.9.0/30"\n'
    )
    # A LAN whose subnet is left out: an IPv6 /64 of the plan.
    text = text.replace("[run]", '[[clients]]\nname = "e"\ncount = 2\nrouter = "ra"\n[run]')
    topo = loads(text)
    s1 = topo.interfaces["s1"]["eth0"]
    assert str(s1.network6) == "2001:db8:77::/64" and s1.network.prefixlen == 30
    ra = next(i for i in topo.interfaces["ra"].values() if i.link == "ra-core")
    assert str(ra.network) == "10.9.9.0/30" and str(ra.network6) == "2001:db8:ffff::/64"
    assert str(topo.interfaces["e1"]["eth0"].network) == "2001:db8:1::/64"
    with pytest.raises(TopologyError, match="overlaps"):
        loads(text.replace("2001:db8:77::/64", "2001:db8:d::/64"))


def test_demo_dual_is_bundled_beside_demo_with_the_same_scenario() -> None:
    assert "demo-dual" in bundled()
    demo, dual = builtin("demo"), builtin("demo-dual")
    assert dual.pool.dual and [s.describe() for s in dual.scenario] == [
        s.describe() for s in demo.scenario
    ]
    assert set(dual.servers) == set(demo.servers) and len(dual.clients) == len(demo.clients)
    families = [dual.address(name).version for name in dual.clients]
    assert families.count(4) == families.count(6) == 120


def test_a_dual_stack_pool_may_move_live_tcp_connections() -> None:
    """The kernel lab moves them, each in its family (tests/test_lab_tcp_move.py)."""
    assert loads(dual_text(run="tcp_moves = true\n")).tcp_moves
    drain = [(1.0, "drain", "s1", "grace = 1.0")]
    assert loads(dual_text(scenario=drain, run="tcp_moves = true\n")).tcp_moves
    # A dual-stack VIP pool's do not move yet: refused by name, at the [run] table.
    text = files("manycast").joinpath("topologies", "vip-dual.toml").read_text()
    vip = text.replace("[run]\n", "[run]\ntcp_moves = true\n")
    with pytest.raises(TopologyError, match=r"vip-dual\.toml:\d+: .* dual-stack VIP pools"):
        loads(vip, "vip-dual.toml")


BAD = {
    "two ipv4 spaces": ({"space": ["10.0.0.0/8", "11.0.0.0/8"]}, "one prefix of each family"),
    "one group": ({"group": "232.1.1.1"}, "'group' must be a list"),
    "two ipv4 groups": ({"group": ["232.1.1.1", "232.1.1.2"]}, "one multicast group of each"),
    "unicast group": ({"group": ["232.1.1.1", "2001:db8::1"]}, "one multicast group of each"),
    "ipv6 group outside ff3x": ({"group": ["232.1.1.1", "ff15::1"]}, "is not in ff3x::/32"),
    "ipv6 control group": ({"control_group": "ff15::77:1"}, "is not an IPv4 address"),
}


@pytest.mark.parametrize(("keys", "message"), BAD.values(), ids=BAD.keys())
def test_a_dual_stack_pools_spaces_and_groups_are_checked(
    keys: dict[str, Any], message: str
) -> None:
    with pytest.raises(TopologyError, match=message):
        loads(dual_text(pool=keys))


# The clients of both LANs idle for 3 s (R4 releases a pinned source once its
# kernel counter has stood still for pin_idle, 1 s, at a check a second apart).
IDLE_THEN_BACK = "".join(
    f'[[scenario]]\nat = {at}\naction = "client_rate"\nclients = "{lan}"\nrate = {rate}\n'
    for at, rate in ((4.0, 0.0), (7.0, 4.0))
    for lan, _ in LANS.values()
)


@pytest.mark.lab
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
@pytest.mark.parametrize(
    ("technique", "private"),
    [("R1", False), ("R1", True), ("R4", False)],
    ids=["public", "private", "R4"],
)
def test_the_kernel_lab_serves_both_families_by_their_owners(
    tmp_path: Path, technique: str, private: bool
) -> None:
    """The kernel lab (root): every router runs a daemon per family on MRT and MRT6,
    each server's agent sends its IGMPv3 and MLDv2 joins, its service answers on both
    groups; through a share change and a death every client of either family is
    answered by the owner of its address, and each family's kernel table holds its
    clients' entries. With R4 each family's daemon pins its own family's active
    sources on the old owner (held in the MFC and in IPv6's MRT6 table) and lets
    them go once the clients idle. A lab of its own prefix, taken down whatever
    happens."""
    from manycast.lab import Lab, LabRun

    scenario = [(1.0, "set_share", "s1", "share = 0.1"), (2.0, "kill", "s3", "")]
    r4 = technique == "R4"
    text = dual_text(
        technique=technique,
        pool={"private": private},
        scenario=scenario,
        extra=IDLE_THEN_BACK if r4 else "",
    )
    lab = Lab(prefix=f"dual{os.getpid()}{'p' if private else ''}{technique}", run_root=tmp_path)
    try:
        lab.down()
        topology = lab.up(text, "dual.toml")
        duration = 9.0 if r4 else topology.duration
        summary = LabRun(lab, topology).run(duration, settle=30.0)
        assert summary["clients"] == summary["clients_served_at_end"] == 24, summary
        assert summary["kernel"]["clients_not_at_owner"] == [], summary
        assert "s3" not in summary["kernel"]["clients_by_server"]
        assert all(e["recovery_s"] is not None for e in summary["events"]), summary["events"]
        entries = {version: lab.mfc("ra", version) for version in (4, 6)}
        pins = {
            role: [lab.ask(r, role, {"op": "status"})["daemon"] for r in topology.routers]
            for role in ("router", "router6")
        }
    finally:
        lab.down()
    for version, subnet in ((4, LANS[4][1]), (6, LANS[6][1])):
        group = ipaddress.ip_address(GROUPS[0] if version == 4 else GROUPS[1])
        sources = {e.source for e in entries[version] if e.group == group}
        assert sum(s in ipaddress.ip_network(subnet) for s in sources) == 12, version
    for role, daemons in pins.items():
        held, released = (sum(d[k] for d in daemons) for k in ("held", "released"))
        assert (held > 0 and released > 0) if r4 else held == 0, (role, daemons)


@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
def test_the_kernel_lab_refuses_d_on_a_dual_stack_pool_by_name(tmp_path: Path) -> None:
    from manycast.lab import Lab

    lab = Lab(prefix=f"mt{os.getpid()}n9", run_root=tmp_path)
    with pytest.raises(LabError, match=r"technique D on a dual-stack pool .* not yet"):
        lab.up(dual_text(technique="D"), "dual.toml")
    assert not lab.is_up()


# -- the pool on the memory driver --------------------------------------------------------


def test_every_client_of_either_family_is_answered_by_the_owner_of_its_buckets() -> None:
    run = PoolRun(loads(dual_text()), "memory", 3)
    run.network.run_until(3.0)
    assert outcome(run) == {"resets": 0, "failed": 0, "state_lost": 0, "timeouts": 0}
    assert served_now(run)
    pool = run.topology.pool
    allocation = next(iter(run.nodes.servers.values())).coordinator.allocation
    assert allocation is not None and allocation.space == pool.space
    sessions = {
        (name, remote[0])
        for name, s in run.nodes.servers.items()
        for _, remote in s.endpoint.keys()
    }
    clients = {c.address for c in run.nodes.clients.values()}
    assert {address for _, address in sessions} == clients
    assert {a.version for a in clients} == {4, 6}
    assert pool.space6 is not None
    six = in_space(allocation, pool.space6)
    for name, address in sessions:
        assert (allocation if address.version == 4 else six).owner(address) == name
    # Every router holds each server's masked join in both families: IGMPv3 masks for
    # the IPv4 group, MLDv2 masks for the IPv6 group, the same buckets.
    router = run.nodes.routers["ra"]
    assert isinstance(router, DualStackRouter)
    joined = router.membership()
    assert len(joined[GROUPS[0]]) == 4 and len(joined[GROUPS[1]]) == 4
    assert all(":" not in f for f in joined[GROUPS[0]].values())
    assert all(":" in f for f in joined[GROUPS[1]].values())


@pytest.mark.parametrize("technique", ("R2", "R3"))
def test_a_share_change_moves_clients_of_both_families_without_losing_one(technique: str) -> None:
    run = PoolRun(
        loads(dual_text(technique=technique, scenario=[(2.0, "set_share", "s1", "share = 0.1")])),
        "memory",
        3,
    )
    run.network.run_until(5.0)
    assert outcome(run) == {"resets": 0, "failed": 0, "state_lost": 0, "timeouts": 0}
    carried = dict(run.live_view().carried)
    assert carried["forwarded" if technique == "R2" else "transferred"] > 0
    assert served_now(run)
    owners = dict(run.live_view().owners)
    moved = {name for name, owner in owners.items() if owner != "s1"}
    assert {run.topology.address(n).version for n in moved} == {4, 6}


def test_r4_pins_each_familys_moved_connections_on_its_familys_trees() -> None:
    """R4 (Fig 16): s1 drops to 10%; it tags each connection it gives up onto its tree
    of the client's family at the clients' edge (the IPv4 logic holds the IPv4
    clients' tags, onto s1's IPv4 address; the IPv6 logic the IPv6 clients', onto its
    IPv6 address), their packets come to s1 by label in either family, and nobody is
    reset. When s1 then dies, the edge drops its tags in both families (a member-down
    notice for each group) and its clients are served again by the others."""
    scenario = [(2.0, "set_share", "s1", "share = 0.1"), (3.0, "kill", "s1", "")]
    run = PoolRun(loads(dual_text(technique="R4", scenario=scenario)), "memory", 3)
    run.network.run_until(2.9)
    assert outcome(run) == {"resets": 0, "failed": 0, "state_lost": 0, "timeouts": 0}
    ra, rs1, s1 = run.nodes.routers["ra"], run.nodes.routers["rs1"], run.nodes.servers["s1"]
    assert isinstance(ra, DualStackRouter) and isinstance(rs1, DualStackRouter)
    edges = {4: ra.vip, 6: ra.six.vip}
    for version, edge in edges.items():
        assert edge is not None and edge.family == version
        tagged = {ipaddress.ip_address(flow.client) for flow in edge.flows}
        assert tagged and {a.version for a in tagged} == {version}, version
        root = s1.address if version == 4 else s1.address6
        assert {tag.server for tag in edge.flows.values()} == {int(root)}, version
        assert edge.stats.pushed > 0, version
        for client in run.nodes.clients.values():  # each still on its connection to s1
            if client.address in tagged:
                assert client.conn_key is not None
                local, remote = client.conn_key  # type: ignore[misc]
                assert (remote, local) in s1.endpoint, client.name
    for plane in (rs1.vip, rs1.six.vip):
        assert plane is not None and plane.stats.labelled_delivered > 0
    assert s1.handover.stats.pinned == sum(len(e.flows) for e in edges.values() if e)
    run.network.run_until(3.6)
    for version, edge in edges.items():
        assert edge is not None and not edge.flows and edge.stats.flows_of_dead_servers, version
    run.network.run_until(6.0)
    assert served_now(run)


def test_a_dead_servers_clients_of_both_families_are_served_again() -> None:
    """The coordinator tells its router of the death in both families (a member-down
    notice for each group): every router drops the dead server's two memberships at
    once, not when they time out."""
    run = PoolRun(loads(dual_text(scenario=[(2.0, "kill", "s3", "")])), "memory", 3)
    run.network.run_until(2.6)
    for router in run.nodes.routers.values():
        joined = router.membership()
        assert (len(joined[GROUPS[0]]), len(joined[GROUPS[1]])) == (3, 3), router.name
    run.network.run_until(4.5)
    assert served_now(run)


def test_the_gossip_membership_serves_a_dual_stack_pool_through_a_death() -> None:
    """membership = "swim" (point-to-point probes on the IPv4 control port): the dead
    server's clients of both families are served again, and every router has dropped
    its joins of both groups."""
    text = dual_text(pool={"membership": "swim"}, scenario=[(2.0, "kill", "s3", "")])
    run = PoolRun(loads(text), "memory", 3)
    run.network.run_until(6.0)  # type: ignore[union-attr]
    assert served_now(run)
    assert run.summary()["servers"]["s3"]["status"] == "dead"
    for router in run.nodes.routers.values():
        joined = router.membership()
        assert (len(joined[GROUPS[0]]), len(joined[GROUPS[1]])) == (3, 3), router.name


def test_a_restarted_router_learns_every_member_in_both_families_from_its_queries() -> None:
    """A dual-stack router that starts knowing nothing sends IGMPv3 and MLDv2 General
    Queries; every server answers both with its joins of both families at once."""
    run = PoolRun(loads(dual_text()), "memory", 3)
    network = run.network
    network.run_until(1.5)  # type: ignore[union-attr]
    network.kill("rs1")
    network.run_until(2.0)  # type: ignore[union-attr]
    fresh = run.start_router("rs1")
    network.run_until(2.0 + QUERY_RESPONSE_S + 0.02)  # type: ignore[union-attr]
    servers = run.nodes.servers.values()
    joined = fresh.membership()
    assert set(joined[GROUPS[0]]) == {str(s.address) for s in servers}
    assert set(joined[GROUPS[1]]) == {str(s.address6) for s in servers}
    network.run_until(4.0)  # type: ignore[union-attr]
    assert served_now(run)


def test_one_load_counts_both_families_clients() -> None:
    """The pool's load loop sees one load per server: requests of either family, and
    the busiest buckets by either family's clients (the same buckets)."""
    run = PoolRun(loads(dual_text()), "memory", 3)
    run.network.run_until(3.0)
    for server in run.nodes.servers.values():
        families = {remote[0].version for _, remote in server.endpoint.keys()}
        assert families == {4, 6}, server.name
        buckets = {b.bucket for b in server._hot_buckets(3.0)}
        allocation = server.coordinator.allocation
        assert allocation is not None
        owned = set(map(int, allocation.buckets(server.name).nonzero()[0]))
        assert buckets and buckets <= owned


def test_a_dual_stack_demo_capture_decodes_in_both_families(tmp_path: Path) -> None:
    """demo-dual for 3 s on the memory driver, captured: every frame decodes (the Lua
    dissector reads the masks); each server's IGMPv3 report for the IPv4 group and
    MLDv2 report for the IPv6 group carry mask pairs of their family; sessions are
    TCP in IPv4 and in IPv6; the control channel is UDP in IPv4 alone."""
    from test_pcap import LUA, WHOLE_CAPTURE, demo, fields

    path = tmp_path / "dual.pcapng"
    done = demo(
        "--topology", "demo-dual", "--driver", "memory", "--duration", "3", "--pcap", str(path)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = fields(
        path,
        "frame.protocols",
        "manycast.masks.group",
        "manycast.masks.group6",
        "udp.dstport",
        "tcp.dstport",
        extra=(*WHOLE_CAPTURE, "-X", f"lua_script:{LUA}"),
    )
    malformed = [row for row in rows if "_ws.malformed" in row[0]]
    assert malformed == [], malformed[:5]
    assert sum(row[1] == GROUPS[0] for row in rows) >= 4  # IGMPv3 masks, IPv4 group
    assert sum(row[2] == GROUPS[1] for row in rows) >= 4  # MLDv2 masks, IPv6 group
    for version in ("ip", "ipv6"):  # (Wireshark's names for IPv4 and IPv6)
        assert (
            sum(row[0].startswith(f"raw:{version}:tcp") and row[4] == "7000" for row in rows) > 500
        )
    control = [row[0].split(":")[1] for row in rows if row[3] == "7946"]
    assert len(control) > 100 and set(control) == {"ip"}


# -- private dual-stack pools -------------------------------------------------------------

# An outsider server that knows the groups, and outsider clients of each family.
OUTSIDERS = """[[server]]
name = "evil"
router = "core"
authorized = false
[[clients]]
name = "x"
count = 4
router = "ra"
subnet = "10.6.0.0/24"
rate = 4.0
authorized = false
[[clients]]
name = "y"
count = 4
router = "ra"
subnet = "2001:db8:6::/64"
rate = 4.0
authorized = false
"""


def assert_members_served_and_outsiders_refused(run: PoolRun, summary: dict[str, Any]) -> None:
    assert summary["clients"] == 24 and summary["clients_served_at_end"] == 24
    assert summary["requests_failed"] == 0
    assert summary["outsiders"] == 8 and summary["outsider_answers"] == 0
    evil = run.nodes.servers["evil"]
    assert evil.app.requests == 0 and evil.stats.sessions_opened == 0
    for name in (*(f"x{i}" for i in range(1, 5)), *(f"y{i}" for i in range(1, 5))):
        assert run.nodes.clients[name].stats.requests_ok == 0, name
    # Each group is delivered to the members alone, in its family: their signed
    # IGMPv3 joins for the IPv4 group, their signed MLDv2 joins for the IPv6 group.
    members = [run.nodes.servers[f"s{i}"] for i in range(1, 5)]
    for router in run.nodes.routers.values():
        joined = router.membership()
        assert set(joined[GROUPS[0]]) == {str(s.address) for s in members}, router.name
        assert set(joined[GROUPS[1]]) == {str(s.address6) for s in members}, router.name
    core, ra = run.nodes.routers["core"], run.nodes.routers["ra"]
    assert core.stats.rejected["bad signature"] > 0  # the outsider server's joins
    assert ra.stats.rejected["unauthorized sender"] >= 8  # both families' outsiders


def test_a_private_dual_stack_pool_serves_members_of_both_families_and_no_outsider() -> None:
    run = PoolRun(loads(dual_text(pool={"private": True}, extra=OUTSIDERS)), "memory", seed=3)
    run.run(6.0)
    assert_members_served_and_outsiders_refused(run, run.summary())
    # The IPv6 logic of each router admitted the MLDv2 joins with the key of the
    # IPv6 group (its own admission: its keys, replay cache and waiting joins).
    for router in run.nodes.routers.values():
        assert isinstance(router, DualStackRouter)
        assert router.six.admission is not None and router.six.admission is not router.admission
        assert router.six.stats is router.stats


def test_a_private_dual_stack_pools_records_are_one_set_with_a_and_aaaa() -> None:
    """One record at the pool's name with its A and its AAAA, and the key under both
    groups' reverse names (in-addr.arpa and ip6.arpa); the control channel's own."""
    run = PoolRun(loads(dual_text(pool={"private": True})), "memory", seed=3)
    pool_record, control_record = run.pool_records()
    assert [str(g) for g in pool_record.groups] == list(GROUPS)
    assert pool_record.private and pool_record.alias == "service.manycast.test."
    rrsets = {
        (r.name.to_text(), dns.rdatatype.to_text(r.rdtype)) for r in record_rrsets(pool_record)
    }
    assert ("service.manycast.test.", "A") in rrsets and (
        "service.manycast.test.",
        "AAAA",
    ) in rrsets
    reverse = {name for name, kind in rrsets if kind == "TXT" and name.endswith(".arpa.")}
    assert {n.split(".")[-3] for n in reverse} == {"in-addr", "ip6"}
    assert [str(g) for g in control_record.groups] == ["239.255.77.1"]
    assert pool_record.public_key == control_record.public_key


@pytest.mark.parametrize("server_kind", ["embedded", "knot"])
def test_a_dual_stack_pools_records_give_its_routers_the_key_of_each_group(
    server_kind: str,
) -> None:
    """What the runtime publishes (A and AAAA at the name, the key at both reverse
    names), served by the embedded server or knot, answers a router's question for
    each of the pool's three groups with the pool's key."""
    run = PoolRun(loads(dual_text(pool={"private": True})), "memory", seed=3)
    records = run.pool_records()
    zone = "manycast.test."
    if server_kind == "knot":
        if not knot_available():
            pytest.skip("knot is not installed; `make dns-deps` installs it (root)")
        server: Any = KnotServer.for_pool(zone, records, TsigKey.generate("manycast-update."))
    else:
        server = EmbeddedServer.for_pool(zone, records, None)
    pool = run.topology.pool
    assert pool.group6 is not None
    with server:
        for group in (int(pool.group), int(pool.group6), int(pool.control_group)):
            answer = lookup_key(group, server.address, timeout=5.0)
            assert answer.reason is None, answer.detail
            assert answer.public_key == run.nodes.directory[group]
    run.close()


# -- on real sockets -----------------------------------------------------------------------


def test_a_private_dual_stack_pool_on_the_overlay_with_its_own_dns_server() -> None:
    """The run serves the pool's records (A and AAAA, both reverse names) on its own
    DNS server, and every router fetches each group's key by its reverse name."""
    topo = loads(dual_text(pool={"private": True}, extra=OUTSIDERS, misses=20))
    run = patient(PoolRun(topo, "overlay", seed=5, base_port=free_base_port(topo.attachment_count)))
    routers = run.nodes.routers
    done, summary = run_pool_until(
        run,
        every(
            run,
            0.05,
            lambda: (
                run.now >= 4.0
                and served_now(run)
                and requests_ok(run) > 24 * 4 * 2
                and routers["ra"].stats.rejected["unauthorized sender"] >= 8
            ),
        ),
    )
    assert run.dns_address is not None
    assert done, f"not there after {DEADLINE} s: {summary}"
    assert_members_served_and_outsiders_refused(run, summary)
    assert not any(r.stats.rejected["no key"] for r in routers.values())


def test_a_dual_stack_pool_on_the_overlay_serves_everyone_through_a_share_change() -> None:
    text = dual_text(misses=20, scenario=[(1.5, "set_share", "s1", "share = 0.1")])
    topo = loads(text)
    run = patient(PoolRun(topo, "overlay", seed=5, base_port=free_base_port(topo.attachment_count)))
    changed = Settled(run, lambda alloc: float(alloc.share("s1")) < 0.2, since=1.5)
    done, summary = run_pool_until(
        run,
        every(
            run,
            0.05,
            lambda: run.now >= 3.0 and changed() and served_now(run) and requests_ok(run) > 24 * 4,
        ),
    )
    assert done, f"not settled after {DEADLINE} s: {summary}"
    assert summary["clients_served_at_end"] == 24
    assert summary["state_lost"] == 0


def test_the_overlay_sends_both_families_cache_hits_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dual-stack router's cache hits of either family are sent by the overlay
    (the IPv4 logic's fast path and the IPv6 logic's) through a share change: of
    each family's packets to its group, the routers take fewer themselves than
    the overlay sends for them, and every client is served."""
    credited = {4: 0, 6: 0}  # copies the overlay sent from each family's tables
    own = {4: 0, 6: 0}  # packets to the family's group the routers took themselves
    credit, receive = FastPath.credit, DualStackRouter.receive
    # Where each family's destination address sits in its header.
    where = {4: slice(16, 20), 6: slice(24, 40)}
    groups: dict[int, bytes] = {
        ipaddress.ip_address(g).version: ipaddress.ip_address(g).packed for g in GROUPS
    }

    def counting(self: FastPath, copies: int) -> None:
        credited[self.family] += copies
        credit(self, copies)

    def taking(self: DualStackRouter, iface: str, packet: bytes, now: float) -> None:
        family = packet[0] >> 4
        if family in where and packet[where[family]] == groups[family]:
            own[family] += 1
        receive(self, iface, packet, now)

    monkeypatch.setattr(FastPath, "credit", counting)
    monkeypatch.setattr(DualStackRouter, "receive", taking)
    text = dual_text(misses=20, scenario=[(1.5, "set_share", "s1", "share = 0.1")])
    # Links without emulated delay: the fast path sends only where nothing is emulated.
    topo = loads(re.sub(r"delay_ms = \d+", "delay_ms = 0", text))
    run = patient(PoolRun(topo, "overlay", seed=5, base_port=free_base_port(topo.attachment_count)))
    changed = Settled(run, lambda alloc: float(alloc.share("s1")) < 0.2, since=1.5)
    done, summary = run_pool_until(
        run,
        every(
            run,
            0.05,
            lambda: run.now >= 3.0 and changed() and served_now(run) and requests_ok(run) > 24 * 4,
        ),
    )
    assert done, f"not settled after {DEADLINE} s: {summary}"
    assert summary["clients_served_at_end"] == 24
    assert summary["state_lost"] == 0
    # The routers' own path still takes each cell's first packet and those after each
    # membership change. (IPv4's copies include the control channel's: its group
    # goes by the same tables; IPv6 carries only the clients'.)
    assert own[4] and own[6], own
    assert credited[4] > own[4] and credited[6] > own[6], (credited, own)


# -- coordination in etcd -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(etcd_path() is None, reason=ETCD_MISSING)
def test_a_dual_stack_pool_coordinated_in_etcd_serves_both_families_through_a_death() -> None:
    """coordination = "etcd" (a real one-member etcd on loopback, the pool on the
    overlay): each member key holds its server's IPv4 address (the control channel's);
    the coordinator removes a dead server once its lease runs out, tells the routers
    of its death in both families, and the dead server's clients of either family are
    served again by the owners of their buckets."""
    from test_etcd_coordination import history, member

    with EtcdCluster(1) as cluster:
        pool = "dual.etcd.test"
        keys = {"name": pool, "coordination": "etcd", "etcd": cluster.urls, "lease_s": 2}
        topo = loads(dual_text(pool=keys, misses=20))
        run = patient(
            PoolRun(topo, "overlay", seed=3, base_port=free_base_port(topo.attachment_count))
        )
        everyone = ["s1", "s2", "s3", "s4"]
        try:
            started = every(run, 0.05, lambda: agreed_on(run, everyone) and served_now(run))
            assert run.network.run_until(20.0, started), run.summary()
            for name in everyone:
                address = member(cluster.urls[0], pool, name).address
                assert address == run.nodes.servers[name].address and address.version == 4
            run.kill_server("s3")
            survivors = ["s1", "s2", "s4"]

            def recovered() -> bool:
                joined = [r.membership() for r in run.nodes.routers.values()]
                return (
                    agreed_on(run, survivors)
                    and all(len(j[GROUPS[0]]) == len(j[GROUPS[1]]) == 3 for j in joined)
                    and served_now(run)
                )

            assert run.network.run_until(run.now + 20.0, every(run, 0.05, recovered)), run.summary()
            last = history(cluster.urls[0], pool, topo.pool.space)[-1]
            assert last.why == "remove s3" and last.state.allocation.servers == tuple(survivors)
            allocation = last.state.allocation
            assert topo.pool.space6 is not None
            six = in_space(allocation, topo.pool.space6)
            owners = dict(run.live_view().owners)
            for name, client in run.nodes.clients.items():
                by = allocation if client.address.version == 4 else six
                assert owners[name] == by.owner(client.address), name
            assert {c.address.version for c in run.nodes.clients.values()} == {4, 6}
        finally:
            run.close()


def agreed_on(run: PoolRun, names: list[str]) -> bool:
    """Every one of `names` holds one allocation, of exactly them."""
    cores = [run.nodes.servers[n].coordinator for n in names]
    allocation = cores[0].allocation
    return (
        len({c.view for c in cores}) == 1
        and allocation is not None
        and allocation.servers == tuple(names)
    )
