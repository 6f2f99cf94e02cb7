"""Packet captures in the lab: what the kernel sends and receives on a node's interfaces.

`capture` runs a packet capture program inside the node's namespace for a given
time: Wireshark's `dumpcap` (Debian's `tshark` brings it), which writes pcapng
with one interface block per interface captured, or, without it, `tcpdump`,
which writes classic pcap of one interface. Both come with `make lab-deps`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from manycast.errors import LabError
from manycast.lab.build import Lab

TOOLS = ("dumpcap", "tcpdump")
_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class CaptureResult:
    path: Path
    tool: str
    interfaces: tuple[str, ...]
    report: str  # what the tool said on stderr (its packet counts)

    @property
    def format(self) -> str:
        return "pcapng" if self.tool == "dumpcap" else "pcap"


def choose_tool(tool: str | None = None) -> str:
    """The capture program to use: `tool` if given and installed, else the first of
    TOOLS installed; LabError if none is."""
    for name in (tool,) if tool else TOOLS:
        if name not in TOOLS:
            raise LabError(f"capture tool {name!r}: expected one of {', '.join(TOOLS)}")
        if shutil.which(name) is not None:
            return name
    wanted = tool or " or ".join(TOOLS)
    raise LabError(f"{wanted} is not installed (make lab-deps installs tshark and tcpdump)")


def capture(
    lab: Lab,
    node: str,
    out: Path,
    seconds: float,
    interfaces: Sequence[str] = (),
    tool: str | None = None,
) -> CaptureResult:
    """Capture `node`'s `interfaces` (default: all of them with dumpcap, the first
    with tcpdump) for `seconds` into `out`."""
    if seconds <= 0:
        raise LabError("--seconds must be positive")
    topology = lab.topology()
    if node not in topology.interfaces:
        raise LabError(f"no node {node!r} in the lab")
    known = sorted(topology.interfaces[node])
    unknown = [i for i in interfaces if i not in known]
    if unknown:
        raise LabError(f"{node} has no interface {unknown[0]!r} (it has {', '.join(known)})")
    program = choose_tool(tool)
    chosen = tuple(interfaces) or tuple(known)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if program == "dumpcap":
        argv = ["dumpcap", "-q", "-w", str(out)]
        for iface in chosen:
            argv += ["-i", iface]
    else:
        if len(chosen) > 1 and interfaces:
            raise LabError("tcpdump captures one interface: give one --iface (or install tshark)")
        chosen = chosen[:1]
        argv = ["tcpdump", "-i", chosen[0], "-U", "-n", "-w", str(out)]
    proc = lab.popen(node, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Stop early only if the program exits by itself (a bad interface, say).
        deadline = time.monotonic() + seconds
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # both write out what they hold and exit
        _, err = proc.communicate(timeout=_STOP_TIMEOUT)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    lines = err.decode(errors="replace").splitlines()
    report = "\n".join(line for line in lines if line and "could be dangerous" not in line)
    if proc.returncode not in (0, -signal.SIGINT) or not out.exists():
        raise LabError(f"{program} in {node} failed (status {proc.returncode}): {report}")
    return CaptureResult(out, program, chosen, report)
