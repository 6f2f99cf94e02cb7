"""docs/claims.md stays true: one row per seed claim, and every module and test it names exists.

The table is read as text and the test files as syntax trees (`ast`): nothing here
imports a test module or runs a pool, so it takes well under a second. A
parametrized case (`...::test_name[R2]`) is checked to name a parametrized function;
its id is not, as that would mean importing the module.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "claims.md"
CLAIMS = range(1, 44)  # the seed's claims 1 to 43
STATUSES = ("not built", "built", "partial")  # "not built" first: it ends in "built"
# column -> how its header starts (so "Module(s)" or "Tests that show it" still match)
COLUMNS = {"claim": "claim", "modules": "module", "tests": "test", "status": "status"}

# tests/test_x.py::test_name, tests/test_x.py::Class::test_name, optionally [param id]
TEST_ID = re.compile(r"(tests/[\w/]+\.py)((?:::\w+)+)(\[[^\]]+\])?")
TOTALS = re.compile(r"^Totals: (\d+) built, (\d+) partial, (\d+) not built\.$", re.MULTILINE)


@dataclass(frozen=True)
class Row:
    line: int
    claim: str
    modules: tuple[str, ...]
    tests: tuple[str, ...]
    status: str
    reason: str

    def where(self) -> str:
        return f"docs/claims.md:{self.line} (claim {self.claim})"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _quoted(cell: str) -> tuple[str, ...]:
    return tuple(re.findall(r"`([^`]+)`", cell))


def _status(cell: str) -> tuple[str, str]:
    """("built" | "partial" | "not built" | "", what is missing)."""
    for status in STATUSES:
        if cell == status or cell.startswith(status + ":"):
            return status, cell[len(status) :].lstrip(":").strip()
    return "", cell


@functools.cache
def rows() -> tuple[Row, ...]:
    """The rows of the table whose header starts with "Claim"; columns found by name."""
    lines = TABLE.read_text(encoding="utf-8").splitlines()
    start = next(
        (i for i, line in enumerate(lines) if line.startswith("|") and _cells(line)[0] == "Claim"),
        None,
    )
    assert start is not None, "docs/claims.md has no table whose first column is 'Claim'"
    header = [cell.lower() for cell in _cells(lines[start])]
    index: dict[str, int] = {}
    for name, prefix in COLUMNS.items():
        found = [i for i, cell in enumerate(header) if cell.startswith(prefix)]
        assert len(found) == 1, f"the table needs one {name!r} column, header: {header}"
        index[name] = found[0]
    out = []
    for number, line in enumerate(lines[start + 2 :], start=start + 3):
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(header), f"docs/claims.md:{number}: {len(cells)} cells"
        status, reason = _status(cells[index["status"]])
        out.append(
            Row(
                number,
                cells[index["claim"]],
                _quoted(cells[index["modules"]]),
                _quoted(cells[index["tests"]]),
                status,
                reason,
            )
        )
    return tuple(out)


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_parametrized(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any("parametrize" in ast.unparse(decorator) for decorator in node.decorator_list)


def _find_test(test_id: str) -> str | None:
    """None if `test_id` names a test function that exists, else what is wrong."""
    match = TEST_ID.fullmatch(test_id)
    if match is None:
        return "not of the form tests/test_x.py::test_name"
    file, names, param = match.group(1), match.group(2).split("::")[1:], match.group(3)
    path = ROOT / file
    if not path.is_file():
        return f"no file {file}"
    body: list[ast.stmt] = _tree(path).body
    for name in names[:-1]:
        classes = [n for n in body if isinstance(n, ast.ClassDef) and n.name == name]
        if not classes:
            return f"no class {name} in {file}"
        body = classes[0].body
    functions = [
        n
        for n in body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == names[-1]
    ]
    if not functions or not names[-1].startswith("test"):
        return f"no test function {names[-1]} in {file}"
    if param is not None and not _is_parametrized(functions[0]):
        return f"{names[-1]} is not parametrized, yet named with {param}"
    return None


# -- the checks ----------------------------------------------------------------------------


def test_every_claim_has_exactly_one_row() -> None:
    counts = Counter(row.claim for row in rows())
    expected = {str(n) for n in CLAIMS}
    assert [c for c in counts if c not in expected] == [], "rows for claims the seed lacks"
    assert [c for c in expected if c not in counts] == [], "claims without a row"
    assert {c: k for c, k in counts.items() if k > 1} == {}, "claims with more than one row"
    assert [row.claim for row in rows()] == [str(n) for n in CLAIMS], "rows out of order"


def test_every_status_is_known_and_says_what_is_missing() -> None:
    unknown = [row.where() for row in rows() if not row.status]
    assert unknown == [], f"status must start with one of {STATUSES}"
    unexplained = [row.where() for row in rows() if row.status != "built" and not row.reason]
    assert unexplained == [], "partial and not built rows say what is missing ('partial: ...')"


def test_every_module_named_exists() -> None:
    missing = [
        f"{row.where()}: {module}"
        for row in rows()
        for module in row.modules
        if not module.startswith("src/manycast/") or not (ROOT / module).exists()
    ]
    assert missing == []


def test_every_test_named_exists() -> None:
    wrong = [
        f"{row.where()}: {test_id}: {problem}"
        for row in rows()
        for test_id in row.tests
        if (problem := _find_test(test_id)) is not None
    ]
    assert wrong == []


def test_a_built_claim_names_its_modules_and_a_test() -> None:
    bare = [row.where() for row in rows() if row.status == "built" and not row.tests]
    assert bare == [], "a built claim names at least one test that shows it"
    unplaced = [row.where() for row in rows() if row.status == "built" and not row.modules]
    assert unplaced == [], "a built claim names the modules that implement it"


def test_the_totals_line_matches_the_rows() -> None:
    match = TOTALS.search(TABLE.read_text(encoding="utf-8"))
    assert match is not None, "docs/claims.md needs 'Totals: N built, N partial, N not built.'"
    counts = Counter(row.status for row in rows())
    actual = (counts["built"], counts["partial"], counts["not built"])
    assert tuple(int(n) for n in match.groups()) == actual, (
        f"write 'Totals: {actual[0]} built, {actual[1]} partial, {actual[2]} not built.'"
    )


@pytest.mark.parametrize(
    ("test_id", "problem"),
    [
        ("tests/test_claims_table.py::test_every_test_named_exists", None),
        ("tests/test_claims_table.py::no_such_test", "no test function"),
        ("tests/test_no_such_file.py::test_x", "no file"),
        ("tests/test_claims_table.py::test_every_test_named_exists[x]", "not parametrized"),
        ("tests/test_claims_table.py::_tree", "no test function"),
        ("tests/test_claims_table.py::Nope::test_x", "no class"),
        ("tests/test_claims_table.py", "not of the form"),
    ],
)
def test_the_checker_finds_what_is_wrong(test_id: str, problem: str | None) -> None:
    found = _find_test(test_id)
    assert (found is None) if problem is None else (found is not None and problem in found)
