"""Network namespaces and the links between them, through pyroute2.

Namespaces are named and bind-mounted under /var/run/netns as `ip netns add`
does, so `ip netns list`, `ip -n NAME ...` and this module all see the same
ones. Every lab namespace carries the lab's prefix (`mc-<node>`), which is how
clean-up finds ours and only ours, even after a crash.

A thread can enter a namespace on its own (`setns(2)` with CLONE_NEWNET changes
only the calling thread), so one process can open sockets in many namespaces:
a socket stays in the namespace where it was created. `inside()` is that, for
the current thread; `run_in()` does it in a short-lived thread so the caller's
own namespace never changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _netns

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 15

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return path(name).exists()


MS_BIND, MS_REC, MS_SHARED = 0x1000, 0x4000, 0x100000


def _mount(source: bytes, target: bytes, flags: int) -> int:
    return int(_libc.mount(source, target, b"none", flags, None))


def _share_dir() -> None:
    """/var/run/netns as a shared mount, as `ip netns add` leaves it, so that the
    namespace mounts below it reach other mount namespaces too."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    target = str(NETNS_DIR).encode()
    if _mount(b"", target, MS_SHARED | MS_REC) == 0:
        return
    if _mount(target, target, MS_BIND | MS_REC) != 0 or _mount(b"", target, MS_SHARED | MS_REC):
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot share {NETNS_DIR}: {os.strerror(errno)}")


def create(name: str) -> None:
    """A new empty namespace bound at /var/run/netns/NAME, made by a short-lived
    thread (unshare(2) of CLONE_NEWNET applies to the calling thread only), which
    spares a fork per namespace."""
    _share_dir()
    target = path(name)
    os.close(os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))

    def make() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"unshare: {os.strerror(errno)}")
        if _mount(b"/proc/thread-self/ns/net", str(target).encode(), MS_BIND) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"mount {target}: {os.strerror(errno)}")

    try:
        _in_thread(make)
    except OSError:
        with contextlib.suppress(OSError):
            target.unlink()
        raise


def remove(name: str) -> None:
    """Unmount and forget a namespace; the kernel frees it (and every interface
    in it, and the veth peers of those) once no process is left inside."""
    with contextlib.suppress(FileNotFoundError):
        _netns.remove(name)


def names(prefix: str) -> list[str]:
    """Our namespaces: those named `<prefix>-...`."""
    try:
        entries = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in entries if n.startswith(f"{prefix}-"))


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def enter(name: str) -> None:
    """Move the calling thread into namespace `name` for good (a daemon at start,
    before it opens any socket or starts any thread)."""
    fd = os.open(path(name), os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """The calling thread is in namespace `name` for the `with` block."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter(name)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def _in_thread(fn: Callable[[], T]) -> T:
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="netns")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]  # type: ignore[no-any-return]


def run_in(name: str, fn: Callable[[], T]) -> T:
    """`fn()` called in a thread that lives in namespace `name`."""

    def inside_ns() -> T:
        enter(name)
        return fn()

    return _in_thread(inside_ns)


def configure(name: str, fn: Callable[[Any], T]) -> T:
    """`fn(ipr)` with an rtnetlink handle inside namespace `name`. The handle is
    opened and used in a thread of that namespace (no helper process)."""

    def work() -> T:
        ipr = IPRoute()
        try:
            return fn(ipr)
        finally:
            ipr.close()

    return run_in(name, work)


def socket_in(name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    return run_in(name, lambda: socket.socket(family, kind, proto))


def read_in(name: str, file: str) -> str:
    """A per-namespace /proc or /proc/sys file as seen from inside `name`."""

    def read() -> str:
        return Path(file.replace("/proc/net/", "/proc/thread-self/net/")).read_text()

    return run_in(name, read)


def sysctl(name: str, values: dict[str, str]) -> None:
    """Write net.* sysctls inside namespace `name` (they are per namespace)."""

    def write() -> None:
        for key, value in values.items():
            Path("/proc/sys", *key.split(".")).write_text(value)

    run_in(name, write)


def inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path(name))
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def pids_in(names_: list[str]) -> dict[int, str]:
    """Processes whose network namespace is one of `names_` (pid -> namespace)."""
    wanted = {}
    for name in names_:
        key = inode(name)
        if key is not None:
            wanted[key[1]] = name
    found: dict[int, str] = {}
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if st.st_ino in wanted:
            found[int(entry)] = wanted[st.st_ino]
    return found


# -- links ----------------------------------------------------------------------------


def iproute(name: str) -> Any:
    """An rtnetlink handle inside namespace `name`."""
    return IPRoute(netns=name)


def index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise OSError(f"no interface {ifname}")
    return int(found[0])


def veth(ipr: Any, ifname: str, peer_ns: str, peer_ifname: str) -> None:
    """A veth pair: `ifname` where `ipr` lives, `peer_ifname` created directly in
    `peer_ns`, so neither end ever exists in the root namespace."""
    ipr.link(
        "add",
        ifname=ifname,
        kind="veth",
        peer={"ifname": peer_ifname, "net_ns_fd": str(path(peer_ns))},
    )


def bridge(ipr: Any, ifname: str) -> int:
    """A bridge without IGMP snooping: it must flood membership reports and the
    clients' multicast to the router untouched."""
    ipr.link("add", ifname=ifname, kind="bridge", br_mcast_snooping=0)
    return index(ipr, ifname)


def enslave(ipr: Any, ifname: str, master: int) -> None:
    ipr.link("set", index=index(ipr, ifname), master=master)


def isolate(ipr: Any, ifname: str) -> None:
    """A bridge port that forwards only to the bridge's ports that are not isolated
    (and to the bridge itself): hosts on isolated ports do not hear each other."""
    ipr.brport("set", index=index(ipr, ifname), isolated=1)


def address(ipr: Any, ifname: str, addr: str, prefixlen: int) -> None:
    ipr.addr("add", index=index(ipr, ifname), address=addr, prefixlen=prefixlen)


def up(ipr: Any, ifname: str) -> None:
    ipr.link("set", index=index(ipr, ifname), state="up")


def route(ipr: Any, dst: str, gateway: str) -> None:
    ipr.route("add", dst=dst, gateway=gateway)
