"""Messages on the pool's control multicast channel (seed Fig 13-16).

Every server of a pool joins one control multicast group (Fig 13, 1300). Over it
the servers announce themselves (`Heartbeat`), agree on allocation changes
(`Command`, `Proposal`, `Ack`, `Commit`), fetch the allocation (`SnapshotRequest`,
`Snapshot`) and keep existing connections when their part of the space moves:
packets forwarded to the old owner, which then asks for them point to point
(R2, Fig 14: `Forwarded`, `Redirect`), state transferred on demand (R3, Fig 15:
`StateQuery`, `StateReply`). The virtual-IP pool (Fig 17-19) uses the same
envelope: servers announce themselves to their routers (`ServerHello`), routers
distribute labels (`LabelMapping`), VIP routers announce themselves (`VipAdvert`)
and tag flows at edge routers (`FlowTag`, `FlowUntag`), servers report load
(`LoadReport`); R4's pinned paths (Fig 16) are flow tags too. Technique D (Fig
20-21) moves a live connection to another server (`MoveConnection`, `MoveAck`).
The coordinator tells the routers that a server died (`MemberDown`). With the gossip
membership (`membership = "swim"`) servers probe each other point to point (`Probe`)
and announce joins, suspicions and deaths (`MemberNotice`) instead of heartbeats.
The messages travel as UDP payloads of inner IP packets.

Layout, big-endian, field widths in bits:

    envelope  "MC" version(8)=1 type(8) sender-length(8) sender seq(32) body
    address   family(8)=4|6, then 4 or 16 bytes
    id        length(8), then 1..64 bytes of UTF-8
    share     numerator(32) denominator(32): in lowest terms, 0 <= n/d <= 1
    digest    8 bytes: the 16 hex characters of the pool's state digest (allocation and
              shares, `space.shares_digest`), as raw bytes
    key       client-address client-port(16) group-address service-port(16)
    flow      protocol(8) client-address client-port(16) vip-address vip-port(16)
    space     family(8) prefix-value prefix-length(8) index-bits(8) shift(8) flags(8)
              (flags bit 0: interleave; other bits zero)

    type body
     1  Heartbeat       epoch(64) digest state(8) address load(f64) sessions(32) interval-ms(32)
     2  Command         command-id(64) op
     3  Proposal        epoch(64) base-epoch(64) base-digest digest delay-ms(32) op
     4  Ack             epoch(64) digest
     5  Commit          epoch(64) digest
     6  SnapshotRequest epoch(64)  (0: the latest)
     7  Snapshot        epoch(64) digest part(16) count(16) space
                        server-count(16) (id share(72))...
                        run-count(16) (start(32) stop(32) server(16))...
                        (share: what the server should hold, in 2^-64 of the space)
     8  Forwarded       receiver-address packet-length(16) packet
     9  Redirect        client-address client-port(16) service-port(16)
                        target-address target-port(16)
    10  StateQuery      query-id(64) key
    11  StateReply      query-id(64) key outcome(8) length(32) transport-state
                        length(32) application-state
                        (outcome: 0 not found, 1 found, 2 held by a server
                        that serves its client now, not given)
    12, 13              retired (R4's per-hop pins), refused as unknown types
    14  ServerHello     server-address vip-address hold-ms(32)
    15  LabelMapping    router-address hold-ms(32) count(16) (fec-address label(32))...
                        (labels 16..2^20-1, sorted by fec, none twice)
    16  FlowTag         flow server-address idle-ms(32)
    17  FlowUntag       count(16) flow...
    18  VipAdvert       vip-address router-address hold-ms(32)
    19  LoadReport      server-address load(f64) sessions(32)
    20  MoveConnection  origin-address epoch(64) key serial(32) length(32) transport-state
                        length(32) application-state  (serial >= 1, a transport state)
    21  MoveAck         key serial(32)
    22  MemberDown      group-address member-address signer-address epoch(64) wall-ms(64)
                        nonce(64 bits) signature-length(8)=0|64 signature
    23  Probe           kind(8) nonce(32) target-id target-address target-incarnation(64)
                        incarnation(64) epoch(64) digest state(8) address load(f64)
                        sessions(32)  (kind: 1 PING, 2 ACK, 3 PING_REQ)
    24  MemberNotice    status(8) member-id address incarnation(64) state(8)
                        (status: 1 ALIVE, 2 SUSPECT, 3 DEAD)

    op  kind(8), then
     1  ADD_SERVER      id has-share(8) [share]
     2  REMOVE_SERVER   id
     3  SET_SHARE       id share
     4  REBALANCE       target(f64) count(16) (bucket(32) load(f64))...
     5  REPLACE         snapshot-epoch(64) digest
     6  BALANCE_LOADS   target(f64) count(16) (id load(f64))...
                        count(16) (bucket(32) load(f64))...
     7  MEMBERS         count(16) id... count(16) id...  (removed, then added;
                        each sorted, none twice, none in both, not both empty)

Strictness: a decoder accepts only bytes that re-encode identically, so flags
are 0 or 1, fractions are in lowest terms, lists are in their canonical order
(sorted, no duplicates) and nothing may follow the body. Every check lives in
the dataclasses' `__post_init__`, so a message that cannot be decoded cannot be
built either, and both raise `WireError`.

Modules: `fields` (field checks and codecs), `envelope` (the envelope and
`decode`), `ops` (policy operations), `coordination` (heartbeats, proposals,
acks, commits), `snapshot` (the allocation in parts), `handover` (R2-R4), `vip`
(the virtual-IP pool), `redirect` (technique D), `death` (a server's death, told to the routers),
`swim` (the gossip membership's probes and notices).
Everything public is re-exported here: `control.SetShareOp(...)`.
"""

