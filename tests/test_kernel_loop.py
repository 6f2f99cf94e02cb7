"""The kernel driver's loop: the driver contract on a real select loop, without root.

The lab tests (`test_lab.py`) run the daemons in namespaces; these check the loop
they share: one hosted node's frames, effects and deadline carried out, scheduled
and deferred calls, the control socket, and a stop that returns at once.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from manycast.drivers.contract import Network
from manycast.drivers.kernel import ask
from manycast.drivers.kernel.control import ready_path
from manycast.drivers.kernel.loop import KernelLoop
from manycast.errors import DriverError
from manycast.protocol.node import Frame, Interface, Node

DEADLINE = 10.0  # generous: a busy 2-core machine may stall for seconds


class Ticker(Node):
    """Sends one frame and one effect per tick, every `every` seconds, `limit` times."""

    def __init__(self, every: float = 0.01, limit: int = 3) -> None:
        iface = Interface(
            "eth0", "l", ipaddress.IPv4Address("10.0.0.1"), ipaddress.IPv4Network("10.0.0.0/24")
        )
        super().__init__("n", {"eth0": iface})
        self.every, self.limit, self.ticks = every, limit, 0

    def start(self, now: float) -> None:
        if self.limit:  # limit 0: a node that never ticks (nothing races the test)
            self.timers.arm("tick", now + self.every)

    def receive(self, iface: str, packet: bytes, now: float) -> None:
        self.send(iface, packet, None)

    def on_timer(self, now: float) -> None:
        if "tick" in self.timers.expired(now):
            self.ticks += 1
            self.send("eth0", b"tick %d" % self.ticks, None)
            self.effects.append(("ticked", self.ticks))
            if self.ticks < self.limit:
                self.timers.arm("tick", now + self.every)


@pytest.fixture
def loop(tmp_path: Path):  # type: ignore[no-untyped-def]
    sent: list[Frame] = []
    loop = KernelLoop(tmp_path, "n", "router", send=sent.append)
    loop.sent = sent  # type: ignore[attr-defined]
    yield loop
    loop.close()


def test_is_a_network(loop: KernelLoop) -> None:
    assert isinstance(loop, Network)
    assert loop.realtime
    assert abs(loop.wall_base + loop.now - time.time()) < 1.0


def test_hosts_one_node_and_carries_out_frames_effects_and_deadlines(loop: KernelLoop) -> None:
    effects: list[object] = []
    loop.on_effect = lambda node, effect: effects.append(effect)
    node = Ticker()
    loop.add(node)
    with pytest.raises(DriverError):
        loop.add(Ticker())
    assert loop.run_until(loop.now + DEADLINE, lambda: node.ticks == 3)
    sent: list[Frame] = loop.sent  # type: ignore[attr-defined]
    assert [f.packet for f in sent] == [b"tick 1", b"tick 2", b"tick 3"]
    assert effects == [("ticked", 1), ("ticked", 2), ("ticked", 3)]
    assert loop.kill("n") is node
    with pytest.raises(KeyError):
        loop.kill("n")


def test_an_effect_handler_that_calls_back_into_the_node_is_carried_out(
    loop: KernelLoop,
) -> None:
    node = Ticker(limit=1)

    def echo(_: Node, effect: object) -> None:
        node.receive("eth0", b"echo", loop.now)

    loop.on_effect = echo
    loop.add(node)
    sent: list[Frame] = loop.sent  # type: ignore[attr-defined]
    assert loop.run_until(loop.now + DEADLINE, lambda: len(sent) == 2)
    assert [f.packet for f in sent] == [b"tick 1", b"echo"]


def test_call_at_runs_in_order_and_run_until_stops_at_until(loop: KernelLoop) -> None:
    order: list[str] = []
    start = loop.now
    loop.call_at(start + 0.02, lambda: order.append("b"))
    loop.call_at(start + 0.01, lambda: order.append("a"))
    assert not loop.run_until(start + 0.05)
    assert order == ["a", "b"]
    assert loop.now >= start + 0.05


def test_defer_runs_work_off_the_loop_and_the_result_in_it(loop: KernelLoop) -> None:
    got: list[tuple[str, bool]] = []
    main = threading.current_thread()

    def work() -> str:
        return "off" if threading.current_thread() is not main else "on"

    loop.defer(work, lambda result: got.append((result, threading.current_thread() is main)))
    assert loop.run_until(loop.now + DEADLINE, lambda: bool(got))
    assert got == [("off", True)]


def test_control_requests_are_answered_after_the_output_is_sent(tmp_path: Path) -> None:
    sent: list[Frame] = []
    loop = KernelLoop(tmp_path, "n", "server", send=sent.append)
    try:
        node = Ticker(limit=0)
        loop.add(node)

        def poke(request: dict[str, object]) -> dict[str, object]:
            node.receive("eth0", str(request["what"]).encode(), loop.now)
            return {"ok": True}

        loop.handlers["poke"] = poke
        answers: list[object] = []

        def client() -> None:
            answers.append(ask(tmp_path, "n", "server", {"op": "poke", "what": "hi"}, DEADLINE))
            answers.append(ask(tmp_path, "n", "server", {"op": "nope"}, DEADLINE))
            answers.append([f.packet for f in sent])

        thread = threading.Thread(target=client)
        thread.start()
        assert loop.run_until(loop.now + DEADLINE, lambda: len(answers) == 3)
        thread.join(DEADLINE)
        assert answers == [{"ok": True}, {"error": "unknown op 'nope'"}, [b"hi"]]
    finally:
        loop.close()
    assert not (tmp_path / "n.server.sock").exists()


def test_ready_file_and_sigterm_stop(loop: KernelLoop, tmp_path: Path) -> None:
    loop.ready()
    assert ready_path(tmp_path, "n", "router").read_text() == str(os.getpid())
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    loop.call_at(loop.now + 2 * DEADLINE, loop.stop)  # a missed signal fails, not hangs
    began = time.monotonic()
    try:
        assert not loop.run_until(float("inf"))
    finally:
        timer.cancel()
    # Woken by the signal, not by a polling interval.
    assert time.monotonic() - began < DEADLINE
    assert not loop.running
