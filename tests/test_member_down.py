"""The pool tells its routers when a server died (`MemberDown`), and they believe only
a notice they can check.

* The codec: symmetric and strict, garbage raises only `WireError`.
* One private pool's router (IPv4 or IPv6): a notice signed with the group's key
  drops the dead member at once; forged, unsigned, replayed, stale and wrong-link
  notices are refused by reason and the member stays.
* A whole pool on the memory driver: after a server is killed, every router drops
  its membership as soon as the coordinator has removed it, long before the
  membership's hold time, and the clients are served by the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manycast.protocol.router import Router
from manycast.wire import control
from manycast.wire.errors import WireError
from manycast.wire.ip import IPPROTO_UDP, Address, UDPDatagram, make_packet
from pooltools import allocation, back_at, owners, pool_toml, run_to, start
from test_private import (
    GROUP,
    KEY,
    OTHER,
    S1,
    S2,
    V4,
    WALL,
    Family,
    family,
    join,
    private_pool,
)

CONTROL_PORT = 7946

addresses = st.ip_addresses()
notices = st.builds(
    control.MemberDown,
    st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= 64),
    st.integers(0, 0xFFFFFFFF),
    addresses,
    addresses,
    addresses,
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 64) - 1),
    st.binary(min_size=8, max_size=8),
    st.sampled_from([b"", b"\x07" * 64]),
)


@given(notices)
def test_round_trip(notice: control.MemberDown) -> None:
    data = control.encode(notice)
    assert data[3] == control.MessageType.MEMBER_DOWN == 22
    assert control.decode(data) == notice


@given(notices, st.integers(0, 200), st.binary(max_size=4))
def test_cut_or_padded_notices_raise_only_wire_errors(
    notice: control.MemberDown, cut: int, tail: bytes
) -> None:
    data = control.encode(notice)
    for damaged in (data[:cut], data + tail if tail else data[:-1]):
        if damaged == data:
            continue
        with pytest.raises(WireError):
            control.decode(damaged)


@given(st.binary(max_size=120))
def test_garbage_after_the_header_raises_only_wire_errors(body: bytes) -> None:
    data = b"MC\x01\x16\x02s1\x00\x00\x00\x01" + body
    try:
        notice = control.decode(data)
    except WireError:
        return
    assert control.encode(notice) == data


@pytest.mark.parametrize(
    ("field", "value", "complaint"),
    [("nonce", b"\x00" * 7, "nonce"), ("signature", b"\x00" * 63, "signature")],
)
def test_bad_lengths_are_refused(field: str, value: bytes, complaint: str) -> None:
    good = notice_about(S2)
    with pytest.raises(WireError, match=complaint):
        dataclasses.replace(good, **{field: value})


# -- one router -------------------------------------------------------------------------


def notice_about(
    member: Address,
    *,
    net: Family = V4,
    signer: Address | None = None,
    at: float = 0.5,
    key: object = KEY,
    nonce: bytes = b"\x02" * 8,
) -> control.MemberDown:
    notice = control.MemberDown(
        "s1", 0, net.group, member, signer or net.s1, 7, int((WALL + at) * 1000), nonce
    )
    if key is None:
        return notice
    return dataclasses.replace(notice, signature=key.sign(notice.signed_bytes()))  # type: ignore[attr-defined]


def to_router(notice: control.MemberDown, net: Family = V4) -> bytes:
    """The notice from s1 to its router's address on s1's link."""
    src, dst = net.s1, net.host(net.links[1], 1)
    udp = UDPDatagram(CONTROL_PORT, CONTROL_PORT, control.encode(notice)).to_wire(src, dst)
    return make_packet(src, dst, IPPROTO_UDP, udp, ttl=64).to_wire()


def two_members(net: Family = V4) -> Router:
    router = net.make_router()
    router.receive("eth2", net.join(net.s1), 0.1)
    router.receive("eth3", net.join(net.s2), 0.1)
    assert set(router.members[int(net.group)]) == {int(net.s1), int(net.s2)}
    router.take_frames()
    return router


@family
def test_a_signed_notice_drops_the_dead_member_at_once(net: Family) -> None:
    router = two_members(net)
    router.receive("eth2", to_router(notice_about(net.s2, net=net), net), 0.5)
    assert set(router.members[int(net.group)]) == {int(net.s1)}
    assert router.stats.members_down == 1 and not router.stats.notices_refused
    # A copy (a flood that came round again) changes nothing and is not a refusal.
    router.receive("eth2", to_router(notice_about(net.s2, net=net), net), 0.6)
    assert router.stats.members_down == 1 and not router.stats.notices_refused


Notice = Callable[[Family], control.MemberDown]
BAD_NOTICES: dict[str, tuple[Notice, str, str]] = {
    "other key": (lambda n: notice_about(n.s2, net=n, key=OTHER), "eth2", "bad signature"),
    "unsigned": (lambda n: notice_about(n.s2, net=n, key=None), "eth2", "unsigned"),
    "stale": (lambda n: notice_about(n.s2, net=n, at=-120.0), "eth2", "stale"),
    # from the clients' LAN, claiming s1
    "wrong link": (lambda n: notice_about(n.s2, net=n), "eth0", "wrong link"),
    "altered": (
        lambda n: dataclasses.replace(notice_about(n.s2, net=n), epoch=8),
        "eth2",
        "bad signature",
    ),
}


@family
@pytest.mark.parametrize(("notice", "iface", "reason"), BAD_NOTICES.values(), ids=BAD_NOTICES)
def test_notices_that_do_not_check_out_are_refused_and_the_member_stays(
    net: Family, notice: Notice, iface: str, reason: str
) -> None:
    router = two_members(net)
    router.receive(iface, to_router(notice(net), net), 0.5)
    assert set(router.members[int(net.group)]) == {int(net.s1), int(net.s2)}
    assert dict(router.stats.notices_refused) == {reason: 1}


def test_a_replayed_notice_cannot_drop_a_member_that_came_back() -> None:
    router = two_members()
    packet = to_router(notice_about(S2))
    router.receive("eth2", packet, 0.5)
    router.receive("eth3", join(S2, nonce=b"\x05" * 8, at=1.0), 1.0)  # s2 is back
    router.receive("eth2", packet, 1.5)
    assert set(router.members[int(GROUP)]) == {int(S1), int(S2)}


# -- a whole pool -------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["s2", "s3"])
def test_routers_drop_a_killed_server_when_the_pool_removes_it(victim: str) -> None:
    text = pool_toml(scenario=[(2.0, "kill", {"server": victim})], duration=4.0)
    run, _ = start(text, seed=5)
    run_to(run, 1.99)
    before = allocation(run)
    dead = int(run.topology.address(victim))
    routers = run.nodes.routers.values()
    assert all(dead in r.members.get(int(run.topology.pool.group), {}) for r in routers)
    run_to(run, 2.6)  # 0.3 s to see it dead, a commit: far less than the 3.5 s hold time
    group = int(run.topology.pool.group)
    assert victim not in allocation(run).servers
    for router in routers:
        assert dead not in router.members.get(group, {}), router.name
        assert router.stats.members_down == 1, router.name
        assert not router.stats.notices_refused, router.name
    assert sum(s.stats.deaths_told for s in run.nodes.servers.values()) == 1
    run_to(run, 4.0)
    old = owners(before, run)
    for name, client in run.nodes.clients.items():
        if old[name] == victim:
            assert back_at(client, 2.0) is not None, name


def test_share_changes_among_live_servers_send_no_notice() -> None:
    text = pool_toml(scenario=[(2.0, "set_share", {"server": "s2", "share": 0.1})], duration=3.5)
    run, _ = start(text, seed=5)
    run_to(run, 3.5)
    assert allocation(run).share("s2") < 0.2
    assert sum(s.stats.deaths_told for s in run.nodes.servers.values()) == 0
    assert all(r.stats.members_down == 0 for r in run.nodes.routers.values())


@family
def test_a_private_pool_signs_its_notice_and_its_routers_check_it(net: Family) -> None:
    kill = '\n[[scenario]]\nat = 2.0\naction = "kill"\nserver = "s2"\n'
    text = private_pool(duration=4.0, version=net.version) + kill
    run, _ = start(text, seed=2)
    run_to(run, 2.6)
    group = int(run.topology.pool.group)
    dead = int(run.topology.address("s2"))
    held = run.nodes.servers["s1"].coordinator.allocation
    assert held is not None and held.servers == ("s1",)
    for router in run.nodes.routers.values():
        assert router.admission is not None  # a private pool's routers check signatures
        assert dead not in router.members.get(group, {}), router.name
        assert router.stats.members_down == 1, router.name
    # The outsider server thinks itself a pool of its own and tells of the deaths of
    # the members it never heard from (s1 and s2, removed in one change), signed with
    # its own key: its router refuses those notices. (An IPv6 pool's server knows no
    # address of a peer it never heard from, so it tells of none; a notice signed
    # with another key is refused on one IPv6 router above.)
    told = 2 if net.version == 4 else 0
    assert run.nodes.servers["evil"].stats.deaths_told == told
    refused = {r.name: dict(r.stats.notices_refused) for r in run.nodes.routers.values()}
    core = {"bad signature": told} if told else {}
    assert refused == {"ra": {}, "core": core, "rs": {}}
