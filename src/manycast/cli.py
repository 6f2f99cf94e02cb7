"""The `manycast` command line."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from manycast import auth, naming
from manycast import dns as dnsserver
from manycast.drivers import heap
from manycast.drivers.factory import DRIVERS
from manycast.drivers.kernel.cli import daemon_app
from manycast.errors import ConfigError
from manycast.runtime import LiveView, PoolRun
from manycast.topology import Topology, TopologyError, builtin, bundled, load

if TYPE_CHECKING:
    from manycast.observe.dashboard import Dashboard

# The topologies shipped with the package, named in the help and in errors.
_BUNDLED = ", ".join(bundled())

app = typer.Typer(
    help="manycast: one service on many servers behind one multicast address.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
topology_app = typer.Typer(help="Check and inspect topology files.", no_args_is_help=True)
app.add_typer(topology_app, name="topology")
keys_app = typer.Typer(help="Keys of private pools (Ed25519).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
private_app = typer.Typer(help="Private pools: set one up.", no_args_is_help=True)
app.add_typer(private_app, name="private")
dns_app = typer.Typer(help="The DNS records of pools.", no_args_is_help=True)
app.add_typer(dns_app, name="dns")
app.add_typer(daemon_app, name="daemon", hidden=True)

# soft_wrap: messages are not cut at 80 columns when stderr is a file or a pipe.
err = Console(stderr=True, soft_wrap=True)


def fail(message: object, code: int = 2) -> typer.Exit:
    """Print an error (its text taken literally: '[pool]' is not markup) and exit."""
    err.print(f"[red]error:[/red] {escape(str(message))}")
    return typer.Exit(code)


T = TypeVar("T")


def _load(path: Path | None) -> Topology:
    """A topology file, or a bundled one by name (`demo`, `vip`, ...) when no such file
    exists."""
    try:
        if path is None:
            return builtin("demo")
        if not path.exists() and path.suffix == "" and path.parent == Path("."):
            try:
                return builtin(path.name)
            except TopologyError:
                raise fail(
                    f"{path}: no such file, nor a bundled topology (bundled: {_BUNDLED})", 2
                ) from None
        return load(path)
    except TopologyError as exc:
        raise fail(f"{exc}", 2) from None


def _table(snap: LiveView, title: str) -> Group:
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
    parts: list[Table | Text] = [table]
    if snap.vip_routers:
        vips = Table(title="VIP routers (Fig 17-19)", title_justify="left")
        for column in ("vip router", "status", "packets/s", "flows placed"):
            vips.add_column(
                column, justify="left" if column in ("vip router", "status") else "right"
            )
        for v in snap.vip_routers:
            style = "red" if v.status == "dead" else ""
            vips.add_row(v.name, v.status, f"{v.packets_per_s:7.1f}", str(v.flows), style=style)
        parts.append(vips)
    clients = Text(
        f"clients served in the last seconds: {snap.served_recently}/{snap.clients}   "
        f"requests ok {snap.requests_ok}  failed {snap.requests_failed}  resets {snap.resets}"
    )
    events = Text(
        "\n".join(f"  {at:5.1f} s  {what}" for at, what in snap.events[-6:]) or "  (no events yet)"
    )
    return Group(*parts, clients, Text("events:"), events)


_WebOption = Annotated[
    str | None,
    typer.Option(
        "--web",
        metavar="[HOST:]PORT",
        help="Serve a live dashboard of the run on this address (host 127.0.0.1 "
        "unless given; port 0 picks a free one). See docs/dashboard.md.",
    ),
]

_MetricsOption = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        metavar="[HOST:]PORT",
        help="Serve Prometheus metrics of the run at http://HOST:PORT/metrics (host "
        "127.0.0.1 unless given; port 0 picks a free one). See docs/metrics.md.",
    ),
]
_PcapOption = Annotated[
    Path | None,
    typer.Option(
        "--pcap",
        metavar="FILE",
        help="Write every link's packets to FILE as pcapng, one interface per link "
        "(open it in Wireshark). See docs/pcap.md.",
    ),
]


@contextlib.contextmanager
def _metrics_and_capture(run: PoolRun, metrics: str | None, pcap: Path | None) -> Iterator[None]:
    """`--metrics` and `--pcap`: a Prometheus scrape target and a capture of every link
    while the block runs."""
    with contextlib.ExitStack() as stack:
        if metrics is not None:
            from manycast.observe.metrics import MetricsServer, PoolCollector, registry

            server = MetricsServer(registry(PoolCollector.for_pool(run)), metrics).start()
            stack.callback(server.stop)
            err.print(f"metrics: {server.url}", highlight=False)
        if pcap is not None:
            from manycast.observe.pcap import Capture, attach

            net = run.network
            links = run.topology.links.values()
            capture = stack.enter_context(
                Capture(pcap, links, wall_base=net.wall_base, realtime=net.realtime)
            )
            attach(net, capture)
            stack.callback(
                lambda: err.print(f"capture: {capture.packets} packets in {pcap}", highlight=False)
            )
        yield


@contextlib.contextmanager
def _web_server(
    address: str | None, title: str, topo: Topology, driver: str, duration: float
) -> Iterator[Dashboard | None]:
    """`--web`: the dashboard's server while the block runs (None without `--web`)."""
    if address is None:
        yield None
        return
    from manycast.observe.dashboard import Dashboard
    from manycast.observe.web import WebError, WebServer

    board = Dashboard(
        title,
        driver=driver,
        duration=duration,
        technique="" if driver == "kernel" else str(topo.pool.technique),
        private=topo.pool.private,
        plan=[(step.at, step.describe()) for step in topo.scenario],
    )
    try:
        server = WebServer(board, address).start()
    except WebError as exc:
        raise fail(exc) from None
    err.print(f"dashboard: {server.url}", highlight=False)
    try:
        yield board
    finally:
        server.stop()


