"""A router's key question answered: from a directory, or from DNS on loopback.

The DNS tests run the embedded server on real sockets; the reason a lookup gives
("no key" or "bad key record") follows the type of the naming error, not its text.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from manycast.dns import EmbeddedServer
from manycast.naming import (
    KEY_TTL,
    BadRecord,
    KeyAnswer,
    NamingRefused,
    NamingTimeout,
    PoolRecord,
    key_from_directory,
    keylookup,
    lookup_group,
    lookup_key,
    lookup_key_async,
    pool_zones,
)

ZONE = "pool.example."
WAIT = 30.0  # a deadline for answers a busy machine may be slow to give
KEY = bytes(range(32))
GROUP = IPv4Address("232.5.5.5")
GROUP6 = IPv6Address("ff3e::8005:505")
FAMILIES = pytest.mark.parametrize("group", [GROUP, GROUP6], ids=["ipv4", "ipv6"])
RECORD = PoolRecord.create("video.pool.example", GROUP, "owner@example.com", KEY, ttl=120)


def both(group: int, server: tuple[str, int], timeout: float = WAIT) -> KeyAnswer:
    """The sync and the async lookup, which must agree; the sync one's answer."""
    answer = lookup_key(group, server, timeout)
    assert asyncio.run(lookup_key_async(group, server, timeout)) == answer
    return answer


def served(zones: dict[str, str]) -> Iterator[tuple[str, int]]:
    with EmbeddedServer(zones, None) as server:
        yield server.address


@pytest.fixture
def empty() -> Iterator[tuple[str, int]]:
    yield from served(pool_zones(ZONE, []))


def tampered(where: str, key_text: str) -> dict[str, str]:
    """The record's zones with the key text in one zone ("pool" or "reverse") replaced."""
    zones = pool_zones(ZONE, [RECORD])
    name = ZONE if where == "pool" else "232.in-addr.arpa."
    zones[name] = zones[name].replace(base64.b64encode(KEY).decode(), key_text)
    return zones


# from a directory ------------------------------------------------------------------------


def test_directory_answers_with_the_key_or_no_key() -> None:
    directory = {int(GROUP): KEY}
    assert key_from_directory(directory, int(GROUP)) == KeyAnswer(KEY, KEY_TTL, None)
    assert key_from_directory(directory, int(GROUP) + 1) == KeyAnswer(None, KEY_TTL, "no key")
    assert KEY_TTL == 300.0


# from DNS --------------------------------------------------------------------------------


@FAMILIES
def test_a_good_record_gives_its_key_and_ttl(group: IPv4Address | IPv6Address) -> None:
    record = PoolRecord.create("video.pool.example", group, "owner@example.com", KEY, ttl=120)
    for address in served(pool_zones(ZONE, [record])):
        answer = both(int(group), address)
        assert answer == KeyAnswer(KEY, 120.0, None)
        assert answer.detail is None


@FAMILIES
def test_no_record_is_no_key(empty: tuple[str, int], group: IPv4Address | IPv6Address) -> None:
    with pytest.raises(NamingRefused):
        lookup_group(group, empty, timeout=WAIT)
    answer = both(int(group), empty)
    assert answer == KeyAnswer(None, 0.0, "no key")
    assert answer.detail is not None and "NXDOMAIN" in answer.detail


def test_a_name_the_server_does_not_serve_is_no_key() -> None:
    zones = pool_zones(ZONE, [RECORD])
    only = {name: zones[name] for name in (ZONE, "232.in-addr.arpa.")}
    for address in served(only):
        other = IPv4Address("224.0.0.1")  # 224.in-addr.arpa. is not served: REFUSED
        with pytest.raises(NamingRefused, match="REFUSED"):
            lookup_group(other, address, timeout=WAIT)
        assert both(int(other), address) == KeyAnswer(None, 0.0, "no key")
        assert both(int(GROUP), address) == KeyAnswer(KEY, 120.0, None)


@pytest.mark.parametrize(
    ("where", "key_text", "detail"),
    [
        ("reverse", base64.b64encode(bytes(32)).decode(), "record mismatch"),
        ("pool", "AAAA", "bad key record at video.pool.example."),
        ("reverse", "not-base64!", "bad key record at 5.5.5.232.in-addr.arpa."),
    ],
)
def test_a_tampered_record_is_a_bad_key_record(where: str, key_text: str, detail: str) -> None:
    for address in served(tampered(where, key_text)):
        with pytest.raises(BadRecord):
            lookup_group(GROUP, address, timeout=WAIT)
        answer = both(int(GROUP), address)
        assert answer == KeyAnswer(None, 0.0, "bad key record")
        assert answer.detail is not None and answer.detail.startswith(detail)


def test_a_flag_against_the_plan_is_a_bad_key_record() -> None:
    # Both names carry the same record, flagged public, for a group the plan makes private.
    zones = pool_zones(ZONE, [RECORD])
    flipped = {name: text.replace("f=private", "f=public") for name, text in zones.items()}
    for address in served(flipped):
        answer = both(int(GROUP), address)
        assert answer == KeyAnswer(None, 0.0, "bad key record")
        assert answer.detail is not None and "flagged public" in answer.detail


def test_a_server_that_never_answers_is_no_key_within_the_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never read: queries go unanswered
        address: tuple[str, int] = silent.getsockname()
        with pytest.raises(NamingTimeout):
            lookup_group(GROUP, address, timeout=0.3)
        for lookup in (
            lambda: lookup_key(int(GROUP), address, 0.3),
            lambda: asyncio.run(lookup_key_async(int(GROUP), address, 0.3)),
        ):
            started = time.monotonic()
            answer = lookup()
            assert time.monotonic() - started < 0.3 + WAIT  # gave up, did not hang
            # no word on the key: a router keeps one it had (serve-stale)
            assert answer == KeyAnswer(None, 0.0, "no key", unanswered=True)
            assert answer.detail is not None and answer.detail.startswith("timeout after 0.3s")


# the reason follows the error's type ------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason", "unanswered"),
    [
        (BadRecord("not found, says the text, but the record is bad"), "bad key record", False),
        (NamingRefused("bad record, says the text, but there is none"), "no key", False),
        (NamingTimeout("record mismatch, says the text"), "no key", True),
    ],
)
def test_the_reason_follows_the_type_not_the_text(
    monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str, unanswered: bool
) -> None:
    def fail(*args: object, **kwargs: object) -> PoolRecord:
        raise error

    async def fail_async(*args: object, **kwargs: object) -> PoolRecord:
        raise error

    monkeypatch.setattr(keylookup, "lookup_group", fail)
    monkeypatch.setattr(keylookup, "lookup_group_async", fail_async)
    assert both(int(GROUP), ("127.0.0.1", 53)) == KeyAnswer(
        None, 0.0, reason, unanswered=unanswered
    )
