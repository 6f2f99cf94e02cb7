"""The VIP pool (seed Fig 17-19) in the kernel lab: SRv6 segments as trees, real HTTP, real clients.

The kernel forwards every packet: first packets to the VIP reach a VIP router's
daemon, which sends them down the chosen server's SRv6 segment and tags the flow
at the client's edge router (a conntrack mark); the flow's next packets take the
segment from the edge. Each server runs an HTTP/1.1 server on the VIP and
answers straight from it. They need root (network namespaces, SRv6, nftables);
elsewhere they skip and say why. CI runs them as root. Each runs on vip.toml, on
vip6.toml (an IPv6 VIP: IPv6 in IPv6 segments, End.DX6 at the last hop) and on
vip-dual.toml (a VIP of each family: one VIP router daemon sends IPv4 flows to
End.DX4 segments and IPv6 flows to End.DX6 ones; its single-client checks use the
IPv6 clients, whose flows take the new paths).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from labcheck import lab_missing

NEEDS_ROOT = "the kernel lab needs root and network namespaces; CI runs as root"
NEEDS_TOOLS = "the VIP lab tests need nft, curl and wrk: run `make lab-deps` as root"

# The bundled vip.toml (two VIP routers, four servers and a standby, its scenario),
# vip6.toml (the same on an IPv6 network) or vip-dual.toml (on a dual-stack pool), with
# two clients per LAN instead of sixty.
DUAL = 46
VIP_TOMLS = {
    family: files("manycast")
    .joinpath("topologies", name)
    .read_text()
    .replace("count = 60", "count = 2")
    for family, name in ((4, "vip.toml"), (6, "vip6.toml"), (DUAL, "vip-dual.toml"))
}
FAMILIES = pytest.mark.parametrize("family", [4, 6, DUAL], ids=["ipv4", "ipv6", "dual"])


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return NEEDS_ROOT
    missing = lab_missing()  # the kernel's multicast routing, which every lab router needs
    if missing is not None:
        return missing
    if not all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in ("nft", "curl", "wrk")):
        return NEEDS_TOOLS
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _wait(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _client(topology: Any, name: str) -> str:
    """The client `name` of vip.toml, and in a dual-stack pool its IPv6 neighbour."""
    return f"six-{name}" if topology.pool.dual else name


def _vip_for(topology: Any, client: str) -> Any:
    """The VIP `client` sends to: its family's."""
    return topology.pool.group_of(topology.address(client).version)


def _url(topology: Any, path: str, client: str) -> str:
    vip = _vip_for(topology, client)
    host = f"[{vip}]" if vip.version == 6 else str(vip)
    return f"http://{host}:{topology.pool.port}{path}"


@pytest.fixture(scope="module", params=[4, 6, DUAL], ids=["ipv4", "ipv6", "dual"])
def vip_lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from manycast.lab import Lab

    family = request.param
    lab = Lab(prefix=f"mv{os.getpid()}f{family}", run_root=tmp_path_factory.mktemp("viplab"))
    lab.down()
    topology = lab.up(VIP_TOMLS[family], "vip-test.toml")
    try:
        # Ready: both VIP routers follow the servers (they know every live server).
        def following() -> bool:
            return all(
                len(lab.ask(v, "vip_router", {"op": "status"})["alive"]) >= 4
                for v in topology.vip_routers
            )

        _wait(following, what="the VIP routers to follow the servers")
        yield lab, topology
    finally:
        lab.down()


def _status(lab: Any, node: str, role: str) -> dict[str, Any]:
    answer: dict[str, Any] = lab.ask(node, role, {"op": "status"})
    return answer


def _edge_role(topology: Any) -> str:
    """The daemon of ra that tags `_client`'s flows (a dual-stack router's IPv6 one)."""
    return "router6" if topology.pool.dual else "router"


def _edge_marks(lab: Any, topology: Any) -> int:
    return int(_status(lab, "ra", _edge_role(topology))["vip"]["marks_set"])


