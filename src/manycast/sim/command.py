"""What `manycast sim` does around `simulate`: find the pool (a topology file or a
preset), run it, and write the report, its summary and the plots."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from manycast.protocol.poolstate import PoolSettings
from manycast.sim.generate import topology_text
from manycast.sim.plots import PlotsUnavailable, write_plots
from manycast.sim.presets import DEFAULT_MEMBERSHIP, preset
from manycast.sim.report import build_report, summary_text
from manycast.sim.run import SimSettings, simulate
from manycast.topology import Topology, load, loads


def default_membership() -> str | None:
    """`swim` when the pool has that setting (`[pool] membership`); else None: the
    pool's own default (heartbeats to every server)."""
    names = {f.name for f in dataclasses.fields(PoolSettings)}
    return DEFAULT_MEMBERSHIP if "membership" in names else None


def resolve(
    target: str,
    *,
    membership: str | None = None,
    duration: float | None = None,
    addresses: int | None = None,
    seed: int | None = None,
    sample_every: float | None = None,
    wall_limit_s: float | None = None,
) -> tuple[str, Topology, SimSettings]:
    """The pool named by `target`: a topology file when one exists there, else a preset
    (ConfigError naming the presets when it is neither). Options override the preset's
    settings; a file runs for its `[run] duration`."""
    path = Path(target)
    if path.is_file():
        topology = load(path)
        settings = SimSettings(duration=topology.duration)
        name = path.stem
    else:
        chosen = preset(target, membership, default_membership())
        topology = loads(topology_text(chosen.shape), f"<preset {chosen.name}>")
        settings = chosen.settings
        name = chosen.name
    changes: dict[str, Any] = {
        key: value
        for key, value in (
            ("duration", duration),
            ("addresses", addresses),
            ("seed", seed),
            ("sample_every", sample_every),
            ("wall_limit_s", wall_limit_s),
        )
        if value is not None
    }
    return name, topology, dataclasses.replace(settings, **changes)


def run_and_write(
    name: str,
    topology: Topology,
    settings: SimSettings,
    out: Path,
    progress: Callable[[str], None] | None = None,
    plots: bool = True,
) -> tuple[dict[str, Any], list[Path], str | None]:
    """Simulate, then write `report.json`, `summary.txt` and the plots in `out`. Returns
    the report, the files written and why the plots are missing (None: drawn)."""
    result = simulate(topology, settings, progress)
    report = build_report(result, name)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "summary.txt"]
    written[0].write_text(json.dumps(report, sort_keys=True) + "\n")
    written[1].write_text(summary_text(report) + "\n")
    missing: str | None = None
    if plots:
        try:
            written += write_plots(report, out)
        except PlotsUnavailable as exc:
            missing = str(exc)
    else:
        missing = "--no-plots"
    return report, written, missing
