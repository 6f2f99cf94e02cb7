"""PNG plots of bench results: the `--plots DIR` option and the drawing helpers every bench shares.

A bench given `--plots DIR` writes its JSON result there too (`<bench>.json`, the
same object as its last stdout line) and its plots beside it, drawn by the bench's
own `plot(result, directory)` from that result alone. matplotlib (the `bench`
extra) is imported only when plotting, on the Agg backend (no display needed).

Plots of an earlier run, from its saved JSON line, without running the bench again:

    python bench/_plots.py result.json --plots DIR
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# One colour per series, the same in every plot of every bench.
COLOURS = ("#2f6fde", "#e0662b", "#1d9a5b", "#a23fc4", "#c9a100", "#0f9fb5", "#d33a7a")
DPI = 110


def _plots_directory(text: str) -> Path:
    """`--plots DIR`, made now if it is not there: a directory that cannot be written
    is a bad argument, told before the bench runs, not an error after it that takes
    its result with it."""
    directory = Path(text)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot make {text!r}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {text!r}")
    return directory


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plots",
        type=_plots_directory,
        metavar="DIR",
        help="write the JSON result and PNG plots of it in DIR (needs matplotlib)",
    )


def arguments(doc: str | None) -> argparse.Namespace:
    """The options of a bench that has no others: `--plots DIR`."""
    parser = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0] if doc else None
    )
    add_argument(parser)
    return parser.parse_args()


def write(
    result: Mapping[str, Any],
    directory: Path | None,
    plot: Callable[[Mapping[str, Any], Path], list[Path]],
) -> list[Path]:
    """With `--plots DIR`: the result as `<bench>.json` and the bench's plots in DIR."""
    if directory is None:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    name = str(result.get("bench", "result"))
    written = directory / f"{name}.json"
    written.write_text(json.dumps(result, sort_keys=True) + "\n")
    paths = [written, *plot(result, directory)]
    for path in paths:
        print(f"wrote {path}", file=sys.stderr, flush=True)
    return paths


# -- drawing -----------------------------------------------------------------------------
def figure(title: str, *, width: float = 7.0, height: float = 4.2) -> tuple[Figure, Axes]:
    """A figure with one set of axes. Built without pyplot: no global state, and
    the Agg canvas draws it whatever backend the machine defaults to."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    return fig, ax


def grid(
    title: str, columns: int, *, width: float = 11.0, height: float = 4.0
) -> tuple[Figure, list[Axes]]:
    """A figure with `columns` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(1, columns, squeeze=False)[0])
    fig.suptitle(title, fontsize=11)
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    return fig, axes


def save(fig: Figure, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    fig.savefig(path, format="png")
    return path


def bars(
    ax: Axes,
    values: Mapping[str, float | None],
    *,
    ylabel: str,
    fmt: str = "{:g}",
    colours: Sequence[str] = COLOURS,
) -> None:
    """One labelled bar per key (None: an empty slot marked n/a)."""
    labels = list(values)
    heights = [0.0 if v is None else float(v) for v in values.values()]
    drawn = ax.bar(labels, heights, color=[colours[i % len(colours)] for i in range(len(labels))])
    ax.bar_label(
        drawn, labels=["n/a" if v is None else fmt.format(v) for v in values.values()], fontsize=9
    )
    ax.set_ylabel(ylabel)


def grouped_bars(
    ax: Axes,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    log: bool = False,
) -> None:
    """Bars of several series side by side for each group."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name, color=COLOURS[i % len(COLOURS)])
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def cdf(ax: Axes, series: Mapping[str, Iterable[float | None]], *, xlabel: str) -> None:
    """Empirical CDFs, one step line per series; runs that never finished (None) keep
    the line below 1."""
    for i, (name, raw) in enumerate(series.items()):
        values = list(raw)
        done = sorted(float(v) for v in values if v is not None and math.isfinite(v))
        if not values:
            continue
        ys = [(k + 1) / len(values) for k in range(len(done))]
        ax.step([0.0, *done], [0.0, *ys], where="post", label=name, color=COLOURS[i % len(COLOURS)])
        ax.plot(done, ys, "o", markersize=3, color=COLOURS[i % len(COLOURS)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of runs")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def per_round(ax: Axes, series: Mapping[str, Sequence[float]], *, ylabel: str) -> None:
    """One line per series over the bench's rounds (1, 2, ...)."""
    from matplotlib.ticker import MaxNLocator  # matplotlib is optional: only with --plots

    for i, (name, values) in enumerate(series.items()):
        ax.plot(
            range(1, len(values) + 1),
            values,
            "o-",
            label=name,
            color=COLOURS[i % len(COLOURS)],
        )
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.legend(fontsize=8)


def reference(ax: Axes, y: float, label: str, *, colour: str = "#666666") -> None:
    """A dashed horizontal line: a target or a baseline figure."""
    ax.axhline(y, linestyle="--", linewidth=1, color=colour, label=label)


def vertical(ax: Axes, x: float, label: str, *, colour: str = "#666666") -> None:
    ax.axvline(x, linestyle="--", linewidth=1, color=colour, label=label)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Plots of a bench's saved JSON result (its last stdout line)."
    )
    parser.add_argument("result", type=Path, help="a file whose last line is a bench's JSON")
    add_argument(parser)
    args = parser.parse_args()
    if args.plots is None:
        parser.error("--plots DIR is required")
    lines = [line for line in args.result.read_text().splitlines() if line.strip()]
    if not lines:
        parser.error(f"{args.result} is empty")
    result = json.loads(lines[-1])
    bench = result.get("bench")
    if not isinstance(bench, str):
        parser.error(f"{args.result}: its last line has no 'bench' key")
    sys.path.insert(0, str(Path(__file__).parent))
    plot = getattr(importlib.import_module(bench), "plot", None)
    if plot is None:
        parser.error(f"bench/{bench}.py has no plot(result, directory) yet")
    write(result, args.plots, plot)


if __name__ == "__main__":
    main()
