"""A removal undone at once makes the heartbeat membership doubt itself
(`protocol/falsealarm.py`; docs/soak.md, finding 11).

The soak (seed 20261201, 1000 clients, the overlay) saw a coordinator, after a router
restart, remove members of its own process for a silence that was its own queued
input, re-add them as soon as their heartbeats were read, and do it again a dozen
times in ten seconds, each change moving clients and breaking sessions. Here a
member's messages to the others are lost for 0.4 s at a time (a silence longer than
the 0.3 s timeout, as a backlog would make it), on the memory driver's virtual clock.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from manycast.pool import build
from manycast.protocol import coordination, falsealarm
from manycast.protocol.falsealarm import FalseAlarms
from manycast.runtime import PoolRun
from pooltools import Trace, assert_one_allocation, pool_toml, run_to, start

SILENCE = 0.4  # longer than the timeout (3 missed heartbeats of 100 ms)


def silenced(windows: list[float]) -> Callable[[str, str, object, float], bool]:
    """Lose what s2 sends to the others in [at, at + SILENCE) for each `at`: they stop
    hearing it while it hears them (a listener's backlog, not a partition)."""

    def rule(receiver: str, sender: str, message: object, now: float) -> bool:
        return sender == "s2" and receiver != "s2" and any(a <= now < a + SILENCE for a in windows)

    return rule


def pool(windows: list[float], until: float) -> tuple[PoolRun, Trace]:
    run, trace = start(pool_toml(duration=until), seed=1)
    trace.drop(silenced(windows))
    run_to(run, until)
    return run, trace


def removals(run: PoolRun, name: str) -> list[float]:
    changes = run.nodes.servers["s1"].coordinator.changes
    return [round(at, 2) for at, _, why in changes if why == f"commit remove {name}"]


def test_a_second_silence_soon_after_a_false_removal_removes_no_one() -> None:
    run, _ = pool([2.0, 3.0], 5.0)
    # The first silence removes s2, which is heard again at once; the second, as long,
    # finds the coordinator judging by a doubled timeout.
    assert len(removals(run, "s2")) == 1
    alarms = run.nodes.servers["s1"].coordinator.false_alarms
    assert alarms.false_removals == 1
    assert "s2" in assert_one_allocation(run).servers


def test_without_the_doubt_every_silence_removes_the_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same run with false removals not counted: what the soak saw."""
    monkeypatch.setattr(falsealarm, "REHEARD", 0)
    run, _ = pool([2.0, 3.0], 5.0)
    assert len(removals(run, "s2")) == 2


def test_the_doubt_wears_off_and_a_death_is_still_found() -> None:
    """Ten timeouts (3 s) after the false removal the timeout is back to 0.3 s: the
    same silence at 6.0 s removes s2 again; a real death just after a false removal
    is found within the doubled timeout."""
    run, _ = pool([2.0, 6.0], 7.5)
    assert len(removals(run, "s2")) == 2
    run, _ = pool([2.0], 3.0)
    run.network.kill("s3")
    killed = run.now
    run_to(run, killed + 1.0)
    [removed] = removals(run, "s3")
    assert removed - killed <= 2 * 0.3 + 0.25  # the doubled timeout, then the commit


def test_the_score_arithmetic() -> None:
    alarms = FalseAlarms(0.3)
    assert alarms.timeout(0.0) == pytest.approx(0.3)
    alarms.removed(["s2"], 1.0)
    alarms.heard("s2", 1.5, 7)  # heard again 0.5 s after its removal: a false removal
    assert alarms.timeout(1.5) == pytest.approx(0.6)
    alarms.removed(["s3"], 2.0)
    alarms.heard("s3", 6.0, 7)  # back after 4 s: a restart, not a false removal
    assert alarms.false_removals == 1
    assert not alarms.remembering
    assert alarms.timeout(4.4) == pytest.approx(0.6)
    assert alarms.timeout(4.5) == pytest.approx(0.3)  # 10 timeouts after the raise


def test_a_member_back_at_its_starting_state_restarted() -> None:
    alarms = FalseAlarms(2.0)
    alarms.removed(["s3"], 1.0)
    alarms.heard("s3", 3.5, 1)  # within 3 timeouts, but at epoch 1: a new process
    assert alarms.false_removals == 0 and not alarms.remembering
    assert alarms.timeout(3.5) == pytest.approx(2.0)


def restarted_twice(misses: int) -> PoolRun:
    """s3 killed at 2.0 and at 9.0 s, each time a fresh s3 (as a new process would
    start: the configured allocation, epoch 1) 3 s later."""
    run, _ = start(pool_toml(duration=14.0, pool={"heartbeat_misses": misses}), seed=1)
    for killed in (2.0, 9.0):
        run_to(run, killed)
        run.network.kill("s3")
        run_to(run, killed + 3.0)
        fresh = build(run.topology, seed=1, wall_base=run.network.wall_base, only={"s3"})
        run.nodes.servers["s3"] = fresh.servers["s3"]
        run.network.add(fresh.servers["s3"])
    run_to(run, 14.0)
    return run


def test_a_server_restarted_soon_after_its_removal_was_dead_all_the_same() -> None:
    """The soak with a 2 s timeout (20 missed heartbeats; docs/soak.md, finding 15,
    seed 20261201): a killed server's process was up again 2-5 s after the kill,
    within `REHEARD` timeouts of its removal, so every kill counted as a false
    removal and stretched the timeout, until a second kill went unseen (s3 killed at
    114.1 s and back at 118.8 s, never removed, its clients unanswered). Now a
    server back at epoch 1 is a restart: both kills are found in one timeout."""
    run = restarted_twice(20)
    alarms = run.nodes.servers["s1"].coordinator.false_alarms
    assert alarms.false_removals == 0
    found = removals(run, "s3")
    assert len(found) == 2, found
    for killed, removed in zip((2.0, 9.0), found, strict=True):
        assert removed - killed <= 2.0 + 0.35, found  # one timeout, then the commit


# -- hearing none of the others (coordination.ALONE_DOUBT) -----------------------------


def deaf(start_at: float, seconds: float) -> Callable[[str, str, object, float], bool]:
    """Lose everything sent to s1 in [start_at, start_at + seconds): s1 (the
    coordinator) hears no one, while everyone hears it."""

    def rule(receiver: str, sender: str, message: object, now: float) -> bool:
        return receiver == "s1" and start_at <= now < start_at + seconds

    return rule


def test_a_coordinator_that_hears_no_one_doubts_itself_before_removing_everyone() -> None:
    """The soak saw s1 commit "remove s2, s3, s4, s5, s6" when its input was queued
    behind a burst, three of them in its own process. 0.6 s of hearing no one (two
    timeouts) now removes no one."""
    run, trace = start(pool_toml(duration=4.0), seed=1)
    trace.drop(deaf(2.0, 0.6))
    run_to(run, 4.0)
    assert [why for why in commits_of(run, "s1") if why.startswith("commit remove")] == []
    assert set(assert_one_allocation(run).servers) == {"s1", "s2", "s3", "s4"}


def test_without_the_doubt_it_removed_everyone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coordination, "ALONE_DOUBT", 0)
    run, trace = start(pool_toml(duration=4.0), seed=1)
    trace.drop(deaf(2.0, 0.6))
    run_to(run, 4.0)
    assert "commit remove s2, s3, s4" in commits_of(run, "s1")


def test_every_other_server_really_dead_is_removed_after_the_doubt() -> None:
    run, _ = start(pool_toml(duration=5.0), seed=1)
    run_to(run, 2.0)
    for name in ("s2", "s3", "s4"):
        run.network.kill(name)
    run_to(run, 5.0)
    [(at, _, why)] = [c for c in run.nodes.servers["s1"].coordinator.changes if c[0] > 2.0]
    assert why == "commit remove s2, s3, s4"
    # a timeout, then ALONE_DOUBT more, then the commit (all heartbeats of 100 ms)
    assert 2.0 + 0.3 * (1 + coordination.ALONE_DOUBT) <= at <= 2.0 + 0.3 * 4 + 0.35


def commits_of(run: PoolRun, name: str) -> list[str]:
    return [why for _, _, why in run.nodes.servers[name].coordinator.changes]
