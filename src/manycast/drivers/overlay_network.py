"""The overlay behind the one driver contract: a synchronous facade over `AsyncOverlay`.

The facade owns an event loop of its own and turns it only inside `run_until`,
so the pool, the scenario engine and the runtime drive the overlay exactly as
they drive the memory driver. Blocking work (a DNS lookup) goes to `defer`,
which runs it on a worker thread and hands its result back on the overlay's
clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from manycast.drivers.contract import EffectHandler
from manycast.drivers.links import LinkCounters, LinkSpec
from manycast.drivers.overlay import BUFFER_SIZE, AsyncOverlay, Endpoint
from manycast.protocol.node import Node

T = TypeVar("T")


class OverlayNetwork:
    """Hosts `local_nodes` on UDP endpoints (see `AsyncOverlay`); implements `Network`."""

    def __init__(
        self,
        links: Iterable[LinkSpec] | Mapping[str, LinkSpec],
        endpoints: Mapping[tuple[str, str], Endpoint | int],
        local_nodes: Iterable[Node] = (),
        *,
        seed: int = 0,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        self.overlay = AsyncOverlay(
            links, endpoints, local_nodes, seed=seed, buffer_size=buffer_size
        )
        self._loop = asyncio.new_event_loop()
        self._wall_base: float | None = None
        self._workers: ThreadPoolExecutor | None = None
        self._closed = False
        self.realtime = True  # now follows the monotonic clock

    # -- the contract -------------------------------------------------------------
    @property
    def now(self) -> float:
        return self.overlay.now

    @property
    def wall_base(self) -> float:
        """Wall-clock seconds at `now == 0`; fixed when first asked."""
        if self._wall_base is None:
            self._wall_base = time.time() - self.overlay.now
        return self._wall_base

    @property
    def on_effect(self) -> EffectHandler | None:
        return self.overlay.on_effect

    @on_effect.setter
    def on_effect(self, handler: EffectHandler | None) -> None:
        self.overlay.on_effect = handler

    @property
    def capture(self) -> Callable[[str, float, bytes], None] | None:
        """The capture sink of every frame a local node sends (`observe.pcap.Capture`)."""
        return self.overlay.capture

    @capture.setter
    def capture(self, sink: Callable[[str, float, bytes], None] | None) -> None:
        self.overlay.capture = sink

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The overlay's own event loop (turned only inside `run_until`): for probes
        that must run on it without flushing every node, as benches do."""
        return self._loop

    @property
    def nodes(self) -> dict[str, Node]:
        return self.overlay.nodes

    @property
    def counters(self) -> dict[str, LinkCounters]:
        return self.overlay.counters

    @property
    def endpoints(self) -> dict[tuple[str, str], Endpoint]:
        return self.overlay.endpoints

    def add(self, node: Node) -> None:
        self.overlay.add(node)

    def kill(self, name: str) -> Node:
        return self.overlay.kill(name)

    def call_at(self, at: float, callback: Callable[[], object]) -> None:
        self.overlay.call_at(at, callback)

    def run_until(self, until: float, condition: Callable[[], bool] | None = None) -> bool:
        if self._closed:
            raise RuntimeError("the overlay is closed")
        return self._loop.run_until_complete(self.overlay.run_until(until, condition))

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def defer(self, work: Callable[[], T], then: Callable[[T], object]) -> None:
        """Run blocking `work` on a worker thread; `then(result)` runs on this
        network's clock once it is done (and the network is running)."""
        if self._workers is None:
            self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="overlay")
        future = self._workers.submit(work)

        def done(result: Future[T]) -> None:
            if not self._closed:
                self._loop.call_soon_threadsafe(self._deliver, result, then)

        future.add_done_callback(done)

    def _deliver(self, result: Future[T], then: Callable[[T], object]) -> None:
        value = result.result()
        self.overlay.call_at(self.overlay.now, lambda: then(value))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.overlay.close()
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()
