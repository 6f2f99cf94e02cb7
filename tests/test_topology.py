"""Topology files: the shipped demo loads, mistakes are reported with their line,
and the compiled addresses and routes are the documented ones."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from importlib.resources import files
from ipaddress import IPv4Address, IPv4Network

import pytest

from manycast.errors import ConfigError, ManycastError
from manycast.policy import PolicyName
from manycast.pool import build
from manycast.protocol.technique import Technique
from manycast.steps import (
    STEP_TYPES,
    Action,
    Add,
    ClientRate,
    Kill,
    KillVipRouter,
    Rebalance,
    SetShare,
)
from manycast.topology import (
    Approach,
    Topology,
    TopologyError,
    VipRouterSpec,
    builtin,
    load,
    loads,
)
from manycast.topology.compiler import STEP_READERS

BASE = """\
[pool]
group = "232.1.1.1"
policy = "equal"

[[router]]
name = "ra"
[[router]]
name = "core"
[[router]]
name = "rs"

[[link]]
between = ["ra", "core"]
delay_ms = 2
[[link]]
between = ["core", "rs"]
delay_ms = 1

[[server]]
name = "s1"
router = "rs"
[[server]]
name = "s2"
router = "rs"
subnet = "192.168.7.0/30"

[[clients]]
name = "a"
count = 5
router = "ra"
subnet = "10.1.0.0/24"

