"""Run configuration: one frozen, keyword-only dataclass per component, validated at the edge.

A config is a TOML file read once by :func:`load_config`. Every section maps onto a dataclass
below; unknown keys, wrong types and bad values are *all* collected and reported together in one
:class:`~p2pdl.errors.ConfigError`, each message naming the key it is at (``transport.send_timeout``).
Every duration is in seconds and every size says its unit in its name (``max_frame_mib``).

The trade-off: configs are plain data (no exec'd Python, no ``opts: dict`` pass-throughs), so a
workload that needs custom knobs reads them from its own file, not from here.
"""

from __future__ import annotations

import contextvars
import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from p2pdl.core.topology import TopologyKind, topology_problems
from p2pdl.errors import ConfigError

OptimizerKind = Literal["sgd", "adam"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
StrategyKind = Literal["gossip", "allreduce", "async-gossip", "ps", "push-sum"]
OuterKind = Literal["none", "diloco"]
PsMode = Literal["sync", "async"]
RobustKind = Literal["none", "clip", "trimmed-mean"]
CompressorKind = Literal["none", "fp16", "bf16", "int8", "topk", "powersgd"]
Compression = Literal["auto", "always", "never"]

MIB = 1024 * 1024


def parse_address(text: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) and check the port; raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r} has a non-numeric port") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port must be in 0..65535")
    return host, port


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


# While a whole file is loaded, sections add their problems here instead of raising one by one,
# so the user sees every problem of every section in a single message.
_collector: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("p2pdl_config", default=None)


class _Validated:
    """Mixin: ``__post_init__`` raises one ConfigError listing every problem of the section."""

    _section: typing.ClassVar[str] = ""

    def problems(self) -> list[str]:
        raise NotImplementedError

    def __post_init__(self) -> None:
        found = self.problems()
        if not found:
            return
        collector = _collector.get()
        if collector is None:
            raise ConfigError(found)
        collector.extend(found)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig(_Validated):
    """What to train and for how long. ``workload`` is a path relative to the config file."""

    _section: typing.ClassVar[str] = "run"
    workload: Path
    steps: int = 600
    seed: int = 0
    batch_size: int = 32
    optimizer: OptimizerKind = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 50  # steps; 0 disables periodic evaluation (a final one always runs)
    device: DeviceChoice = "auto"
    torch_threads: int = 0  # intra-op threads per peer; 0 leaves torch's default
    data_shards: int = 0  # shards the training set is cut into; 0 means one per configured peer

    def problems(self) -> list[str]:
        found: list[str] = []
        _check(found, self.steps >= 1, f"run.steps must be >= 1, got {self.steps}")
        _check(found, self.seed >= 0, f"run.seed must be >= 0, got {self.seed}")
        _check(found, self.batch_size >= 1, f"run.batch_size must be >= 1, got {self.batch_size}")
        _check(found, self.lr > 0, f"run.lr must be > 0, got {self.lr}")
        _check(found, 0 <= self.momentum < 1, f"run.momentum must be in [0, 1), got {self.momentum}")
        _check(found, self.weight_decay >= 0, f"run.weight_decay must be >= 0, got {self.weight_decay}")
        _check(found, self.eval_every >= 0, f"run.eval_every must be >= 0, got {self.eval_every}")
        _check(
            found,
            self.torch_threads >= 0,
            f"run.torch_threads must be >= 0, got {self.torch_threads}",
        )
        return found


