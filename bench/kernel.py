"""Kernel lab: manycast's kernel data plane against nftables load balancing, IPv4 and IPv6.

One router namespace `r`, four servers `s1`-`s4` on /30s and two client LANs. The
servers' agents run and split the client space with masked source-specific joins
(`0.0.0.v/0.0.0.3`: the low two bits of a source pick its server), so the router
daemon installs one (S, G) entry per source toward its owner (checked before the
rounds: every entry's only outgoing interface is its owner's). Their service does
not run: each server drops the test traffic at its interface's ingress (an
nftables netdev rule), the same cost for every kind.

Traffic: 10 240 client source addresses (5120 per LAN), each sending in turn,
64-byte UDP payloads, from one generator per LAN: a PACKET_TX_RING socket whose
frames are built beforehand and handed to the kernel a ring at a time, so that a
packet costs the sending CPU little. Five kinds of the same packets, differing
only in their destination and the router's configuration, through the same
router to the same servers:

- `manycast`: to the group; the router forwards by its MFC entries, as the lab
  sets it up (every source is installed before the rounds: the daemon is idle).
- `manycast_portions`: to the group; the router forwards by the daemon's portion
  plane (`drivers/kernel/portion_plane.py`): nftables at the ingress of the
  router's interfaces, `ip saddr & <mask>` looked up in a map with one element
  per portion (4 here), TTL decremented, `fwd ip to` the owner; no per-source
  state, no upcall. The MFC entries stay in the kernel, unused.
- `manycast_mcast_routes`: the same, with a 224.0.0.0/4 route per interface
  added to the router, so that the kernel caches the output route of each VIF
  (without one, ipmr allocates a route for every packet it forwards).
- `nftables` (the baseline): to a VIP; nftables DNAT to `jhash ip saddr mod 4` of
  the four servers in the router's prerouting, conntrack keeping each source's
  pick, as a Linux L4 load balancer does.
- `nftables_stateless`: to the VIP; `ip daddr set jhash ip saddr mod 4 map` at raw
  priority, no conntrack: the cheapest balancing nftables offers.
- `unicast`: to the owner's own address; plain FIB forwarding, no balancing: the
  ceiling.

Placement on the machine's two cores, so that the router is what limits: the
generators run on CPU 0; the router's receive processing runs on CPU 1 (threaded
NAPI on its client-facing veth ports, pinned there; GRO on those ports and TSO off
on the clients' side, without which veth bypasses NAPI); what the router sends on is
received by the servers on CPU 0 (RPS); the router daemon of either family runs on
CPU 1. The NAPI threads run at nice -20, the generators at -10 in their own
autogroup, so that other work on a shared machine takes little from either. A
generator's send buffer is large (64 MB): packets in flight are charged to it, and a
default one would pace the generator to the router instead of overflowing the
router's queue. How we know the router limits, per kind in `limit`: its ports drop
what the generators offer beyond what it takes (`dropped_at_router_pps` > 1% of
delivered: `limited_by` "router"), its thread's share of CPU 1, and before the
rounds the manycast rate from one generator and from two (flat when the router
limits). A share of CPU 1 below 1.0 is time other processes of the machine took from
the router's thread.

Rounds: each runs the six kinds once, in an order shuffled per round (seeded,
the seed in the output). `ratio_vs_nftables` is the ratio of the medians
(manycast by the MFC over nftables DNAT); `ratio_vs_nftables_per_round_median` the
median of the per-round ratios; the same against the stateless and unicast
references; `portions_ratio_vs_*` for the portion plane and
`mcast_routes_ratio_vs_*` for the MFC with multicast routes.
`router_thread_ns_per_packet`: CPU time of the router's threads per packet
received (deferred work, RCU frees among it, runs elsewhere and is not in it).

`at_scale`: after the rounds, 100 000 client sources (50 000 per LAN) each send
to the group, so that the MFC holds an entry for each (installed by upcalls);
the forwarding entries of each plane are then counted: the MFC's resolved
entries for the group against the portion plane's elements (in the daemon and
in the kernel's maps). `first_packet_install_us` (p50, p99): fresh sources
beyond those, one at a time, in blocks of 50 per kind (the first of each block
sent and left out); the daemon's time from reading the NOCACHE upcall to the
entry installed (its `install_seconds` counter before and after each), with
`p50_per_round` the p50 of each block, and `p50_unpreempted`/`p99_unpreempted`
over the samples in which no other process took the daemon's CPU (its
involuntary context switches did not move): on a shared machine the p99 is
otherwise the other work's.
`first_packet_delivered_us`: from the send of a fresh source's first packet to
its arrival at a server's interface (kernel timestamps), for the MFC (an upcall
to the daemon), the portion plane (no upcall: `upcalls` counts the daemon's
during the samples) and nftables DNAT (a new conntrack entry), side by side.

IPv6, beside IPv4 in the same command: the same measurement on a lab of its own
(namespaces `kb6-*`; IPv4's are `kb-*`; both up at once and taken down at the end,
whatever happens), built from the same topology on an IPv6 network: group
ff3e::8000:1, client LANs 2001:db8:1::/64 and 2001:db8:2::/64 whose sources' low
bits pick the owner (`2001:db8::v/ffff:ffff::3` joins), servers on
2001:db8:fffe::/48. The router daemon hosts `Router6` on the MRT6 socket (a MIF
per interface, MLDv2 joins); the generators' frames are IPv6/UDP (Ethernet type
0x86DD, the group's 33:33 address, hop limit 8, the UDP checksum IPv6 makes
mandatory); the portion plane is `table netdev manycast6` (`ip6 saddr & mask`,
`fwd ip6 to`); the nftables baselines are `table ip6` (`jhash ip6 saddr`, DNAT
with conntrack; `ip6 daddr set ... map` at raw priority); unicast goes to the
owner's IPv6 address. `manycast_mcast_routes` is not measured on IPv6
(`not_measured` says why: the kernel already has the route it adds, ff00::/8 on
every interface). The IPv6 figures are under `ipv6`, with the same keys as
IPv4's at the top level; `ipv6_over_ipv4` gives the IPv6 figure over the IPv4
one for packets/s delivered by manycast (MFC), the portion plane, both nftables
baselines and unicast, and IPv4's over IPv6's for `first_packet_install_us` p50
and p99 (a time): 1 is parity, the goal 0.9 for each; `*_per_round_median` beside
each, the median of the per-round ratios. The families are interleaved
(`_kernel_runs.py`): both labs are built and warmed the same way, then each
round, and each block of first packets, measures both in a shuffled order
(`family_orders`), so that neither is always second on a machine whose load
moves; `loadavg_1min_start_end` is the whole run's. `servers_sunk_share`: of
what the servers' interfaces received, the share their ingress rule dropped (the
rule matches UDP of either family). `--family 4` or `--family 6` runs one family alone. If the
IPv6 run fails, the IPv4 figures are still printed, with `error` (the run exits
1).

`--profile`: kernel events per delivered packet in the router's threads for each
kind (`perf stat` on tracepoints: FIB lookups, slab allocations), which is where
ipmr's extra cost shows. Sampling profiles (`perf record`) are no use on this
kind of virtual machine: its software clock does not sample the NAPI threads.
`--quick`: 3 rounds of 1 s, fewer latency samples and 20 000 sources at scale (a
smoke test; quote a full run).

Needs root, `ip` and `nft` (and `perf` for `--profile`); elsewhere it prints a
JSON line saying why it did not run. Progress goes to stderr.

Its last line on stdout is one json object (`_common.run_and_emit`): the result,
or why it stopped (an error, a missing package, SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import argparse
import os
import random
import shutil
import statistics
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import _plots
from _common import progress, run_and_emit
from _kernel_runs import measure_families
from _kernel_setup import BASELINES, FRAMES_OF, GENERATOR_CPU, GENERATOR_NICE, KINDS, OURS
from _kernel_traffic import run_generator, udp_frame

__all__ = ["KINDS", "summarize", "udp_frame"]
# Headline ratios of each of our kinds over each baseline, by key prefix.
PREFIX_OF = {
    "manycast": "ratio_vs_",
    "manycast_portions": "portions_ratio_vs_",
    "manycast_mcast_routes": "mcast_routes_ratio_vs_",
}
# The kinds whose packets/s IPv6 is set beside IPv4 (`ipv6_over_ipv4`), and its goal.
HEADLINE_KINDS = ("manycast", "manycast_portions", "nftables", "nftables_stateless", "unicast")
IPV6_GOAL = 0.9


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


# -- the run -----------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> dict[str, Any]:
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        why = (
            "the kernel lab needs root and network namespaces"
            if not missing
            else f"needs {missing}"
        )
        progress(f"bench/kernel.py: {why}; skipped")
        return {"bench": "kernel", "skipped": why}
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    versions = (4, 6) if args.family == "both" else (int(args.family),)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MANYCAST_LAB_RUN_ROOT"] = tmp
        runs = measure_families(args, versions, rng, Path(tmp))
    figures = {
        v: summarize(run.per_kind, run.orders, run.scaling, run.first, run.facts)
        for v, run in runs.runs.items()
        if v not in runs.errors
    }
    result: dict[str, Any] = {"bench": "kernel"}
    if 4 in versions:
        result.update(figures[4])
    if 6 in versions:
        result["ipv6"] = figures[6] if 6 in figures else {"error": runs.errors[6]}
        if 6 in runs.errors:
            result["error"] = f"the IPv6 run failed: {runs.errors[6]}"
    result["seed"] = seed
    if versions == (4, 6):
        result["family_orders"] = {"rounds": runs.round_orders, "first_packets": runs.block_orders}
        if 6 in figures:
            result["ipv6_over_ipv4"] = ipv6_over_ipv4(figures[4], figures[6])
    return result


def ipv6_over_ipv4(four: Mapping[str, Any], six: Mapping[str, Any]) -> dict[str, Any]:
    """IPv6 beside IPv4 for the headline figures, each a ratio where 1 is parity and
    above the goal is as good: packets/s delivered per kind (medians of the rounds),
    IPv6 over IPv4; the first packet's install time (p50, p99), IPv4 over IPv6 (a
    time: the faster over the slower reads the same way)."""
    ratios_: dict[str, Any] = {"goal": IPV6_GOAL}
    for kind in HEADLINE_KINDS:
        key = f"{kind}_pps"
        if key in four and key in six and four[key]:
            ratios_[key] = round(six[key] / four[key], 3)
        # Rounds interleaved: each round's IPv6 figure over the same round's IPv4 one.
        rounds = [
            b / a
            for a, b in zip(
                four.get(f"{key}_per_round", ()), six.get(f"{key}_per_round", ()), strict=True
            )
            if a
        ]
        if rounds:
            ratios_[f"{key}_per_round_median"] = round(statistics.median(rounds), 3)
    install4, install6 = four["first_packet_install_us"], six["first_packet_install_us"]
    for q in ("p50", "p99", "p50_unpreempted", "p99_unpreempted"):
        a, b = install4.get(q), install6.get(q)
        if a is not None and b:
            ratios_[f"first_packet_install_us_{q}_ipv4_over_ipv6"] = round(a / b, 3)
    # The p50 of each block of first packets (blocks interleaved as rounds are).
    blocks = [
        a / b
        for a, b in zip(
            install4.get("p50_per_round", ()), install6.get("p50_per_round", ()), strict=True
        )
        if a is not None and b
    ]
    if blocks:
        key = "first_packet_install_us_p50_ipv4_over_ipv6"
        ratios_[f"{key}_per_round_median"] = round(statistics.median(blocks), 3)
        ratios_[f"{key}_per_round"] = [round(r, 3) for r in blocks]
    return ratios_


def ratios(ours: list[float], base: list[float]) -> tuple[float, float, list[float]]:
    """(ratio of the medians, median of the per-round ratios, the per-round ratios)."""
    rounds = [m / o for m, o in zip(ours, base, strict=True) if o]
    return (
        round(statistics.median(ours) / statistics.median(base), 3),
        round(statistics.median(rounds), 3),
        [round(r, 3) for r in rounds],
    )


def summarize(
    per_kind: dict[str, list[dict[str, Any]]],
    orders: list[list[str]],
    scaling: dict[str, dict[str, int]],
    first: dict[str, dict[str, Any]],
    facts: dict[str, Any],
) -> dict[str, Any]:
    def med(kind: str, key: str) -> float:
        return float(statistics.median(r[key] for r in per_kind[kind]))

    kinds = [k for k in KINDS if k in per_kind]  # a family may leave a kind out

    def by_kind(key: str, digits: int) -> dict[str, float]:
        return {k: round(med(k, key), digits) for k in kinds}

    pps = {k: [r["delivered_pps"] for r in per_kind[k]] for k in kinds}
    result: dict[str, Any] = {"bench": "kernel"}
    for kind in kinds:
        result[f"{kind}_pps"] = round(statistics.median(pps[kind]))
    for ours in (k for k in OURS if k in per_kind):
        for base in BASELINES:
            key = f"{PREFIX_OF[ours]}{base}"
            result[key], result[f"{key}_per_round_median"], result[f"{key}_per_round"] = ratios(
                pps[ours], pps[base]
            )
    result["ratio_vs_nftables_goal"] = 1.0
    (
        result["portions_vs_mfc"],
        result["portions_vs_mfc_per_round_median"],
        result["portions_vs_mfc_per_round"],
    ) = ratios(pps["manycast_portions"], pps["manycast"])
    installs = first.get("manycast", {}).get("install_us", [])
    unpreempted = first.get("manycast", {}).get("install_us_unpreempted", [])
    result["first_packet_install_us"] = {
        "p50": percentile(installs, 0.5),
        "p99": percentile(installs, 0.99),
        "samples": len(installs),
        # The same without the samples in which another process took the daemon's CPU.
        "p50_unpreempted": percentile(unpreempted, 0.5),
        "p99_unpreempted": percentile(unpreempted, 0.99),
        "samples_unpreempted": len(unpreempted),
        "p50_per_round": [
            percentile(block, 0.5)
            for block in first.get("manycast", {}).get("install_us_blocks", [])
        ],
    }
    result["first_packet_delivered_us"] = {
        kind: {
            "p50": percentile(got["delivered_us"], 0.5),
            "p99": percentile(got["delivered_us"], 0.99),
            "samples": len(got["delivered_us"]),
            "sent": got.get("sent"),
            "upcalls": got.get("upcalls"),
        }
        for kind, got in first.items()
    }
    dropped = by_kind("dropped_pps", 0)
    result["limit"] = {
        # The router limits when its ports drop what the generators offer beyond
        # what it takes: the generators were faster.
        "limited_by": {
            k: "router" if dropped[k] > 0.01 * med(k, "delivered_pps") else "generators"
            for k in kinds
        },
        "delivered_pps_by_generators": scaling,
        "offered_pps": by_kind("offered_pps", 0),
        "dropped_at_router_pps": dropped,
        "router_thread_cpu_share": by_kind("router_thread_cpu_share", 3),
        "router_cpu_busy_share": by_kind("router_cpu_busy_share", 3),
        "generator_cpu_share": by_kind("generator_cpu_share", 3),
    }
    result["router_thread_ns_per_packet"] = by_kind("router_thread_ns_per_packet", 0)
    result["daemon_cpu_share_established"] = round(med("manycast", "daemon_cpu_share"), 4)
    result["delivered_by_server"] = {k: per_kind[k][-1]["delivered_by_server"] for k in kinds}
    for kind in kinds:
        result[f"{kind}_pps_per_round"] = [round(v) for v in pps[kind]]
    result["orders"] = orders
    result.update(facts)
    return result


def plot(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Packets per second delivered to the servers per round, by kind; and each of our
    kinds' per-round ratio to each baseline, with the goal line (IPv6's beside IPv4's)."""
    families = [("", result), (" IPv6", result.get("ipv6", {}))]

    def series_of(
        test: Callable[[str], bool], name: Callable[[str], str], scale: float
    ) -> dict[str, list[float]]:
        return {
            name(key).replace("_", " ") + suffix: [v / scale for v in values]
            for suffix, figures in families
            for key, values in figures.items()
            if test(key)
        }

    series = series_of(
        lambda key: key.endswith("_pps_per_round"),
        lambda key: key.removesuffix("_pps_per_round"),
        1e3,
    )
    fig, ax = _plots.figure("Kernel router: packets/s delivered per round, by kind")
    _plots.per_round(ax, series, ylabel="thousand packets / s")
    paths = [_plots.save(fig, directory, "kernel_pps_per_round")]
    ratios_ = series_of(
        lambda key: "ratio_vs_" in key and key.endswith("_per_round"),
        lambda key: key.removesuffix("_per_round"),
        1.0,
    )
    if ratios_:
        fig, ax = _plots.figure("Manycast (MFC, portions) over each baseline, per round")
        _plots.per_round(ax, ratios_, ylabel="ratio")
        _plots.reference(ax, 1.0, "goal vs nftables: 1.0")
        ax.legend(fontsize=7)
        paths.append(_plots.save(fig, directory, "kernel_ratios_per_round"))
    return paths


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    _plots.add_argument(parser)
    parser.add_argument("--quick", action="store_true", help="3 short rounds, few latency samples")
    parser.add_argument("--rounds", type=int, help="rounds (default 7; --quick 3)")
    parser.add_argument("--seed", type=int, help="seed of the per-round order (default: random)")
    parser.add_argument("--profile", action="store_true", help="perf profile of the router's CPU")
    parser.add_argument(
        "--family",
        choices=("4", "6", "both"),
        default="both",
        help="IPv4, IPv6, or IPv4 then IPv6 (default)",
    )
    parser.add_argument("--generator", type=Path, help=argparse.SUPPRESS)  # internal
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()  # before run_and_emit, so that --help prints on stdout
    if args.generator is not None:
        run_generator(args.generator, FRAMES_OF, GENERATOR_CPU, GENERATOR_NICE)
        return

    def run() -> dict[str, Any]:
        result = measure(args)
        if "skipped" not in result:
            _plots.write(result, args.plots, plot)
        return result

    run_and_emit("kernel", run)


if __name__ == "__main__":
    main()