def _run(
    run: PoolRun,
    duration: float,
    as_json: bool,
    title: str,
    realtime: bool,
    web: str | None = None,
    metrics: str | None = None,
    pcap: Path | None = None,
) -> None:
    live_wanted = not as_json and sys.stdout.isatty()
    watchers: list[Callable[[LiveView], None]] = []

    def watch(snap: LiveView) -> None:
        for watcher in watchers:
            watcher(snap)

    def main() -> None:
        if live_wanted:
            first = _table(run.live_view(), title)
            with Live(first, refresh_per_second=4, transient=False) as live:

                def tick(snap: LiveView) -> None:
                    live.update(_table(snap, title))
                    watch(snap)

                run.run(duration, tick, tick=0.25, realtime=realtime)
        else:
            last = [-1.0]

            def progress(snap: LiveView) -> None:
                watch(snap)
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

            run.run(duration, progress, tick=0.25, realtime=realtime)

    try:
        with (
            _metrics_and_capture(run, metrics, pcap),
            _web_server(web, title, run.topology, run.driver, duration) as board,
        ):
            if board is not None:
                board.publish_live(run.live_view())
                watchers.append(board.publish_live)
            main()
            summary = run.summary()
            if board is not None:
                board.close(summary)  # the page's last frame shows how the run went
    except OSError as exc:
        raise fail(f"{exc}", 2) from None
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
        Path | None,
        typer.Option(help=f"A topology TOML file, or a bundled one: {_BUNDLED} (demo by default)."),
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
    web: _WebOption = None,
    metrics: _MetricsOption = None,
    pcap: _PcapOption = None,
) -> None:
    """Run a live pool: servers share the clients, one shrinks, one dies, one joins.

    Exit status 0 only if every client was served at the end.
    """
    if driver not in DRIVERS:
        raise fail(f"--driver must be one of {', '.join(DRIVERS)}, not {driver!r}", 2)
    topo = _load(topology)
    length = topo.duration if duration is None else duration
    if length <= 0:
        raise fail("--duration must be positive")
    try:
        run = PoolRun(topo, driver, seed=seed, base_port=base_port)
    except ConfigError as exc:  # e.g. a pool coordinated in etcd on the virtual clock
        raise fail(exc) from None
    if not as_json:
        err.print(
            f"manycast demo: {len(topo.routers)} routers, {len(topo.servers)} servers, "
            f"{len(topo.clients)} clients, group {topo.pool.group} ({topo.pool.name}), "
            f"technique {topo.pool.technique}, driver {driver}"
        )
    # A page or a scrape watched in real time: the memory driver is paced to the wall clock.
    paced = not as_json or web is not None or metrics is not None
    _run(run, length, as_json, "manycast demo", paced, web=web, metrics=metrics, pcap=pcap)


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
    seed: Annotated[
        int,
        typer.Option(
            help="Seed for every random choice. Without [pool] key_file the pool's key "
            "derives from it: give every process of one pool the same seed."
        ),
    ] = 1,
    base_port: Annotated[
        int, typer.Option(help="First UDP port of the overlay endpoints.")
    ] = 47000,
    key_cache: Annotated[
        Path | None,
        typer.Option(
            help="A directory where each router hosted here keeps the pool keys it got "
            "from DNS, to start with them after a restart (used while DNS gives no answer)."
        ),
    ] = None,
    web: _WebOption = None,
    metrics: _MetricsOption = None,
    pcap: _PcapOption = None,
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
            raise fail(f"no such node in {topology}: {', '.join(unknown)}", 2)
    length = topo.duration if duration is None else duration
    if length <= 0:
        raise fail("--duration must be positive")
    try:
        pool = PoolRun(
            topo, "overlay", seed=seed, base_port=base_port, local=local, key_cache=key_cache
        )
    except ConfigError as exc:  # a step this driver cannot carry out (`move`)
        raise fail(exc) from None
    title = f"manycast run {topology.name}"
    _run(pool, length, as_json, title, realtime=False, web=web, metrics=metrics, pcap=pcap)


