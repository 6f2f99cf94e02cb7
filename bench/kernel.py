"""Kernel lab: manycast forwarding by the kernel beside plain unicast forwarding.

One router namespace `r` runs the manycast router daemon (MRT socket); server
`s1` hangs off it on a /30 and has joined the group for the whole client space
with its extended report (its agent runs; its service does not, so that nothing
answers and the receiving side costs the same for both kinds of traffic). Four
client namespaces on a bridge are the sources.

Measured in the same run, interleaved, on the same topology and the same
generators (iperf 2, one process per source, 64-byte UDP payloads, as fast as
it can send):

- `manycast_pps`: packets/s arriving at s1 (its interface counter) while the
  sources send to the group; the router forwards them by its MFC entries.
- `unicast_pps`: the same, sending to s1's unicast address; the router forwards
  them by its FIB.
- `daemon_cpu_share_established`: the router daemon's CPU time over the wall
  time of the manycast intervals (only established sources flow).
- `new_sources_per_s`: a burst of packets from new source addresses (a raw
  socket in a client namespace, one packet per source); entries the daemon
  installed divided by the time from the first upcall it read to the last entry
  it installed. The kernel keeps at most 10 unresolved (S, G) at a time and
  drops the packets of further ones, so a burst faster than the daemon measures
  the daemon. `install_latency_us`: mean time from reading an upcall to the
  entry being installed.

Every figure is the median of the rounds (`ratio`: the median of the per-round
ratios). Needs root (namespaces); elsewhere it prints a JSON line saying why it
did not run.

What limits the rates: on veth pairs a packet crosses the client stack, the
router and the server's stack in the softirq of the CPU that sent it, so the
generators and the forwarding share the machine's two cores and the delivered
rate is the rate of that whole path (delivered is within a few percent of what
the generators offered, for both kinds). The comparison is fair because
everything but the router's forwarding step is the same for both kinds; each
source has its own LAN so that no bridge floods the multicast to other hosts.

Output: progress on stderr, then the result as one json object, the last line on stdout.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import _plots
from _common import emit, progress

TOPOLOGY = """
[pool]
group = "232.1.1.1"
port = 7000
control_group = "239.255.77.1"
report_interval_ms = 1000

[[router]]
name = "r"

[[server]]
name = "s1"
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
[[clients]]
name = "e"
count = 1
router = "r"
subnet = "10.3.0.0/16"
[[clients]]
name = "f"
count = 1
router = "r"
subnet = "10.4.0.0/16"
"""

ROUNDS = 5
SECONDS = 2.5
NEW_SOURCES = 4000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def rx_packets(lab: object, node: str, iface: str = "eth0") -> int:
    from manycast.drivers import netns
    from manycast.lab import Lab

    assert isinstance(lab, Lab)
    text = netns.read_in(lab.ns(node), "/proc/net/dev")
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == iface:
            return int(rest.split()[1])
    raise RuntimeError(f"{node} has no {iface}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def blast(lab: object, topology: object, destination: str) -> tuple[float, float, float]:
    """(packets/s at s1, packets/s the generators sent, daemon CPU seconds)."""
    from manycast.lab import Lab
    from manycast.topology import Topology

    assert isinstance(lab, Lab) and isinstance(topology, Topology)
    daemon = lab.pid("r", "router")
    assert daemon is not None
    senders = []
    for client in sorted(topology.clients):
        argv = ["iperf", "-c", destination, "-p", "7000", "-u", "-T", "8", "-l", "64"]
        argv += ["-b", "2000M", "-t", str(SECONDS + 1.0)]
        senders.append(lab.popen(client, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    time.sleep(0.7)  # past start-up and the first packet of each source
    rx0, cpu0, t0 = rx_packets(lab, "s1"), cpu_seconds(daemon), time.monotonic()
    time.sleep(SECONDS - 0.4)
    rx1, cpu1, t1 = rx_packets(lab, "s1"), cpu_seconds(daemon), time.monotonic()
    sent = 0
    for proc in senders:
        out, _ = proc.communicate(timeout=30)
        for line in out.decode(errors="replace").splitlines():
            if "Sent" in line and "datagrams" in line:
                sent += int(line.split("Sent")[1].split()[0])
    return (rx1 - rx0) / (t1 - t0), sent / (SECONDS + 1.0), cpu1 - cpu0


def new_sources(lab: object, topology: object) -> dict[str, float]:
    """One packet from each of NEW_SOURCES new addresses, as fast as a raw socket goes."""
    from manycast.drivers import kernel, netns
    from manycast.lab import Lab
    from manycast.topology import Topology
    from manycast.wire.ip import IPPROTO_UDP, IPv4Packet, UDPDatagram

    assert isinstance(lab, Lab) and isinstance(topology, Topology)
    group = topology.pool.group
    base = int(topology.address("c1")) & 0xFFFF0000
    packets = []
    for i in range(NEW_SOURCES):
        src = ipaddress.IPv4Address(base + 0x2000 + i)
        udp = UDPDatagram(40000, 7000, b"n").to_wire(src, group)
        packets.append(IPv4Packet.make(src, group, IPPROTO_UDP, udp, ttl=8).to_wire())
    sock = netns.socket_in(lab.ns("c1"), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
    before = kernel.ask(lab.run_dir, "r", "router", {"op": "status"})["daemon"]
    start = time.monotonic()
    for packet in packets:
        try:
            sock.sendto(packet, (str(group), 0))
        except OSError:
            time.sleep(0.0005)
    offered_s = time.monotonic() - start
    sock.close()
    time.sleep(1.0)
    after = kernel.ask(lab.run_dir, "r", "router", {"op": "status"})["daemon"]
    installed = after["installed"] - before["installed"]
    span = after["last_install"] - start  # both CLOCK_MONOTONIC
    return {
        "new_sources_offered": NEW_SOURCES,
        "new_sources_offered_per_s": round(NEW_SOURCES / offered_s),
        "new_sources_installed": installed,
        "new_sources_per_s": round(installed / span) if span > 0 else 0.0,
        "install_latency_us": round(
            1e6 * (after["install_seconds"] - before["install_seconds"]) / max(1, installed), 1
        ),
    }


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Packets per second reaching the server per round, by the kernel's multicast
    forwarding and by its unicast forwarding, each beside what the sources offered."""
    fig, ax = _plots.figure("Kernel forwarding per round: manycast (MFC) vs unicast (FIB)")
    _plots.per_round(
        ax,
        {
            "manycast delivered": [v / 1e3 for v in result["manycast_pps_per_round"]],
            "unicast delivered": [v / 1e3 for v in result["unicast_pps_per_round"]],
            "manycast offered": [v / 1e3 for v in result["manycast_offered_pps_per_round"]],
            "unicast offered": [v / 1e3 for v in result["unicast_offered_pps_per_round"]],
        },
        ylabel="thousand packets / s",
    )
    return [_plots.save(fig, directory, "kernel_pps_per_round")]