@dataclass(frozen=True, kw_only=True, slots=True)
class StrategyConfig(_Validated):
    """How peers share what they learn. See docs/CONFIG.md for when to choose each kind.

    * ``gossip``: synchronous D-PSGD over the topology (parameters, every H steps).
    * ``allreduce``: exact averaging of gradients every step (H = 1), or of parameters every H steps.
    * ``async-gossip``: AD-PSGD; mixes with the latest parameters from each neighbour, never waits.
    * ``ps``: a parameter server (``server``) holds the model; workers push gradients, pull parameters.
    * ``push-sum``: SGP over the one-peer exponential graph (directed, time-varying).
    """

    _section: typing.ClassVar[str] = "strategy"
    kind: StrategyKind = "gossip"
    local_steps: int = 1  # H: local optimizer steps between communication rounds
    round_timeout: float = 10.0  # seconds a round waits for contributions
    max_staleness: int = 20  # async-gossip: drop neighbour parameters older than this many steps
    # async-gossip: never run more than this many steps (plus local_steps) ahead of the fastest
    # connected neighbour; beyond it, wait up to round_timeout for a newer copy from any (0: off)
    max_lead: int = 4
    outer: OuterKind = "none"  # "diloco": Nesterov outer step on the averaged change after each sync
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    server: str | None = None  # ps: the name of the server peer (default: the first configured peer)
    ps_mode: PsMode = "sync"
    ps_quorum: int = 0  # ps sync: gradients the server waits for per round; 0 = every live worker
    # Robust mixing against a faulty or malicious neighbour (gossip): "clip" is self-centred clipping
    # (He, Karimireddy & Jaggi 2022), "trimmed-mean" a coordinate-wise trimmed mean over self + neighbours.
    robust: RobustKind = "none"
    clip_radius: float = 0.0  # clip: fixed radius (L2, whole model); 0 = 2 x the median accepted neighbour distance
    reject_factor: float = 10.0  # clip: a neighbour farther than this x the median accepted distance is ignored
    trim: int = 1  # trimmed-mean: values dropped at each end, per coordinate

    def problems(self) -> list[str]:
        found: list[str] = []
        _check(found, self.local_steps >= 1, f"strategy.local_steps must be >= 1, got {self.local_steps}")
        _check(found, self.round_timeout > 0, f"strategy.round_timeout must be > 0 seconds, got {self.round_timeout}")
        _check(found, self.max_staleness >= 0, f"strategy.max_staleness must be >= 0, got {self.max_staleness}")
        _check(
            found,
            self.max_lead >= 0,
            f"strategy.max_lead must be >= 0, got {self.max_lead}",
        )
        _check(found, self.outer_lr > 0, f"strategy.outer_lr must be > 0, got {self.outer_lr}")
        _check(
            found, 0 <= self.outer_momentum < 1, f"strategy.outer_momentum must be in [0, 1), got {self.outer_momentum}"
        )
        _check(found, self.ps_quorum >= 0, f"strategy.ps_quorum must be >= 0, got {self.ps_quorum}")
        _check(found, self.clip_radius >= 0, f"strategy.clip_radius must be >= 0, got {self.clip_radius}")
        _check(found, self.trim >= 1, f"strategy.trim must be >= 1, got {self.trim}")
        _check(found, self.reject_factor > 1, f"strategy.reject_factor must be > 1, got {self.reject_factor}")
        _check(
            found,
            self.robust == "none" or self.kind == "gossip",
            "strategy.robust applies to kind = 'gossip' (parameter mixing with neighbours)",
        )
        _check(
            found,
            self.kind == "ps" or (self.server is None and self.ps_quorum == 0),
            "strategy.server and strategy.ps_quorum apply only to kind = 'ps'",
        )
        _check(
            found,
            self.kind != "ps" or self.local_steps == 1 or self.ps_mode == "sync",
            "strategy.local_steps > 1 with kind = 'ps' needs ps_mode = 'sync' (the server averages "
            "parameters every H steps; asynchronous workers push every gradient)",
        )
        _check(
            found,
            self.outer == "none" or self.kind in ("gossip", "allreduce", "push-sum", "async-gossip"),
            "strategy.outer = 'diloco' needs a parameter-averaging kind (gossip, allreduce, push-sum, async-gossip)",
        )
        _check(
            found,
            self.outer == "none" or self.kind != "allreduce" or self.local_steps > 1,
            "strategy.outer = 'diloco' with kind = 'allreduce' needs local_steps > 1 (parameters are averaged "
            "every H steps; with H = 1 gradients are averaged and there is no outer step)",
        )
        return found


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
    suspect_after: float = 5.0  # no fresh heartbeat for this long: suspect (still a neighbour)
    dead_after: float = 20.0  # no fresh heartbeat for this long: dead, rewired around (> strategy.round_timeout)

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
class CompressionConfig(_Validated):
    """What goes on the wire instead of fp32 tensors. See docs/CONFIG.md for when to use which.

    ``allreduce`` (H = 1) and ``ps`` compress gradients with error feedback; ``gossip`` runs
    CHOCO-gossip (compressed differences to public copies, consensus step ``choco_gamma``).
    """

    _section: typing.ClassVar[str] = "compression"
    kind: CompressorKind = "none"
    ratio: float = 0.01  # topk: fraction of entries kept
    rank: int = 4  # powersgd: rank of the factors
    chunk: int = 1024  # int8: elements per scale
    min_numel: int = 4096  # tensors smaller than this go uncompressed (fp32)
    error_feedback: bool = True  # gradient strategies: carry what compression dropped to the next step
    choco_gamma: float = 0.03  # gossip: CHOCO consensus step size (top-1%: 0.02-0.04; int8: 0.5-1.0)

    def problems(self) -> list[str]:
        found: list[str] = []
        _check(found, 0 < self.ratio <= 1, f"compression.ratio must be in (0, 1], got {self.ratio}")
        _check(found, self.rank >= 1, f"compression.rank must be >= 1, got {self.rank}")
        _check(found, self.chunk >= 1, f"compression.chunk must be >= 1, got {self.chunk}")
        _check(found, self.min_numel >= 0, f"compression.min_numel must be >= 0, got {self.min_numel}")
        _check(found, 0 < self.choco_gamma <= 1, f"compression.choco_gamma must be in (0, 1], got {self.choco_gamma}")
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


