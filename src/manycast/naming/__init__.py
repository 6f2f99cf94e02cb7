"""Pool names on DNS: the seed's extended record (Fig 3, 4) on a real DNS server.

Routers fetch a pool's key from its record to check signed joins (Fig 6, 8),
clients to check a change of destination (Fig 21). The package, by concept:

* `manycast.addressplan` (re-exported here): the address plan (Fig 2) and the
  naming errors `NamingError`, `NamingTimeout`, `NamingRefused`, `BadRecord`.
* `keyrecord`: the TXT key record's codec.
* `records`: `PoolRecord` as RRsets (A and/or AAAA, TXT; PTR and TXT at each group's
  reverse name) and their strict decoding; IPv4, IPv6 and dual-stack pools.
* `zone`: master files for the pool zone and the multicast reverse zones of both families.
* `tsig`: the TSIG keys that sign updates.
* `transport`: queries and updates as sans-I/O steps, driven sync or on asyncio.
* `client`: lookups by alias or group, publish and withdraw.
* `keylookup`: one `KeyAnswer` for a router's key question, from a directory or DNS.
* `keycache`: a router's keys on disk across its restarts (served stale while DNS is down).
"""

from manycast.addressplan import (
    DEFAULT_PLAN,
    DEFAULT_PRIVATE_RANGES,
    AddressPlan,
    BadRecord,
    NamingError,
    NamingRefused,
    NamingTimeout,
)
from manycast.naming.client import (
    lookup_alias,
    lookup_alias_async,
    lookup_group,
    lookup_group_async,
    publish,
    publish_async,
    withdraw,
    withdraw_async,
)
from manycast.naming.keycache import KeyCache, KeyCacheError
from manycast.naming.keylookup import (
    KEY_TTL,
    KeyAnswer,
    key_from_directory,
    lookup_key,
    lookup_key_async,
)
from manycast.naming.keyrecord import KeyRecord, format_key_txt, is_key_txt, parse_key_txt
from manycast.naming.records import PoolRecord, decode_rrsets, record_rrsets, reverse_name
from manycast.naming.transport import Server
from manycast.naming.tsig import Keyring, TsigKey
from manycast.naming.zone import MULTICAST_REVERSE_ZONES, pool_zones, zone_text

__all__ = [
    "DEFAULT_PLAN",
    "DEFAULT_PRIVATE_RANGES",
    "KEY_TTL",
    "MULTICAST_REVERSE_ZONES",
    "AddressPlan",
    "BadRecord",
    "KeyAnswer",
    "KeyCache",
    "KeyCacheError",
    "KeyRecord",
    "Keyring",
    "NamingError",
    "NamingRefused",
    "NamingTimeout",
    "PoolRecord",
    "Server",
    "TsigKey",
    "decode_rrsets",
    "format_key_txt",
    "is_key_txt",
    "key_from_directory",
    "lookup_alias",
    "lookup_alias_async",
    "lookup_group",
    "lookup_group_async",
    "lookup_key",
    "lookup_key_async",
    "parse_key_txt",
    "pool_zones",
    "publish",
    "publish_async",
    "record_rrsets",
    "reverse_name",
    "withdraw",
    "withdraw_async",
    "zone_text",
]