class _KeepAlive:
    """One HTTP/1.1 keep-alive connection from a client's namespace to the VIP."""

    def __init__(self, lab: Any, topology: Any, client: str) -> None:
        from manycast.drivers import netns

        vip = _vip_for(topology, client)
        family = socket.AF_INET6 if vip.version == 6 else socket.AF_INET
        self.sock = netns.socket_in(lab.ns(client), family, socket.SOCK_STREAM)
        self.sock.settimeout(5.0)
        self.sock.connect((str(vip), topology.pool.port))
        self.file = self.sock.makefile("rb")

    def get(self, path: str) -> str:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: vip\r\n\r\n".encode())
        length = 0
        status = self.file.readline()
        assert b" 200 " in status, status
        while (line := self.file.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = self.file.read(length).decode()
        server, _, answered = body.split()
        assert answered == path
        return server

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_lab_vip_curl_is_answered_from_the_vip_and_the_edge_tags_its_flow(vip_lab: Any) -> None:
    """curl, unchanged, reaches a server through the VIP (claims 15, 16, 26): the VIP
    router picks the server, the answer comes from the VIP itself (direct server
    return: the connection is to the VIP), and the client's edge router is told to
    tag the flow."""
    lab, topology = vip_lab
    from manycast.drivers import netns

    client = _client(topology, "a1")
    vip = _url(topology, "/hello", client)
    before = _status(lab, "vr1", "vip_router")["stats"]["flows"]
    marks = _edge_marks(lab, topology)
    done = subprocess.run(
        ["curl", "-s", "-m", "5", "-D", "-", vip],
        preexec_fn=lambda: netns.enter(lab.ns(client)),
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    served_by = re.search(rb"X-Served-By: (\S+)", done.stdout)
    assert served_by is not None and served_by.group(1).decode() in topology.servers
    assert done.stdout.rstrip().endswith(b"/hello")
    assert _status(lab, "vr1", "vip_router")["stats"]["flows"] == before + 1
    _wait(lambda: _edge_marks(lab, topology) > marks, what="the edge to tag the flow")


def test_claim_27_lab_a_tagged_flow_bypasses_the_vip_router(vip_lab: Any) -> None:
    """Once the edge has the flow's tag, none of the flow's packets reach a VIP router:
    the kernel pushes them onto the server's segment at the edge (Fig 18)."""
    lab, topology = vip_lab
    marks = _edge_marks(lab, topology)
    conn = _KeepAlive(lab, topology, _client(topology, "a2"))
    edge = _edge_role(topology)
    try:
        first = conn.get("/first")
        _wait(lambda: _edge_marks(lab, topology) > marks, what="the edge to tag the flow")
        seen = {v: _status(lab, v, "vip_router")["stats"]["first_packets"] for v in ("vr1", "vr2")}
        pushed = _status(lab, "ra", edge)["vip"]["pushed"]
        servers = {conn.get(f"/n{i}") for i in range(50)}
        after = {v: _status(lab, v, "vip_router")["stats"]["first_packets"] for v in seen}
        assert servers == {first}, "a flow is served by one server"
        assert after == seen, f"packets of a tagged flow reached a VIP router: {seen} -> {after}"
        # 50 requests and their ACKs went onto the segment at the edge.
        assert _status(lab, "ra", edge)["vip"]["pushed"] >= pushed + 50
    finally:
        conn.close()


def test_lab_vip_wrk_across_share_change_vip_router_kill_and_server_added(vip_lab: Any) -> None:
    """wrk (unchanged) drives the VIP over keep-alive connections while s1's share
    changes, vr1 is SIGKILLed and s5 joins: no socket error, no non-2xx answer. Then
    new flows go through vr2 (no single point of failure, claims 27, 41), each to its
    client's owner in the allocation that now includes s5 (Fig 19)."""
    lab, topology = vip_lab
    from manycast.drivers import netns

    client = _client(topology, "b1")
    url = _url(topology, "/", client)
    wrk = subprocess.Popen(
        ["wrk", "-t", "2", "-c", "16", "-d", "9s", "--timeout", "3s", url],
        preexec_fn=lambda: netns.enter(lab.ns(client)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def scenario() -> None:
        time.sleep(2.0)
        lab.ask("s1", "server", {"op": "set_share", "server": "s1", "share": "1/5"})
        time.sleep(2.0)
        lab.kill("vr1", "vip_router")
        time.sleep(1.0)
        lab.start_server("s5")

    steps = threading.Thread(target=scenario)
    steps.start()
    out, _ = wrk.communicate(timeout=60)
    steps.join()
    report = out.decode(errors="replace")
    assert wrk.returncode == 0, report
    assert "Socket errors" not in report, report
    assert "Non-2xx" not in report, report
    requests = re.search(r"(\d+) requests in", report)
    assert requests is not None and int(requests.group(1)) > 100, report

    # New flows now: vr2 picks each by the allocation that includes s5.
    flows = _status(lab, "vr2", "vip_router")["stats"]["flows"]
    _wait(
        lambda: float(Fraction(_status(lab, "s5", "server")["share"])) > 0,
        what="s5 to get a share",
    )
    clients = ["a1", "a2", "b1", "b2"]
    if topology.pool.dual:  # clients of both families
        clients = ["a1", "six-a2", "b1", "six-b2"]
    addresses = [str(topology.address(c)) for c in clients]

    def new_flows_at_owners() -> bool:
        owners = lab.ask("s2", "server", {"op": "owners", "addresses": addresses})["owners"]
        return all(
            _get_once(lab, topology, c, "/after") == owners[a]
            for c, a in zip(clients, addresses, strict=True)
        )

    _wait(new_flows_at_owners, timeout=30, what="new flows at their owners through vr2")
    assert _status(lab, "vr2", "vip_router")["stats"]["flows"] >= flows + len(clients)


def _get_once(lab: Any, topology: Any, client: str, path: str) -> str:
    """One request on a new connection (a new flow): the server that answered."""
    conn = _KeepAlive(lab, topology, client)
    try:
        return conn.get(path)
    finally:
        conn.close()


def test_the_http_service_listens_at_once_without_a_reverse_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server added to a running pool answers on both VIPs as soon as its agent
    claims clients: binding looks no name up (in a lab namespace an IPv6 address's
    PTR query waits 5 s on a resolver it cannot reach)."""
    from manycast.drivers.kernel import http_service

    def no_lookup(name: str = "") -> str:
        raise AssertionError(f"a name lookup of {name} while binding")

    monkeypatch.setattr(socket, "getfqdn", no_lookup)
    for address in ("127.0.0.1", "::1"):
        server = http_service._Server((address, 0), http_service._Handler)
        try:
            assert server.server_name == address and server.server_port > 0
        finally:
            server.server_close()


@FAMILIES
def test_lab_run_vip_scenario_every_request_answered_each_flow_on_one_server(
    tmp_path: Path, family: int
) -> None:
    """`manycast lab run` on vip.toml (a share change, a VIP router killed, a server
    added), with the HTTP prober opening a new connection every four requests:
    every request is answered, no connection's answers come from two servers, and
    every client is served at the end."""
    from manycast.lab import Lab, LabRun

    lab = Lab(prefix=f"mw{os.getpid()}f{family}", run_root=tmp_path)
    lab.down()
    try:
        topology = lab.up(VIP_TOMLS[family], "vip-run.toml")
        summary = LabRun(lab, topology).run(topology.duration, settle=15.0)
    finally:
        lab.down()
    kernel, vip = summary["kernel"], summary["vip"]
    assert summary["requests_failed"] == 0, summary
    assert kernel["flows_split"] == 0 and kernel["wrong_answers"] == 0, kernel
    assert summary["clients_served_at_end"] == summary["clients"], summary
    # (vip-dual: clients of both families, each at its family's VIP)
    assert {topology.address(c).version for c in topology.clients} == set(topology.pool.families)
    assert kernel["connections"] >= 20, kernel
    assert vip["vip_routers"]["vr1"]["status"] == "dead"
    assert vip["vip_routers"]["vr2"]["flows"] > 0, vip
    assert vip["flows_tagged_at_edges"] >= vip["flows"] > 0, vip
    assert vip["packets_labelled_at_edges"] > 0, vip
