"""bench/realloc.py part 2's fast baselines: Maglev's fill in C and weighted rendezvous
kept up to date incrementally, each giving exactly what bench/_baselines.py's rebuild gives.

Run alone, it prints one json object, its last line on stdout, naming the bench
to run (`_common.not_a_bench`).
"""

from __future__ import annotations

import _common  # noqa: F401  # isort: skip  # first: a missing package ends in the JSON line
import ctypes
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from _baselines import _GOLDEN, maglev_table, mix64, name_hash, rendezvous_owners
from _common import progress


def names_for(n: int) -> list[str]:
    return [f"s{i:04d}" for i in range(n)]


def server_id(name: str) -> int:
    return int(name[1:])


def smallest_prime_at_least(n: int) -> int:
    def prime(k: int) -> bool:
        return k >= 2 and all(k % d for d in range(2, int(k**0.5) + 1))

    while not prime(n):
        n += 1
    return n


# -- part 2: Maglev and rendezvous that keep up with 1000 changes ----------------------------

# Maglev's fill (Eisenbud et al. 2016, section 3.4) with the turns of bench/_baselines.py's
# Envoy-style weights: backend b claims its k-th entry in round ceil(k * top / w[b]),
# in index order within a round, each time the next free entry along its permutation
# (offset + j * skip) mod size.
_MAGLEV_C = r"""
#include <stdint.h>
int maglev_fill(int64_t n, const int64_t *offset, const int64_t *skip,
                const int64_t *weight, int64_t size, int64_t *next, int64_t *claimed,
                int32_t *table) {
    int64_t top = 0, filled = 0;
    for (int64_t b = 0; b < n; b++) {
        if (weight[b] < 0) return -1;
        if (weight[b] > top) top = weight[b];
        next[b] = 0;
        claimed[b] = 0;
    }
    if (top == 0) return -1;
    for (int64_t e = 0; e < size; e++) table[e] = -1;
    for (int64_t round = 0; filled < size; round++) {
        for (int64_t b = 0; b < n && filled < size; b++) {
            if (weight[b] == 0 || claimed[b] * top > round * weight[b]) continue;
            int64_t j = next[b], e = (offset[b] + j * skip[b]) % size;
            while (table[e] >= 0) {
                j++;
                e = (offset[b] + j * skip[b]) % size;
            }
            table[e] = (int32_t)b;
            next[b] = j + 1;
            claimed[b]++;
            filled++;
        }
    }
    return 0;
}
"""

Fill = Callable[..., int]


@cache
def compiled_fill() -> Fill | None:
    """The C fill, compiled with the system's cc and loaded; None without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory(prefix="manycast-maglev-") as tmp:
        source, library = Path(tmp) / "maglev.c", Path(tmp) / "maglev.so"
        source.write_text(_MAGLEV_C)
        done = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            progress(f"cc failed, Maglev in Python: {done.stderr[-300:]}")
            return None
        fill = ctypes.CDLL(str(library)).maglev_fill  # stays mapped once loaded
    i64 = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
    i32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
    fill.argtypes = [ctypes.c_int64, i64, i64, i64, ctypes.c_int64, i64, i64, i32]
    fill.restype = ctypes.c_int
    return fill


class MaglevBuilder:
    """Maglev tables of one size, the same as `maglev_table` gives, built in C when a
    compiler is at hand; backend hashes kept per name."""

    def __init__(self, size: int, fill: Fill | None) -> None:
        self.size = size
        self.fill = fill
        self._hashes: dict[str, tuple[int, int]] = {}

    def __call__(
        self, names: Sequence[str], weights: Sequence[int] | None
    ) -> npt.NDArray[np.int32]:
        if self.fill is None:
            return maglev_table(names, weights, self.size)
        for s in names:
            if s not in self._hashes:
                self._hashes[s] = (
                    name_hash(s, "maglev-offset") % self.size,
                    name_hash(s, "maglev-skip") % (self.size - 1) + 1,
                )
        pairs = np.array([self._hashes[s] for s in names], dtype=np.int64).reshape(-1, 2)
        n = len(names)
        w = np.ones(n, dtype=np.int64) if weights is None else np.array(weights, dtype=np.int64)
        table = np.empty(self.size, dtype=np.int32)
        scratch = np.empty((2, n), dtype=np.int64)
        offsets, skips = np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
        if self.fill(n, offsets, skips, w, self.size, scratch[0], scratch[1], table):
            raise ValueError("Maglev needs non-negative weights, one of them positive")
        return table


class IncrementalRendezvous:
    """Weighted rendezvous owners of the 2^16 bucket keys, kept up to date as weights
    change: the same owners `rendezvous_owners` computes from scratch (the same scores,
    float for float), at the cost of the keys a change can affect."""

    BLOCK = 32

    def __init__(self, bits: int = 16) -> None:
        self.keys = np.arange(1 << bits, dtype=np.uint64)
        self._mixed = mix64(self.keys * _GOLDEN)
        self.weight: dict[str, float] = {}
        self._seed: dict[str, np.uint64] = {}
        self.best = np.full(len(self.keys), -np.inf)
        self.owner = np.full(len(self.keys), -1, dtype=np.int64)  # server ids

    def _scores(
        self, names: Sequence[str], keys: npt.NDArray[np.intp] | slice
    ) -> npt.NDArray[np.float64]:
        seeds = np.array([self._seed[s] for s in names], dtype=np.uint64)
        w = np.array([self.weight[s] for s in names], dtype=np.float64)
        h = mix64(self._mixed[keys][None, :] ^ seeds[:, None])
        u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
        scores: npt.NDArray[np.float64] = -w[:, None] / np.log(u)
        return scores

    def _recompute(self, keys: npt.NDArray[np.intp]) -> None:
        """Owners of `keys` over every server, in name order (a rebuild's tie-break)."""
        names = sorted(self.weight)
        best = np.full(len(keys), -np.inf)
        owner = np.full(len(keys), -1, dtype=np.int64)
        for first in range(0, len(names), self.BLOCK):
            block = names[first : first + self.BLOCK]
            scores = self._scores(block, keys)
            top = scores.argmax(axis=0)
            top_score = scores[top, np.arange(len(keys))]
            better = top_score > best
            best[better] = top_score[better]
            owner[better] = np.array([server_id(s) for s in block])[top[better]]
        self.best[keys], self.owner[keys] = best, owner

    def set(self, name: str, weight: float) -> None:
        old = self.weight.get(name)
        self.weight[name] = weight
        self._seed.setdefault(name, np.uint64(name_hash(name, "rendezvous")))
        mine = self.owner == server_id(name)
        if old is not None and weight < old:
            self._recompute(np.flatnonzero(mine))  # only its keys can change hands
            return
        scores = self._scores([name], slice(None))[0]
        self.best[mine] = scores[mine]
        wins = ~mine & (scores > self.best)
        self.best[wins], self.owner[wins] = scores[wins], server_id(name)

    def remove(self, name: str) -> None:
        del self.weight[name]
        self._recompute(np.flatnonzero(self.owner == server_id(name)))

    def rebuilt(self) -> npt.NDArray[np.int64]:
        """The owners from scratch, by `rendezvous_owners` (to check this class)."""
        names = sorted(self.weight)
        found = rendezvous_owners(names, self.keys, [self.weight[s] for s in names])
        return np.array([server_id(s) for s in names], dtype=np.int64)[found]


if __name__ == "__main__":
    from _common import not_a_bench

    not_a_bench(__file__, "bench/realloc.py")