from __future__ import annotations

from typing import TypeAlias

from manycast.wire.control.coordination import (
    Ack,
    Command,
    Commit,
    Heartbeat,
    Proposal,
    ServerState,
)
from manycast.wire.control.death import MemberDown
from manycast.wire.control.envelope import MAGIC, VERSION, MessageType, decode, encode
from manycast.wire.control.fields import (
    MAX_BUCKET_LOADS,
    MAX_ID_BYTES,
    MAX_PACKET,
    Address,
)
from manycast.wire.control.handover import (
    ConnectionKey,
    Forwarded,
    Redirect,
    StateQuery,
    StateReply,
)
from manycast.wire.control.ops import (
    AddServerOp,
    BalanceLoadsOp,
    BucketLoad,
    MembersOp,
    OpKind,
    PolicyOp,
    RebalanceOp,
    RemoveServerOp,
    ReplaceOp,
    ServerLoad,
    SetShareOp,
    decode_op,
    encode_op,
)
from manycast.wire.control.redirect import MoveAck, MoveConnection
from manycast.wire.control.snapshot import (
    SNAPSHOT_MAX_BYTES,
    Run,
    Snapshot,
    SnapshotRequest,
    SnapshotState,
    assemble,
    snapshot_parts,
)
from manycast.wire.control.swim import MemberNotice, MemberStatus, Probe, ProbeKind
from manycast.wire.control.vip import (
    MAX_BINDINGS,
    MAX_FLOW_KEYS,
    Binding,
    FlowKey,
    FlowTag,
    FlowUntag,
    LabelMapping,
    LoadReport,
    ServerHello,
    VipAdvert,
)

ControlMessage: TypeAlias = (
    Heartbeat
    | Command
    | Proposal
    | Ack
    | Commit
    | SnapshotRequest
    | Snapshot
    | Forwarded
    | Redirect
    | StateQuery
    | StateReply
    | ServerHello
    | LabelMapping
    | FlowTag
    | FlowUntag
    | VipAdvert
    | LoadReport
    | MoveConnection
    | MoveAck
    | MemberDown
    | Probe
    | MemberNotice
)

__all__ = [
    "MAGIC",
    "MAX_BINDINGS",
    "MAX_BUCKET_LOADS",
    "MAX_FLOW_KEYS",
    "MAX_ID_BYTES",
    "MAX_PACKET",
    "SNAPSHOT_MAX_BYTES",
    "VERSION",
    "Ack",
    "AddServerOp",
    "Address",
    "BalanceLoadsOp",
    "Binding",
    "BucketLoad",
    "Command",
    "Commit",
    "ConnectionKey",
    "ControlMessage",
    "FlowKey",
    "FlowTag",
    "FlowUntag",
    "Forwarded",
    "Heartbeat",
    "LabelMapping",
    "LoadReport",
    "MemberDown",
    "MemberNotice",
    "MemberStatus",
    "MembersOp",
    "MessageType",
    "MoveAck",
    "MoveConnection",
    "OpKind",
    "PolicyOp",
    "Probe",
    "ProbeKind",
    "Proposal",
    "RebalanceOp",
    "Redirect",
    "RemoveServerOp",
    "ReplaceOp",
    "Run",
    "ServerHello",
    "ServerLoad",
    "ServerState",
    "SetShareOp",
    "Snapshot",
    "SnapshotRequest",
    "SnapshotState",
    "StateQuery",
    "StateReply",
    "VipAdvert",
    "assemble",
    "decode",
    "decode_op",
    "encode",
    "encode_op",
    "snapshot_parts",
]
