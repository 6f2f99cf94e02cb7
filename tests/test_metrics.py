"""Prometheus metrics: live pools scraped over HTTP and read with prometheus_client's parser.

`manycast demo --metrics` and `manycast run --metrics` (the overlay, real UDP) are
scraped while they run; a memory-driver pool is scraped after a deterministic run
and its metrics compared with its summary; the lab's one scrape target (`manycast
lab metrics`) is scraped from the host (root only); and, where Debian's
`prometheus` is installed (`make observe-deps`, which `make test` runs as root), a
real Prometheus server scrapes a demo and answers a query over its HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from labcheck import lab_missing
from manycast.observe.metrics import (
    FederatedCollector,
    MetricsError,
    MetricsServer,
    PoolCollector,
    exposition,
    federate,
    parse_address,
    registry,
)
from manycast.runtime import PoolRun
from manycast.topology import builtin

DEADLINE = 60.0  # generous: a busy 2-core machine
ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMETHEUS_MISSING = (
    "Debian's prometheus is not installed: `sudo make observe-deps` installs it "
    "(make test does, as root)"
)

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
duration = 30.0
"""


# -- reading a scrape ----------------------------------------------------------------------


class Scrape:
    """One scrape, parsed: families by name and samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def values(self, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Samples named `name` whose labels include `labels`: {sorted labels: value}."""
        return {
            tuple(sorted(s.labels.items())): s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        }

    def value(self, name: str, **labels: str) -> float:
        found = self.values(name, **labels)
        assert len(found) == 1, (name, labels, found)
        return next(iter(found.values()))

    def total(self, name: str, **labels: str) -> float:
        return sum(self.values(name, **labels).values())

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """{value of `label`: the sum of the samples that have it}."""
        sums: dict[str, float] = {}
        for key, value in self.values(name, **labels).items():
            sums[dict(key)[label]] = sums.get(dict(key)[label], 0.0) + value
        return sums


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        return Scrape(answer.read().decode())


def scrape_until(
    url: str, condition: Callable[[Scrape], bool], what: str, deadline: float = DEADLINE
) -> Scrape:
    """Scrape every 0.2 s until `condition` holds; fail saying `what` did not happen."""
    end = time.monotonic() + deadline
    last: Scrape | None = None
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            last = scrape(url)
            if condition(last):
                return last
        time.sleep(0.2)
    pytest.fail(f"{what}: not seen within {deadline} s; last scrape:\n{last and last.text[:3000]}")


def up_shares(s: Scrape) -> dict[str, float]:
    up = s.by("manycast_server_status", "server", status="up")
    shares = s.by("manycast_server_share_ratio", "server")
    return {name: shares[name] for name, flag in up.items() if flag == 1.0}


def agreed(s: Scrape) -> bool:
    """All live servers at one epoch, their shares covering the whole space."""
    up = s.by("manycast_server_status", "server", status="up")
    epochs = {v for k, v in s.by("manycast_server_allocation_epoch", "server").items() if up[k]}
    shares = up_shares(s)
    return len(epochs) == 1 and bool(shares) and abs(sum(shares.values()) - 1.0) < 1e-9


# -- a CLI that prints where its metrics are -------------------------------------------------