@dataclass(frozen=True, kw_only=True, slots=True)
class Config(_Validated):
    """A whole run: what every peer of the swarm agrees on."""

    run: RunConfig
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    peers: tuple[PeerEntry, ...] = ()

    @property
    def peer_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.peers)

    def peer(self, name: str) -> PeerEntry | None:
        """The configured entry for ``name``, or None for a peer that joins by bootstrap."""
        for entry in self.peers:
            if entry.name == name:
                return entry
        return None

    @property
    def shard_count(self) -> int:
        return self.run.data_shards or len(self.peers)

    def problems(self) -> list[str]:
        found: list[str] = []
        _check(
            found,
            len(self.peers) >= 1 or bool(self.membership.bootstrap),
            "peers: at least one [[peers]] entry or a membership.bootstrap address is required",
        )
        _check(found, self.shard_count >= 1, "run.data_shards must be >= 1 when there are no [[peers]]")
        seen_names: set[str] = set()
        seen_addresses: dict[tuple[str, int], str] = {}
        for entry in self.peers:
            if entry.name in seen_names:
                found.append(f"peers: duplicate name {entry.name!r}")
            seen_names.add(entry.name)
            try:
                host, port = parse_address(entry.address)
            except ValueError:
                continue  # already reported by the entry itself
            if port != 0 and (host, port) in seen_addresses:
                found.append(
                    f"peers.{entry.name}.address: {entry.address} is already used by {seen_addresses[(host, port)]!r}"
                )
            seen_addresses[(host, port)] = entry.name
        if self.peers and len(seen_names) == len(self.peers):
            topo = self.topology
            found.extend(
                topology_problems(
                    topo.kind,
                    self.peer_names,
                    rows=topo.rows,
                    cols=topo.cols,
                    center=topo.center,
                    edges=topo.edges,
                )
            )
        if not self.run.workload.is_file():
            found.append(f"run.workload: file {str(self.run.workload)!r} does not exist")
        if self.membership.dead_after <= self.strategy.round_timeout:
            found.append(
                f"membership.dead_after ({self.membership.dead_after} s) must be > strategy.round_timeout "
                f"({self.strategy.round_timeout} s): a round still waiting for a slow partner must time out "
                "before membership declares that partner dead, or the two sides of the round disagree"
            )
        if self.transport.send_timeout > self.strategy.round_timeout * 100:
            found.append("transport.send_timeout is over 100x strategy.round_timeout; lower it")
        if self.strategy.kind == "ps" and self.strategy.server is not None and self.peer(self.strategy.server) is None:
            found.append(f"strategy.server: {self.strategy.server!r} is not in [[peers]]")
        if self.strategy.kind == "ps" and not self.peers:
            found.append("strategy.kind = 'ps' needs the server among [[peers]]")
        if self.compression.kind != "none":
            kind, local = self.strategy.kind, self.strategy.local_steps
            if kind not in ("gossip", "allreduce", "ps") or (kind in ("allreduce", "ps") and local != 1):
                found.append(
                    "compression applies to gossip (CHOCO), allreduce with local_steps = 1 and ps with "
                    f"local_steps = 1; not to kind = {kind!r} with local_steps = {local}"
                )
            if kind == "gossip" and self.strategy.robust != "none":
                found.append("compression with gossip (CHOCO) cannot be combined with strategy.robust")
        if self.membership.gossip_timeout > self.transport.startup_timeout:
            found.append("membership.gossip_timeout must be <= transport.startup_timeout")
        found.extend(observe_problems(self.observe, self.security))
        return found


# --------------------------------------------------------------------------- loading


