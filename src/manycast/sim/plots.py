"""The report's plots, as PNG files: share error, load spread, sessions broken and
control traffic over simulated time, with the scenario's steps marked.

matplotlib is optional (the `bench` extra); without it `write_plots` raises
PlotsUnavailable, and the report is still written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manycast.errors import ManycastError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COLOURS = ("#2f6fde", "#e0662b", "#1d9a5b", "#a23fc4")
DPI = 110


class PlotsUnavailable(ManycastError):
    """matplotlib is not installed."""


def _figure(title: str) -> tuple[Figure, Axes]:
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable(
            "plots need matplotlib: pip install 'manycast[bench]' (or matplotlib)"
        ) from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("simulated time (s)")
    return fig, ax


def _steps(ax: Axes, scenario: Sequence[Mapping[str, Any]]) -> None:
    """A dotted line at each instant the scenario acts, named once."""
    seen: set[float] = set()
    for step in scenario:
        at = float(step["at"])
        if at in seen:
            continue
        seen.add(at)
        ax.axvline(at, linestyle=":", linewidth=1, color="#666666")
        ax.annotate(
            str(step["what"]).split(" ")[0],
            (at, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            va="top",
            ha="right",
        )


def _save(fig: Figure, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    fig.savefig(path, format="png")
    return path


def write_plots(report: Mapping[str, Any], directory: Path) -> list[Path]:
    """Four PNG files in `directory`, from the report alone."""
    series = report["series"]
    t = series["t"]
    scenario = report["scenario"]
    paths = []

    fig, ax = _figure("Share error and unserved addresses")
    ax.plot(t, series["share_error_buckets"], color=COLOURS[0], label="largest share error")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(1.0, linestyle="--", linewidth=1, color="#999999", label="one bucket")
    ax.set_ylabel("buckets")
    twin = ax.twinx()
    unserved = [100 * u for u in series["unserved"]]
    twin.plot(t, unserved, color=COLOURS[1], label="addresses unserved")
    twin.plot(t, [100 * u for u in series["served_twice"]], color=COLOURS[3], label="served twice")
    twin.set_ylabel("% of addresses")
    twin.set_ylim(bottom=0)
    _steps(ax, scenario)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    paths.append(_save(fig, directory, "share_error"))

    fig, ax = _figure("Load spread over the serving servers")
    ax.plot(t, series["load_max_over_mean"], color=COLOURS[0], label="busiest / mean")
    ax.set_ylabel("requests/s, busiest over mean")
    ax.set_ylim(bottom=0)
    _steps(ax, scenario)
    ax.legend(fontsize=8)
    paths.append(_save(fig, directory, "load_spread"))

    fig, ax = _figure("Sample sessions broken (cumulative)")
    ax.step(t, series["sessions_broken"], where="post", color=COLOURS[1], label="sessions broken")
    ax.set_ylabel("sessions")
    ax.set_ylim(bottom=0)
    _steps(ax, scenario)
    ax.legend(fontsize=8)
    paths.append(_save(fig, directory, "sessions_broken"))

    fig, ax = _figure("Control traffic per live server")
    ax.plot(t, series["control_per_server_per_s"], color=COLOURS[0], label="control datagrams")
    ax.plot(t, series["reports_per_server_per_s"], color=COLOURS[2], label="membership reports")
    ax.set_ylabel("per server per second")
    ax.set_ylim(bottom=0)
    _steps(ax, scenario)
    ax.legend(fontsize=8)
    paths.append(_save(fig, directory, "control_traffic"))
    return paths
