"""A real etcd cluster on loopback for tests: each member its own process (Debian's
`etcd-server`), on free ports, its data in a temporary directory; always torn down.

Elections are quick (50 ms heartbeats, 500 ms election timeout) so that leases of one
second and more are allowed and a lost member is noticed within a test's time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from manycast.ports import free_port

ETCD_MISSING = "etcd is not installed (Debian's etcd-server; `make etcd-deps` installs it as root)"
START_TIMEOUT = 20.0


def etcd_path() -> str | None:
    return shutil.which("etcd") or (
        "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None
    )


def post(url: str, path: str, body: dict[str, object], timeout: float = 2.0) -> dict[str, object]:
    """One call to etcd's JSON gateway."""
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        result: dict[str, object] = json.loads(answer.read())
        return result


@dataclass
class Member:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False


@dataclass
class EtcdCluster:
    size: int = 3
    members: list[Member] = field(default_factory=list)
    _root: Path | None = None

    def __enter__(self) -> EtcdCluster:
        binary = etcd_path()
        if binary is None:
            raise RuntimeError(ETCD_MISSING)
        # tmpfs when there is one: etcd syncs every write to disk
        shm = Path("/dev/shm")
        self._root = Path(
            tempfile.mkdtemp(prefix="manycast-etcd-", dir=shm if shm.is_dir() else None)
        )
        ports = []
        while len(ports) < 2 * self.size:
            port = free_port()
            if port not in ports:
                ports.append(port)
        for i in range(self.size):
            name = f"m{i + 1}"
            self.members.append(
                Member(
                    name,
                    f"http://127.0.0.1:{ports[2 * i]}",
                    f"http://127.0.0.1:{ports[2 * i + 1]}",
                    self._root / name,
                    self._root / f"{name}.log",
                )
            )
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        try:
            for m in self.members:
                log = m.log_path.open("wb")
                m.process = subprocess.Popen(
                    [
                        binary,
                        *("--name", m.name, "--data-dir", str(m.data_dir)),
                        *(
                            "--listen-client-urls",
                            m.client_url,
                            "--advertise-client-urls",
                            m.client_url,
                        ),
                        *(
                            "--listen-peer-urls",
                            m.peer_url,
                            "--initial-advertise-peer-urls",
                            m.peer_url,
                        ),
                        *("--initial-cluster", cluster, "--initial-cluster-state", "new"),
                        *("--initial-cluster-token", self._root.name),
                        *("--heartbeat-interval", "50", "--election-timeout", "500"),
                        "--log-level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
                log.close()
            self.wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.members:
            process = m.process
            if process is None:
                continue
            if m.paused:
                process.send_signal(signal.SIGCONT)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    @property
    def urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if all(self.leader_of(m) for m in self.members):
                    return
            except (OSError, ValueError):
                pass
            for m in self.members:
                if m.process is not None and m.process.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited: {m.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                logs = "\n".join(m.log_path.read_text()[-1000:] for m in self.members)
                raise RuntimeError(f"the etcd cluster did not elect a leader in time:\n{logs}")
            time.sleep(0.1)

    def leader_of(self, member: Member) -> str:
        """The leader's member id as `member` sees it ("" or "0": none)."""
        status = post(member.client_url, "/v3/maintenance/status", {})
        return str(status.get("leader", ""))

    def member_id(self, member: Member) -> str:
        status = post(member.client_url, "/v3/maintenance/status", {})
        header = status["header"]
        assert isinstance(header, dict)
        return str(header["member_id"])

    def follower(self) -> Member:
        """A member that is not the leader now."""
        leader = self.leader_of(self.members[0])
        return next(m for m in reversed(self.members) if self.member_id(m) != leader)

    def pause(self, member: Member) -> None:
        """Stop the member's process (SIGSTOP): it neither answers nor reaches its peers."""
        assert member.process is not None
        member.process.send_signal(signal.SIGSTOP)
        member.paused = True

    def resume(self, member: Member) -> None:
        assert member.process is not None
        member.process.send_signal(signal.SIGCONT)
        member.paused = False
