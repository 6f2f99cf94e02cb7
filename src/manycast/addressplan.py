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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Final

from manycast.errors import BadRecord, NamingError, NamingRefused, NamingTimeout

__all__ = [
    "DEFAULT_PLAN",
    "MULTICAST",
    "AddressPlan",
    "BadRecord",
    "NamingError",
    "NamingRefused",
    "NamingTimeout",
    "multicast_address",
]

MULTICAST: Final = IPv4Network("224.0.0.0/4")


def show(text: str, limit: int = 40) -> str:
    """A value quoted for an error message, cut short when long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def multicast_address(
    address: object, what: str = "group", error: type[NamingError] = NamingError
) -> IPv4Address:
    """`address` as an IPv4 multicast address, or `error` saying why it is not one."""
    try:
        addr = address if isinstance(address, IPv4Address) else IPv4Address(str(address))
    except ValueError:
        raise error(f"bad {what} {show(str(address))}: not an IPv4 address") from None
    if addr not in MULTICAST:
        raise error(f"bad {what} {addr}: not a multicast address (224.0.0.0/4)")
    return addr


@dataclass(frozen=True)
class AddressPlan:
    """Which multicast groups are private (Fig 2): the rest of 224.0.0.0/4 is public.

    The seed splits the space at 232.0.0.0: 224-231 public, 232-239 private;
    `AddressPlan.from_prefixes([...])` makes any other split.
    """

    private: tuple[IPv4Network, ...]

    def __post_init__(self) -> None:
        for net in self.private:
            if not isinstance(net, IPv4Network) or not net.subnet_of(MULTICAST):
                raise NamingError(f"bad private prefix {net}: not inside 224.0.0.0/4")

    @classmethod
    def from_prefixes(cls, prefixes: Iterable[str | IPv4Network]) -> AddressPlan:
        nets: list[IPv4Network] = []
        for prefix in prefixes:
            try:
                net = IPv4Network(prefix, strict=True)
            except ValueError as exc:
                raise NamingError(f"bad private prefix {show(str(prefix))}: {exc}") from None
            if not net.subnet_of(MULTICAST):
                raise NamingError(f"bad private prefix {net}: not inside 224.0.0.0/4")
            nets.append(net)
        return cls(tuple(ipaddress.collapse_addresses(nets)))

    @classmethod
    def from_text(cls, text: str) -> AddressPlan:
        """Comma- or space-separated private prefixes, e.g. "232.0.0.0/5"."""
        return cls.from_prefixes(p for p in text.replace(",", " ").split() if p)

    def is_private(self, group: IPv4Address | str) -> bool:
        addr = multicast_address(group)
        return any(addr in net for net in self.private)

    def is_private_int(self, group: int) -> bool:
        """`is_private` for an integer address, cheap enough for a router's fast path."""
        return any(group & int(net.netmask) == int(net.network_address) for net in self.private)

    def is_public(self, group: IPv4Address | str) -> bool:
        return not self.is_private(group)

    def check(self, group: IPv4Address, private: bool) -> None:
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


DEFAULT_PLAN: Final = AddressPlan.from_prefixes(["232.0.0.0/5"])