class Cli:
    """`python -m manycast ARGS` in the background; stderr read on a thread so that
    the program never blocks on a full pipe, and the first URL it prints kept."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "manycast", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self._urls: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"(http://\S+/metrics)", line)
            if found:
                self._urls.put(found.group(1))

    def url(self, timeout: float = DEADLINE) -> str:
        try:
            return self._urls.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            pytest.fail("no metrics URL printed:\n" + "".join(self.lines[-40:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code


@contextlib.contextmanager
def cli(args: list[str], env: dict[str, str] | None = None) -> Iterator[Cli]:
    program = Cli(args, env)
    try:
        yield program
    finally:
        program.stop()


# -- the exposition ------------------------------------------------------------------------


def test_names_follow_prometheus_conventions_and_docs_list_every_metric() -> None:
    """Every family of a manycast pool and of a VIP pool: `manycast_` prefix, counters
    exposed with `_total`, ratios named so, and each listed in docs/metrics.md."""
    names: dict[str, str] = {}
    for topology, seconds in ((builtin("demo"), 6.0), (builtin("vip"), 3.0)):
        run = PoolRun(topology, "memory", seed=1)
        run.run(seconds)
        parsed = Scrape(exposition(registry(PoolCollector.for_pool(run), process=False)))
        for family in parsed.families.values():
            names[family.name] = family.type
            assert family.documentation, family.name
            if family.type == "counter":
                assert {s.name for s in family.samples} == {family.name + "_total"}
    assert names, "no metrics"
    for name, kind in names.items():
        assert name.startswith("manycast_"), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        if kind == "gauge" and "share" in name:
            assert name.endswith("_ratio"), name
    docs = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(manycast_[a-z0-9_]+)`", docs, re.MULTILINE))
    # docs name counters as exposed (`..._total`)
    exposed = {n + ("_total" if k == "counter" else "") for n, k in names.items()}
    assert exposed - documented == set(), "metrics missing from docs/metrics.md"
    assert documented - exposed == set(), "docs/metrics.md lists metrics nobody exposes"


def test_memory_pool_metrics_match_its_summary() -> None:
    """The demo on the memory driver (one seed, one run), scraped over HTTP after 8 s:
    the figures a user reads agree with the run's summary."""
    run = PoolRun(builtin("demo"), "memory", seed=1)
    with MetricsServer(registry(PoolCollector.for_pool(run)), "127.0.0.1:0") as server:
        run.run(8.0)  # s1 set to 1/5 at 5 s
        got = scrape(server.url)
    summary = run.summary()
    shares = up_shares(got)
    assert set(shares) == {"s1", "s2", "s3", "s4"}
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert abs(shares["s1"] - 0.2) < 1e-4
    assert got.value("manycast_server_status", server="s5", status="standby") == 1.0
    for name, record in summary["servers"].items():
        assert got.value("manycast_server_requests_total", server=name) == record["requests"]
        assert got.value("manycast_server_allocation_epoch", server=name) == record["epoch"]
        # R1: the connections reset when their portion moved
        moved = got.value(
            "manycast_server_connections_moved_total", server=name, technique="R1", direction="out"
        )
        assert moved == record["sessions_reset"]
    assert got.total("manycast_client_requests_total", outcome="ok") == summary["requests_ok"]
    assert (
        got.total("manycast_client_requests_total", outcome="failed") == summary["requests_failed"]
    )
    assert got.total("manycast_clients") == summary["clients"] == 240
    assert got.total("manycast_clients_answered") == summary["clients_served_at_end"]
    assert got.total("manycast_client_resets_total") == summary["resets"]
    epochs = got.by("manycast_server_allocation_epoch", "server")
    assert got.value("manycast_pool_allocation_epoch") == max(epochs.values()) >= 2
    assert got.value("manycast_pool_info", technique="R1", policy="equal") == 1.0
    assert sum(got.by("manycast_server_role", "server", role="coordinator").values()) == 1.0
    # The routers forwarded the clients' packets and admitted the servers' joins.
    assert got.total("manycast_router_packets_forwarded_total", kind="multicast") > 1000
    assert got.value("manycast_router_joins_admitted_total", router="rs1") > 0
    assert got.value("manycast_router_forwarding_entries", router="ra") >= 120
    assert got.total("manycast_router_joins_refused_total") == 0  # a public pool
    assert got.values("process_cpu_seconds_total")  # the process's own figures too


@pytest.mark.slow
def test_demo_metrics_while_it_runs_on_the_overlay() -> None:
    """`manycast demo --metrics` (the overlay): scraped while it runs, the shares of
    the live servers sum to 1, requests grow, and s1 goes to 20 % at 5 s."""
    args = ["demo", "--metrics", "127.0.0.1:0", "--duration", "40", "--json"]
    with cli([*args, "--base-port", "48200"]) as demo:
        url = demo.url()
        first = scrape_until(url, agreed, "the four servers agreeing on one allocation")
        assert set(up_shares(first)) == {"s1", "s2", "s3", "s4"}
        before = first.total("manycast_server_requests_total")
        later = scrape_until(
            url,
            lambda s: s.total("manycast_server_requests_total") > before,
            "answered requests growing",
        )
        assert later.total("manycast_client_requests_total", outcome="ok") > 0

        def shrunk(s: Scrape) -> bool:
            shares = up_shares(s)
            return agreed(s) and abs(shares.get("s1", 0.0) - 0.2) < 1e-4

        changed = scrape_until(url, shrunk, "s1 at 20 % after its share change")
        assert changed.value("manycast_pool_allocation_epoch") >= 2
        family = changed.families["manycast_server_requests"]
        assert family.type == "counter" and family.documentation


