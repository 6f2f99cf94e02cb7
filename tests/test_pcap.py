"""Packet captures: `--pcap` on the memory and overlay drivers, read back by Wireshark's tshark.

A capture has one interface per link (link type raw IP) and every frame a node
put on a link. tshark must read a whole demo run without one malformed packet:
IGMPv3 reports, session traffic as TCP in IP, control messages as UDP to the
control port, labelled packets (a VIP pool) as MPLS in UDP. The Lua dissector in
contrib/wireshark/ shows the join extensions' mask pairs and signed-join fields
and the control messages. The lab captures from the kernel (`manycast lab
capture`, root only).

tshark is Debian's (`make observe-deps`, which `make test` runs as root); without
it these tests skip when not root, and fail as root (make test installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labcheck import lab_missing
from manycast.drivers.memory import WALL_BASE
from manycast.observe.pcap import LINKTYPE_RAW, Capture, CaptureError, attach
from manycast.runtime import PoolRun
from manycast.topology import builtin, loads
from manycast.wire.control.envelope import MessageType

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "contrib" / "wireshark" / "manycast.lua"
TSHARK = shutil.which("tshark")
TSHARK_MISSING = "tshark is not installed: `sudo make observe-deps` installs it (make test does)"
# A capture holds each packet once per link it crosses. Wireshark's TCP reassembly is
# not per interface: copies of one segment from several links overlap, and a
# subdissector that reassembles (port 7000 is Gryphon's to Wireshark) reports the
# overlap as malformed. The whole run is read with reassembly off; one link alone is
# read with Wireshark's defaults.
WHOLE_CAPTURE = ("-o", "tcp.desegment_tcp_streams:FALSE")


def tshark(*args: str, timeout: float = 300) -> str:
    if TSHARK is None:
        if os.geteuid() == 0:
            pytest.fail(f"{TSHARK_MISSING}; as root make test installs it first")
        pytest.skip(TSHARK_MISSING)
    done = subprocess.run(
        [TSHARK, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "manycast", "demo", "--json", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    assert "capture:" in done.stderr, done.stderr[-3000:]
    return done


def fields(path: Path, *names: str, extra: tuple[str, ...] = WHOLE_CAPTURE) -> list[list[str]]:
    """One row per frame: the named fields (first occurrence), tab separated."""
    args = ["-r", str(path), *extra, "-T", "fields", "-E", "occurrence=f"]
    for name in names:
        args += ["-e", name]
    return [line.split("\t") for line in tshark(*args).splitlines()]


# -- the file format, read independently of any library ------------------------------------


def _blocks(data: bytes) -> list[tuple[int, bytes]]:
    """(block type, body) of each pcapng block (little-endian section)."""
    blocks, offset = [], 0
    assert data[8:12] == b"\x4d\x3c\x2b\x1a"  # byte-order magic, little-endian
    while offset < len(data):
        kind, length = struct.unpack_from("<II", data, offset)
        trailer = struct.unpack_from("<I", data, offset + length - 4)[0]
        assert trailer == length and length % 4 == 0
        blocks.append((kind, data[offset + 8 : offset + length - 4]))
        offset += length
    return blocks


def _option(body: bytes, start: int, code: int) -> bytes | None:
    offset = start
    while offset + 4 <= len(body):
        kind, size = struct.unpack_from("<HH", body, offset)
        if kind == 0:
            return None
        if kind == code:
            return body[offset + 4 : offset + 4 + size]
        offset += 4 + (size + 3) // 4 * 4
    return None


class _Member:
    def __init__(self, node: str, iface: str) -> None:
        self.node, self.iface = node, iface


class _Link:
    def __init__(self, name: str, *members: str) -> None:
        self.name = name
        self.members = [_Member(*m.split("/")) for m in members]


def test_capture_file_has_one_raw_ip_interface_per_link(tmp_path: Path) -> None:
    path = tmp_path / "two.pcapng"
    links = [_Link("ra-core", "ra/eth0", "core/eth0"), _Link("lan", "ra/eth1", "a1/eth0")]
    packets = [("lan", 0.25, b"\x45" + bytes(27)), ("ra-core", 1.5, b"\x45" + bytes(40))]
    with Capture(path, links, wall_base=1_700_000_000.0, realtime=False) as capture:
        for link, at, packet in packets:
            capture(link, at, packet)
        capture("not-a-link", 2.0, b"\x45")  # ignored: not an interface of the file
    assert capture.packets == 2
    blocks = _blocks(path.read_bytes())
    assert [kind for kind, _ in blocks] == [0x0A0D0D0A, 1, 1, 6, 6]
    names = []
    for _, body in blocks[1:3]:
        linktype, _, snaplen = struct.unpack_from("<HHI", body)
        assert linktype == LINKTYPE_RAW and snaplen >= 65535
        names.append(_option(body, 8, 2))
        assert (_option(body, 8, 3) or b"").startswith(b"manycast link ")
    assert names == [b"ra-core", b"lan"]
    for (_, body), (link, at, packet) in zip(blocks[3:], packets, strict=True):
        iface, high, low, caplen, length = struct.unpack_from("<IIIII", body)
        assert iface == [n.decode() for n in names if n].index(link)
        assert (high << 32 | low) == round((1_700_000_000.0 + at) * 1e6)  # microseconds
        assert caplen == length == len(packet) and body[20 : 20 + caplen] == packet


def test_a_network_without_a_capture_sink_is_refused(tmp_path: Path) -> None:
    sink = tmp_path / "x.pcapng"
    with (
        Capture(sink, [], wall_base=0.0, realtime=True) as capture,
        pytest.raises(CaptureError, match="cannot capture"),
    ):
        attach(object(), capture)
    with pytest.raises(CaptureError, match="cannot write"):
        Capture(tmp_path / "no" / "such" / "dir.pcapng", [], wall_base=0.0, realtime=True)


def test_memory_capture_is_the_same_for_the_same_seed(tmp_path: Path) -> None:
    """Virtual timestamps (the fixed wall base plus virtual time): one seed, one file."""
    files = []
    for i in range(2):
        run = PoolRun(builtin("demo"), "memory", seed=3)
        path = tmp_path / f"run{i}.pcapng"
        links = run.topology.links.values()
        with Capture(path, links, wall_base=run.network.wall_base, realtime=False) as capture:
            attach(run.network, capture)
            run.run(1.5)
        assert capture.packets > 1000
        files.append(path.read_bytes())
    assert files[0] == files[1]
    stamps = [struct.unpack_from("<II", body, 4) for kind, body in _blocks(files[0]) if kind == 6]
    seconds = [(high << 32 | low) / 1e6 for high, low in stamps]
    assert seconds == sorted(seconds)
    assert seconds[0] >= WALL_BASE and seconds[-1] <= WALL_BASE + 1.5


# -- tshark reads what a demo wrote ---------------------------------------------------------


@pytest.mark.slow
def test_whole_demo_capture_decodes_without_a_malformed_packet(tmp_path: Path) -> None:
    """The demo's whole scenario on the memory driver (s1 to 1/5 at 5 s, s3 killed at
    10 s, s5 added at 15 s): every frame decodes; IGMPv3 reports and the routers'
    startup queries as IGMP, sessions as TCP in IP, control messages as UDP to the
    control port."""
    topology = builtin("demo")
    path = tmp_path / "demo.pcapng"
    done = demo("--driver", "memory", "--duration", "16", "--pcap", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = fields(
        path,
        "frame.interface_name",
        "frame.protocols",
        "igmp.type",
        "igmp.version",
        "udp.dstport",
        "tcp.srcport",
        "tcp.dstport",
    )
    assert len(rows) > 100_000
    malformed = [row for row in rows if "_ws.malformed" in row[1]]
    assert malformed == [], malformed[:5]
    assert {row[0] for row in rows} == set(topology.links)  # every link has traffic
    igmp = [row for row in rows if row[2]]
    assert len(igmp) > 100
    # v3 membership reports, and v3 queries (routers query as they start)
    assert {(row[2], row[3]) for row in igmp} == {("0x22", "3"), ("0x11", "3")}
    control_port = str(topology.pool.control_port)
    control = [row for row in rows if row[1].startswith("raw:ip:udp") and row[4] == control_port]
    assert len(control) > 1000
    service = str(topology.pool.port)
    sessions = [row for row in rows if row[1].startswith("raw:ip:tcp") and service in row[5:7]]
    assert len(sessions) > 50_000
    # One link alone, with Wireshark's defaults (TCP reassembly on): clean too.
    one = tmp_path / "core-rs1.pcapng"
    tshark("-r", str(path), "-Y", 'frame.interface_name == "core-rs1"', "-w", str(one))
    assert tshark("-r", str(one), "-Y", "_ws.malformed") == ""
    assert len(fields(one, "frame.number", extra=())) > 10_000


@pytest.mark.slow
@pytest.mark.parametrize(("topology", "ip"), [("vip", "ip"), ("vip6", "ipv6")])
def test_labelled_packets_decode_as_mpls(tmp_path: Path, topology: str, ip: str) -> None:
    """The VIP pool: tagged flows' packets ride label-switched trees as MPLS in UDP
    (RFC 7510, port 6635), which tshark decodes as MPLS with the IP packet inside; on
    vip6.toml, MPLS in UDP over IPv6 with its UDP checksum, which tshark finds good."""
    path = tmp_path / f"{topology}.pcapng"
    demo("--topology", topology, "--driver", "memory", "--duration", "4", "--pcap", str(path))
    checks = ("-o", "udp.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE")
    rows = fields(
        path,
        "frame.protocols",
        "udp.dstport",
        "mpls.label",
        "mpls.bottom",
        "udp.checksum.status",
        extra=(*WHOLE_CAPTURE, *checks),
    )
    assert [row for row in rows if "_ws.malformed" in row[0]] == []
    labelled = [row for row in rows if ":mpls:" in row[0]]
    assert len(labelled) > 100
    assert all(row[0].startswith(f"raw:{ip}:udp:mpls:{ip}:") for row in labelled)
    assert {row[1] for row in labelled} == {"6635"}
    assert all(int(row[2]) >= 16 and row[3] == "1" for row in labelled)  # one unreserved label
    if ip == "ipv6":  # 1: good (over IPv4 the routers send none: 3, not present)
        assert {row[4] for row in labelled} == {"1"}


@pytest.mark.slow
def test_overlay_capture_has_real_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "overlay.pcapng"
    start = time.time()
    demo("--duration", "3", "--base-port", "48800", "--pcap", str(path))
    end = time.time()
    rows = fields(path, "frame.time_epoch", "frame.interface_name", "frame.protocols")
    assert len(rows) > 1000
    stamps = [float(row[0]) for row in rows]
    assert start <= min(stamps) and max(stamps) <= end
    assert {row[1] for row in rows} <= set(builtin("demo").links)
    assert [row for row in rows if "_ws.malformed" in row[2]] == []


# -- the Lua dissector ------------------------------------------------------------------------

PRIVATE_POOL = """
[pool]
name = "vault.pool.test"
group = "232.5.5.5"
private = true
heartbeat_ms = 100
report_interval_ms = 500
index_bits = 10