def main() -> None:
    args = _plots.arguments(__doc__)
    if os.geteuid() != 0:
        progress("bench/kernel.py: the kernel lab needs root and network namespaces; skipped")
        emit({"skipped": "the kernel lab needs root and network namespaces"})
        return
    from manycast.lab import Lab

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MANYCAST_LAB_RUN_ROOT"] = tmp
        lab = Lab(prefix="mcb", run_root=Path(tmp))
        lab.down()
        topology = lab.up(TOPOLOGY, "bench-kernel", start_servers=False)
        try:
            lab.start("s1", "server")
            lab.wait_ready("s1", "server")
            time.sleep(1.5)  # the agent's report reaches the router
            server = str(topology.address("s1"))
            group = str(topology.pool.group)
            results: dict[str, list[float]] = {k: [] for k in ("m", "u", "ms", "us", "cpu")}
            for round_ in range(ROUNDS):
                m, m_sent, cpu = blast(lab, topology, group)
                u, u_sent, _ = blast(lab, topology, server)
                progress(
                    f"round {round_ + 1}: manycast {m:,.0f} pps (offered {m_sent:,.0f}), "
                    f"unicast {u:,.0f} pps (offered {u_sent:,.0f}), "
                    f"daemon CPU {cpu:.3f} s over {SECONDS - 0.4:.1f} s"
                )
                results["m"].append(m)
                results["u"].append(u)
                results["ms"].append(m_sent)
                results["us"].append(u_sent)
                results["cpu"].append(cpu / (SECONDS - 0.4))
            entries = lab.mfc("r")
            burst = new_sources(lab, topology)
            progress(f"new sources: {burst}")
        finally:
            lab.down()
    manycast_pps = statistics.median(results["m"])
    unicast_pps = statistics.median(results["u"])
    result = {
        "bench": "kernel",
        "manycast_pps": round(manycast_pps),
        "unicast_pps": round(unicast_pps),
        # Paired by round (each manycast interval next to its unicast one).
        "ratio": round(
            statistics.median(m / u for m, u in zip(results["m"], results["u"], strict=True) if u),
            3,
        ),
        "manycast_offered_pps": round(statistics.median(results["ms"])),
        "unicast_offered_pps": round(statistics.median(results["us"])),
        "daemon_cpu_share_established": round(statistics.median(results["cpu"]), 4),
        "established_entries": len(entries),
        "rounds": ROUNDS,
        "manycast_pps_per_round": [round(v) for v in results["m"]],
        "unicast_pps_per_round": [round(v) for v in results["u"]],
        "manycast_offered_pps_per_round": [round(v) for v in results["ms"]],
        "unicast_offered_pps_per_round": [round(v) for v in results["us"]],
        **burst,
    }
    emit(result)
    _plots.write(result, args.plots, plot)


if __name__ == "__main__":
    main()
