"""The public API: lazy, coherent, and one error base for everything raised on purpose."""

from __future__ import annotations

import subprocess
import sys

import pytest

import manycast


def test_importing_the_api_loads_no_asyncio_and_no_dns_library() -> None:
    code = (
        "import sys\n"
        "from manycast import AddressSpace, equal_split, set_share\n"
        "alloc = set_share(equal_split(AddressSpace.create(), ['a', 'b']), 'a', 0.3)\n"
        "assert abs(float(alloc.share('a')) - 0.3) < 1e-3\n"
        "heavy = ('asyncio', 'dns', 'pyroute2', 'manycast.naming')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_every_exported_name_resolves() -> None:
    for name in manycast.__all__:
        assert getattr(manycast, name) is not None
    assert manycast.__version__ and manycast.__version__[0].isdigit()
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = manycast.nothing  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "family",
    [
        "WireError",
        "SpaceError",
        "PolicyError",
        "TopologyError",
        "ConfigError",
        "NamingError",
        "AuthError",
        "LabError",
        "DriverError",
    ],
)
def test_every_error_family_is_a_manycast_error(family: str) -> None:
    assert issubclass(getattr(manycast, family), manycast.ManycastError)


def test_naming_failures_are_typed() -> None:
    from manycast.naming import BadRecord, NamingError, NamingRefused, NamingTimeout

    for kind in (BadRecord, NamingRefused, NamingTimeout):
        assert issubclass(kind, NamingError)


def test_a_bad_topology_is_a_manycast_error_that_names_the_line() -> None:
    with pytest.raises(manycast.ManycastError, match=r"^<topology>:2: 'group'"):
        manycast.loads("[pool]\ngroup = 'not an address'\n")
