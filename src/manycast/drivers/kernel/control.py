"""The daemons' control socket: one-line JSON requests on a unix socket, and `ask()` to send one.

Each lab program `<node>.<role>` listens on `<run dir>/<node>.<role>.sock`, writes
`<node>.<role>.ready` once set up (its pid inside), and answers each connection's
one request line `{"op": ..., ...}` with one JSON line, `{"error": ...}` when the
request cannot be served.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

Request = dict[str, Any]


def ready_path(run_dir: Path, node: str, role: str) -> Path:
    return run_dir / f"{node}.{role}.ready"


def command_path(run_dir: Path, node: str, role: str) -> Path:
    return run_dir / f"{node}.{role}.sock"


def counts_path(run_dir: Path, node: str) -> Path:
    return run_dir / f"{node}.counts.json"


def ask(run_dir: Path, node: str, role: str, request: Request, timeout: float = 2.0) -> Any:
    """One request to a node's program (`role`: router, server, service); its JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(command_path(run_dir, node, role)))
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


class ControlSocket:
    """The listening side: accepts one connection at a time, hands its request to
    `dispatch` and writes back the answer (or the error it raised)."""

    def __init__(self, path: Path, dispatch: Callable[[Request], Any]) -> None:
        self.path = path
        self.dispatch = dispatch
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.setblocking(False)

    def on_readable(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                request = json.loads(conn.makefile("rb").readline())
                if not isinstance(request, dict):
                    raise TypeError(f"a request is a JSON object, not {type(request).__name__}")
                answer = self.dispatch(request)
            except (OSError, ValueError, KeyError, TypeError, ArithmeticError) as exc:
                answer = {"error": str(exc)}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
