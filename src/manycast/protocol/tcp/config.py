"""Transport parameters of the session layer: segment size, window, timers, retry limit."""

from __future__ import annotations

from dataclasses import dataclass, replace

from manycast.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Transport parameters.  The default MSS leaves room for the overlay's outer
    IPv4/UDP and inner IPv6/TCP headers inside a 1500-byte link MTU."""

    mss: int = 1200
    window: int = 65535
    rto_initial: float = 1.0
    rto_min: float = 0.2
    rto_max: float = 60.0
    clock_granularity: float = 0.001
    max_retries: int = 8
    # Timeouts of an unacknowledged SYN or SYN-ACK before giving up (Linux's
    # tcp_syn_retries, tcp_synack_retries); None: `max_retries`. A half-open
    # connection holds its 4-tuple while it waits.
    syn_retries: int | None = None
    # Linux's thin-stream linear timeouts (tcp_thin_linear_timeouts): while fewer than
    # four segments are in flight, this many timeouts keep the RTO instead of doubling
    # it (Linux uses 6 when the option is on); 0: always exponential backoff.
    thin_linear_retries: int = 0
    time_wait: float = 1.0
    fin_wait_2_timeout: float = 180.0  # idle time; longer than a peer's backed-off RTO

    def __post_init__(self) -> None:
        if not 1 <= self.mss <= 0xFFFF:
            raise ConfigError(f"mss {self.mss} is not in 1..65535")
        if not 1 <= self.window <= 0xFFFF:
            raise ConfigError(f"window {self.window} is not in 1..65535 (no window scaling)")
        if not 0 < self.rto_min <= self.rto_initial <= self.rto_max:
            raise ConfigError("need 0 < rto_min <= rto_initial <= rto_max")
        if self.thin_linear_retries < 0:
            raise ConfigError("thin_linear_retries must be >= 0")
        if self.max_retries < 0 or self.time_wait < 0 or self.fin_wait_2_timeout <= 0:
            raise ConfigError("max_retries and time_wait must be >= 0, fin_wait_2_timeout > 0")
        if self.syn_retries is not None and self.syn_retries < 0:
            raise ConfigError("syn_retries must be >= 0")


THIN_LINEAR_RETRIES = 6  # Linux's TCP_THIN_LINEAR_RETRIES
# A client's transport: a short floor under its RTO (the pools are LANs and
# loopback), its first SYN's timer, and 5 timeouts before it gives up.
CLIENT_RTO_MIN_S = 0.05
CLIENT_RTO_INITIAL_S = 0.3
CLIENT_MAX_RETRIES = 5
# A client gives a request up this long after sending it (`protocol.client.Client`).
CLIENT_REQUEST_TIMEOUT_S = 2.0


def client_session(
    thin_stream: bool = False, rto_max: float | None = None, max_retries: int | None = None
) -> SessionConfig:
    """A client's transport parameters. `rto_max` caps its retransmission timeout
    (Linux's TCP_RTO_MAX_MS: a retransmission never waits longer, so a path that comes
    back is used within that much), the first SYN's timer included; as in Linux, a
    lower cap also shortens the time until the connection gives up unless
    `max_retries` (tcp_retries2) is raised with it."""
    config = SessionConfig(
        rto_initial=CLIENT_RTO_INITIAL_S,
        rto_min=CLIENT_RTO_MIN_S,
        max_retries=CLIENT_MAX_RETRIES if max_retries is None else max_retries,
        thin_linear_retries=THIN_LINEAR_RETRIES if thin_stream else 0,
    )
    if rto_max is not None:
        config = replace(config, rto_max=rto_max, rto_initial=min(config.rto_initial, rto_max))
    return config
