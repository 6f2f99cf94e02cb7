"""`manycast lab run tcp_move(_manycast)`: `move` and `drain` steps move live TCP connections.

The bundled tcp_move.toml runs the movable TCP service beside the VIP pool's own,
a paced download from every client, and moves the servers' live connections
step after step, then drains one server before it leaves; tcp_move_manycast.toml
changes a manycast pool's allocation with its connections (two drains and a
set_share with move = true), the clients' connections going to their new owners
(a manycast pool refuses a plain move step: a client's server is its owner).
tcp_move6.toml and tcp_move_manycast6.toml are the same on IPv6, and each test of
a bundled scenario runs on both families; tcp_move_manycast_dual.toml runs the
manycast scenario on a dual-stack pool, each connection moved within its own
family. The run's summary
counts the connections moved and broken and the pause each moved connection
saw. The lab run needs root (namespaces, TCP_REPAIR, iptables' NFQUEUE) and
skips elsewhere, saying why; the step's reading and its refusal outside the lab
are checked everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from labcheck import lab_missing
from manycast.scenario import ScenarioEngine, ScenarioError
from manycast.steps import Drain, Move, Rebalance, SetShare
from manycast.topology import TopologyError, loads

NEEDS_ROOT = "moving kernel TCP connections in a lab run needs root (namespaces, TCP_REPAIR)"
TOOLS = ("nft", "iptables")
NEEDS_TOOLS = "the TCP moves need nft and iptables (NFQUEUE): make lab-deps"
TCP_MOVE = files("manycast").joinpath("topologies", "tcp_move.toml").read_text()
TCP_MOVE_MANYCAST = files("manycast").joinpath("topologies", "tcp_move_manycast.toml").read_text()
FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]
# tcp_move.toml's IPv6 form is tcp_move6.toml; tcp_move_manycast's dual-stack form
# is tcp_move_manycast_dual.toml.
SUFFIX: dict[int | str, str] = {4: "", 6: "6", "dual": "_dual"}


def bundled(name: str, family: int | str) -> str:
    """The bundled topology `name` of `family` (its name, for `manycast lab run`)."""
    return name + SUFFIX[family]


def bundled_text(name: str, family: int | str) -> str:
    return files("manycast").joinpath("topologies", f"{bundled(name, family)}.toml").read_text()


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return NEEDS_ROOT
    missing = lab_missing()  # the kernel's multicast routing, which every lab router needs
    if missing is not None:
        return missing
    if not all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in TOOLS):
        return NEEDS_TOOLS
    return None


# -- everywhere ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_bundled_scenario_moves_and_drains(family: int) -> None:
    topology = loads(bundled_text("tcp_move", family), "tcp_move.toml")
    assert topology.pool.vip is not None and topology.pool.vip.version == family
    moves = [s for s in topology.scenario if isinstance(s, Move)]
    assert len(moves) >= 10 and {m.server for m in moves} == {"s1", "s2", "s3", "s4"}
    assert any(m.to for m in moves) and any(not m.to for m in moves)
    assert [s.server for s in topology.scenario if isinstance(s, Drain)] == ["s2"]
    assert moves[0].describe() == "move server=s1 to= count=0"
    assert topology.tcp_moves  # a move step runs the TCP connections
    manycast = loads(bundled_text("tcp_move_manycast", family), "tcp_move_manycast.toml")
    assert manycast.pool.vip is None and manycast.tcp_moves  # [run] tcp_moves = true
    assert manycast.pool.space.family == family
    assert [s.server for s in manycast.scenario if isinstance(s, Drain)] == ["s2", "s4"]
    [reshare] = [s for s in manycast.scenario if isinstance(s, SetShare)]
    assert reshare.move and reshare.describe() == "set_share server=s3 share=1/2 move=True"
    demo = files("manycast").joinpath("topologies", "demo.toml").read_text()
    assert not loads(demo, "demo.toml").tcp_moves


def test_the_dual_stack_scenario_is_the_manycast_one_with_clients_of_both_families() -> None:
    single = loads(TCP_MOVE_MANYCAST, "tcp_move_manycast.toml")
    dual = loads(bundled_text("tcp_move_manycast", "dual"), "tcp_move_manycast_dual.toml")
    assert dual.pool.dual and dual.pool.vip is None and dual.tcp_moves
    assert [s.describe() for s in dual.scenario] == [s.describe() for s in single.scenario]
    versions = [dual.address(name).version for name in sorted(dual.clients)]
    assert versions.count(4) == versions.count(6) == 4
    # An IPv6 client shares its IPv4 twin's portion, hence its owner and its moves.
    assert all(
        int(dual.address(f"six-{name}")) & 0xFFFF == int(dual.address(name)) & 0xFFFF
        for name in single.clients
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('server = "s1"\nto = "s1"', "from s1 to another server"),
        ('server = "s1"\nto = "s9"', "no server named 's9'"),
        ('server = "s9"', "no server named 's9'"),
        ('server = "s1"\ncount = 1.5', "must be a whole number"),
    ],
)
def test_a_bad_move_step_is_refused_with_its_line(table: str, message: str) -> None:
    text = TCP_MOVE.replace("[run]", f'[[scenario]]\nat = 1.0\naction = "move"\n{table}\n\n[run]')
    with pytest.raises(TopologyError, match=message) as caught:
        loads(text, "bad.toml")
    assert "bad.toml:" in str(caught.value)


MANYCAST_MOVE_REFUSED = "use a 'set_share' (or 'rebalance') step with move = true, or 'drain'"


def _with_step(text: str, table: str) -> str:
    return text.replace("[run]", f"[[scenario]]\nat = 1.0\n{table}\n\n[run]")


def test_a_plain_move_on_a_manycast_pool_is_refused_when_read() -> None:
    """In a manycast pool a client's server is its portion's owner: a move step, which
    would leave clients at servers that are not their owners, is refused with its
    line and what to write instead; the VIP pool keeps it."""
    text = _with_step(TCP_MOVE_MANYCAST, 'action = "move"\nserver = "s1"\nto = "s3"')
    with pytest.raises(TopologyError, match=re.escape(MANYCAST_MOVE_REFUSED)) as caught:
        loads(text, "manycast_move.toml")
    message = str(caught.value)
    line = text.splitlines().index('action = "move"') + 1
    assert message.startswith(f"manycast_move.toml:{line}: a 'move' step is for a VIP pool")
    vip = loads(_with_step(TCP_MOVE, 'action = "move"\nserver = "s1"'), "vip.toml")
    assert any(isinstance(s, Move) and s.at == 1.0 for s in vip.scenario)


def test_move_true_reads_on_a_manycast_pool_and_is_refused_on_a_vip_pool() -> None:
    manycast = loads(
        _with_step(TCP_MOVE_MANYCAST, 'action = "rebalance"\ntarget = 1.2\nmove = true'), "m.toml"
    )
    [rebalance] = [s for s in manycast.scenario if isinstance(s, Rebalance)]
    assert rebalance.move and rebalance.describe() == "rebalance target=1.2 move=True"
    plain = loads(_with_step(TCP_MOVE_MANYCAST, 'action = "rebalance"'), "m.toml")
    [rebalance] = [s for s in plain.scenario if isinstance(s, Rebalance)]
    assert not rebalance.move and rebalance.describe() == "rebalance target=1.1"
    # A move = true alone makes the lab run the TCP connections.
    demo = files("manycast").joinpath("topologies", "demo.toml").read_text()
    reshare = 'action = "set_share"\nserver = "s1"\nshare = 0.5\nmove = true'
    assert loads(_with_step(demo, reshare), "demo.toml").tcp_moves
    with pytest.raises(TopologyError, match="a VIP pool's flows keep their server"):
        loads(_with_step(TCP_MOVE, reshare), "vip.toml")
    with pytest.raises(TopologyError, match="'move' must be true or false, not str"):
        loads(_with_step(demo, reshare.replace("true", '"yes"')), "demo.toml")


def test_move_true_outside_the_lab_is_refused_clearly() -> None:
    """The memory driver and the overlay have no kernel TCP connections to move."""
    with pytest.raises(ScenarioError, match="kernel lab"):
        ScenarioEngine(loads(TCP_MOVE_MANYCAST, "m.toml"), pool=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_move_outside_the_lab_is_refused_clearly(family: int) -> None:
    """The memory driver and the overlay have no kernel TCP connections to move."""
    topology = loads(bundled_text("tcp_move", family), "tcp_move.toml")
    with pytest.raises(ScenarioError, match="kernel lab"):
        ScenarioEngine(topology, pool=None)  # type: ignore[arg-type]
    path = files("manycast").joinpath("topologies", f"{bundled('tcp_move', family)}.toml")
    result = subprocess.run(
        [sys.executable, "-m", "manycast", "run", str(path), "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and "manycast lab run" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- the lab ---------------------------------------------------------------------------
def _lab_run(tmp_path: Path, topology: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """`manycast lab run <topology> --json` as a user runs it: the summary, its
    `kernel.tcp` and the progress lines, once the run exited 0."""
    prefix = f"lt{os.getpid() % 100000}"
    env = {**os.environ, "MANYCAST_LAB_RUN_ROOT": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "manycast", "lab", "run", topology, "--prefix", prefix, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    tcp = summary["kernel"]["tcp"]
    assert result.returncode == 0, (tcp, summary["kernel"], result.stderr[-3000:])
    return summary, tcp, result.stderr


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
@pytest.mark.parametrize("family", FAMILIES)
def test_lab_run_moves_live_connections_and_reports_their_pauses(
    tmp_path: Path, family: int
) -> None:
    """`manycast lab run tcp_move` (tcp_move6 on IPv6): every move step's connections
    move, none breaks (every byte of every download checked), the pauses are in the
    summary, and the pool's own clients are served throughout."""
    summary, tcp, progress = _lab_run(tmp_path, bundled("tcp_move", family))
    assert tcp["connections"] == 4 and tcp["steps"] == 13  # 12 moves and the drain
    assert tcp["moved"] > 0 and tcp["refused"] == {}, tcp
    assert tcp["broken"] == 0, tcp["broken_reasons"]
    # 8 MiB/s for the run's 18 s, less start-up: most of it arrives and is checked.
    assert tcp["bytes_verified"] > 4 * (8 << 20) * 8, tcp
    pause = tcp["pause_ms"]
    assert pause["count"] == tcp["moved"]  # every moved download saw its move
    assert 0 < pause["p50"] <= pause["p99"] <= pause["max"]
    # No lost packet: a restored socket's first retransmission waits 1 s.
    assert pause["max"] < 1000, pause
    hold = tcp["edge_hold_ms"]
    assert hold["count"] == tcp["moved"] and 0 < hold["p50"] <= hold["max"]
    # The pool's own clients were served; the drain (disruptive: s2's share goes) is
    # among the summary's events, with its recovery.
    assert summary["clients_served_at_end"] == summary["clients"] == 4
    assert [e["what"] for e in summary["events"]] == ["drain server=s2 grace=2.0"]
    # The progress line shows the moves as they happen, with the pauses so far.
    shown = re.findall(r"tcp moved (\d+) broken (\d+) pause ms p50 \S+ p99 \S+ max \S+", progress)
    assert shown and int(shown[-1][0]) > 0 and shown[-1][1] == "0", progress[-2000:]
    print(f"moved {tcp['moved']}, pause {pause}, edge hold {hold}")


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
@pytest.mark.parametrize(
    ("family", "families"),
    [
        pytest.param(4, ["ipv4"], id="ipv4"),
        pytest.param(6, ["ipv6"], id="ipv6"),
        pytest.param("dual", ["ipv4", "ipv6"], id="dual"),
    ],
)
def test_lab_run_drains_a_manycast_pool_with_its_connections(
    tmp_path: Path, family: int | str, families: list[str]
) -> None:
    """`manycast lab run tcp_move_manycast` (tcp_move_manycast6 on IPv6,
    tcp_move_manycast_dual on a dual-stack pool): at each change of the allocation (a
    drain of s2, s3's share to 1/2 with move = true, a drain of s4) the clients
    whose portions change owner go to their new owners with their live TCP
    connections (the routers' entries pinned, then steered, then handed back to the
    allocation): none breaks, and every client is answered by its owner at the end
    (the run's exit status says so too), its download held by its owner. On the
    dual-stack pool each LAN has an IPv4 and an IPv6 twin sharing a portion: the
    IPv4 and the IPv6 downloads move alike, each in its own family, every byte of
    both checked."""
    summary, tcp, progress = _lab_run(tmp_path, bundled("tcp_move_manycast", family))
    assert tcp["connections"] == 4 * len(families) and tcp["steps"] == 3
    assert tcp["refused"] == {} and tcp["broken"] == 0, (tcp["refused"], tcp["broken_reasons"])
    assert sorted(tcp["families"]) == families
    for name, counts in tcp["families"].items():
        assert counts["connections"] == 4 and counts["broken"] == 0, (name, counts)
        # 8 MiB/s per download for most of the run's 15 s, every byte checked.
        assert counts["bytes_verified"] > 4 * (8 << 20) * 6, (name, counts)
    # An IPv6 client shares its IPv4 twin's portion: their downloads move together.
    assert len({counts["moved"] for counts in tcp["families"].values()}) == 1, tcp["families"]
    # Every live connection ended at its client's owner, whichever moves it took.
    assert tcp["connections_not_at_owner"] == [], tcp
    # When the pool starts on its configured allocation (the first second's answers
    # from s2 and s4 alone: a1 and b1 are s2's, a2 and b2 s4's), the drain of s2 moves
    # a1 and b1 of each family; the set_share and the second drain move more as the
    # allocation decides (6 of each family in an unhurried run). On a loaded machine
    # a member may miss its first heartbeats and be counted dead while the pool
    # starts, which lays the portions out anew.
    first = re.search(r"answers ((?:s\d=\d+ ?)+)", progress)
    answers = first.group(1).strip() if first is not None else ""
    if set(re.findall(r"(s\d)=", answers)) == {"s2", "s4"}:
        assert all(c["moved"] >= 2 for c in tcp["families"].values()), tcp["families"]
    else:
        print(f"not the configured start (first answers: {answers}): moved {tcp['moved']}")
    pause = tcp["pause_ms"]
    assert pause["count"] == tcp["moved"] and (pause["max"] or 0) < 1000, pause
    assert summary["kernel"]["clients_not_at_owner"] == []
    assert summary["clients_served_at_end"] == summary["clients"] == 4 * len(families)
    drained = {"s2", "s4"}
    assert not drained & set(summary["kernel"]["clients_by_server"])
    assert [e["what"] for e in summary["events"]] == [
        "drain server=s2 grace=2.0",
        "set_share server=s3 share=1/2 move=True",
        "drain server=s4 grace=2.0",
    ]
    print(f"moved {tcp['moved']} ({tcp['families']}), pause {tcp['pause_ms']}")
