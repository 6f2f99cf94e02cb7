"""bench/tcp_move.py's link delay: the clients' edge links delayed, and what the delay cost.

With `--delay-ms D` (> 0) the lab emulates every link's `delay_ms`
(`drivers/kernel/link_delay.py`: the packets of a delayed link wait in an NFQUEUE
of a router's namespace, served by one Python program per router), and the
clients' LANs get D ms one way. The links between routers get none, unless
`--router-delays` keeps the topology's own (1-4 ms): then the servers are that far
apart too, and a move's state transfer between them pays their round trips. A
server's own link is not emulated (docs/lab.md, "Emulated link delay"). With D = 0
nothing is emulated, as before: the lab's links forward at once.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import re
from typing import Any

from manycast.drivers.kernel.link_delay import delayed_routers
from manycast.lab import Lab
from manycast.topology import Topology


def with_client_delay(text: str, delay_ms: float, router_links: bool = False) -> str:
    """`text` with `delay_ms = <delay_ms>` in every `[[clients]]` table (replacing one
    that is there); unless `router_links`, the `[[link]]`s between routers get none
    (the servers' own links are not emulated in the lab)."""

    def table(match: re.Match[str]) -> str:
        body = re.sub(r"\ndelay_ms\s*=\s*[0-9.]+", "", match.group(0))
        return body.replace("[[clients]]", f"[[clients]]\ndelay_ms = {delay_ms:g}", 1)

    text = re.sub(r"\[\[clients\]\](?:\n(?!\[)[^\n]*)*", table, text)
    if not router_links:
        text = re.sub(r"(\[\[link\]\]\nbetween = [^\n]*\ndelay_ms = )[0-9.]+", r"\g<1>0", text)
    return text


def delay_status(lab: Lab, topology: Topology) -> dict[str, Any]:
    """What the emulation did over the run, over every router's delayed paths: packets
    passed and dropped, and the latest a verdict came after its due time (ms)."""
    passed = dropped = 0
    latest = 0.0
    paths = 0
    for router in delayed_routers(topology):
        status = lab.ask(router, "link_delay", {"op": "status"})
        for path in status["paths"]:
            paths += 1
            passed += path["passed"]
            dropped += path["dropped"]
            latest = max(latest, path["latest_ms"])
    return {
        "delay_paths": paths,
        "delay_packets_passed": passed,
        "delay_packets_dropped": dropped,
        "delay_latest_verdict_ms": round(latest, 3),
    }


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/tcp_move.py")
