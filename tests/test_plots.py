"""The benches' plots: each bench's `plot` draws valid PNGs from a small made-up result
(the benches themselves take minutes and are not run here), and `--plots DIR` puts
the JSON result beside them."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The benches import their helpers as top-level modules (`_common`, `_plots`).
    monkeypatch.syspath_prepend(str(BENCH))


def bench(name: str) -> ModuleType:
    return importlib.import_module(name)


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.suffix == ".png" and path.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(path)  # decodes the whole image
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # something was drawn


TECHNIQUES = ("R1", "R2", "R3", "R4")
RESULTS: dict[str, dict[str, Any]] = {
    "reallocation": {
        "bench": "reallocation",
        "clients": 1000,
        "reallocations": dict.fromkeys(TECHNIQUES, 12),
        "broken": {"R1": 240, "R2": 0, "R3": 1, "R4": 0},
        "r1_expected": 236,
        "moved_latency_p99_over_unmoved": {"R1": 1.4, "R2": 2.1, "R3": 1.1, "R4": None},
    },
    "realloc": {
        "bench": "realloc",
        "sizes": [10, 100],
        "runs": [
            {"method": m, "n": n, "change": c, "moved": 0.05 * k, "moved_over_minimum": k}
            for m, k in (("ours", 1.0), ("maglev", 1.3), ("rendezvous", 1.01))
            for n in (10, 100)
            for c in ("remove", "add", "25%->20%")
        ],
    },
    "lookup": {
        "bench": "lookup",
        "servers": 1000,
        "addresses": 10**7,
        "owners_per_s": 2.1e8,
        "gather_per_s": 2.5e8,
        "maglev_per_s": 0.9e8,
        "balance_max_over_mean": 1.0,
        "maglev_balance_max_over_mean": 1.01,
    },
    "overlay": {
        "bench": "overlay",
        "packet_bytes": 48,
        "measure_s": 2.0,
        "per_round_pps": {
            "sender": [400e3, 410e3, 405e3],
            "router": [80e3, 82e3, 79e3],
            "baseline": [120e3, 118e3, 121e3],
            "raw": [150e3, 149e3, 151e3],
        },
        "ratio_per_round": [0.67, 0.69, 0.65],
        "ratio_vs_raw_relay_per_round": [0.53, 0.55, 0.52],
    },
    "kernel": {
        "bench": "kernel",
        "manycast_pps_per_round": [300e3, 310e3],
        "unicast_pps_per_round": [320e3, 318e3],
        "manycast_offered_pps_per_round": [900e3, 905e3],
        "unicast_offered_pps_per_round": [910e3, 900e3],
    },
    "fuzz": {
        "bench": "fuzz",
        "inputs": 3000,
        "joins": 100,
        "unexpected_exceptions": 1,
        "roundtrip_violations": 0,
        "inputs_per_decoder": {"ip.IPv4Header.from_wire": 2000, "control.decode": 1000},
        "accepted_per_decoder": {"ip.IPv4Header.from_wire": 700, "control.decode": 10},
        "unexpected_exceptions_per_decoder": {"control.decode": 1},
        "roundtrip_violations_per_decoder": {},
        "joins_verified_per_s": 9000,
        "raw_verify_per_s": 10000,
    },
}


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_bench_plots_are_valid_pngs(name: str, tmp_path: Path) -> None:
    paths = bench(name).plot(RESULTS[name], tmp_path)
    assert paths, f"{name} drew nothing"
    for path in paths:
        assert path.parent == tmp_path
        assert_png(path)


def test_plots_option_writes_the_json_beside_the_plots(tmp_path: Path) -> None:
    plots = bench("_plots")
    out = tmp_path / "plots"
    written = plots.write(RESULTS["reallocation"], out, bench("reallocation").plot)
    assert json.loads((out / "reallocation.json").read_text()) == RESULTS["reallocation"]
    names = sorted(p.name for p in written)
    assert names == ["reallocation.json", "reallocation_breaks.png"]
    assert plots.write(RESULTS["reallocation"], None, bench("reallocation").plot) == []


def test_plots_of_a_saved_result(tmp_path: Path) -> None:
    """`bench/_plots.py RESULT --plots DIR`: plots of an earlier run's JSON line."""
    saved = tmp_path / "lookup.out"
    saved.write_text("some progress line\n" + json.dumps(RESULTS["lookup"]) + "\n")
    done = subprocess.run(
        [sys.executable, str(BENCH / "_plots.py"), str(saved), "--plots", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert_png(tmp_path / "p" / "lookup_rates.png")


def test_every_bench_takes_plots() -> None:
    """Each bench script accepts `--plots DIR` (vip.py and vip_lab.py add theirs)."""
    for script in sorted(BENCH.glob("[!_]*.py")):
        if script.stem in ("vip", "vip_lab"):
            continue
        text = script.read_text()
        assert "_plots.write(" in text and "def plot(" in text, script.name
        help_text = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
        )
        assert help_text.returncode == 0 and "--plots DIR" in help_text.stdout, script.name
