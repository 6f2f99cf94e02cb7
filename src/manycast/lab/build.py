"""A lab: a topology brought up in namespaces with its programs, and taken down.

`Lab.up` builds, from the same compiled topology the other drivers run, a
network namespace per node (`<prefix>-<node>`, see `namespaces.py`), then starts
the programs of `drivers/kernel.py`: a router daemon per router, and per server
the manycast agent and the service. Their pid files, logs, command sockets and a
copy of the topology live in the run directory (`/run/manycast/<prefix>`).

`Lab.down` finds everything by name: the pid files' processes (checked to be
ours before a signal is sent), then any other process left inside one of our
namespaces, then the namespaces themselves (their interfaces, veth peers and
multicast tables go with them). It works after a crash and when nothing is up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manycast.drivers import mroute, mroute6, netns
from manycast.drivers.kernel.link_delay import ROLE as LINK_DELAY
from manycast.drivers.kernel.link_delay import delayed_routers
from manycast.errors import LabError
from manycast.lab.daemons import ROLES_OF, SERVER_START, Daemons, reap, signal_pid
from manycast.lab.namespaces import build_network
from manycast.topology import Topology, TopologyError, load, loads

if TYPE_CHECKING:
    from manycast.lab.status import LabStatus

PREFIX = "mc"
RUN_ROOT = Path(os.environ.get("MANYCAST_LAB_RUN_ROOT", "/run/manycast"))
# The pool group's data plane in the routers: "mfc" (one kernel multicast entry per
# client source, at its first packet's upcall) or "portions" (one nftables map
# element per portion, `drivers/kernel/portion_plane.py`). MANYCAST_LAB_PLANE sets it
# for `lab up` and `lab run`.
PLANES = ("mfc", "portions")
DEFAULT_PLANE = "mfc"
# Emulate the links' `delay_ms` (`drivers/kernel/link_delay.py`: every packet of a
# delayed link through a Python program per router), off unless asked for:
# `up(emulate_delay=True)`, or MANYCAST_LAB_DELAY=1 for `lab up` and `lab run`.
DELAY_ENV = "MANYCAST_LAB_DELAY"
NEEDS_ROOT = "the kernel lab needs root and network namespaces; CI runs as root"


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(f"{NEEDS_ROOT} (run it as root, e.g. with sudo)")


@dataclass
class Lab:
    prefix: str = PREFIX
    run_root: Path = RUN_ROOT

    def __post_init__(self) -> None:
        if not self.prefix or not self.prefix.replace("_", "").isalnum():
            raise LabError(f"prefix {self.prefix!r}: use letters and digits")

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.prefix

    @property
    def daemons(self) -> Daemons:
        return Daemons(self.run_dir)

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def namespaces(self) -> list[str]:
        return netns.names(self.prefix)

    def is_up(self) -> bool:
        return bool(self.namespaces())

    def state(self) -> dict[str, Any]:
        """What `up` was given: seed, pin_idle, source (empty when no lab is up)."""
        try:
            data: dict[str, Any] = json.loads((self.run_dir / "lab.json").read_text())
        except (OSError, ValueError):
            return {}
        return data

    def topology(self) -> Topology:
        try:
            return load(self.run_dir / "topology.toml")
        except TopologyError as exc:
            raise LabError(f"no lab is up with prefix {self.prefix!r} ({exc})") from None

    # -- up --------------------------------------------------------------------------
    def up(
        self,
        text: str,
        source: str = "<topology>",
        *,
        seed: int = 1,
        start_servers: bool = True,
        pin_idle: float | None = None,
        plane: str | None = None,
        emulate_delay: bool | None = None,
    ) -> Topology:
        """Build the topology `text` and start its programs; on failure, tear down.
        `plane`: the routers' data plane for the pool's group (`PLANES`; default
        $MANYCAST_LAB_PLANE, else `DEFAULT_PLANE`). `emulate_delay`: hold the packets
        of links with a `delay_ms` that long (default: $MANYCAST_LAB_DELAY is 1)."""
        require_root()
        if emulate_delay is None:
            emulate_delay = os.environ.get(DELAY_ENV, "0") not in ("", "0")
        plane = plane or os.environ.get("MANYCAST_LAB_PLANE") or DEFAULT_PLANE
        if plane not in PLANES:
            raise LabError(f"plane {plane!r}: expected one of {', '.join(PLANES)}")
        topology = loads(text, source)
        family = topology.pool.space.family
        for needed in (4, 6) if topology.pool.dual else (family,):
            missing = mroute.multicast_routing_missing(needed)
            if missing is not None:
                raise LabError(missing)
        if topology.pool.coordination == "etcd":
            raise LabError(
                'coordination = "etcd" runs on the overlay driver (manycast run --driver'
                " overlay); the kernel lab's server agents coordinate on the control channel"
            )
        if topology.pool.dual and topology.pool.technique == "D":
            raise LabError(
                "technique D on a dual-stack pool runs on the memory and overlay drivers"
                " (manycast run --driver overlay); not yet in the kernel lab"
            )
        if self.is_up():
            raise LabError(
                f"a lab with prefix {self.prefix!r} is already up "
                f"({len(self.namespaces())} namespaces): run `manycast lab down` first"
            )
        for node in topology.interfaces:
            if len(self.ns(node)) > 60:
                raise LabError(f"namespace name for {node} is too long")
        if pin_idle is None and topology.pool.technique == "R4":
            pin_idle = 1.0
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        (self.run_dir / "topology.toml").write_text(text)
        state = {
            "prefix": self.prefix,
            "source": source,
            "seed": seed,
            "pin_idle": pin_idle,
            "plane": plane,
            "emulate_delay": emulate_delay,
            "family": family,
            "dual": topology.pool.dual,
            "service": "http" if topology.pool.vip is not None else "responder",
        }
        (self.run_dir / "lab.json").write_text(json.dumps(state))
        try:
            build_network(topology, self.ns)
            delayed = delayed_routers(topology) if emulate_delay else []
            for router in delayed:
                self.start(router, LINK_DELAY)
            for router in delayed:
                self.wait_ready(router, LINK_DELAY)
            # A dual-stack pool's routers run a daemon per family (MRT and MRT6).
            router_roles = ("router", "router6") if topology.pool.dual else ("router",)
            for router in topology.routers:
                for role in router_roles:
                    self.start(router, role)
            for router in topology.routers:
                for role in router_roles:
                    self.wait_ready(router, role)
            for vip_router in topology.vip_routers:
                self.start(vip_router, "vip_router")
            for vip_router in topology.vip_routers:
                self.wait_ready(vip_router, "vip_router")
            if start_servers:
                for server in topology.servers.values():
                    if not server.standby:
                        self.start_server(server.name, wait=False)
                for server in topology.servers.values():
                    if not server.standby:
                        for role in ROLES_OF["server"]:
                            self.wait_ready(server.name, role)
        except BaseException:
            self.down()
            raise
        return topology

    # -- programs --------------------------------------------------------------------
    def start(self, node: str, role: str) -> int:
        state = self.state()
        return self.daemons.start(
            node,
            role,
            namespace=self.ns(node),
            seed=int(state.get("seed", 1)),
            pin_idle=state.get("pin_idle"),
            service=str(state.get("service", "responder")),
            plane=str(state.get("plane", DEFAULT_PLANE)),
        )

    def pid(self, node: str, role: str) -> int | None:
        return self.daemons.pid(node, role)

    def wait_ready(self, node: str, role: str) -> None:
        self.daemons.wait_ready(node, role)

    def start_server(self, name: str, wait: bool = True) -> None:
        """Start a server's programs; with `wait`, each once the one before is ready."""
        for role in SERVER_START:
            self.start(name, role)
            if wait:
                self.wait_ready(name, role)

    def kill(self, node: str, role: str, sig: int = signal.SIGKILL) -> bool:
        return self.daemons.kill(node, role, sig)

    def kill_server(self, name: str) -> None:
        """A server dies at once: its agent and its service, SIGKILL."""
        for role in ROLES_OF["server"]:
            self.kill(name, role)

    def ask(self, node: str, role: str, request: dict[str, Any]) -> Any:
        return self.daemons.ask(node, role, request)

    # -- down ------------------------------------------------------------------------
    def down(self) -> dict[str, int]:
        """Remove everything of ours with this prefix; safe to repeat."""
        require_root()
        stopped = self.daemons.stop_all()
        names = self.namespaces()
        for pid in netns.pids_in(names):
            # Anything else still inside one of our namespaces (`lab exec` programs).
            signal_pid(pid, signal.SIGKILL)
            reap(pid)
            stopped += 1
        for name in names:
            netns.remove(name)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return {"namespaces": len(names), "processes": stopped}

    # -- inside a node ---------------------------------------------------------------
    def exec(self, node: str, argv: list[str]) -> None:
        """Replace this process with `argv` run inside `node`'s namespace."""
        require_root()
        if not argv:
            raise LabError("nothing to run: give a command after --")
        name = self.ns(node)
        if not netns.exists(name):
            nodes = ", ".join(n.removeprefix(f"{self.prefix}-") for n in self.namespaces())
            raise LabError(f"no node {node!r} in the lab (nodes: {nodes or 'none, lab is down'})")
        netns.enter(name)
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            raise LabError(f"cannot run {argv[0]}: {exc.strerror}") from None

    def popen(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start `argv` inside `node`'s namespace (entered between fork and exec)."""
        name = self.ns(node)
        if not netns.exists(name):
            raise LabError(f"no node {node!r} in the lab")
        return subprocess.Popen(argv, preexec_fn=lambda: netns.enter(name), **kwargs)

    @property
    def family(self) -> int:
        """4 or 6: the family of the pool that is up (its network's)."""
        return int(self.state().get("family", 4))

    def mfc(self, router: str, family: int | None = None) -> list[mroute.CacheEntry]:
        """The kernel's multicast forwarding entries in `router`'s namespace (IPv6's
        MFC in an IPv6 lab; both tables' in a dual-stack pool's, unless `family`
        names one)."""
        if family is None and self.state().get("dual"):
            return self.mfc(router, 4) + self.mfc(router, 6)
        if (family or self.family) == 6:
            return mroute6.parse_cache6(netns.read_in(self.ns(router), "/proc/net/ip6_mr_cache"))
        return mroute.parse_cache(netns.read_in(self.ns(router), "/proc/net/ip_mr_cache"))

    def vifs(self, router: str) -> list[mroute.Vif]:
        """The router's VIFs (MIFs in an IPv6 lab: /proc's lines are the same shape)."""
        table = "ip6_mr_vif" if self.family == 6 else "ip_mr_vif"
        return mroute.parse_vifs(netns.read_in(self.ns(router), f"/proc/net/{table}"))

    def status(self) -> LabStatus:
        """Nodes, links, programs, and each router's kernel VIFs and MFC entries."""
        from manycast.lab.status import status

        return status(self)


def socat_address(group: object, port: int, hops: int = 8) -> str:
    """socat's address for asking the pool's service at `group`: its multicast TTL (hop
    limit) `hops`. socat's ip-multicast-ttl sets IPv4's option only; an IPv6 group's
    hop limit is IPV6_MULTICAST_HOPS (IPPROTO_IPV6 41, option 18), set by number."""
    if ":" in str(group):
        return f"UDP6-DATAGRAM:[{group}]:{port},setsockopt-int=41:18:{hops}"
    return f"UDP4-DATAGRAM:{group}:{port},ip-multicast-ttl={hops}"


def topology_text(path: Path | None) -> tuple[str, str]:
    """(TOML text, name for messages) of a topology file, or of a bundled one: the demo
    by default, or by name (`vip`) when no such file exists."""
    from importlib.resources import files

    bundled = files("manycast").joinpath("topologies")
    if path is None:
        return bundled.joinpath("demo.toml").read_text(encoding="utf-8"), "<built-in demo>"
    if not path.exists() and path.suffix == "" and path.parent == Path("."):
        resource = bundled.joinpath(f"{path.name}.toml")
        if not resource.is_file():
            raise LabError(f"{path}: no such file, nor a bundled topology (bundled: demo, vip)")
        return resource.read_text(encoding="utf-8"), f"<built-in {path.name}>"
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except OSError as exc:
        raise LabError(f"{path}: cannot read: {exc.strerror}") from None
