"""The vocabulary of a config: the choices (``Literal`` kinds), addresses, and the validating base
class every section derives from (it collects every problem instead of stopping at the first)."""

from __future__ import annotations

import contextvars
import typing
from typing import Literal

from p2pdl.errors import ConfigError

OptimizerKind = Literal["sgd", "adam", "adamw"]
ScheduleKind = Literal["constant", "cosine", "linear"]
Precision = Literal["fp32", "bf16", "fp16"]  # autocast dtype of forward and backward ("fp32": none)
ParamDtype = Literal["float32", "bfloat16", "float16"]  # the dtype parameters are stored in
DeviceChoice = Literal["auto", "cpu", "cuda"]
StrategyKind = Literal["gossip", "allreduce", "async-gossip", "ps", "push-sum", "streaming-diloco"]
OuterQuant = Literal["int8", "int4", "none"]  # streaming-diloco: how outer gradients travel
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
