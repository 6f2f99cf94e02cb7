"""The ways a pool keeps existing connections when their portion moves (Fig 12-16, 20-21)."""

from __future__ import annotations

from enum import StrEnum


class Technique(StrEnum):
    """Chosen per pool (`[pool] technique`); see docs/techniques.md."""

    R1 = "R1"  # reset: the new owner resets, the client reconnects (Fig 12)
    R2 = "R2"  # forward over the control channel, then point to point (Fig 13-14)
    R3 = "R3"  # state transfer on demand (Fig 15)
    R4 = "R4"  # pinned per-connection paths (Fig 16)
    # dynamic destination: point to point, moved by signed change-destinations (Fig 20-21)
    D = "D"
