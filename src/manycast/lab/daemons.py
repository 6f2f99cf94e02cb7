"""Supervision of the lab's programs: start, find, wait for, signal and stop them.

Every program of the lab is one of `drivers/kernel.py`'s roles (router daemon,
server agent, service), started inside its node's namespace with a pid file, a
log and a ready file in the run directory. A pid file is trusted only while its
process still runs our program (`_ours`), so a stale file never gets a stranger
signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manycast.drivers import kernel
from manycast.errors import LabError

# Each node kind's programs (roles).
ROLES_OF = {"router": ("router",), "server": ("server", "service"), "vip_router": ("vip_router",)}
# A server joining a running pool starts its service first: it claims clients
# (its agent's reports) only once it can answer them.
SERVER_START = ("service", "server")
READY_TIMEOUT = 20.0
# How a lab program is started, and how its command line is recognised later.
PROGRAM = ("-m", "manycast", "daemon")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _ours(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return "\0".join(PROGRAM).encode() in cmdline


def reap(pid: int) -> None:
    """Collect `pid` if it is a child of ours that exited (no zombie left)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass
class Daemons:
    """The programs of one lab; `run_dir` holds their files."""

    run_dir: Path

    def _pidfile(self, node: str, role: str) -> Path:
        return self.run_dir / f"{node}.{role}.pid"

    def _log(self, node: str, role: str) -> Path:
        return self.run_dir / f"{node}.{role}.log"

    def start(
        self,
        node: str,
        role: str,
        *,
        namespace: str,
        seed: int,
        pin_idle: float | None,
        service: str = "responder",
        plane: str = "mfc",
    ) -> int:
        """Start `node`'s `role` program inside `namespace`; its pid. A server's service
        is the program `service` (the UDP `responder`, or `http` in a VIP pool)."""
        command = {
            "service": service,
            "vip_router": "vip-router",
            "link_delay": "link-delay",
            "router6": "router",  # a dual-stack pool's router: the IPv6 daemon
        }.get(role, role)
        argv = [
            sys.executable,
            *PROGRAM,
            command,
            "--node",
            node,
            "--run-dir",
            str(self.run_dir),
            "--netns",
            namespace,
            "--seed",
            str(seed),
        ]
        if command == "router" and pin_idle is not None:
            argv += ["--pin-idle", str(pin_idle)]
        if command == "router":
            argv += ["--plane", plane]
        if role == "router6":
            argv += ["--family", "6"]
        with contextlib.suppress(FileNotFoundError):
            kernel.ready_path(self.run_dir, node, role).unlink()
        with open(self._log(node, role), "ab") as logfile:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._pidfile(node, role).write_text(str(proc.pid))
        return proc.pid

    def pid(self, node: str, role: str) -> int | None:
        """The pid of `node`'s `role` program while it runs, else None."""
        try:
            pid = int(self._pidfile(node, role).read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) and _ours(pid) else None

    def ready(self, node: str, role: str, deadline: float) -> bool:
        """Whether `node`'s `role` program is ready; LabError (with the end of its log)
        if it died, or if it is not ready by `deadline` (time.monotonic())."""
        if kernel.ready_path(self.run_dir, node, role).exists():
            return True
        # Only alive, not yet "ours": just after the fork the child's command line
        # is still the parent's.
        try:
            started = alive(int(self._pidfile(node, role).read_text()))
        except (OSError, ValueError):
            started = False
        if not started or time.monotonic() > deadline:
            log = self._log(node, role)
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise LabError(f"{role} of {node} did not start:\n{tail}")
        return False

    def wait_ready(self, node: str, role: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready(node, role, deadline):
            time.sleep(0.02)

    def kill(self, node: str, role: str, sig: int = signal.SIGKILL) -> bool:
        """Signal `node`'s `role` program and wait (2 s at most) until it is gone."""
        pid = self.pid(node, role)
        if pid is None:
            return False
        signal_pid(pid, sig)
        deadline = time.monotonic() + 2.0
        while alive(pid) and time.monotonic() < deadline:
            reap(pid)
            time.sleep(0.01)
        reap(pid)
        return True

    def stop_all(self) -> int:
        """SIGTERM every program of the pid files (SIGKILL after 1.5 s); how many."""
        pids = []
        for pidfile in self.run_dir.glob("*.pid") if self.run_dir.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text())
                reap(pid)  # a daemon of this process that already died
                if alive(pid) and _ours(pid):
                    signal_pid(pid, signal.SIGTERM)
                    pids.append(pid)
        deadline = time.monotonic() + 1.5
        for pid in pids:
            while alive(pid) and time.monotonic() < deadline:
                reap(pid)
                time.sleep(0.01)
            if alive(pid):
                signal_pid(pid, signal.SIGKILL)
            reap(pid)
        return len(pids)

    def ask(self, node: str, role: str, request: dict[str, Any]) -> Any:
        """One JSON request to `node`'s `role` program over its command socket."""
        return kernel.ask(self.run_dir, node, role, request)
