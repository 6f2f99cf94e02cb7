"""The live web dashboard: its frames, its server, and the page in a real browser.

The browser test runs `manycast demo --web` on the bundled demo topology (s1's
share set to 1/5 at 5 s, s3 killed at 10 s) and reads the page's DOM in headless
Chromium (Debian's, driven by Playwright; no browser download). It skips only
where Chromium is missing and cannot be installed here (not root): `make
web-deps` installs it, and `make test` does so as root.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.request import urlopen

import pytest

from labcheck import lab_missing
from manycast.observe.dashboard import Dashboard, describe_event
from manycast.observe.web import WebError, WebServer, parse_address
from manycast.runtime import LiveView, ServerView
from manycast.steps import Kill, SetShare
from manycast.topology import builtin

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
DEADLINE = 45.0  # generous: a busy 2-core machine


# -- frames ------------------------------------------------------------------------------
def _view(now: float, shares: dict[str, float], owners: dict[str, str], **kw: Any) -> LiveView:
    servers = tuple(
        ServerView(name, "up" if share > 0 else "dead", share, 10, 5.0, 1)
        for name, share in shares.items()
    )
    return LiveView(
        now,
        servers,
        len(owners),
        len(owners),
        100,
        0,
        0,
        kw.pop("events", ()),
        technique="R1",
        owners=tuple(owners.items()),
        carried=(("reset", 3),),
        **kw,
    )


def test_frames_track_clients_moving_between_servers() -> None:
    board = Dashboard(
        "t", driver="memory", duration=20.0, technique="R1", plan=[(5.0, "kill server=s2")]
    )
    board.publish_live(_view(1.0, {"s1": 0.5, "s2": 0.5}, {"a1": "s1", "a2": "s2", "a10": "s2"}))
    board.publish_live(
        _view(
            6.0,
            {"s1": 1.0, "s2": 0.0},
            {"a1": "s1", "a2": "s1", "a10": "s1"},
            events=((5.0, "kill server=s2"),),
            refusals=(("bad signature", 2),),
        )
    )
    frame = board.take()
    assert frame is not None and board.take() is None  # the newest only: each frame is whole
    assert frame["now"] == 6.0 and not frame["finished"]
    assert frame["moves"] == [{"from": "s2", "to": "s1", "clients": 2}]
    assert frame["recent_moves"] == [{"at": 6.0, "from": "s2", "to": "s1", "clients": 2}]
    # dots in natural order (a2 before a10), the moved ones marked
    assert frame["dots"] == [["a1", "s1", False], ["a2", "s1", True], ["a10", "s1", True]]
    assert frame["events"][0]["kind"] == "death" and frame["events"][0]["server"] == "s2"
    assert frame["refusals"] == {"bad signature": 2}
    assert frame["carried"] == {"reset": 3}
    assert [s["name"] for s in frame["servers"]] == ["s1", "s2"]
    json.dumps(frame)  # every frame is JSON
    board.close({"clients": 3, "clients_served_at_end": 3, "events": [], "driver": "memory"})
    last = board.take()
    assert last is not None and last["finished"] and last["now"] == 6.0
    assert last["summary"]["clients_served_at_end"] == 3 and "driver" not in last["summary"]
    board.publish_live(_view(7.0, {"s1": 1.0}, {}))  # after the end: ignored
    assert board.take() is None


def test_lab_progress_frames() -> None:
    from manycast.lab.run import Progress

    board = Dashboard("lab", driver="kernel", duration=10.0)
    for now, answers in ((1.0, {"s1": 10, "s2": 10}), (2.0, {"s1": 30, "s2": 15})):
        board.publish_progress(
            Progress(
                now,
                4,
                4,
                answers,
                12,
                status={"s1": "up", "s2": "up", "s3": "dead"},
                shares={"s1": 0.75, "s2": 0.25},
                owners={"a1": "s1", "a2": "s2" if now < 2 else "s1"},
                refusals={"wrong link": 1},
            )
        )
    frame = board.take()
    assert frame is not None
    s1, s2, s3 = frame["servers"]
    assert (s1["share"], s1["requests_per_s"], s2["requests_per_s"]) == (0.75, 20.0, 5.0)
    assert s3["status"] == "dead" and s3["share"] == 0.0
    assert frame["kernel_entries"] == 12 and frame["refusals"] == {"wrong link": 1}
    assert frame["moves"] == [{"from": "s2", "to": "s1", "clients": 1}]


def test_events_read_as_a_person_would() -> None:
    share = SetShare(at=5.0, server="s1", share=Fraction(1, 5))
    assert describe_event(5.0, share.describe()) == {
        "at": 5.0,
        "what": "set_share server=s1 share=1/5",
        "kind": "share",
        "server": "s1",
        "text": "s1's share set to 20%",
    }
    assert describe_event(10.0, Kill(at=10.0, server="s3").describe())["text"] == "s3 dies"
    assert describe_event(3.0, "kill_vip_router vip_router=v1")["kind"] == "vip-failure"
    assert describe_event(3.0, "add server=s5")["kind"] == "arrival"
    assert describe_event(3.0, "something new")["kind"] == "other"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080", ("127.0.0.1", 8080)),
        ("0", ("127.0.0.1", 0)),
        ("0.0.0.0:9000", ("0.0.0.0", 9000)),
        ("localhost:80", ("localhost", 80)),
        ("[::1]:8080", ("::1", 8080)),
        (":8080", ("127.0.0.1", 8080)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "web", "127.0.0.1:", "1:2:3", "99999", "host:-1"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(WebError, match="--web"):
        parse_address(text)


# -- the server --------------------------------------------------------------------------
def test_server_pushes_frames_and_ends_the_stream() -> None:
    board = Dashboard("t", driver="memory", duration=5.0)
    board.publish_live(_view(0.5, {"s1": 1.0}, {"a1": "s1"}))
    with WebServer(board, "127.0.0.1:0") as server:
        assert server.url.startswith("http://127.0.0.1:")
        with urlopen(server.url, timeout=DEADLINE) as page:
            html = page.read().decode()
            assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        # the page loads only what this server serves
        assert not re.search(r"(src|href)=\"(https?:)?//", html)
        for asset in re.findall(r"(?:src|href)=\"(/static/[^\"]+)\"", html):
            with urlopen(server.url.rstrip("/") + asset, timeout=DEADLINE) as reply:
                assert reply.status == 200
        with urlopen(server.url + "state", timeout=DEADLINE) as reply:
            assert json.load(reply)["now"] == 0.5
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
        conn.request("GET", "/events")
        stream = conn.getresponse()
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        first = _next_frame(stream)
        assert first["now"] == 0.5
        board.publish_live(_view(1.5, {"s1": 1.0}, {"a1": "s1"}))
        assert _next_frame(stream)["now"] == 1.5
    # leaving the block sent the last frame, and the stream ended after it
    assert _next_frame(stream)["finished"]
    assert stream.read().strip() == b""  # the blank line that ends the last event
    conn.close()


def _next_frame(stream: http.client.HTTPResponse) -> dict[str, Any]:
    while True:
        line = stream.readline()
        assert line, "the stream ended"
        if line.startswith(b"data: "):
            frame: dict[str, Any] = json.loads(line[len(b"data: ") :])
            return frame


def test_web_address_errors_are_clear(tmp_path: Path) -> None:
    board = Dashboard("t", driver="memory", duration=5.0)
    with WebServer(board, "127.0.0.1:0") as server:
        busy = subprocess.run(
            [sys.executable, "-m", "manycast", "demo", "--web", f"127.0.0.1:{server.port}"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert busy.returncode == 2
    assert f"cannot listen on 127.0.0.1:{server.port}" in busy.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "manycast", "demo", "--web", "nowhere"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "expected [HOST:]PORT" in bad.stderr
    assert "Traceback" not in bad.stderr + busy.stderr


# -- the page in Chromium ----------------------------------------------------------------
def _chromium() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail(f"{CHROMIUM} is missing: `make web-deps` installs Debian's chromium (root)")
    pytest.skip(
        f"{CHROMIUM} is missing and this is not root: Debian's chromium cannot be installed "
        "here (`sudo make web-deps` installs it)"
    )


def _wait_for_url(log: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        found = re.search(r"dashboard: (http://\S+)", log.read_text())
        if found:
            return found.group(1)
        assert proc.poll() is None, f"the demo exited early:\n{log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"no dashboard address within {DEADLINE} s:\n{log.read_text()}")


@contextlib.contextmanager
def demo_page(tmp_path: Path, *options: str) -> Iterator[Page]:
    """`manycast demo --driver memory --web 127.0.0.1:0 OPTIONS` with its page open in
    headless Chromium. On leaving: the page had no script error, and the demo, run
    to its end, exited 0 (every client served)."""
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    log = tmp_path / "demo.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "manycast", "demo", "--driver", "memory"),
                *("--web", "127.0.0.1:0", *options),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=tmp_path,
        )
    try:
        url = _wait_for_url(log, proc)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1300, "height": 1000})
                problems: list[str] = []
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                page.on(
                    "console",
                    lambda msg: problems.append(msg.text) if msg.type == "error" else None,
                )
                page.goto(url)
                yield page
                # the run ends; the page says so and keeps the last picture
                page.wait_for_function(
                    "() => document.body.dataset.state === 'finished'", timeout=WAIT_MS
                )
                assert page.locator("#slices [data-server]").count() > 0
                # with the run's summary: every client served at the end (the exit status)
                summary = page.locator("#summary")
                assert summary.is_visible() and "clients served at the end" in summary.inner_text()
                served = summary.get_attribute("data-served-at-end")
                assert served is not None and int(served) > 0
                assert not problems, problems
            finally:
                browser.close()
        assert proc.wait(timeout=DEADLINE) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


WAIT_MS = DEADLINE * 1000
SHARES_JS = """() => Object.fromEntries([...document.querySelectorAll('#slices [data-server]')]
    .map(s => [s.dataset.server, Number(s.dataset.share)]))"""


def assert_pngs(directory: Path, *names: str) -> None:
    for name in names:
        assert (directory / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshots: {directory}")


@pytest.mark.slow
def test_demo_dashboard_in_chromium(tmp_path: Path) -> None:
    """The pie follows the demo's scenario: s1 at 25 % then 20 %, s3's slice gone when it
    dies; screenshots of the three moments are kept in tmp_path."""
    topo = builtin("demo")
    steps = {(type(s).__name__, getattr(s, "server", None)): s.at for s in topo.scenario}
    # the bundled scenario this test follows
    assert steps[("SetShare", "s1")] == 5.0 and steps[("Kill", "s3")] == 10.0
    assert next(s for s in topo.scenario if isinstance(s, SetShare)).share == Fraction(1, 5)

    with demo_page(tmp_path, "--duration", "13") as page:
        # 1. the first frames: four equal slices unless the change came already
        page.wait_for_selector("#slices [data-server]", timeout=WAIT_MS)
        shares = page.evaluate(SHARES_JS)
        if page.locator("#events li.done").count() == 0:
            assert shares == pytest.approx(
                {"s1": 0.25, "s2": 0.25, "s3": 0.25, "s4": 0.25}, abs=0.002
            )
        page.screenshot(path=tmp_path / "1-start.png", full_page=True)

        # 2. s1's share set to 20 % at 5 s (Fig 11)
        page.wait_for_function(
            """() => { const s = document.querySelector('#slices [data-server="s1"]');
                       return s && Math.abs(Number(s.dataset.share) - 0.2) < 0.002; }""",
            timeout=WAIT_MS,
        )
        shares = page.evaluate(SHARES_JS)
        assert round(shares["s1"] * 100) == 20
        assert "s3" in shares and sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
        assert page.locator('#labels [data-server="s1"]').text_content() == "s1 20 %"
        event = page.locator('#events li.done[data-kind="share"][data-server="s1"]')
        assert "20%" in event.inner_text()
        page.screenshot(path=tmp_path / "2-share.png", full_page=True)

        # 3. s3 dies at 10 s: its slice goes, the others share the whole space
        page.wait_for_function(
            "() => !document.querySelector('#slices [data-server=\"s3\"]')", timeout=WAIT_MS
        )
        assert "s3" not in page.evaluate(SHARES_JS)
        page.wait_for_function(
            f"""() => {{ const shares = Object.values(({SHARES_JS})());
                         return Math.abs(shares.reduce((a, b) => a + b, 0) - 1) < 0.001; }}""",
            timeout=WAIT_MS,
        )
        assert set(page.evaluate(SHARES_JS)) == {"s1", "s2", "s4"}
        row = page.locator('#servers tr[data-server="s3"]')
        assert row.get_attribute("data-status") == "dead"
        assert page.locator('#events li.done[data-kind="death"][data-server="s3"]').count()
        # the clients s3 had are shown moving to the others
        page.wait_for_selector('#moves tr[data-from="s3"]', timeout=WAIT_MS)
        assert page.locator('#dots [data-server="s3"]').count() == 0
        page.screenshot(path=tmp_path / "3-death.png", full_page=True)
        # after the run, each step's outcome from the summary
        outcome = page.locator('#events li.done[data-kind="death"] .outcome')
        outcome.wait_for(timeout=WAIT_MS)
        assert int(outcome.get_attribute("data-affected") or "0") > 0
        assert "served again after" in outcome.inner_text()
        page.screenshot(path=tmp_path / "4-finished.png", full_page=True)
    assert_pngs(tmp_path, "1-start.png", "2-share.png", "3-death.png", "4-finished.png")


PRIVATE_POOL = """
[pool]
name = "vault.pool.test"
group = "232.5.5.5"
private = true
heartbeat_ms = 100
report_interval_ms = 500
index_bits = 10

