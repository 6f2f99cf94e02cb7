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


class RedirectRefusal(StrEnum):
    """Why a client ignored a change-destination message (Fig 21): the keys of its
    `ClientStats.redirects_refused` counter. The connection goes on where it was."""

    NOT_OFFERED = "not offered"  # the connection's SYN carried no tag and cookie
    OUT_OF_WINDOW = "out of window"  # its sequence number is outside the receive window
    MALFORMED = "malformed"  # the message does not decode
    WRONG_COOKIE = "wrong tag or cookie"  # not this connection's tag and cookie
    UNSIGNED = "unsigned"  # no signature at all
    BAD_SIGNATURE = "bad signature"  # does not verify with the pool's key (forged, other key)
    REPLAYED = "replayed"  # a serial not above the last one accepted (an old instruction)
    STALE = "stale"  # its timestamp is outside the window around the client's clock
    BAD_DESTINATION = "bad destination"  # another address family, multicast, unspecified
    NO_KEY = "no key"  # the pool's key could not be had from DNS: refuse, never accept
    BAD_KEY_RECORD = "bad key record"  # the pool's key record does not validate
    TOO_MANY_WAITING = "too many waiting for the key"