@pytest.mark.slow
def test_private_pool_refusals_by_reason(tmp_path: Path) -> None:
    """`manycast run --metrics` on a private pool: the outsider server's joins are
    refused for their signature, the outsider clients' packets as unauthorized
    senders; the outsiders get no answer, the pool's clients do."""
    topology = tmp_path / "private.toml"
    topology.write_text(PRIVATE_POOL)
    with cli(["run", str(topology), "--metrics", "0", "--json", "--base-port", "48600"]) as pool:
        url = pool.url()

        def refused(s: Scrape) -> bool:
            joins = s.by("manycast_router_joins_refused_total", "reason")
            dropped = s.by("manycast_router_packets_dropped_total", "reason")
            answered = s.by("manycast_clients_answered", "population")
            return (
                joins.get("bad signature", 0) > 0
                and dropped.get("unauthorized sender", 0) > 0
                and answered.get("a", 0) == 12
            )

        got = scrape_until(url, refused, "refusals by reason and the members answered")
    # every reason is exposed, the ones that did not happen at 0
    reasons = got.by("manycast_router_joins_refused_total", "reason", router="core")
    assert {"bad signature", "unsigned", "duplicate", "stale", "wrong link"} <= set(reasons)
    assert "unauthorized sender" not in reasons  # a dropped packet, not a refused join
    assert got.value("manycast_server_status", server="evil", status="outsider") == 1.0
    assert got.value("manycast_server_share_ratio", server="evil") == 0.0
    assert got.total("manycast_client_requests_total", population="x", outcome="ok") == 0
    assert got.value("manycast_clients_answered", population="x") == 0
    assert got.value("manycast_pool_info", private="true") == 1.0


# -- the lab's one scrape target ----------------------------------------------------------------


def test_federate_labels_every_sample_with_its_node() -> None:
    texts = {}
    for node, value in (("r1", 3.0), ("r2", 5.0)):
        family = CounterMetricFamily("manycast_test_packets", "Packets.", labels=["router"])
        family.add_metric([node], value)

        class One:
            def collect(self, family: CounterMetricFamily = family) -> Iterator[object]:
                yield family

        reg = CollectorRegistry(auto_describe=False)
        reg.register(One())  # type: ignore[arg-type]
        texts[node] = exposition(reg)
    reg = registry(FederatedCollector(lambda: texts), process=False)
    merged = Scrape(exposition(reg))
    assert merged.families["manycast_test_packets"].type == "counter"
    assert merged.by("manycast_test_packets_total", "node") == {"r1": 3.0, "r2": 5.0}
    assert merged.value("manycast_test_packets_total", node="r2", router="r2") == 5.0
    assert len(federate(texts)) == 1


def test_metrics_addresses() -> None:
    assert parse_address("9100") == ("127.0.0.1", 9100)
    assert parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("::1:9100", "x:70000", "host:", ":9100"):
        with pytest.raises(MetricsError):
            parse_address(bad)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match="cannot serve metrics"):
            MetricsServer(CollectorRegistry(), f"127.0.0.1:{port}").start()


def test_cli_refuses_a_bad_metrics_address() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "manycast", "demo", "--driver", "memory", "--metrics", "x:99999"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert "--metrics 'x:99999'" in done.stderr


def _lab_possible() -> str | None:
    return lab_missing()


LAB_TOPOLOGY = """
[pool]
group = "232.1.1.1"
port = 7000
control_group = "239.255.77.1"
heartbeat_ms = 100
report_interval_ms = 1000

[[router]]
name = "ra"
[[router]]
name = "rs"

[[link]]
between = ["ra", "rs"]

[[server]]
name = "s1"
router = "rs"
[[server]]
name = "s2"
router = "rs"

[[clients]]
name = "a"
count = 4
router = "ra"
subnet = "10.1.0.0/24"
rate = 4.0
"""


