"""The live dashboard's frames: what a pool's page shows at one instant, as JSON data.

A `Dashboard` turns the snapshots a run already makes (`runtime.LiveView` from an
in-process pool, `lab.Progress` from the kernel lab) into frames, plain JSON-able
dicts: every frame is whole (a page opened late needs nothing older). It keeps
what spans frames (which server owned each client, the moves seen so far, the
request rates of the lab's servers), and hands each frame to whoever serves the
page through a thread-safe queue: the pool runs in one thread, the web server's
event loop in another. It reads the snapshots through protocols (their shape,
not their classes), so this module depends on nothing of the pool.
"""

from __future__ import annotations

import queue
import re
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any, Protocol

Frame = dict[str, Any]

# A page draws at most this many clients as dots (each frame carries their owners).
MAX_DOTS = 2000
RECENT_MOVES = 12
# What the page's last frame shows of the run's summary (docs/summary.md).
SUMMARY_SHOWN = (
    "clients",
    "clients_served_at_end",
    "requests_ok",
    "requests_failed",
    "resets",
    "reconnects",
    "recovery_s",
    "latency_ms",
    "events",
)

# An event's action (the first word of `Step.describe()`) -> the kind a page colours.
EVENT_KINDS = {
    "set_share": "share",
    "kill": "death",
    "add": "arrival",
    "kill_vip_router": "vip-failure",
    "rebalance": "rebalance",
    "client_rate": "rate",
}

TECHNIQUES = {
    "R1": "reset: the new owner resets moved connections, clients reconnect (Fig 12)",
    "R2": "forward: moved connections' packets go back to their old owner (Fig 13-14)",
    "R3": "state transfer: the new owner continues moved connections (Fig 15)",
    "R4": "pinned paths: moved connections stay tagged to their old owner (Fig 16)",
    "D": "dynamic destination: a moved connection follows its new owner's signed "
    "change-destination (Fig 20-21)",
}


class ServerLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def share(self) -> float: ...
    @property
    def sessions(self) -> int: ...
    @property
    def requests_per_s(self) -> float: ...
    @property
    def epoch(self) -> int: ...


class VipRouterLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def packets_per_s(self) -> float: ...
    @property
    def flows(self) -> int: ...


class LiveLike(Protocol):
    """An in-process pool's snapshot (`manycast.runtime.LiveView`)."""

    @property
    def now(self) -> float: ...
    @property
    def servers(self) -> Sequence[ServerLike]: ...
    @property
    def clients(self) -> int: ...
    @property
    def served_recently(self) -> int: ...
    @property
    def requests_ok(self) -> int: ...
    @property
    def requests_failed(self) -> int: ...
    @property
    def resets(self) -> int: ...
    @property
    def events(self) -> Sequence[tuple[float, str]]: ...
    @property
    def vip_routers(self) -> Sequence[VipRouterLike]: ...
    @property
    def technique(self) -> str: ...
    @property
    def owners(self) -> Sequence[tuple[str, str]]: ...
    @property
    def carried(self) -> Sequence[tuple[str, int]]: ...
    @property
    def refusals(self) -> Sequence[tuple[str, int]]: ...


class ProgressLike(Protocol):
    """The kernel lab's report (`manycast.lab.Progress`, with `LabRun.detail`)."""

    @property
    def now(self) -> float: ...
    @property
    def served(self) -> int: ...
    @property
    def clients(self) -> int: ...
    @property
    def answers(self) -> Mapping[str, int]: ...
    @property
    def entries(self) -> int: ...
    @property
    def events(self) -> Sequence[tuple[float, str]]: ...
    @property
    def status(self) -> Mapping[str, str]: ...
    @property
    def shares(self) -> Mapping[str, float]: ...
    @property
    def owners(self) -> Mapping[str, str]: ...
    @property
    def refusals(self) -> Mapping[str, int]: ...


def describe_event(at: float, what: str) -> dict[str, Any]:
    """One step as the page shows it: `set_share server=s1 share=1/5` -> kind `share`,
    server `s1`, text `s1's share -> 20 %`."""
    action, *rest = what.split() or [""]
    args = dict(part.partition("=")[::2] for part in rest)
    server = args.get("server") or args.get("vip_router") or ""
    kind = EVENT_KINDS.get(action, "other")
    if kind == "share":
        try:
            percent = f"{float(Fraction(args.get('share', ''))):.0%}"
        except (ValueError, ZeroDivisionError):
            percent = args.get("share", "?")
        text = f"{server}'s share set to {percent}"
    elif kind == "death":
        text = f"{server} dies"
    elif kind == "arrival":
        text = f"{server} joins"
    elif kind == "vip-failure":
        text = f"VIP router {server} fails"
    elif kind == "rebalance":
        text = f"rebalance by load (target {args.get('target', '?')})"
    elif kind == "rate":
        text = f"clients {args.get('clients', '?')} at {args.get('rate', '?')} requests/s"
    else:
        text = what
    return {"at": round(at, 3), "what": what, "kind": kind, "server": server, "text": text}


