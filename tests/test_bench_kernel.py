"""bench/kernel.py's arithmetic and frames, without the lab: the headline ratio is the ratio
of the medians (the median of per-round ratios beside it), the limit is read from the
router's drops, and the generator's frames are the datagrams they claim to be."""

from __future__ import annotations

import ipaddress
import statistics
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture()
def kernel(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # the benches import `_common`, `_plots`
    import kernel as module

    return module


def interval(pps: float, dropped: float) -> dict[str, Any]:
    return {
        "delivered_pps": pps,
        "delivered_by_server": {"s1": pps / 4},
        "offered_pps": pps + dropped,
        "dropped_pps": dropped,
        "router_in_pps": pps,
        "generator_cpu_share": 0.9,
        "router_cpu_busy_share": 1.0,
        "router_thread_cpu_share": 0.95,
        "router_thread_ns_per_packet": 1e9 / pps,
        "daemon_cpu_share": 0.0,
    }


def test_ratio_of_medians_and_median_of_round_ratios(kernel: ModuleType) -> None:
    manycast = [100.0, 300.0, 200.0]
    nftables = [50.0, 400.0, 250.0]
    per_kind = {k: [interval(v, 10.0) for v in (200.0, 200.0, 200.0)] for k in kernel.KINDS}
    per_kind["manycast"] = [interval(v, 10.0) for v in manycast]
    per_kind["nftables"] = [interval(v, 10.0) for v in nftables]
    per_kind["unicast"] = [interval(v, 0.0) for v in (400.0, 400.0, 400.0)]
    per_kind["manycast_portions"] = [interval(v, 10.0) for v in (300.0, 200.0, 500.0)]
    first = {"delivered_us": [10.0, 20.0, 30.0], "install_us": [5.0], "upcalls": 3, "sent": 3}
    firsts = {"manycast": first, "manycast_portions": {**first, "upcalls": 0}, "nftables": first}
    result = kernel.summarize(per_kind, [], {"manycast": {"1": 1, "2": 1}}, firsts, {})
    assert result["ratio_vs_nftables"] == round(200.0 / 250.0, 3)  # 0.8
    rounds = [m / n for m, n in zip(manycast, nftables, strict=True)]  # 2.0, 0.75, 0.8
    assert result["ratio_vs_nftables_per_round_median"] == round(statistics.median(rounds), 3)
    assert result["ratio_vs_nftables_per_round"] == [round(r, 3) for r in rounds]
    assert result["manycast_pps"] == 200 and result["nftables_pps"] == 250
    # No drops at the router: the generators, not the router, were the limit.
    assert result["limit"]["limited_by"]["unicast"] == "generators"
    assert result["limit"]["limited_by"]["manycast"] == "router"
    assert result["first_packet_delivered_us"]["manycast"]["p50"] == 20.0
    assert result["first_packet_delivered_us"]["manycast_portions"]["upcalls"] == 0
    # The portion plane over nftables and over the MFC, by the same two measures.
    assert result["portions_ratio_vs_nftables"] == round(300.0 / 250.0, 3)
    portions = [300.0, 200.0, 500.0]
    per_round = [p / n for p, n in zip(portions, nftables, strict=True)]  # 6.0, 0.5, 2.0
    assert result["portions_ratio_vs_nftables_per_round_median"] == round(2.0, 3)
    assert result["portions_ratio_vs_nftables_per_round"] == [round(r, 3) for r in per_round]
    assert result["portions_vs_mfc"] == round(300.0 / 200.0, 3)


def test_frames_are_the_datagrams_they_claim(kernel: ModuleType) -> None:
    from manycast.wire.ip import IPv4Packet

    src = int(ipaddress.IPv4Address("10.1.1.7"))
    frame = kernel.udp_frame(src, "232.1.1.1", bytes(6), bytes(range(6)))
    assert frame[12:14] == b"\x08\x00" and len(frame) == 14 + 20 + 8 + 64
    packet = IPv4Packet.from_wire(frame[14:])  # strict: checksums and lengths must hold
    assert packet.header.src == ipaddress.IPv4Address("10.1.1.7")
    assert packet.header.dst == ipaddress.IPv4Address("232.1.1.1")
    assert frame[14 + 22 : 14 + 24] == (7000).to_bytes(2, "big")  # UDP destination port


def test_ipv6_frames_are_the_datagrams_they_claim(kernel: ModuleType) -> None:
    """An IPv6 frame: Ethernet type 0x86DD, hop limit 8, and a UDP checksum a receiver
    accepts (mandatory in IPv6); the group's frames go to its RFC 2464 MAC address."""
    from _kernel_setup import FAMILIES
    from manycast.wire.ip import IPPROTO_UDP, IPv6Packet, UDPDatagram

    six = FAMILIES[6]
    source = ipaddress.IPv6Address("2001:db8:1::103")
    mac = six.group_mac("ff3e::8000:1")
    assert mac == bytes.fromhex("333380000001")
    frame = kernel.udp_frame(int(source), "ff3e::8000:1", mac, bytes(range(6)))
    assert frame[:6] == mac and frame[12:14] == b"\x86\xdd"
    assert len(frame) == 14 + 40 + 8 + 64
    packet = IPv6Packet.from_wire(frame[14:])  # strict: the payload length must hold
    assert packet.header.src == source
    assert packet.header.dst == ipaddress.IPv6Address("ff3e::8000:1")
    assert packet.header.hop_limit == 8 and packet.protocol == IPPROTO_UDP
    datagram = UDPDatagram.from_wire(packet.payload, source, packet.header.dst)  # checksum
    assert (datagram.src_port, datagram.dst_port, datagram.payload) == (40000, 7000, b"x" * 64)


class _Lab:
    """The router's membership as its daemon reports it, for `KernelBench.read_owners`."""

    def __init__(self, group: str, members: dict[str, str]) -> None:
        self.reply = {"membership": {group: members}}

    def ask(self, node: str, role: str, request: dict[str, Any]) -> dict[str, Any]:
        return self.reply


def test_ipv6_sources_low_bits_pick_the_owner(kernel: ModuleType, tmp_path: Path) -> None:
    """The IPv6 clients' sources lie in their LAN's /64, and the low two bits of each
    pick its server under the servers' value/mask joins, a quarter each, as in IPv4."""
    from _kernel_setup import FAMILIES, SERVERS, SOURCES_PER_HOST, KernelBench
    from manycast.topology import loads

    six = FAMILIES[6]
    topology = loads(six.topology, "bench-kernel")
    group = str(topology.pool.group)
    members = {
        str(topology.address(s)): f"2001:db8::{v}/ffff:ffff::3" for v, s in enumerate(SERVERS)
    }
    bench = KernelBench(_Lab(group, members), topology, tmp_path, six)
    counts = bench.read_owners()
    assert counts == {s: 2 * SOURCES_PER_HOST // 4 for s in SERVERS}
    lan = ipaddress.IPv6Network("2001:db8:1::/64")
    for source in bench.sources("c1")[:8]:
        assert ipaddress.IPv6Address(source) in lan
        assert bench.owner[source] == SERVERS[source & 3]


def test_ipv6_summary_and_its_ratios_to_ipv4(kernel: ModuleType) -> None:
    """The IPv6 run has no multicast-routes kind (its reason is in the JSON instead);
    its ratios are computed as IPv4's, and `ipv6_over_ipv4` sets each headline figure
    beside IPv4's."""
    from _kernel_setup import FAMILIES

    first = {"delivered_us": [10.0, 20.0, 30.0], "install_us": [5.0], "upcalls": 3, "sent": 3}
    firsts = {"manycast": first, "manycast_portions": {**first, "upcalls": 0}, "nftables": first}

    def summary(kinds: tuple[str, ...], scale: float, install_us: float) -> dict[str, Any]:
        per_kind = {k: [interval(v * scale, 10.0) for v in (200.0, 200.0, 200.0)] for k in kinds}
        per_kind["manycast"] = [interval(v * scale, 10.0) for v in (100.0, 300.0, 200.0)]
        per_kind["nftables"] = [interval(v * scale, 10.0) for v in (50.0, 400.0, 250.0)]
        got = {**firsts, "manycast": {**first, "install_us": [install_us]}}
        return dict(kernel.summarize(per_kind, [], {}, got, {}))

    four = summary(FAMILIES[4].kinds, 1.0, 100.0)
    six = summary(FAMILIES[6].kinds, 0.96, 80.0)
    assert "manycast_mcast_routes" in FAMILIES[6].not_measured
    assert "manycast_mcast_routes_pps" not in six and "mcast_routes_ratio_vs_nftables" not in six
    assert six["ratio_vs_nftables"] == round(192.0 / 240.0, 3) == four["ratio_vs_nftables"]
    assert six["ratio_vs_nftables_per_round"] == four["ratio_vs_nftables_per_round"]
    assert six["manycast_pps"] == 192
    versus = kernel.ipv6_over_ipv4(four, six)
    assert versus["manycast_pps"] == 0.96 and versus["nftables_pps"] == 0.96
    assert versus["manycast_portions_pps"] == 0.96 and versus["unicast_pps"] == 0.96
    # A time: IPv4's over IPv6's, so that above 1 is IPv6 faster, as for packets/s.
    assert versus["first_packet_install_us_p50_ipv4_over_ipv6"] == 1.25
    assert versus["goal"] == 0.9


def test_per_round_ratios_of_the_families(kernel: ModuleType) -> None:
    """Rounds interleave the families: beside the ratio of medians, `ipv6_over_ipv4`
    gives the median of each round's IPv6 figure over the same round's IPv4 one, and
    for the install time (IPv4 over IPv6) the median over the blocks' p50s."""
    first = {"delivered_us": [10.0], "install_us": [5.0], "upcalls": 1, "sent": 1}

    def summary(pps: list[float], blocks: list[list[float]]) -> dict[str, Any]:
        per_kind = {k: [interval(v, 10.0) for v in pps] for k in kernel.KINDS}
        installs = [x for block in blocks for x in block]
        manycast = {
            **first,
            "install_us": installs,
            "install_us_blocks": blocks,
            "install_us_unpreempted": [x for x in installs if x < 45.0],
        }
        firsts = {"manycast": manycast, "manycast_portions": first, "nftables": first}
        return dict(kernel.summarize(per_kind, [], {}, firsts, {}))

    four = summary([100.0, 200.0, 300.0], [[30.0, 32.0, 34.0], [40.0, 40.0, 40.0]])
    six = summary([90.0, 220.0, 240.0], [[30.0, 40.0, 50.0], [50.0, 50.0, 50.0]])
    assert four["first_packet_install_us"]["p50_per_round"] == [32.0, 40.0]
    versus = kernel.ipv6_over_ipv4(four, six)
    assert versus["manycast_pps"] == round(220.0 / 200.0, 3)  # the medians
    assert versus["manycast_pps_per_round_median"] == 0.9  # of 0.9, 1.1, 0.8
    assert versus["first_packet_install_us_p50_ipv4_over_ipv6_per_round"] == [0.8, 0.8]
    assert versus["first_packet_install_us_p50_ipv4_over_ipv6_per_round_median"] == 0.8
    # Over all samples: p50 of 30-40 (IPv4) over p50 of 30-50 (IPv6).
    assert versus["first_packet_install_us_p50_ipv4_over_ipv6"] == round(40.0 / 50.0, 3)
    # Without the samples another process held up (here: those of 45 us and more).
    assert six["first_packet_install_us"]["samples_unpreempted"] == 2
    assert six["first_packet_install_us"]["p99_unpreempted"] == 40.0
    assert versus["first_packet_install_us_p99_unpreempted_ipv4_over_ipv6"] == 1.0


class _Run:
    """A family's run that records when each step ran, and may fail at one."""

    def __init__(self, version: int, log: list[tuple[str, int]], fail_at: str = "") -> None:
        self.version, self.log, self.fail_at = version, log, fail_at
        self.name, self.downs = f"IPv{version}", 0

    def round(self, number: int) -> None:
        if self.fail_at == "round":
            raise RuntimeError("no route")
        self.log.append(("round", self.version))

    def down(self) -> None:
        self.downs += 1


def test_families_take_turns_in_a_shuffled_order(kernel: ModuleType) -> None:
    """Each round runs every family once, in an order shuffled per round (recorded), so
    that neither is always measured second; an IPv6 failure is recorded, its lab taken
    down, and IPv4 carries on; an IPv4 failure ends the run."""
    import random

    from _kernel_runs import Runs

    log: list[tuple[str, int]] = []
    runs = Runs({4: _Run(4, log), 6: _Run(6, log)}, random.Random(3))
    for number in range(12):
        runs.each("round", number, orders=runs.round_orders)
    assert len(log) == 24 and all(sorted(o) == [4, 6] for o in runs.round_orders)
    assert [v for _, v in log] == [v for order in runs.round_orders for v in order]
    firsts = [order[0] for order in runs.round_orders]
    assert 4 in firsts and 6 in firsts

    log.clear()
    failing = _Run(6, log, fail_at="round")
    runs = Runs({4: _Run(4, log), 6: failing}, random.Random(3))
    runs.each("round", 1)
    runs.each("round", 2)
    assert runs.errors == {6: "RuntimeError: no route"} and failing.downs == 1
    assert log == [("round", 4), ("round", 4)]

    runs = Runs({4: _Run(4, [], fail_at="round"), 6: _Run(6, [])}, random.Random(3))
    with pytest.raises(RuntimeError, match="no route"):
        for number in range(4):
            runs.each("round", number)