@app.command()
def sim(
    target: Annotated[
        str,
        typer.Argument(
            metavar="TOPOLOGY_OR_PRESET",
            help="A topology TOML file, or a preset: pool-20, pool-100, pool-1000.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", metavar="DIR", help="Where the report and plots go.")
    ] = Path("sim-out"),
    duration: Annotated[
        float | None,
        typer.Option(help="Simulated seconds (default: the preset's, or the file's [run])."),
    ] = None,
    addresses: Annotated[
        int | None,
        typer.Option(help="Client addresses modelled by rates (default: the preset's, or 10^4)."),
    ] = None,
    membership: Annotated[
        str | None,
        typer.Option(
            help="A preset's [pool] membership: heartbeat or swim (default: swim for"
            " pool-100 and pool-1000, the pool's default for pool-20)."
        ),
    ] = None,
    sample_every: Annotated[
        float | None, typer.Option(help="Simulated seconds between samples (default 0.5).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for every random choice.")] = None,
    wall_limit: Annotated[
        float | None,
        typer.Option(help="Stop after this many wall seconds and report what ran (exit 1)."),
    ] = None,
    plots: Annotated[bool, typer.Option(help="Draw the plots (needs matplotlib).")] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object, last line.")
    ] = False,
) -> None:
    """Simulate a pool too large to run live: the real routers, servers, coordination
    and a sample of real clients on a virtual clock, with a population of client
    addresses modelled by rates. See docs/sim.md.

    Writes report.json, summary.txt and plots to --out. Exit status 0 only if, at the
    end, every address is served by exactly one live server and every share is within
    one bucket of the agreed one.
    """
    from manycast.sim.command import resolve, run_and_write

    for option, value in (
        ("--duration", duration),
        ("--sample-every", sample_every),
        ("--wall-limit", wall_limit),
    ):
        if value is not None and value <= 0:
            raise fail(f"{option} must be positive")
    try:
        name, topo, settings = resolve(
            target,
            membership=membership,
            duration=duration,
            addresses=addresses,
            seed=seed,
            sample_every=sample_every,
            wall_limit_s=wall_limit,
        )
    except ConfigError as exc:
        raise fail(exc) from None
    servers = sum(1 for s in topo.servers.values() if not s.standby)
    err.print(
        f"manycast sim {name}: {servers} servers, {len(topo.routers)} routers,"
        f" {len(topo.clients)} sample clients, {settings.addresses} addresses,"
        f" {settings.duration:g} simulated seconds",
        highlight=False,
    )
    try:
        report, written, missing = run_and_write(
            name, topo, settings, out, lambda line: err.print(line, highlight=False), plots
        )
    except ConfigError as exc:
        raise fail(exc) from None
    for path in written:
        err.print(f"wrote {path}", highlight=False)
    if missing is not None and plots:
        err.print(f"[yellow]no plots:[/yellow] {escape(missing)}")
    if as_json:
        print(json.dumps(report, sort_keys=True))
    else:
        print((out / "summary.txt").read_text(), end="")
    if not report["ok"]:
        raise typer.Exit(1)


