"""Links as every driver sees them: who is attached, delay and loss, and what crossed them."""

from __future__ import annotations

from dataclasses import dataclass

# Links are topology data; drivers see them under this name too.
from manycast.topology.links import Attachment, LinkSpec

__all__ = ["Attachment", "LinkCounters", "LinkSpec"]


@dataclass(slots=True)
class LinkCounters:
    """Frames of one link as seen by one driver instance."""

    sent: int = 0  # handed to the link by a local sender (one per receiver)
    received: int = 0  # delivered to a local receiver
    lost: int = 0  # dropped on purpose by the emulated loss
    dropped: int = 0  # could not be sent: no such next hop, too big, refused by the kernel
    unreachable: int = 0  # the receiving host answered "port unreachable" (peer not running)
