"""A client population modelled by rates: many addresses, each sending at its own rate,
with no node and no packet of its own.

Which server carries an address's load is the allocation's answer for that address
(`Allocation.owner_many`, one vectorised lookup per distinct allocation), so a
million addresses cost a few milliseconds per allocation, not a million nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from manycast.errors import ConfigError
from manycast.space import AddressSpace, Allocation

MAX_ADDRESSES = 10**7
RATE_SIGMA = 1.0  # log-normal rates: most addresses send little, a few much more
CACHED_ALLOCATIONS = 16


@dataclass
class Population:
    """`addresses` (IPv4, as integers) inside the pool's space and the requests per
    second each sends; `buckets[i]` is address i's bucket of the space."""

    space: AddressSpace
    addresses: npt.NDArray[np.int64]
    rates: npt.NDArray[np.float64]
    buckets: npt.NDArray[np.int64] = field(init=False)
    addresses_per_bucket: npt.NDArray[np.int64] = field(init=False)
    rate_per_bucket: npt.NDArray[np.float64] = field(init=False)
    _loads: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        space = self.space
        index = (self.addresses >> space.shift) & (space.buckets - 1)
        self.buckets = space.field_order()[index]
        self.addresses_per_bucket = np.bincount(self.buckets, minlength=space.buckets)
        self.rate_per_bucket = np.bincount(
            self.buckets, self.rates, minlength=space.buckets
        ).astype(np.float64)

    @classmethod
    def generate(cls, space: AddressSpace, count: int, mean_rate: float, seed: int) -> Population:
        """`count` distinct addresses drawn uniformly from the space's prefix, with
        log-normal rates averaging `mean_rate` requests per second."""
        if space.family != 4:
            raise ConfigError("the simulator models IPv4 client populations only")
        if not 1 <= count <= MAX_ADDRESSES:
            raise ConfigError(f"{count} addresses: the population has 1..{MAX_ADDRESSES}")
        free_bits = space.prefix.width - bin(space.prefix.mask).count("1")
        if count > (1 << free_bits):
            raise ConfigError(f"{count} addresses do not fit in {space.prefix}")
        rng = np.random.default_rng(seed)
        draw = count
        chosen: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)
        while len(chosen) < count:
            offsets = rng.integers(0, 1 << free_bits, size=draw, dtype=np.int64)
            chosen = np.unique(np.concatenate((chosen, offsets)))
            draw = count - len(chosen) + 16
        chosen = rng.permutation(chosen)[:count]
        addresses = np.int64(space.prefix.value) | chosen
        raw = rng.lognormal(0.0, RATE_SIGMA, size=count)
        rates = raw * (mean_rate / raw.mean())
        return cls(space, addresses.astype(np.int64), rates)

    @property
    def total_rate(self) -> float:
        return float(self.rates.sum())

    def loads(self, allocation: Allocation) -> npt.NDArray[np.float64]:
        """Requests per second each of `allocation.servers` would carry if every address
        went to its owner by `allocation`: one `owner_many` per allocation, cached by its
        digest (the servers that computed the same allocation each hold their own copy)."""
        cached = self._loads.get(allocation.digest())
        if cached is not None:
            return cached
        owners = allocation.owner_many(self.addresses)
        inside = owners >= 0
        loads: npt.NDArray[np.float64] = np.bincount(
            owners[inside], self.rates[inside], minlength=len(allocation.servers)
        ).astype(np.float64)
        if len(self._loads) >= CACHED_ALLOCATIONS:
            self._loads.clear()
        self._loads[allocation.digest()] = loads
        return loads
