"""The pool's state as a consistent store holds it, and what passes between the leased
coordination (`leased.py`) and the store's I/O, as data.

The store (etcd) holds, under one prefix per pool:

* `epoch`: the epoch as a decimal number; every change compares it (compare-and-swap);
* `state`: the allocation with its shares (`StoredState`, JSON), written with it;
* `members/NAME`: one key per live server, attached to its lease: its unicast
  address and the epoch whose allocation it keeps within (`MemberRecord`).

The I/O side reads and watches these keys and hands the result over as one
`StoreView`; the coordination asks for writes as `Change` (a transaction) and
`Announce` (its member key) requests, and hears back each change's `Outcome`.
Decoding is strict: anything malformed raises `StoreError` with the reason.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from manycast import policy
from manycast.errors import ManycastError
from manycast.space import AddressSpace, Allocation, SpaceError

EPOCH_KEY = "epoch"
STATE_KEY = "state"
MEMBERS = "members/"


class StoreError(ManycastError, ValueError):
    """A document in the store that cannot be read as the pool's state or a member."""


def space_label(space: AddressSpace) -> str:
    """What a stored state names its address space by (the bucket order included)."""
    return f"{space} {'interleaved' if space.interleave else 'ordered'}"


@dataclass(frozen=True)
class StoredState:
    """One committed state: its epoch, the allocation with its shares, and which server's
    transaction wrote it and why."""

    epoch: int
    state: policy.Apportionment
    by: str
    why: str

    def encode(self) -> bytes:
        allocation = self.state.allocation
        index = {name: i for i, name in enumerate(allocation.servers)}
        document = {
            "epoch": self.epoch,
            "by": self.by,
            "why": self.why,
            "space": space_label(allocation.space),
            "servers": list(allocation.servers),
            "weights": {name: self.state.weights[name] for name in allocation.servers},
            "runs": [[start, stop, index[owner]] for start, stop, owner in allocation.runs()],
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, space: AddressSpace) -> StoredState:
        """The state in `raw`, over `space` (a state over another space is refused)."""
        document = _object(raw, "state")
        label = document.get("space")
        if label != space_label(space):
            raise StoreError(f"the stored state is over {label!r}, this pool's is over {space}")
        epoch = _integer(document, "epoch", low=1)
        servers = document.get("servers")
        if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
            raise StoreError("stored state: 'servers' must be a list of names")
        weights = document.get("weights")
        if not isinstance(weights, dict) or not all(
            isinstance(w, int) and not isinstance(w, bool) for w in weights.values()
        ):
            raise StoreError("stored state: 'weights' must map names to whole numbers")
        owners = _owners(document.get("runs"), len(servers), space.buckets)
        try:
            allocation = Allocation(space, tuple(servers), owners)
            state = policy.Apportionment(allocation, weights)
        except (SpaceError, policy.PolicyError) as exc:
            raise StoreError(f"stored state: {exc}") from None
        return cls(epoch, state, _text(document, "by"), _text(document, "why"))


@dataclass(frozen=True)
class MemberRecord:
    """What a live server's member key says: its unicast address, and the epoch whose
    allocation it keeps within (it serves no bucket that epoch gives another; 0: it
    serves nothing yet)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    applied: int

    def encode(self) -> bytes:
        address = str(self.address) if self.address is not None else None
        return json.dumps({"address": address, "applied": self.applied}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> MemberRecord:
        document = _object(raw, "member")
        text = document.get("address")
        if text is None:
            return cls(None, _integer(document, "applied", low=0))
        try:
            if not isinstance(text, str):  # ip_address would read a number as one
                raise ValueError(text)
            address = ipaddress.ip_address(text)
        except ValueError:
            raise StoreError(f"member: {text!r} is not an IP address") from None
        return cls(address, _integer(document, "applied", low=0))


@dataclass(frozen=True)
class StoreView:
    """What the store holds now, as one server's I/O last read or heard it: the state
    (None: none yet), the live members, and the store's revision of this view.
    `unreadable` says why a state that is there could not be read."""

    state: StoredState | None
    members: Mapping[str, MemberRecord] = field(default_factory=dict)
    revision: int = 0
    unreadable: str | None = None


@dataclass(frozen=True)
class Change:
    """A transaction: write `stored` if the epoch is still `base_epoch` (0: if the store
    holds no state yet) and the writer's member key still holds its lease."""

    ident: int
    base_epoch: int
    stored: StoredState


@dataclass(frozen=True)
class Announce:
    """Write this server's member key (attached to its lease)."""

    record: MemberRecord


StoreRequest = Change | Announce


class Outcome(StrEnum):
    COMMITTED = "committed"
    CONFLICT = "conflict"  # the epoch had moved on (or our lease was gone): not written
    FAILED = "failed"  # no answer (no quorum, a timeout): may or may not have been written


def _object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"{what}: not JSON") from None
    if not isinstance(document, dict):
        raise StoreError(f"{what}: not a JSON object")
    return document


def _integer(document: Mapping[str, Any], key: str, *, low: int) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise StoreError(f"{key!r} must be a whole number of at least {low}, not {value!r}")
    return value


def _text(document: Mapping[str, Any], key: str) -> str:
    value = document.get(key, "")
    if not isinstance(value, str):
        raise StoreError(f"{key!r} must be text")
    return value


def _owners(runs: object, servers: int, buckets: int) -> np.ndarray[Any, np.dtype[np.int32]]:
    """The owner of each bucket from [start, stop, server index] runs that cover the
    space in order, each bucket once."""
    if not isinstance(runs, list):
        raise StoreError("stored state: 'runs' must be a list")
    owners = np.empty(buckets, dtype=np.int32)
    at = 0
    for run in runs:
        if (
            not isinstance(run, list)
            or len(run) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in run)
        ):
            raise StoreError("stored state: each run must be [start, stop, server]")
        start, stop, owner = run
        if start != at or not start < stop <= buckets or not 0 <= owner < servers:
            raise StoreError(f"stored state: run {run} does not continue the runs before it")
        owners[start:stop] = owner
        at = stop
    if at != buckets:
        raise StoreError(f"stored state: the runs cover {at} of {buckets} buckets")
    return owners
