"""Links as a driver sees them: who is attached, one-way delay and loss."""

from __future__ import annotations

from dataclasses import dataclass, field

from manycast.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Attachment:
    """One node's interface on a link (`address6`: its IPv6 address on a dual-stack link)."""

    node: str
    iface: str
    address: int
    address6: int | None = None


@dataclass(frozen=True)
class LinkSpec:
    """A link (point-to-point or a LAN): its members by address, one-way delay in
    seconds and the probability that a frame is lost."""

    name: str
    members: tuple[Attachment, ...]
    delay: float = 0.0
    loss: float = 0.0
    by_address: dict[int, Attachment] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.delay < 0:
            raise ConfigError(f"link {self.name}: delay must not be negative")
        if not 0.0 <= self.loss < 1.0:
            raise ConfigError(f"link {self.name}: loss must be in [0, 1)")
        by_address = {m.address: m for m in self.members}
        by_address.update((m.address6, m) for m in self.members if m.address6 is not None)
        object.__setattr__(self, "by_address", by_address)

    def receivers(self, sender: str, next_hop: int | None) -> list[Attachment]:
        """Where a frame from `sender` goes: the next hop, or every other member."""
        if next_hop is None:
            return [m for m in self.members if m.node != sender]
        member = self.by_address.get(next_hop)
        return [member] if member is not None and member.node != sender else []