_SECTIONS: dict[str, type[_Validated]] = {
    "run": RunConfig,
    "strategy": StrategyConfig,
    "topology": TopologyConfig,
    "transport": TransportConfig,
    "membership": MembershipConfig,
    "checkpoint": CheckpointConfig,
    "security": SecurityConfig,
    "compression": CompressionConfig,
    "observe": ObserveConfig,
}


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str, problems: list[str]) -> Any:
    """Check a TOML value against a field annotation; append a problem and return None if bad."""
    origin = get_origin(annotation)
    if origin is Literal:
        allowed = get_args(annotation)
        if value in allowed and isinstance(value, str):
            return value
        problems.append(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return None
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], key, problems)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Path:
        if isinstance(value, str) and value:
            return Path(value)
    elif origin is tuple and get_args(annotation) == (str, ...):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        problems.append(f"{key}: expected a list of strings, got {value!r}")
        return None
    elif origin is tuple:
        # tuple[tuple[str, str], ...]: explicit edges
        if isinstance(value, list) and all(
            isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) for s in e) for e in value
        ):
            return tuple((e[0], e[1]) for e in value)
        problems.append(f"{key}: expected a list of [name, name] pairs, got {value!r}")
        return None
    problems.append(f"{key}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    return None


def _build_section(cls: type[_Validated], table: Any, key: str, problems: list[str], base_dir: Path | None) -> Any:
    if not isinstance(table, dict):
        problems.append(f"{key}: expected a table, got {type(table).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for name, value in table.items():
        if name not in fields:
            problems.append(f"{key}.{name}: unknown key (allowed: {', '.join(sorted(fields))})")
            continue
        coerced = _coerce(value, hints[name], f"{key}.{name}", problems)
        if coerced is None:
            continue
        if isinstance(coerced, Path) and base_dir is not None and not coerced.is_absolute():
            coerced = (base_dir / coerced).resolve()
        kwargs[name] = coerced
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs
    ]
    if missing:
        if len(problems) == before:  # a bad value already explains why the key is absent
            problems.extend(f"{key}.{name}: required key is missing" for name in missing)
        return None
    return cls(**kwargs)


def config_from_mapping(data: Mapping[str, Any], *, base_dir: Path | None = None) -> Config:
    """Build and validate a :class:`Config` from parsed TOML; raises ConfigError with all problems."""
    problems: list[str] = []
    token = _collector.set(problems)
    try:
        for key in data:
            if key not in _SECTIONS and key != "peers":
                problems.append(f"{key}: unknown section (allowed: {', '.join([*_SECTIONS, 'peers'])})")
        sections: dict[str, Any] = {}
        for key, cls in _SECTIONS.items():
            table = data.get(key, {})
            if key == "run" and key not in data:
                problems.append("run: section is missing (it must name at least run.workload)")
                continue
            sections[key] = _build_section(cls, table, key, problems, base_dir)
        peers: list[PeerEntry] = []
        raw_peers = data.get("peers", [])
        if not isinstance(raw_peers, list):
            problems.append("peers: expected an array of tables ([[peers]])")
            raw_peers = []
        for position, table in enumerate(raw_peers):
            entry = _build_section(PeerEntry, table, f"peers[{position}]", problems, None)
            if entry is not None:
                peers.append(entry)
        config: Config | None = None
        if all(v is not None for v in sections.values()) and "run" in sections:
            config = Config(**sections, peers=tuple(peers))
    finally:
        _collector.reset(token)
    if problems or config is None:
        raise ConfigError(problems or ["config is invalid"])
    return config


def load_config(path: str | Path) -> Config:
    """Read a TOML config file once. Relative paths inside it are relative to the file."""
    config_path = Path(path)
    try:
        raw = config_path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read config file {str(config_path)!r}: {exc.strerror}"]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{config_path}: not valid TOML: {exc}"]) from exc
    return config_from_mapping(data, base_dir=config_path.resolve().parent)


def with_overrides(
    config: Config, *, steps: int | None = None, device: str | None = None, observe_listen: str | None = None
) -> Config:
    """Apply CLI overrides, re-validating the changed section."""
    run = config.run
    if steps is not None or device is not None:
        problems: list[str] = []
        changes: dict[str, Any] = {}
        if steps is not None:
            changes["steps"] = steps
        if device is not None:
            coerced = _coerce(device, DeviceChoice, "--device", problems)
            if problems:
                raise ConfigError(problems)
            changes["device"] = coerced
        run = dataclasses.replace(run, **changes)
    observe = config.observe
    if observe_listen is not None:
        observe = dataclasses.replace(observe, listen=observe_listen)
    return dataclasses.replace(config, run=run, observe=observe)
