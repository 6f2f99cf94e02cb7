"""A VIP pool's kernel data plane (seed Fig 17-18 on Linux): each server's tree is its SRv6 segment.

This kernel has no MPLS forwarding, but it has SRv6, and one SRv6 segment does
what one label-switched tree does:

* Each server has a segment id (SID), `fc00:ff::<its IPv4 address>`. The router
  the server hangs off serves it with `seg6local action End.DX4 nh4 <server>`:
  it strips the outer IPv6 header and hands the inner IPv4 packet (still to the
  VIP) to the server, the pop of a tree's last hop. Every other router routes
  the SID toward that router by the topology's routes (its unicast paths), so
  the tree follows them as the labels do.
* Putting a flow on a server's tree (a label push at the client's edge) is a
  route in the server's own table, `VIP encap seg6 mode encap segs <SID>`,
  chosen by a firewall mark: an nftables rule copies the flow's conntrack mark
  onto its packets, and the router daemon sets that mark on the flow's conntrack
  entry when a VIP router tags the flow. Conntrack ends the flow's entry (and so
  its tag) when the flow ends: FIN or RST, or idling.
* A packet to the VIP with no mark is routed to the nearest live VIP router; its
  daemon reads first packets from a packet socket (the VIP is a blackhole
  route there) and sends each, encapsulated, to the chosen server's SID.

Router links carry IPv6 beside IPv4: every IPv4 link address `a.b.c.d` also has
`fd00::a.b.c.d`, so the SIDs' routes mirror the IPv4 ones hop for hop. The
segment must be routed, not on-link, or the encapsulation would wait forever
on neighbour discovery.

On an IPv6 network (an IPv6 VIP) the same, natively: the links' own addresses
carry the SIDs' routes; a server's SID is `fc00:ff::<its mark>` (its address
does not fit in 32 bits), its last hop `End.DX6 nh6 <server>`; the VIP, its
routes, tables and rules are IPv6 (`family=10`) and the nftables rule is in a
table of family `ip6`. The encapsulation carries the client's IPv6 packet.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterable
from typing import Any

from manycast.errors import LabError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
AF_INET6 = 10

LINK_PREFIX = ipaddress.IPv6Network("fd00::/96")
SID_PREFIX = ipaddress.IPv6Network("fc00:ff::/96")
MARK_TABLE_BASE = 100  # a server's table: MARK_TABLE_BASE + its mark
RULE_PRIORITY_BASE = 1000
NFT_TABLE = "manycast"
CT_ESTABLISHED = "net.netfilter.nf_conntrack_tcp_timeout_established"
FLOW_IDLE_S = 30  # the VIP routers' flow idle time (`VipRouter.flow_idle`)


def v6_of(address: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """A router link's IPv6 address: `fd00::` and its IPv4 address."""
    return ipaddress.IPv6Address(int(LINK_PREFIX.network_address) | int(address))


def sid_of(server: Address, mark: int) -> ipaddress.IPv6Address:
    """The segment id of the tree of the server at `server`, whose mark is `mark`: its
    IPv4 address in the SID's last 32 bits, or on an IPv6 network its mark."""
    low = int(server) if server.version == 4 else mark
    return ipaddress.IPv6Address(int(SID_PREFIX.network_address) | low)


def address_of(topology: Any, node: str, version: int) -> Address:
    """A node's address of IP `version` on its link (a dual-stack host's IPv6 one)."""
    iface = topology.interfaces[node][topology.gateways[node][0]]
    if version == 6 and iface.address6 is not None:
        address: Address = iface.address6
        return address
    address = iface.address
    return address


def _host(address: Address) -> str:
    """`address` as one host's route destination."""
    return f"{address}/{address.max_prefixlen}"


def _family(address: Address) -> dict[str, int]:
    """The route arguments of `address`'s family (IPv4 is pyroute2's default)."""
    return {"family": AF_INET6} if address.version == 6 else {}


def nft_family(vip: Address) -> str:
    return "ip6" if vip.version == 6 else "ip"


def server_marks(servers: Iterable[str]) -> dict[str, int]:
    """Each server's firewall mark (and table): 1, 2, ... in name order."""
    return {name: index + 1 for index, name in enumerate(sorted(servers))}


def nft_ruleset(vip: Address) -> str:
    """A router's rule: each packet to the VIP carries its flow's conntrack mark (0 until
    a VIP router tags the flow), which picks the server's table."""
    family = nft_family(vip)
    return (
        f"table {family} {NFT_TABLE} {{\n"
        "  chain vip {\n"
        "    type filter hook prerouting priority mangle;\n"
        f"    {family} daddr {vip} ct mark != 0 counter meta mark set ct mark\n"
        "  }\n"
        "}\n"
    )


