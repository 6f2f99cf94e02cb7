"""bench/kernel.py's lab: the topology, the router tuned for the measurement, the
generators, the kinds of traffic and their intervals (see kernel.py's docstring)."""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from _common import progress
from _kernel_traffic import (
    ETHTOOL_SGRO,
    ETHTOOL_STSO,
    cpu_ticks,
    dev_counters,
    ethtool,
    in_ns,
    napi_threads,
    task_seconds,
    udp_frame,
)

TOPOLOGY_TEMPLATE = """
[pool]
{pool}
port = 7000
report_interval_ms = 1000
# Slow enough that an agent held up by the load is not taken for dead: the
# membership must not change during the rounds (`entries_rewritten_during_rounds`).
heartbeat_ms = 200
heartbeat_misses = 10

[[router]]
name = "r"

[[server]]
name = "s1"
router = "r"
[[server]]
name = "s2"
router = "r"
[[server]]
name = "s3"
router = "r"
[[server]]
name = "s4"
router = "r"

[[clients]]
name = "c"
count = 1
router = "r"
subnet = "{lan_c}"
[[clients]]
name = "d"
count = 1
router = "r"
subnet = "{lan_d}"
"""
TOPOLOGY = TOPOLOGY_TEMPLATE.format(
    pool='group = "232.1.1.1"\ncontrol_group = "239.255.77.1"',
    lan_c="10.1.0.0/16",
    lan_d="10.2.0.0/16",
)
# The same on IPv6: the low bits of a source's interface identifier pick its server
# (the pool's index bits), as the low bits of an IPv4 address do.
TOPOLOGY6 = TOPOLOGY_TEMPLATE.format(
    pool='group = "ff3e::8000:1"\ncontrol_group = "ff15::77:1"\nspace = "2001:db8::/32"',
    lan_c="2001:db8:1::/64",
    lan_d="2001:db8:2::/64",
)

SERVERS = ("s1", "s2", "s3", "s4")
HOSTS = ("c1", "d1")  # one generator each
SOURCES_PER_HOST = 5120  # 10 240 in all; a whole number of TX ring blocks
FIRST_SOURCE = 0x100  # sources are <LAN>.1.0 onward
SCALE_SOURCES = 100_000  # sources with an entry before the first-packet samples
SCALE_PER_HOST = SCALE_SOURCES // 2  # <LAN>.1.0 to <LAN>.196.79
# Fresh sources for the first-packet samples, per kind, beyond the 100 000 (c1 only).
FRESH_SOURCE = {"manycast": 0xD000, "manycast_portions": 0xE000, "nftables": 0xF000}
KINDS = (
    "manycast",
    "manycast_portions",
    "manycast_mcast_routes",
    "nftables",
    "nftables_stateless",
    "unicast",
)
OURS = ("manycast", "manycast_portions", "manycast_mcast_routes")
BASELINES = ("nftables", "nftables_stateless", "unicast")
FRAMES_OF = {
    "manycast": "group",
    "manycast_portions": "group",
    "manycast_mcast_routes": "group",
    "nftables": "vip",
    "nftables_stateless": "vip",
    "unicast": "owner",
}
VIP = "10.255.0.1"
MCAST_ROUTES_V6 = (
    "nothing to add on IPv6: the kernel already routes ff00::/8 on every interface"
    " (its local table), so ip6mr's output lookup for a MIF finds a multicast route"
    " without one; the kind would be `manycast` again"
)