[[router]]
name = "ra"
[[router]]
name = "core"
[[router]]
name = "rs"

[[link]]
between = ["ra", "core"]
delay_ms = 2
[[link]]
between = ["core", "rs"]
delay_ms = 1

[[server]]
name = "s1"
router = "rs"
[[server]]
name = "s2"
router = "rs"
[[server]]
name = "evil"         # knows the group, not the key: its joins are refused
router = "core"
authorized = false

[[clients]]
name = "a"
count = 12
router = "ra"
subnet = "10.1.0.0/24"
rate = 4.0
[[clients]]
name = "x"            # outsiders: their packets to the group are refused
count = 4
router = "ra"
subnet = "10.6.0.0/24"
rate = 4.0
authorized = false

[run]
duration = 4.0
"""


@pytest.mark.slow
def test_private_pool_refusals_in_chromium(tmp_path: Path) -> None:
    """A private pool's page counts the routers' refusals by reason: the outsider
    server's joins (signed with a key that is not the pool's) and the outsider
    clients' packets; the outsiders get no slice and no dot."""
    topology = tmp_path / "private.toml"
    topology.write_text(PRIVATE_POOL)
    with demo_page(tmp_path, "--topology", str(topology)) as page:
        for reason in ("bad signature", "unauthorized sender"):
            page.wait_for_selector(f'#refusals tr[data-reason="{reason}"]', timeout=WAIT_MS)
            count = page.locator(f'#refusals tr[data-reason="{reason}"] td.num').inner_text()
            assert int(count) > 0
        assert page.locator('#servers tr[data-server="evil"]').get_attribute("data-status") == (
            "outsider"
        )
        assert set(page.evaluate(SHARES_JS)) == {"s1", "s2"}
        assert page.locator("#dots [data-client]").count() == 12
        assert page.locator('#dots [data-client^="x"]').count() == 0
        assert "private pool" in page.locator("#meta").inner_text()
        page.screenshot(path=tmp_path / "private.png", full_page=True)
    assert_pngs(tmp_path, "private.png")


