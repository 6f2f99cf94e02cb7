"""The retransmission timeout of RFC 6298: a smoothed round-trip time and its backoff."""

from __future__ import annotations

from manycast.protocol.tcp.config import SessionConfig


class RtoEstimator:
    """SRTT and RTTVAR from round-trip samples, and the RTO they give (RFC 6298
    section 2, alpha 1/8, beta 1/4, K 4), doubled on each timeout up to `rto_max`."""

    __slots__ = ("_config", "rto", "rttvar", "srtt")

    def __init__(self, config: SessionConfig) -> None:
        self._config = config
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = config.rto_initial

    def sample(self, r: float) -> None:
        """A round-trip time measured on a segment sent once (Karn's rule)."""
        if self.srtt is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.reset()

    def reset(self) -> None:
        """RTO from the estimate, without backoff (rto_initial before any sample)."""
        config = self._config
        if self.srtt is None:
            self.rto = config.rto_initial
            return
        rto = self.srtt + max(config.clock_granularity, 4 * self.rttvar)
        self.rto = min(max(rto, config.rto_min), config.rto_max)

    def back_off(self) -> None:
        self.rto = min(self.rto * 2, self._config.rto_max)

    def restore(self, srtt: float | None, rttvar: float, rto: float) -> None:
        """Take over another side's estimate; its RTO is kept within our bounds."""
        self.srtt, self.rttvar = srtt, rttvar
        self.rto = min(max(rto, self._config.rto_min), self._config.rto_max)
