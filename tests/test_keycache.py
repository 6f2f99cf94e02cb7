"""A router's key cache (`naming/keycache.py`): what it writes reads back, what it
cannot read is left out with a warning, and a restored key is served stale, for
IPv4 and IPv6 groups alike."""

from __future__ import annotations

import logging
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manycast.auth import public_bytes
from manycast.naming.keycache import KeyCache, KeyCacheError, decode
from manycast.protocol.admission import Admission
from manycast.runtime import PoolRun
from manycast.topology import loads
from pooltools import served_now
from test_private import private_pool

GROUP = int.from_bytes(bytes([232, 9, 9, 9]), "big")
GROUP6 = int(ip_address("ff3e::8009:909"))
KEY = public_bytes(Ed25519PrivateKey.generate())


@pytest.mark.parametrize("group", [GROUP, GROUP6], ids=["ipv4", "ipv6"])
def test_a_remembered_key_reads_back_after_a_restart(tmp_path: Path, group: int) -> None:
    clock = [1000.0]
    cache = KeyCache(tmp_path / "r.keys.json", max_stale=86400.0, clock=lambda: clock[0])
    cache.remember(group, KEY, ttl=30.0)
    [kept] = KeyCache(tmp_path / "r.keys.json", 86400.0, clock=lambda: clock[0]).load()
    assert (kept.group, kept.public_key, kept.stale_until) == (group, KEY, 1000.0 + 30 + 86400)
    clock[0] += 30 + 86400  # past its stale limit: not restored
    assert KeyCache(tmp_path / "r.keys.json", 86400.0, clock=lambda: clock[0]).load() == []


def test_a_key_dns_says_is_gone_is_forgotten(tmp_path: Path) -> None:
    cache = KeyCache(tmp_path / "r.keys.json", max_stale=86400.0)
    cache.remember(GROUP, KEY, ttl=30.0)
    cache.forget(GROUP)
    assert KeyCache(tmp_path / "r.keys.json", 86400.0).load() == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not JSON"),
        ('{"format": 2, "keys": {}}', "not a key cache of format 1"),
        ('{"format": 1, "keys": []}', '"keys" is not a table'),
        ('{"format": 1, "keys": {"300.1.1.1": {"key": "00", "stale_until": 1}}}', "300.1.1.1"),
        ('{"format": 1, "keys": {"232.9.9.9": {"key": "zz", "stale_until": 1}}}', "232.9.9.9"),
        ('{"format": 1, "keys": {"232.9.9.9": {"key": "00", "stale_until": 1}}}', "1 bytes"),
        ('{"format": 1, "keys": {"232.9.9.9": {"stale_until": 1}}}', "232.9.9.9"),
    ],
)
def test_a_cache_file_that_cannot_be_read_is_refused_with_what_is_wrong(
    text: str, message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(KeyCacheError, match=message):
        decode(text)
    path = tmp_path / "r.keys.json"
    path.write_text(text)
    with caplog.at_level(logging.WARNING):
        assert KeyCache(path, 86400.0).load() == []  # the router starts with no key
    assert "left out" in caplog.text


def test_a_restored_key_is_asked_for_at_once_and_used_while_dns_is_silent() -> None:
    admission = Admission(negative_ttl=5.0)
    assert admission.restore_key(GROUP, KEY, stale_for=3600.0, now=0.0)
    assert not admission.restore_key(GROUP, KEY, stale_for=3600.0, now=0.0)  # held already
    # Not waited for (used stale), but asked for again at the first use.
    assert admission._missing([GROUP], 0.1) == () and admission.take_requests() == [GROUP]
    admission.provide_key(GROUP, None, 0.0, 0.5, "no key", unanswered=True)
    assert admission.stale_kept == 1 and admission._keys[GROUP].key is not None
    # DNS answers that the record is gone: the key is no longer used.
    assert admission._missing([GROUP], 6.0) == () and admission.take_requests() == [GROUP]
    admission.provide_key(GROUP, None, 0.0, 6.1, "no key", unanswered=False)
    assert admission._keys[GROUP].key is None


def test_a_restored_key_that_is_no_key_is_refused() -> None:
    assert not Admission().restore_key(GROUP, b"\x00" * 31, stale_for=60.0, now=0.0)


@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
def test_a_restarted_router_admits_with_the_keys_it_kept_while_dns_is_silent(
    tmp_path: Path, version: int
) -> None:
    """A private pool's router keeps the keys of its groups (IPv4 or IPv6) in its
    cache; killed and started again while key lookups get no answer, it admits its
    members' joins with them and its clients are served."""
    run = PoolRun(loads(private_pool(version=version)), "memory", seed=3, key_cache=tmp_path)
    pool = run.topology.pool
    run.network.run_until(1.5)  # type: ignore[attr-defined]
    kept = KeyCache(tmp_path / "rs.keys.json", 86400.0).load()
    assert {k.group for k in kept} == {int(pool.group), int(pool.control_group)}
    assert all(ip_address(k.group).version == version for k in kept)
    run._look_up_key = lambda group, then: None  # type: ignore[method-assign]
    run.network.kill("rs")
    run.network.run_until(2.0)  # type: ignore[attr-defined]
    fresh = run.start_router("rs")
    run.network.run_until(3.5)  # type: ignore[attr-defined]
    assert fresh.stats.joins_accepted > 0 and fresh.stats.rejected["no key"] == 0
    assert served_now(run)
