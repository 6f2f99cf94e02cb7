"""Authoritative DNS servers for pool names: Debian's knot, or a small embedded one.

Both serve the zones `naming.pool_zones()` writes (the pool zone and the
reverse zones of the multicast space) on a loopback port and accept DNS UPDATE
(RFC 2136) signed with one TSIG key (RFC 8945), refusing unsigned updates with
NOTAUTH as knot does, so `naming.publish()` and the lookups behave the same on
either.

* `KnotServer` runs `knotd` from a configuration written here (listen address,
  rundir, storage, the TSIG key, an ACL allowing `update` with that key, one
  zone file per zone). As root, knotd drops to the `knot` user, which must own
  its rundir and storage, so the work directory is handed over to it.
* `EmbeddedServer` is a dnspython responder on asyncio UDP and TCP: answers are
  authoritative (AA; NXDOMAIN or NODATA with the SOA in the authority section,
  TTL per RFC 2308), updates are checked for prerequisites and applied
  atomically, and the SOA serial moves on every applied change. It serves no
  zone transfers, wildcards or delegations (pool zones have none). Any input,
  however malformed, is counted and answered with FORMERR or dropped; it never
  stops the server. `serve()` and `run()` are what `manycast dns serve` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rrset
import dns.transaction
import dns.tsig
import dns.update
import dns.versioned
import dns.zone

from manycast.naming import (
    DEFAULT_PLAN,
    MULTICAST_REVERSE_ZONES,
    AddressPlan,
    PoolRecord,
    TsigKey,
    pool_zones,
)

__all__ = [
    "Authority",
    "DnsServerError",
    "EmbeddedServer",
    "KnotServer",
    "ServerStats",
    "knot_available",
    "knotd_path",
    "run",
    "serve",
]

_log = logging.getLogger(__name__)

IN: Final = dns.rdataclass.IN
ANY: Final = dns.rdatatype.ANY
SOA: Final = dns.rdatatype.SOA
NS: Final = dns.rdatatype.NS
CNAME: Final = dns.rdatatype.CNAME
UDP_PAYLOAD: Final = 1232  # the DNS flag day 2020 size: no IP fragmentation
TCP_IDLE: Final = 10.0
MAX_TCP_CLIENTS: Final = 64


class DnsServerError(RuntimeError):
    """A DNS server that cannot be started or configured."""


# the responder, sans I/O --------------------------------------------------------------------


@dataclass
class ServerStats:
    received: int = 0  # messages of any kind
    queries: int = 0
    updates: int = 0  # update messages that parsed
    applied: int = 0  # updates that changed or confirmed a zone
    refused: int = 0  # updates refused: unsigned, bad key, not authoritative, prerequisites
    garbage: int = 0  # messages that did not parse, responses, truncated TCP frames
    errors: int = 0  # internal errors (answered SERVFAIL)


class _Reply(Exception):
    """Ends processing with this rcode (the transaction, if any, rolls back)."""

    def __init__(self, rcode: dns.rcode.Rcode) -> None:
        super().__init__(dns.rcode.to_text(rcode))
        self.rcode = rcode


def _load_zone(origin: str, text: str) -> tuple[dns.name.Name, dns.versioned.Zone]:
    try:
        name = dns.name.from_text(origin)
        zone = dns.zone.from_text(
            text, origin=name, relativize=False, zone_factory=dns.versioned.Zone
        )
    except (dns.exception.DNSException, ValueError, UnicodeError) as exc:
        raise DnsServerError(f"zone {origin}: {exc}") from None
    assert isinstance(zone, dns.versioned.Zone)
    return name, zone


def _unchecked_key(message: dns.message.Message, name: dns.name.Name) -> bool:
    return False  # parse the TSIG record without checking it (for error replies)


class Authority:
    """An authoritative server's logic: wire message in, wire message (or nothing) out."""

    def __init__(self, zones: Mapping[str, str], tsig_key: TsigKey | None) -> None:
        if not zones:
            raise DnsServerError("no zones to serve")
        self._zones: dict[dns.name.Name, dns.versioned.Zone] = dict(
            _load_zone(origin, text) for origin, text in zones.items()
        )
        self._names: dict[dns.name.Name, frozenset[dns.name.Name]] = {}
        for origin in self._zones:
            if self._soa(origin) is None:
                raise DnsServerError(f"zone {origin} has no SOA record at its apex")
            self._index(origin)
        self._keyring: dict[dns.name.Name, dns.tsig.Key] = {}
        if tsig_key is not None:
            key = tsig_key.dns_key()
            self._keyring[key.name] = key
        self.stats = ServerStats()

    @property
    def origins(self) -> list[str]:
        return sorted(o.to_text() for o in self._zones)

    def zone_text(self, origin: str) -> str:
        """The zone as it is now, as a master file."""
        zone = self._zones.get(dns.name.from_text(origin))
        if zone is None:
            raise DnsServerError(f"not serving {origin}")
        text = zone.to_text(want_origin=True)
        assert isinstance(text, str)
        return text

    # index of existing names, so empty non-terminals answer NODATA, not NXDOMAIN
    def _index(self, origin: dns.name.Name) -> None:
        names: set[dns.name.Name] = set()
        with self._zones[origin].reader() as txn:
            for name in txn.iterate_names():
                while name not in names and name.is_subdomain(origin):
                    names.add(name)
                    if name == origin:
                        break
                    name = name.parent()
        self._names[origin] = frozenset(names)

    def _soa(self, origin: dns.name.Name) -> dns.rdataset.Rdataset | None:
        with self._zones[origin].reader() as txn:
            soa: dns.rdataset.Rdataset | None = txn.get(origin, SOA)
        return soa

    def _zone_for(self, name: dns.name.Name) -> dns.name.Name | None:
        best: dns.name.Name | None = None
        for origin in self._zones:
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best)):
                best = origin
        return best

    # entry point
    def handle(self, wire: bytes, *, udp: bool = True) -> bytes | None:
        self.stats.received += 1
        try:
            return self._handle(wire, udp)
        except Exception:  # a responder must outlive any input
            self.stats.errors += 1
            _log.exception("internal error on a %d-byte message", len(wire))
            return _header_reply(wire, dns.rcode.SERVFAIL)

    def _handle(self, wire: bytes, udp: bool) -> bytes | None:
        try:
            msg = dns.message.from_wire(wire, keyring=self._keyring)
        except dns.message.UnknownTSIGKey:
            return self._tsig_refusal(wire, dns.rcode.BADKEY)
        except (dns.tsig.BadKey, dns.tsig.BadAlgorithm):
            return self._tsig_refusal(wire, dns.rcode.BADKEY)
        except dns.tsig.BadSignature:
            return self._tsig_refusal(wire, dns.rcode.BADSIG)
        except dns.tsig.BadTime:
            return self._tsig_refusal(wire, dns.rcode.BADTIME)
        except Exception:  # anything else that does not parse is garbage
            self.stats.garbage += 1
            return _header_reply(wire, dns.rcode.FORMERR)
        if msg.flags & dns.flags.QR:
            self.stats.garbage += 1  # never answer a response
            return None
        opcode = msg.opcode()
        if opcode == dns.opcode.QUERY:
            self.stats.queries += 1
            reply = self._query(msg)
        elif opcode == dns.opcode.UPDATE:
            self.stats.updates += 1
            assert isinstance(msg, dns.update.UpdateMessage)
            reply = self._update(msg)
        else:
            reply = dns.message.make_response(msg, our_payload=UDP_PAYLOAD)
            reply.set_rcode(dns.rcode.NOTIMP)
        return _render(reply, msg, udp)

    def _tsig_refusal(self, wire: bytes, error: int) -> bytes | None:
        """NOTAUTH with a TSIG record carrying the error and no MAC (RFC 8945 §5.3.2)."""
        self.stats.refused += 1
        try:
            msg = dns.message.from_wire(wire, keyring=_unchecked_key)
        except Exception:
            self.stats.garbage += 1
            return _header_reply(wire, dns.rcode.FORMERR)
        if msg.tsig is None or msg.flags & dns.flags.QR:
            return None
        rdata = msg.tsig[0]
        reply = dns.message.make_response(msg)
        reply.set_rcode(dns.rcode.NOTAUTH)
        out = bytearray(reply.to_wire())
        tsig = (
            _name_wire(rdata.algorithm)
            + int(time.time()).to_bytes(6, "big")
            + struct.pack("!HHHHH", rdata.fudge, 0, rdata.original_id, error, 0)
        )
        assert msg.keyname is not None
        out += _name_wire(msg.keyname) + struct.pack(
            "!HHIH", dns.rdatatype.TSIG, dns.rdataclass.ANY, 0, len(tsig)
        )
        out += tsig
        out[10:12] = (int.from_bytes(out[10:12], "big") + 1).to_bytes(2, "big")
        return bytes(out)

    # queries
    def _query(self, query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query, our_payload=UDP_PAYLOAD)
        if query.edns > 0:
            reply.set_rcode(dns.rcode.BADVERS)  # RFC 6891 §6.1.3
            return reply
        if len(query.question) != 1:
            reply.set_rcode(dns.rcode.FORMERR)
            return reply
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        if question.rdclass != IN or qtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            reply.set_rcode(dns.rcode.REFUSED)
            return reply
        if dns.rdatatype.is_metatype(qtype) and qtype != ANY:
            reply.set_rcode(dns.rcode.FORMERR)
            return reply
        origin = self._zone_for(qname)
        if origin is None:
            reply.set_rcode(dns.rcode.REFUSED)
            return reply
        reply.flags |= dns.flags.AA
        with self._zones[origin].reader() as txn:
            node = txn.get_node(qname)
            rdatasets = list(node.rdatasets) if node is not None else []
            if rdatasets:
                if qtype == ANY:
                    wanted = rdatasets
                else:
                    wanted = [r for r in rdatasets if r.rdtype == qtype]
                    if not wanted and qtype != CNAME:
                        wanted = [r for r in rdatasets if r.rdtype == CNAME]
                for rds in wanted:
                    reply.answer.append(dns.rrset.from_rdata_list(qname, rds.ttl, list(rds)))
            elif qname not in self._names[origin]:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            if not reply.answer:
                soa = txn.get(origin, SOA)
                assert soa is not None
                first = soa[0]
                assert isinstance(first, dns.rdtypes.ANY.SOA.SOA)
                ttl = min(soa.ttl, first.minimum)  # RFC 2308 §3
                reply.authority.append(dns.rrset.from_rdata_list(origin, ttl, list(soa)))
        return reply

    # updates (RFC 2136 §3)
    def _update(self, msg: dns.update.UpdateMessage) -> dns.message.Message:
        reply = dns.message.make_response(msg)
        try:
            if not self._keyring:
                raise _Reply(dns.rcode.REFUSED)  # no key configured: read-only
            if not msg.had_tsig:
                raise _Reply(dns.rcode.NOTAUTH)  # as knot answers an unsigned update
            if len(msg.zone) != 1:
                raise _Reply(dns.rcode.FORMERR)
            zone_rrset = msg.zone[0]
            origin = zone_rrset.name
            if zone_rrset.rdclass != IN or origin not in self._zones:
                raise _Reply(dns.rcode.NOTAUTH)
            with self._zones[origin].writer() as txn:
                _check_prerequisites(txn, origin, msg.prerequisite)
                _prescan(origin, msg.update)
                _apply(txn, origin, msg.update)
                if txn.changed():
                    txn.update_serial(name=origin)
        except _Reply as stop:
            self.stats.refused += 1
            reply.set_rcode(stop.rcode)
            return reply
        self._index(origin)
        self.stats.applied += 1
        return reply


