"""The portion plane: a group's forwarding state in nftables, one map element per portion.

The MFC (`drivers/mroute.py`) forwards by (source, group): one kernel entry per
client source, installed at the first packet's NOCACHE upcall. Where the kernel
can match on masks, the seed's own unit does: a member's join names portions of
the client space (value/mask pairs), so the router needs one entry per portion,
whatever the number of clients, and no upcall at all.

In a router's namespace the plane is one nftables table (`netdev manycast`):

    chain ingress   hook ingress on every interface of the router:
                    ip daddr <group> jump classify
    chain classify  ip ttl 0-1 drop                   (the MFC's threshold)
                    ip saddr & <mask> vmap @p_<mask>  (one rule per distinct mask)
                    counter drop                      (no member holds the source)
    map p_<mask>    <value> : goto out_<n>            (one element per portion)
    chain out_<n>   meta iif "<iface>" drop           (never back where it came from)
                    fwd ip to <neighbour> device "<iface>"

`fwd ip to` sends the packet, still addressed to the group, to the member's
neighbour (the server, or the router that relayed its join) by the neighbour
table, without the IP stack: no route lookup, no allocation, no per-source
state. It decrements the TTL and updates the header checksum itself, as a
router does (the kernel's `nft_fwd_neigh` calls `ip_decrease_ttl`); the
classify chain first drops what the MFC would not forward (TTL 0 or 1).

A source that several members hold (two owners for a moment during a move)
gets `accept`: the packet goes on to the IP stack, where the MFC forwards it to
every member as before (per source, the fallback). Filters whose portions
overlap or exclude (an allocation after a change: a server's portions minus
the pieces another took) are cut into disjoint cells, split bit by bit only
where a portion or an exclusion decides, so the elements stay about as many as
the pairs the joins name; beyond `MAX_ENTRIES` the group falls back to the MFC.

Every change of a group's members is one `nft -f` transaction (one netlink
batch): the classify rules and the maps are replaced together, so a packet sees
the old allocation or the new one, never a mix.

An IPv6 group's plane is the same in its own table (`netdev manycast6`, so a
dual-stack router keeps one of each): `ip6 daddr`, `ip6 hoplimit 0-1 drop`,
`ip6 saddr & <mask>` over `ipv6_addr` maps, and `fwd ip6 to`, which decrements
the hop limit (`nft_fwd_neigh`; IPv6 has no header checksum).
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from manycast.protocol.membership import SourceFilter

TABLE = "manycast"
TABLE6 = "manycast6"
MAX_ENTRIES = 65536  # beyond: the MFC keeps the group

Out = tuple[str, int]  # (interface, neighbour address)


class PlaneError(RuntimeError):
    """nft refused a change of the plane."""


class _Member(Protocol):
    """What the plane reads of a member (`protocol.router.Member`)."""

    @property
    def iface(self) -> str: ...
    @property
    def neighbor(self) -> int: ...
    @property
    def filter(self) -> SourceFilter: ...


@dataclass(frozen=True, slots=True)
class PortionEntry:
    """Sources `s` with `s & mask == value` go to `outs` (several: the MFC decides)."""

    value: int
    mask: int
    outs: frozenset[Out]


def _disjoint(pairs: Iterable[tuple[int, int]]) -> bool:
    """Whether no source matches two of the (distinct) value/mask pairs."""
    by_mask: dict[int, set[int]] = {}
    for value, mask in pairs:
        by_mask.setdefault(mask, set()).add(value)
    masks = sorted(by_mask)
    for i, m1 in enumerate(masks):
        for m2 in masks[i + 1 :]:
            common = m1 & m2
            seen = {v & common for v in by_mask[m1]}
            if any(v & common in seen for v in by_mask[m2]):
                return False
    return True


def _cells(
    value: int, mask: int, pairs: list[tuple[int, int, int, bool]], members: list[Out]
) -> list[PortionEntry]:
    """Disjoint cells of the cell (value, mask) that the (member index, value, mask,
    include) pairs decide (`members[i]`: member i's out), split on the lowest bit
    some overlapping pair looks at and the cell does not; two halves that end alike
    are merged back."""
    live = [p for p in pairs if (p[1] ^ value) & p[2] & mask == 0]
    open_bits = 0
    for _, _, m, _ in live:
        open_bits |= m & ~mask
    if not open_bits:
        included = {i for i, _, _, inc in live if inc}
        excluded = {i for i, _, _, inc in live if not inc}
        outs = frozenset(members[i] for i in included - excluded)
        return [PortionEntry(value, mask, outs)] if outs else []
    bit = open_bits & -open_bits
    low = _cells(value, mask | bit, live, members)
    high = _cells(value | bit, mask | bit, live, members)
    if (
        len(low) == 1
        and len(high) == 1
        and low[0].mask == high[0].mask == mask | bit
        and low[0].outs == high[0].outs
    ):
        return [PortionEntry(value, mask, low[0].outs)]
    return low + high


def compile_portions(members: Iterable[_Member]) -> list[PortionEntry] | None:
    """Disjoint (value, mask) entries equivalent to the members' filters: the portions
    themselves when they neither overlap nor exclude, else the cells the masks cut
    the space into (None beyond `MAX_ENTRIES`: the MFC keeps the group)."""
    members = list(members)
    outs_of: dict[tuple[int, int], set[Out]] = {}
    excludes = False
    for m in members:
        excludes = excludes or bool(m.filter.exclude)
        for pair in m.filter.include:
            outs_of.setdefault(pair, set()).add((m.iface, m.neighbor))
    if not excludes and _disjoint(outs_of):
        entries = [PortionEntry(v, mask, frozenset(o)) for (v, mask), o in outs_of.items()]
    else:
        # Pairs by member (an exclusion is the member's own, whoever shares its out).
        pairs = [
            (i, v, mask, include)
            for i, m in enumerate(members)
            for include, chosen in ((True, m.filter.include), (False, m.filter.exclude))
            for v, mask in chosen
        ]
        entries = _cells(0, 0, pairs, [(m.iface, m.neighbor) for m in members])
    if len(entries) > MAX_ENTRIES:
        return None
    return sorted(entries, key=lambda e: (e.mask, e.value))


@dataclass(frozen=True, slots=True)
class _Syntax:
    """What nft calls the family's fields, and how it writes an address."""

    table: str
    proto: str  # ip, ip6
    hop_limit: str  # ttl, hoplimit
    addr_type: str  # ipv4_addr, ipv6_addr
    digits: int  # hex digits of a mask in a map's name

    def addr(self, value: int) -> str:
        return str(
            ipaddress.IPv4Address(value) if self.proto == "ip" else ipaddress.IPv6Address(value)
        )


_SYNTAX = {
    4: _Syntax(TABLE, "ip", "ttl", "ipv4_addr", 8),
    6: _Syntax(TABLE6, "ip6", "hoplimit", "ipv6_addr", 32),
}


def _verdict(entry: PortionEntry, chains: dict[Out, str]) -> str:
    if len(entry.outs) == 1:
        (out,) = entry.outs
        return f"goto {chains[out]}"
    return "accept"  # several members: the MFC copies it, per source


def run_nft(script: str) -> None:
    """Apply `script` as one transaction (one `nft -f`, one netlink batch)."""
    done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if done.returncode:
        raise PlaneError(done.stderr.strip() or f"nft exited {done.returncode}")


@dataclass
class PortionPlane:
    """The plane of one group in the current namespace, on `devices` (the router's
    interfaces). `run` applies an nft script atomically (tests may record instead)."""

    group: int
    devices: Sequence[str]
    run: Callable[[str], None] = run_nft
    family: int = 4
    entries: list[PortionEntry] | None = None  # None: the MFC handles the group
    installed: bool = False
    updates: int = 0
    update_seconds: float = 0.0
    _chains: dict[Out, str] = field(default_factory=dict)
    _maps: set[int] = field(default_factory=set)

    @property
    def _nft(self) -> _Syntax:
        return _SYNTAX[self.family]

    def install(self) -> None:
        """The table with its hook and an empty classification (drop)."""
        x = self._nft
        lines = [
            f"add table netdev {x.table}",
            f"delete table netdev {x.table}",
            f"table netdev {x.table} {{",
        ]
        lines.append(
            f"  chain classify {{\n    {x.proto} {x.hop_limit} 0-1 drop\n    counter drop\n  }}"
        )
        devices = ", ".join(f'"{d}"' for d in self.devices)
        lines.append(
            f"  chain ingress {{\n    type filter hook ingress devices = {{ {devices} }}"
            f" priority 0; policy accept;\n"
            f"    {x.proto} daddr {x.addr(self.group)} jump classify\n  }}"
        )
        lines.append("}")
        self.run("\n".join(lines) + "\n")
        self.installed, self.entries = True, []
        self._chains.clear()
        self._maps.clear()

    def remove(self) -> None:
        if self.installed:
            table = self._nft.table
            self.run(f"add table netdev {table}\ndelete table netdev {table}\n")
        self.installed, self.entries = False, None
        self._chains.clear()
        self._maps.clear()

    def update(self, entries: list[PortionEntry] | None) -> bool:
        """Replace the classification by `entries` (None: every packet of the group to
        the MFC) in one transaction; False when nothing changed."""
        if not self.installed or entries == self.entries:
            return False
        start = time.monotonic()
        x = self._nft
        t = f"netdev {x.table}"
        lines = [
            f"flush chain {t} classify",
            f"add rule {t} classify {x.proto} {x.hop_limit} 0-1 drop",
        ]
        # Disjoint entries: any order is right; the masks covering most of the space
        # first, so that most packets take one lookup.
        cover: dict[int, float] = {}
        for e in entries or ():
            cover[e.mask] = cover.get(e.mask, 0.0) + 2.0 ** -e.mask.bit_count()
        masks = sorted(cover, key=lambda m: (-cover[m], m))
        chains = dict(self._chains)  # kept only once nft has taken the transaction
        for e in entries or ():
            if len(e.outs) == 1:
                (out,) = e.outs
                if out not in chains:
                    name = f"out_{len(chains)}"
                    chains[out] = name
                    iface, hop = out
                    lines += [
                        f"add chain {t} {name}",
                        f'add rule {t} {name} meta iif "{iface}" drop',
                        f'add rule {t} {name} fwd {x.proto} to {x.addr(hop)} device "{iface}"',
                    ]
        for mask in masks:
            name = f"p_{mask:0{x.digits}x}"
            if mask not in self._maps:
                lines.append(f"add map {t} {name} {{ type {x.addr_type} : verdict; }}")
            lines.append(f"flush map {t} {name}")
            elements = [
                f"{x.addr(e.value)} : {_verdict(e, chains)}"
                for e in entries or ()
                if e.mask == mask
            ]
            for i in range(0, len(elements), 512):
                lines.append(f"add element {t} {name} {{ {', '.join(elements[i : i + 512])} }}")
            lines.append(f"add rule {t} classify {x.proto} saddr & {x.addr(mask)} vmap @{name}")
        lines.append(f"add rule {t} classify {'counter drop' if entries is not None else 'accept'}")
        for mask in sorted(self._maps - set(masks)):
            lines.append(f"delete map {t} p_{mask:0{x.digits}x}")
        self.run("\n".join(lines) + "\n")
        self._chains = chains
        self._maps = set(masks)
        self.entries = entries
        self.updates += 1
        self.update_seconds += time.monotonic() - start
        return True

    def status(self) -> dict[str, object]:
        entries = self.entries
        addr = self._nft.addr
        return {
            "group": addr(self.group),
            "installed": self.installed,
            "mode": "mfc" if entries is None else "portions",
            "entries": 0 if entries is None else len(entries),
            "portions": {
                f"{addr(e.value)}/{addr(e.mask)}": sorted(f"{i} {addr(h)}" for i, h in e.outs)
                for e in entries or ()
            },
            "updates": self.updates,
            "update_seconds": round(self.update_seconds, 6),
        }
