"""The live web dashboard: an ASGI app that pushes a `Dashboard`'s frames to browsers.

The app (starlette) serves one page and its script and style from `static/`
(nothing fetched from elsewhere: the page's content security policy allows only
this origin), the newest frame at `/state`, and every frame as it comes as
server-sent events at `/events`. `WebServer` runs it on uvicorn in a thread of
its own beside the pool's loop; the pool publishes to the `Dashboard`, whose
queue the server's loop drains when woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from manycast.errors import ManycastError
from manycast.observe.dashboard import Dashboard, Frame

STATIC = Path(__file__).with_name("static")
DEFAULT_HOST = "127.0.0.1"
KEEPALIVE_S = 10.0  # a comment line on an idle stream, so proxies keep it open
STARTUP_TIMEOUT_S = 15.0
# The page may load only what this server serves (no CDN, no inline code).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class WebError(ManycastError, OSError):
    """The dashboard cannot be served as asked (a bad address, a port in use)."""


def parse_address(text: str) -> tuple[str, int]:
    """`[HOST:]PORT` -> (host, port); the host defaults to 127.0.0.1 and may be an
    IPv6 address in brackets (`[::1]:8080`). Port 0 picks a free one."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise WebError(f"--web {text!r}: write an IPv6 host in brackets, [::1]:8080")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise WebError(f"--web {text!r}: expected [HOST:]PORT with a port 0-65535")
    return host or DEFAULT_HOST, int(port)


class _Hub:
    """Lives on the server's loop: the newest frame, its number, and who waits."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.seq = 0
        self.text = ""  # the newest frame as JSON (encoded once for every browser)
        self.finished = False
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Called on the loop (through call_soon_threadsafe): frames are waiting."""
        self._wake.set()

    async def pump(self) -> None:
        """Move frames from the dashboard's queue to the browsers, until the last."""
        while not self.finished:
            await self._wake.wait()
            self._wake.clear()
            frame = self.dashboard.take()
            if frame is not None:
                await self._set(frame)

    async def _set(self, frame: Frame) -> None:
        async with self._changed:
            self.seq += 1
            self.text = json.dumps(frame, separators=(",", ":"))
            self.finished = bool(frame.get("finished"))
            self._changed.notify_all()

    async def newer(self, seq: int, timeout: float) -> tuple[int, str, bool] | None:
        """The newest frame after `seq`, or None after `timeout` seconds without one."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.seq > seq), timeout=timeout
                )
            if self.seq <= seq:
                return None
            return self.seq, self.text, self.finished


def create_app(dashboard: Dashboard) -> Starlette:
    """The ASGI app for one dashboard (its hub is made on the app's loop at startup)."""
    holder: list[_Hub] = []

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        hub = _Hub(dashboard)
        holder.append(hub)
        loop = asyncio.get_running_loop()

        def waker() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(hub.wake)

        dashboard.waker = waker
        hub.wake()  # frames published before the server started
        pump = asyncio.create_task(hub.pump())
        try:
            yield
        finally:
            dashboard.waker = None
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    def hub() -> _Hub:
        return holder[-1]

    async def index(_: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_page_headers())

    async def state(_: Request) -> Response:
        frame = dashboard.last
        return JSONResponse(frame if frame is not None else dashboard.meta)

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            seq = 0
            while True:
                got = await hub().newer(seq, KEEPALIVE_S)
                if got is None:
                    if await request.is_disconnected():
                        return
                    yield ": keepalive\n\n"
                    continue
                seq, text, finished = got
                yield f"id: {seq}\nevent: frame\ndata: {text}\n\n"
                if finished:
                    return

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return Starlette(
        routes=[
            Route("/", index),
            Route("/state", state),
            Route("/events", events),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )


def _page_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


class WebServer:
    """Serves a dashboard on uvicorn in a background thread.

    The socket is bound at construction, in the caller's thread, so a bad address or
    a port in use is an error there (`WebError`); `start()` returns once the server
    answers. Leaving the `with` block ends the page's stream with a last frame and
    stops the server."""

    def __init__(self, dashboard: Dashboard, address: str) -> None:
        self.dashboard = dashboard
        host, port = parse_address(address)
        self._sock = _bind(host, port)
        bound = self._sock.getsockname()
        self.host, self.port = host, int(bound[1])
        self.app = create_app(dashboard)
        config = uvicorn.Config(
            self.app,
            log_config=None,  # leave the program's logging alone
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="manycast-web", daemon=True)
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = socket.gethostname()
        return f"http://{host}:{self.port}/"

    def start(self) -> WebServer:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise WebError(f"the dashboard did not start on {self.url}: {self._failure}")
            time.sleep(0.02)
        return self

    def _serve(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # reported by start() or stop()
            self._failure = exc

    def stop(self, timeout: float = 5.0) -> None:
        """The last frame to the pages (they keep showing it), then stop serving."""
        self.dashboard.close()
        if self._thread.is_alive():
            # Give open streams a moment to send the last frame before closing them.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and self._streams_open():
                time.sleep(0.02)
            self._server.should_exit = True
            self._thread.join(timeout)
        self._sock.close()

    def _streams_open(self) -> bool:
        return bool(self._server.server_state.connections)

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise WebError(f"--web: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise WebError(f"--web: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock
