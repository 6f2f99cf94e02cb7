"""A pool's address families: its clients' space, and for a dual-stack pool both.

`space` is one prefix (the pool's family is its family: IPv4 or IPv6) or, for a
dual-stack pool, a list of one prefix of each family (`["10.0.0.0/8",
"2001:db8::/32"]`). A dual-stack pool's `group` is likewise a list of one group of
each family (left out: 232.1.1.1 and ff3e::8000:1); its control channel stays one
IPv4 group, so one coordination serves both families. A dual-stack VIP pool's
`vip` lists one VIP of each family (`["203.0.113.80", "2001:db8:80::80"]`); a
`vip` list with `space` left out asks for a dual-stack pool over both families'
whole spaces.

Both spaces get the same index (`index_bits`, `index`), hence as many buckets: the
pool's one allocation, bucket by bucket, gives each server the same buckets in
either family, and its joins are those buckets written in each family's addresses
(IGMPv3 masks for the IPv4 group, MLDv2 masks for the IPv6 one).
"""

from __future__ import annotations

import ipaddress

from manycast.space import AddressSpace, SpaceError
from manycast.topology.reader import TableReader

# A dual-stack pool's groups unless given (those of an IPv4 and an IPv6 pool).
DEFAULT_GROUPS = ["232.1.1.1", "ff3e::8000:1"]
# A dual-stack VIP pool's spaces when its `vip` is a list and `space` is left out.
DEFAULT_SPACES = ["0.0.0.0/0", "::/0"]


def read_dual_spaces(p: TableReader) -> tuple[AddressSpace, AddressSpace]:
    """A dual-stack pool's spaces (`space` a list of one prefix of each family), IPv4
    first, with the same `index_bits` and `index`."""
    given = p.get("space", list, DEFAULT_SPACES)
    bits = int(p.number("index_bits", 16, low=1, high=24))
    index = p.get("index", str, "low")
    versions = sorted(_version(p, text) for text in given)
    if versions != [4, 6]:
        p.fail(
            "a dual-stack pool's 'space' lists one prefix of each family"
            ' (e.g. ["10.0.0.0/8", "2001:db8::/32"])',
            "space",
        )
    four, six = sorted(given, key=lambda text: _version(p, text))
    try:
        return AddressSpace.create(four, bits, index), AddressSpace.create(six, bits, index)
    except SpaceError as exc:
        p.fail(str(exc), "space")


def is_dual_stack(p: TableReader) -> bool:
    """Whether the `[pool]` table asks for a dual-stack pool (`space` is a list, or
    left out beside a `vip` list)."""
    space = p.table.get("space")
    if space is None:
        return isinstance(p.table.get("vip"), list)
    if isinstance(p.table.get("vip"), list) and not isinstance(space, list):
        p.fail(
            "'vip' lists one VIP per family only in a dual-stack pool: its 'space' lists"
            ' one prefix of each family (e.g. ["0.0.0.0/0", "2001:db8::/32"]), or give'
            " one vip",
            "vip",
        )
    return isinstance(space, list)


def _version(p: TableReader, text: object) -> int:
    if not isinstance(text, str):
        p.fail(f"'space' lists prefixes as strings, not {text!r}", "space")
    try:
        return ipaddress.ip_network(text, strict=False).version
    except ValueError as exc:
        p.fail(f"'space': {text!r}: {exc}", "space")


def dual_groups(p: TableReader) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """A dual-stack pool's `group`: a list of one group of each family (the IPv6 one
    in ff3x::/32, its source-specific range), or left out for the defaults."""
    given = p.get("group", list, DEFAULT_GROUPS)
    found: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
    for text in given:
        try:
            address = ipaddress.ip_address(text if isinstance(text, str) else "")
        except ValueError:
            p.fail(f"'group': {text!r} is not an IP address", "group")
        if address.is_multicast:
            found[address.version] = address
    four, six = found.get(4), found.get(6)
    if (
        len(given) != 2
        or not isinstance(four, ipaddress.IPv4Address)
        or not isinstance(six, ipaddress.IPv6Address)
    ):
        p.fail(
            "a dual-stack pool's 'group' lists one multicast group of each family"
            ' (e.g. ["232.1.1.1", "ff3e::8000:1"])',
            "group",
        )
    if int(six) >> 96 & 0xFFF0FFFF != 0xFF300000:
        p.fail(
            f"group {six} is not in ff3x::/32, IPv6's source-specific range (RFC 4607):"
            " the servers' masked joins are source-specific",
            "group",
        )
    return four, six


def dual_vips(p: TableReader) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """A dual-stack VIP pool's `vip`: a list of one VIP of each family, IPv4 first (each
    then checked as one family's VIP is)."""
    example = '(e.g. ["203.0.113.80", "2001:db8:80::80"])'
    given = p.get("vip", (list, str))
    if not isinstance(given, list):
        p.fail(
            f"a dual-stack VIP pool's 'vip' lists one VIP of each family {example}: its"
            " clients of each family send to their family's VIP",
            "vip",
        )
    found: dict[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {4: [], 6: []}
    for text in given:
        try:
            address = ipaddress.ip_address(text if isinstance(text, str) else "")
        except ValueError:
            p.fail(f"'vip': {text!r} is not an IP address", "vip")
        found[address.version].append(address)
    for version in (4, 6):
        if len(found[version]) > 1:
            twice = ", ".join(str(a) for a in found[version])
            p.fail(
                f"'vip' lists two IPv{version} VIPs ({twice}) and must list one of each"
                f" family {example}",
                "vip",
            )
        if not found[version]:
            p.fail(
                f"'vip' has no IPv{version} VIP: the pool's space has IPv{version} clients,"
                f" who need one {example}",
                "vip",
            )
    four, six = found[4][0], found[6][0]
    assert isinstance(four, ipaddress.IPv4Address) and isinstance(six, ipaddress.IPv6Address)
    return four, six


# What a dual-stack pool cannot have yet: (key, the value that asks for it, what it is).
NOT_YET_FOR_DUAL_STACK: tuple[tuple[str, str, str], ...] = ()


def refuse_for_dual_stack(p: TableReader) -> None:
    """Fail on the first key of a dual-stack pool that asks for what it lacks."""
    for key, value, what in NOT_YET_FOR_DUAL_STACK:
        given = p.table.get(key)
        if isinstance(given, str) and given.upper() == value.upper():
            p.fail(f"{what} is not supported yet for dual-stack pools (its space is a list)", key)
