"""The private pool's DNS server in a process of its own (bench/soak.py runs it).

The soak's private pool has its key in a key file and its records (the pool's
group and its control channel, each with the public key) on this server, which
the routers of every pool process query (`[pool] dns`). The `dns_restart` fault
SIGKILLs the process and starts a new one on the same port a few seconds later,
serving the same records, as a supervisor restarts an authoritative server that
reads its zone files when it starts.

The bench also asks the server for the pool's key itself after each restart,
`lookup_key` as the routers do, until it answers: when the restarted server
served again, as a router would see it.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import multiprocessing
import socket
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _soak_hosts import _tee
from manycast import dns
from manycast.auth import load_private, public_bytes
from manycast.naming import PoolRecord, lookup_key
from manycast.topology import Topology

PROBE_TIMEOUT_S = 0.5  # each of the bench's own lookups after a restart
PROBE_GIVE_UP_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP now (the server binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


def pool_records(topology: Topology, ttl: int) -> list[PoolRecord]:
    """What the pool publishes (as `PoolRun.pool_records`), with the soak's TTL."""
    pool = topology.pool
    assert pool.key_file is not None
    raw = public_bytes(load_private(Path(pool.key_file)))
    owner = f"pool@{pool.name}"
    return [
        PoolRecord.create(pool.name, pool.group, owner, raw, ttl=ttl),
        PoolRecord.create(f"control.{pool.name}", pool.control_group, owner, raw, ttl=ttl),
    ]


def zone_of(name: str) -> str:
    """The zone a pool's records live in: its name's parent (as the runtime's)."""
    labels = name.rstrip(".").split(".")
    return ".".join(labels[1:]) + "." if len(labels) > 2 else name.rstrip(".") + "."


def dns_child(
    conn: Connection, zone: str, records: list[PoolRecord], host: str, port: int, log: Path
) -> None:
    """Serve `records` on host:port until SIGTERM; ("up", CLOCK_MONOTONIC) once listening,
    then ("queries", n) every second and ("done", n) at the end."""
    _tee(log)
    sending = threading.Lock()  # the reporting thread and the main one share the pipe

    def send(message: tuple[str, Any]) -> None:
        with sending:
            conn.send(message)

    try:

        def ready(server: Any) -> None:
            send(("up", time.monotonic()))

            def report() -> None:
                while True:
                    time.sleep(1.0)
                    send(("queries", server.stats.queries))

            threading.Thread(target=report, daemon=True).start()

        stats = dns.run(zone, records, host, port, None, ready=ready)
        send(("done", stats.queries))
    except BaseException:
        send(("error", traceback.format_exc()))
    finally:
        with sending:
            conn.close()


class DnsProcess:
    """The DNS server of the soak's private pool, SIGKILLed and started again."""

    def __init__(self, topology: Topology, ttl: int, logs: Path) -> None:
        assert topology.pool.dns is not None
        self.host, self.port = topology.pool.dns
        self.group = int(topology.pool.group)
        self.zone = zone_of(topology.pool.name)
        self.records = pool_records(topology, ttl)
        self.logs = logs
        self.bench_start = 0.0  # CLOCK_MONOTONIC of bench time 0, set by `begin`
        self._ctx = multiprocessing.get_context("spawn")
        self.incarnation = 0
        self.current: tuple[Any, Connection] | None = None
        self.starts: list[dict[str, Any]] = []  # each incarnation: when started, up, queries
        self.exits: list[dict[str, Any]] = []
        self.errors: dict[str, str] = {}
        self.answered_again: dict[int, float | None] = {}  # incarnation: the bench's probe
        self._probes: list[threading.Thread] = []

    def start(self, now: float | None = None) -> None:
        self.incarnation += 1
        parent, child = self._ctx.Pipe()
        log = self.logs / f"dns.{self.incarnation}.log"
        args = (child, self.zone, self.records, self.host, self.port, log)
        process = self._ctx.Process(
            target=dns_child, args=args, name=f"dns#{self.incarnation}", daemon=True
        )
        process.start()
        child.close()
        self.current = (process, parent)
        self.starts.append({"process": process.name, "go": None if now is None else round(now, 3)})
        if now is not None:  # a restart: the bench asks as a router would, until answered
            probe = threading.Thread(target=self._probe, args=(self.incarnation,), daemon=True)
            probe.start()
            self._probes.append(probe)

    def wait_up(self, wait: float) -> None:
        assert self.current is not None
        process, conn = self.current
        if not conn.poll(wait):
            raise RuntimeError(f"{process.name}: not serving within {wait:.0f} s")
        message, payload = conn.recv()
        if message != "up":
            raise RuntimeError(f"{process.name} failed:\n{payload}")
        self.starts[-1]["up_monotonic"] = payload

    def begin(self, bench_start: float) -> None:
        self.bench_start = bench_start
        for entry in self.starts:
            if "up_monotonic" in entry:
                entry["up"] = round(entry.pop("up_monotonic") - bench_start, 4)

    def _probe(self, incarnation: int) -> None:
        began = time.monotonic()
        while time.monotonic() - began < PROBE_GIVE_UP_S:
            answer = lookup_key(self.group, (self.host, self.port), PROBE_TIMEOUT_S)
            if answer.public_key is not None:
                self.answered_again[incarnation] = round(time.monotonic() - self.bench_start, 4)
                return
            time.sleep(0.02)
        self.answered_again[incarnation] = None

    def kill(self, now: float) -> None:
        self.check(now)
        if self.current is not None:
            process, conn = self.current
            process.kill()
            process.join(10)
            conn.close()
            self.current = None

    def check(self, now: float) -> None:
        """Messages from the running incarnation; an exit we did not cause is unexpected."""
        if self.current is None:
            return
        process, conn = self.current
        entry = self.starts[-1]
        try:
            while conn.poll(0):
                message, payload = conn.recv()
                if message == "up":
                    entry["up"] = round(payload - self.bench_start, 4)
                elif message in ("queries", "done"):
                    entry["queries"] = payload
                elif message == "error":
                    self.errors[process.name] = str(payload)
        except (EOFError, OSError):
            pass
        if not process.is_alive():
            self.exits.append(
                {"process": process.name, "at": round(now, 2), "returncode": process.exitcode}
            )
            self.current = None

    def pid(self) -> int | None:
        return self.current[0].pid if self.current is not None else None

    def stop(self, now: float) -> None:
        """At the end: SIGTERM, so that the last incarnation reports its queries."""
        if self.current is not None:
            process, conn = self.current
            process.terminate()
            process.join(10)
            try:
                while conn.poll(0):
                    message, payload = conn.recv()
                    if message in ("queries", "done"):
                        self.starts[-1]["queries"] = payload
                    elif message == "error":
                        self.errors[process.name] = str(payload)
            except (EOFError, OSError):
                pass
            if process.is_alive():
                process.kill()
                process.join(5)
            elif process.exitcode != 0:
                self.exits.append(
                    {"process": process.name, "at": round(now, 2), "returncode": process.exitcode}
                )
            conn.close()
            self.current = None
        for probe in self._probes:
            probe.join(PROBE_GIVE_UP_S)
        for index, entry in enumerate(self.starts, start=1):
            if index in self.answered_again:
                entry["answered_again"] = self.answered_again[index]


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py")
