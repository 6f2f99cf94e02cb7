"""Every file under bench/ ends what it prints with one JSON object on stdout: a
bench its result (or, when it fails, is interrupted or exits early, an `error`),
a helper module the bench to run instead; and any file, run by an interpreter without
the project's packages, an `error` naming the missing module."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# _plots.py has a command line of its own: it re-plots a saved result.
HELPERS = sorted(p for p in BENCH.glob("_*.py") if p.name != "_plots.py")
EVERY_FILE = sorted(BENCH.glob("*.py"))
# An interpreter without the project's packages: the stdlib alone (-S: no site-packages,
# -s: no user site, -E: no PYTHONPATH). Not -I: that also leaves the script's own
# directory off sys.path, where every file here finds its helpers.
BARE = [sys.executable, "-E", "-s", "-S"]
PROJECT_PACKAGES = ("numpy", "manycast")

# A bench reduced to its ending: `run_and_emit` around a run chosen by argv[1].
TOY = """
import sys, time
sys.path.insert(0, {bench!r})
from _common import run_and_emit

def run():
    how = sys.argv[1]
    if how == "sleep":
        print("started", flush=True)  # goes to stderr: stdout holds only the result
        time.sleep(30)
    if how == "exit":
        raise SystemExit("the relay did not answer")
    if how == "raise":
        raise ValueError("bad figure")
    return {{"bench": "toy", "ok": how != "not_ok", "value": 1}}

run_and_emit("toy", run)
"""


def last_json(stdout: str) -> dict[str, object]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    return result


@pytest.mark.parametrize("helper", HELPERS, ids=[p.name for p in HELPERS])
def test_a_helper_module_run_alone_names_the_bench_to_run(helper: Path) -> None:
    done = subprocess.run([sys.executable, str(helper)], capture_output=True, text=True, timeout=60)
    result = last_json(done.stdout)
    assert done.returncode == 2
    assert result["bench"] is None and "run that instead" in str(result["error"])


def toy(tmp_path: Path) -> Path:
    script = tmp_path / "toy.py"
    script.write_text(TOY.format(bench=str(BENCH)))
    return script


@pytest.mark.parametrize(
    ("how", "code", "error"),
    [
        ("fine", 0, None),
        ("not_ok", 1, None),
        ("exit", 1, "the relay did not answer"),
        ("raise", 1, "ValueError: bad figure"),
    ],
)
def test_a_bench_ends_in_one_json_object_however_it_ends(
    tmp_path: Path, how: str, code: int, error: str | None
) -> None:
    done = subprocess.run(
        [sys.executable, str(toy(tmp_path)), how], capture_output=True, text=True, timeout=60
    )
    result = last_json(done.stdout)
    assert done.returncode == code
    assert result.get("error") == error
    assert result["bench"] == "toy"
    # where an error was raised is on stderr; a bench that exits with a reason has none
    assert ('raise ValueError("bad figure")' in done.stderr) is (how == "raise")
    assert ("Traceback" in done.stderr) is (how == "raise")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_an_interrupted_bench_still_ends_in_one_json_object(
    tmp_path: Path, signum: signal.Signals
) -> None:
    process = subprocess.Popen(
        [sys.executable, str(toy(tmp_path)), "sleep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    assert process.stderr.readline().strip() == "started"
    time.sleep(0.1)
    process.send_signal(signum)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 130
    result = last_json(stdout)
    assert set(result) == {"bench", "error", "seconds"}
    assert result["bench"] == "toy" and result["error"] == f"interrupted ({signum.name})"
    assert isinstance(result["seconds"], float) and result["seconds"] < 30
    assert stdout.count("\n") == 1  # nothing else on stdout


def test_the_bare_interpreter_lacks_the_project_packages() -> None:
    for package in PROJECT_PACKAGES:
        done = subprocess.run(
            [*BARE, "-c", f"import {package}"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1
        assert f"ModuleNotFoundError: No module named {package!r}" in done.stderr


@pytest.mark.parametrize("path", EVERY_FILE, ids=[p.name for p in EVERY_FILE])
def test_every_file_run_without_the_project_packages_ends_in_one_json_object(path: Path) -> None:
    done = subprocess.run([*BARE, str(path)], capture_output=True, text=True, timeout=60)
    result = last_json(done.stdout)
    assert done.returncode == 1
    assert done.stdout.count("\n") == 1  # nothing else on stdout
    assert result["bench"] == (None if path.name.startswith("_") else path.stem)
    missing = "|".join(PROJECT_PACKAGES)
    hint = "run it with the project's interpreter: make bench, or .venv/bin/python"
    assert re.fullmatch(
        rf"ModuleNotFoundError: No module named '({missing})' \({re.escape(hint)}\)",
        str(result["error"]),
    ), result["error"]


@pytest.mark.parametrize("case", ["seeds", "plots"])
def test_a_bench_given_bad_arguments_says_so_in_its_json_line(case: str, tmp_path: Path) -> None:
    """A bad argument ends in the JSON line before the bench runs: a plots directory
    that cannot be made (here a file stands in its way) was found only after the
    run, and its error took the run's result with it."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    options, expected = {
        "seeds": (["--seeds", "1,x"], "seeds are integers"),
        "plots": (["--steps", "25", "--seeds", "1", "--plots", str(blocked / "d")], "--plots"),
    }[case]
    done = subprocess.run(
        [sys.executable, str(BENCH / "fragmentation.py"), *options],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "fragmentation"
    assert expected in result["error"], result


def test_a_benchs_help_ends_in_one_json_object() -> None:
    """`--help` of a bench on the shared parser: the text on stderr, and one JSON
    line last on stdout that carries it, exit status 0."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "fragmentation.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "fragmentation"
    assert "--steps" in result["help"] and "--steps" in done.stderr
