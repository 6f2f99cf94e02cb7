"""Kernel lab: manycast's kernel data plane against a kernel load balancer (nftables).

One router namespace `r`, four servers `s1`-`s4` on /30s and two client LANs. The
servers' agents run and split the client space with masked source-specific joins
(`0.0.0.v/0.0.0.3`: the low two bits of a source pick its server), so the router
daemon installs one (S, G) entry per source toward its owner (checked before the
rounds: every entry's only outgoing interface is its owner's). Their service does
not run: each server drops the test traffic at its interface's ingress (an
nftables netdev rule), the same cost for every kind.

Traffic: 10 240 client source addresses (5120 per LAN), each sending in turn,
64-byte UDP payloads, from one generator per LAN: a PACKET_TX_RING socket whose
frames are built beforehand and handed to the kernel a ring at a time, so that a
packet costs the sending CPU little. Five kinds of the same packets, differing
only in their destination and the router's configuration, through the same
router to the same servers:

- `manycast`: to the group; the router forwards by its MFC entries, as the lab
  sets it up (every source is installed before the rounds: the daemon is idle).
- `manycast_mcast_routes`: the same, with a 224.0.0.0/4 route per interface
  added to the router, so that the kernel caches the output route of each VIF
  (without one, ipmr allocates a route for every packet it forwards).
- `nftables` (the baseline): to a VIP; nftables DNAT to `jhash ip saddr mod 4` of
  the four servers in the router's prerouting, conntrack keeping each source's
  pick, as a Linux L4 load balancer does.
- `nftables_stateless`: to the VIP; `ip daddr set jhash ip saddr mod 4 map` at raw
  priority, no conntrack: the cheapest balancing nftables offers.
- `unicast`: to the owner's own address; plain FIB forwarding, no balancing: the
  ceiling.

Placement on the machine's two cores, so that the router is what limits: the
generators run on CPU 0; the router's receive processing runs on CPU 1 (threaded
NAPI on its client-facing veth ports, pinned there; GRO on those ports and TSO off
on the clients' side, without which veth bypasses NAPI); what the router sends on
is received by the servers on CPU 0 (RPS). The NAPI threads run at nice -20, the
generators at -10 in their own autogroup, so that other work on a shared machine
takes little from either. A generator's send buffer is large (64 MB): packets in
flight are charged to it, and a default one would pace the generator to the
router instead of overflowing the router's queue. How we know the router limits,
per kind in `limit`: its ports drop what the generators offer beyond what it
takes (`dropped_at_router_pps` > 1% of delivered: `limited_by` "router"), its
thread's share of CPU 1, and before the rounds the manycast rate from one
generator and from two (flat when the router limits). A share of CPU 1 below 1.0
is time other processes of the machine took from the router's thread.

Rounds: each runs the five kinds once, in an order shuffled per round (seeded,
the seed in the output). `ratio_vs_nftables` is the ratio of the medians
(manycast over nftables DNAT); `ratio_vs_nftables_per_round_median` the median of
the per-round ratios; the same against the stateless and unicast references, and
`mcast_routes_ratio_vs_*` for the router with multicast routes.
`router_thread_ns_per_packet`: CPU time of the router's threads per packet
received (deferred work, RCU frees among it, runs elsewhere and is not in it).

`first_packet_install_us` (p50, p99): fresh sources, one at a time; the daemon's
time from reading the NOCACHE upcall to the entry installed (its `install_seconds`
counter before and after each). `first_packet_delivered_us`: from the send of a
fresh source's first packet to its arrival at a server's interface (kernel
timestamps), for manycast (an upcall to the daemon) and for nftables DNAT (a new
conntrack entry), side by side.

`--profile`: kernel events per delivered packet in the router's threads for each
kind (`perf stat` on tracepoints: FIB lookups, slab allocations), which is where
ipmr's extra cost shows. Sampling profiles (`perf record`) are no use on this
kind of virtual machine: its software clock does not sample the NAPI threads.
`--quick`: 3 rounds of 1 s and fewer latency samples (a smoke test; quote a full run).

Needs root, `ip` and `nft` (and `perf` for `--profile`); elsewhere it prints a
JSON line saying why it did not run. Output: progress on stderr, then one JSON
object, the last line on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import _plots
from _common import progress, run_and_emit
from _kernel_traffic import (
    ETHTOOL_SGRO,
    ETHTOOL_STSO,
    Taps,
    cpu_ticks,
    dev_counters,
    ethtool,
    in_ns,
    napi_threads,
    run_generator,
    task_seconds,
    udp_frame,
)

TOPOLOGY = """
[pool]
group = "232.1.1.1"
port = 7000
control_group = "239.255.77.1"
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
subnet = "10.1.0.0/16"
[[clients]]
name = "d"
count = 1
router = "r"
subnet = "10.2.0.0/16"
"""

SERVERS = ("s1", "s2", "s3", "s4")
HOSTS = ("c1", "d1")  # one generator each
SOURCES_PER_HOST = 5120  # 10 240 in all; a whole number of TX ring blocks
FIRST_SOURCE = 0x100  # sources are <LAN>.1.0 onward; fresh ones for latency at .128.0
FRESH_SOURCE = 0x8000
KINDS = ("manycast", "manycast_mcast_routes", "nftables", "nftables_stateless", "unicast")
BASELINES = ("nftables", "nftables_stateless", "unicast")
FRAMES_OF = {
    "manycast": "group",
    "manycast_mcast_routes": "group",
    "nftables": "vip",
    "nftables_stateless": "vip",
    "unicast": "owner",
}
VIP = "10.255.0.1"
GENERATOR_CPU, ROUTER_CPU = 0, 1
GENERATOR_NICE, ROUTER_NICE = -10, -20
# Per packet in the router's NAPI threads (`--profile`): route lookups and allocations.
PROFILE_EVENTS = ("fib:fib_table_lookup", "kmem:kmem_cache_alloc", "kmem:kmalloc", "skb:kfree_skb")
WARM = 0.6  # seconds of traffic before an interval's counters are read


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


class KernelBench:
    """The lab tuned for the measurement, its generators, and the intervals."""

    def __init__(self, lab: Any, topology: Any, directory: Path) -> None:
        self.lab, self.topology, self.directory = lab, topology, directory
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

    # setup ------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Servers up and agreed, the lab tuned, every source's entry installed (and
        checked), the generators started; what was found on the way."""
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
        facts.update(self.install_sources())
        facts.update(self.check_entries())
        progress(
            f"{facts['entries_at_owner']} entries toward their owner, {facts['entries_elsewhere']}"
            f" elsewhere, installed in {facts['install_all_seconds']} s"
        )
        if facts["entries_elsewhere"] or facts["entries_at_owner"] < len(self.owner):
            raise RuntimeError(f"the MFC does not send every source to its owner: {facts}")
        self.start_generators()
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
        in_ns(lab, "r", "sysctl -qw net.bridge.bridge-nf-call-iptables=0 || true")
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

    def read_owners(self) -> dict[str, int]:
        """Each source's owner by the masks the router holds; the sources per server."""
        members = self.lab.ask("r", "router", {"op": "status"})["membership"][self.group]
        portions = []
        for address, text in members.items():
            value, mask = (int(ipaddress.IPv4Address(p)) for p in text.split("/"))
            server = next(s for s, a in self.server_address.items() if a == address)
            portions.append((value, mask, server))
        for source in self.sources():
            owners = [s for v, m, s in portions if source & m == v]
            if len(owners) != 1:
                raise RuntimeError(f"{ipaddress.IPv4Address(source)}: owners {owners}")
            self.owner[source] = owners[0]
        masks = sorted({ipaddress.IPv4Address(m).compressed for _, m, _ in portions})
        progress(f"portions: {dict(sorted(members.items()))} (masks {masks})")
        counts = {s: 0 for s in SERVERS}
        for server in self.owner.values():
            counts[server] += 1
        return counts

    def sources(self, host: str | None = None, first: int = FIRST_SOURCE) -> list[int]:
        hosts = HOSTS if host is None else (host,)
        bases = [int(self.topology.address(h)) & 0xFFFF0000 for h in hosts]
        return [base + first + i for base in bases for i in range(SOURCES_PER_HOST)]

    def mac(self, node: str, iface: str) -> bytes:
        return bytes.fromhex(
            in_ns(self.lab, node, f"cat /sys/class/net/{iface}/address").strip().replace(":", "")
        )

    def start_generators(self) -> None:
        group_mac = bytes.fromhex("01005e") + (
            int(ipaddress.IPv4Address(self.group)) & 0x7FFFFF
        ).to_bytes(3, "big")
        for host in HOSTS:
            own, gateway = self.mac(host, "eth0"), self.mac("r", self.router_iface[host])
            folder = self.directory / host
            folder.mkdir()
            frames = {
                "group": [udp_frame(s, self.group, group_mac, own) for s in self.sources(host)],
                "vip": [udp_frame(s, VIP, gateway, own) for s in self.sources(host)],
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
                [sys.executable, str(Path(__file__).resolve()), "--generator", str(folder)],
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

    # the MFC ----------------------------------------------------------------------
    def raw_socket(self, host: str) -> socket.socket:
        from manycast.drivers import netns

        sock = netns.socket_in(
            self.lab.ns(host), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW
        )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        return sock

    def ip_packet(self, src: int, dst: str) -> bytes:
        return udp_frame(src, dst, bytes(6), bytes(6))[14:]  # without the Ethernet header

    def install_sources(self) -> dict[str, Any]:
        """One packet from each source until the daemon has an entry for all of them
        (the kernel queues at most 10 unresolved (S, G), so the sends are paced)."""
        missing = {h: set(self.sources(h)) for h in HOSTS}
        socks = {h: self.raw_socket(h) for h in HOSTS}
        start = time.monotonic()
        try:
            while any(missing.values()):
                if time.monotonic() - start > 180:
                    raise RuntimeError(f"{sum(map(len, missing.values()))} sources never installed")
                for host, sources in missing.items():
                    for i, source in enumerate(sorted(sources)):
                        with contextlib.suppress(OSError):
                            socks[host].sendto(self.ip_packet(source, self.group), (self.group, 0))
                        if i % 8 == 7:
                            time.sleep(0.001)
                time.sleep(0.3)
                installed = {int(e.source) for e in self.lab.mfc("r") if e.resolved}
                for sources in missing.values():
                    sources -= installed
        finally:
            for sock in socks.values():
                sock.close()
        seconds = time.monotonic() - start
        return {"install_all_seconds": round(seconds, 2)}

    def check_entries(self) -> dict[str, int]:
        """Every source's entry forwards to its owner only: masked selection at work."""
        vifs = {v.index: v.name for v in self.lab.vifs("r")}
        iface_of = {
            s: next(
                i.name
                for i in self.topology.interfaces["r"].values()
                if ipaddress.IPv4Address(self.server_address[s]) in i.network
            )
            for s in SERVERS
        }
        right = wrong = 0
        for entry in self.lab.mfc("r"):
            source = int(entry.source)
            if str(entry.group) != self.group or source not in self.owner:
                continue
            outs = [vifs.get(v) for v in entry.outs]
            if outs == [iface_of[self.owner[source]]]:
                right += 1
            else:
                wrong += 1
        return {"entries_at_owner": right, "entries_elsewhere": wrong}

    # intervals --------------------------------------------------------------------
    def configure(self, kind: str, on: bool) -> None:
        """What `kind` needs on the router beyond the lab's set-up, added or removed."""
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
        if not on:
            in_ns(self.lab, "r", f"nft delete table ip {table}")
            return
        servers = ", ".join(f"{i} : {self.server_address[s]}" for i, s in enumerate(SERVERS))
        pick = f"jhash ip saddr mod {len(SERVERS)} map {{ {servers} }}"
        action = f"dnat to {pick}" if kind == "nftables" else f"ip daddr set {pick}"
        script = (
            f"table ip {table} {{ chain prerouting {{ type {chain_type} hook prerouting"
            f" priority {priority}; policy accept; ip daddr {VIP} udp dport 7000 {action}\n}}\n}}\n"
        )
        in_ns(self.lab, "r", "nft -f -", script)

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
    def first_packets(self, kind: str, samples: int, first: int) -> dict[str, list[float]]:
        """Fresh sources of c1, one packet each, one at a time: the time to a server's
        interface and, for manycast, the daemon's upcall-to-installed time."""
        taps = Taps({self.lab.ns(s): self.server_iface[s] for s in SERVERS})
        sock = self.raw_socket("c1")
        destination = self.group if kind == "manycast" else VIP
        self.configure(kind, True)
        delivered: list[float] = []
        installs: list[float] = []
        try:
            before = self.lab.ask("r", "router", {"op": "status"})["daemon"]
            for source in self.sources("c1", first)[:samples]:
                packet = self.ip_packet(source, destination)
                sent = time.time_ns()
                sock.sendto(packet, (destination, 0))
                arrived = taps.first_from(source, deadline=time.monotonic() + 1.0)
                if arrived is not None:
                    delivered.append((arrived - sent) / 1e3)
                if kind == "manycast":
                    after = self.lab.ask("r", "router", {"op": "status"})["daemon"]
                    if after["installed"] - before["installed"] == 1:
                        installs.append(
                            1e6 * (after["install_seconds"] - before["install_seconds"])
                        )
                    before = after
        finally:
            self.configure(kind, False)
            sock.close()
            taps.close()
        return {"delivered_us": delivered, "install_us": installs}


# -- the run -----------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> dict[str, Any]:
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        why = (
            "the kernel lab needs root and network namespaces"
            if not missing
            else f"needs {missing}"
        )
        progress(f"bench/kernel.py: {why}; skipped")
        return {"bench": "kernel", "skipped": why}
    from manycast.lab import Lab

    rounds = args.rounds or (3 if args.quick else 7)
    seconds = 1.0 if args.quick else 2.0
    samples = 60 if args.quick else 300
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    began, load_start = time.monotonic(), round(os.getloadavg()[0], 2)
    per_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    orders: list[list[str]] = []
    facts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MANYCAST_LAB_RUN_ROOT"] = tmp
        lab = Lab(prefix="kb", run_root=Path(tmp))
        lab.down()
        progress("bench/kernel.py: bringing the lab up (router, 4 servers, 2 client LANs)")
        topology = lab.up(TOPOLOGY, "bench-kernel", start_servers=False)
        bench = KernelBench(lab, topology, Path(tmp))
        try:
            facts.update(bench.prepare())
            daemon0 = lab.ask("r", "router", {"op": "status"})["daemon"]
            scaling = {}
            for hosts in (HOSTS[:1], HOSTS):
                got = bench.interval("manycast", seconds, hosts)
                scaling[str(len(hosts))] = round(got["delivered_pps"])
                progress(f"manycast from {len(hosts)} generator(s): {describe(got)}")
            for round_ in range(rounds):
                order = list(KINDS)
                rng.shuffle(order)
                orders.append(order)
                progress(f"round {round_ + 1}/{rounds}:")
                for kind in order:
                    got = bench.interval(kind, seconds)
                    per_kind[kind].append(got)
                    progress(f"  {kind:22s} {describe(got)}")
            daemon1 = lab.ask("r", "router", {"op": "status"})["daemon"]
            if args.profile:
                if shutil.which("perf") is None:
                    facts["events_per_packet"] = "perf is not installed"
                else:
                    counts = {k: bench.event_counts(k, seconds) for k in KINDS}
                    facts["events_per_packet"] = counts
                    for kind, got in counts.items():
                        progress(f"events per packet in the router's thread, {kind}: {got}")
            bench.close()
            progress(f"first packets: {samples} fresh sources each, one at a time")
            first_m = bench.first_packets("manycast", samples, FRESH_SOURCE)
            first_n = bench.first_packets("nftables", samples, FRESH_SOURCE + SOURCES_PER_HOST)
        finally:
            bench.close()
            lab.down()
    facts.update(
        {
            "rounds": rounds,
            "seconds_per_interval": seconds,
            "seed": seed,
            "entries_rewritten_during_rounds": daemon1["rewritten"] - daemon0["rewritten"],
            "upcalls_during_rounds": daemon1["upcalls"] - daemon0["upcalls"],
            "loadavg_1min_start_end": [load_start, round(os.getloadavg()[0], 2)],
            "seconds": round(time.monotonic() - began, 1),
        }
    )
    return summarize(per_kind, orders, scaling, first_m, first_n, facts)


def describe(got: Mapping[str, Any]) -> str:
    return (
        f"{got['delivered_pps']:>9,.0f} pps delivered (offered {got['offered_pps']:,.0f}, "
        f"dropped at the router {got['dropped_pps']:,.0f}; router thread "
        f"{got['router_thread_cpu_share']:.2f} of CPU {ROUTER_CPU}, "
        f"{got['router_thread_ns_per_packet']:,.0f} ns/packet; "
        f"generators {got['generator_cpu_share']:.2f})"
    )


def summarize(
    per_kind: dict[str, list[dict[str, Any]]],
    orders: list[list[str]],
    scaling: dict[str, int],
    first_m: dict[str, list[float]],
    first_n: dict[str, list[float]],
    facts: dict[str, Any],
) -> dict[str, Any]:
    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in per_kind[kind])

    def by_kind(key: str, digits: int) -> dict[str, float]:
        return {k: round(med(k, key), digits) for k in KINDS}

    pps = {k: [r["delivered_pps"] for r in per_kind[k]] for k in KINDS}
    result: dict[str, Any] = {"bench": "kernel"}
    for kind in KINDS:
        result[f"{kind}_pps"] = round(statistics.median(pps[kind]))
    for ours, prefix in (
        ("manycast", "ratio_vs_"),
        ("manycast_mcast_routes", "mcast_routes_ratio_vs_"),
    ):
        for base in BASELINES:
            rounds = [m / o for m, o in zip(pps[ours], pps[base], strict=True) if o]
            ratio_of_medians = statistics.median(pps[ours]) / statistics.median(pps[base])
            result[f"{prefix}{base}"] = round(ratio_of_medians, 3)
            result[f"{prefix}{base}_per_round_median"] = round(statistics.median(rounds), 3)
            result[f"{prefix}{base}_per_round"] = [round(r, 3) for r in rounds]
    result["ratio_vs_nftables_goal"] = 1.0
    result["first_packet_install_us"] = {
        "p50": percentile(first_m["install_us"], 0.5),
        "p99": percentile(first_m["install_us"], 0.99),
        "samples": len(first_m["install_us"]),
    }
    result["first_packet_delivered_us"] = {
        kind: {
            "p50": percentile(got["delivered_us"], 0.5),
            "p99": percentile(got["delivered_us"], 0.99),
            "samples": len(got["delivered_us"]),
        }
        for kind, got in (("manycast", first_m), ("nftables", first_n))
    }
    dropped = by_kind("dropped_pps", 0)
    result["limit"] = {
        # The router limits when its ports drop what the generators offer beyond
        # what it takes: the generators were faster.
        "limited_by": {
            k: "router" if dropped[k] > 0.01 * med(k, "delivered_pps") else "generators"
            for k in KINDS
        },
        "delivered_pps_by_generators": scaling,
        "offered_pps": by_kind("offered_pps", 0),
        "dropped_at_router_pps": dropped,
        "router_thread_cpu_share": by_kind("router_thread_cpu_share", 3),
        "router_cpu_busy_share": by_kind("router_cpu_busy_share", 3),
        "generator_cpu_share": by_kind("generator_cpu_share", 3),
    }
    result["router_thread_ns_per_packet"] = by_kind("router_thread_ns_per_packet", 0)
    result["daemon_cpu_share_established"] = round(med("manycast", "daemon_cpu_share"), 4)
    result["delivered_by_server"] = {k: per_kind[k][-1]["delivered_by_server"] for k in KINDS}
    for kind in KINDS:
        result[f"{kind}_pps_per_round"] = [round(v) for v in pps[kind]]
    result["orders"] = orders
    result.update(facts)
    return result


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Packets per second delivered to the servers per round, by kind; and manycast's
    per-round ratio to each baseline, with the goal line."""
    series = {
        key.removesuffix("_pps_per_round").replace("_", " "): [v / 1e3 for v in values]
        for key, values in result.items()
        if key.endswith("_pps_per_round")
    }
    fig, ax = _plots.figure("Kernel router: packets/s delivered per round, by kind")
    _plots.per_round(ax, series, ylabel="thousand packets / s")
    paths = [_plots.save(fig, directory, "kernel_pps_per_round")]
    ratios = {
        key.removesuffix("_per_round").replace("_", " "): values
        for key, values in result.items()
        if "ratio_vs_" in key and key.endswith("_per_round")
    }
    if ratios:
        fig, ax = _plots.figure("Manycast (MFC) over each baseline, per round")
        _plots.per_round(ax, ratios, ylabel="ratio")
        _plots.reference(ax, 1.0, "goal vs nftables: 1.0")
        ax.legend(fontsize=7)
        paths.append(_plots.save(fig, directory, "kernel_ratios_per_round"))
    return paths


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    _plots.add_argument(parser)
    parser.add_argument("--quick", action="store_true", help="3 short rounds, few latency samples")
    parser.add_argument("--rounds", type=int, help="rounds (default 7; --quick 3)")
    parser.add_argument("--seed", type=int, help="seed of the per-round order (default: random)")
    parser.add_argument("--profile", action="store_true", help="perf profile of the router's CPU")
    parser.add_argument("--generator", type=Path, help=argparse.SUPPRESS)  # internal
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()  # before run_and_emit, so that --help prints on stdout
    if args.generator is not None:
        run_generator(args.generator, FRAMES_OF, GENERATOR_CPU, GENERATOR_NICE)
        return

    def run() -> dict[str, Any]:
        result = measure(args)
        if "skipped" not in result:
            _plots.write(result, args.plots, plot)
        return result

    run_and_emit("kernel", run)


if __name__ == "__main__":
    main()
