"""Loading a config: TOML read once at the edge, every section built and checked, the cross-section
rules applied, and every problem reported together in one :class:`~p2pdl.errors.ConfigError`."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from p2pdl.config.base import DeviceChoice, _check, _collector, _Validated, parse_address
from p2pdl.config.sections import (
    OVERLAP_MAX_BUCKETS,
    CheckpointConfig,
    CompressionConfig,
    MembershipConfig,
    ObserveConfig,
    OptimizerConfig,
    PeerEntry,
    RunConfig,
    ScheduleConfig,
    SecurityConfig,
    StrategyConfig,
    TopologyConfig,
    TransportConfig,
    observe_problems,
)
from p2pdl.config.training import LEGACY_OPTIMIZER_KEYS
from p2pdl.core.groups import MAX_GROUP_CHARS
from p2pdl.core.topology import topology_problems
from p2pdl.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class Config(_Validated):
    """A whole run: what every peer of the swarm agrees on."""

    run: RunConfig
    optimizer: OptimizerConfig | None = None  # None: the legacy run.optimizer/lr/momentum/weight_decay keys
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
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
    def optimizer_settings(self) -> OptimizerConfig:
        """The optimizer to build: ``[optimizer]``, or what the legacy ``run.*`` keys describe."""
        return self.optimizer if self.optimizer is not None else OptimizerConfig.from_run(self.run)

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
        joined = ",".join(self.peer_names)
        if self.strategy.kind == "allreduce" and len(joined) > MAX_GROUP_CHARS:
            found.append(
                f"peers: allreduce names its group in every frame, and the {len(self.peers)} peer names joined by "
                f"commas are {len(joined)} characters, more than {MAX_GROUP_CHARS}; use shorter names"
            )
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
            if kind == "gossip" and self.strategy.delay:
                found.append("compression with gossip (CHOCO) cannot be combined with strategy.delay = 1")
            found.extend(self._momentum_correction_problems())
        if self.membership.gossip_timeout > self.transport.startup_timeout:
            found.append("membership.gossip_timeout must be <= transport.startup_timeout")
        found.extend(observe_problems(self.observe, self.security))
        found.extend(self._training_problems())
        return found

    def _overlap_problems(self) -> list[str]:
        """What strategy.overlap (buckets reduced during backward) cannot be combined with."""
        found: list[str] = []
        if self.compression.kind != "none":
            found.append(
                "strategy.overlap cannot be combined with [compression]: compressed gradients are averaged "
                "after backward"
            )
        if self.run.accumulate != 1:
            found.append(
                "strategy.overlap needs run.accumulate = 1 (a bucket is sent after one backward), "
                f"got {self.run.accumulate}"
            )
        if self.run.precision == "fp16":
            found.append(
                "strategy.overlap cannot be combined with run.precision = 'fp16': a loss-scale overflow is "
                "only known after backward"
            )
        found.extend(self._inbox_problems("strategy.overlap", OVERLAP_MAX_BUCKETS, "bucket"))
        return found

    def _inbox_problems(self, what: str, parts: int, part: str) -> list[str]:
        """Sub-rounds in ``parts`` (buckets, pieces) need room for two frames of each per peer."""
        needed = 2 * parts + 2
        if self.transport.inbox_frames >= needed:
            return []
        return [
            f"{what} needs transport.inbox_frames >= {needed} (two frames per {part} may wait per peer), "
            f"got {self.transport.inbox_frames}"
        ]

    def _pipeline_problems(self) -> list[str]:
        """What strategy.pipeline (the exact average in pieces) cannot be combined with."""
        found: list[str] = []
        pieces = self.strategy.pipeline
        if self.compression.kind != "none":
            found.append(
                "strategy.pipeline > 1 cannot be combined with [compression]: compressed gradients take "
                "the compressed reduce-scatter, which is not cut in pieces"
            )
        found.extend(self._inbox_problems(f"strategy.pipeline = {pieces}", pieces, "piece"))
        return found

    def _momentum_correction_problems(self) -> list[str]:
        """DGC owns the momentum: the optimizer must not apply it a second time."""
        compression, optimizer = self.compression, self.optimizer_settings
        if compression.momentum_correction == 0 and compression.warmup_steps == 0:
            return []
        found: list[str] = []
        if self.strategy.kind != "allreduce":
            found.append(
                "compression.momentum_correction and compression.warmup_steps apply to strategy.kind = 'allreduce', "
                f"not {self.strategy.kind!r}"
            )
        if compression.momentum_correction > 0 and (
            optimizer.kind != "sgd" or optimizer.momentum or optimizer.nesterov
        ):
            found.append(
                f"compression.momentum_correction = {compression.momentum_correction} applies the momentum before "
                "compressing, so the optimizer must be kind = 'sgd' with momentum = 0 and nesterov = false (got "
                f"kind = {optimizer.kind!r}, momentum = {optimizer.momentum}, nesterov = {optimizer.nesterov}); "
                "with the legacy keys set run.momentum = 0"
            )
        return found

    def _training_problems(self) -> list[str]:
        """Where [run], [schedule] and [strategy] must agree."""
        found: list[str] = []
        run, schedule, kind = self.run, self.schedule, self.strategy.kind
        span = schedule.span(run.steps)
        if schedule.warmup_steps > span:
            found.append(
                f"schedule.warmup_steps ({schedule.warmup_steps}) must be <= the steps the schedule spans "
                f"({span}: schedule.total_steps, or run.steps when it is 0)"
            )
        if schedule.total_steps and schedule.total_steps < run.steps and schedule.kind == "cosine":
            found.append(
                f"schedule.total_steps ({schedule.total_steps}) must be >= run.steps ({run.steps}) with kind = "
                "'cosine': past its end a cosine climbs back up"
            )
        gradients_pushed = kind == "ps" and self.strategy.local_steps == 1
        if gradients_pushed and (run.grad_clip > 0 or run.precision == "fp16"):
            found.append(
                "run.grad_clip and run.precision = 'fp16' do not apply to kind = 'ps' with local_steps = 1: "
                "the server applies the workers' raw gradients with its own optimizer step"
            )
        if run.precision == "fp16" and self.compression.kind != "none":
            found.append(
                "run.precision = 'fp16' cannot be combined with [compression]: error feedback would carry "
                "gradients scaled by a loss scale that changes between steps"
            )
        if self.strategy.overlap:
            found.extend(self._overlap_problems())
        if self.strategy.pipeline > 1:
            found.extend(self._pipeline_problems())
        return found


# --------------------------------------------------------------------------- loading


_SECTIONS: dict[str, type[_Validated]] = {
    "run": RunConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
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
    elif origin is tuple and get_args(annotation) == (float, float):
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            return (float(value[0]), float(value[1]))
        problems.append(f"{key}: expected a list of two numbers, got {value!r}")
        return None
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
            if key == "optimizer" and key not in data:
                continue  # the legacy run.* optimizer keys apply (Config.optimizer_settings)
            sections[key] = _build_section(cls, table, key, problems, base_dir)
        if "optimizer" in data and isinstance(data.get("run"), dict):
            problems.extend(
                f"run.{name}: set it in [optimizer] instead (with an [optimizer] section the run.optimizer, "
                "run.lr, run.momentum and run.weight_decay keys are not used)"
                for name in LEGACY_OPTIMIZER_KEYS
                if name in data["run"]
            )
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
