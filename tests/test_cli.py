"""The `manycast` command line, run as a user runs it.

The main flows start the installed command in a subprocess and check its exit
status and what it prints, as a user or a script would see them. Help texts and
refusals, which need no process of their own, run the same app in this process
through typer's CliRunner. `manycast dns serve` runs in the background for the
module's DNS tests and is always stopped.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import stat
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import manycast
from manycast import naming
from manycast.cli import app, lab_exec_hints
from manycast.ports import free_port
from manycast.topology import builtin

_SCRIPT = Path(sys.executable).with_name("manycast")
MANYCAST = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "manycast"]
DEMO = Path(manycast.__file__).parent / "topologies" / "demo.toml"

# A topology whose only error is on line 7: the server names a router that is not there.
BROKEN = """\
[pool]
group = "232.1.1.1"
[[router]]
name = "r"
[[server]]
name = "s"
router = "nope"
"""


def env() -> dict[str, str]:
    """The caller's environment, without a terminal width: output as in a pipe or a log."""
    out = dict(os.environ)
    out.pop("COLUMNS", None)
    out.pop("LINES", None)
    return out


def manycast_cmd(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MANYCAST, *args], capture_output=True, text=True, cwd=cwd, env=env(), timeout=timeout
    )


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The same command run in this process (typer's CliRunner), for the cases that need no
    process of their own; an exception that escapes shows up as a traceback on stderr."""
    with contextlib.chdir(cwd or Path.cwd()):
        result = CliRunner().invoke(app, list(args), prog_name="manycast")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert result.exc_info is not None
        stderr += "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception(*result.exc_info)
        )
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


def flat(text: str) -> str:
    """Text with its line breaks and runs of spaces made single spaces."""
    return " ".join(text.split())


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


# -- help ----------------------------------------------------------------------------


def test_the_installed_command_shows_its_commands() -> None:
    result = manycast_cmd("--help")
    assert result.returncode == 0, result.stderr
    for command in ("demo", "run", "topology", "keys", "private", "dns", "lab"):
        assert command in result.stdout
    bare = cli()  # no arguments: the help, not a crash
    assert "Usage" in bare.stdout + bare.stderr
    no_traceback(bare)


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        ("demo", ["--duration", "--topology", "--json", "--driver", "--seed"]),
        ("run", ["topology", "--nodes", "--base-port"]),
        ("topology", ["check"]),
        ("topology check", ["path"]),
        ("keys", ["new", "show", "publish"]),
        ("keys new", ["path", "--force"]),
        ("keys show", ["path"]),
        ("keys publish", ["--alias", "--group", "--zone", "--server", "--tsig"]),
        ("private", ["create"]),
        ("private create", ["--alias", "--zone", "--participants", "--out", "--tsig"]),
        ("dns", ["serve", "show"]),
        ("dns show", ["name", "--server"]),
        ("dns serve", ["--zone", "--port", "--tsig"]),
        ("lab", ["up", "down", "exec", "status", "run"]),
        ("lab run", ["--duration", "--keep"]),
    ],
)
def test_every_command_has_help(command: str, mentions: list[str]) -> None:
    result = CliRunner().invoke(app, [*command.split(), "--help"], prog_name="manycast")
    assert result.exit_code == 0, result.output
    assert f"Usage: manycast {command}" in flat(result.stdout)
    for word in mentions:
        assert word in result.stdout, word


# -- lab up's hints ------------------------------------------------------------------

SOCAT4 = "socat - 'UDP4-DATAGRAM:232.1.1.1:7000,ip-multicast-ttl=8'"
SOCAT6 = "socat - 'UDP6-DATAGRAM:[ff3e::8000:1]:7000,setsockopt-int=41:18:8'"


@pytest.mark.parametrize(
    ("topology", "hints"),
    [
        ("demo", [f"manycast lab exec a1 -- {SOCAT4}"]),
        ("demo6", [f"manycast lab exec a1 -- {SOCAT6}"]),
        # A dual-stack pool: an IPv4 client to the IPv4 group, an IPv6 one to the IPv6 group.
        (
            "demo-dual",
            [f"manycast lab exec a1 -- {SOCAT4}", f"manycast lab exec six-a1 -- {SOCAT6}"],
        ),
        ("vip", ["manycast lab exec a1 -- curl -s http://203.0.113.80:7000/"]),
        ("vip6", ["manycast lab exec a1 -- curl -s http://[2001:db8:80::80]:7000/"]),
        (
            "vip-dual",
            [
                "manycast lab exec a1 -- curl -s http://203.0.113.80:7000/",
                "manycast lab exec six-a1 -- curl -s http://[2001:db8:80::80]:7000/",
            ],
        ),
    ],
)
def test_lab_up_hints_ask_the_service_in_every_family_of_the_pool(
    topology: str, hints: list[str]
) -> None:
    assert lab_exec_hints(builtin(topology)) == hints


def test_lab_up_of_a_dual_stack_pool_names_both_groups_and_a_command_for_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What `manycast lab up` prints once its lab is up (the build, root's, left out)."""
    from manycast.lab import Lab
    from manycast.topology import Topology, loads

    def up(self: Lab, text: str, source: str, **_: object) -> Topology:
        return loads(text)

    monkeypatch.setattr(Lab, "up", up)
    result = cli("lab", "up", "demo-dual", "--prefix", "hint")
    assert result.returncode == 0, result.stderr
    assert "groups 232.1.1.1 and ff3e::8000:1 port 7000. " in flat(result.stderr)
    lines = result.stderr.splitlines()
    assert lines[-2].endswith(f"Try: manycast lab exec a1 -- {SOCAT4}")
    assert lines[-1] == f"  or: manycast lab exec six-a1 -- {SOCAT6}"


# -- demo ----------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["demo", "demo6", "demo-dual"])
def test_demo_prints_its_summary_as_json_on_the_last_line(topology: str) -> None:
    """The demo on each family's network, and on a dual-stack pool's."""
    result = manycast_cmd(
        "demo", "--topology", topology, "--driver", "memory", "--duration", "3", "--json"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(summary, dict)
    for key in (
        "clients",
        "clients_served_at_end",
        "requests_ok",
        "requests_failed",
        "resets",
        "recovery_s",
    ):
        assert key in summary, key
    assert summary["clients"] == 240 and summary["clients_served_at_end"] == 240
    assert summary["requests_ok"] > 240 and summary["requests_failed"] == 0
    assert summary["duration_s"] == 3.0 and summary["driver"] == "memory"
    # Progress goes to stderr, so stdout is the JSON alone.
    assert len(result.stdout.strip().splitlines()) == 1
    assert "served 240/240" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "-1"], "--duration must be positive"),
        (["--duration", "0"], "--duration must be positive"),
        (["--driver", "bogus"], "--driver must be one of memory, overlay, not 'bogus'"),
        (["--duration", "soon"], "Invalid value for '--duration'"),
        (["--topology", "/nonexistent/pool.toml"], "/nonexistent/pool.toml"),
    ],
)
def test_demo_refuses_bad_arguments(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["demo", "--driver", "memory", *args], prog_name="manycast")
    assert result.exit_code == 2
    assert message in flat(result.stderr)
    assert result.stdout == ""  # nothing ran