@pytest.mark.lab
@pytest.mark.skipif(_lab_possible() is not None, reason=_lab_possible() or "")
def test_lab_metrics_one_target_for_every_daemon(tmp_path: Path) -> None:
    """`manycast lab metrics` serves, from the host, every daemon's metrics with a
    `node` label: the servers' shares cover the space, the routers admitted joins,
    and a client's datagram makes a kernel forwarding entry appear."""
    from manycast.lab import Lab

    lab = Lab(prefix=f"mm{os.getpid()}", run_root=tmp_path)
    env = {**os.environ, "MANYCAST_LAB_RUN_ROOT": str(tmp_path)}
    lab.down()
    try:
        topology = lab.up(LAB_TOPOLOGY, "metrics-lab.toml")
        args = ["lab", "metrics", "--prefix", lab.prefix, "--port", "0", "--seconds", "120"]
        with cli(args, env) as proxy:
            url = proxy.url()

            def settled(s: Scrape) -> bool:
                shares = s.by("manycast_server_share_ratio", "node")
                admitted = s.by("manycast_router_joins_admitted_total", "node")
                return (
                    set(shares) == {"s1", "s2"}
                    and abs(sum(shares.values()) - 1.0) < 1e-9
                    and set(admitted) == {"ra", "rs"}
                    and all(v > 0 for v in admitted.values())
                )

            got = scrape_until(url, settled, "both servers sharing the space, joins admitted")
            # one node label per daemon, equal to the node the sample is about
            assert got.value("manycast_server_share_ratio", node="s1", server="s1") > 0
            assert got.value("manycast_router_joins_admitted_total", node="ra", router="ra") > 0
            assert got.values("process_cpu_seconds_total", node="rs")
            group, port = topology.pool.group, topology.pool.port
            send = f"echo hi | socat -t 1 - UDP4-DATAGRAM:{group}:{port},ip-multicast-ttl=8"
            if shutil.which("socat") is None:
                pytest.skip("needs socat for a client's datagram (make lab-deps)")
            lab.popen("a1", ["sh", "-c", send], stdout=subprocess.DEVNULL).wait(timeout=30)
            scrape_until(
                url,
                lambda s: s.value("manycast_router_forwarding_entries", node="ra") > 0,
                "the client's (S, G) entry in ra's kernel table",
            )
    finally:
        lab.down()


# -- a real Prometheus server ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason=PROMETHEUS_MISSING)
def test_prometheus_scrapes_a_live_demo(tmp_path: Path) -> None:
    """Debian's Prometheus scrapes `manycast demo --metrics` every second; its HTTP
    API then returns the servers' share series, summing to 1."""
    demo_args = ["demo", "--driver", "memory", "--metrics", "127.0.0.1:0", "--json"]
    with cli([*demo_args, "--duration", "60"]) as demo:
        target = urllib.parse.urlparse(demo.url()).netloc
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: manycast\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        web = f"127.0.0.1:{_free_port()}"
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={web}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        try:
            query = urllib.parse.quote("sum(manycast_server_share_ratio)")
            series = urllib.parse.quote('manycast_server_share_ratio{server="s1"}')
            end = time.monotonic() + DEADLINE
            answer: dict[str, object] = {}
            while time.monotonic() < end:
                with contextlib.suppress(OSError, ValueError):
                    with urllib.request.urlopen(
                        f"http://{web}/api/v1/query?query={series}", timeout=5
                    ) as reply:
                        answer = json.loads(reply.read())
                    result = answer.get("data", {}).get("result")  # type: ignore[union-attr]
                    if result:
                        break
                time.sleep(0.5)
            else:
                log = (tmp_path / "prometheus.log").read_text()[-2000:]
                pytest.fail(f"Prometheus returned no series: {answer}\n{log}")
            assert answer["status"] == "success"
            (sample,) = answer["data"]["result"]  # type: ignore[index]
            assert sample["metric"]["job"] == "manycast"
            assert sample["metric"]["__name__"] == "manycast_server_share_ratio"
            assert 0.0 < float(sample["value"][1]) <= 1.0

            def total() -> float:
                with urllib.request.urlopen(f"http://{web}/api/v1/query?query={query}") as reply:
                    return float(json.loads(reply.read())["data"]["result"][0]["value"][1])

            # The servers' shares as Prometheus sums them (not in the middle of a change).
            end = time.monotonic() + DEADLINE
            while abs(total() - 1.0) > 1e-9 and time.monotonic() < end:
                time.sleep(0.5)
            assert abs(total() - 1.0) < 1e-9
        finally:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
