"""The kernel-lab soak's faults that are not the scenario engine's, and its samples
(bench/soak.py --lab).

- `LossBurst`: one nftables table per burst in each end's namespace of the core link,
  dropping `numgen random mod 100 < P` of what arrives on that link (both directions:
  each end drops on its way in, in prerouting at raw priority, before the kernel's
  multicast forwarding and before the router daemon's sockets); removed at the burst's
  end, with what it dropped.
- `LabFlood`: `_soak_flood`'s packets (fuzz-corpus IPv4 packets, IGMPv3 reports and
  control messages, mutated; replayed signed joins) sent whole (IP_HDRINCL) from a
  client's namespace out of its LAN interface to 224.0.0.22, so they reach the
  router on that LAN as a host there would send them.
- `programs`/`sample`: RSS and open descriptors of every running lab program (the pid
  files'), and the kernel's multicast forwarding entries per router.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import contextlib
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from _proc_sample import resident
from _soak_flood import IGMP_ROUTERS, Flood
from _soak_plan import WARMUP_S
from manycast.drivers import netns
from manycast.lab import Lab
from manycast.topology import Topology

NFT_TABLE = "manycast_soak_loss"


def nft(lab: Lab, node: str, script: str) -> str:
    """Run an nft script inside `node`'s namespace; its output."""
    process = lab.popen(
        node,
        ["nft", "-f", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = process.communicate(script.encode(), timeout=20)
    if process.returncode != 0:
        raise RuntimeError(f"nft in {node}: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


class LossBurst:
    """Random loss of `percent` % on a router-router link, at both ends, until `stop`."""

    def __init__(self, lab: Lab, topology: Topology, link: str, percent: int, number: int) -> None:
        self.lab = lab
        self.ends = [(m.node, m.iface) for m in topology.links[link].members]
        self.table = f"{NFT_TABLE}_{number}"
        for node, iface in self.ends:
            nft(
                lab,
                node,
                f"table inet {self.table} {{\n"
                "  chain loss {\n"
                "    type filter hook prerouting priority raw; policy accept;\n"
                f'    iifname "{iface}" numgen random mod 100 < {percent} counter drop\n'
                "  }\n"
                "}\n",
            )

    def stop(self) -> dict[str, int]:
        """Remove the rules; the packets each end dropped."""
        dropped: dict[str, int] = {}
        for node, _ in self.ends:
            listing = nft(self.lab, node, f"list table inet {self.table}\n")
            found = re.search(r"counter packets (\d+)", listing)
            dropped[node] = int(found.group(1)) if found else -1
            nft(self.lab, node, f"delete table inet {self.table}\n")
        return dropped


class LabFlood(Flood):
    """`Flood` on a raw socket in a client's namespace: each packet sent whole."""

    def __init__(self, packets: dict[str, list[bytes]], lab: Lab, topology: Topology, host: str):
        super().__init__(packets)
        self._sock.close()
        iface = topology.gateways[host][0]
        sock = netns.socket_in(lab.ns(host), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        self._sock = sock
        self.host = host

    def start(self, packets: int, seconds: float) -> None:
        self.burst((str(IGMP_ROUTERS), 0), packets, seconds)


def programs(lab: Lab, topology: Topology) -> dict[str, int]:
    """`node.role` -> pid of every lab program running now (routers, server agents and
    services), and this process (the prober: every client) as `bench`."""
    found = {"bench": os.getpid()}
    for router in sorted(topology.routers):
        pid = lab.pid(router, "router")
        if pid:
            found[f"{router}.router"] = pid
    for server in sorted(topology.servers):
        for role in ("server", "service"):
            pid = lab.pid(server, role)
            if pid:
                found[f"{server}.{role}"] = pid
    return found


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def sample(lab: Lab, topology: Topology, t: float) -> dict[str, Any]:
    """One sample: each program's RSS, descriptors and pid; each router's MFC entries."""
    got: dict[str, Any] = {"t": round(t, 2)}
    for name, pid in programs(lab, topology).items():
        figures = resident(pid)
        if figures is not None:
            got[name] = {**figures, "pid": pid}
    entries: dict[str, int | None] = {}
    for router in sorted(topology.routers):
        entries[router] = None
        with contextlib.suppress(OSError):
            entries[router] = len(lab.mfc(router))
    got["mfc_entries"] = entries
    return got


def last_incarnation(samples: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The samples of `name`'s latest process only (a restarted program's figures
    start again from nothing; a line across processes would mean nothing)."""
    mine = [s for s in samples if name in s]
    if not mine:
        return []
    pid = mine[-1][name]["pid"]
    return [s for s in mine if s[name]["pid"] == pid]


def mfc_growth(samples: list[dict[str, Any]], routers: list[str]) -> dict[str, Any]:
    """Per router: MFC entries first and last after the warm-up, the most, and the
    slope of a least-squares line per hour (None under 3 samples)."""
    out: dict[str, Any] = {}
    for router in routers:
        points = [
            (s["t"], s["mfc_entries"][router])
            for s in samples
            if s["t"] >= WARMUP_S and s["mfc_entries"].get(router) is not None
        ]
        entry: dict[str, Any] = {"samples": len(points)}
        if points:
            entry["first_last"] = [points[0][1], points[-1][1]]
            entry["max"] = max(p[1] for p in points)
        slope = None
        if len(points) >= 3:
            fit = np.polyfit([p[0] for p in points], [float(p[1]) for p in points], 1)
            slope = round(float(fit[0]) * 3600, 2)
        entry["per_hour"] = slope
        out[router] = entry
    return out


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py --lab")
