"""The config's sections: one frozen, keyword-only dataclass per component, each checking its own
keys (every duration in seconds, every size with its unit in its name). ``[strategy]`` and
``[compression]`` live in :mod:`p2pdl.config.strategy` and the training loop's sections in
:mod:`p2pdl.config.training`; both are re-exported here."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

from p2pdl.config.base import (
    MIB,
    Compression,
    _check,
    _Validated,
    parse_address,
)
from p2pdl.config.strategy import OVERLAP_MAX_BUCKETS, CompressionConfig, StrategyConfig
from p2pdl.config.training import OptimizerConfig, RunConfig, ScheduleConfig
from p2pdl.core.topology import TopologyKind

__all__ = [
    "OVERLAP_MAX_BUCKETS",
    "CheckpointConfig",
    "CompressionConfig",
    "MembershipConfig",
    "ObserveConfig",
    "OptimizerConfig",
    "PeerEntry",
    "RunConfig",
    "ScheduleConfig",
    "SecurityConfig",
    "StrategyConfig",
    "TopologyConfig",
    "TransportConfig",
    "observe_problems",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class TopologyConfig(_Validated):
    """The communication graph over ``[[peers]]``; see :mod:`p2pdl.core.topology`."""

    _section: typing.ClassVar[str] = "topology"
    kind: TopologyKind = "ring"
    rows: int | None = None  # torus only
    cols: int | None = None  # torus only
    center: str | None = None  # star only
    edges: tuple[tuple[str, str], ...] | None = None  # explicit only

    def problems(self) -> list[str]:
        return []  # checked against the peer list in Config, where the names are known


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportConfig(_Validated):
    """Network limits and timeouts. Every ``*_timeout`` is in seconds."""

    _section: typing.ClassVar[str] = "transport"
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    send_timeout: float = 30.0
    startup_timeout: float = 60.0  # wait for every neighbour before the first step
    shutdown_timeout: float = 5.0
    state_timeout: float = 120.0  # a joiner's whole state download
    heartbeat_interval: float = 5.0  # WebSocket ping period; a missing pong drops the link
    reconnect_initial: float = 0.1  # first back-off delay, doubled up to reconnect_max
    reconnect_max: float = 5.0
    max_frame_mib: float = 512.0
    max_decompressed_mib: float = 512.0
    max_tensors: int = 4096
    inbox_frames: int = 16  # buffered, unclaimed frames per neighbour before refusing more
    compression: Compression = "auto"
    max_connections: int = 512  # open TCP connections to this peer's server, in total
    # Per remote IP. Every peer of a one-machine swarm connects from 127.0.0.1, so this must allow
    # a few connections per other peer (its link, pooled HTTP requests, a status poller).
    max_connections_per_address: int = 128
    request_timeout: float = 10.0  # a connection must deliver a complete request head in this time
    max_frames_per_second: float = 500.0  # per neighbour; a burst of twice this is allowed

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mib * MIB)

    @property
    def max_decompressed_bytes(self) -> int:
        return int(self.max_decompressed_mib * MIB)

    def problems(self) -> list[str]:
        found: list[str] = []
        for name in (
            "connect_timeout",
            "handshake_timeout",
            "send_timeout",
            "startup_timeout",
            "shutdown_timeout",
            "state_timeout",
            "heartbeat_interval",
            "reconnect_initial",
            "reconnect_max",
        ):
            value = getattr(self, name)
            _check(found, value > 0, f"transport.{name} must be > 0 seconds, got {value}")
        _check(
            found,
            self.reconnect_initial <= self.reconnect_max,
            f"transport.reconnect_initial ({self.reconnect_initial}) must be <= "
            f"transport.reconnect_max ({self.reconnect_max})",
        )
        _check(found, 0 < self.max_frame_mib <= 4095, "transport.max_frame_mib must be in (0, 4095]")
        _check(
            found,
            0 < self.max_decompressed_mib <= 4095,
            "transport.max_decompressed_mib must be in (0, 4095]",
        )
        _check(
            found,
            self.max_tensors >= 1,
            f"transport.max_tensors must be >= 1, got {self.max_tensors}",
        )
        _check(
            found,
            self.inbox_frames >= 2,
            f"transport.inbox_frames must be >= 2, got {self.inbox_frames}",
        )
        _check(found, self.max_connections >= 1, f"transport.max_connections must be >= 1, got {self.max_connections}")
        _check(
            found,
            1 <= self.max_connections_per_address <= self.max_connections,
            "transport.max_connections_per_address must be in [1, transport.max_connections]",
        )
        _check(
            found,
            self.request_timeout > 0,
            f"transport.request_timeout must be > 0 seconds, got {self.request_timeout}",
        )
        _check(
            found,
            self.max_frames_per_second > 0,
            f"transport.max_frames_per_second must be > 0, got {self.max_frames_per_second}",
        )
        _check(
            found,
            self.handshake_timeout <= self.startup_timeout,
            f"transport.handshake_timeout ({self.handshake_timeout}) must be <= "
            f"transport.startup_timeout ({self.startup_timeout})",
        )
        return found


@dataclass(frozen=True, kw_only=True, slots=True)
class MembershipConfig(_Validated):
    """Discovery and failure detection. Every duration is in seconds."""

    _section: typing.ClassVar[str] = "membership"
    bootstrap: tuple[str, ...] = ()  # HOST:PORT of any live peers; configured peers are seeds too
    gossip_interval: float = 1.0  # period of heartbeats and membership push-pull
    gossip_timeout: float = 2.0  # one push-pull exchange
    fanout: int = 8  # members contacted per period (all of them in swarms up to this size)
    suspect_after: float = 5.0  # no fresh heartbeat for this long: suspect (still a neighbour); floor of the dead limit
    dead_after: float = 20.0  # no fresh heartbeat for this long: dead whatever the rhythm (> strategy.round_timeout)
    # Phi-accrual detection: dead once phi (-log10 P(a heartbeat still comes)) over the measured
    # heartbeat intervals reaches this, within [suspect_after, dead_after]; 0 = always dead_after
    phi_threshold: float = 8.0

    def problems(self) -> list[str]:
        found: list[str] = []
        for address in self.bootstrap:
            try:
                parse_address(address)
            except ValueError as exc:
                found.append(f"membership.bootstrap: {exc}")
        for name in ("gossip_interval", "gossip_timeout", "suspect_after", "dead_after"):
            value = getattr(self, name)
            _check(found, value > 0, f"membership.{name} must be > 0 seconds, got {value}")
        _check(found, self.fanout >= 1, f"membership.fanout must be >= 1, got {self.fanout}")
        _check(
            found,
            self.phi_threshold == 0 or 1 <= self.phi_threshold <= 30,
            f"membership.phi_threshold must be 0 (fixed dead_after) or in [1, 30], got {self.phi_threshold}",
        )
        _check(
            found,
            self.suspect_after >= 2 * self.gossip_interval,
            f"membership.suspect_after ({self.suspect_after}) must be >= 2 x membership.gossip_interval "
            f"({self.gossip_interval}), or one lost heartbeat makes a live peer suspect",
        )
        _check(
            found,
            self.dead_after > self.suspect_after,
            f"membership.dead_after ({self.dead_after}) must be > membership.suspect_after ({self.suspect_after})",
        )
        _check(
            found,
            self.gossip_timeout <= self.suspect_after,
            f"membership.gossip_timeout ({self.gossip_timeout}) must be <= membership.suspect_after "
            f"({self.suspect_after})",
        )
        return found


@dataclass(frozen=True, kw_only=True, slots=True)
class SecurityConfig(_Validated):
    """Who may talk to a peer. Paths are relative to the config file.

    With a secret (from ``secret_env`` or ``secret_file``) every request except ``GET /healthz``
    carries a single-use HMAC-SHA256 token; without one the swarm is open to anyone who can reach
    its ports (fine on a private network or loopback only). TLS needs all of cert, key and CA.
    """

    _section: typing.ClassVar[str] = "security"
    secret_env: str | None = None  # name of the environment variable holding the swarm secret
    secret_file: Path | None = None  # or a file holding it (>= 16 bytes)
    max_clock_skew: float = 30.0  # seconds a token's timestamp may differ from this peer's clock
    tls_cert: Path | None = None  # this peer's certificate (PEM), with an IP/DNS SAN for its address
    tls_key: Path | None = None
    tls_ca: Path | None = None  # the swarm CA that signs every peer's certificate
    require_client_cert: bool = True  # mutual TLS: dialers must present a certificate from tls_ca

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def problems(self) -> list[str]:
        found: list[str] = []
        _check(
            found,
            self.secret_env is None or self.secret_file is None,
            "security: set secret_env or secret_file, not both",
        )
        _check(
            found, self.max_clock_skew > 0, f"security.max_clock_skew must be > 0 seconds, got {self.max_clock_skew}"
        )
        tls = [self.tls_cert, self.tls_key, self.tls_ca]
        _check(
            found,
            all(v is None for v in tls) or all(v is not None for v in tls),
            "security: tls_cert, tls_key and tls_ca go together (set all three or none)",
        )
        for name in ("secret_file", "tls_cert", "tls_key", "tls_ca"):
            value = getattr(self, name)
            if value is not None and not value.is_file():
                found.append(f"security.{name}: file {str(value)!r} does not exist")
        return found


@dataclass(frozen=True, kw_only=True, slots=True)
class ObserveConfig(_Validated):
    """Watching a swarm: ``/metrics`` and the dashboard. Paths are relative to the config file.

    Both are served on the peer's own port, under the same rule as every route there (with a
    secret, an HMAC token). A scraper or a browser cannot mint those, so ``listen`` opens a second
    server with only ``/metrics`` and the dashboard, guarded by a metrics token (sent as a Bearer
    token or as the password of HTTP Basic auth). With a secret, that server must either have a
    token or listen on loopback only.
    """

    _section: typing.ClassVar[str] = "observe"
    listen: str | None = None  # HOST:PORT of the metrics and dashboard server (default: none)
    token_env: str | None = None  # environment variable holding the metrics token
    token_file: Path | None = None  # or a file holding it (>= 16 bytes)
    history: int = 300  # points per member kept for the dashboard's curves

    def problems(self) -> list[str]:
        found: list[str] = []
        if self.listen is not None:
            try:
                parse_address(self.listen)
            except ValueError as exc:
                found.append(f"observe.listen: {exc}")
        _check(
            found, self.token_env is None or self.token_file is None, "observe: set token_env or token_file, not both"
        )
        if self.token_file is not None and not self.token_file.is_file():
            found.append(f"observe.token_file: file {str(self.token_file)!r} does not exist")
        _check(found, 10 <= self.history <= 10_000, f"observe.history must be in 10..10000 points, got {self.history}")
        return found

    @property
    def has_token(self) -> bool:
        return self.token_env is not None or self.token_file is not None


def observe_problems(observe: ObserveConfig, security: SecurityConfig) -> list[str]:
    """With a swarm secret, the metrics server needs a token unless it listens on loopback only."""
    if observe.listen is None or (security.secret_env is None and security.secret_file is None):
        return []
    try:
        host, _ = parse_address(observe.listen)
    except ValueError:
        return []  # reported by the section itself
    if observe.has_token or host in ("127.0.0.1", "::1", "localhost"):
        return []
    return [
        f"observe.listen = {observe.listen!r} would serve the swarm's telemetry without a credential: "
        "set observe.token_env or observe.token_file, or listen on 127.0.0.1"
    ]


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig(_Validated):
    """Periodic checkpoints under the peer's ``--out`` directory, written atomically."""

    _section: typing.ClassVar[str] = "checkpoint"
    every: int = 200  # steps between checkpoints; 0 keeps only the final one

    def problems(self) -> list[str]:
        return [] if self.every >= 0 else [f"checkpoint.every must be >= 0, got {self.every}"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerEntry(_Validated):
    """One configured peer: its unique name and the ``host:port`` it listens on."""

    _section: typing.ClassVar[str] = "peers"
    name: str
    address: str

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]

    def problems(self) -> list[str]:
        found: list[str] = []
        valid_name = 1 <= len(self.name) <= 64 and all(c.isalnum() or c in "-_." for c in self.name)
        _check(
            found,
            valid_name,
            f"peers: name {self.name!r} must be 1-64 characters of letters, digits, '-', '_', '.'",
        )
        try:
            parse_address(self.address)
        except ValueError as exc:
            found.append(f"peers.{self.name}.address: {exc}")
        return found
