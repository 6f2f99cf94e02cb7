"""How a pool's servers agree (`[pool] coordination`): over the control channel, or with
the pool's state in etcd (`etcd`: its client URLs; `lease_s`: each server's lease)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from manycast.topology.reader import TableReader


class Coordination(StrEnum):
    CHANNEL = "channel"  # heartbeats, proposals and commits on the control channel
    ETCD = "etcd"  # liveness (leases) and the allocation (transactions) in etcd


@dataclass(frozen=True)
class CoordinationSpec:
    kind: Coordination = Coordination.CHANNEL
    etcd: tuple[str, ...] = ()  # the etcd cluster's client URLs
    lease_s: int = 2  # each server's lease: how long a server cut off may still serve


def read_coordination(p: TableReader, vip: bool) -> CoordinationSpec:
    """The `coordination`, `etcd` and `lease_s` keys of `[pool]`."""
    text = p.get("coordination", str, Coordination.CHANNEL.value)
    try:
        kind = Coordination(text)
    except ValueError:
        p.fail(f"coordination {text!r}: expected one of {', '.join(Coordination)}", "coordination")
    if kind is Coordination.CHANNEL:
        for key in ("etcd", "lease_s"):
            if key in p.table:
                p.fail(f"'{key}' is for coordination = \"etcd\"", key)
        return CoordinationSpec()
    if vip:
        p.fail(
            'coordination = "etcd" is for a manycast pool: a VIP pool\'s routers follow the'
            " servers' coordination on the control channel",
            "coordination",
        )
    if "etcd" not in p.table:
        p.fail(
            "coordination = \"etcd\" needs 'etcd', the etcd cluster's client URLs"
            ' (e.g. ["http://127.0.0.1:2379"])',
            "coordination",
        )
    lease = p.number("lease_s", 2, low=1, high=3600)
    if lease != int(lease):
        p.fail(f"'lease_s' = {lease}: etcd's leases are whole seconds", "lease_s")
    return CoordinationSpec(kind, read_endpoints(p), int(lease))


def read_endpoints(t: TableReader, key: str = "etcd") -> tuple[str, ...]:
    """A list of etcd client URLs (http or https, with a host)."""
    urls = t.get(key, list)
    if not urls:
        t.fail(f"'{key}' must name at least one etcd client URL", key)
    for url in urls:
        if not isinstance(url, str):
            t.fail(f"'{key}' must be a list of URLs, not {url!r}", key)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError on a bad port)
        except ValueError as exc:
            t.fail(f"'{key}': {url!r}: {exc}", key)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            t.fail(f"'{key}': {url!r} is not an http:// or https:// URL with a host", key)
        if parts.path.strip("/") or parts.query:
            t.fail(f"'{key}': {url!r}: give the client URL alone (no path)", key)
    return tuple(urls)
