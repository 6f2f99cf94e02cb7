"""Why a router refused a join, a pin or a packet: the keys of its `rejected` counter."""

from __future__ import annotations

from enum import StrEnum


class Refusal(StrEnum):
    """Each value is what a user reads in status output and metrics labels."""

    WRONG_LINK = "wrong link"  # not the interface the route toward the requester uses
    UNSIGNED = "unsigned"  # a private group's join without a signed-join field
    DUPLICATE = "duplicate"  # a signed join already seen (replay cache)
    STALE = "stale"  # its timestamp is outside the window around the router's clock
    BAD_SIGNATURE = "bad signature"  # not signed with the group's published key
    NO_KEY = "no key"  # the group's key could not be had (no record, no answer)
    BAD_KEY_RECORD = "bad key record"  # a key record that does not validate
    UNAUTHORIZED_SENDER = "unauthorized sender"  # a private group's sender not registered
    MALFORMED = "malformed"  # a report that does not decode
    TOO_MANY_WAITING = "too many joins waiting for keys"