[[router]]
name = "ra"
[[router]]
name = "rs"

[[link]]
between = ["ra", "rs"]
delay_ms = 1

[[server]]
name = "s1"
router = "rs"
[[server]]
name = "s2"
router = "rs"
[[server]]
name = "s3"
router = "rs"

[[clients]]
name = "a"
count = 6
router = "ra"
subnet = "10.1.0.0/24"
rate = 4.0

[[scenario]]
at = 1.0
action = "set_share"
server = "s1"
share = 0.2
"""


@pytest.mark.slow
def test_lua_dissector_names_every_control_message_type() -> None:
    """Each control message type (wire/control/envelope.py) has its name in the
    dissector's table, so a capture never shows a bare "type 23"."""
    table = re.search(r"local TYPES = \{(.*?)\n\}", LUA.read_text(), re.S)
    assert table is not None
    named = {int(n): name for n, name in re.findall(r'\[(\d+)\] = "(\w+)"', table.group(1))}
    expected = {t.value: t.name.title().replace("_", "") for t in MessageType}
    assert named == expected


# The same pool on an IPv6 network: signed MLDv2 joins.
PRIVATE_POOL6 = PRIVATE_POOL.replace('"232.5.5.5"', '"ff3e::8005:505"').replace(
    '"10.1.0.0/24"', '"2001:db8:1::/64"'
)


