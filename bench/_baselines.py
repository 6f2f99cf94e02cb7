"""The two consistent-hashing baselines (Maglev and rendezvous) bench/lookup.py and
bench/realloc.py compare with.

Baselines are built from their published descriptions:
- Maglev (Eisenbud et al., NSDI 2016, section 3.4): each backend has an offset and
  a skip from two hashes of its name and walks the permutation
  (offset + j * skip) mod M, taking turns to claim the next free entry of a prime
  size table. Weights follow Envoy's weighted Maglev: a backend of weight w takes
  a turn in one round out of max_weight / w.
- Rendezvous (highest random weight, Thaler and Ravishankar 1998): each key goes to
  the backend with the highest score; weighted with score = -w / ln(h), h uniform
  in (0, 1), so a backend wins a share w / sum(w).

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import hashlib
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

MAGLEV_M = 65537  # the prime table size used throughout the Maglev paper's examples
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def name_hash(name: str, salt: str) -> int:
    """A 64-bit hash of a backend name, independent for each salt."""
    digest = hashlib.blake2b(name.encode(), digest_size=8, salt=salt.encode()[:16])
    return int.from_bytes(digest.digest(), "little")


def mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's finaliser: a full-avalanche 64-bit mix (two multiply-xorshifts)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    mixed: npt.NDArray[np.uint64] = x ^ (x >> np.uint64(31))
    return mixed


# Maglev ----------------------------------------------------------------------


def maglev_table(
    names: Sequence[str], weights: Sequence[int] | None = None, size: int = MAGLEV_M
) -> npt.NDArray[np.int32]:
    """table[e] = index into `names` of the backend owning entry e."""
    n = len(names)
    offsets = [name_hash(s, "maglev-offset") % size for s in names]
    skips = [name_hash(s, "maglev-skip") % (size - 1) + 1 for s in names]
    order = _maglev_turns(list(weights) if weights is not None else [1] * n, size)
    table = [-1] * size
    following = [0] * n
    for backend in order:
        offset, skip, j = offsets[backend], skips[backend], following[backend]
        entry = (offset + j * skip) % size
        while table[entry] >= 0:
            j += 1
            entry = (offset + j * skip) % size
        table[entry] = backend
        following[backend] = j + 1
    return np.array(table, dtype=np.int32)


def _maglev_turns(weights: list[int], size: int) -> list[int]:
    """The order in which backends claim entries: Envoy's loop, in which a backend
    of weight w claims its k-th entry in round ceil(k * max_w / w), in index order
    within a round. Equal weights give Maglev's plain round robin."""
    n = len(weights)
    if len(set(weights)) == 1:
        return [i % n for i in range(size)]
    top, total = max(weights), sum(weights)
    rounds: list[npt.NDArray[np.int64]] = []
    owners: list[npt.NDArray[np.int64]] = []
    enough = [math.ceil(size * w / total) + 2 if w else 0 for w in weights]
    for backend, w in enumerate(weights):
        k = np.arange(enough[backend], dtype=np.int64)
        rounds.append(-((-k * top) // w) if w else k)  # ceil(k * top / w)
        owners.append(np.full(enough[backend], backend, dtype=np.int64))
    all_rounds, all_owners = np.concatenate(rounds), np.concatenate(owners)
    chosen = np.lexsort((all_owners, all_rounds))[:size]
    turns = all_owners[chosen]
    used = np.bincount(turns, minlength=n)
    # Had a backend used every turn generated for it, it might have had more.
    assert all(used[i] < enough[i] for i in range(n) if weights[i]), "too few turns"
    return [int(t) for t in turns]


def maglev_lookup(
    table: npt.NDArray[np.int32], addrs: npt.NDArray[np.uint32]
) -> npt.NDArray[np.int32]:
    """The backend for each address: table[hash(addr) % M], hash = multiply-xorshift."""
    h = addrs.astype(np.uint64)
    np.multiply(h, _GOLDEN, out=h)
    np.bitwise_xor(h, h >> np.uint64(32), out=h)
    np.remainder(h, np.uint64(len(table)), out=h)
    found: npt.NDArray[np.int32] = table.take(h)
    return found


def maglev_entry(addr: int, size: int = MAGLEV_M) -> int:
    """The same hash for one address, in plain integers (to check the numpy path)."""
    h = (addr * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    return (h ^ (h >> 32)) % size


# Rendezvous ------------------------------------------------------------------


def rendezvous_owners(
    names: Sequence[str],
    keys: npt.NDArray[np.uint64],
    weights: Sequence[float] | None = None,
    block: int = 32,
) -> npt.NDArray[np.int32]:
    """For each key, the index of the backend with the highest -w / ln(h(backend, key))."""
    n = len(names)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    seeds = np.array([name_hash(s, "rendezvous") for s in names], dtype=np.uint64)
    mixed_keys = mix64(keys.astype(np.uint64) * _GOLDEN)
    best = np.full(len(keys), -np.inf)
    owner = np.zeros(len(keys), dtype=np.int32)
    for first in range(0, n, block):
        chunk = slice(first, min(first + block, n))
        h = mix64(mixed_keys[None, :] ^ seeds[chunk, None])
        u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
        score = -w[chunk, None] / np.log(u)
        top = score.argmax(axis=0)
        top_score = score[top, np.arange(len(keys))]
        better = top_score > best
        best[better] = top_score[better]
        owner[better] = top[better] + first
    return owner


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/lookup.py and bench/realloc.py")
