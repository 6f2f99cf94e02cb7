"""The dashboard's frames and the Prometheus metrics of a pool on either family.

The demo, its IPv6 twin (demo6: the same pool, routers and scenario on an IPv6
network) and its dual-stack twin (demo-dual: half its clients IPv4, half IPv6, one
pool) run on the memory driver; what a person reads on the page and in a scrape
must say the same of all: every client a dot coloured by the server whose portions
(the masks it joined with, in the client's family) hold the client's address, the
shares of the space, and the pool's groups written as their families write them.
"""

from __future__ import annotations

import ipaddress

import pytest

from manycast.observe.dashboard import Dashboard
from manycast.observe.metrics import PoolCollector, exposition, registry
from manycast.runtime import PoolRun
from manycast.topology import builtin
from test_metrics import Scrape

# The demo of each family; 0: the dual-stack pool's (both families).
TOPOLOGY = {4: "demo", 6: "demo6", 0: "demo-dual"}


@pytest.fixture(scope="module", params=sorted(TOPOLOGY))
def ran(request: pytest.FixtureRequest) -> tuple[int, PoolRun, Dashboard, Scrape]:
    """The demo of one family (or of both), 8 s on the memory driver (s1 set to 1/5
    at 5 s), its dashboard fed every tick and its metrics scraped at the end."""
    family: int = request.param
    run = PoolRun(builtin(TOPOLOGY[family]), "memory", seed=1)
    board = Dashboard(TOPOLOGY[family], driver="memory", duration=8.0, technique="R1")
    metrics = registry(PoolCollector.for_pool(run))
    run.run(8.0, on_tick=board.publish_live)
    board.publish_live(run.live_view())
    return family, run, board, Scrape(exposition(metrics))


def test_every_dot_is_the_client_of_the_server_whose_portions_hold_its_address(
    ran: tuple[int, PoolRun, Dashboard, Scrape],
) -> None:
    family, run, board, _ = ran
    frame = board.last
    assert frame is not None
    clients = sorted(run.topology.clients)
    assert len(frame["dots"]) == len(clients) == 240
    assert frame["clients"]["total"] == frame["clients"]["served"] == 240
    servers = run.nodes.servers
    families = set()
    for client, server, _ in frame["dots"]:
        address = run.topology.address(client)
        families.add(address.version)
        holders = [
            name
            for name, s in servers.items()
            if (portions := s.portions6 if address.version != s.address.version else s.portions)
            and portions.contains(address)
        ]
        assert holders == [server], (client, str(address), holders)
    assert families == ({family} if family else {4, 6})


def test_the_page_and_the_scrape_show_the_same_shares(
    ran: tuple[int, PoolRun, Dashboard, Scrape],
) -> None:
    _, _, board, scrape = ran
    frame = board.last
    assert frame is not None
    page = {s["name"]: s["share"] for s in frame["servers"] if s["status"] == "up"}
    scraped = scrape.by("manycast_server_share_ratio", "server")
    assert set(page) == {"s1", "s2", "s3", "s4"}
    assert abs(sum(page.values()) - 1.0) < 1e-9
    assert abs(page["s1"] - 0.2) < 1e-4
    for name, share in page.items():
        assert scraped[name] == pytest.approx(share)


def test_the_scrape_names_the_group_as_its_family_writes_it(
    ran: tuple[int, PoolRun, Dashboard, Scrape],
) -> None:
    family, run, _, scrape = ran
    (labels,) = scrape.values("manycast_pool_info")
    group = dict(labels)["group"]
    assert ipaddress.ip_address(group).version == (family or 4)
    group6 = dict(labels).get("group6")
    if family:
        assert group6 is None
    else:
        assert group6 is not None and ipaddress.ip_address(group6).version == 6
    assert group == str(run.topology.pool.group)
    # Every router holds the four servers' joins of the pool's group (of each group,
    # in a dual-stack pool) and of the control channel, and forwards the 240 clients'
    # packets by them.
    members = scrape.by("manycast_router_group_members", "router")
    assert members == dict.fromkeys(["core", "ra", "rb", "rs1", "rs2"], 8.0 if family else 12.0)
    assert scrape.value("manycast_router_forwarding_entries", router="ra") >= 120
    assert scrape.total("manycast_router_packets_forwarded_total", kind="multicast") > 1000
    assert scrape.total("manycast_router_joins_refused_total") == 0
    assert scrape.total("manycast_clients_answered") == 240
