"""The benches' own machinery, where a wrong figure would not show by itself: part 2 of
bench/realloc.py (the C Maglev fill and the incremental rendezvous give what a rebuild
gives; the operations are seeded; the quality run reports what it says it does), the
committed-reallocations check and counting window of bench/reallocation.py, and what
bench/fuzz.py counts as unexpected."""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from manycast.protocol.technique import Technique

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The benches import their helpers as top-level modules (`_common`, `_plots`).
    monkeypatch.syspath_prepend(str(BENCH))


def bench(name: str) -> ModuleType:
    return importlib.import_module(name)


# -- bench/realloc.py, part 2 ----------------------------------------------------------------


def test_c_maglev_fill_gives_the_reference_tables() -> None:
    realloc, baselines = bench("realloc"), bench("_baselines")
    fill = realloc.compiled_fill()
    if fill is None:
        pytest.skip("no C compiler: the bench falls back to the Python reference itself")
    rng = random.Random(7)
    cases: list[tuple[int, int, list[int] | None]] = [
        (1, 7, None),
        (3, 13, None),
        (3, 13, [5, 0, 2]),  # a backend of weight 0 gets nothing
        (10, 1009, None),
        (10, 1009, [rng.randrange(1, 1 << 30) for _ in range(10)]),
        (50, 1009, [1 if i % 7 else 1 << 30 for i in range(50)]),  # very uneven weights
        (200, 20011, [rng.randrange(1, 4) for _ in range(200)]),
    ]
    for n, size, weights in cases:
        names = [f"b{i:03d}" for i in range(n)]
        built = realloc.MaglevBuilder(size, fill)(names, weights)
        assert np.array_equal(built, baselines.maglev_table(names, weights, size)), (n, size)
    with pytest.raises(ValueError):
        realloc.MaglevBuilder(13, fill)(["a", "b"], [0, 0])


def test_incremental_rendezvous_equals_a_rebuild_after_every_change() -> None:
    realloc = bench("realloc")
    state = realloc.IncrementalRendezvous(bits=10)
    rng = random.Random(3)
    for i in range(12):
        state.set(f"s{i:04d}", 1.0)
    assert np.array_equal(state.owner, state.rebuilt())
    next_id = 12
    for _ in range(40):
        names = sorted(state.weight)
        roll = rng.random()
        if roll < 0.2 and len(names) > 3:
            state.remove(rng.choice(names))
        elif roll < 0.4:
            state.set(f"s{next_id:04d}", rng.uniform(0.2, 3.0))
            next_id += 1
        else:  # a weight up or down
            name = rng.choice(names)
            state.set(name, state.weight[name] * rng.choice((0.3, 0.9, 1.1, 4.0)))
        assert np.array_equal(state.owner, state.rebuilt())


def test_operations_are_seeded_and_reach_the_shares_they_name() -> None:
    realloc = bench("realloc")
    first = list(realloc.operations(10, 300, 5))
    assert first == list(realloc.operations(10, 300, 5))
    assert [op for op, _ in first] != [op for op, _ in realloc.operations(10, 300, 6)]
    assert {op.kind for op, _ in first} == set(realloc.KINDS)
    live = 10
    for op, capacity in first:
        total = sum(capacity.values())
        if op.kind == "set_share":
            assert capacity[op.server] / total == pytest.approx(op.share)
        elif op.kind == "add":
            assert capacity[op.server] / total == pytest.approx(1 / (live + 1))
        elif op.kind == "remove":
            assert op.server not in capacity
        else:
            assert len(op.changed) >= 2
        live = len(capacity)
        assert 5 <= live <= 20


def test_quality_run_reports_every_method_on_the_same_operations() -> None:
    realloc = bench("realloc")
    from manycast.space import AddressSpace

    q = realloc.quality(10, 30, 11, AddressSpace.create(), realloc.compiled_fill())
    methods = q["methods"]
    assert list(methods) == ["ours", "maglev_65537", "maglev_100n", "rendezvous"]
    assert q["maglev_sizes"] == {"maglev_65537": 65537, "maglev_100n": 1009}
    assert [m["keeps_history"] for m in methods.values()] == [True, False, False, False]
    assert sum(q["operations_by_kind"].values()) == 30
    assert q["rendezvous_checked_against_rebuild"]
    # Ours moves exactly what its own outcome needs on set, add and remove (the
    # policy's promise); every method moves at least that.
    for kind, ratio in methods["ours"]["moved_over_minimal_by_kind"].items():
        if kind != "rebalance" and ratio is not None:
            assert ratio == 1.0, kind
    for m in methods.values():
        assert m["moved_over_minimal"] is None or m["moved_over_minimal"] >= 1.0
        assert m["share_error_worst_cells"] >= m["share_error_final_cells"]
        assert m["within_one_cell"] == (m["share_error_worst_cells"] <= 1 + 1e-9)
    assert methods["maglev_100n"]["cells"] == 1009


