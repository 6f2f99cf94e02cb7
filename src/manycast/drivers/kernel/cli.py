"""The lab programs' command line: `manycast daemon router|server|responder` (hidden).

The lab starts each program inside its node's namespace as
`python -m manycast daemon ROLE --node N --run-dir DIR --netns NS --seed S`; the
topology is the copy in the run directory. Nothing here is meant to be typed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from manycast.topology import Topology

daemon_app = typer.Typer(
    help="The kernel lab's per-namespace programs (`manycast lab` starts them).",
    no_args_is_help=True,
)

Node = Annotated[str, typer.Option(help="The topology node this program is.")]
RunDir = Annotated[
    Path, typer.Option(help="The lab's run directory (topology.toml, sockets, logs).")
]
Netns = Annotated[str | None, typer.Option(help="The network namespace to enter first.")]
Seed = Annotated[int, typer.Option(help="Seed for every random choice.")]


def _setup(role: str, node: str, run_dir: Path, netns: str | None) -> Topology:
    """Logging, the namespace, the topology: what every program does first."""
    from manycast.drivers import netns as namespaces
    from manycast.topology import TopologyError, load

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} {node}: %(message)s")
    if netns:
        namespaces.enter(netns)
    try:
        return load(run_dir / "topology.toml")
    except TopologyError as exc:
        raise typer.BadParameter(str(exc), param_hint="--run-dir") from None


@daemon_app.command()
def router(
    node: Node,
    run_dir: RunDir,
    netns: Netns = None,
    seed: Seed = 1,
    pin_idle: Annotated[
        float | None,
        typer.Option(help="Hold an active source's moved entry until idle this long (R4)."),
    ] = None,
    plane: Annotated[
        str,
        typer.Option(help="The pool group's data plane: mfc (per source) or portions (nftables)."),
    ] = "mfc",
    family: Annotated[
        int | None,
        typer.Option(help="A dual-stack pool's router: the family this daemon drives (4 or 6)."),
    ] = None,
) -> None:
    """The router daemon: the core's decisions in the kernel's multicast table."""
    from manycast.drivers.kernel.router_daemon import RouterDaemon

    topology = _setup("router", node, run_dir, netns)
    if node not in topology.routers:
        raise typer.BadParameter(f"{node} is not a router of this topology", param_hint="--node")
    if family not in (None, 4, 6):
        raise typer.BadParameter("expected 4 or 6", param_hint="--family")
    RouterDaemon(topology, node, run_dir, seed, pin_idle, plane, family).run()


@daemon_app.command()
def server(node: Node, run_dir: RunDir, netns: Netns = None, seed: Seed = 1) -> None:
    """The server agent: coordination and membership reports."""
    from manycast.drivers.kernel.server_agent import ServerAgent

    topology = _setup("server", node, run_dir, netns)
    if node not in topology.servers:
        raise typer.BadParameter(f"{node} is not a server of this topology", param_hint="--node")
    ServerAgent(topology, node, run_dir, seed).run()


@daemon_app.command()
def responder(node: Node, run_dir: RunDir, netns: Netns = None, seed: Seed = 1) -> None:
    """The service: a UDP counter on the group port (no randomness: `--seed` is unused)."""
    from manycast.drivers.kernel.responder import Responder

    topology = _setup("service", node, run_dir, netns)
    if node not in topology.gateways:
        raise typer.BadParameter(f"{node} is not a host of this topology", param_hint="--node")
    iface, _ = topology.gateways[node]
    pool = topology.pool
    # A dual-stack pool's service answers on both groups.
    groups = [str(g) for g in (pool.group, pool.group6) if g is not None]
    Responder(node, groups, pool.port, iface, run_dir).run()


@daemon_app.command("vip-router")
def vip_router(node: Node, run_dir: RunDir, netns: Netns = None, seed: Seed = 1) -> None:
    """A VIP router: first packets of flows to the VIP, onto the chosen server's segment."""
    from manycast.drivers.kernel.vip_router_daemon import VipRouterDaemon

    topology = _setup("vip_router", node, run_dir, netns)
    if node not in topology.vip_routers:
        raise typer.BadParameter(
            f"{node} is not a VIP router of this topology", param_hint="--node"
        )
    VipRouterDaemon(topology, node, run_dir, seed).run()


@daemon_app.command()
def http(node: Node, run_dir: RunDir, netns: Netns = None, seed: Seed = 1) -> None:
    """A VIP pool's service: an HTTP/1.1 server on the VIP (`--seed` is unused)."""
    from manycast.drivers.kernel.http_service import HttpService

    topology = _setup("service", node, run_dir, netns)
    pool = topology.pool
    if node not in topology.servers or pool.vip is None:
        raise typer.BadParameter(f"{node} is not a server of a VIP pool", param_hint="--node")
    address6 = None if pool.group6 is None else str(pool.group6)  # a dual-stack pool's
    HttpService(node, str(pool.vip), pool.port, run_dir, address6).run()


@daemon_app.command("link-delay")
def link_delay(node: Node, run_dir: RunDir, netns: Netns = None, seed: Seed = 1) -> None:
    """A router's emulated link delay: its delayed links' packets wait in NFQUEUEs
    (`--seed` is unused)."""
    from manycast.drivers.kernel import link_delay as delay

    topology = _setup(delay.ROLE, node, run_dir, netns)
    if node not in topology.routers:
        raise typer.BadParameter(f"{node} is not a router of this topology", param_hint="--node")
    delay.run(topology, node, run_dir)