@keys_app.command("new")
def keys_new(
    path: Annotated[Path, typer.Argument(help="Where to write the private key (PEM, mode 0600).")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Create an Ed25519 key pair for a private pool; print its public key."""
    if path.exists() and not force:
        raise fail(f"{path} exists (use --force to replace it)", 2)
    key = auth.generate()
    try:
        auth.save_private(key, path)
    except OSError as exc:
        raise fail(f"cannot write {path}: {exc.strerror}", 2) from None
    print(f"public key: {auth.encode_public(auth.public_bytes(key))}")
    err.print(f"private key written to {path} (mode 0600): give it only to the pool's participants")


@keys_app.command("show")
def keys_show(path: Annotated[Path, typer.Argument(help="A private key file.")]) -> None:
    """Print the public key of a private key file."""
    try:
        key = auth.load_private(path)
    except auth.AuthError as exc:
        raise fail(f"{exc}", 2) from None
    print(f"public key: {auth.encode_public(auth.public_bytes(key))}")


def _server(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise fail(f"--server {text!r}: expected HOST:PORT", 2)
    return host, int(port)


def _tsig(text: str | None) -> naming.TsigKey:
    if text is None:
        raise fail("--tsig is needed to publish (algorithm:name:base64secret)")
    try:
        return naming.TsigKey.from_text(text)
    except naming.NamingError as exc:
        raise fail(f"{exc}", 2) from None


def _group_args(text: str) -> list[str]:
    """--group: one address, or a dual-stack pool's two, comma-separated."""
    return [g.strip() for g in text.split(",") if g.strip()]


def _groups_text(record: naming.PoolRecord) -> str:
    return ", ".join(str(g) for g in record.groups)


def _publish(record: naming.PoolRecord, server: str, zone: str, tsig: str | None) -> None:
    try:
        naming.publish(record, _server(server), zone, _tsig(tsig))
    except naming.NamingError as exc:
        raise fail(f"publishing {record.alias}: {exc}", 1) from None


@keys_app.command("publish")
def keys_publish(
    key: Annotated[Path, typer.Argument(help="The pool's private key file.")],
    alias: Annotated[str, typer.Option(help="The pool's well-published name.")],
    group: Annotated[
        str,
        typer.Option(
            help="The pool's group address; a dual-stack pool's two, comma-separated "
            "(232.1.2.3,ff3e::8000:1)."
        ),
    ],
    zone: Annotated[str, typer.Option(help="The DNS zone the alias lives in.")],
    server: Annotated[str, typer.Option(help="The DNS server, HOST:PORT.")] = "127.0.0.1:53",
    owner: Annotated[str, typer.Option(help="Who runs the pool.")] = "admin@localhost",
    tsig: Annotated[str | None, typer.Option(help="TSIG key algorithm:name:base64secret.")] = None,
) -> None:
    """Publish a pool's record (A and/or AAAA, key TXT, reverse PTRs) with TSIG-signed
    DNS UPDATEs."""
    try:
        private = auth.load_private(key)
        record = naming.PoolRecord.create(
            alias, _group_args(group), owner, auth.public_bytes(private)
        )
    except (auth.AuthError, naming.NamingError) as exc:
        raise fail(f"{exc}", 2) from None
    _publish(record, server, zone, tsig)
    flag = "private" if record.private else "public"
    print(f"published {record.alias} -> {_groups_text(record)} ({flag})")


@private_app.command("create")
def private_create(
    alias: Annotated[str, typer.Option(help="The pool's well-published name.")],
    zone: Annotated[str, typer.Option(help="The DNS zone the alias lives in.")],
    participants: Annotated[
        str, typer.Option(help="Comma-separated names of the authorized participants.")
    ],
    out: Annotated[Path, typer.Option(help="Directory for the key files.")] = Path("pool-keys"),
    group: Annotated[
        str | None,
        typer.Option(
            help="The group address, or a dual-stack pool's two, comma-separated "
            "(default: one from the IPv4 private range)."
        ),
    ] = None,
    server: Annotated[str, typer.Option(help="The DNS server, HOST:PORT.")] = "127.0.0.1:53",
    owner: Annotated[str, typer.Option(help="Who runs the pool.")] = "admin@localhost",
    tsig: Annotated[str | None, typer.Option(help="TSIG key algorithm:name:base64secret.")] = None,
    force: Annotated[bool, typer.Option(help="Replace existing key files in --out.")] = False,
) -> None:
    """Set up a private pool (Fig 8): a key pair, a private group address, the record in
    DNS, and the private key written for each authorized participant."""
    names = [p.strip() for p in participants.split(",") if p.strip()]
    if not names:
        raise fail("--participants names no one")
    key = auth.generate()
    address = group or _private_group(alias)
    try:
        record = naming.PoolRecord.create(
            alias, _group_args(address), owner, auth.public_bytes(key)
        )
    except naming.NamingError as exc:
        raise fail(f"{exc}", 2) from None
    if not record.private:
        raise fail(
            f"{address} is in the public range; a private pool needs a group in "
            f"{naming.DEFAULT_PLAN}"
        )
    existing = [out / f"{n}.key" for n in names if (out / f"{n}.key").exists()]
    if existing and not force:
        raise fail(f"{existing[0]} exists (use --force to replace the keys)")
    # Keys first: a record in DNS under a key no participant holds would be useless.
    try:
        for name in names:
            auth.save_private(key, out / f"{name}.key")
    except OSError as exc:
        raise fail(f"cannot write the key files in {out}: {exc.strerror}", 2) from None
    _publish(record, server, zone, tsig)
    print(
        f"private pool {record.alias} -> {_groups_text(record)}: record published, "
        f"keys for {', '.join(names)} in {out}/"
    )
    print("ready to begin: each participant signs its joins with its key file")


def _private_group(alias: str) -> str:
    """A stable private group address for an alias, in 233.0.0.0-239.255.255.255."""
    digest = hashlib.sha256(alias.lower().rstrip(".").encode()).digest()
    return str(ipaddress.IPv4Address(0xE9000000 + int.from_bytes(digest[:4], "big") % (0x07000000)))


@dns_app.command("show")
def dns_show(
    name: Annotated[str, typer.Argument(help="The pool's alias, or any of its group addresses.")],
    server: Annotated[str, typer.Option(help="The DNS server, HOST:PORT.")] = "127.0.0.1:53",
) -> None:
    """Show a pool's whole record (Fig 4), found by its alias or by any of its groups."""
    try:
        ipaddress.ip_address(name)
        by_group = True
    except ValueError:
        by_group = False
    try:
        address = _server(server)
        record = (
            naming.lookup_group(name, address) if by_group else naming.lookup_alias(name, address)
        )
    except naming.NamingError as exc:
        raise fail(f"{name}: {exc}", 1) from None
    kinds = ", ".join(f"{g} ({'A' if g.version == 4 else 'AAAA'})" for g in record.groups)
    print(f"alias:  {record.alias}")
    print(f"groups: {kinds}")
    print(f"owner:  {record.owner}")
    print(f"flag:   {'private' if record.private else 'public'}")
    print(f"key:    {auth.encode_public(record.public_key)}")
    print(f"ttl:    {record.ttl}")


@dns_app.command("serve")
def dns_serve(
    zone: Annotated[str, typer.Option(help="The zone to serve, e.g. pool.test.")],
    port: Annotated[int, typer.Option(help="UDP and TCP port on 127.0.0.1.")] = 5353,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    tsig: Annotated[
        str | None, typer.Option(help="TSIG key for updates (default: a new one, printed).")
    ] = None,
) -> None:
    """Serve a pool zone (and the multicast reverse zones) from a small authoritative
    server; records arrive by TSIG-signed DNS UPDATE (`manycast keys publish`)."""
    key = _tsig(tsig) if tsig is not None else naming.TsigKey.generate()

    def ready(server: object) -> None:
        err.print(f"serving {zone} on {host}:{port} (UDP and TCP); Ctrl-C stops")
        print(f"tsig: {key.to_text()}", flush=True)

    try:
        dnsserver.run(zone, [], host, port, key, ready=ready)
    except (OSError, dnsserver.DnsServerError, naming.NamingError) as exc:
        raise fail(f"{exc}", 2) from None


@topology_app.command("check")
def topology_check(path: Path) -> None:
    """Check a topology file and show what it compiles to."""
    topo = _load(path)
    console = Console()
    pool = topo.pool
    services = [
        f"[{group}]:{pool.port}" if group.version == 6 else f"{group}:{pool.port}"
        for group in (pool.group, pool.group6)
        if group is not None
    ]
    console.print(f"[green]ok[/green] {path}: pool {pool.name} -> {escape(' and '.join(services))}")
    for space in (pool.space, pool.space6):
        if space is not None:
            console.print(f"IPv{space.family}: clients in {space}")
    stack = "dual-stack, one allocation over both families; " if pool.dual else ""
    console.print(f"{stack}control channel {pool.control_group}")
    table = Table("node", "kind", "interfaces")
    for node in sorted(topo.interfaces):
        if topo.kind(node) == "client" and not node.endswith("1"):
            continue
        ifaces = ", ".join(
            f"{i.name} {i.address}/{i.network.prefixlen}"
            + (f" {i.address6}/{i.network6.prefixlen}" if i.network6 is not None else "")
            + f" ({i.link})"
            for i in topo.interfaces[node].values()
        )
        table.add_row(node, topo.kind(node), ifaces)
    console.print(table)
    console.print(
        f"{len(topo.clients)} clients, {len(topo.links)} links, {len(topo.scenario)} scenario steps"
    )


# -- manycast lab: the kernel lab (root) -------------------------------------------------
# Everything of the lab lives in this block and in manycast.lab (imported on use:
# pyroute2 is only needed here).

lab_app = typer.Typer(
    help="The kernel lab: a topology on network namespaces with the kernel's own "
    "multicast forwarding (root only).",
    no_args_is_help=True,
)
app.add_typer(lab_app, name="lab")

_PrefixOption = Annotated[
    str, typer.Option(help="Name prefix of the lab's namespaces (<prefix>-<node>).")
]


def _lab_call(fn: Callable[[], T]) -> T:
    from manycast.lab import LabError

    try:
        return fn()
    except (LabError, TopologyError) as exc:
        raise fail(f"{exc}", 2) from None


@lab_app.command("up")
def lab_up(
    topology: Annotated[
        Path | None, typer.Argument(help="A topology TOML file (default: the built-in demo).")
    ] = None,
    prefix: _PrefixOption = "mc",
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 1,
    servers: Annotated[bool, typer.Option(help="Start the servers' agents and services.")] = True,
) -> None:
    """Build a topology in namespaces and start its routers' daemons and servers.

    A namespace per node, veth links, a bridge per client LAN, addresses and routes;
    a router daemon per router; per server its manycast agent and its service."""
    from manycast.lab import Lab, topology_text

    lab = Lab(prefix)
    text, source = _lab_call(lambda: topology_text(topology))
    topo = _lab_call(lambda: lab.up(text, source, seed=seed, start_servers=servers))
    groups = " and ".join(str(topo.pool.group_of(v)) for v in topo.pool.families)
    err.print(
        f"lab {prefix!r} up: {len(topo.interfaces)} namespaces ({prefix}-<node>), "
        f"{len(topo.links)} links; group{'s' if topo.pool.dual else ''} {groups} "
        f"port {topo.pool.port}. Try: " + "\n  or: ".join(lab_exec_hints(topo)),
        markup=False,  # (an IPv6 address in brackets is no markup tag)
    )


def lab_exec_hints(topo: Topology) -> list[str]:
    """`manycast lab exec` commands that ask the pool's service, one per family the
    pool serves (a dual-stack pool: from an IPv4 client to the IPv4 group, from an
    IPv6 client to the IPv6 group), each from the first client of its family."""
    from manycast.lab.build import socat_address

    pool = topo.pool
    hints = []
    for version in pool.families:
        address = pool.group_of(version)
        clients = sorted(c for c in topo.clients if topo.address(c).version == version)
        if pool.vip is None:
            ask = f"socat - '{socat_address(address, pool.port)}'"
        else:  # a VIP pool's servers run HTTP on the VIP
            ask = f"curl -s http://{f'[{address}]' if version == 6 else address}:{pool.port}/"
        hints.append(f"manycast lab exec {clients[0] if clients else 'NODE'} -- {ask}")
    return hints


@lab_app.command("down")
def lab_down(prefix: _PrefixOption = "mc") -> None:
    """Remove every namespace, link, process and multicast entry of the lab (idempotent)."""
    from manycast.lab import Lab

    removed = _lab_call(lambda: Lab(prefix).down())
    err.print(
        f"lab {prefix!r} down: {removed['namespaces']} namespaces removed, "
        f"{removed['processes']} processes stopped"
    )


@lab_app.command("exec")
def lab_exec(
    node: Annotated[str, typer.Argument(help="The node to run in.")],
    command: Annotated[list[str], typer.Argument(help="The program and its arguments.")],
    prefix: _PrefixOption = "mc",
) -> None:
    """Run a program inside a node's namespace.

    Example: manycast lab exec a1 -- ping -c1 10.254.0.2"""
    from manycast.lab import Lab

    _lab_call(lambda: Lab(prefix).exec(node, command))


@lab_app.command("status")
def lab_status(
    prefix: _PrefixOption = "mc",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    entries: Annotated[int, typer.Option(help="Forwarding entries shown per router.")] = 20,
) -> None:
    """Nodes, links, and each router's kernel VIFs and multicast forwarding entries."""
    from dataclasses import asdict

    from manycast.lab import Lab

    status = _lab_call(lambda: Lab(prefix).status())
    if as_json:
        print(json.dumps(asdict(status), default=str))
        return
    if not status.up:
        err.print(f"lab {prefix!r} is down")
        raise typer.Exit(1)
    console = Console()
    nodes = Table("node", "kind", "namespace", "processes", "interfaces", title="nodes")
    clients = [n for n in status.nodes if n.kind == "client"]
    for n in status.nodes:
        if n.kind == "client" and n is not clients[0] and n is not clients[-1]:
            continue
        procs = " ".join(f"{role}:{pid or 'dead'}" for role, pid in n.processes.items())
        nodes.add_row(
            n.name, n.kind, "yes" if n.namespace else "MISSING", procs, ", ".join(n.addresses)
        )
    console.print(nodes)
    if len(clients) > 2:
        console.print(f"({len(clients)} clients, first and last shown)")
    links = Table("link", "members", title="links")
    for name, members in status.links.items():
        shown = members if len(members) <= 4 else [*members[:3], f"... {len(members)} in all"]
        links.add_row(name, " ".join(shown))
    console.print(links)
    for router, tables in status.routers.items():
        names = {v.index: v.name for v in tables.vifs}
        table = Table(
            "group",
            "source",
            "in",
            "out",
            "packets",
            title=f"{router}: kernel multicast forwarding entries "
            f"({len(tables.entries)}; VIFs {', '.join(names.values())})",
        )
        for e in tables.entries[:entries]:
            table.add_row(
                str(e.group),
                str(e.source),
                names.get(e.parent, "?") if e.resolved else "(unresolved)",
                " ".join(names.get(o, str(o)) for o in e.outs) or "-",
                str(e.packets),
            )
        console.print(table)
        portions = tables.plane.get("portions") if tables.plane.get("plane") == "portions" else None
        if portions is not None:
            # The pool's group on the portion plane: one nftables element per portion.
            plane = Table(
                "portion (source/mask)",
                "to",
                title=f"{router}: portion plane of {tables.plane.get('group')} "
                f"({tables.plane.get('entries', 0)} kernel map elements)",
            )
            for portion, outs in list(portions.items())[:entries]:
                plane.add_row(portion, ", ".join(outs) or "-")
            console.print(plane)


@lab_app.command("run")
def lab_run(
    topology: Annotated[
        Path | None,
        typer.Argument(
            help=f"A topology TOML file, or a bundled one: {_BUNDLED} (demo by default)."
        ),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Seconds to run (default: the topology's).")
    ] = None,
    prefix: _PrefixOption = "mc",
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 1,
    keep: Annotated[bool, typer.Option(help="Leave the lab up afterwards.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON object, last line.")
    ] = False,
    web: _WebOption = None,
) -> None:
    """Run the topology's scenario on the kernel lab (up, scenario, down).

    The clients ask the service from their own namespaces while the scenario runs.
    Exit 0 only if every client was served at the end by the server that owns it
    (and, in a VIP pool, no connection was answered by two servers)."""
    from manycast.lab import Lab, LabRun, Progress, topology_text

    lab = Lab(prefix)
    text, source = _lab_call(lambda: topology_text(topology))
    err.print(f"manycast lab run: building {source} in namespaces {prefix}-<node> ...")
    topo = _lab_call(lambda: lab.up(text, source, seed=seed))
    length = topo.duration if duration is None else duration

    vip_seen = [0]

    def progress(p: Progress) -> None:
        answers = " ".join(f"{k}={v}" for k, v in sorted(p.answers.items()))
        vip = ""
        if p.vip_packets is not None:
            # Live VIP routers' packets this second (a killed one's count goes with it).
            vip = f" vip-router packets/s {max(0, p.vip_packets - vip_seen[0])}"
            vip_seen[0] = p.vip_packets
        tcp = ""
        if p.tcp_moved is not None and p.tcp_pause_ms is not None:
            pause = p.tcp_pause_ms

            def ms(value: float | None) -> str:
                return "-" if value is None else f"{value:.1f}"

            tcp = (
                f" tcp moved {p.tcp_moved} broken {p.tcp_broken} pause ms "
                f"p50 {ms(pause['p50'])} p99 {ms(pause['p99'])} max {ms(pause['max'])}"
            )
        err.print(
            f"t={p.now:5.1f}s served {p.served}/{p.clients} kernel entries {p.entries} "
            f"answers {answers}{vip}{tcp}",
            highlight=False,
        )

    try:
        with _web_server(web, f"manycast lab run {source}", topo, "kernel", length) as board:

            def report(p: Progress) -> None:
                if board is not None:
                    board.publish_progress(p)
                progress(p)

            summary = LabRun(lab, topo, detail=board is not None).run(length, report)
            if board is not None:
                board.close(summary)
    finally:
        if not keep:
            lab.down()
    if as_json:
        print(json.dumps(summary))
    else:
        Console().print_json(json.dumps(summary))
    kernel = summary["kernel"]
    # A VIP pool also promises each connection one server, and each answer its request.
    split = kernel.get("flows_split", 0) + kernel.get("wrong_answers", 0)
    if summary["clients_served_at_end"] != summary["clients"] or kernel["clients_not_at_owner"]:
        raise typer.Exit(1)
    if split:
        raise typer.Exit(1)
    if kernel.get("tcp", {}).get("broken"):  # a live TCP connection the moves broke
        raise typer.Exit(1)


@lab_app.command("metrics")
def lab_metrics(
    port: Annotated[
        str,
        typer.Option(
            metavar="[HOST:]PORT",
            help="Where to serve (host 127.0.0.1 unless given; port 0 picks a free one).",
        ),
    ] = "9100",
    prefix: _PrefixOption = "mc",
    seconds: Annotated[
        float | None, typer.Option(help="Stop after this long (default: until Ctrl-C).")
    ] = None,
) -> None:
    """Serve one Prometheus scrape target for the whole lab.

    Every running router daemon, VIP router daemon and server agent is asked for its
    metrics at each scrape, through its command socket (the namespaces have no link to
    the host); each sample gets a `node` label. See docs/metrics.md."""
    import time

    from manycast.lab import Lab
    from manycast.lab.metrics import gather
    from manycast.observe.metrics import FederatedCollector, MetricsError, MetricsServer, registry

    lab = Lab(prefix)
    topo = _lab_call(lab.topology)
    collector = FederatedCollector(lambda: gather(lab, topo))
    try:
        server = MetricsServer(registry(collector, process=False), port).start()
    except MetricsError as exc:
        raise fail(exc) from None
    err.print(f"lab {prefix!r} metrics: {server.url}", highlight=False)
    try:
        deadline = None if seconds is None else time.monotonic() + seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@lab_app.command("capture")
def lab_capture(
    node: Annotated[str, typer.Argument(help="The node whose interfaces to capture.")],
    out: Annotated[Path, typer.Option(help="The capture file to write.")],
    seconds: Annotated[float, typer.Option(help="How long to capture.")] = 10.0,
    iface: Annotated[
        list[str] | None,
        typer.Option(help="An interface of the node (repeat for more; default: all)."),
    ] = None,
    tool: Annotated[
        str | None, typer.Option(help="dumpcap (pcapng) or tcpdump (pcap); default: dumpcap.")
    ] = None,
    prefix: _PrefixOption = "mc",
) -> None:
    """Capture a node's packets from the kernel, inside its namespace, into a file.

    Wireshark's dumpcap writes pcapng with one interface block per interface; tcpdump
    (when dumpcap is missing) writes pcap of one interface. See docs/pcap.md."""
    from manycast.lab import Lab
    from manycast.lab.capture import capture

    result = _lab_call(lambda: capture(Lab(prefix), node, out, seconds, iface or (), tool))
    err.print(
        f"{result.tool}: {node} {', '.join(result.interfaces)} for {seconds:g} s -> "
        f"{result.path} ({result.format})" + (f"\n{result.report}" if result.report else ""),
        highlight=False,
    )


# -- end of manycast lab ---------------------------------------------------------------------


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        _restart_with_long_run_allocator()
    app()


def _restart_with_long_run_allocator() -> None:
    """`manycast run` hosts a pool for as long as it is asked: start it again, the same
    command, under the allocator whose memory does not creep (`drivers/heap.py`),
    unless the environment names one. The process keeps its id (exec)."""
    environment = heap.long_run_environment(os.environ)
    if environment is None or not sys.executable or not sys.orig_argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment)


if __name__ == "__main__":
    main()
