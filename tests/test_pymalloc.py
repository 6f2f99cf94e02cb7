"""pymalloc's arenas read inside a process (`bench/_pymalloc.py`): what the soak
samples to tell arenas kept by a few long-lived objects from a heap that grows."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def pymalloc(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("_pymalloc")


REPORT = """Small block threshold = 512, in 32 size classes.

# arenas allocated total           =                   40
# arenas reclaimed                 =                   10
# arenas highwater mark            =                   31
# arenas allocated current         =                   30
30 arenas * 1048576 bytes/arena     =           31,457,280

# bytes in allocated blocks        =            5,242,880
# bytes in available blocks        =              341,584
"""


def test_the_report_gives_arenas_held_and_blocks_in_use(pymalloc: ModuleType) -> None:
    assert pymalloc.parse(REPORT) == (30.0, 5.0)


@pytest.mark.parametrize("text", ["", "garbage\n# arenas allocated current = x", REPORT[:200]])
def test_a_report_without_both_figures_gives_none(pymalloc: ModuleType, text: str) -> None:
    assert pymalloc.parse(text) is None


# In an interpreter of its own: in the test run's process, the arenas earlier tests
# emptied would take the new objects without growing.
FRAGMENTED = """
import json, os, _pymalloc
before = _pymalloc.arenas()
objects = [str(i) * 5 for i in range(400_000)]
grown = _pymalloc.arenas()
survivors = objects[::60]
del objects
freed = _pymalloc.arenas()
os.fstat(2)  # still open
print(json.dumps([before, grown, freed, len(survivors)]))
"""


def test_fragmented_arenas_are_held_while_their_blocks_are_freed() -> None:
    """Many small objects, then all but one in sixty freed: the blocks in use fall to
    a fraction, the arenas stay held (each keeps a survivor). Descriptor 2 is back."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENTED], cwd=BENCH, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    before, grown, freed, survivors = json.loads(out.stdout.strip().splitlines()[-1])
    assert before[0] >= before[1] > 0
    assert grown[0] >= before[0] + 10 and grown[1] >= before[1] + 10
    assert freed[1] <= grown[1] - 10  # most blocks given back...
    assert freed[0] >= grown[0] - 2  # ...and the arenas kept
    assert survivors > 0


def test_another_allocator_gives_none() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import _pymalloc; print(_pymalloc.arenas())"],
        cwd=BENCH,
        env={**os.environ, "PYTHONMALLOC": "malloc"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "None"