@dataclass(frozen=True)
class Family:
    """What differs between the IPv4 run and the IPv6 run of the same measurement."""

    version: int
    prefix: str  # the lab's namespaces are <prefix>-r, <prefix>-s1, ...
    topology: str
    vip: str
    lan_bits: int  # a client LAN's network part: its sources are that base + n
    kinds: tuple[str, ...]
    not_measured: Mapping[str, str]  # kind -> why this family does not measure it

    @property
    def nft(self) -> str:
        """nftables' name of the family (tables and address matches)."""
        return "ip" if self.version == 4 else "ip6"

    @property
    def portion_table(self) -> str:
        return "manycast" if self.version == 4 else "manycast6"

    def address(self, value: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return (ipaddress.IPv4Address if self.version == 4 else ipaddress.IPv6Address)(value)

    def group_mac(self, group: str) -> bytes:
        """The Ethernet address of a group: RFC 1112's for IPv4, RFC 2464's for IPv6."""
        if self.version == 4:
            low = int(ipaddress.IPv4Address(group)) & 0x7FFFFF
            return bytes.fromhex("01005e") + low.to_bytes(3, "big")
        return bytes.fromhex("3333") + ipaddress.IPv6Address(group).packed[-4:]


FAMILIES = {
    4: Family(4, "kb", TOPOLOGY, VIP, 0xFFFF0000, KINDS, {}),
    6: Family(
        6,
        "kb6",
        TOPOLOGY6,
        "2001:db8:ff::1",
        ((1 << 128) - 1) ^ ((1 << 64) - 1),
        tuple(k for k in KINDS if k != "manycast_mcast_routes"),
        {"manycast_mcast_routes": MCAST_ROUTES_V6},
    ),
}
KERNEL_SCRIPT = Path(__file__).resolve().with_name("kernel.py")  # --generator
GENERATOR_CPU, ROUTER_CPU = 0, 1
GENERATOR_NICE, ROUTER_NICE = -10, -20
# Per packet in the router's NAPI threads (`--profile`): route lookups and allocations.
PROFILE_EVENTS = ("fib:fib_table_lookup", "kmem:kmem_cache_alloc", "kmem:kmalloc", "skb:kfree_skb")
WARM = 0.6  # seconds of traffic before an interval's counters are read


class KernelBench:
    """The lab tuned for the measurement, its generators, and the intervals."""

    def __init__(self, lab: Any, topology: Any, directory: Path, family: Family) -> None:
        self.lab, self.topology, self.directory = lab, topology, directory
        self.family = family
        self.group = str(topology.pool.group)
        self.server_address = {s: str(topology.address(s)) for s in SERVERS}
        router = topology.interfaces["r"]
        self.router_iface = {  # host -> the router's interface on its LAN
            h: next(i.name for i in router.values() if topology.address(h) in i.network)
            for h in HOSTS
        }
        self.server_iface = {s: topology.gateways[s][0] for s in SERVERS}
        self.generators: dict[str, subprocess.Popen[bytes]] = {}
        self.napi: list[int] = []
        self.owner: dict[int, str] = {}  # source -> server, from the router's membership
        self.portions: list[tuple[int, int, str]] = []  # (value, mask, server)

    # setup ------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Servers up and agreed, each source's owner read, the lab tuned; what was
        found on the way."""
        lab = self.lab
        for s in SERVERS:
            lab.start(s, "server")
        for s in SERVERS:
            lab.wait_ready(s, "server")
        deadline = time.monotonic() + 30
        while True:  # the agents agree and each reports its portion
            status = lab.ask("r", "router", {"op": "status"})
            if len(status["membership"].get(self.group, {})) == len(SERVERS):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router never held {len(SERVERS)} members: {status}")
            time.sleep(0.5)
        facts: dict[str, Any] = {"sources_by_server": self.read_owners()}
        facts["sources"] = len(self.owner)
        self.tune()
        return facts

    def tune(self) -> None:
        lab = self.lab
        for s in SERVERS:
            iface = self.server_iface[s]
            sink = (
                f"table netdev kb_sink {{ chain ingress {{ type filter hook ingress"
                f' device "{iface}" priority 0; policy accept; udp dport 7000 counter drop\n'
                "}\n}\n"
            )
            in_ns(lab, s, "nft -f -", sink)
            in_ns(
                lab, s, f"echo {1 << GENERATOR_CPU:x} > /sys/class/net/{iface}/queues/rx-0/rps_cpus"
            )
        # A router needs no bridge netfilter (br_netfilter may be loaded on the host).
        for table in ("iptables", "ip6tables"):
            in_ns(lab, "r", f"sysctl -qw net.bridge.bridge-nf-call-{table}=0 || true")
        before = napi_threads()
        for host in HOSTS:
            port = f"{self.router_iface[host]}p0"  # the bridge port facing the host
            # veth hands a packet to the peer's NAPI only when it could aggregate it
            # (no TSO on the sender) and the peer has NAPI (GRO on).
            ethtool(lab, host, "eth0", ETHTOOL_STSO, 0)
            ethtool(lab, "r", port, ETHTOOL_SGRO, 1)
            in_ns(lab, "r", f"echo 1 > /sys/class/net/{port}/threaded")
        ports = {f"{self.router_iface[h]}p0" for h in HOSTS}
        self.napi = [
            tid
            for tid, name in napi_threads().items()
            if tid not in before and name[5:].rsplit("-", 1)[0] in ports
        ]
        if len(self.napi) != len(HOSTS):
            raise RuntimeError(f"expected {len(HOSTS)} NAPI threads, found {self.napi}")
        for tid in self.napi:
            os.sched_setaffinity(tid, {ROUTER_CPU})
            os.setpriority(os.PRIO_PROCESS, tid, ROUTER_NICE)
        os.sched_setaffinity(0, {GENERATOR_CPU})  # this process stays off the router's CPU
        # The router daemon on the CPU whose NAPI threads queue its upcalls, for both
        # families: the lab that came up second inherited CPU 0 from the line above,
        # the first's ran mostly on CPU 1, and the families' first-packet installs
        # were timed on different CPUs. No upcalls come during the rounds: the
        # daemon takes nothing from the router's threads there.
        daemon = lab.pid("r", "router")
        if daemon is not None:
            for task in os.listdir(f"/proc/{daemon}/task"):
                os.sched_setaffinity(int(task), {ROUTER_CPU})

    def read_owners(self) -> dict[str, int]:
        """Each source's owner by the masks the router holds; the sources per server."""
        members = self.lab.ask("r", "router", {"op": "status"})["membership"][self.group]
        portions = []
        for address, text in members.items():
            value, mask = (int(ipaddress.ip_address(p)) for p in text.split("/"))
            server = next(s for s, a in self.server_address.items() if a == address)
            portions.append((value, mask, server))
        self.portions = portions
        for source in self.sources():
            self.owner[source] = self.owner_of(source)
        masks = sorted({self.family.address(m).compressed for _, m, _ in portions})
        progress(f"portions: {dict(sorted(members.items()))} (masks {masks})")
        counts = {s: 0 for s in SERVERS}
        for server in self.owner.values():
            counts[server] += 1
        return counts

    def sources(
        self, host: str | None = None, first: int = FIRST_SOURCE, count: int = SOURCES_PER_HOST
    ) -> list[int]:
        hosts = HOSTS if host is None else (host,)
        bases = [int(self.topology.address(h)) & self.family.lan_bits for h in hosts]
        return [base + first + i for base in bases for i in range(count)]

    def owner_of(self, source: int) -> str:
        """The server whose portion covers `source` (the membership read by read_owners)."""
        owners = [s for v, m, s in self.portions if source & m == v]
        if len(owners) != 1:
            raise RuntimeError(f"{self.family.address(source)}: owners {owners}")
        return owners[0]

    def mac(self, node: str, iface: str) -> bytes:
        return bytes.fromhex(
            in_ns(self.lab, node, f"cat /sys/class/net/{iface}/address").strip().replace(":", "")
        )

    def start_generators(self) -> None:
        group_mac = self.family.group_mac(self.group)
        vip = self.family.vip
        for host in HOSTS:
            own, gateway = self.mac(host, "eth0"), self.mac("r", self.router_iface[host])
            folder = self.directory / host
            folder.mkdir()
            frames = {
                "group": [udp_frame(s, self.group, group_mac, own) for s in self.sources(host)],
                "vip": [udp_frame(s, vip, gateway, own) for s in self.sources(host)],
                "owner": [
                    udp_frame(s, self.server_address[self.owner[s]], gateway, own)
                    for s in self.sources(host)
                ],
            }
            for name, rows in frames.items():
                array = np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), -1)
                np.save(folder / f"{name}.npy", array)
            proc = self.lab.popen(
                host,
                [sys.executable, str(KERNEL_SCRIPT), "--generator", str(folder)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,  # its own autogroup, whose nice it sets
                env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
            )
            self.generators[host] = proc
        for host, proc in self.generators.items():
            if not self._answer(proc).get("ready"):
                raise RuntimeError(f"the generator of {host} did not start")

    def _answer(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("a generator died (its error is above)")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        generators, self.generators = self.generators, {}
        for proc in generators.values():
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "quit"}\n')
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def configure(self, kind: str, on: bool) -> None:
        """What `kind` needs on the router beyond the lab's set-up, added or removed."""
        if kind == "manycast_portions":
            # The daemon's portion plane for the group: an nftables map element per
            # portion; off again, the MFC's per-source entries forward the group.
            use = "portions" if on else "mfc"
            got = self.lab.ask("r", "router", {"op": "plane", "use": use})
            if got.get("plane") != use:
                raise RuntimeError(f"the router did not switch to the {use} plane: {got}")
            return
        if kind == "manycast_mcast_routes":
            # One 224.0.0.0/4 route per interface: ipmr's output route lookup (with the
            # VIF's interface) then finds a route and the kernel caches it; without
            # one it allocates a route for every forwarded packet.
            verb = "add" if on else "del"
            ifaces = sorted(self.topology.interfaces["r"])
            in_ns(
                self.lab,
                "r",
                "; ".join(
                    f"ip route {verb} 224.0.0.0/4 dev {i} metric {n + 1}"
                    for n, i in enumerate(ifaces)
                ),
            )
            return
        tables = {
            "nftables": ("kb_lb", "nat", "dstnat"),
            "nftables_stateless": ("kb_sl", "filter", "raw"),
        }
        if kind not in tables:
            return
        table, chain_type, priority = tables[kind]
        nft = self.family.nft  # "ip" or "ip6": the table's family and the address matches
        if not on:
            in_ns(self.lab, "r", f"nft delete table {nft} {table}")
            return
        servers = ", ".join(f"{i} : {self.server_address[s]}" for i, s in enumerate(SERVERS))
        pick = f"jhash {nft} saddr mod {len(SERVERS)} map {{ {servers} }}"
        action = f"dnat to {pick}" if kind == "nftables" else f"{nft} daddr set {pick}"
        script = (
            f"table {nft} {table} {{ chain prerouting {{ type {chain_type} hook prerouting"
            f" priority {priority}; policy accept; {nft} daddr {self.family.vip}"
            f" udp dport 7000 {action}\n}}\n}}\n"
        )
        in_ns(self.lab, "r", "nft -f -", script)

    def sunk_share(self) -> float:
        """Of the packets the servers' interfaces received so far, the share their
        ingress rule dropped (near 1: the test traffic, of either family, costs each
        server the same, and never reaches its IP stack)."""
        sunk = received = 0
        for s in SERVERS:
            listing = json.loads(in_ns(self.lab, s, "nft -j list table netdev kb_sink"))
            for item in listing["nftables"]:
                for expr in item.get("rule", {}).get("expr", []):
                    sunk += expr.get("counter", {}).get("packets", 0)
            received += dev_counters(self.lab, s)[self.server_iface[s]][1]
        return round(sunk / max(1, received), 4)

    def snapshot(self) -> dict[str, Any]:
        router = dev_counters(self.lab, "r")
        return {
            "at": time.monotonic(),
            "servers": {s: dev_counters(self.lab, s)[self.server_iface[s]][1] for s in SERVERS},
            "ports_in": sum(router[f"{self.router_iface[h]}p0"][1] for h in HOSTS),
            "drops": sum(router[f"{self.router_iface[h]}p0"][3] for h in HOSTS)
            + sum(dev_counters(self.lab, h)["eth0"][11] for h in HOSTS),
            "cpu": cpu_ticks(ROUTER_CPU),
            "napi": sum(task_seconds(t) for t in self.napi),
            "daemon": task_seconds(self.lab.pid("r", "router")),
        }

    def send(self, kind: str, seconds: float, hosts: tuple[str, ...]) -> None:
        for host in hosts:
            stdin = self.generators[host].stdin
            assert stdin is not None
            stdin.write(
                json.dumps({"op": "run", "kind": kind, "seconds": seconds}).encode() + b"\n"
            )
            stdin.flush()

    def interval(self, kind: str, seconds: float, hosts: tuple[str, ...] = HOSTS) -> dict[str, Any]:
        """The generators send `kind` for WARM + `seconds`; the counters over `seconds`."""
        self.configure(kind, True)
        try:
            self.send(kind, WARM + seconds + 0.3, hosts)
            time.sleep(WARM)
            a = self.snapshot()
            time.sleep(seconds)
            b = self.snapshot()
            sent = [self._answer(self.generators[h]) for h in hosts]
        finally:
            self.configure(kind, False)
        wall = b["at"] - a["at"]
        ticks = [y - x for x, y in zip(a["cpu"], b["cpu"], strict=True)]
        busy = 1 - (ticks[3] + ticks[4]) / max(1, sum(ticks))  # idle, iowait
        delivered = {s: (b["servers"][s] - a["servers"][s]) / wall for s in SERVERS}
        router_in = (b["ports_in"] - a["ports_in"]) / wall
        napi = (b["napi"] - a["napi"]) / wall
        return {
            "delivered_pps": sum(delivered.values()),
            "delivered_by_server": {s: round(v) for s, v in delivered.items()},
            "offered_pps": sum(r["sent"] / r["seconds"] for r in sent),
            "router_in_pps": router_in,
            "dropped_pps": (b["drops"] - a["drops"]) / wall,
            "generator_cpu_share": sum(r["cpu"] / r["seconds"] for r in sent),
            "router_cpu_busy_share": busy,
            "router_thread_cpu_share": napi,
            "router_thread_ns_per_packet": 1e9 * napi / router_in if router_in else 0.0,
            "daemon_cpu_share": (b["daemon"] - a["daemon"]) / wall,
        }

    def event_counts(self, kind: str, seconds: float) -> dict[str, float]:
        """Kernel events per delivered packet in the router's NAPI threads, counted by
        `perf stat` over a whole generator run (tracefs mounted in a private mount
        namespace for it)."""
        self.configure(kind, True)
        out = self.directory / f"{kind}.stat"
        events = " ".join(f"-e {e}" for e in PROFILE_EVENTS)
        tids = ",".join(map(str, self.napi))
        command = (
            "mount -t tracefs nodev /sys/kernel/tracing && exec perf stat -x, -o"
            f" {out} -t {tids} {events} -- sleep {seconds + 2.0}"
        )
        try:
            before = self.snapshot()
            perf = subprocess.Popen(["unshare", "-m", "sh", "-c", command])
            time.sleep(0.8)  # perf is counting
            self.send(kind, seconds, HOSTS)
            for host in HOSTS:
                self._answer(self.generators[host])
            perf.wait(timeout=seconds + 30)
            after = self.snapshot()
        finally:
            self.configure(kind, False)
        packets = sum(after["servers"][s] - before["servers"][s] for s in SERVERS)
        counts = {}
        for line in out.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].replace(".", "").isdigit():
                counts[fields[2]] = round(float(fields[0]) / max(1, packets), 3)
        return counts

    # first packets ----------------------------------------------------------------


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/kernel.py")