def _render(reply: dns.message.Message, query: dns.message.Message, udp: bool) -> bytes:
    limit = 65535
    if udp:
        limit = max(512, min(query.payload, UDP_PAYLOAD)) if query.edns >= 0 else 512
    try:
        return reply.to_wire(max_size=limit)
    except dns.exception.TooBig:
        # RFC 2181 §9: an answer that does not fit is sent truncated, without data
        reply.answer, reply.authority, reply.additional = [], [], []
        reply.flags |= dns.flags.TC
        return reply.to_wire(max_size=limit)


def _name_wire(name: dns.name.Name) -> bytes:
    wire = name.to_wire()
    assert wire is not None
    return wire


def _header_reply(wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A bare header for a message that did not parse (nothing if it is a response)."""
    if len(wire) < 12:
        return None
    ident, flags = struct.unpack("!HH", wire[:4])
    if flags & dns.flags.QR:
        return None
    return struct.pack("!HHHHHH", ident, dns.flags.QR | (flags & 0x7800) | int(rcode), 0, 0, 0, 0)


def _in_use(txn: dns.transaction.Transaction, name: dns.name.Name) -> bool:
    node = txn.get_node(name)
    return node is not None and len(node.rdatasets) > 0


def _check_prerequisites(
    txn: dns.transaction.Transaction, origin: dns.name.Name, prereqs: Iterable[dns.rrset.RRset]
) -> None:
    exact: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], set[dns.rdata.Rdata]] = {}
    for rrset in prereqs:
        name, rdtype = rrset.name, rrset.rdtype
        if not name.is_subdomain(origin):
            raise _Reply(dns.rcode.NOTZONE)
        if rrset.ttl != 0:
            raise _Reply(dns.rcode.FORMERR)
        if rrset.deleting == dns.rdataclass.ANY:
            if rdtype == ANY:
                if not _in_use(txn, name):
                    raise _Reply(dns.rcode.NXDOMAIN)
            elif txn.get(name, rdtype) is None:
                raise _Reply(dns.rcode.NXRRSET)
        elif rrset.deleting == dns.rdataclass.NONE:
            if rdtype == ANY:
                if _in_use(txn, name):
                    raise _Reply(dns.rcode.YXDOMAIN)
            elif txn.get(name, rdtype) is not None:
                raise _Reply(dns.rcode.YXRRSET)
        elif rrset.deleting is None and rrset.rdclass == IN:
            exact.setdefault((name, rdtype), set()).update(rrset)
        else:
            raise _Reply(dns.rcode.FORMERR)
    for (name, rdtype), wanted in exact.items():
        current = txn.get(name, rdtype)
        if current is None or set(current) != wanted:
            raise _Reply(dns.rcode.NXRRSET)


def _prescan(origin: dns.name.Name, updates: Iterable[dns.rrset.RRset]) -> None:
    for rrset in updates:
        if not rrset.name.is_subdomain(origin):
            raise _Reply(dns.rcode.NOTZONE)
        meta = dns.rdatatype.is_metatype(rrset.rdtype)
        if rrset.deleting is None:
            if rrset.rdclass != IN or meta:
                raise _Reply(dns.rcode.FORMERR)
        elif rrset.deleting == dns.rdataclass.ANY:
            if rrset.ttl != 0 or len(rrset) or (meta and rrset.rdtype != ANY):
                raise _Reply(dns.rcode.FORMERR)
        elif rrset.deleting == dns.rdataclass.NONE:
            if rrset.ttl != 0 or meta:
                raise _Reply(dns.rcode.FORMERR)
        else:
            raise _Reply(dns.rcode.FORMERR)


def _apply(
    txn: dns.transaction.Transaction, origin: dns.name.Name, updates: Iterable[dns.rrset.RRset]
) -> None:
    for rrset in updates:
        name, rdtype = rrset.name, rrset.rdtype
        apex = name == origin
        if rrset.deleting is None:
            if rdtype == SOA:
                continue  # the serial is this server's business
            has_cname = txn.get(name, CNAME) is not None
            if (rdtype == CNAME) != has_cname and _in_use(txn, name):
                continue  # CNAME and other data do not mix (RFC 2136 §3.4.2.2)
            merged = dns.rdataset.Rdataset(IN, rdtype)
            for rdata in [*(txn.get(name, rdtype) or ()), *rrset]:
                merged.add(rdata)
            merged.ttl = rrset.ttl
            txn.replace(name, merged)
        elif rrset.deleting == dns.rdataclass.ANY:
            if rdtype == ANY:
                node = txn.get_node(name)
                for rds in [] if node is None else list(node.rdatasets):
                    if not (apex and rds.rdtype in (SOA, NS)):
                        txn.delete(name, rds.rdtype)
            elif not (apex and rdtype in (SOA, NS)) and txn.get(name, rdtype) is not None:
                txn.delete(name, rdtype)
        else:  # class NONE: delete these records
            current = txn.get(name, rdtype)
            if rdtype == SOA or current is None:
                continue
            doomed = [r for r in rrset if r in current]
            if apex and rdtype == NS and len(doomed) >= len(current):
                continue  # never the zone's last NS
            if doomed:
                txn.delete(name, dns.rdataset.from_rdata_list(0, doomed))


# the embedded server: asyncio UDP and TCP ---------------------------------------------------


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        reply = self.authority.handle(data, udp=True)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from clients that went away


class EmbeddedServer:
    """The dnspython responder on host:port (UDP and TCP; port 0 picks a free one).

    Use it as `async with`, or as a plain `with` (it then runs in a thread).
    """

    def __init__(
        self,
        zones: Mapping[str, str],
        tsig_key: TsigKey | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.authority = Authority(zones, tsig_key)
        self.host, self.port = host, port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_pool(
        cls,
        origin: str,
        records: Iterable[PoolRecord],
        tsig_key: TsigKey | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reverse_zones: Iterable[str] = MULTICAST_REVERSE_ZONES,
        plan: AddressPlan = DEFAULT_PLAN,
    ) -> EmbeddedServer:
        zones = pool_zones(
            origin, records, reverse_zones=reverse_zones, nameserver_address=host, plan=plan
        )
        return cls(zones, tsig_key, host=host, port=port)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def stats(self) -> ServerStats:
        return self.authority.stats

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self.authority), local_addr=(self.host, self.port)
                )
            except OSError as exc:
                raise DnsServerError(
                    f"cannot listen on {self.host}:{self.port}/udp: {exc}"
                ) from None
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._client, self.host, port)
            except OSError as exc:
                udp.close()
                if self.port:
                    raise DnsServerError(
                        f"cannot listen on {self.host}:{port}/tcp: {exc}"
                    ) from None
                continue  # the free UDP port is taken for TCP: try another
            self._udp, self.port = udp, port
            _log.info("serving %s on %s:%d", ", ".join(self.authority.origins), self.host, port)
            return
        raise DnsServerError(f"no port free for both UDP and TCP on {self.host}")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_TCP_CLIENTS:
            writer.close()
            return
        self._clients.add(task)
        try:
            while True:
                size = int.from_bytes(
                    await asyncio.wait_for(reader.readexactly(2), TCP_IDLE), "big"
                )
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                reply = self.authority.handle(data, udp=False)
                if reply is not None:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self.authority.stats.garbage += 1
        except (TimeoutError, OSError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def __aenter__(self) -> EmbeddedServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # thread mode, for synchronous callers
    def __enter__(self) -> EmbeddedServer:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
                loop.run_until_complete(self.close())
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name="manycast-dns", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None


async def serve(
    zone_origin: str,
    records: Iterable[PoolRecord],
    host: str = "127.0.0.1",
    port: int = 53,
    tsig_key: TsigKey | None = None,
    *,
    plan: AddressPlan = DEFAULT_PLAN,
) -> EmbeddedServer:
    """Starts the embedded server for a pool zone (and the reverse zones); close() stops it."""
    server = EmbeddedServer.for_pool(
        zone_origin, records, tsig_key, host=host, port=port, plan=plan
    )
    await server.start()
    return server


def run(
    zone_origin: str,
    records: Iterable[PoolRecord],
    host: str = "127.0.0.1",
    port: int = 53,
    tsig_key: TsigKey | None = None,
    *,
    plan: AddressPlan = DEFAULT_PLAN,
    ready: Callable[[EmbeddedServer], None] | None = None,
) -> ServerStats:
    """Serves until SIGINT or SIGTERM; `ready` is called once the server listens."""
    recs = list(records)

    async def main() -> ServerStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        server = await serve(zone_origin, recs, host, port, tsig_key, plan=plan)
        try:
            if ready is not None:
                ready(server)
            await stop.wait()
        finally:
            await server.close()
        return server.stats

    return asyncio.run(main())


# knot --------------------------------------------------------------------------------------

_KNOTD_PLACES: Final = ("/usr/sbin/knotd", "/usr/local/sbin/knotd")


def knotd_path() -> str | None:
    """Where knotd is (root's PATH has /usr/sbin, a user's often does not)."""
    found = shutil.which("knotd")
    if found:
        return found
    return next((p for p in _KNOTD_PLACES if os.access(p, os.X_OK)), None)


def knot_available() -> bool:
    return knotd_path() is not None


def _free_port(host: str) -> int:
    """A port free for both UDP and TCP right now (knotd binds it a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise DnsServerError(f"no port free for both UDP and TCP on {host}")


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
            _load_zone(origin, text)  # fail here, with a clear message, not in knotd's log
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
            "# written by manycast (dnsserver.KnotServer)\n"
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
            self.port = _free_port(self.host)
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
