"""bench/kernel.py's forwarding state and first packets: sources installed through the
router daemon's upcalls, every MFC entry and every portion element checked against
the owner, and the first packet of a fresh source timed for each plane and for
nftables DNAT, with 100 000 client sources already known to the router."""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import contextlib
import ipaddress
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from _common import progress
from _kernel_setup import HOSTS, SERVERS, KernelBench
from _kernel_traffic import Taps, udp_frame

FIRST_PACKET_PAUSE_S = 0.002  # after each first packet, before reading the taps


def raw_socket(bench: KernelBench, host: str) -> socket.socket:
    from manycast.drivers import netns

    # IPPROTO_RAW: we write the IP header (an IPv6 raw socket of that protocol too).
    family = socket.AF_INET if bench.family.version == 4 else socket.AF_INET6
    sock = netns.socket_in(bench.lab.ns(host), family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
    return sock


def ip_packet(src: int, dst: str) -> bytes:
    return udp_frame(src, dst, bytes(6), bytes(6))[14:]  # without the Ethernet header


def mfc_sources(bench: KernelBench) -> set[int]:
    """The sources of the group's resolved MFC entries in the router."""
    return {int(e.source) for e in bench.lab.mfc("r") if e.resolved and str(e.group) == bench.group}


def install_sources(bench: KernelBench, sources: dict[str, list[int]]) -> dict[str, Any]:
    """One packet from each source (per host) until the daemon has an MFC entry for all
    of them (the kernel queues at most 10 unresolved (S, G), so the sends are paced)."""
    missing = {h: set(s) for h, s in sources.items()}
    socks = {h: raw_socket(bench, h) for h in missing}
    start = time.monotonic()
    try:
        while any(missing.values()):
            if time.monotonic() - start > 600:
                raise RuntimeError(f"{sum(map(len, missing.values()))} sources never installed")
            for host, left in missing.items():
                for i, source in enumerate(sorted(left)):
                    with contextlib.suppress(OSError):
                        socks[host].sendto(ip_packet(source, bench.group), (bench.group, 0))
                    if i % 8 == 7:
                        time.sleep(0.001)
            time.sleep(0.3)
            installed = mfc_sources(bench)
            for left in missing.values():
                left -= installed
    finally:
        for sock in socks.values():
            sock.close()
    return {"install_all_seconds": round(time.monotonic() - start, 2)}


def server_iface_at_router(bench: KernelBench) -> dict[str, str]:
    """server -> the router's interface toward it."""
    return {
        s: next(
            i.name
            for i in bench.topology.interfaces["r"].values()
            if ipaddress.ip_address(bench.server_address[s]) in i.network
        )
        for s in SERVERS
    }


def check_entries(bench: KernelBench) -> dict[str, int]:
    """Every source's MFC entry forwards to its owner only: masked selection at work."""
    vifs = {v.index: v.name for v in bench.lab.vifs("r")}
    iface_of = server_iface_at_router(bench)
    right = wrong = 0
    for entry in bench.lab.mfc("r"):
        source = int(entry.source)
        if str(entry.group) != bench.group or source not in bench.owner:
            continue
        outs = [vifs.get(v) for v in entry.outs]
        if outs == [iface_of[bench.owner[source]]]:
            right += 1
        else:
            wrong += 1
    return {"entries_at_owner": right, "entries_elsewhere": wrong}


def kernel_elements(bench: KernelBench) -> int:
    """The portion maps' elements in the router's kernel (`nft -j list table`)."""
    command = f"nft -j list table netdev {bench.family.portion_table}"
    listing = subprocess.run(
        ["ip", "netns", "exec", bench.lab.ns("r"), *command.split()],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(
        len(item["map"].get("elem", []))
        for item in json.loads(listing)["nftables"]
        if "map" in item and item["map"]["name"].startswith("p_")
    )


def server_link_local(bench: KernelBench, server: str) -> str:
    """The link-local IPv6 address of `server`'s interface toward the router."""
    shown = subprocess.run(
        [
            "ip",
            "-n",
            bench.lab.ns(server),
            "-6",
            "-j",
            "addr",
            "show",
            "dev",
            bench.server_iface[server],
            "scope",
            "link",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # (iproute2 leaves an empty object in addr_info for each address filtered out)
    return next(
        a["local"]
        for i in json.loads(shown)
        for a in i.get("addr_info", ())
        if a.get("scope") == "link" and "local" in a
    )


def check_plane(bench: KernelBench) -> dict[str, Any]:
    """With the portion plane on: one element per portion, each toward its owner (the
    server the router's membership gives the portion, by its interface and address)."""
    bench.configure("manycast_portions", True)
    try:
        plane = bench.lab.ask("r", "router", {"op": "plane"})
        elements = kernel_elements(bench)
    finally:
        bench.configure("manycast_portions", False)
    iface_of = server_iface_at_router(bench)
    # The next hop toward an owner is the address its joins came from: the global one
    # on IPv4, its link-local one on IPv6 (MLD reports leave from link-local sources).
    hop = {s: bench.server_address[s] for s in SERVERS}
    if bench.family.version == 6:
        hop = {s: server_link_local(bench, s) for s in SERVERS}
    right = wrong = 0
    for key, outs in plane["portions"].items():
        value, mask = (int(ipaddress.ip_address(p)) for p in key.split("/"))
        owners = [s for v, m, s in bench.portions if (v, m) == (value, mask)]
        want = [f"{iface_of[s]} {hop[s]}" for s in owners]
        if len(owners) == 1 and outs == want:
            right += 1
        else:
            wrong += 1
    return {
        "portion_entries": plane["entries"],
        "portion_elements_in_kernel": elements,
        "portion_entries_at_owner": right,
        "portion_entries_elsewhere": wrong,
        "portions": len(bench.portions),
    }


def involuntary_switches(pid: int | None) -> int:
    """How many times the kernel took the CPU from process `pid` while it could run."""
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("nonvoluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def first_packets(
    bench: KernelBench, kind: str, samples: int, first: int, discard: int = 0
) -> dict[str, Any]:
    """Fresh sources of c1, one packet each, one at a time: the time to a server's
    interface (and whether the owner got it); for the MFC the daemon's upcall-to-
    installed time, and the upcalls the daemon saw. The first `discard` samples are
    sent the same way and left out of the times (`sent` counts the others).
    `install_us_unpreempted`: the installs during which the daemon never lost its CPU
    to another process (its involuntary context switches, from the send to the end
    of the pause that follows it): what the machine's other work leaves out."""
    taps = Taps({bench.lab.ns(s): bench.server_iface[s] for s in SERVERS}, bench.family.version)
    sock = raw_socket(bench, "c1")
    destination = bench.family.vip if kind == "nftables" else bench.group
    bench.configure(kind, True)
    delivered: list[float] = []
    installs: list[float] = []
    unpreempted: list[float] = []
    daemon = bench.lab.pid("r", "router")
    try:
        start = before = bench.lab.ask("r", "router", {"op": "status"})["daemon"]
        for n, source in enumerate(bench.sources("c1", first, samples)):
            kept = n >= discard
            if n and n == discard:  # the upcalls are counted from the first kept sample
                start = before = bench.lab.ask("r", "router", {"op": "status"})["daemon"]
            packet = ip_packet(source, destination)
            switches = involuntary_switches(daemon)
            sent = time.time_ns()
            sock.sendto(packet, (destination, 0))
            # Out of the way while the daemon installs the entry: woken by the taps
            # at once, this process would preempt it on its CPU and be counted in
            # its install time. The taps' kernel timestamps do not move.
            time.sleep(FIRST_PACKET_PAUSE_S)
            preempted = involuntary_switches(daemon) != switches
            arrived = taps.first_from(source, deadline=time.monotonic() + 1.0)
            if arrived is not None and kept:
                delivered.append((arrived - sent) / 1e3)
            if kind == "manycast":
                after = bench.lab.ask("r", "router", {"op": "status"})["daemon"]
                if after["installed"] - before["installed"] == 1 and kept:
                    installs.append(1e6 * (after["install_seconds"] - before["install_seconds"]))
                    if not preempted:
                        unpreempted.append(installs[-1])
                before = after
        end = bench.lab.ask("r", "router", {"op": "status"})["daemon"]
    finally:
        bench.configure(kind, False)
        sock.close()
        taps.close()
    return {
        "delivered_us": delivered,
        "install_us": installs,
        "install_us_unpreempted": unpreempted,
        "upcalls": end["upcalls"] - start["upcalls"],
        "sent": samples - discard,
    }


def at_scale(bench: KernelBench, per_host: int) -> dict[str, Any]:
    """Every one of `per_host` sources per LAN sends (the MFC installs an entry for
    each, by upcalls); then the forwarding entries each plane holds for the group."""
    sources = {h: bench.sources(h, count=per_host) for h in HOSTS}
    total = sum(map(len, sources.values()))
    progress(f"installing {total:,} client sources in the MFC (one upcall each)")
    facts = install_sources(bench, sources)
    entries = mfc_sources(bench)
    wrong = [s for s in (x for v in sources.values() for x in v) if s not in entries]
    bench.configure("manycast_portions", True)
    try:
        plane = bench.lab.ask("r", "router", {"op": "plane"})
        elements = kernel_elements(bench)
    finally:
        bench.configure("manycast_portions", False)
    progress(
        f"{total:,} sources: {len(entries):,} MFC entries; portion plane {plane['entries']}"
        f" entries ({elements} elements in the kernel)"
    )
    return {
        "client_sources": total,
        "mfc_entries": len(entries),
        "mfc_sources_missing": len(wrong),
        "portion_entries": plane["entries"],
        "portion_elements_in_kernel": elements,
        "mfc_install_all_seconds": facts["install_all_seconds"],
    }


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/kernel.py")
