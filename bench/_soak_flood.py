"""Malformed and replayed joins and control messages for the soak, from the fuzz corpus
(bench/fuzz.py's seeds and mutator), sent at a live router's overlay endpoint as if
from a host on its client LAN.

- malformed: fuzz seeds of IPv4 packets, IGMPv3 reports and control messages, mutated
  1-6 times by the fuzz mutator; reports and control messages are mutated inside a
  valid IPv4 (and UDP) wrapper half the time, so they reach the router's decoders;
- replayed: the corpus's signed IGMPv3 joins (to groups whose keys this pool does not
  know, with their old timestamps) and valid control messages to the pool's control
  port, each sent again and again unchanged.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import random
import socket
import threading
import time
from ipaddress import IPv4Address

from manycast.wire import ip

IGMP_ROUTERS = IPv4Address("224.0.0.22")
IPPROTO_IGMP, IPPROTO_UDP = 2, 17


def _wrap_udp(src: IPv4Address, dst: IPv4Address, port: int, payload: bytes) -> bytes:
    udp = ip.UDPDatagram(40000, port, payload).to_wire(src, dst)
    return ip.IPv4Packet.make(src, dst, IPPROTO_UDP, udp).to_wire()


def _wrap_igmp(src: IPv4Address, payload: bytes) -> bytes:
    return ip.IPv4Packet.make(src, IGMP_ROUTERS, IPPROTO_IGMP, payload, ttl=1).to_wire()


def _flip(rng: random.Random, data: bytes) -> bytes:
    """One bit flipped anywhere, wrapper included."""
    out = bytearray(data)
    out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def build(
    seed: int, group: IPv4Address, control_port: int, count: int = 3000
) -> dict[str, list[bytes]]:
    """`count` malformed packets and the replayed ones, from fuzz seed `seed`."""
    import fuzz  # the corpus: imported here, it takes seconds (Hypothesis draws)

    rng = random.Random(seed)
    seeds, _ = fuzz.build_seeds(seed)
    targets = {t.name: t for t in fuzz.targets()}
    src = IPv4Address("10.1.250.1")
    sources = {
        "ip.IPv4Packet.from_wire": None,
        "membership.IGMPv3Report.from_wire": "igmp",
        "control.decode": "control",
    }
    malformed: list[bytes] = []
    longest = {name: max(len(d) for _, d in seeds[name]) for name in sources}
    while len(malformed) < count:
        name = rng.choice(list(sources))
        wrap = sources[name]
        pool = seeds[name]
        start = rng.choice(pool)
        _, data = fuzz.mutate(rng, targets[name], start, pool, longest[name])
        if wrap is None or rng.random() < 0.5:
            # mutated whole (wrappers too) or alone
            if wrap == "igmp":
                data = _flip(rng, _wrap_igmp(src, data))
            elif wrap == "control":
                data = _flip(rng, _wrap_udp(src, group, control_port, data))
        elif wrap == "igmp":
            data = _wrap_igmp(src, data)
        else:
            data = _wrap_udp(src, group, control_port, data)
        if data:
            malformed.append(data)
    v4 = seeds["ip.IPv4Packet.from_wire"]
    joins = [d for _, d in v4 if len(d) > 24 and d[9] == IPPROTO_IGMP]
    messages = [_wrap_udp(src, group, control_port, d) for _, d in seeds["control.decode"][:40]]
    return {"malformed": malformed, "replayed": joins + messages}


class Flood:
    """Sends a burst at (host, port) from a thread; counts what it sent."""

    def __init__(self, packets: dict[str, list[bytes]]) -> None:
        self.packets = packets
        self.sent = {"malformed": 0, "replayed": 0}
        self.errors = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._threads: list[threading.Thread] = []
        self._offset = 0

    def burst(self, address: tuple[str, int], packets: int, seconds: float) -> None:
        thread = threading.Thread(
            target=self._send, args=(address, packets, seconds), name="flood", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _send(self, address: tuple[str, int], packets: int, seconds: float) -> None:
        gap = seconds / max(1, packets)
        malformed, replayed = self.packets["malformed"], self.packets["replayed"]
        began = time.monotonic()
        for i in range(packets):
            kind = "replayed" if i % 4 == 3 and replayed else "malformed"
            source = replayed if kind == "replayed" else malformed
            data = source[(self._offset + i) % len(source)]
            try:
                self._sock.sendto(data, address)
                self.sent[kind] += 1
            except OSError:
                self.errors += 1
            delay = began + (i + 1) * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self._offset += packets

    def close(self) -> None:
        for thread in self._threads:
            thread.join(10)
        self._sock.close()


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