[[scenario]]
at = 1.0
action = "kill"
server = "s1"
"""

MARK = "# <-"


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def marked_line(text: str) -> int:
    [line] = [n for n, body in enumerate(text.splitlines(), 1) if MARK in body]
    return line


def error_of(text: str) -> str:
    with pytest.raises(TopologyError) as caught:
        loads(text, "pool.toml")
    return str(caught.value)


# -- the shipped demo ---------------------------------------------------------------------


def test_demo_loads_as_documented() -> None:
    topo = builtin("demo")
    path = files("manycast").joinpath("topologies", "demo.toml")
    assert load(str(path)).interfaces == topo.interfaces
    assert sorted(topo.routers) == ["core", "ra", "rb", "rs1", "rs2"]
    assert {n: s.standby for n, s in topo.servers.items()} == {
        "s1": False,
        "s2": False,
        "s3": False,
        "s4": False,
        "s5": True,
    }
    assert len(topo.clients) == 240
    assert topo.pool.group == IPv4Address("232.1.1.1")
    assert topo.pool.technique == "R1"
    assert [(s.at, s.action) for s in topo.scenario] == [
        (5.0, "set_share"),
        (10.0, "kill"),
        (15.0, "add"),
    ]
    first = topo.scenario[0]
    assert isinstance(first, SetShare)
    assert (first.server, first.share) == ("s1", Fraction(1, 5))
    assert topo.duration == 20.0


def test_unknown_builtin_is_an_error() -> None:
    with pytest.raises(TopologyError, match="no built-in topology named 'nope'"):
        builtin("nope")


def test_missing_file_is_an_error_naming_it(tmp_path) -> None:
    with pytest.raises(TopologyError, match=r"absent\.toml: cannot read"):
        load(tmp_path / "absent.toml")


# -- errors name the line --------------------------------------------------------------


LINE_ERRORS = {
    "unknown key": (
        edit('name = "s1"\nrouter = "rs"\n', f'name = "s1"\nrouter = "rs"\nwieght = 2  {MARK}\n'),
        "unknown key 'wieght' in [server]",
    ),
    "unknown pool key": (
        edit('policy = "equal"', f'policy = "equal"\ngroup_address = "x"  {MARK}'),
        "unknown key 'group_address' in [pool]",
    ),
    "unknown section": (
        BASE + f"[[routers]]  {MARK}\nname = 'x'\n",
        "unknown section 'routers'",
    ),
    "bad address": (
        edit('group = "232.1.1.1"', f'group = "232.1.1.300"  {MARK}'),
        "'group' = '232.1.1.300' is not an IPv4 address",
    ),
    "group not multicast": (
        edit('group = "232.1.1.1"', f'group = "10.0.0.1"  {MARK}'),
        "group 10.0.0.1 is not a multicast address",
    ),
    "link to a server": (
        edit('between = ["core", "rs"]', f'between = ["core", "s1"]  {MARK}'),
        "link: 's1' is not a router",
    ),
    "link to nothing": (
        edit('between = ["core", "rs"]', f'between = ["core", "rz"]  {MARK}'),
        "link: 'rz' is not a router",
    ),
    "link to itself": (
        edit('between = ["core", "rs"]', f'between = ["core", "core"]  {MARK}'),
        "a link needs two different routers",
    ),
    "link of three": (
        edit('between = ["core", "rs"]', f'between = ["core", "rs", "ra"]  {MARK}'),
        "'between' must name two routers",
    ),
    "server on unknown router": (
        edit('name = "s1"\nrouter = "rs"', f'name = "s1"\nrouter = "rx"  {MARK}'),
        "server s1: no router named 'rx'",
    ),
    "unknown server in scenario": (
        edit('server = "s1"', f'server = "s9"  {MARK}'),
        "no server named 's9'",
    ),
    "unknown action": (
        edit('action = "kill"', f'action = "reboot"  {MARK}'),
        "action 'reboot': expected one of",
    ),
    "adding a running server": (
        edit('action = "kill"\nserver = "s1"', f'action = "add"\nserver = "s1"  {MARK}'),
        "server s1 is not on standby",
    ),
    "subnet too small": (
        edit('subnet = "10.1.0.0/24"', f'subnet = "10.1.0.0/30"  {MARK}'),
        "subnet 10.1.0.0/30 is too small for a router and 5 clients",
    ),
    "overlapping subnets": (
        BASE + "[[clients]]\nname = 'b'\nrouter = 'ra'\n" + f"subnet = '10.1.0.128/25'  {MARK}\n",
        "subnet 10.1.0.128/25 overlaps 10.1.0.0/24",
    ),
    "strict subnet": (
        edit('subnet = "10.1.0.0/24"', f'subnet = "10.1.0.7/24"  {MARK}'),
        "'subnet' = '10.1.0.7/24': 10.1.0.7/24 has host bits set",
    ),
    "name used twice": (
        edit('name = "s2"', f'name = "core"  {MARK}'),
        "name 'core' is already used by a router",
    ),
    "bad name": (
        edit('name = "ra"', f'name = "Edge Router"  {MARK}'),
        "'name' = 'Edge Router': use lower-case letters",
    ),
    "out of range": (
        edit("delay_ms = 1", f"delay_ms = 1\nloss = 1.5  {MARK}"),
        "'loss' = 1.5 is outside [0.0, 0.99]",
    ),
    "wrong type": (
        edit("count = 5", f'count = "five"  {MARK}'),
        "'count' must be a number, not str",
    ),
    "boolean for a number": (
        edit("count = 5", f"count = true  {MARK}"),
        "'count' must be a number, not a boolean",
    ),
    "ipv4 group in an ipv6 space": (
        edit(
            'group = "232.1.1.1"\npolicy = "equal"',
            f'group = "232.1.1.1"  {MARK}\npolicy = "equal"\nspace = "2001:db8::/32"',
        ),
        "'group' = '232.1.1.1' is not an IPv6 address (the pool's space is IPv6",
    ),
    "unknown policy": (
        edit('policy = "equal"', f'policy = "fair"  {MARK}'),
        "policy 'fair': expected one of equal, weighted, striped",
    ),
    "unknown technique": (
        edit('policy = "equal"', f'policy = "equal"\ntechnique = "r9"  {MARK}'),
        "technique 'R9': expected one of R1, R2, R3, R4",
    ),
}


def test_unknown_action_lists_every_action() -> None:
    error = error_of(edit('action = "kill"', 'action = "reboot"'))
    assert "expected one of set_share, kill, add, rebalance, client_rate" in error
    assert "kill_vip_router" in error


def test_topology_error_is_a_config_error() -> None:
    assert issubclass(TopologyError, ConfigError)
    assert issubclass(TopologyError, ManycastError)
    assert issubclass(TopologyError, ValueError)  # what callers caught before


@pytest.mark.parametrize(("text", "message"), LINE_ERRORS.values(), ids=LINE_ERRORS.keys())
def test_error_names_the_line(text: str, message: str) -> None:
    error = error_of(text)
    assert error.startswith(f"pool.toml:{marked_line(text)}: "), error
    assert message in error


def test_toml_syntax_error_names_the_line() -> None:
    text = edit('name = "core"', f'name = "core  {MARK}')
    error = error_of(text)
    assert error.startswith("pool.toml: ")
    assert f"line {marked_line(text)}" in error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "[[router]]\nname = 'island'\n", "cannot reach island: add [[link]]s"),
        (
            BASE.replace('router = "rs"\n', 'router = "rs"\nstandby = true\n'),
            "at least one [[server]] that is not on standby",
        ),
        ("[pool]\n", "a topology needs at least one [[router]]"),
    ],
    ids=["unreachable router", "no active server", "no router"],
)
def test_whole_topology_errors(text: str, message: str) -> None:
    assert message in error_of(text)


@pytest.mark.parametrize(
    "text",
    [
        edit('subnet = "192.168.7.0/30"', f'subnet = "192.168.7.1/32"  {MARK}'),
        edit('subnet = "192.168.7.0/30"', f'subnet = "192.168.7.0/31"  {MARK}'),
        # A link's subnet errors name its [[link]] table.
        edit(
            '[[link]]\nbetween = ["core", "rs"]', f'[[link]]  {MARK}\nbetween = ["core", "rs"]'
        ).replace("delay_ms = 1", 'delay_ms = 1\nsubnet = "10.255.9.9/32"'),
    ],
    ids=["server /32", "server /31", "link /32"],
)
def test_subnet_without_room_for_two_hosts_is_too_small(text: str) -> None:
    error = error_of(text)
    assert error.startswith(f"pool.toml:{marked_line(text)}: ")
    assert "is too small" in error


def test_link_listed_twice_in_either_order_is_refused() -> None:
    text = BASE + f'[[link]]  {MARK}\nbetween = ["rs", "core"]\n'
    error = error_of(text)
    assert error.startswith(f"pool.toml:{marked_line(text)}: ")
    assert "routers rs and core are linked twice" in error


@pytest.mark.parametrize(
    "text",
    [
        edit('subnet = "10.1.0.0/24"', f'subnet = "224.1.0.0/24"  {MARK}'),
        edit('subnet = "192.168.7.0/30"', f'subnet = "239.0.0.0/30"  {MARK}'),
    ],
    ids=["clients", "server"],
)
def test_multicast_subnet_is_refused(text: str) -> None:
    error = error_of(text)
    assert error.startswith(f"pool.toml:{marked_line(text)}: ")
    assert "is multicast" in error


# -- addresses and routes, as documented ----------------------------------------------------


@pytest.fixture(scope="module")
def topo() -> Topology:
    return loads(BASE)


def addresses(topo: Topology, node: str) -> dict[str, tuple[str, str]]:
    return {name: (str(i.address), str(i.network)) for name, i in topo.interfaces[node].items()}


def test_router_links_get_slash30s_from_10_255(topo: Topology) -> None:
    assert addresses(topo, "ra")["eth0"] == ("10.255.0.1", "10.255.0.0/30")
    assert addresses(topo, "core")["eth0"] == ("10.255.0.2", "10.255.0.0/30")
    assert addresses(topo, "core")["eth1"] == ("10.255.0.5", "10.255.0.4/30")
    assert addresses(topo, "rs")["eth0"] == ("10.255.0.6", "10.255.0.4/30")
    assert topo.router_ifaces == {"ra": {"eth0"}, "core": {"eth0", "eth1"}, "rs": {"eth0"}}


def test_servers_get_their_own_subnet(topo: Topology) -> None:
    # s1: a /30 from 10.254.0.0/16, router first; s2: the subnet it names.
    assert addresses(topo, "s1") == {"eth0": ("10.254.0.2", "10.254.0.0/30")}
    assert addresses(topo, "s2") == {"eth0": ("192.168.7.2", "192.168.7.0/30")}
    assert topo.gateways["s1"] == ("eth0", IPv4Address("10.254.0.1"))
    assert topo.gateways["s2"] == ("eth0", IPv4Address("192.168.7.1"))
    assert topo.address("s2") == IPv4Address("192.168.7.2")


def test_client_lan_router_takes_the_first_address(topo: Topology) -> None:
    lan = topo.links["ra-a"]
    assert addresses(topo, "ra")["eth1"] == ("10.1.0.1", "10.1.0.0/24")
    assert [str(topo.address(f"a{i}")) for i in range(1, 6)] == [f"10.1.0.{i}" for i in range(2, 7)]
    assert {m.node for m in lan.members} == {"ra", "a1", "a2", "a3", "a4", "a5"}
    assert all(topo.gateways[f"a{i}"][1] == IPv4Address("10.1.0.1") for i in range(1, 6))
    assert lan.delay == pytest.approx(0.001)  # delay_ms defaults to 1


def test_routes_reach_every_network_by_the_first_hop(topo: Topology) -> None:
    table = {str(r.network): (r.iface, r.next_hop) for r in topo.routes["ra"]}
    core = IPv4Address("10.255.0.2")
    assert table == {
        "10.255.0.0/30": ("eth0", None),
        "10.1.0.0/24": ("eth1", None),
        "10.255.0.4/30": ("eth0", core),
        "10.254.0.0/30": ("eth0", core),
        "192.168.7.0/30": ("eth0", core),
    }
    prefixes = [r.network.prefixlen for r in topo.routes["ra"]]
    assert prefixes == sorted(prefixes, reverse=True)  # longest prefix first
    back = {str(r.network): (r.iface, r.next_hop) for r in topo.routes["rs"]}
    assert back["10.1.0.0/24"] == ("eth0", IPv4Address("10.255.0.5"))


@pytest.mark.parametrize(("direct_ms", "via"), [(10, "core"), (1, "rs")])
def test_routes_are_shortest_by_delay(direct_ms: int, via: str) -> None:
    text = BASE + f'[[link]]\nbetween = ["ra", "rs"]\ndelay_ms = {direct_ms}\n'
    topo = loads(text)
    [route] = [r for r in topo.routes["ra"] if r.network == IPv4Network("192.168.7.0/30")]
    peer = {
        link.name: next(m for m in link.members if m.node != "ra")
        for link in topo.links.values()
        if any(m.node == "ra" for m in link.members)
    }
    hop = next(p for p in peer.values() if p.address == int(route.next_hop))
    assert hop.node == via


def test_overlay_endpoints_count_up_in_name_order(topo: Topology) -> None:
    ports = topo.endpoints(base_port=50000)
    pairs = sorted(ports)
    assert [ports[p][1] for p in pairs] == list(range(50000, 50000 + len(pairs)))
    assert all(host == "127.0.0.1" for host, _ in ports.values())
    assert len(pairs) == sum(len(i) for i in topo.interfaces.values())


# -- typed scenario steps, enums, layering ----------------------------------------------------

SCENARIO = (
    BASE.replace('subnet = "192.168.7.0/30"\n', 'subnet = "192.168.7.0/30"\nstandby = true\n')
    + """
