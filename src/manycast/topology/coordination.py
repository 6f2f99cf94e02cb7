"""How a pool's servers agree (`[pool] coordination`): over the control channel, or with
the pool's state in etcd (`etcd`: its client URLs; `lease_s`: each server's lease); and,
on the channel, how they find out who is alive (`membership`: every server's heartbeat
to every other, or SWIM-style probing, whose cost per server does not grow with N)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from manycast.topology.reader import TableReader


class Membership(StrEnum):
    HEARTBEAT = "heartbeat"  # each server hears every other's heartbeat each period
    SWIM = "swim"  # servers probe each other point to point (protocol/swim.py)


class Coordination(StrEnum):
    CHANNEL = "channel"  # heartbeats, proposals and commits on the control channel
    ETCD = "etcd"  # liveness (leases) and the allocation (transactions) in etcd


@dataclass(frozen=True)
class CoordinationSpec:
    kind: Coordination = Coordination.CHANNEL
    etcd: tuple[str, ...] = ()  # the etcd cluster's client URLs
    lease_s: int = 2  # each server's lease: how long a server cut off may still serve
    membership: Membership = Membership.HEARTBEAT


def read_coordination(p: TableReader, vip: bool) -> CoordinationSpec:
    """The `coordination`, `etcd`, `lease_s` and `membership` keys of `[pool]`."""
    membership_text = p.get("membership", str, Membership.HEARTBEAT.value)
    try:
        membership = Membership(membership_text)
    except ValueError:
        p.fail(
            f"membership {membership_text!r}: expected one of {', '.join(Membership)}",
            "membership",
        )
    if membership is Membership.SWIM and vip:
        p.fail(
            'membership = "swim" is for a manycast pool: a VIP pool\'s routers follow the'
            " servers' heartbeats",
            "membership",
        )
    text = p.get("coordination", str, Coordination.CHANNEL.value)
    try:
        kind = Coordination(text)
    except ValueError:
        p.fail(f"coordination {text!r}: expected one of {', '.join(Coordination)}", "coordination")
    if kind is Coordination.CHANNEL:
        for key in ("etcd", "lease_s"):
            if key in p.table:
                p.fail(f"'{key}' is for coordination = \"etcd\"", key)
        return CoordinationSpec(membership=membership)
    if "membership" in p.table:
        p.fail(
            "'membership' is for coordination = \"channel\": with etcd, its leases say who"
            " is alive",
            "membership",
        )
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
