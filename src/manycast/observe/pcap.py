"""Packet captures: every link's inner packets written as pcapng, one interface per link.

A driver given a capture sink (`MemoryNetwork.capture`, `AsyncOverlay.capture`)
calls it once for every frame a node it hosts puts on a link: `(link, at,
packet)`, `at` on the network's clock. `Capture` writes each frame as an
Enhanced Packet Block on the link's interface (an Interface Description Block
named after the link, link type LINKTYPE_RAW: the frame is the inner IP packet
itself). Timestamps are real on a real-time network (the overlay) and, on the
memory driver's virtual clock, its fixed wall-clock base plus virtual time, so
one seed gives one capture.

The file format is written by dpkt (BSD licence); its per-interface packet
block objects are reused, which keeps a frame's cost to a few microseconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol

from dpkt import pcapng

from manycast.errors import ManycastError

LINKTYPE_RAW = 101  # raw IP: the version nibble says IPv4 or IPv6
SNAPLEN = 65535
_LE = sys.byteorder == "little"
_SHB: Any = pcapng.SectionHeaderBlockLE if _LE else pcapng.SectionHeaderBlock
_IDB: Any = pcapng.InterfaceDescriptionBlockLE if _LE else pcapng.InterfaceDescriptionBlock
_EPB: Any = pcapng.EnhancedPacketBlockLE if _LE else pcapng.EnhancedPacketBlock
_OPT: Any = pcapng.PcapngOptionLE if _LE else pcapng.PcapngOption
_MEMBERS_SHOWN = 6


class CaptureError(ManycastError, OSError):
    """The capture file cannot be written."""


class _Member(Protocol):
    @property
    def node(self) -> str: ...
    @property
    def iface(self) -> str: ...


class _Link(Protocol):
    """What a capture needs of a link (`topology.links.LinkSpec` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def members(self) -> Sequence[_Member]: ...


def _options(*pairs: tuple[int, str]) -> list[Any]:
    return [
        *(_OPT(code=code, data=text.encode()) for code, text in pairs),
        _OPT(code=pcapng.PCAPNG_OPT_ENDOFOPT),
    ]


class PcapngWriter:
    """A pcapng file: one section, the interfaces given up front, then packets."""

    def __init__(
        self, out: BinaryIO, interfaces: Sequence[tuple[str, str]], application: str
    ) -> None:
        """`interfaces`: (name, description) of each, numbered from 0 in this order."""
        self._out = out
        shb = _SHB(opts=_options((pcapng.PCAPNG_OPT_SHB_USERAPPL, application)))
        idbs = [
            _IDB(
                snaplen=SNAPLEN,
                linktype=LINKTYPE_RAW,
                opts=_options(
                    (pcapng.PCAPNG_OPT_IF_NAME, name),
                    (pcapng.PCAPNG_OPT_IF_DESCRIPTION, description),
                ),
            )
            for name, description in interfaces
        ]
        self._writer = pcapng.Writer(out, shb=shb, idb=idbs or None)
        # One Enhanced Packet Block per interface, refilled for every packet.
        self._blocks = [_EPB(iface_id=i) for i in range(len(interfaces))]

    def write(self, interface: int, timestamp: float, packet: bytes) -> None:
        block = self._blocks[interface]
        block.pkt_data = packet
        block.caplen = block.pkt_len = len(packet)
        self._writer.writepkt(block, ts=timestamp)


class Capture:
    """The capture sink of a driver: call it as `capture(link, at, packet)`."""

    def __init__(
        self,
        path: Path,
        links: Iterable[_Link],
        *,
        wall_base: float,
        realtime: bool,
        application: str = "manycast",
    ) -> None:
        self.path = path
        self.wall_base = wall_base
        self.realtime = realtime
        self.packets = 0
        self._index: dict[str, int] = {}
        interfaces: list[tuple[str, str]] = []
        for link in links:
            self._index[link.name] = len(interfaces)
            interfaces.append((link.name, _describe(link)))
        try:
            self._file: BinaryIO | None = open(path, "wb", buffering=1 << 20)  # noqa: SIM115
        except OSError as exc:
            raise CaptureError(f"cannot write {path}: {exc.strerror or exc}") from None
        self._writer = PcapngWriter(self._file, interfaces, application)

    def __call__(self, link: str, at: float, packet: bytes) -> None:
        if self._file is None:
            return
        index = self._index.get(link)
        if index is None:
            return  # a link added after the capture began: not in the file's interfaces
        stamp = time.time() if self.realtime else self.wall_base + at
        self._writer.write(index, stamp, packet)
        self.packets += 1

    def close(self) -> None:
        out, self._file = self._file, None
        if out is not None:
            out.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _describe(link: _Link) -> str:
    members = [f"{m.node}/{m.iface}" for m in link.members]
    if len(members) > _MEMBERS_SHOWN:
        members = [*members[: _MEMBERS_SHOWN - 1], f"... {len(members)} in all"]
    return "manycast link " + link.name + ": " + " ".join(members)


def attach(network: object, sink: Capture) -> None:
    """Give a driver its capture sink; CaptureError if the driver takes none (the
    kernel lab captures with tcpdump in each namespace: `manycast lab capture`)."""
    if not hasattr(network, "capture"):
        raise CaptureError(f"{type(network).__name__} cannot capture its packets")
    network.capture = sink
