"""The address plan (Fig 2): which multicast groups are private, and the naming errors.

The plan is what a router's admission consults on every join, so this module does
no I/O and imports nothing that does (no dnspython, asyncio or sockets):
`protocol/` may import it. The naming errors live here too, because the plan
raises them and `manycast.naming` (which does I/O) re-exports them:

* `NamingError`: a name, record, argument or answer that cannot be used.
* `NamingTimeout`: the server did not answer in time.
* `NamingRefused`: the server said no: NXDOMAIN, no such record, REFUSED,
  SERVFAIL, or an update it would not apply.
* `BadRecord`: a record that is there but does not validate: a bad encoding,
  two names that disagree (`record mismatch`), a flag against the plan, or a
  conflict with what is published.

Both families: a group is an IPv4 multicast address (224.0.0.0/4) or an IPv6 one
(ff00::/8), and a plan lists private prefixes of either.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Final

from manycast.errors import BadRecord, NamingError, NamingRefused, NamingTimeout

__all__ = [
    "DEFAULT_PLAN",
    "DEFAULT_PRIVATE_RANGES",
    "MULTICAST",
    "MULTICAST6",
    "AddressPlan",
    "BadRecord",
    "Group",
    "NamingError",
    "NamingRefused",
    "NamingTimeout",
    "multicast_address",
]

MULTICAST: Final = IPv4Network("224.0.0.0/4")
MULTICAST6: Final = IPv6Network("ff00::/8")
IPV4_LIMIT: Final = 1 << 32  # an integer group below this is IPv4, above it IPv6

Group = IPv4Address | IPv6Address
Prefix = IPv4Network | IPv6Network


def show(text: str, limit: int = 40) -> str:
    """A value quoted for an error message, cut short when long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _multicast_space(addr: Group) -> IPv4Network | IPv6Network:
    return MULTICAST if isinstance(addr, IPv4Address) else MULTICAST6


def multicast_address(
    address: object, what: str = "group", error: type[NamingError] = NamingError
) -> Group:
    """`address` as an IPv4 or IPv6 multicast address, or `error` saying why it is not one.

    An IPv6 address with a zone ("ff02::1%eth0") is refused: a zone means something
    on one host only, never in a record other hosts read.
    """
    addr: Group
    if isinstance(address, IPv4Address | IPv6Address):
        addr = address
    else:
        try:
            addr = ipaddress.ip_address(str(address))
        except ValueError:
            raise error(f"bad {what} {show(str(address))}: not an IPv4 or IPv6 address") from None
    if isinstance(addr, IPv6Address) and addr.scope_id is not None:
        raise error(f"bad {what} {show(str(addr))}: an address with a zone")
    space = _multicast_space(addr)
    if addr not in space:
        raise error(f"bad {what} {addr}: not a multicast address ({space})")
    return addr


def _private_prefix(prefix: object) -> Prefix:
    net: Prefix
    if isinstance(prefix, IPv4Network | IPv6Network):
        net = prefix
    else:
        try:
            net = ipaddress.ip_network(str(prefix), strict=True)
        except ValueError as exc:
            raise NamingError(f"bad private prefix {show(str(prefix))}: {exc}") from None
    inside = net.subnet_of(MULTICAST) if isinstance(net, IPv4Network) else net.subnet_of(MULTICAST6)
    if not inside:
        space = MULTICAST if isinstance(net, IPv4Network) else MULTICAST6
        raise NamingError(f"bad private prefix {net}: not inside {space}")
    return net


@dataclass(frozen=True)
class AddressPlan:
    """Which multicast groups are private (Fig 2): the rest of the multicast space is public.

    IPv4: the seed splits the space at 232.0.0.0, 224-231 public, 232-239 private.

    IPv6 (the default plan's choice): ff3e::8000:0/97 and ff15::/16 are private.
    IPv6 pools serve on source-specific groups (ff3x::/32, RFC 4607), so the
    private range must leave room there for public pools: it is the half of the
    global-scope source-specific groups whose group IDs are for dynamic allocation
    (0x80000000-0xffffffff, RFC 3307 §4.1), which an owner hands out as the
    seed's owner hands out private groups, while the permanently assigned IDs
    below stay public. ff15::/16 (site-local, transient) is the counterpart of
    239.255.0.0/16 inside the IPv4 private range, where pools' control channels
    live. So the IPv6 pool defaults (group ff3e::8000:1, control group
    ff15::77:1) are private-range groups, as the IPv4 ones (232.1.1.1,
    239.255.77.1) are.

    A plan lists every private prefix, of both families:
    `AddressPlan.from_prefixes([...])` or `from_text("232.0.0.0/8, ff3e::8000:0/97")`
    makes any other split; a family with no prefix listed has no private space.
    """

    private: tuple[Prefix, ...]
    _masks4: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    _masks6: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for net in self.private:
            if not isinstance(net, IPv4Network | IPv6Network):
                raise NamingError(f"bad private prefix {net!r}: not a network")
            _private_prefix(net)
        masks = {
            family: tuple(
                (int(n.netmask), int(n.network_address))
                for n in self.private
                if n.version == family
            )
            for family in (4, 6)
        }
        object.__setattr__(self, "_masks4", masks[4])
        object.__setattr__(self, "_masks6", masks[6])

    @classmethod
    def from_prefixes(cls, prefixes: Iterable[str | Prefix]) -> AddressPlan:
        nets = [_private_prefix(p) for p in prefixes]
        v4 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, IPv4Network))
        v6 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, IPv6Network))
        return cls((*v4, *v6))

    @classmethod
    def from_text(cls, text: str) -> AddressPlan:
        """Comma- or space-separated private prefixes, e.g. "232.0.0.0/5, ff3e::8000:0/97"."""
        return cls.from_prefixes(p for p in text.replace(",", " ").split() if p)

    def is_private(self, group: Group | str) -> bool:
        addr = multicast_address(group)
        return self.is_private_int(int(addr)) if addr.version == 4 else self._private6(int(addr))

    def _private6(self, group: int) -> bool:
        return any(group & mask == value for mask, value in self._masks6)

    def is_private_int(self, group: int) -> bool:
        """`is_private` for an integer address, cheap enough for a router's fast path.

        The family follows from the value: every IPv6 multicast address is above
        2**32, every IPv4 address below it.
        """
        if group >= IPV4_LIMIT:
            return self._private6(group)
        return any(group & mask == value for mask, value in self._masks4)

    def is_public(self, group: Group | str) -> bool:
        return not self.is_private(group)

    def check(self, group: Group, private: bool) -> None:
        """Raises `BadRecord` unless the flag agrees with the plan."""
        actual = self.is_private(group)
        if actual != private:
            space = "private" if actual else "public"
            flag = "private" if private else "public"
            raise BadRecord(
                f"record mismatch: {group} is in the {space} space of the address plan "
                f"but flagged {flag}"
            )

    def __str__(self) -> str:
        return ", ".join(str(n) for n in self.private) or "(no private space)"


DEFAULT_PRIVATE_RANGES: Final = "232.0.0.0/5, ff3e::8000:0/97, ff15::/16"
DEFAULT_PLAN: Final = AddressPlan.from_text(DEFAULT_PRIVATE_RANGES)
