"""The kernel bench's traffic and counters: a TX-ring generator, namespace knobs, kernel counters.

`bench/kernel.py` runs one generator per client LAN (`kernel.py --generator DIR`
calls `run_generator` inside the client's namespace) and reads the counters below.
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

CLK_TCK = os.sysconf("SC_CLK_TCK")
IPPROTO_UDP = 17
# Linux ABI: packet(7) TX ring (TPACKET_V2), ethtool(8) legacy ioctls.
SOL_PACKET, PACKET_VERSION, PACKET_TX_RING, PACKET_QDISC_BYPASS = 263, 10, 13, 20
TPACKET_V2, TP_STATUS_SEND_REQUEST = 1, 1
FRAME, BLOCK, DATA_OFFSET = 256, 4096, 32  # data at TPACKET2_HDRLEN - sizeof(sockaddr_ll)
SIOCETHTOOL, ETHTOOL_STSO, ETHTOOL_SGRO = 0x8946, 0x1F, 0x2C
SO_TIMESTAMPNS, SO_SNDBUFFORCE, ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 35, 32, 0x0003, 0x0800, 0x86DD


# -- the generator (a process of its own in a client's namespace) -----------------------
class TxRing:
    """A PACKET_TX_RING of TPACKET_V2 frames on `iface`, one frame per prepared packet."""

    def __init__(self, iface: str, frames: int) -> None:
        assert frames % (BLOCK // FRAME) == 0
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        self.sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        # Packets in flight are charged to the send buffer until freed: a default one
        # (~270 packets) would pace the generator to the router instead of
        # overflowing its ring, and leave the router's CPU idle between wake-ups.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)
        ring = struct.pack("IIII", BLOCK, frames * FRAME // BLOCK, FRAME, frames)
        self.sock.setsockopt(SOL_PACKET, PACKET_TX_RING, ring)
        self.sock.bind((iface, 0))
        self.map = mmap.mmap(self.sock.fileno(), frames * FRAME)
        self.bytes = np.ndarray((frames, FRAME), np.uint8, buffer=self.map)
        self.words = np.ndarray((frames, FRAME // 4), np.uint32, buffer=self.map)
        self.length = 0

    def load(self, packets: npt.NDArray[np.uint8]) -> None:
        self.length = packets.shape[1]
        self.bytes[:, DATA_OFFSET : DATA_OFFSET + self.length] = packets
        self.words[:, 1] = self.length  # tp_len

    def blast(self, seconds: float) -> int:
        """Send the ring round and round for `seconds`; the packets handed to the kernel
        (those its ports then dropped included). Frames are re-armed as the kernel
        releases them (it sends in ring order)."""
        status = self.words[:, 0]
        armed = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            free = status == 0
            armed += int(np.count_nonzero(free))
            status[free] = TP_STATUS_SEND_REQUEST
            try:
                self.sock.send(b"", socket.MSG_DONTWAIT)
            except OSError as exc:  # a full send buffer, or a packet the veth dropped
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                    raise
        left = status == TP_STATUS_SEND_REQUEST  # never taken: only we call send
        armed -= int(np.count_nonzero(left))
        status[left] = 0
        deadline = time.monotonic() + 2.0
        while status.any() and time.monotonic() < deadline:
            time.sleep(0.001)
        return armed


def run_generator(directory: Path, frames_of: Mapping[str, str], cpu: int, nice: int) -> None:
    """A generator process: `<directory>/<name>.npy` holds the frames of each name,
    `frames_of` names the frames of each kind of traffic. One JSON command a line on
    stdin (`{"op": "run", "kind": ..., "seconds": ...}`), one JSON answer a line."""
    os.sched_setaffinity(0, {cpu})
    with contextlib.suppress(OSError):  # our own autogroup (we are a session leader)
        Path("/proc/self/autogroup").write_text(str(nice))
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    packets = {name: np.load(directory / f"{name}.npy") for name in set(frames_of.values())}
    ring = TxRing("eth0", len(next(iter(packets.values()))))
    loaded = ""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] != "run":
            break
        name = frames_of[command["kind"]]
        if name != loaded:
            ring.load(packets[name])
            loaded = name
        cpu, start = time.process_time(), time.monotonic()
        sent = ring.blast(float(command["seconds"]))
        elapsed, cpu = time.monotonic() - start, time.process_time() - cpu
        print(json.dumps({"sent": sent, "seconds": elapsed, "cpu": cpu}), flush=True)


# -- knobs and counters of a lab's namespaces --------------------------------------------
def in_ns(lab: Any, node: str, command: str, stdin: str | None = None) -> str:
    """`command` by sh inside `node`'s namespace, with that namespace's /sys."""
    done = subprocess.run(
        ["ip", "netns", "exec", lab.ns(node), "sh", "-c", command],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"{node}: {command}: {done.stderr.strip()}")
    return done.stdout


def ethtool(lab: Any, node: str, iface: str, command: int, value: int) -> None:
    """A legacy ethtool set (struct ethtool_value) by ioctl: no ethtool binary needed."""
    from manycast.drivers import netns

    def call() -> None:
        value_buffer = ctypes.create_string_buffer(struct.pack("II", command, value))
        ifreq = struct.pack("16sP", iface.encode(), ctypes.addressof(value_buffer)) + bytes(16)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)

    netns.run_in(lab.ns(node), call)


def dev_counters(lab: Any, node: str) -> dict[str, list[int]]:
    """/proc/net/dev of `node`: rx packets at [1], rx drops [3], tx packets [9], tx drops [11]."""
    from manycast.drivers import netns

    counters = {}
    for line in netns.read_in(lab.ns(node), "/proc/net/dev").splitlines()[2:]:
        name, _, rest = line.partition(":")
        counters[name.strip()] = [int(v) for v in rest.split()]
    return counters


def cpu_ticks(cpu: int) -> list[int]:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            return [int(v) for v in line.split()[1:8]]
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


def task_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def napi_threads() -> dict[int, str]:
    threads = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                name = Path(f"/proc/{entry}/comm").read_text().strip()
                if name.startswith("napi/"):
                    threads[int(entry)] = name
    return threads


class Taps:
    """AF_PACKET taps on interfaces of several namespaces ({namespace: interface}), with
    kernel receive timestamps, for packets of IP `version` 4 or 6. ETH_P_ALL: such
    taps see a packet before an ingress hook drops it (one bound to ETH_P_IP would not)."""

    def __init__(self, interfaces: Mapping[str, str], version: int = 4) -> None:
        from manycast.drivers import netns

        # Where the source address and the protocol (next header) lie in the packet.
        self.ethertype, self.source_at, self.protocol_at = (
            (ETH_P_IP, slice(12, 16), 9) if version == 4 else (ETH_P_IPV6, slice(8, 24), 6)
        )
        self.socks = []
        for namespace, iface in interfaces.items():
            tap = netns.socket_in(
                namespace, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL)
            )
            tap.bind((iface, ETH_P_ALL))
            tap.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            tap.setblocking(False)
            self.socks.append(tap)

    def first_from(self, source: int, deadline: float) -> int | None:
        """The receive time (ns, CLOCK_REALTIME) of the first UDP packet from `source`
        at any tap, or None by `deadline` (time.monotonic())."""
        wanted = source.to_bytes(self.source_at.stop - self.source_at.start, "big")
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(self.socks, [], [], left)
            for tap in ready:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        data, ancillary, _, address = tap.recvmsg(2048, socket.CMSG_SPACE(16))
                        if (
                            address[1] == self.ethertype
                            and data[self.source_at] == wanted
                            and data[self.protocol_at] == IPPROTO_UDP
                        ):
                            for level, kind, value in ancillary:
                                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                                    seconds, nanos = struct.unpack("qq", value[:16])
                                    return int(seconds) * 1_000_000_000 + int(nanos)
        return None

    def close(self) -> None:
        for tap in self.socks:
            tap.close()


def udp_frame(src: int, dst: str, dst_mac: bytes, src_mac: bytes, payload: int = 64) -> bytes:
    """An Ethernet frame of a UDP datagram from port 40000 to port 7000, `payload` bytes,
    TTL (IPv6: hop limit) 8, in the family of `dst`. The UDP checksum is computed for
    both families (IPv6 makes it mandatory: a receiver drops a datagram without one)."""
    from manycast.wire.ip import UDPDatagram, make_packet

    target = ipaddress.ip_address(dst)
    source = (ipaddress.IPv4Address if target.version == 4 else ipaddress.IPv6Address)(src)
    udp = UDPDatagram(40000, 7000, b"x" * payload).to_wire(source, target)
    packet = make_packet(source, target, IPPROTO_UDP, udp, ttl=8).to_wire()
    ethertype = ETH_P_IP if target.version == 4 else ETH_P_IPV6
    return dst_mac + src_mac + ethertype.to_bytes(2, "big") + packet


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/kernel.py")
