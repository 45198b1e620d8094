"""Run configuration: one frozen, keyword-only dataclass per component, validated at the edge.

A config is a TOML file read once by :func:`load_config`. Every section maps onto a dataclass
(:mod:`p2pdl.config.sections`); unknown keys, wrong types and bad values are *all* collected and
reported together in one :class:`~p2pdl.errors.ConfigError`, each message naming the key it is at
(``transport.send_timeout``). Every duration is in seconds and every size says its unit in its
name (``max_frame_mib``).

The trade-off: configs are plain data (no exec'd Python, no ``opts: dict`` pass-throughs), so a
workload that needs custom knobs reads them from its own file, not from here.
"""

from p2pdl.config.base import (
    MIB,
    Compression,
    CompressorKind,
    DeviceChoice,
    OptimizerKind,
    OuterKind,
    OuterQuant,
    ParamDtype,
    Precision,
    PsMode,
    RobustKind,
    ScheduleKind,
    StrategyKind,
    parse_address,
)
from p2pdl.config.load import Config, config_from_mapping, load_config, with_overrides
from p2pdl.config.sections import (
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

__all__ = [
    "MIB",
    "CheckpointConfig",
    "Compression",
    "CompressionConfig",
    "CompressorKind",
    "Config",
    "DeviceChoice",
    "MembershipConfig",
    "ObserveConfig",
    "OptimizerConfig",
    "OptimizerKind",
    "OuterKind",
    "OuterQuant",
    "ParamDtype",
    "PeerEntry",
    "Precision",
    "PsMode",
    "RobustKind",
    "RunConfig",
    "ScheduleConfig",
    "ScheduleKind",
    "SecurityConfig",
    "StrategyConfig",
    "StrategyKind",
    "TopologyConfig",
    "TransportConfig",
    "config_from_mapping",
    "load_config",
    "observe_problems",
    "parse_address",
    "with_overrides",
]
