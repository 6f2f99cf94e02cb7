"""The virtual-IP pool measured in the kernel lab (root), each figure against a baseline run
in the same command. `bench/vip.py` includes these figures under its `lab` key; run alone,
this prints them as one JSON object, the last line on stdout.

The pool is the bundled vip.toml (two VIP routers, four servers, clients on ra and rb),
without its scenario unless said. The kernel forwards every packet (docs/lab.md).

1. `vip_router_packets_after_first_per_flow`: a `lab run` of 120 HTTP clients opening
   a new connection every `requests_per_connection` answers (4: short flows, over 1000
   flows; and 40: longer ones), packets of a flow that reach a VIP router after its
   first, per flow. Baseline: the same run with the VIP routers told not to tag, so
   every packet goes through a VIP router as through a load balancer in the path.
2. `labelled_over_plain_pps`: iperf 2, UDP with 64-byte payloads, from client a1 to
   its server: a tagged flow to the VIP (the edge pushes it onto the server's SRv6
   segment, End.DX4 at the last router) against the same generator sending to the
   server's own address over the same routers (plain IPv4 forwarding). Datagrams the
   server received per second; rounds in random order; the ratio of medians and the
   per-round ratios.
3. `vip_router_failover_s`: vr1 (the nearest VIP router) is SIGKILLed while a client
   opens a new connection every 20 ms (a connection counts as served if its SYN is
   answered within 0.5 s, before any retransmission) and others keep requesting on
   tagged keep-alive connections. From the kill until the first connection opened
   after it is served; target: the pool's detection time (heartbeat x misses) + 0.1 s.
   `tagged_flows_broken`: keep-alive connections with a failed request.
4. `first_packet_extra_rtt`: a new connection's handshake and first answer over a
   request's latency on an established connection, to the VIP; baseline: the same to
   the server's own address (no VIP router on the way).

Its last line on stdout is one json object (`_common.run_and_emit`): the result,
or why it stopped (an error, a missing package, SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import contextlib
import os
import random
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Any

from _common import progress, run_and_emit
from manycast.drivers import netns
from manycast.lab import Lab, LabRun
from manycast.topology import Topology

NEEDS_ROOT = "the kernel lab needs root (network namespaces, SRv6, nftables)"
IPERF_PORT, PLAIN_PORT, HTTP_PLAIN_PORT = 5001, 5002, 8080
STREAMS = 3  # parallel iperf streams (flows): one sender thread alone cannot fill the path


def vip_toml(count: int, per_connection: int, scenario: bool) -> str:
    text = files("manycast").joinpath("topologies", "vip.toml").read_text()
    text = text.replace("count = 60", f"count = {count}")
    text = text.replace(
        "requests_per_connection = 4", f"requests_per_connection = {per_connection}"
    )
    if not scenario:
        text = re.sub(r"\[\[scenario\]\].*?(?=\n\[run\])", "", text, flags=re.S)
    return text


def _in(lab: Lab, node: str) -> Callable[[], None]:
    name = lab.ns(node)
    return lambda: netns.enter(name)


# -- 1: tagging ---------------------------------------------------------------------------


def tagging_run(lab: Lab, per_connection: int, tagged: bool, duration: float) -> dict[str, Any]:
    topology = lab.up(vip_toml(60, per_connection, scenario=False), "vip-bench.toml")
    try:
        if not tagged:
            for vip_router in topology.vip_routers:
                lab.ask(vip_router, "vip_router", {"op": "tagging", "on": False})
        summary = LabRun(lab, topology).run(duration)
    finally:
        lab.down()
    vip = summary["vip"]
    flows = max(1, vip["flows"])
    at_vip_routers = sum(r["packets"] for r in vip["vip_routers"].values())
    return {
        "flows": vip["flows"],
        "packets_after_first_per_flow": round(vip["packets_after_first"] / flows, 3),
        "vip_router_packets_per_flow": round(at_vip_routers / flows, 3),
        "packets_pushed_at_edges": vip["packets_labelled_at_edges"],
        "requests_ok": summary["requests_ok"],
        "requests_failed": summary["requests_failed"],
        "flows_split": summary["kernel"]["flows_split"],
    }


def tagging(lab: Lab, quick: bool, rng: random.Random) -> dict[str, Any]:
    duration = 10.0 if quick else 20.0
    out: dict[str, Any] = {}
    cases = [(4, True), (4, False), (40, True)]
    rng.shuffle(cases)
    for per_connection, tagged in cases:
        name = f"{'tagged' if tagged else 'untagged'}_{per_connection}_per_connection"
        progress(f"lab tagging: {name}, 120 clients, {duration} s")
        out[name] = one = tagging_run(lab, per_connection, tagged, duration)
        progress(f"  {one}")
    return out


# -- a small lab for 2-4 --------------------------------------------------------------------


def _owner(lab: Lab, topology: Topology, client: str) -> str:
    address = str(topology.address(client))
    answer = lab.ask("s1", "server", {"op": "owners", "addresses": [address]})
    return str(answer["owners"][address])


def _wait_following(lab: Lab, topology: Topology) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if all(
                len(lab.ask(v, "vip_router", {"op": "status"})["alive"]) >= 4
                for v in topology.vip_routers
            ):
                return
        time.sleep(0.1)
    raise RuntimeError("the VIP routers never followed the servers")


def _now_into(times: list[float]) -> None:
    times.append(time.perf_counter())


def _wait_udp_bound(lab: Lab, node: str, port: int, timeout: float = 20.0) -> None:
    """Until a UDP socket on `port` exists in `node`'s namespace (a server started)."""
    needle = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while needle not in netns.read_in(lab.ns(node), "/proc/net/udp"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on UDP port {port} in {node}")
        time.sleep(0.05)
    time.sleep(0.1)


def _iperf_received_pps(out: str) -> tuple[float, float] | None:
    """(received datagrams per second, lost fraction) from iperf 2's client-side Server Report."""
    found = re.findall(
        r"([\d.]+)-\s*([\d.]+) sec\s+[\d.]+ \w?Bytes\s+[\d.]+ \w?bits/sec"
        r"\s+[\d.]+ ms\s+(\d+)/\s*(\d+)",
        out,
    )
    if not found:
        return None
    # One Server Report per stream (-P): their sum.
    seconds = max(float(end) - float(start) for start, end, _, _ in found)
    lost = sum(int(n) for _, _, n, _ in found)
    total = sum(int(n) for _, _, _, n in found)
    return (total - lost) / seconds, lost / max(1, total)


def pps(
    lab: Lab, topology: Topology, rounds: int, seconds: float, rng: random.Random
) -> dict[str, Any]:
    client = "a1"
    owner = _owner(lab, topology, client)
    vip, owner_address = str(topology.pool.vip), str(topology.address(owner))
    samples: dict[str, list[float]] = {"labelled": [], "plain": []}
    losses: dict[str, list[float]] = {"labelled": [], "plain": []}
    per_round: list[float] = []
    for index in range(rounds):
        order = ["labelled", "plain"]
        rng.shuffle(order)
        got: dict[str, float] = {}
        for kind in order:
            target, port = (vip, IPERF_PORT) if kind == "labelled" else (owner_address, PLAIN_PORT)
            # A fresh iperf server per measurement: one that served parallel
            # streams does not always take the next test.
            bind = vip if kind == "labelled" else owner_address
            server = lab.popen(
                owner,
                ["iperf", "-s", "-u", "-B", bind, "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _wait_udp_bound(lab, owner, port)
            argv = [
                "iperf",
                "-c",
                target,
                "-u",
                "-p",
                str(port),
                "-l",
                "64",
                "-b",
                "2000M",
                "-t",
                str(seconds),
                "-P",
                str(STREAMS),
            ]
            try:
                done = subprocess.run(
                    argv,
                    preexec_fn=_in(lab, client),
                    capture_output=True,
                    text=True,
                    timeout=seconds + 30,
                    check=False,
                )
            finally:
                server.kill()
                server.wait()
            parsed = _iperf_received_pps(done.stdout)
            if parsed is None:
                progress(f"  {kind}: no server report\n{done.stdout[-600:]}{done.stderr[-300:]}")
                continue
            got[kind] = parsed[0]
            samples[kind].append(parsed[0])
            losses[kind].append(parsed[1])
        if len(got) == 2:
            per_round.append(got["labelled"] / got["plain"])
        progress(
            f"  pps round {index + 1}/{rounds}: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in got.items())
        )
    if not samples["labelled"] or not samples["plain"]:
        return {"labelled_over_plain_pps": None, "reason": "iperf gave no server report"}
    labelled, plain = statistics.median(samples["labelled"]), statistics.median(samples["plain"])
    vr = lab.ask("vr1", "vip_router", {"op": "status"})["stats"]
    return {
        "labelled_over_plain_pps": round(labelled / plain, 3),
        "labelled_pps_median": round(labelled),
        "plain_pps_median": round(plain),
        "per_round_ratios": [round(r, 3) for r in per_round],
        "lost_fraction_median": {k: round(statistics.median(v), 4) for k, v in losses.items() if v},
        "server": owner,
        "vip_router_flows_seen": vr["flows"],
        "baseline": "the same iperf UDP stream to the server's own address over the same "
        "routers (plain forwarding)",
    }


class _KeepAlive:
    def __init__(
        self,
        lab: Lab,
        client: str,
        target: tuple[str, int],
        timeout: float = 2.0,
        on_socket: Callable[[], None] | None = None,
    ) -> None:
        self.sock = netns.socket_in(lab.ns(client), socket.AF_INET, socket.SOCK_STREAM)
        if on_socket is not None:
            on_socket()  # a timer starts here: making a socket in a namespace is not the network
        self.sock.settimeout(timeout)
        self.sock.connect(target)
        self.file = self.sock.makefile("rb")

    def get(self, path: str) -> str:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: vip\r\n\r\n".encode())
        status = self.file.readline()
        if b" 200 " not in status:
            raise OSError(f"answer {status!r}")
        length = 0
        while (line := self.file.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return self.file.read(length).decode().split()[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def _client_socket_factory(lab: Lab, client: str) -> Callable[[], socket.socket]:
    """Sockets in `client`'s namespace, made by one thread that stays there."""
    name = lab.ns(client)
    return lambda: netns.socket_in(name, socket.AF_INET, socket.SOCK_STREAM)


def failover_round(
    lab: Lab, target: tuple[str, int]
) -> tuple[float | None, float | None, list[str]]:
    """Kill vr1 under load: (seconds until a new connection is served, seconds until
    the first one that was not, the tagged connections' failures)."""
    tagged = [_KeepAlive(lab, c, target) for c in ("b1", "b2")]
    for conn in tagged:
        conn.get("/warm")
    stop = threading.Event()
    failures: list[str] = []
    attempts: list[tuple[float, bool]] = []  # (opened at, served without retransmission)

    def keep_asking() -> None:
        while not stop.is_set():
            for conn in tagged:
                try:
                    conn.get("/tagged")
                except OSError as exc:
                    failures.append(str(exc))
            time.sleep(0.01)

    def open_new() -> None:
        # A new connection every 20 ms, each on its own (non-blocking): one that waits
        # for its SYN's answer never holds up the next attempt.
        selector = selectors.DefaultSelector()
        clients = [_client_socket_factory(lab, c) for c in ("a1", "a2")]
        pending: dict[socket.socket, float] = {}
        i, next_open = 0, time.monotonic()
        while not stop.is_set() or pending:
            now = time.monotonic()
            if not stop.is_set() and now >= next_open:
                sock = clients[i % 2]()
                i += 1
                next_open += 0.02
                sock.setblocking(False)
                sock.connect_ex(target)
                pending[sock] = now
                selector.register(sock, selectors.EVENT_WRITE)
            for key, _ in selector.select(0.005):
                done = key.fileobj
                assert isinstance(done, socket.socket)
                ok = done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                attempts.append((pending.pop(done), ok))
                selector.unregister(done)
                done.close()
            for sock, opened in list(pending.items()):
                if time.monotonic() - opened > 0.5:  # the SYN needed retransmitting
                    attempts.append((pending.pop(sock), False))
                    selector.unregister(sock)
                    sock.close()
        selector.close()

    threads = [threading.Thread(target=keep_asking), threading.Thread(target=open_new)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    killed = time.monotonic()
    lab.kill("vr1", "vip_router")
    time.sleep(3.0)
    stop.set()
    for thread in threads:
        thread.join()
    for conn in tagged:
        conn.close()
    after = [(t - killed, ok) for t, ok in attempts if t >= killed]
    served = next((t for t, ok in after if ok), None)
    first_fail = next((t for t, ok in after if not ok), None)
    return served, first_fail, failures


def failover(lab: Lab, topology: Topology, rounds: int) -> dict[str, Any]:
    pool = topology.pool
    detection = pool.heartbeat_s * pool.heartbeat_misses
    target = (str(pool.vip), pool.port)
    times: list[float] = []
    broken = 0
    for index in range(rounds):
        _wait_following(lab, topology)
        time.sleep(1.0)  # the routers route the VIP to vr1 again
        served, first_fail, failures = failover_round(lab, target)
        if served is not None:
            times.append(served)
        broken += len(failures)
        progress(
            f"  failover round {index + 1}/{rounds}: new flows served again after "
            f"{None if served is None else round(served, 3)} s (first unserved attempt at "
            f"{None if first_fail is None else round(first_fail, 3)} s), "
            f"tagged failures {len(failures)}"
        )
        lab.start("vr1", "vip_router")
        lab.wait_ready("vr1", "vip_router")
    return {
        "vip_router_failover_s": round(statistics.median(times), 3) if times else None,
        "vip_router_failover_s_runs": [round(t, 3) for t in times],
        "vip_router_failover_target_s": round(detection + 0.1, 3),
        "detection_s": detection,
        "tagged_flows_broken": broken,
        "how": "a new connection every 20 ms from a1, a2; served: its SYN answered within 0.5 s",
    }


def _wait_listening(lab: Lab, client: str, target: tuple[str, int]) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            _KeepAlive(lab, client, target).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def first_packet(lab: Lab, topology: Topology, samples: int) -> dict[str, Any]:
    client = "a1"
    owner = _owner(lab, topology, client)
    owner_address = str(topology.address(owner))
    plain_server = lab.popen(
        owner,
        [
            sys.executable,
            "-c",
            "import sys; from manycast.drivers.kernel.http_service import serve; "
            "serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))",
            owner,
            owner_address,
            str(HTTP_PLAIN_PORT),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(lab, client, (owner_address, HTTP_PLAIN_PORT))
        out: dict[str, Any] = {}
        for kind, target in (
            ("vip", (str(topology.pool.vip), topology.pool.port)),
            ("direct", (owner_address, HTTP_PLAIN_PORT)),
        ):
            first: list[float] = []
            steady: list[float] = []
            for _ in range(samples):
                began: list[float] = []
                conn = _KeepAlive(lab, client, target, on_socket=partial(_now_into, began))
                conn.get("/")
                first.append(time.perf_counter() - began[0])
                for _ in range(5):
                    start = time.perf_counter()
                    conn.get("/")
                    steady.append(time.perf_counter() - start)
                conn.close()
                time.sleep(0.01)
            out[kind] = {
                "first_ms_median": round(statistics.median(first) * 1000, 3),
                "steady_ms_median": round(statistics.median(steady) * 1000, 3),
                "first_over_steady": round(statistics.median(first) / statistics.median(steady), 3),
            }
    finally:
        plain_server.kill()
        plain_server.wait()
    return {
        "first_packet_extra_rtt": out["vip"]["first_over_steady"],
        "first_packet_extra_rtt_baseline_direct": out["direct"]["first_over_steady"],
        "runs": out,
        "baseline": "new connections straight to the server's own address (no VIP router)",
    }


def measure(quick: bool = False, seed: int = 20240917) -> dict[str, Any]:
    """Every lab figure (None with a reason when the lab cannot run here)."""
    if os.geteuid() != 0:
        return {
            "reason": NEEDS_ROOT,
            "vip_router_packets_after_first_per_flow": None,
            "labelled_over_plain_pps": None,
        }
    rng = random.Random(seed)
    lab = Lab(prefix=f"mvb{os.getpid()}", run_root=Path(tempfile.mkdtemp(prefix="manycast-bench-")))
    lab.down()
    result: dict[str, Any] = {}
    runs = tagging(lab, quick, rng)
    result["vip_router_packets_after_first_per_flow"] = runs["tagged_4_per_connection"][
        "packets_after_first_per_flow"
    ]
    result["vip_router_packets_after_first_per_flow_baseline"] = runs["untagged_4_per_connection"][
        "packets_after_first_per_flow"
    ]
    result["vip_router_packets_after_first_per_flow_long_flows"] = runs["tagged_40_per_connection"][
        "packets_after_first_per_flow"
    ]
    result["tagging_runs"] = runs
    topology = lab.up(vip_toml(2, 4, scenario=False), "vip-bench-small.toml")
    try:
        _wait_following(lab, topology)
        progress("lab first packet latency")
        result["first_packet"] = first_packet(lab, topology, 10 if quick else 30)
        result["first_packet_extra_rtt"] = result["first_packet"]["first_packet_extra_rtt"]
        progress("lab labelled vs plain pps (iperf UDP, 64-byte payloads)")
        result["pps"] = pps(lab, topology, 3 if quick else 7, 2.0 if quick else 3.0, rng)
        result["labelled_over_plain_pps"] = result["pps"]["labelled_over_plain_pps"]
        progress("lab VIP router failover")
        result["failover"] = failover(lab, topology, 3 if quick else 7)
        result["vip_router_failover_s"] = result["failover"]["vip_router_failover_s"]
        result["tagged_flows_broken"] = result["failover"]["tagged_flows_broken"]
    finally:
        lab.down()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run")
    args = parser.parse_args()
    began = time.monotonic()

    def run() -> dict[str, Any]:
        result = {"bench": "vip_lab", "quick": args.quick, **measure(args.quick)}
        result["seconds"] = round(time.monotonic() - began, 1)
        return result

    run_and_emit("vip_lab", run)


if __name__ == "__main__":
    main()