# -- the same option on `manycast run` and `manycast lab run` ----------------------------
def _frames_until(
    proc: subprocess.Popen[bytes], log: Path, done: Any, deadline_s: float = 90.0
) -> dict[str, Any]:
    """Poll the run's /state until `done(frame)` holds; the frame."""
    url = _wait_for_url(log, proc)
    deadline = time.monotonic() + deadline_s
    frame: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            with urlopen(url + "state", timeout=DEADLINE) as reply:
                frame = json.load(reply)
        except OSError:
            if proc.poll() is not None:  # the run ended, and its server with it
                break
            raise
        if done(frame):
            return frame
        time.sleep(0.2)
    raise AssertionError(f"the page never showed it; last frame {frame}:\n{log.read_text()}")


def _share(frame: dict[str, Any], server: str) -> float:
    return float(next(s["share"] for s in frame.get("servers", ()) if s["name"] == server))


def test_run_serves_the_dashboard(tmp_path: Path) -> None:
    """`manycast run FILE --web` on the overlay: the page follows s1's share change."""
    from manycast.ports import free_base_port

    base = free_base_port(builtin("demo").attachment_count)
    log = tmp_path / "run.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "manycast", "run", "demo", "--duration", "9"),
                *("--base-port", str(base), "--web", "127.0.0.1:0"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=tmp_path,
        )
    try:
        frame = _frames_until(
            proc, log, lambda f: f.get("servers") and abs(_share(f, "s1") - 0.2) < 0.002
        )
        assert frame["driver"] == "overlay" and frame["title"] == "manycast run demo"
        assert [e["kind"] for e in frame["events"]] == ["share"]
        assert len(frame["dots"]) == 240
        # 0 or 1 is the pool's verdict (every client served at the end or not: a busy
        # machine's business, see test_pool_overlay); the dashboard must not crash it.
        assert proc.wait(timeout=DEADLINE) in (0, 1), log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _lab_possible() -> str | None:
    return lab_missing()


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
def test_lab_run_serves_the_dashboard(tmp_path: Path) -> None:
    """`manycast lab run --web`: the page shows the kernel lab's pool, with the shares
    its agents report, who answered each client, and s1's share change."""
    log = tmp_path / "lab.log"
    prefix = f"wb{os.getpid() % 100000}"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "manycast", "lab", "run", "--prefix", prefix),
                *("--duration", "8", "--web", "127.0.0.1:0"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=tmp_path,
        )
    try:
        frame = _frames_until(
            proc,
            log,
            lambda f: f.get("events") and f["servers"] and abs(_share(f, "s1") - 0.2) < 0.002,
        )
        assert frame["driver"] == "kernel" and frame["kernel_entries"] > 0
        assert {s["name"]: s["status"] for s in frame["servers"]}["s5"] == "standby"
        assert frame["events"][0]["kind"] == "share"
        assert len(frame["dots"]) == 240  # each client with the server that answered it
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
        subprocess.run(
            [sys.executable, "-m", "manycast", "lab", "down", "--prefix", prefix],
            capture_output=True,
            timeout=120,
        )