def test_demo_with_a_broken_topology_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text(BROKEN)
    result = manycast_cmd("demo", "--topology", "broken.toml", "--json", cwd=tmp_path)
    assert result.returncode == 2
    assert "broken.toml:7: server s: no router named 'nope'" in result.stderr
    assert result.stdout == ""
    no_traceback(result)


# -- topology check ------------------------------------------------------------------


def test_topology_check_on_the_demo() -> None:
    result = manycast_cmd("topology", "check", str(DEMO))
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "ok" in out and "pool service.manycast.test -> 232.1.1.1:7000" in out
    assert "240 clients, 11 links, 3 scenario steps" in out
    for node in ("ra", "core", "rs1", "rs2", "s1", "s5", "a1", "b1"):
        assert f" {node} " in out, node


def test_topology_check_shows_both_families_of_a_dual_stack_pool() -> None:
    result = manycast_cmd("topology", "check", "demo-dual")
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "pool service.manycast.test -> 232.1.1.1:7000 and [ff3e::8000:1]:7000" in out
    assert "IPv4: clients in 0.0.0.0/0" in out and "IPv6: clients in 2001:db8::/32" in out
    assert "dual-stack, one allocation over both families" in out
    # a server's one interface with both addresses; a client of each family
    assert "eth0 10.254.0.2/30 2001:db8:fffe::2/64 (rs1-s1)" in out
    assert "10.1.0.2/16 (ra-a)" in out and "2001:db8:a::2/64 (ra-six-a)" in out
    assert "240 clients, 13 links, 3 scenario steps" in out


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (BROKEN, "broken.toml:7: server s: no router named 'nope'"),
        ('[pool\ngroup = "232.1.1.1"\n', "line 1"),
        ('[pool]\ngroup = "10.0.0.1"\n[[router]]\nname = "r"\n', "broken.toml:2:"),
    ],
    ids=["unknown-router", "toml-syntax", "unicast-group"],
)
def test_topology_check_on_broken_files(tmp_path: Path, text: str, where: str) -> None:
    (tmp_path / "broken.toml").write_text(text)
    result = cli("topology", "check", "broken.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert where in flat(result.stderr)
    no_traceback(result)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[pool]\ngroup = "232.1.1.1"\ncolour = 1\n[[router]]\nname = "r"\n',
            "broken.toml:3: unknown key 'colour' in [pool]",
        ),
        ('[pool]\ngroup = "232.1.1.1"\n', "a topology needs at least one [[router]]"),
    ],
    ids=["unknown-key", "no-router"],
)
def test_error_messages_keep_their_brackets(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "broken.toml").write_text(text)
    result = cli("topology", "check", "broken.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert message in flat(result.stderr)


def test_help_keeps_the_names_of_topology_tables() -> None:
    result = cli("run", "--help")
    assert result.returncode == 0
    assert "[run] hosts" in flat(result.stdout)


def test_errors_keep_long_paths_whole(tmp_path: Path) -> None:
    path = tmp_path / ("topologies-of-the-lab-" * 3) / "broken-topology.toml"
    path.parent.mkdir()
    path.write_text(BROKEN)
    result = manycast_cmd("topology", "check", str(path))
    assert result.returncode == 2
    assert f"{path}:7: server s: no router named 'nope'" in result.stderr


# -- keys ----------------------------------------------------------------------------


def public_key_of(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith("public key: ")]
    key = line.removeprefix("public key: ")
    assert len(base64.b64decode(key, validate=True)) == 32
    return key


def test_keys_new_and_show(tmp_path: Path) -> None:
    made = manycast_cmd("keys", "new", "pool.key", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    path = tmp_path / "pool.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    public = public_key_of(made.stdout)
    assert "mode 0600" in flat(made.stderr)

    shown = manycast_cmd("keys", "show", "pool.key", cwd=tmp_path)
    assert shown.returncode == 0 and public_key_of(shown.stdout) == public

    # An existing key is never replaced by accident.
    before = path.read_bytes()
    again = cli("keys", "new", "pool.key", cwd=tmp_path)
    assert again.returncode == 2
    assert "pool.key exists (use --force to replace it)" in flat(again.stderr)
    assert path.read_bytes() == before
    forced = cli("keys", "new", "pool.key", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and public_key_of(forced.stdout) != public
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keys_show_refuses_keys_others_can_read(tmp_path: Path) -> None:
    assert cli("keys", "new", "pool.key", cwd=tmp_path).returncode == 0
    (tmp_path / "pool.key").chmod(0o640)
    result = cli("keys", "show", "pool.key", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "pool.key: private key is readable by others (chmod 600 pool.key)" in flat(result.stderr)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), (b"hello\n", "not a PEM private key")],
    ids=["missing", "not-a-key"],
)
def test_keys_show_refuses_what_is_not_a_key(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "pool.key"
    if content is not None:
        path.write_bytes(content)
        path.chmod(0o600)
    result = cli("keys", "show", str(path))
    assert result.returncode == 2 and message in flat(result.stderr)


# -- dns serve, private create, keys publish -----------------------------------------


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """`manycast dns serve` in the background: (port, the TSIG key it printed).

    One server for the module: the tests publish different names on it."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("dns") / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*MANYCAST, "dns", "serve", "--zone", "pool.test", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env(),
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            assert ready, "dns serve printed nothing in 20 s"
            line = proc.stdout.readline().strip()
            assert line.startswith("tsig: hmac-sha256:"), line
            yield port, line.removeprefix("tsig: ")
            proc.terminate()
            assert proc.wait(10) == 0  # SIGTERM is a clean stop
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert f"serving pool.test on 127.0.0.1:{port}" in flat(log_path.read_text())


def test_private_create_publishes_and_hands_out_keys(
    tmp_path: Path, dns_server: tuple[int, str]
) -> None:
    port, tsig = dns_server
    server = f"127.0.0.1:{port}"
    created = manycast_cmd(
        "private", "create",
        "--alias", "www.pool.test",
        "--zone", "pool.test",
        "--participants", "s1,c1",
        "--out", "keys",
        "--server", server,
        "--tsig", tsig,
        cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "record published" in created.stdout and "ready to begin" in created.stdout
    keys = tmp_path / "keys"
    assert sorted(p.name for p in keys.iterdir()) == ["c1.key", "s1.key"]
    for path in keys.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Every participant holds the same key, and DNS serves its public half.
    public = public_key_of(cli("keys", "show", str(keys / "s1.key")).stdout)
    assert public_key_of(cli("keys", "show", str(keys / "c1.key")).stdout) == public
    record = naming.lookup_alias("www.pool.test", ("127.0.0.1", port))
    assert base64.b64encode(record.public_key).decode() == public
    assert record.private and naming.DEFAULT_PLAN.is_private(record.group)
    assert f"-> {record.group}:" in created.stdout
    assert naming.lookup_group(record.group, ("127.0.0.1", port)) == record

    # Publishing with a secret the server does not hold is refused, and changes nothing.
    secret = base64.b64encode(b"\x00" * 32).decode()
    wrong = tsig.rsplit(":", 1)[0] + ":" + secret
    refused = manycast_cmd(
        "keys", "publish", str(keys / "s1.key"),
        "--alias", "other.pool.test",
        "--group", "232.9.9.9",
        "--zone", "pool.test",
        "--server", server,
        "--tsig", wrong,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "publishing other.pool.test.:" in flat(refused.stderr)
    assert "refused: bad TSIG signature (NOTAUTH/BADSIG)" in flat(refused.stderr)
    no_traceback(refused)
    with pytest.raises(naming.NamingError, match="NXDOMAIN"):
        naming.lookup_alias("other.pool.test", ("127.0.0.1", port))

    # Without a TSIG key nothing is sent at all.
    unsigned = cli(
        "keys", "publish", str(keys / "s1.key"),
        "--alias", "other.pool.test", "--group", "232.9.9.9", "--zone", "pool.test",
        "--server", server,
    )  # fmt: skip
    assert unsigned.returncode == 2 and "--tsig is needed" in flat(unsigned.stderr)

    # With the server's key, a second pool is published next to the first.
    published = cli(
        "keys", "publish", str(keys / "s1.key"),
        "--alias", "other.pool.test", "--group", "232.9.9.9", "--zone", "pool.test",
        "--server", server, "--tsig", tsig,
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    assert "published other.pool.test. -> 232.9.9.9 (private)" in published.stdout
    other = naming.lookup_alias("other.pool.test", ("127.0.0.1", port))
    assert other.public_key == record.public_key


def test_a_dual_stack_record_is_published_and_shown_by_alias_and_either_group(
    tmp_path: Path, dns_server: tuple[int, str]
) -> None:
    port, tsig = dns_server
    server = f"127.0.0.1:{port}"
    assert cli("keys", "new", str(tmp_path / "pool.key")).returncode == 0
    published = cli(
        "keys", "publish", str(tmp_path / "pool.key"),
        "--alias", "dual.pool.test", "--group", "ff3e::8009:90a,232.9.9.10",
        "--zone", "pool.test", "--server", server, "--tsig", tsig,
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    assert "published dual.pool.test. -> 232.9.9.10, ff3e::8009:90a (private)" in published.stdout
    for name in ("dual.pool.test", "232.9.9.10", "ff3e::8009:90a"):
        shown = cli("dns", "show", name, "--server", server)
        assert shown.returncode == 0, shown.stderr
        assert "alias:  dual.pool.test." in shown.stdout
        assert "groups: 232.9.9.10 (A), ff3e::8009:90a (AAAA)" in shown.stdout
        assert "flag:   private" in shown.stdout
    missing = cli("dns", "show", "ff3e::8009:90b", "--server", server)
    assert missing.returncode == 1 and "NXDOMAIN" in flat(missing.stderr)
    no_traceback(missing)
    two_ipv4 = cli(
        "keys", "publish", str(tmp_path / "pool.key"),
        "--alias", "bad.pool.test", "--group", "232.9.9.11,232.9.9.12",
        "--zone", "pool.test", "--server", server, "--tsig", tsig,
    )  # fmt: skip
    assert two_ipv4.returncode == 2 and "one group, or one per family" in flat(two_ipv4.stderr)


def test_private_create_with_an_unusable_out_fails_cleanly(
    tmp_path: Path, dns_server: tuple[int, str]
) -> None:
    port, tsig = dns_server
    (tmp_path / "taken").write_text("not a directory\n")
    result = cli(
        "private", "create",
        "--alias", "vip.pool.test", "--zone", "pool.test", "--participants", "s1",
        "--out", "taken", "--server", f"127.0.0.1:{port}", "--tsig", tsig,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "taken" in flat(result.stderr)
    no_traceback(result)
    # Nothing was published under a key that no participant received.
    with pytest.raises(naming.NamingError, match="NXDOMAIN"):
        naming.lookup_alias("vip.pool.test", ("127.0.0.1", port))
