"""Setting a flow's conntrack mark, fast: one ctnetlink CT_NEW message per flow, not waited on.

An edge router tags a flow by marking its conntrack entry (`vip_edge.py`). Built
by pyroute2 for every flow, the message costs half a millisecond of encoding,
which caps an edge at a few hundred new flows a second and lets a flow's next
packets overtake its tag. So pyroute2 encodes one template per (protocol,
destination, port), with sentinel values where the flow's source address and
port, the mark and the sequence number go, and each flow's message is that
template with those four fields written in. The kernel's answers (an ACK, or an
error when it knows no such flow) are read when the socket is readable. A flow
to an IPv6 VIP gets an IPv6 template (its addresses 16 bytes).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_NEW, NFCTAttrTuple, nfct_msg

NETLINK_NETFILTER = 12
_SENTINEL_SOURCE = {socket.AF_INET: "198.51.100.254", socket.AF_INET6: "2001:db8:5e:a1::fe"}
_SENTINEL_PORT = 0xBEEF
_SENTINEL_MARK = 0x5EA1F00D
_SENTINEL_SEQ = 0x0C0FFEE0
_NLMSGERR = 2


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _template(proto: int, daddr: str, dport: int) -> tuple[bytes, int, int, int, int]:
    family = _family(daddr)
    source = _SENTINEL_SOURCE[family]
    msg = nfct_msg.create_from(
        mark=_SENTINEL_MARK,
        tuple_orig=NFCTAttrTuple(
            family=family, saddr=source, daddr=daddr, proto=proto, sport=_SENTINEL_PORT, dport=dport
        ),
    )
    msg["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = _SENTINEL_SEQ
    msg["nfgen_family"] = family
    msg.encode()
    data = bytes(msg.data)
    offsets = (
        data.index(struct.pack("=I", _SENTINEL_SEQ)),
        data.index(socket.inet_pton(family, source)),
        data.index(struct.pack("!H", _SENTINEL_PORT)),
        data.index(struct.pack("!I", _SENTINEL_MARK)),
    )
    return (data, *offsets)


class ConntrackMarker:
    """Marks conntrack entries of this network namespace (opened inside it)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setblocking(False)
        self._templates: dict[tuple[int, str, int], tuple[bytes, int, int, int, int]] = {}
        self._seq = 0
        self.sent = 0
        self.missing = 0  # the kernel had no entry for the flow
        self.failed = 0  # any other error, or the socket was full

    def mark(self, proto: int, saddr: str, sport: int, daddr: str, dport: int, mark: int) -> None:
        """Ask the kernel to set the mark of the flow (proto, saddr:sport -> daddr:dport)."""
        key = (proto, daddr, dport)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = _template(proto, daddr, dport)
        data, at_seq, at_source, at_port, at_mark = template
        message = bytearray(data)
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        struct.pack_into("=I", message, at_seq, self._seq)
        packed = socket.inet_pton(_family(saddr), saddr)
        message[at_source : at_source + len(packed)] = packed
        struct.pack_into("!H", message, at_port, sport)
        struct.pack_into("!I", message, at_mark, mark)
        try:
            self.sock.send(message)
            self.sent += 1
        except OSError:
            self.failed += 1

    def read_answers(self) -> None:
        """Count the kernel's refusals (ACKs carry error 0)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                self.failed += 1
                return
            offset = 0
            while offset + 20 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == _NLMSGERR:
                    code = -struct.unpack_from("=i", data, offset + 16)[0]
                    if code == errno.ENOENT:
                        self.missing += 1
                    elif code:
                        self.failed += 1
                if length < 16:
                    break
                offset += (length + 3) & ~3

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
