"""One server's link to etcd: its lease renewed, the pool's keys read and watched, and
the leased coordination's requests carried out; everything etcd says is fed into the
sans-I/O `LeasedCoordinator` as events on the network's clock.

The keys are those of `protocol.storestate` under `/manycast/POOL/`. A change is one
transaction: it compares the epoch key (or, for the first state, that there is none)
and this server's member key's lease, and writes the epoch and the state together.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable

from manycast.drivers.etcd.client import EtcdClient, EtcdError, KeyValue, LeaseNotFound, b64
from manycast.protocol.leased import LeasedCoordinator
from manycast.protocol.storestate import (
    EPOCH_KEY,
    MEMBERS,
    STATE_KEY,
    Announce,
    Change,
    MemberRecord,
    Outcome,
    StoredState,
    StoreError,
    StoreView,
)
from manycast.space import AddressSpace

log = logging.getLogger("manycast.etcd")

Clock = Callable[[], float]
# Runs a callback on the network's clock, then lets the nodes act on what it changed.
Schedule = Callable[[Callable[[], None]], None]


class EtcdSession:
    def __init__(
        self,
        core: LeasedCoordinator,
        client: EtcdClient,
        *,
        prefix: str,
        space: AddressSpace,
        ttl: int,
        clock: Clock,
        schedule: Schedule,
    ) -> None:
        self.core = core
        self.client = client
        self.prefix = prefix
        self.space = space
        self.ttl = ttl
        self.period = ttl / 3  # renewals: three per lease time
        self._clock = clock
        self._schedule = schedule
        self._member_key = f"{prefix}{MEMBERS}{core.name}"
        self._lease: int | None = None
        self._items: dict[str, KeyValue] = {}
        self._revision = 0
        self._decoded: tuple[int, StoredState | None, str | None] = (-1, None, None)
        self._record = core.record()
        self._wanted = asyncio.Event()
        self._announce = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.core.on_request = self._wanted.set
        self._task = loop.create_task(self._run(), name=f"etcd {self.core.name}")

    def cancel(self) -> None:
        """Stop at once, as a crash would: no more renewals (the lease runs out)."""
        if self._task is not None:
            self._task.cancel()
        self.core.on_request = None

    async def close(self, revoke: bool) -> None:
        """Stop; with `revoke`, give the lease back so the pool need not wait it out."""
        self.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if revoke and self._lease is not None:
            with contextlib.suppress(EtcdError):
                await self.client.revoke(self._lease)
        await self.client.close()

    def _deliver(self, event: Callable[[float], None]) -> None:
        self._schedule(lambda: event(self._clock()))

    # -- the session ---------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            lost = False
            try:
                await self._register()
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._renew())
                    group.create_task(self._watch())
                    group.create_task(self._announcer())
                    group.create_task(self._pump(group))
            except* LeaseNotFound:
                lost = True
            except* EtcdError as errors:
                # Said once until it works again: a server without etcd serves nothing.
                (log.info if self._failing else log.warning)(
                    "%s: etcd: %s", self.core.name, errors.exceptions[0]
                )
                self._failing = True
            except* Exception as errors:  # an answer we did not expect: start over
                log.error("%s: etcd session: %r", self.core.name, errors.exceptions[0])
            if lost:
                self._lease = None
                self._deliver(self.core.on_lease_lost)
            await asyncio.sleep(self.period)

    async def _register(self) -> None:
        """A lease (a new one if we have none), our member key on it, the pool's keys."""
        granted: float | None = None
        if self._lease is None:
            sent = self._clock()
            self._lease, ttl = await self.client.grant(self.ttl)
            granted = sent + ttl
        revision = await self.client.put(self._member_key, self.core.record().encode(), self._lease)
        # Registered before the lease counts: no view older than our key may decide a gain.
        self._deliver(functools.partial(self.core.on_registered, revision))
        if granted is not None:
            self._deliver(functools.partial(self.core.on_lease, granted))
        await self._read()
        self._failing = False

    async def _renew(self) -> None:
        assert self._lease is not None
        while True:
            sent = self._clock()
            try:
                ttl = await self.client.keep_alive(self._lease)
                if ttl <= 0:
                    raise LeaseNotFound(f"lease {self._lease:x} has expired")
                self._deliver(functools.partial(self.core.on_lease, sent + ttl))
                await self._read()  # a linearizable read: the view even if a watch stalls
            except LeaseNotFound:
                raise
            except EtcdError as exc:
                log.info("%s: etcd renewal: %s", self.core.name, exc)
            await asyncio.sleep(max(0.0, sent + self.period - self._clock()))

    async def _watch(self) -> None:
        while True:
            try:
                async for revision, events in self.client.watch(self.prefix, self._revision + 1):
                    changed = False
                    for event in events:
                        if event.item.mod_revision <= self._revision:
                            continue  # already in the view read
                        changed = True
                        if event.kind == "DELETE":
                            self._items.pop(event.item.key, None)
                        else:
                            self._items[event.item.key] = event.item
                    self._revision = max(self._revision, revision)
                    if changed:
                        self._publish()
            except EtcdError as exc:
                log.info("%s: etcd watch: %s", self.core.name, exc)
            await asyncio.sleep(self.period)

    async def _pump(self, group: asyncio.TaskGroup) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            for request in self.core.take_store_requests():
                if isinstance(request, Announce):
                    self._record = request.record
                    self._announce.set()
                else:
                    group.create_task(self._commit(request))

    async def _announcer(self) -> None:
        """Our member key, rewritten whenever what it says changes."""
        assert self._lease is not None
        while True:
            await self._announce.wait()
            self._announce.clear()
            try:
                await self.client.put(self._member_key, self._record.encode(), self._lease)
            except LeaseNotFound:
                raise
            except EtcdError as exc:
                log.info("%s: etcd announce: %s", self.core.name, exc)
                await asyncio.sleep(self.period)
                self._announce.set()

    async def _commit(self, change: Change) -> None:
        assert self._lease is not None
        epoch_key = b64(self.prefix + EPOCH_KEY)
        compare = [
            {"key": b64(self._member_key), "target": "LEASE", "result": "EQUAL",
             "lease": str(self._lease)},
            {"key": epoch_key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
            if change.base_epoch == 0
            else {"key": epoch_key, "target": "VALUE", "result": "EQUAL",
                  "value": b64(str(change.base_epoch))},
        ]  # fmt: skip
        stored = change.stored
        success = [
            {"request_put": {"key": epoch_key, "value": b64(str(stored.epoch))}},
            {"request_put": {"key": b64(self.prefix + STATE_KEY), "value": b64(stored.encode())}},
        ]
        try:
            outcome = (
                Outcome.COMMITTED if await self.client.txn(compare, success) else Outcome.CONFLICT
            )
        except EtcdError as exc:
            log.info("%s: etcd transaction: %s", self.core.name, exc)
            outcome = Outcome.FAILED
        self._deliver(lambda now: self.core.on_change_result(change.ident, outcome, now))
        if outcome is Outcome.CONFLICT:
            with contextlib.suppress(EtcdError):
                await self._read()  # the state that won, to try again from

    # -- the view --------------------------------------------------------------------
    async def _read(self) -> None:
        revision, items = await self.client.range_prefix(self.prefix)
        if revision >= self._revision:
            self._items = {item.key: item for item in items}
            self._revision = revision
            self._publish()

    def _publish(self) -> None:
        members: dict[str, MemberRecord] = {}
        start = self.prefix + MEMBERS
        for key, item in self._items.items():
            if key.startswith(start):
                try:
                    members[key[len(start) :]] = MemberRecord.decode(item.value)
                except StoreError:
                    # It is alive, but says nothing we can trust: wait for its lease.
                    members[key[len(start) :]] = MemberRecord(None, -1)
        stored, unreadable = self._state()
        view = StoreView(stored, members, self._revision, unreadable)
        self._deliver(lambda now: self.core.on_store(view, now))

    def _state(self) -> tuple[StoredState | None, str | None]:
        item = self._items.get(self.prefix + STATE_KEY)
        if item is None:
            return None, None
        if self._decoded[0] != item.mod_revision:
            try:
                self._decoded = (
                    item.mod_revision,
                    StoredState.decode(item.value, self.space),
                    None,
                )
            except StoreError as exc:
                log.warning("%s: etcd holds a state we cannot read: %s", self.core.name, exc)
                self._decoded = (item.mod_revision, None, str(exc))
        return self._decoded[1], self._decoded[2]
