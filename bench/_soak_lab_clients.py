"""What the kernel-lab soak's clients saw, and who owned them (bench/soak.py --lab).

The lab's clients are its `Prober`: one process plays every client from its own
namespace, each sending one datagram request every 1 / rate s; a request with no
answer within the prober's timeout failed. The lab's service (`responder`) keeps no
state per client, so no answer can be wrong in content: what a client can tell is
an unanswered request. A client's session is lost when a request of it fails while
its requests were being answered; the loss ends at its next answer (`first_ok`).

`Ledger.fold` empties the prober's per-request lists into per-second counts every
second, so the bench's memory measures the clients, not its bookkeeping, and fills
the `clients` record `_soak_analysis.analyse` reads. `OwnerLog` keeps, epoch by
epoch, which server the pool's allocation gives each client (asked of a live server
agent), the `infra` record the same analysis reads to tell losses a crash explains.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import contextlib
import random
from collections import Counter, defaultdict
from typing import Any

from manycast.lab import Lab, Prober

LATENCIES_PER_MINUTE = 2000  # a uniform sample of the minute's answers (reservoir)


class Ledger:
    """Per-second answered and failed requests, latencies, and each client's losses."""

    def __init__(self, names: list[str], seed: int) -> None:
        self.names = names
        self.ok_per_s: Counter[int] = Counter()
        self.failed_per_s: Counter[int] = Counter()
        self.latency_per_min: dict[int, list[float]] = defaultdict(list)
        self._answers_per_min: Counter[int] = Counter()
        self._rng = random.Random(seed)
        # [client, when the failed request expired, cause, first answer after it]
        self.losses: list[list[Any]] = []
        self._open: dict[int, int] = {}  # client -> its loss (index) not yet answered
        self.watch: list[float] = []  # router restarts: first answer of each client after
        self.again: list[list[float | None]] = []

    def watch_from(self, t: float) -> None:
        """From `t` on, note each client's first answer (a router came back at `t`)."""
        self.watch.append(t)
        self.again.append([None] * len(self.names))

    def fold(self, prober: Prober) -> None:
        for index, name in enumerate(self.names):
            stats = prober.clients[name].stats
            events: list[tuple[float, bool, Any]] = [
                (t, True, lat) for t, lat in zip(stats.ok_times, stats.latencies, strict=True)
            ]
            events += [(t, False, cause) for t, cause in stats.failures]
            stats.ok_times.clear()
            stats.latencies.clear()
            stats.failures.clear()
            stats.disruptions.clear()
            for t, ok, detail in sorted(events, key=lambda e: e[0]):
                if ok:
                    self._answered(index, t, detail)
                else:
                    self.failed_per_s[int(t)] += 1
                    if index not in self._open:
                        self._open[index] = len(self.losses)
                        self.losses.append([index, round(t, 3), detail, None])

    def _answered(self, index: int, t: float, latency: float) -> None:
        self.ok_per_s[int(t)] += 1
        minute = int(t // 60)
        self._answers_per_min[minute] += 1
        sample = self.latency_per_min[minute]
        if len(sample) < LATENCIES_PER_MINUTE:
            sample.append(latency)
        else:
            slot = self._rng.randrange(self._answers_per_min[minute])
            if slot < LATENCIES_PER_MINUTE:
                sample[slot] = latency
        loss = self._open.pop(index, None)
        if loss is not None:
            self.losses[loss][3] = round(t, 3)
        for w, again in zip(self.watch, self.again, strict=True):
            if again[index] is None and t >= w:
                again[index] = round(t, 3)

    def record(self, prober: Prober, window: float) -> dict[str, Any]:
        """The clients' record for `_soak_analysis.analyse`."""
        self.fold(prober)
        now = prober.now()
        return {
            "names": self.names,
            "losses": [tuple(loss) for loss in self.losses],
            "wrong": [],  # the lab's service keeps no per-client state to get wrong
            "watch": self.watch,
            "again": self.again,
            "ok_per_s": dict(self.ok_per_s),
            "failed_per_s": dict(self.failed_per_s),
            "latency_per_min": dict(self.latency_per_min),
            # no connection here: clients whose latest request was answered
            "connected_at_end": len(self.names) - len(self._open),
            "served_at_end": prober.served_since(now - window),
        }


class OwnerLog:
    """Which server the pool's allocation gives each client, epoch by epoch, by when
    this process first saw the epoch (asked of the first live server agent)."""

    def __init__(self, lab: Lab, addresses: list[str], servers: list[str]) -> None:
        self.lab = lab
        self.addresses = addresses
        self.servers = servers
        self.epochs: dict[str, tuple[float, list[int]]] = {}
        self._last: Any = None

    def poll(self, now: float, live: list[str]) -> None:
        for server in live:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                epoch = self.lab.ask(server, "server", {"op": "status"})["epoch"]
                if epoch == self._last:
                    return
                answer = self.lab.ask(
                    server, "server", {"op": "owners", "addresses": self.addresses}
                )
                owners = answer["owners"]
                self._last = answer["epoch"]
                index = {name: i for i, name in enumerate(self.servers)}
                self.epochs[f"{len(self.epochs)}:{self._last}"] = (
                    now,
                    [index.get(owners.get(a) or "", -1) for a in self.addresses],
                )
                return

    def record(self, done: list[dict[str, Any]]) -> dict[str, Any]:
        """The `infra` record for `_soak_analysis.analyse`."""
        return {"epochs": self.epochs, "servers": self.servers, "done": done}


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/soak.py --lab")
