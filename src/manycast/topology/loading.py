"""Where a topology comes from: a file, a string, or one shipped with manycast."""

from __future__ import annotations

import tomllib
from pathlib import Path

from manycast.topology.compiler import compile_topology
from manycast.topology.reader import TopologyError
from manycast.topology.spec import Topology


def load(path: str | Path) -> Topology:
    """Read, check and compile the topology file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read: {exc.strerror}") from None
    return loads(text, str(path))


def loads(text: str, source: str = "<topology>") -> Topology:
    """Check and compile topology `text`; error messages name `source` and a line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{source}: {exc}") from None
    return compile_topology(source, text, data)


def bundled() -> list[str]:
    """The names of the topologies shipped with manycast, `demo` first."""
    from importlib.resources import files

    names = sorted(
        entry.name.removesuffix(".toml")
        for entry in files("manycast").joinpath("topologies").iterdir()
        if entry.name.endswith(".toml")
    )
    return sorted(names, key=lambda name: name != "demo")


def builtin(name: str = "demo") -> Topology:
    """A topology shipped with manycast (`demo`)."""
    from importlib.resources import files

    resource = files("manycast").joinpath("topologies", f"{name}.toml")
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(f"no built-in topology named {name!r}") from None
    return loads(text, f"<built-in {name}>")
