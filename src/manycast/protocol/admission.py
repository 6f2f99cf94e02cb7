"""A router's admission of joins to private groups (Fig 6), sans-I/O.

Public groups are admitted. A report (IGMPv3, or MLDv2 on an IPv6 network) that
names a private group must carry a signed join, and is refused, with its reason
counted, when it is a duplicate (replay cache), stale (its timestamp outside the
window around the router's clock), from the wrong link (not the interface the
route toward the requester uses), signed with a key other than the group's, or
when the group's key cannot be had (no record, or a record that does not
validate). The key comes from DNS
through the router's owner: the admission asks for a group's key, the owner
looks it up (I/O) and hands the answer back with its TTL; joins wait meanwhile.
The pool's notice that a member died (`MemberDown`) passes the same checks.

A key past its TTL is asked for again, but stays in use meanwhile, and while DNS
gives no word on it (no answer, a server that cannot be reached: RFC 8767's
serve-stale), for up to `max_stale` past its TTL, asked for again every
`negative_ttl`: a DNS server down for a moment must not cut off a pool whose key
every router already had. An answer that the record is gone or bad ends it at once.
A router that restarts may be given the keys it held before (`restore_key`, from
its host's key cache, `naming/keycache.py`): they are stale from the start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from manycast.addressplan import DEFAULT_PLAN
from manycast.auth import AuthError, ReplayCache, public_key, verify_join
from manycast.protocol.refusal import Refusal
from manycast.wire.control import MemberDown
from manycast.wire.membership import IGMPv3Report, MLDv2Report


@dataclass(frozen=True)
class Verdict:
    """A join's fate: admitted, refused with a reason, or waiting for a group's key."""

    reason: Refusal | None = None
    waiting_for: tuple[int, ...] = ()

    @property
    def admitted(self) -> bool:
        return self.reason is None and not self.waiting_for


@dataclass
class _Key:
    key: Ed25519PublicKey | None
    expires: float
    error: Refusal
    stale_until: float = 0.0  # a key past `expires` is still used until then ...
    ask_after: float = 0.0  # ... and not asked for again before this


class Admission:
    def __init__(
        self,
        is_private: Callable[[int], bool] = DEFAULT_PLAN.is_private_int,
        window: float = 30.0,
        wall_base: float = 0.0,
        negative_ttl: float = 5.0,
        max_stale: float = 86400.0,  # RFC 8767 suggests 1 to 3 days
    ) -> None:
        self.is_private = is_private
        self.window = window
        self.wall_base = wall_base
        self.negative_ttl = negative_ttl
        self.max_stale = max_stale
        self.stale_kept = 0  # lookups that got no answer while a stale key stayed in use
        self.replay = ReplayCache(window)
        self._keys: dict[int, _Key] = {}
        self._asked: set[int] = set()
        self.requests: list[int] = []  # groups whose key the owner should look up
        # group -> what was wrong with its key record, for status and logs
        self.key_errors: dict[int, str] = {}

    def check(self, report: IGMPv3Report | MLDv2Report, right_link: bool, now: float) -> Verdict:
        """A join's verdict (IGMPv3, or MLDv2 in an IPv6 pool: the same checks)."""
        private = sorted({int(r.group) for r in report.records if self.is_private(int(r.group))})
        if not private:
            return Verdict(Refusal.WRONG_LINK) if not right_link else Verdict()
        signed = report.signed
        if signed is None or not signed.signature:
            return Verdict(Refusal.UNSIGNED)
        if signed in self.replay:
            return Verdict(Refusal.DUPLICATE)
        if abs(self.wall_base + now - signed.timestamp / 1000) > self.window:
            return Verdict(Refusal.STALE)
        if not right_link:
            return Verdict(Refusal.WRONG_LINK)
        missing = self._missing(private, now)
        if missing:
            return Verdict(waiting_for=missing)
        for group in private:
            entry = self._keys[group]
            if entry.key is None:
                return Verdict(entry.error)
            if not verify_join(report, entry.key):
                return Verdict(Refusal.BAD_SIGNATURE)
        self.replay.remember(signed, now)
        return Verdict()

    def check_notice(self, notice: MemberDown, right_link: bool, now: float) -> Verdict:
        """The pool's notice that a member of a private group died: signed with the
        group's key, timely, not seen before, and arriving from the signer's side."""
        group = int(notice.group)
        if not notice.signature:
            return Verdict(Refusal.UNSIGNED)
        signed = notice.signed_bytes()
        if signed in self.replay:
            return Verdict(Refusal.DUPLICATE)
        if abs(self.wall_base + now - notice.wall_ms / 1000) > self.window:
            return Verdict(Refusal.STALE)
        if not right_link:
            return Verdict(Refusal.WRONG_LINK)
        missing = self._missing([group], now)
        if missing:
            return Verdict(waiting_for=missing)
        entry = self._keys[group]
        if entry.key is None:
            return Verdict(entry.error)
        try:
            entry.key.verify(notice.signature, signed)
        except InvalidSignature:
            return Verdict(Refusal.BAD_SIGNATURE)
        self.replay.remember(signed, now)
        return Verdict()

    def _missing(self, groups: list[int], now: float) -> tuple[int, ...]:
        """The groups whose key must be waited for; asks for every key past its TTL
        (a stale one is still used meanwhile, so not waited for)."""
        waiting = []
        for group in groups:
            entry = self._keys.get(group)
            if entry is not None and entry.expires > now:
                continue
            stale = entry is not None and entry.key is not None and now < entry.stale_until
            backing_off = entry is not None and stale and now < entry.ask_after
            if group not in self._asked and not backing_off:
                self._asked.add(group)
                self.requests.append(group)
            if not stale:
                waiting.append(group)
        return tuple(waiting)

    def provide_key(
        self,
        group: int,
        raw: bytes | None,
        ttl: float,
        now: float,
        error: str | None = None,
        unanswered: bool = False,
    ) -> None:
        """The owner's answer for a group's key (None with `error` when there is none;
        `unanswered`: DNS said nothing about it, so a key held before stays in use)."""
        self._asked.discard(group)
        held = self._keys.get(group)
        if raw is None and unanswered and held and held.key and now < held.stale_until:
            held.ask_after = now + self.negative_ttl
            self.stale_kept += 1
            return
        if raw is None:
            reason = Refusal(error) if error in tuple(Refusal) else Refusal.NO_KEY
            self._keys[group] = _Key(None, now + self.negative_ttl, reason)
            return
        try:
            key = public_key(raw)
        except AuthError as exc:
            self.key_errors[group] = f"bad key record: {exc}"
            self._keys[group] = _Key(None, now + self.negative_ttl, Refusal.BAD_KEY_RECORD)
            return
        self.key_errors.pop(group, None)
        expires = now + max(ttl, 1.0)
        self._keys[group] = _Key(key, expires, Refusal.NO_KEY, expires + self.max_stale)

    def restore_key(self, group: int, raw: bytes, stale_for: float, now: float) -> bool:
        """A key this router held before it restarted (its key cache): past its TTL,
        so asked for again at the first join that needs it, and used meanwhile and
        while DNS gives no answer, for `stale_for` more seconds. False if it is not
        a key, or a key is already held."""
        if group in self._keys or stale_for <= 0:
            return False
        try:
            key = public_key(raw)
        except AuthError:
            return False
        self._keys[group] = _Key(key, now, Refusal.NO_KEY, now + stale_for)
        return True

    def take_requests(self) -> list[int]:
        out, self.requests = self.requests, []
        return out
