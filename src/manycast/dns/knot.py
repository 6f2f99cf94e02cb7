"""Debian's knot (knotd) serving pool zones on a loopback port, supervised for a `with` block.

`KnotServer` writes knotd's configuration (listen address, rundir, storage, the
TSIG key, an ACL allowing `update` with that key, one zone file per zone),
starts it and waits until every zone answers. As root, knotd drops to the
`knot` user, which must own its rundir and storage, so the work directory is
handed over to it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

from manycast.dns.authority import load_zone
from manycast.dns.errors import DnsServerError
from manycast.naming import DEFAULT_PLAN, AddressPlan, PoolRecord, TsigKey, pool_zones
from manycast.naming.zone import MULTICAST_REVERSE_ZONES
from manycast.ports import free_port

__all__ = ["KnotServer", "knot_available", "knotd_path"]

SOA: Final = dns.rdatatype.SOA
_KNOTD_PLACES: Final = ("/usr/sbin/knotd", "/usr/local/sbin/knotd")


def knotd_path() -> str | None:
    """Where knotd is (root's PATH has /usr/sbin, a user's often does not)."""
    found = shutil.which("knotd")
    if found:
        return found
    return next((p for p in _KNOTD_PLACES if os.access(p, os.X_OK)), None)


def knot_available() -> bool:
    return knotd_path() is not None


def _quote(text: str) -> str:
    if any(c in text for c in '"\\\n'):
        raise DnsServerError(f"cannot put {text!r} in a knot configuration")
    return f'"{text}"'


class KnotServer:
    """Debian's knotd serving the given zones on host:port, for the life of a `with` block.

    Everything lives in `workdir` (a fresh temporary directory unless given):
    knot.conf, zones/, storage/ (journal, timers), run/ (PID file, control
    socket) and knotd.log.
    """

    def __init__(
        self,
        zones: Mapping[str, str],
        tsig_key: TsigKey,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        workdir: str | os.PathLike[str] | None = None,
        knotd: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        if not zones:
            raise DnsServerError("no zones to serve")
        for origin, text in zones.items():
            load_zone(origin, text)  # fail here, with a clear message, not in knotd's log
        self.zones = {dns.name.from_text(o).to_text(): t for o, t in zones.items()}
        self.tsig_key = tsig_key
        self.host, self.port = host, port
        self._auto_port = port == 0
        self._given_workdir = Path(workdir) if workdir is not None else None
        self.workdir: Path | None = None
        self._knotd = knotd
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_pool(
        cls,
        origin: str,
        records: Iterable[PoolRecord],
        tsig_key: TsigKey,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reverse_zones: Iterable[str] = MULTICAST_REVERSE_ZONES,
        plan: AddressPlan = DEFAULT_PLAN,
        workdir: str | os.PathLike[str] | None = None,
        knotd: str | None = None,
        start_timeout: float = 10.0,
    ) -> KnotServer:
        zones = pool_zones(
            origin, records, reverse_zones=reverse_zones, nameserver_address=host, plan=plan
        )
        return cls(
            zones,
            tsig_key,
            host=host,
            port=port,
            workdir=workdir,
            knotd=knotd,
            start_timeout=start_timeout,
        )

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "knotd.log").read_text(errors="replace")
        except OSError:
            return ""

    def config(self) -> str:
        assert self.workdir is not None
        root = self.workdir
        key = self.tsig_key
        user = "    user: knot:knot\n" if self._as_knot_user() else ""
        zones = "".join(
            f"  - domain: {_quote(origin)}\n    acl: manycast-update\n" for origin in self.zones
        )
        return (
            "# written by manycast (manycast.dns.KnotServer)\n"
            "server:\n"
            f"    rundir: {_quote(str(root / 'run'))}\n"
            f"{user}"
            f"    listen: {self.host}@{self.port}\n"
            "    udp-workers: 1\n"
            "    tcp-workers: 1\n"
            "    background-workers: 1\n"
            "log:\n"
            "  - target: stderr\n"
            "    any: info\n"
            "database:\n"
            f"    storage: {_quote(str(root / 'storage'))}\n"
            "    journal-db-max-size: 64M\n"
            "    kasp-db-max-size: 16M\n"
            "    timer-db-max-size: 16M\n"
            "    catalog-db-max-size: 16M\n"
            "key:\n"
            f"  - id: {_quote(key.name)}\n"
            f"    algorithm: {key.algorithm}\n"
            f"    secret: {key.secret_b64}\n"
            "acl:\n"
            "  - id: manycast-update\n"
            f"    key: {_quote(key.name)}\n"
            "    action: update\n"
            "template:\n"
            "  - id: default\n"
            f"    storage: {_quote(str(root / 'zones'))}\n"
            '    file: "%s.zone"\n'
            "    zonefile-sync: -1\n"  # keep the zone files as written; changes live in the journal
            "    zonefile-load: whole\n"
            "    journal-content: changes\n"
            "zone:\n"
            f"{zones}"
        )

    @staticmethod
    def _as_knot_user() -> bool:
        if os.geteuid() != 0:
            return False
        try:
            pwd.getpwnam("knot")
        except KeyError:
            return False
        return True

    def _prepare(self) -> None:
        if self._given_workdir is not None:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self.workdir = Path(tempfile.mkdtemp(prefix="knot-", dir=self._given_workdir))
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="manycast-knot-"))
        for sub in ("run", "storage", "zones"):
            (self.workdir / sub).mkdir()
        for origin, text in self.zones.items():
            (self.workdir / "zones" / f"{origin.rstrip('.')}.zone").write_text(text)
        if self._auto_port:
            self.port = free_port(self.host)
        (self.workdir / "knot.conf").write_text(self.config())
        if self._as_knot_user():
            # knotd drops to the knot user before it writes its PID file and storage
            entry = pwd.getpwnam("knot")
            for path in [self.workdir, *self.workdir.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        if self.running:
            raise DnsServerError(f"knotd already runs on {self.host}:{self.port}")
        knotd = self._knotd or knotd_path()
        if knotd is None:
            raise DnsServerError("knot is not installed; `make dns-deps` installs it (root)")
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            self._prepare()
            assert self.workdir is not None
            with open(self.workdir / "knotd.log", "wb") as log:
                self._process = subprocess.Popen(
                    [knotd, "-c", str(self.workdir / "knot.conf")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            try:
                self._wait_ready()
                return
            except DnsServerError:
                text = self.log()
                self.stop()
                if attempt + 1 < attempts and "cannot bind" in text:
                    continue  # lost the free port to someone else: take another
                raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        waiting = list(self.zones)
        while waiting:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise DnsServerError(f"knotd exited with status {code}; its log:\n{self.log()}")
            if time.monotonic() > deadline:
                raise DnsServerError(
                    f"knotd did not serve {waiting[0]} within {self.start_timeout:g}s; "
                    f"its log:\n{self.log()}"
                )
            query = dns.message.make_query(waiting[0], SOA)
            try:
                answer = dns.query.udp(query, self.host, timeout=0.2, port=self.port)
            except (dns.exception.DNSException, OSError):
                time.sleep(0.02)
                continue
            if answer.rcode() == dns.rcode.NOERROR and answer.flags & dns.flags.AA:
                waiting.pop(0)
            else:
                time.sleep(0.02)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> KnotServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
