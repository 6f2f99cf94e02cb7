"""The closed loop (Fig 10, step 1020): a congested server makes the pool rebalance,
and hysteresis keeps it from oscillating. Memory driver, virtual clock."""

from __future__ import annotations

from manycast.runtime import PoolRun
from manycast.topology import loads

# Heavy clients with a stride of 4 all share their low address bits, so under an
# equal split they all land on one server: it is congested as soon as they speed up.
TOPOLOGY = """
[pool]
rebalance_above = {above}
rebalance_target = 1.1
rebalance_hold_ms = 2000

[[router]]
name = "r1"
[[server]]
name = "s1"
router = "r1"
[[server]]
name = "s2"
router = "r1"
[[server]]
name = "s3"
router = "r1"
[[server]]
name = "s4"
router = "r1"

[[clients]]
name = "light"
count = 40
router = "r1"
subnet = "10.1.0.0/16"
rate = 1.0
[[clients]]
name = "heavy"
count = 20
router = "r1"
subnet = "10.2.0.0/16"
stride = 4
rate = 0.2

[[scenario]]
at = 4.0
action = "client_rate"
clients = "heavy"
rate = 10.0

[run]
duration = 20
"""


def imbalance(rates: list[float]) -> float:
    return max(rates) / (sum(rates) / len(rates))


def run_pool(above: float) -> tuple[PoolRun, list[tuple[float, float]]]:
    run = PoolRun(loads(TOPOLOGY.format(above=above)), "memory", seed=2)
    samples: list[tuple[float, float]] = []

    def tick(snapshot: object) -> None:
        rates = [s.requests_per_s for s in run.live_view().servers if s.status == "up"]
        if sum(rates) > 0:
            samples.append((run.now, imbalance(rates)))

    run.run(20.0, tick)
    return run, samples


def rebalances(run: PoolRun) -> list[float]:
    changes = run.nodes.servers["s1"].coordinator.changes
    return [at for at, _, why in changes if "rebalance" in why]


def test_a_congested_server_is_relieved_and_the_loop_settles() -> None:
    run, samples = run_pool(above=1.4)
    done = rebalances(run)
    assert done, "no rebalance happened although one server carried most of the load"
    assert all(at > 4.0 for at in done), "rebalanced before any congestion"
    # Hysteresis: a few corrections, then quiet (no rebalance in the last 6 s).
    assert len(done) <= 5
    assert max(done) < 14.0
    late = [value for at, value in samples if at >= 15.0]
    congested = [value for at, value in samples if 4.0 <= at < 7.0]
    assert max(congested) > 1.6  # the heavy clients really did pile onto one server
    assert sum(late) / len(late) < 1.3  # and the loop brought max/mean under the trigger
    summary = run.summary()
    assert summary["clients_served_at_end"] == summary["clients"]


def test_without_the_loop_the_congestion_stays() -> None:
    run, samples = run_pool(above=0.0)
    assert not rebalances(run)
    late = [value for at, value in samples if at >= 15.0]
    assert sum(late) / len(late) > 1.6
