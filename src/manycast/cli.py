"""The `manycast` command line."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from manycast import auth
from manycast.runtime import PoolRun, Snapshot
from manycast.topology import Topology, TopologyError, builtin, load

app = typer.Typer(
    help="manycast: one service on many servers behind one multicast address.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
topology_app = typer.Typer(help="Check and inspect topology files.", no_args_is_help=True)
app.add_typer(topology_app, name="topology")
keys_app = typer.Typer(help="Keys of private pools (Ed25519).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

err = Console(stderr=True)


def _load(path: Path | None) -> Topology:
    try:
        return builtin("demo") if path is None else load(path)
    except TopologyError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _table(snap: Snapshot, title: str) -> Group:
    table = Table(title=f"{title}  t = {snap.now:5.1f} s", title_justify="left")
    for column in ("server", "status", "share", "sessions", "requests/s", "epoch"):
        table.add_column(column, justify="right" if column not in ("server", "status") else "left")
    for s in snap.servers:
        style = {"dead": "red", "standby": "dim"}.get(s.status, "")
        table.add_row(
            s.name,
            s.status,
            f"{s.share:6.2%}",
            str(s.sessions),
            f"{s.requests_per_s:7.1f}",
            str(s.epoch),
            style=style,
        )
    clients = Text(
        f"clients served in the last seconds: {snap.served_recently}/{snap.clients}   "
        f"requests ok {snap.requests_ok}  failed {snap.requests_failed}  resets {snap.resets}"
    )
    events = Text(
        "\n".join(f"  {at:5.1f} s  {what}" for at, what in snap.events[-6:]) or "  (no events yet)"
    )
    return Group(table, clients, Text("events:"), events)


def _run(run: PoolRun, duration: float, as_json: bool, title: str, realtime: bool) -> None:
    live_wanted = not as_json and sys.stdout.isatty()

    async def main() -> None:
        if live_wanted:
            with Live(_table(run.snapshot(), title), refresh_per_second=4, transient=False) as live:
                await run.run(
                    duration,
                    lambda snap: live.update(_table(snap, title)),
                    tick=0.25,
                    realtime=realtime,
                )
        else:
            last = [-1.0]

            def progress(snap: Snapshot) -> None:
                if snap.now - last[0] >= 1.0 or snap.now >= duration:
                    last[0] = snap.now
                    shares = " ".join(
                        f"{s.name}={s.share:.0%}" for s in snap.servers if s.status == "up"
                    )
                    err.print(
                        f"t={snap.now:5.1f}s served {snap.served_recently}/{snap.clients} "
                        f"ok={snap.requests_ok} failed={snap.requests_failed} "
                        f"resets={snap.resets} {shares}",
                        highlight=False,
                    )

            await run.run(duration, progress, tick=0.25, realtime=realtime)

    try:
        asyncio.run(main())
    except OSError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    summary = run.summary()
    if as_json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    if summary["clients_served_at_end"] != summary["clients"]:
        raise typer.Exit(1)


def _print_summary(summary: dict[str, object]) -> None:
    console = Console()
    console.print(
        f"\n[bold]summary[/bold] ({summary['driver']}, {summary['duration_s']} s): "
        f"{summary['clients_served_at_end']}/{summary['clients']} clients served at the end, "
        f"{summary['requests_ok']} requests ok, {summary['requests_failed']} failed, "
        f"{summary['resets']} resets, {summary['reconnects']} reconnects, "
        f"state lost {summary['state_lost']}"
    )
    latency = summary["latency_ms"]
    console.print(f"latency p50/p99: {latency['p50']} / {latency['p99']} ms")  # type: ignore[index]
    for event in summary["events"]:  # type: ignore[attr-defined]
        recovery = event["recovery_s"]
        when = "never recovered" if recovery is None else f"all served again after {recovery:.2f} s"
        console.print(
            f"  {event['at']:5.1f} s {event['what']}: "
            f"{event['affected_clients']} clients disrupted, {when}"
        )


@app.command()
def demo(
    duration: Annotated[
        float | None, typer.Option(help="Seconds to run (default: the topology's).")
    ] = None,
    topology: Annotated[
        Path | None, typer.Option(help="A topology TOML file (default: the built-in demo).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON object, last line.")
    ] = False,
    driver: Annotated[
        str, typer.Option(help="overlay (real UDP on loopback) or memory (virtual clock).")
    ] = "overlay",
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 1,
    base_port: Annotated[
        int, typer.Option(help="First UDP port of the overlay endpoints.")
    ] = 47000,
) -> None:
    """Run a live pool: servers share the clients, one shrinks, one dies, one joins.

    Exit status 0 only if every client was served at the end.
    """
    if driver not in ("overlay", "memory"):
        err.print(f"[red]error:[/red] --driver must be overlay or memory, not {driver!r}")
        raise typer.Exit(2)
    topo = _load(topology)
    length = topo.duration if duration is None else duration
    if length <= 0:
        err.print("[red]error:[/red] --duration must be positive")
        raise typer.Exit(2)
    run = PoolRun(topo, driver, seed=seed, base_port=base_port)  # type: ignore[arg-type]
    if not as_json:
        err.print(
            f"manycast demo: {len(topo.routers)} routers, {len(topo.servers)} servers, "
            f"{len(topo.clients)} clients, group {topo.pool.group} ({topo.pool.name}), "
            f"technique {topo.pool.technique}, driver {driver}"
        )
    _run(run, length, as_json, "manycast demo", realtime=driver == "memory" and not as_json)


@app.command()
def run(
    topology: Annotated[Path, typer.Argument(help="The topology TOML file.")],
    nodes: Annotated[
        str | None, typer.Option(help="Comma-separated nodes to host here (default: all).")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Seconds to run (default: the topology's).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON object, last line.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 1,
    base_port: Annotated[
        int, typer.Option(help="First UDP port of the overlay endpoints.")
    ] = 47000,
) -> None:
    """Run a topology on the overlay, all of it or only some nodes.

    Processes on one or several hosts that load the same file and base port form one
    pool: each hosts the nodes it is given (`[run] hosts` in the file places nodes on
    other machines). The summary covers the nodes hosted here.
    """
    topo = _load(topology)
    local: set[str] | None = None
    if nodes:
        local = {n.strip() for n in nodes.split(",") if n.strip()}
        # Client groups may be named whole: --nodes a expands to a1..aN.
        groups = {c.group for c in topo.clients.values()}
        for group in [n for n in local if n in groups]:
            local.discard(group)
            local |= {c.name for c in topo.clients.values() if c.group == group}
        unknown = sorted(local - set(topo.interfaces))
        if unknown:
            err.print(f"[red]error:[/red] no such node in {topology}: {', '.join(unknown)}")
            raise typer.Exit(2)
    length = topo.duration if duration is None else duration
    if length <= 0:
        err.print("[red]error:[/red] --duration must be positive")
        raise typer.Exit(2)
    pool = PoolRun(topo, "overlay", seed=seed, base_port=base_port, local=local)
    _run(pool, length, as_json, f"manycast run {topology.name}", realtime=False)


@keys_app.command("new")
def keys_new(
    path: Annotated[Path, typer.Argument(help="Where to write the private key (PEM, mode 0600).")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Create an Ed25519 key pair for a private pool; print its public key."""
    if path.exists() and not force:
        err.print(f"[red]error:[/red] {path} exists (use --force to replace it)")
        raise typer.Exit(2)
    key = auth.generate()
    try:
        auth.save_private(key, path)
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot write {path}: {exc.strerror}")
        raise typer.Exit(2) from None
    print(f"public key: {auth.encode_public(auth.public_bytes(key))}")
    err.print(f"private key written to {path} (mode 0600): give it only to the pool's participants")


@keys_app.command("show")
def keys_show(path: Annotated[Path, typer.Argument(help="A private key file.")]) -> None:
    """Print the public key of a private key file."""
    try:
        key = auth.load_private(path)
    except auth.AuthError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    print(f"public key: {auth.encode_public(auth.public_bytes(key))}")


@topology_app.command("check")
def topology_check(path: Path) -> None:
    """Check a topology file and show what it compiles to."""
    topo = _load(path)
    console = Console()
    console.print(
        f"[green]ok[/green] {path}: pool {topo.pool.name} -> {topo.pool.group}:{topo.pool.port}"
    )
    table = Table("node", "kind", "interfaces")
    for node in sorted(topo.interfaces):
        if topo.kind(node) == "client" and not node.endswith("1"):
            continue
        ifaces = ", ".join(
            f"{i.name} {i.address}/{i.network.prefixlen} ({i.link})"
            for i in topo.interfaces[node].values()
        )
        table.add_row(node, topo.kind(node), ifaces)
    console.print(table)
    console.print(
        f"{len(topo.clients)} clients, {len(topo.links)} links, {len(topo.scenario)} scenario steps"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
