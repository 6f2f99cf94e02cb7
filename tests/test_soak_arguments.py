"""`bench/soak.py`'s arguments: what each variant runs when not told otherwise."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def parse(monkeypatch: pytest.MonkeyPatch, *options: str) -> Any:
    monkeypatch.syspath_prepend(str(BENCH))
    import soak

    monkeypatch.setattr(sys, "argv", ["soak.py", *options])
    return soak.parse_arguments()


def test_the_overlay_soak_draws_every_public_kind_with_capped_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = parse(monkeypatch)
    assert not args.lab
    assert {"delay_spike", "flood", "vip_router_kill", "router_restart"} <= set(args.kinds)
    assert (args.rto_max_ms, args.max_retries, args.thin_stream) == (200, 15, False)
    assert args.abandon_after_ms == 10_000  # a failed request keeps its connection
    plain = parse(monkeypatch, "--rto-max-ms", "60000", "--max-retries", "5")
    assert (plain.rto_max_ms, plain.max_retries) == (60000, 5)
    impatient = parse(monkeypatch, "--abandon-after-ms", "2000")
    assert impatient.abandon_after_ms == 2000


def test_the_lab_soak_takes_the_lab_kinds_and_no_client_transport(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(monkeypatch, "--lab")
    assert "delay_spike" not in args.kinds and "router_restart" in args.kinds
    assert args.rto_max_ms is None and args.abandon_after_ms is None  # the prober: UDP
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--lab", "--rto-max-ms", "200")
    assert "rto_max_ms: for the overlay's TCP clients" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--lab", "--abandon-after-ms", "5000")
    assert "abandon_after_ms: for the overlay's TCP clients" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--rto-max-ms", "20")
    assert "--rto-max-ms must be in 50..120000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--abandon-after-ms", "1000")
    assert "--abandon-after-ms must be in 2000..600000" in capsys.readouterr().err


def test_a_heap_probe_takes_its_start_and_refuses_what_cannot_be_probed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import soak

    default = parse(monkeypatch, "--census-heap", "--minutes", "30")
    assert soak.heap_probe(default, 1800.0) == ("owner", soak.HEAP_FROM_S)
    short = parse(monkeypatch, "--trace-heap", "--minutes", "2")
    assert soak.heap_probe(short, 120.0) == ("line", 60.0)  # half the run
    early = parse(monkeypatch, "--census-heap", "--heap-from", "45", "--minutes", "12")
    assert soak.heap_probe(early, 720.0) == ("owner", 45.0)
    assert soak.heap_probe(parse(monkeypatch), 1800.0) is None
    for options, says in [
        (("--trace-heap", "--census-heap"), "not allowed with argument"),
        (("--heap-from", "60"), "--heap-from: with --trace-heap or --census-heap"),
        (("--census-heap", "--heap-from", "120", "--minutes", "2"), "must be within the run"),
        (("--census-heap", "--heap-from", "-1"), "must be within the run"),
        (("--lab", "--census-heap"), "for the overlay's pool processes"),
    ]:
        with pytest.raises(SystemExit):
            parse(monkeypatch, *options)
        assert says in capsys.readouterr().err, options


def test_a_probed_run_says_how_long_each_first_count_stopped_its_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seed 20261201, D, 12 minutes, a census from 30 s: 233 sessions of the clients
    of s3 (killed at 27 s, back at 29.5 s) were lost 7 to 9 s after the count, just
    past the kill's window, and the run did not say its count had stopped every
    pool process at 30 s (the same run without a census loses none)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import soak
    from _pool import HeapProbe

    results = {
        "clients": {
            "heap_traced_from": 30.0,
            "heap_paused_s": 2.4,
            "heap_growth_total": [61.2, 700],
            "heap_growth_by_owner": [["DestinationGuard.last", 53.8, 626]],
        },
        "infra": None,  # a process that sent nothing
    }
    counted = soak._traced(results, HeapProbe("owner", 30.0))
    assert counted["heap_growth_by_owner"] == {
        "clients": {
            "from_s": 30.0,
            "paused_s": 2.4,
            "total": [61.2, 700],
            "owners": [["DestinationGuard.last", 53.8, 626]],
        }
    }
    assert "paused_s" in counted["heap_counted"] and "heap_traced" not in counted
    assert soak._traced(results, None) == {}