@pytest.mark.parametrize(
    ("text", "six"), [(PRIVATE_POOL, ""), (PRIVATE_POOL6, "6")], ids=["igmpv3", "mldv2"]
)
def test_lua_dissector_shows_mask_pairs_and_signed_joins(
    tmp_path: Path, text: str, six: str
) -> None:
    """contrib/wireshark/manycast.lua: each signed join's requester, timestamp, random
    key and signature (in IGMPv3 or MLDv2 reports, whose addresses are the fields
    ending in 6); each mask TLV's include and exclude pairs; control messages."""
    topology_file = tmp_path / "private.toml"
    topology_file.write_text(text)
    topology = loads(text, "private.toml")
    path = tmp_path / "private.pcapng"
    demo("--topology", str(topology_file), "--driver", "memory", "--duration", "2.5",
         "--pcap", str(path))  # fmt: skip
    lua = ("-X", f"lua_script:{LUA}")
    rows = fields(
        path,
        f"manycast.signed.requester{six}",
        "manycast.signed.timestamp_ms",
        "manycast.signed.random_key",
        "manycast.signed.signature",
        f"manycast.masks.group{six}",
        extra=(*lua, "-Y", "manycast"),
    )
    # Servers join with their portions; clients register as senders: both sign.
    servers = {str(topology.address(s)) for s in topology.servers}
    clients = {str(topology.address(c)) for c in topology.clients}
    assert servers <= {row[0] for row in rows} <= servers | clients
    for _, stamp, key, signature, _ in rows:
        assert WALL_BASE * 1000 <= int(stamp) <= (WALL_BASE + 3) * 1000
        assert len(bytes.fromhex(key.replace(":", ""))) > 0
        assert len(bytes.fromhex(signature.replace(":", ""))) == 64  # Ed25519
    assert str(topology.pool.group) in {row[4] for row in rows}
    text = tshark("-r", str(path), *lua, "-Y", "manycast || manycast_control", "-V")
    for shown in (
        "manycast join extensions (RFC 9279 TLVs)",
        "Group masks: record",
        "Include mask pair: ",
        "Exclude mask pair: ",  # s1 at 1/5 of a striped space: include and exclude pairs
        "Signed join: requester ",
        "Timestamp (ms since epoch): ",
        "Random key: ",
        "Signature: ",
        "manycast control: Heartbeat from s1",
        "Allocation digest: ",
        "manycast control: Commit from ",
    ):
        assert shown in text, shown
    assert "manycast extension does not decode" not in text


