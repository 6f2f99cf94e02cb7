"""Operators' commands passed on to the coordinator (`protocol/commands.py`): resent
each heartbeat until a proposal carries them, taken up at once by a server that
comes to coordinate, given up after `COMMAND_PATIENCE`, and queued once however
often they are heard."""

from __future__ import annotations

import random
from fractions import Fraction

from manycast.protocol.commands import COMMAND_PATIENCE, CommandRelay
from manycast.wire import control

SHARE = control.SetShareOp("s1", Fraction(1, 2))
OTHER = control.SetShareOp("s2", Fraction(1, 4))


def relay() -> CommandRelay:
    return CommandRelay(random.Random(7), resend_s=0.1)


def test_a_command_is_sent_at_once_then_once_per_resend_interval() -> None:
    r = relay()
    r.pass_on(SHARE, 0.0)
    first = r.due(0.0, coordinating=False)
    assert [op for _, op in first.resend] == [SHARE]
    assert r.due(0.05, coordinating=False).resend == []  # not yet
    again = r.due(0.1, coordinating=False)
    assert again.resend == first.resend  # the same id: the coordinator queues it once


def test_a_command_no_proposal_carries_is_given_up_after_the_patience() -> None:
    r = relay()
    r.pass_on(SHARE, 0.0)
    assert r.due(COMMAND_PATIENCE - 0.01, coordinating=False).given_up == 0
    gone = r.due(COMMAND_PATIENCE, coordinating=False)
    assert (gone.given_up, gone.resend) == (1, [])
    assert r.due(COMMAND_PATIENCE + 1, coordinating=False).given_up == 0


def test_a_carried_command_is_no_longer_sent_and_others_still_are() -> None:
    r = relay()
    r.pass_on(SHARE, 0.0)
    r.pass_on(OTHER, 0.0)
    r.carried(SHARE)
    assert [op for _, op in r.due(0.0, coordinating=False).resend] == [OTHER]


def test_a_server_that_comes_to_coordinate_takes_its_commands_up_itself() -> None:
    r = relay()
    r.pass_on(SHARE, 0.0)
    due = r.due(0.3, coordinating=True)
    assert (due.take_up, due.resend) == ([SHARE], [])
    assert r.due(0.6, coordinating=True).take_up == []


def test_the_coordinator_queues_a_resent_command_once_and_forgets_it_after_the_patience() -> None:
    r = relay()
    assert r.first_time(42, 0.0)
    assert not r.first_time(42, 0.1)
    r.due(COMMAND_PATIENCE + 0.2, coordinating=True)
    assert r.first_time(42, COMMAND_PATIENCE + 0.2)