[[clients]]
name = "edge2"
router = "ra"
subnet = "10.2.0.0/24"

[[scenario]]
at = 4.0
action = "client_rate"
clients = "edge2"
rate = 7

[[scenario]]
at = 2.0
action = "set_share"
server = "s1"
share = 0.2

[[scenario]]
at = 3
action = "add"
server = "s2"

[[scenario]]
at = 5.0
action = "rebalance"
"""
)


def test_scenario_steps_are_typed_and_keep_their_line() -> None:
    topo = loads(SCENARIO)
    headers = [n for n, body in enumerate(SCENARIO.splitlines(), 1) if body == "[[scenario]]"]
    kill, rate, share, add, rebalance = headers
    assert topo.scenario == [
        Kill(at=1.0, line=kill, server="s1"),
        SetShare(at=2.0, line=share, server="s1", share=Fraction(1, 5)),
        Add(at=3.0, line=add, server="s2"),
        ClientRate(at=4.0, line=rate, clients="edge2", rate=7.0),
        Rebalance(at=5.0, line=rebalance, target=1.1),
    ]
    assert [s.describe() for s in topo.scenario[:2]] == [
        "kill server=s1",
        "set_share server=s1 share=1/5",
    ]


def test_every_action_has_a_reader() -> None:
    assert set(STEP_READERS) == set(Action)


def test_technique_and_policy_are_enums() -> None:
    pool = loads(edit('policy = "equal"', 'policy = "striped"\ntechnique = "r3"')).pool
    assert pool.technique is Technique.R3
    assert pool.policy is PolicyName.STRIPED
    assert pool.technique == "R3" and pool.policy == "striped"  # still strings


def test_topology_imports_no_driver() -> None:
    # The package's own __init__ is skipped: this is about what the topology imports.
    code = (
        "import importlib.util, sys, types\n"
        "spec = importlib.util.find_spec('manycast')\n"
        "package = types.ModuleType('manycast')\n"
        "package.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['manycast'] = package\n"
        "import manycast.topology\n"
        "print(sorted(m for m in sys.modules if m.startswith('manycast.drivers')"
        " or m.split('.')[0] in ('asyncio', 'dns', 'cryptography')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"


# -- the virtual-IP pool: approach, vip, [[vip_router]], kill_vip_router ------------------------

VIP = (
    edit('group = "232.1.1.1"\n', 'approach = "vip"\nvip = "203.0.113.80"\n')
    + """