def pushed_packets(family: str = "ip") -> int | None:
    """Packets this namespace's rule put on a server's segment (tagged flows' packets),
    read from its counter (`family`: the rule's table's, `nft_family`); None when it
    cannot be read."""
    try:
        done = subprocess.run(
            ["nft", "-j", "list", "chain", family, NFT_TABLE, "vip"],
            capture_output=True,
            timeout=5,
            check=True,
        )
        found = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    for item in found.get("nftables", []):
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    return None


def load_nft(enter: Any, ruleset: str) -> None:
    """Load `ruleset` with `nft -f -`, run inside a namespace (`enter` between fork and exec)."""
    try:
        done = subprocess.run(
            ["nft", "-f", "-"],
            input=ruleset.encode(),
            preexec_fn=enter,
            capture_output=True,
            timeout=20,
            check=False,
        )
    except FileNotFoundError:
        raise LabError(
            "a VIP pool in the lab needs nftables (`nft`): run `make lab-deps` as root"
        ) from None
    if done.returncode != 0:
        raise LabError(f"nft refused the VIP rules: {done.stderr.decode(errors='replace')}")


def add_v6_address(ipr: Any, ifname: str, v4: ipaddress.IPv4Interface) -> None:
    index = ipr.link_lookup(ifname=ifname)[0]
    ipr.addr(
        "add",
        index=index,
        address=str(v6_of(v4.ip)),
        prefixlen=96 + v4.network.prefixlen,
        flags=0x02,  # IFA_F_NODAD: usable at once, as the IPv4 address is
    )


def sid_route(ipr: Any, sid: ipaddress.IPv6Address, prefixlen: int, via: str) -> None:
    ipr.route("replace", family=10, dst=f"{sid}/{prefixlen}", gateway=via)


def sid_end_dx(ipr: Any, sid: ipaddress.IPv6Address, ifname: str, server: Address) -> None:
    """The tree's last hop: decapsulate and hand the inner packet to `server` (End.DX4
    for an IPv4 packet, End.DX6 for an IPv6 one)."""
    index = ipr.link_lookup(ifname=ifname)[0]
    if server.version == 6:
        encap = {"type": "seg6local", "action": "End.DX6", "nh6": str(server)}
    else:
        encap = {"type": "seg6local", "action": "End.DX4", "nh4": str(server)}
    ipr.route("replace", family=AF_INET6, dst=f"{sid}/128", oif=index, encap=encap)


def server_table(
    ipr: Any,
    vip: Address,
    mark: int,
    sid: ipaddress.IPv6Address,
    ifname: str,
    direct: str | None,
) -> None:
    """The table a flow tagged onto one server's tree is routed by: the VIP into the
    server's segment, or (`direct`: the server is on our own link) straight to it."""
    table = MARK_TABLE_BASE + mark
    index = ipr.link_lookup(ifname=ifname)[0]
    family = _family(vip)
    if direct is not None:
        ipr.route("replace", dst=_host(vip), gateway=direct, oif=index, table=table, **family)
    else:
        encap = {"type": "seg6", "mode": "encap", "segs": str(sid)}
        ipr.route("replace", dst=_host(vip), oif=index, encap=encap, table=table, **family)
    ipr.rule("add", fwmark=mark, table=table, priority=RULE_PRIORITY_BASE + mark, **family)


def vip_route(ipr: Any, vip: Address, via: str | None) -> None:
    """Unmarked packets to the VIP: toward the nearest live VIP router (`via`), or, with
    none alive, nowhere (unreachable: the client hears so at once)."""
    if via is None:
        ipr.route("replace", dst=_host(vip), type="unreachable", **_family(vip))
    else:
        ipr.route("replace", dst=_host(vip), gateway=via, **_family(vip))


def blackhole(ipr: Any, vip: Address) -> None:
    """At a VIP router: the kernel drops what its daemon reads from the packet socket."""
    ipr.route("replace", dst=_host(vip), type="blackhole", **_family(vip))


def vip_on_loopback(ipr: Any, vip: Address) -> None:
    """A server accepts the VIP as its own and answers from it (direct server return)."""
    index = ipr.link_lookup(ifname="lo")[0]
    if vip.version == 6:  # usable at once (no duplicate address detection)
        ipr.addr("add", index=index, address=str(vip), prefixlen=128, flags=0x02)
    else:
        ipr.addr("add", index=index, address=str(vip), prefixlen=32)
