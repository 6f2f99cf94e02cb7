"""The soak's restarted router (`bench/_soak_hosts.RouterProcess`): the next
incarnation is built before its restart, so a restart is as short as drawn."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from manycast.ports import free_base_port
from manycast.topology import loads

BENCH = Path(__file__).resolve().parent.parent / "bench"
BUILD_S = 120.0  # a spawned Python process importing the pool, on a loaded machine


def test_two_restarts_closer_than_a_build_each_find_a_spare_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """docs/soak.md finding 22 (seed 20261201, `--minutes 5 --cycle-s 20 --kinds
    router_restart,loss_burst`): rb restarted at 168.8 s and again at 171.0 s. One
    spare at a time was kept, so the second restart's spare was spawned only at that
    restart, and rb was down 1.6-2.0 s instead of the 0.86 s drawn: 2.04 s is longer
    than the pool's failure detection, and the pool split. Now the spare asked for
    while another waited is spawned as soon as that one goes."""
    monkeypatch.syspath_prepend(str(BENCH))  # the bench's modules, in the children too
    from _pool import two_router_pool
    from _soak_hosts import RouterProcess

    text = two_router_pool(technique="R3", clients_per_lan=2, rate=0.5, duration=30.0)
    base = free_base_port(loads(text).attachment_count)
    router = RouterProcess("rb", text, base, 1, [], tmp_path)
    try:
        router.prepare()
        router.wait_built(BUILD_S)
        now = time.monotonic()
        router.begin(now, now + 30.0)
        assert router.current is not None and router.spare is None
        router.prepare()  # for a restart 8 s ahead
        router.prepare()  # and for another 2 s after it: the spare is still waiting
        assert router.incarnation == 2
        router.wait_built(BUILD_S)
        router.kill(1.0)
        router.go(1.0)  # the first restart: its spare goes, the next one is spawned
        assert router.starts[-1]["process"] == "rb#2"
        assert router.incarnation == 3 and router.spare is not None
        router.wait_built(BUILD_S)  # built before the second restart needs it
        router.kill(2.0)
        router.go(2.0)
        assert router.starts[-1]["process"] == "rb#3"
        assert router.spare is None  # nothing more was asked for
    finally:
        router.stop(3.0)
