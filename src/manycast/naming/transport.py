"""Talking to a DNS server: queries and signed updates as sans-I/O steps, run sync or async.

A lookup or an update is a generator of batches of operations (`Steps`); a
driver runs each batch (`drive` in turn over blocking sockets, `drive_async`
concurrently on asyncio) and sends the answers back in, or throws the driver's
`NamingError` in so the steps can undo. Failures are typed: `NamingTimeout`
when the deadline passes, `NamingRefused` for a refusal, an NXDOMAIN or a
missing record, `BadRecord` for a conflicting update, and the base
`NamingError` for garbage or a server that cannot be reached.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.update

from manycast.addressplan import BadRecord, NamingError, NamingRefused, NamingTimeout, show
from manycast.naming.records import IN, SOA

__all__ = ["Server"]

Server = str | tuple[str, int]


@dataclass(frozen=True)
class Query:
    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType


@dataclass(frozen=True)
class Update:
    message: dns.update.UpdateMessage


Op = Query | Update
T = TypeVar("T")
Steps = Generator[list[Op], list[dns.message.Message], T]


def endpoint(server: Server) -> tuple[str, int]:
    host, port = (server, 53) if isinstance(server, str) else server
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise NamingError(f"bad server {show(str(host))}: an IP address is needed") from None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise NamingError(f"bad server port {port!r}")
    return host, port


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def what(op: Op) -> str:
    if isinstance(op, Query):
        return f"{op.name} {dns.rdatatype.to_text(op.rdtype)}"
    return f"the update of zone {op.message.origin}"


def _remaining(deadline: float, op: Op, where: str, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise NamingTimeout(f"timeout after {timeout:g}s asking {where} for {what(op)}")
    return left


def _make_query(op: Query) -> dns.message.Message:
    return dns.message.make_query(op.name, op.rdtype, use_edns=0, payload=1232)


def _transport_error(exc: BaseException, op: Op, where: str, timeout: float) -> NamingError:
    if isinstance(exc, dns.exception.Timeout | TimeoutError):
        return NamingTimeout(f"timeout after {timeout:g}s asking {where} for {what(op)}")
    if isinstance(exc, dns.exception.DNSException | EOFError | ValueError | UnicodeError):
        detail = str(exc) or type(exc).__name__
        return NamingError(f"garbage answer from {where} for {what(op)}: {detail}")
    return NamingError(f"cannot ask {where} for {what(op)}: {exc}")


_TRANSPORT = (dns.exception.DNSException, OSError, EOFError, ValueError, UnicodeError)


def _decode_update_answer(wire: bytes, request: dns.update.UpdateMessage) -> dns.message.Message:
    """Parses the answer to an update, checking its TSIG; refusals become NamingRefused."""
    zone = request.origin
    try:
        answer = dns.message.from_wire(wire, keyring=request.keyring, request_mac=request.mac)
    except dns.tsig.PeerBadKey:
        raise NamingRefused(
            f"update of {zone} refused: the server does not know the TSIG key "
            f"{request.keyname} (NOTAUTH/BADKEY)"
        ) from None
    except dns.tsig.PeerBadSignature:
        raise NamingRefused(
            f"update of {zone} refused: bad TSIG signature (NOTAUTH/BADSIG)"
        ) from None
    except dns.tsig.PeerBadTime:
        raise NamingRefused(
            f"update of {zone} refused: clocks differ too much (NOTAUTH/BADTIME)"
        ) from None
    except dns.exception.DNSException as exc:
        # An unsigned answer to a signed update: report its rcode when the header reads.
        try:
            head = dns.message.from_wire(wire, question_only=True)
        except dns.exception.DNSException:
            raise NamingError(f"garbage answer to the update of {zone}: {exc}") from None
        if head.rcode() != dns.rcode.NOERROR and request.is_response(head):
            raise update_refusal(head.rcode(), zone) from None
        raise NamingError(f"bad answer to the update of {zone}: {exc}") from None
    if not request.is_response(answer):
        raise NamingError(f"bad answer to the update of {zone}: not a response to it")
    if request.keyring is not None and not answer.had_tsig:
        raise NamingError(f"bad answer to the update of {zone}: not signed")
    return answer


def update_refusal(rcode: dns.rcode.Rcode, zone: object, why: str = "") -> NamingError:
    """The error for an update answered with `rcode`: a conflict, or a refusal."""
    text = dns.rcode.to_text(rcode)
    if rcode in (dns.rcode.NOTAUTH, dns.rcode.REFUSED):
        why = why or "the server is not authoritative for the zone or does not accept this key"
        return NamingRefused(f"update of {zone} refused ({text}): {why}")
    if rcode in (dns.rcode.YXDOMAIN, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.NXRRSET):
        return BadRecord(f"conflict: records in {zone} changed during the update ({text}); retry")
    if rcode == dns.rcode.NOTZONE:
        return NamingRefused(f"update of {zone} refused ({text}): a name is outside the zone")
    return NamingRefused(f"update of {zone} failed ({text})")


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the server closed the connection")
        data += chunk
    return bytes(data)


def _exchange_sync(
    op: Op, host: str, port: int, deadline: float, timeout: float
) -> dns.message.Message:
    where = _where(host, port)
    left = _remaining(deadline, op, where, timeout)
    try:
        if isinstance(op, Query):
            answer, _ = dns.query.udp_with_fallback(_make_query(op), host, left, port)
            return answer
        wire = op.message.to_wire()
        with socket.create_connection((host, port), timeout=left) as sock:
            sock.sendall(len(wire).to_bytes(2, "big") + wire)
            size = int.from_bytes(_recv_exact(sock, 2, deadline), "big")
            reply = _recv_exact(sock, size, deadline)
    except NamingError:
        raise
    except _TRANSPORT as exc:
        raise _transport_error(exc, op, where, timeout) from None
    return _decode_update_answer(reply, op.message)


async def _exchange_async(
    op: Op, host: str, port: int, deadline: float, timeout: float
) -> dns.message.Message:
    where = _where(host, port)
    left = _remaining(deadline, op, where, timeout)
    try:
        if isinstance(op, Query):
            answer, _ = await dns.asyncquery.udp_with_fallback(_make_query(op), host, left, port)
            return answer
        wire = op.message.to_wire()

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
                size = int.from_bytes(await reader.readexactly(2), "big")
                return await reader.readexactly(size)
            finally:
                writer.close()

        reply = await asyncio.wait_for(exchange(), left)
    except NamingError:
        raise
    except asyncio.IncompleteReadError:
        raise NamingError(f"garbage answer from {where} for {what(op)}: truncated") from None
    except (TimeoutError, *_TRANSPORT) as exc:
        raise _transport_error(exc, op, where, timeout) from None
    return _decode_update_answer(reply, op.message)


def drive(steps: Steps[T], server: Server, timeout: float) -> T:
    """Runs `steps` against `server` over blocking sockets, all within `timeout`."""
    host, port = endpoint(server)
    deadline = time.monotonic() + timeout
    try:
        ops = next(steps)
        while True:
            try:
                replies = [_exchange_sync(op, host, port, deadline, timeout) for op in ops]
            except NamingError as exc:
                ops = steps.throw(exc)
            else:
                ops = steps.send(replies)
    except StopIteration as done:
        result: T = done.value
        return result


async def drive_async(steps: Steps[T], server: Server, timeout: float) -> T:
    """Runs `steps` against `server` on asyncio, each batch concurrently, within `timeout`."""
    host, port = endpoint(server)
    deadline = time.monotonic() + timeout
    try:
        ops = next(steps)
        while True:
            outcomes = await asyncio.gather(
                *(_exchange_async(op, host, port, deadline, timeout) for op in ops),
                return_exceptions=True,
            )
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            if errors:
                if not isinstance(errors[0], NamingError):
                    raise errors[0]
                ops = steps.throw(errors[0])
            else:
                ops = steps.send([o for o in outcomes if isinstance(o, dns.message.Message)])
    except StopIteration as done:
        result: T = done.value
        return result


# reading answers ----------------------------------------------------------------------


def answer_rrset(
    answer: dns.message.Message, op: Op, missing_ok: bool = False
) -> dns.rrset.RRset | None:
    """The answer's RRset for op; NXDOMAIN is "none" when missing_ok, else NamingRefused."""
    assert isinstance(op, Query)
    rcode = answer.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        if not missing_ok:
            raise NamingRefused(f"not found: {op.name} does not exist (NXDOMAIN)")
        return None
    if rcode != dns.rcode.NOERROR:
        text = dns.rcode.to_text(rcode)
        why = {
            dns.rcode.SERVFAIL: "server failure",
            dns.rcode.REFUSED: "refused, the server does not serve this name",
        }.get(rcode, "error")
        raise NamingRefused(f"{why} ({text}) for {what(op)}")
    return answer.get_rrset(answer.answer, op.name, IN, op.rdtype)


def zone_of(answer: dns.message.Message, op: Op) -> dns.name.Name:
    """The zone holding op.name, from the SOA in an answer to an SOA query."""
    assert isinstance(op, Query)
    if answer.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise NamingRefused(
            f"cannot find the zone of {op.name}: the server answered "
            f"{dns.rcode.to_text(answer.rcode())}"
        )
    for rrset in (*answer.answer, *answer.authority):
        if rrset.rdtype == SOA and op.name.is_subdomain(rrset.name):
            return rrset.name
    raise NamingRefused(f"cannot find the zone of {op.name}: no SOA in the answer")