def test_tracker_counts_moves_against_the_least_and_errors_in_cells() -> None:
    realloc = bench("realloc")
    op = realloc.Op("set_share", "s0000", 0.5)
    tracker = realloc.Tracker(8, 3, np.array([4, 4, 0]))
    owners = np.array([0, 0, 0, 0, 0, 1, 1, 1])  # server 0 took one cell from server 1
    desired = np.array([0.5, 0.5, 0.0])
    tracker.record(0, op, 3, owners, desired, np.array([0, 1]), 0.001)
    assert (tracker.moved, tracker.minimal) == (3, 1)  # 2 cells more than needed
    assert tracker.final == (pytest.approx(0.25), pytest.approx(1.0))
    assert tracker.worst_cells_after == {"set_share": pytest.approx(1.0)}


def test_realloc_plot_draws_the_quality_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    realloc = bench("realloc")
    runs = [
        {"method": m, "n": 10, "change": c, "moved": 0.1, "moved_over_minimum": 1.0}
        for m in ("ours", "maglev", "rendezvous")
        for c in ("remove", "add")
    ]
    method = {"share_error_worst_cells": 2.0, "moved_over_minimal": 1.2}
    result: dict[str, Any] = {
        "sizes": [10],
        "runs": runs,
        "quality": {"10": {"operations": 1000, "methods": {"ours": method, "maglev": method}}},
    }
    names = sorted(p.name for p in realloc.plot(result, tmp_path))
    assert "realloc_quality.png" in names
    assert (tmp_path / "realloc_quality.png").read_bytes()[:4] == b"\x89PNG"


# -- bench/reallocation.py -----------------------------------------------------------------


def test_reallocation_fails_when_a_technique_committed_too_few() -> None:
    reallocation = bench("reallocation")
    assert reallocation.committed_error({"R1": 52, "R2": 47}, 52) is None  # 47 >= 46.8
    error = reallocation.committed_error({"R1": 52, "R2": 46, "R3": 0}, 52)
    assert error is not None and "R2 46" in error and "R3 0" in error and "R1" not in error


def test_reallocation_window_outlasts_the_clients_deadline_and_pacing() -> None:
    reallocation = bench("reallocation")
    from manycast.protocol.client import Client

    defaults = Client.__init__.__kwdefaults__
    assert defaults is not None
    assert defaults["request_timeout"] == reallocation.REQUEST_TIMEOUT
    assert reallocation.TAIL >= reallocation.REQUEST_TIMEOUT + 1.5 / reallocation.RATE


def test_reallocation_runs_only_techniques_each_family_takes() -> None:
    """Each technique the bench runs builds its pool on that family: a refused one
    would end a 7-minute run in an error after the last IPv6 technique."""
    reallocation = bench("reallocation")
    from manycast.topology import loads

    for family, techniques in ((4, reallocation.TECHNIQUES), (6, reallocation.TECHNIQUES6)):
        for technique in techniques:
            text = reallocation.two_router_pool(
                family=family,
                technique=str(technique),
                clients_per_lan=2,
                rate=reallocation.RATE,
                duration=5.0,
                steps=[],
            )
            assert loads(text).pool.technique == technique
    assert set(reallocation.TECHNIQUES6) == set(Technique)  # IPv6 pools run every technique


# -- bench/fuzz.py -----------------------------------------------------------------------------


def test_fuzz_counts_every_kind_of_breach_as_unexpected() -> None:
    fuzz = bench("fuzz")
    clean, broken = fuzz.Stats(), fuzz.Stats()
    broken.unexpected = 2
    broken.violations = {"roundtrip": 3, "fast_path": 4, "import_then_run": 5}
    results = {"a": clean, "b": broken, "c": fuzz.Stats()}
    errors = {"c": {"kind": "crash"}}
    kinds = fuzz.unexpected_by_kind(results, errors)
    assert kinds == {
        "exception": 2,
        "roundtrip": 3,
        "fast_path": 4,
        "import_then_run": 5,
        "atheris_child": 1,
    }
    assert fuzz.unexpected_per_decoder(results, errors) == {"b": 14, "c": 1}


def test_fuzz_names_what_ended_an_atheris_child() -> None:
    kind = bench("fuzz").atheris_error_kind
    assert kind(-6, "", ["/tmp/x/crash-0123"]) == "crash"
    assert kind(70, "", ["/tmp/x/timeout-ab"]) == "timeout"
    assert kind(71, "", ["/tmp/x/oom-ab"]) == "out_of_memory"
    assert kind(None, "", []) == "timeout"  # ran past the parent's limit
    assert kind(1, "==1== ERROR: libFuzzer: out-of-memory (used: 2100Mb)", []) == "out_of_memory"
    assert kind(1, "=== Uncaught Python exception: ===", []) == "uncaught_exception"
    assert kind(-11, "", []) == "crash"
    assert kind(1, "ModuleNotFoundError: No module named 'atheris'", []) == "no_result"


def test_an_atheris_child_without_a_result_is_an_error() -> None:
    fuzz = bench("fuzz")
    if fuzz.atheris_available():
        pytest.skip("atheris is installed: its child would run")
    target = next(t for t in fuzz.targets() if t.name == "label.LabelEntry.from_wire")
    found, error = fuzz.run_atheris(target, [(0, b"\x00\x01\x01\x40")], 0.1, 1)
    assert found is None and error is not None
    assert error["kind"] == "no_result" and "atheris" in error["report"]