class Dashboard:
    """Frames for one run's page. `publish_live` / `publish_progress` are called from
    the pool's thread; a server takes frames with `take()` from its own thread,
    after `waker` (set by the server) tells it there is one."""

    def __init__(
        self,
        title: str,
        *,
        driver: str,
        duration: float,
        technique: str = "",
        private: bool = False,
        plan: Iterable[tuple[float, str]] = (),
    ) -> None:
        self.meta: Frame = {
            "title": title,
            "driver": driver,
            "duration": duration,
            "technique": technique,
            "technique_text": TECHNIQUES.get(technique, ""),
            "private": private,
            "plan": [describe_event(at, what) for at, what in sorted(plan) if at <= duration],
        }
        self.waker: Callable[[], None] | None = None
        self._frames: queue.SimpleQueue[Frame] = queue.SimpleQueue()
        self._lock = threading.Lock()  # publishers may be more than one thread
        self._last: Frame | None = None
        self._owners: dict[str, str] = {}
        self._moves: Counter[tuple[str, str]] = Counter()
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_MOVES)
        self._answers: dict[str, tuple[float, int]] = {}
        self._rates: dict[str, float] = {}
        self.closed = False

    # -- the pool's side ---------------------------------------------------------------
    def publish_live(self, view: LiveLike) -> None:
        """An in-process pool's snapshot (a `PoolRun.run` on_tick)."""
        servers = [
            {
                "name": s.name,
                "status": s.status,
                "share": s.share,
                "sessions": s.sessions,
                "requests_per_s": round(s.requests_per_s, 2),
                "epoch": s.epoch,
            }
            for s in view.servers
        ]
        self._publish(
            view.now,
            servers,
            {
                "total": view.clients,
                "served": view.served_recently,
                "requests_ok": view.requests_ok,
                "requests_failed": view.requests_failed,
                "resets": view.resets,
            },
            view.events,
            dict(view.owners),
            dict(view.carried),
            dict(view.refusals),
            [
                {
                    "name": v.name,
                    "status": v.status,
                    "packets_per_s": round(v.packets_per_s, 2),
                    "flows": v.flows,
                }
                for v in view.vip_routers
            ],
            {},
        )

    def publish_progress(self, progress: ProgressLike) -> None:
        """The kernel lab's report (a `LabRun.run` on_progress). The lab knows who
        answered each client last rather than the allocation's owner, and each
        server's answers rather than its sessions."""
        now = progress.now
        servers = []
        for name, status in sorted(progress.status.items()):
            count = progress.answers.get(name, 0)
            then, before = self._answers.get(name, (0.0, 0))
            if now > then:
                self._rates[name] = (count - before) / (now - then)
                self._answers[name] = (now, count)
            up = status == "up"
            servers.append(
                {
                    "name": name,
                    "status": status,
                    "share": progress.shares.get(name, 0.0) if up else 0.0,
                    "sessions": None,
                    "requests_per_s": round(self._rates.get(name, 0.0), 2) if up else 0.0,
                    "epoch": None,
                }
            )
        self._publish(
            now,
            servers,
            {
                "total": progress.clients,
                "served": progress.served,
                "requests_ok": sum(progress.answers.values()),
                "requests_failed": None,
                "resets": None,
            },
            progress.events,
            dict(progress.owners),
            {},
            dict(progress.refusals),
            [],
            {"kernel_entries": progress.entries},
        )

    def close(self, summary: Mapping[str, Any] | None = None) -> None:
        """The run is over: a last frame that says so (the page stops listening), with
        the run's summary (`summary.SUMMARY_KEYS`) when there is one."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            last = dict(self._last) if self._last is not None else {**self.meta, "now": 0.0}
            last["finished"] = True
            if summary is not None:
                last["summary"] = {key: summary.get(key) for key in SUMMARY_SHOWN}
            self._put(last)

    # -- the server's side -------------------------------------------------------------
    def take(self) -> Frame | None:
        """The newest frame waiting (older ones are dropped: each frame is whole)."""
        frame = None
        while True:
            try:
                frame = self._frames.get_nowait()
            except queue.Empty:
                return frame

    @property
    def last(self) -> Frame | None:
        return self._last

    # -- frames ------------------------------------------------------------------------
    def _publish(
        self,
        now: float,
        servers: list[dict[str, Any]],
        clients: dict[str, Any],
        events: Sequence[tuple[float, str]],
        owners: dict[str, str],
        carried: dict[str, int],
        refusals: dict[str, int],
        vip_routers: list[dict[str, Any]],
        extra: dict[str, Any],
    ) -> None:
        with self._lock:
            if self.closed:
                return
            moved_now = self._track_moves(now, owners)
            names = sorted(owners, key=_natural)[:MAX_DOTS]
            frame: Frame = {
                **self.meta,
                "now": round(now, 3),
                "finished": False,
                "servers": servers,
                "clients": clients,
                "events": [describe_event(at, what) for at, what in events],
                "dots": [[n, owners[n], n in moved_now] for n in names],
                "moves": [
                    {"from": a, "to": b, "clients": n}
                    for (a, b), n in sorted(self._moves.items(), key=lambda item: -item[1])
                ],
                "recent_moves": list(self._recent),
                "carried": carried,
                "refusals": dict(sorted(refusals.items())),
                "vip_routers": vip_routers,
                **extra,
            }
            self._put(frame)

    def _track_moves(self, now: float, owners: dict[str, str]) -> set[str]:
        """Clients whose server changed since the last frame; counted by (from, to)."""
        moved: set[str] = set()
        pairs: Counter[tuple[str, str]] = Counter()
        for client, server in owners.items():
            before = self._owners.get(client)
            if before is not None and before != server:
                moved.add(client)
                pairs[(before, server)] += 1
        self._owners.update(owners)
        self._moves.update(pairs)
        for (a, b), n in sorted(pairs.items()):
            self._recent.appendleft({"at": round(now, 3), "from": a, "to": b, "clients": n})
        return moved

    def _put(self, frame: Frame) -> None:
        self._last = frame
        self._frames.put(frame)
        waker = self.waker
        if waker is not None:
            waker()


def _natural(name: str) -> tuple[str, int, str]:
    """a2 before a10: clients sort by their group, then their number."""
    match = re.fullmatch(r"(.*?)(\d+)", name)
    return (match.group(1), int(match.group(2)), "") if match else (name, -1, name)
