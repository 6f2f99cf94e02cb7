"""The service the lab serves: a UDP counter on the group port that knows nothing of manycast.

It receives with an ordinary socket joined to the group (IPv4 or IPv6, as the
group is; a dual-stack pool's service, one socket per group), answers
`<server> <count>` to each datagram and keeps per-source counts in
`<node>.counts.json` (rewritten every half second). Any other program (socat,
iperf) can stand in for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from manycast.drivers.kernel.control import counts_path
from manycast.drivers.kernel.loop import KernelLoop
from manycast.drivers.kernel.sockets import family_of
from manycast.drivers.mroute import mreqn
from manycast.drivers.mroute6 import mreq6

DUMP_EVERY = 0.5
ECHO_LIMIT = 64  # bytes of a request echoed in its answer
_BATCH = 1024  # datagrams read per wake-up, so control requests are not starved


@dataclass
class Responder:
    """A UDP counter on the group port: `<name> <n>` back to each datagram's sender."""

    name: str
    groups: list[str]
    port: int
    iface: str
    run_dir: Path
    counts: Counter[str] = field(default_factory=Counter)
    total: int = 0

    def run(self) -> None:
        """Serve until SIGTERM; the counts file is written once more on the way out."""
        loop = KernelLoop(self.run_dir, self.name, "service")
        ifindex = socket.if_nametoindex(self.iface)
        name = self.name.encode()

        def readable(sock: socket.socket) -> None:
            for _ in range(_BATCH):
                try:
                    request, sender = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                self.total += 1
                self.counts[sender[0]] += 1
                with contextlib.suppress(OSError):
                    # `<server> <total> <the request's first line>`: the asker can tell
                    # which of its requests this answers.
                    echo = request[:ECHO_LIMIT].split(b"\n", 1)[0]
                    sock.sendto(b"%s %d %s\n" % (name, self.total, echo), sender)

        def dump_every() -> None:
            self.dump()
            loop.call_at(loop.now + DUMP_EVERY, dump_every)

        loop.handlers["status"] = lambda _: {"server": self.name, "total": self.total}
        socks = [_group_socket(group, self.port, ifindex) for group in self.groups]
        for sock in socks:
            loop.watch(sock, partial(readable, sock))
        loop.call_at(0.0, dump_every)
        loop.ready()
        try:
            loop.run_until(float("inf"))
        finally:
            self.dump()
            loop.close()
            for sock in socks:
                sock.close()

    def dump(self) -> None:
        write_counts(self.run_dir, self.name, self.total, self.counts)


def _group_socket(group: str, port: int, ifindex: int) -> socket.socket:
    """A UDP socket on `port` joined to `group` on the interface `ifindex`."""
    v6 = family_of(group) == 6
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::", port))
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq6(group, ifindex))
    else:
        sock.bind(("0.0.0.0", port))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn(group, ifindex))
    return sock


def write_counts(run_dir: Path, name: str, total: int, counts: Counter[str]) -> None:
    """Write a service's counts file (`control.counts_path`) atomically."""
    path = counts_path(run_dir, name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"server": name, "total": total, "sources": counts}))
    os.replace(tmp, path)