# -- the lab: captures from the kernel ------------------------------------------------------------


def _lab_possible() -> str | None:
    return lab_missing()


LAB_TOPOLOGY = """
[pool]
group = "232.1.1.1"
port = 7000
control_group = "239.255.77.1"
heartbeat_ms = 100
report_interval_ms = 500

[[router]]
name = "ra"
[[router]]
name = "rs"

[[link]]
between = ["ra", "rs"]

[[server]]
name = "s1"
router = "rs"
[[server]]
name = "s2"
router = "rs"

[[clients]]
name = "a"
count = 3
router = "ra"
subnet = "10.1.0.0/24"
rate = 4.0
"""


@pytest.mark.lab
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
def test_lab_capture_in_a_node_namespace(tmp_path: Path) -> None:
    """`manycast lab capture ra --seconds 4`: dumpcap inside ra's namespace writes pcapng
    with one interface per interface of ra: the servers' joins relayed from rs, and a client's
    datagram to the group."""
    from manycast.lab import Lab

    if shutil.which("dumpcap") is None:
        tshark("-v")  # skips (not root) or fails (root) saying how to install it
    lab = Lab(prefix=f"mp{os.getpid()}", run_root=tmp_path)
    env = {**os.environ, "MANYCAST_LAB_RUN_ROOT": str(tmp_path)}
    lab.down()
    try:
        topology = lab.up(LAB_TOPOLOGY, "capture-lab.toml")
        out = tmp_path / "ra.pcapng"
        capture = subprocess.Popen(
            [sys.executable, "-m", "manycast", "lab", "capture", "ra", "--prefix", lab.prefix,
             "--out", str(out), "--seconds", "4"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        # A datagram to the group every 0.25 s while dumpcap starts and runs.
        group, port = topology.pool.group, topology.pool.port
        send = (
            "import socket, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 8)\n"
            f"for _ in range(40): s.sendto(b'hello', ('{group}', {port})); time.sleep(0.25)\n"
        )
        sender = lab.popen("a1", [sys.executable, "-c", send])
        _, err = capture.communicate(timeout=60)
        sender.kill()
        sender.wait()
        assert capture.returncode == 0, err
        assert "dumpcap: ra" in err and "(pcapng)" in err
    finally:
        lab.down()
    rows = fields(out, "frame.interface_name", "frame.protocols", "ip.src", "ip.dst", extra=())
    assert {row[0] for row in rows} <= set(topology.interfaces["ra"])
    assert [row for row in rows if "_ws.malformed" in row[1]] == []
    assert any("igmp" in row[1] for row in rows)  # joins, relayed from rs
    client = str(topology.address("a1"))
    assert any(row[2] == client and row[3] == str(group) for row in rows)


@pytest.mark.parametrize("family", [4, 6])
def test_lua_dissector_reads_both_report_families(tmp_path: Path, family: int) -> None:
    """The same extensions on an IGMPv3 report and on an MLDv2 report (ICMPv6 type 143,
    16-byte addresses): every mask pair, the group and the signed join's fields, and
    nothing malformed."""
    from ipaddress import IPv4Address, IPv6Address

    from manycast.observe.pcap import PcapngWriter
    from manycast.wire.membership import (
        GroupRecord,
        IGMPv3Report,
        MaskPair,
        MLDv2Report,
        RecordType,
        SignedJoin,
        igmp_packet,
        mld_packet,
    )

    group: IPv4Address | IPv6Address
    requester: IPv4Address | IPv6Address
    if family == 4:
        group, requester = IPv4Address("232.1.1.1"), IPv4Address("10.9.0.1")
    else:
        group, requester = IPv6Address("ff3e::8000:1"), IPv6Address("2001:db8:9::1")
    record = GroupRecord(
        RecordType.CHANGE_TO_INCLUDE_MODE,
        group,
        include_masks=(MaskPair(0, 3), MaskPair(1, 3)),
        exclude_masks=(MaskPair(5, 7),),
    )
    signed = SignedJoin(1_700_000_000_123, requester, b"\x01" * 16, b"\x02" * 64, 7, 1, 3)
    if isinstance(group, IPv4Address) and isinstance(requester, IPv4Address):
        packet = igmp_packet(IGMPv3Report((record,), signed), requester).to_wire()
    else:
        assert isinstance(requester, IPv6Address)
        packet = mld_packet(MLDv2Report((record,), signed), requester).to_wire()
    path = tmp_path / f"report{family}.pcapng"
    with path.open("wb") as out:
        PcapngWriter(out, [("link", "a report")], "test").write(0, 1_700_000_000.0, packet)
    lua = ("-X", f"lua_script:{LUA}")
    text = tshark("-r", str(path), *lua, "-V")
    assert "manycast extension does not decode" not in text
    assert "Malformed" not in text and "Unknown Record Type" not in text
    show = IPv4Address if family == 4 else IPv6Address
    for shown in (
        "manycast join extensions (RFC 9279 TLVs)",
        # Wireshark's own dissector shows the record, not our TLVs as more records.
        f"{'Group Record : ' if family == 4 else 'Multicast Address Record Changed to include: '}"
        f"{group}",
        f"Group masks: record 0, group {group}, 2 include, 1 exclude",
        f"Include mask pair: {show(0)}/{show(3)}",
        f"Include mask pair: {show(1)}/{show(3)}",
        f"Exclude mask pair: {show(5)}/{show(7)}",
        f"Signed join: requester {requester}, signed 2023-11-14 22:13:20 UTC, part 1 of parts 0-2",
        "Report generation: 7",
    ):
        assert shown in text, (shown, text[-3000:])
    (info,) = fields(path, "_ws.col.Info", extra=lua)
    assert info[0].endswith("[manycast: 1 mask TLV, signed join]"), info


def test_ipv6_demo_capture_decodes_without_a_malformed_packet(tmp_path: Path) -> None:
    """demo6 (the demo's pool on an IPv6 network) for 3 s on the memory driver: every
    frame decodes; MLDv2 reports carry the servers' mask pairs (the Lua dissector
    reads them) and the routers query with MLDv2; sessions are TCP in IPv6, control
    messages UDP in IPv6 to the control port."""
    topology = builtin("demo6")
    path = tmp_path / "demo6.pcapng"
    done = demo("--topology", "demo6", "--driver", "memory", "--duration", "3", "--pcap", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    lua = ("-X", f"lua_script:{LUA}")
    rows = fields(
        path,
        "frame.protocols",
        "icmpv6.type",
        "udp.dstport",
        "tcp.dstport",
        "manycast.masks.group6",
        extra=(*WHOLE_CAPTURE, *lua),
    )
    malformed = [row for row in rows if "_ws.malformed" in row[0]]
    assert malformed == [], malformed[:5]
    assert all(row[0].startswith("raw:ipv6") for row in rows)
    assert {"143", "130"} <= {row[1] for row in rows}  # MLDv2 reports, queries
    group = str(topology.pool.group)
    assert sum(row[4] == group for row in rows) >= len(topology.servers) - 1  # masks shown
    control_port = str(topology.pool.control_port)
    assert sum(row[0].startswith("raw:ipv6:udp") and row[2] == control_port for row in rows) > 100
    service = str(topology.pool.port)
    assert sum(row[0].startswith("raw:ipv6:tcp") and row[3] == service for row in rows) > 1000