[[vip_router]]
name = "v1"
router = "core"
[[vip_router]]
name = "v2"
router = "rs"
subnet = "192.168.9.0/30"

[[scenario]]
at = 2.0
action = "kill_vip_router"
vip_router = "v1"
"""
)


@pytest.fixture(scope="module")
def vip() -> Topology:
    return loads(VIP)


def test_vip_builtin_loads_as_documented() -> None:
    topo = builtin("vip")
    path = files("manycast").joinpath("topologies", "vip.toml")
    assert load(str(path)).interfaces == topo.interfaces
    assert topo.pool.approach is Approach.VIP
    assert topo.pool.vip == topo.pool.group == IPv4Address("203.0.113.80")
    assert topo.pool.control_group == IPv4Address("239.255.77.1")
    assert topo.vip_routers == {
        "vr1": VipRouterSpec("vr1", "core"),
        "vr2": VipRouterSpec("vr2", "rs1"),
    }
    assert {n: s.standby for n, s in topo.servers.items()} == {
        "s1": False,
        "s2": False,
        "s3": False,
        "s4": False,
        "s5": True,
    }
    assert len(topo.clients) == 120
    assert {c.group for c in topo.clients.values()} == {"a", "b"}
    assert [(s.at, s.action) for s in topo.scenario] == [
        (5.0, "set_share"),
        (10.0, "kill_vip_router"),
        (15.0, "add"),
    ]
    assert topo.scenario[1] == KillVipRouter(at=10.0, line=topo.scenario[1].line, vip_router="vr1")
    assert topo.duration == 20.0
    # Both client LANs' routers are nearer vr1; vr2 is what is left when vr1 dies.
    assert [topo.hops(r, "vr1") for r in ("ra", "rb")] == [1, 1]
    assert [topo.hops(r, "vr2") for r in ("ra", "rb")] == [2, 2]


def test_a_manycast_pool_is_the_default(topo: Topology) -> None:
    assert topo.pool.approach is Approach.MANYCAST and topo.pool.vip is None
    assert topo.vip_routers == {}
    assert Approach.VIP == "vip"  # a StrEnum: still a string
    explicit = loads(edit('policy = "equal"', 'policy = "equal"\napproach = "manycast"'))
    assert explicit.pool == topo.pool


def test_a_vip_pool_has_no_group_of_its_own(vip: Topology) -> None:
    # pool.group is the service address in both approaches: here the VIP.
    assert vip.pool.approach is Approach.VIP
    assert vip.pool.vip == vip.pool.group == IPv4Address("203.0.113.80")
    assert vip.pool.control_group == IPv4Address("239.255.77.1")  # coordination is unchanged


def test_vip_routers_are_attached_and_routed_like_servers(vip: Topology) -> None:
    assert vip.vip_routers == {"v1": VipRouterSpec("v1", "core"), "v2": VipRouterSpec("v2", "rs")}
    assert [vip.kind(n) for n in ("v1", "v2", "s1", "core", "a1")] == [
        "vip_router",
        "vip_router",
        "server",
        "router",
        "client",
    ]
    # v1 takes the next automatic /30 after the servers'; v2 the subnet it names.
    assert addresses(vip, "v1") == {"eth0": ("10.254.0.6", "10.254.0.4/30")}
    assert addresses(vip, "v2") == {"eth0": ("192.168.9.2", "192.168.9.0/30")}
    assert addresses(vip, "core")["eth2"] == ("10.254.0.5", "10.254.0.4/30")
    assert vip.gateways["v1"] == ("eth0", IPv4Address("10.254.0.5"))
    assert vip.gateways["v2"] == ("eth0", IPv4Address("192.168.9.1"))
    assert {m.node for m in vip.links["core-v1"].members} == {"core", "v1"}
    table = {str(r.network): (r.iface, r.next_hop) for r in vip.routes["ra"]}
    core = IPv4Address("10.255.0.2")
    assert table["10.254.0.4/30"] == ("eth0", core)
    assert table["192.168.9.0/30"] == ("eth0", core)
    assert {str(r.network): r.next_hop for r in vip.routes["core"]}["10.254.0.4/30"] is None
    # The routers' router-facing interfaces do not include a VIP router's link.
    assert vip.router_ifaces["core"] == {"eth0", "eth1"}
    ports = vip.endpoints(base_port=50000)
    assert ("v1", "eth0") in ports and ("v2", "eth0") in ports
    assert vip.attachment_count == len(ports) == loads(BASE).attachment_count + 4


def test_vip_routers_keep_the_servers_addresses(vip: Topology, topo: Topology) -> None:
    for node in ("s1", "s2", "a1", "ra", "rs"):
        assert vip.interfaces[node].items() >= topo.interfaces[node].items(), node


def test_run_hosts_may_place_a_vip_router() -> None:
    text = VIP + '\n[run]\nhosts = { v2 = "192.0.2.10" }\n'
    assert loads(text).endpoints()[("v2", "eth0")][0] == "192.0.2.10"


def test_kill_vip_router_step_is_typed_and_keeps_its_line(vip: Topology) -> None:
    [line] = [
        n
        for n, body in enumerate(VIP.splitlines(), 1)
        if body == "[[scenario]]" and VIP.splitlines()[n].startswith("at = 2.0")
    ]
    step = vip.scenario[1]
    assert step == KillVipRouter(at=2.0, line=line, vip_router="v1")
    assert step.describe() == "kill_vip_router vip_router=v1"
    assert step.disruptive
    assert STEP_TYPES[Action.KILL_VIP_ROUTER] is KillVipRouter
    assert Action.KILL_VIP_ROUTER == "kill_vip_router"


VIP_LINE_ERRORS = {
    "unknown approach": (
        edit('policy = "equal"', f'policy = "equal"\napproach = "anycast"  {MARK}'),
        "approach 'anycast': expected one of manycast, vip",
    ),
    "vip in a manycast pool": (
        edit('policy = "equal"', f'policy = "equal"\nvip = "203.0.113.80"  {MARK}'),
        "'vip' is for a VIP pool: set approach = \"vip\"",
    ),
    "vip pool without vip": (
        edit('approach = "vip"\nvip = "203.0.113.80"', f'approach = "vip"  {MARK}', VIP),
        "approach = \"vip\" needs 'vip', the pool's well-published unicast address",
    ),
    "vip not an address": (
        edit('vip = "203.0.113.80"', f'vip = "203.0.113.800"  {MARK}', VIP),
        "'vip' = '203.0.113.800' is not an IPv4 address",
    ),
    "vip multicast": (
        edit('vip = "203.0.113.80"', f'vip = "232.1.1.1"  {MARK}', VIP),
        "vip 232.1.1.1 is multicast: the VIP is a unicast address",
    ),
    "vip unspecified": (
        edit('vip = "203.0.113.80"', f'vip = "0.0.0.0"  {MARK}', VIP),
        "vip 0.0.0.0 cannot be a host's address",
    ),
    "vip pool with a group": (
        edit('policy = "equal"', f'policy = "equal"\ngroup = "232.1.1.1"  {MARK}', VIP),
        "a VIP pool's clients send to its vip: leave out 'group'",
    ),
    "vip inside a client lan": (
        edit('vip = "203.0.113.80"', f'vip = "10.1.0.9"  {MARK}', VIP),
        "vip 10.1.0.9 is inside subnet 10.1.0.0/24 (link ra-a)",
    ),
    "vip is a server's address": (
        edit('vip = "203.0.113.80"', f'vip = "10.254.0.2"  {MARK}', VIP),
        "vip 10.254.0.2 is inside subnet 10.254.0.0/30 (link rs-s1)",
    ),
    "vip inside a vip router's link": (
        edit('vip = "203.0.113.80"', f'vip = "192.168.9.1"  {MARK}', VIP),
        "vip 192.168.9.1 is inside subnet 192.168.9.0/30 (link rs-v2)",
    ),
    "vip inside a router link": (
        edit('vip = "203.0.113.80"', f'vip = "10.255.0.3"  {MARK}', VIP),
        "vip 10.255.0.3 is inside subnet 10.255.0.0/30 (link ra-core)",
    ),
    "vip router in a manycast pool": (
        BASE + f"[[vip_router]]  {MARK}\nname = 'v1'\nrouter = 'core'\n",
        '[[vip_router]] needs [pool] approach = "vip" (this pool is manycast)',
    ),
    "vip pool without vip routers": (
        edit('approach = "vip"', f'approach = "vip"  {MARK}', VIP.split("\n[[vip_router]]")[0]),
        "a VIP pool needs at least one [[vip_router]] (two to survive one's death)",
    ),
    "vip router on unknown router": (
        edit('name = "v1"\nrouter = "core"', f'name = "v1"\nrouter = "rx"  {MARK}', VIP),
        "vip_router v1: no router named 'rx'",
    ),
    "vip router name taken": (
        edit('name = "v1"', f'name = "s1"  {MARK}', VIP),
        "name 's1' is already used by a server",
    ),
    "name taken by a vip router": (
        VIP + f"[[clients]]\nname = 'v'  {MARK}\nrouter = 'ra'\nsubnet = '10.9.0.0/24'\n",
        "client name 'v1' clashes with a vip_router",
    ),
    "vip router bad name": (
        edit('name = "v1"', f'name = "V 1"  {MARK}', VIP),
        "'name' = 'V 1': use lower-case letters",
    ),
    "vip router unknown key": (
        edit('name = "v1"', f'name = "v1"\nweight = 2  {MARK}', VIP),
        "unknown key 'weight' in [vip_router]",
    ),
    "vip router subnet overlaps": (
        edit('subnet = "192.168.9.0/30"', f'subnet = "192.168.7.0/30"  {MARK}', VIP),
        "subnet 192.168.7.0/30 overlaps 192.168.7.0/30",
    ),
    "vip router subnet too small": (
        edit('subnet = "192.168.9.0/30"', f'subnet = "192.168.9.0/31"  {MARK}', VIP),
        "subnet 192.168.9.0/31 is too small",
    ),
    "kill of an unknown vip router": (
        edit('vip_router = "v1"', f'vip_router = "v9"  {MARK}', VIP),
        "no [[vip_router]] named 'v9'",
    ),
    "kill_vip_router in a manycast pool": (
        edit(
            'action = "kill"\nserver = "s1"',
            f'action = "kill_vip_router"\nvip_router = "v1"  {MARK}',
        ),
        "no [[vip_router]] named 'v1'",
    ),
    "kill_vip_router naming a server": (
        edit('vip_router = "v1"', f'vip_router = "s1"  {MARK}', VIP),
        "no [[vip_router]] named 's1'",
    ),
}


@pytest.mark.parametrize(("text", "message"), VIP_LINE_ERRORS.values(), ids=VIP_LINE_ERRORS.keys())
def test_vip_error_names_the_line(text: str, message: str) -> None:
    error = error_of(text)
    assert error.startswith(f"pool.toml:{marked_line(text)}: "), error
    assert message in error


def test_kill_vip_router_needs_its_name() -> None:
    text = edit('vip_router = "v1"\n', "", VIP)
    assert "[scenario] needs 'vip_router'" in error_of(text)


def test_a_private_vip_pool_checks_only_its_control_group() -> None:
    private = edit('policy = "equal"', 'policy = "equal"\nprivate = true', VIP)
    assert loads(private).pool.private  # the VIP is unicast: no private range applies
    outside = edit(
        "private = true", f'private = true\ncontrol_group = "224.1.1.1"  {MARK}', private
    )
    error = error_of(outside)
    assert error.startswith(f"pool.toml:{marked_line(outside)}: ")
    assert "a private pool's control_group 224.1.1.1 is outside the private ranges" in error


# -- lookups the nodes need: hops and edge routers ---------------------------------------------


def test_hops_count_router_to_router_hops_to_a_nodes_router(vip: Topology) -> None:
    assert vip.hops("ra", "s1") == 2  # ra -> core -> rs
    assert vip.hops("rs", "s1") == 0  # the same router
    assert vip.hops("ra", "v1") == 1
    assert vip.hops("ra", "v2") == 2
    assert vip.hops("rs", "v1") == 1
    assert vip.hops("core", "a3") == 1
    assert vip.hops("ra", "a3") == 0
    assert vip.hops("ra", "rs") == 2  # a router: the hops to itself
    assert vip.hops("core", "core") == 0
    for node in ("s1", "v1", "a1"):  # symmetric links: symmetric counts
        assert all(vip.hops(r, node) == vip.hops(vip.router_of(node), r) for r in vip.routers)
    with pytest.raises(KeyError):
        vip.hops("ra", "nobody")
    with pytest.raises(KeyError):
        vip.hops("s1", "v1")  # hops count from a router


@pytest.mark.parametrize(("direct_ms", "hops"), [(10, 2), (1, 1)])
def test_hops_follow_the_routed_path(direct_ms: int, hops: int) -> None:
    # A direct ra-rs link that is slower than going through core is not the route.
    text = VIP + f'[[link]]\nbetween = ["ra", "rs"]\ndelay_ms = {direct_ms}\n'
    topo = loads(text)
    assert topo.hops("ra", "s1") == hops
    assert topo.hops("ra", "v2") == hops
    assert topo.hops("ra", "v1") == 1


def test_edge_router_finds_the_router_of_a_non_router_link(vip: Topology) -> None:
    assert vip.edge_router(IPv4Address("10.1.0.4")) == "ra"  # a client
    assert vip.edge_router(IPv4Address("10.1.0.200")) == "ra"  # an unused LAN address
    assert vip.edge_router(IPv4Address("10.1.0.1")) == "ra"  # the router's own LAN address
    assert vip.edge_router(vip.address("s1")) == "rs"  # a server's link
    assert vip.edge_router(IPv4Address("192.168.7.2")) == "rs"
    assert vip.edge_router(vip.address("v1")) == "core"  # a VIP router's link
    assert vip.edge_router(vip.address("v2")) == "rs"
    assert vip.edge_router(IPv4Address("10.255.0.1")) is None  # a router-to-router link
    assert vip.edge_router(IPv4Address("203.0.113.80")) is None  # the VIP: nobody's link
    assert vip.edge_router(IPv4Address("198.51.100.1")) is None  # not in the topology


def test_edge_router_in_the_shipped_vip_topology() -> None:
    topo = builtin("vip")
    assert {topo.edge_router(topo.address(c)) for c in ("a1", "a60")} == {"ra"}
    assert topo.edge_router(topo.address("b7")) == "rb"
    assert topo.edge_router(topo.address("vr1")) == "core"


def test_topology_check_shows_vip_routers() -> None:
    from typer.testing import CliRunner

    from manycast.cli import app

    path = files("manycast").joinpath("topologies", "vip.toml")
    result = CliRunner().invoke(app, ["topology", "check", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "-> 203.0.113.80:7000" in result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert "vip_router" in rows["vr1"] and "vip_router" in rows["vr2"]
    assert "120 clients, 13 links, 3 scenario steps" in result.output


def test_thin_stream_clients_keep_their_rto_for_six_timeouts() -> None:
    """`thin_stream = true` gives the group's clients Linux's thin-stream linear
    timeouts; other clients back off from the first timeout."""
    text = edit('subnet = "10.1.0.0/24"\n', 'subnet = "10.1.0.0/24"\nthin_stream = true\n')
    text += '\n[[clients]]\nname = "b"\ncount = 2\nrouter = "ra"\nsubnet = "10.2.0.0/24"\n'
    nodes = build(loads(text), seed=1, wall_base=0.0)
    assert {
        c.endpoint.config.thin_linear_retries for n, c in nodes.clients.items() if n[0] == "a"
    } == {6}
    assert {
        c.endpoint.config.thin_linear_retries for n, c in nodes.clients.items() if n[0] == "b"
    } == {0}
    assert "thin_stream" in error_of(edit("count = 5\n", "count = 5\nthin_stream = 1\n"))


def test_a_client_groups_rto_cap_and_retries_reach_its_transport() -> None:
    """`rto_max_ms` caps the group's retransmission timeout (Linux's TCP_RTO_MAX_MS),
    the first SYN's timer too, and `max_retries` is its tcp_retries2; other groups keep
    the defaults. A cap below the clients' 50 ms floor, or retries that are not a
    whole number, are refused with the key's name."""
    keys = 'subnet = "10.1.0.0/24"\nrto_max_ms = 250\nmax_retries = 15\n'
    text = edit('subnet = "10.1.0.0/24"\n', keys)
    text += '\n[[clients]]\nname = "b"\ncount = 2\nrouter = "ra"\nsubnet = "10.2.0.0/24"\n'
    nodes = build(loads(text), seed=1, wall_base=0.0)
    configs = {n[0]: c.endpoint.config for n, c in nodes.clients.items()}
    assert (configs["a"].rto_max, configs["a"].max_retries, configs["a"].rto_initial) == (
        0.25,
        15,
        0.25,
    )
    assert (configs["b"].rto_max, configs["b"].max_retries, configs["b"].rto_initial) == (
        60.0,
        5,
        0.3,
    )
    assert "rto_max_ms" in error_of(edit("count = 5\n", "count = 5\nrto_max_ms = 20\n"))
    assert "max_retries" in error_of(edit("count = 5\n", "count = 5\nmax_retries = 2.5\n"))
    assert "max_retries" in error_of(edit("count = 5\n", "count = 5\nmax_retries = 0\n"))


def test_a_client_groups_deadline_and_patience_reach_its_clients() -> None:
    """`deadline_ms` is when a request fails; `abandon_after_ms` how long the client
    keeps the connection for its answer (default: no longer than the deadline). A
    connection given up before its request fails is refused, naming the key."""
    keys = 'subnet = "10.1.0.0/24"\ndeadline_ms = 1500\nabandon_after_ms = 9000\n'
    text = edit('subnet = "10.1.0.0/24"\n', keys)
    text += '\n[[clients]]\nname = "b"\ncount = 2\nrouter = "ra"\nsubnet = "10.2.0.0/24"\n'
    nodes = build(loads(text), seed=1, wall_base=0.0)
    timing = {n[0]: (c.request_timeout, c.abandon_after) for n, c in nodes.clients.items()}
    assert timing == {"a": (1.5, 9.0), "b": (2.0, 2.0)}
    shorter = error_of(edit("count = 5\n", "count = 5\nabandon_after_ms = 1000\n"))
    assert "abandon_after_ms" in shorter and "deadline_ms" in shorter
    assert "deadline_ms" in error_of(edit("count = 5\n", "count = 5\ndeadline_ms = 0\n"))
