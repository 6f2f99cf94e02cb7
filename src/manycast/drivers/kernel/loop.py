"""The kernel driver's network: one process's select loop hosting the one node of its namespace.

Each lab program (router daemon, server agent, responder) runs one `KernelLoop`:
its sockets, its control socket, scheduled callbacks and the deadline of the
node it hosts (none for the responder). It implements the driver contract
(`drivers.contract.Network`) on the monotonic clock: after every event (a
readable socket, a control request, the node's deadline, a scheduled call, a
deferred result) it carries out the node's output with `carry_out`, handing each
frame to the program's `send` and each effect to `on_effect`, until the node is
quiet, then calls the program's `after` hook. SIGTERM and SIGINT stop
`run_until` at once (the signal wakes the select).
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from manycast.drivers import heap
from manycast.drivers.contract import EffectHandler, carry_out
from manycast.drivers.kernel.control import ControlSocket, Request, command_path, ready_path
from manycast.errors import DriverError
from manycast.protocol.node import Frame, Node

if TYPE_CHECKING:
    from manycast.drivers.contract import Network

Handler = Callable[[Request], Any]
T = TypeVar("T")


def _no_link(frame: Frame) -> None:
    raise DriverError(f"this program has no link to send on ({frame.iface})")


class KernelLoop:
    """Sockets, timers and at most one node of one lab program, on the monotonic clock."""

    def __init__(
        self,
        run_dir: Path,
        name: str,
        role: str,
        send: Callable[[Frame], None] = _no_link,
        after: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.name = name
        self.role = role
        self.send = send
        self.after = after
        self.on_effect: EffectHandler | None = None
        self.realtime = True  # now follows the monotonic clock
        self.handlers: dict[str, Handler] = {}
        self.node: Node | None = None
        self.running = True
        self._t0 = time.monotonic()
        self._wall_base = time.time()
        self._deadline: float | None = None
        self._calls: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = 0
        self._soon: deque[Callable[[], object]] = deque()
        self._soon_lock = threading.Lock()
        self._closed = False
        self._workers: ThreadPoolExecutor | None = None
        self.selector = selectors.DefaultSelector()
        # Woken by other threads (call_soon_threadsafe) and by signals (set_wakeup_fd).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self.watch(self._wake_r, self._on_wake)
        self.control = ControlSocket(command_path(run_dir, name, role), self._dispatch)
        self.watch(self.control.sock, self.control.on_readable)
        self._signals: dict[int, Any] = {}
        self._old_wakeup: int | None = None
        if threading.current_thread() is threading.main_thread():
            self._old_wakeup = signal.set_wakeup_fd(
                self._wake_w.fileno(), warn_on_full_buffer=False
            )
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._signals[sig] = signal.signal(sig, self._on_signal)
        heap.trim_every(self)  # a lab program keeps no freed bursts (drivers/heap.py)

    # -- the driver contract -----------------------------------------------------------
    @property
    def now(self) -> float:
        return time.monotonic() - self._t0

    @property
    def wall_base(self) -> float:
        return self._wall_base

    def add(self, node: Node) -> None:
        if self.node is not None:
            raise DriverError(f"{self.name}'s loop already hosts {self.node.name}")
        self.node = node
        node.start(self.now)
        self._settle()

    def kill(self, name: str) -> Node:
        node = self.node
        if node is None or node.name != name:
            raise KeyError(name)
        self.node, self._deadline = None, None
        return node

    def call_at(self, at: float, callback: Callable[[], object]) -> None:
        self._seq += 1
        heapq.heappush(self._calls, (at, self._seq, callback))

    def run_until(self, until: float, condition: Callable[[], bool] | None = None) -> bool:
        """Serve until `until` (math.inf: until stopped) or until `condition()` holds."""
        while self.running:
            if condition is not None and condition():
                return True
            now = self.now
            if now >= until:
                return False
            due = min(self._next_due(), until)
            timeout = None if due == math.inf else max(0.0, due - now)
            for key, _ in self.selector.select(timeout):
                key.data()
                self._settle()
            self._fire_due()
        return condition is not None and condition()

    def defer(self, work: Callable[[], T], then: Callable[[T], object]) -> None:
        """Run blocking `work` on a worker thread; `then(result)` runs in the loop."""
        if self._workers is None:
            self._workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix=self.name)

        def done(result: Future[T]) -> None:
            self.call_soon_threadsafe(lambda: then(result.result()))

        self._workers.submit(work).add_done_callback(done)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)
        for sig, handler in self._signals.items():
            signal.signal(sig, handler)
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
        self.selector.close()
        self.control.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- what the programs add ---------------------------------------------------------
    def watch(self, sock: socket.socket, callback: Callable[[], None]) -> None:
        """Call `callback` whenever `sock` is readable (then settle)."""
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, callback)

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """Run `callback` in the loop's thread at its next turn (from any thread)."""
        with self._soon_lock:
            self._soon.append(callback)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def ready(self) -> None:
        """Tell the lab the program is set up: the ready file, with our pid."""
        ready_path(self.run_dir, self.name, self.role).write_text(str(os.getpid()))

    def stop(self) -> None:
        self.running = False

    # -- internals -----------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop()

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while True:
            with self._soon_lock:
                if not self._soon:
                    return
                callback = self._soon.popleft()
            callback()
            self._settle()

    def _dispatch(self, request: Request) -> Any:
        handler = self.handlers.get(request.get("op", ""))
        if handler is None:
            return {"error": f"unknown op {request.get('op')!r}"}
        answer = handler(request)
        # What the request made the node send leaves before the caller hears back.
        self._settle()
        return answer

    def _arm(self, node: Node, deadline: float | None) -> None:
        self._deadline = deadline

    def _settle(self) -> None:
        node = self.node
        if node is not None:
            carry_out(node, self.send, self._arm, self.on_effect)
            # An effect handler may call into the node again (a key provided at once).
            while node.outbox or node.effects:
                carry_out(node, self.send, self._arm, self.on_effect)
        if self.after is not None:
            self.after()

    def _next_due(self) -> float:
        dues = [math.inf if self._deadline is None else self._deadline]
        if self._calls:
            dues.append(self._calls[0][0])
        return min(dues)

    def _fire_due(self) -> None:
        now = self.now
        node = self.node
        if node is not None and self._deadline is not None and self._deadline <= now:
            self._deadline = None
            node.on_timer(now)
            self._settle()
        while self._calls and self._calls[0][0] <= now:
            _, _, callback = heapq.heappop(self._calls)
            callback()
            self._settle()


if TYPE_CHECKING:

    def _is_network(loop: KernelLoop) -> Network:
        return loop
