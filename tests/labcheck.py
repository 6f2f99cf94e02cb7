"""Whether this machine can run the kernel lab, and if not, why: the reason a lab
test gives when it skips."""

from __future__ import annotations

import os
import shutil
import socket
import sys

from manycast.drivers.mroute import multicast_routing_missing

NEEDS_ROOT = "the kernel lab needs root and network namespaces; CI runs as root"


def lab_missing(*tools: str) -> str | None:
    """None when the lab can run here: root, raw sockets, the kernel's multicast
    routing of both families (every lab router is a multicast router), and `tools`."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return NEEDS_ROOT
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IGMP).close()
    except OSError as exc:
        return f"{NEEDS_ROOT} (raw sockets: {exc})"
    kernel = multicast_routing_missing(4) or multicast_routing_missing(6)
    if kernel is not None:
        return kernel
    absent = [t for t in tools if not (shutil.which(t) or os.path.exists(f"/usr/sbin/{t}"))]
    if absent:
        return f"needs {', '.join(absent)} (make lab-deps installs them)"
    return None
