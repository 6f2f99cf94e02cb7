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
