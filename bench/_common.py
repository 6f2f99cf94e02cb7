"""Shared bench helpers: timing on a noisy machine and the JSON result line.

Every file here imports this module first, before anything that needs the project's
packages (`import _common  # isort: skip`): run by an interpreter without them (Debian's
python3 outside the venv), a file still ends in one JSON line, with an `error` naming
the missing module, rather than in a traceback alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

# What the benches need, checked at once: some import a package only once their run
# has begun (bench/vrrp_anchor.py imports manycast as it builds its namespaces).
PROJECT_PACKAGES = ("numpy", "scipy", "manycast")
INTERPRETER_HINT = "run it with the project's interpreter: make bench, or .venv/bin/python"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """The bench's result: one JSON object, the last line on stdout."""
    print(json.dumps(result, sort_keys=True), flush=True)


class Interrupted(BaseException):
    """A signal asked the bench to stop (not an `Exception`: nothing swallows it)."""


# SIGINT too, not only Python's KeyboardInterrupt: a process started in the
# background of a non-interactive shell inherits SIGINT ignored, and would sleep on.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_and_emit(bench: str, run: Callable[[], dict[str, Any]]) -> None:
    """`run()`'s result as the last line on stdout, whatever else prints meanwhile (it
    goes to stderr). A bench that fails, is interrupted (Ctrl-C, SIGTERM or SIGHUP,
    as a timeout sends) or exits early still ends in one JSON object, with `error`,
    and exits non-zero; so does a result that carries `error` or `ok: false`."""
    began = time.monotonic()

    def stop(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in _STOP_SIGNALS}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = run()
    except (Exception, KeyboardInterrupt, Interrupted, SystemExit) as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            raise
        why = {KeyboardInterrupt: "interrupted (SIGINT)", Interrupted: f"interrupted ({exc})"}
        reason = why.get(type(exc)) or (
            str(exc.code) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        )
        if isinstance(exc, Exception):
            # The JSON line says what went wrong; where, only the traceback can.
            traceback.print_exc(file=sys.stderr)
        seconds = round(time.monotonic() - began, 1)
        emit({"bench": bench, "error": reason, "seconds": seconds})
        raise SystemExit(130 if isinstance(exc, KeyboardInterrupt | Interrupted) else 1) from exc
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    emit(result)
    if result.get("error") or result.get("ok") is False:
        raise SystemExit(1)


class ArgumentParser(argparse.ArgumentParser):
    """A bench's command line: bad arguments end the bench in its JSON line, with
    `error` saying what was wrong, and exit status 2 (argparse alone prints usage on
    stderr only). `--help` prints the help on stderr and ends in a JSON line too,
    `{"bench": ..., "help": text}`, with exit status 0."""

    def __init__(self, bench: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bench = bench

    def print_help(self, file: Any = None) -> None:
        text = self.format_help()
        sys.stderr.write(text)
        emit({"bench": self.bench, "help": text})

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        emit({"bench": self.bench, "error": f"bad arguments: {message}"})
        raise SystemExit(2)


def not_a_bench(path: str, used_by: str) -> None:
    """What a helper module says when it is run: which bench to run instead, as the
    one JSON line every file here ends with, and exit status 2."""
    name = os.path.basename(path)
    emit({"bench": None, "error": f"bench/{name} is a helper of {used_by}: run that instead"})
    raise SystemExit(2)


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per case, timing the cases in turn so that a burst of load on
    a shared machine hits all of them rather than one."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    return interleaved_medians({"run": run}, repeats)["run"]


# A file here run without the project's packages ------------------------------------


def _script_here() -> Path | None:
    """The file of bench/ run as the script (None: something else runs, such as pytest)."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if script is None or Path(script).resolve().parent != Path(__file__).resolve().parent:
        return None
    return Path(script)


def _left_an_import(tb: TracebackType | None) -> bool:
    """Whether an exception left the script from one of its import statements, rather
    than from a function the script called."""
    while tb is not None and tb.tb_frame.f_globals.get("__name__") != "__main__":
        tb = tb.tb_next
    if tb is None:
        return False
    return tb.tb_next is None or tb.tb_next.tb_frame.f_code.co_name == "<module>"


def _report_failed_import(
    kind: type[BaseException], error: BaseException, tb: TracebackType | None
) -> None:
    """The uncaught exception's traceback on stderr, as ever; for an ImportError of the
    script's imports, the JSON line as well (a bench: its name; a helper: None, as
    `not_a_bench` says). Python then exits with status 1."""
    _previous_excepthook(kind, error, tb)
    script = _script_here()
    if script is None or not isinstance(error, ImportError) or not _left_an_import(tb):
        return
    reason = f"{kind.__name__}: {error}"
    if isinstance(error, ModuleNotFoundError):
        reason += f" ({INTERPRETER_HINT})"
    emit({"bench": None if script.name.startswith("_") else script.stem, "error": reason})


_previous_excepthook = sys.excepthook
if _script_here() is not None:
    sys.excepthook = _report_failed_import
    for _package in PROJECT_PACKAGES:
        if importlib.util.find_spec(_package) is None:
            raise ModuleNotFoundError(f"No module named {_package!r}", name=_package)


if __name__ == "__main__":
    not_a_bench(__file__, "every bench here (bench/*.py without a leading _)")
