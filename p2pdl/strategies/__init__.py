"""How peers share: one module per strategy, registered here.

``build_strategy`` maps ``[strategy] kind`` to its class. The strategy modules import only
:mod:`p2pdl.strategies.base` (and their own siblings), never this package, so there is no
import circle.
"""

from __future__ import annotations

from collections.abc import Callable

from p2pdl.strategies.allreduce import AllReduceStrategy
from p2pdl.strategies.async_gossip import AsyncGossipStrategy
from p2pdl.strategies.base import Strategy, StrategyContext, build_codec
from p2pdl.strategies.choco import ChocoGossipStrategy
from p2pdl.strategies.gossip import GossipStrategy
from p2pdl.strategies.ps import server_of
from p2pdl.strategies.ps_server import ParameterServer
from p2pdl.strategies.ps_worker import ParameterServerWorker
from p2pdl.strategies.pushsum import PushSumStrategy
from p2pdl.strategies.streaming import StreamingDiLoCoStrategy

__all__ = ["build_strategy"]


def _gossip(ctx: StrategyContext) -> Strategy:
    """D-PSGD, or CHOCO-gossip when ``[compression]`` is on."""
    codec = build_codec(ctx, error_feedback=False)  # CHOCO compensates through its public copies
    return GossipStrategy(ctx) if codec is None else ChocoGossipStrategy(ctx, codec)


def _parameter_server(ctx: StrategyContext) -> Strategy:
    """The server's role on the server peer, a worker's on every other."""
    return ParameterServer(ctx) if ctx.name == server_of(ctx) else ParameterServerWorker(ctx)


def build_strategy(ctx: StrategyContext) -> Strategy:
    """The strategy named by ``ctx.config.kind`` (the config has validated the kind)."""

    kinds: dict[str, Callable[[StrategyContext], Strategy]] = {
        "gossip": _gossip,
        "allreduce": AllReduceStrategy,
        "async-gossip": AsyncGossipStrategy,
        "ps": _parameter_server,
        "push-sum": PushSumStrategy,
        "streaming-diloco": StreamingDiLoCoStrategy,
    }
    return kinds[ctx.config.kind](ctx)
