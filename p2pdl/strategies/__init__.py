"""How peers share: one module per strategy, registered here.

``build_strategy`` maps ``[strategy] kind`` to its class. The strategy modules import only
:mod:`p2pdl.strategies.base`, never this package, so there is no import circle.
"""

from __future__ import annotations

from collections.abc import Callable

from p2pdl.strategies.async_gossip import AsyncGossipStrategy
from p2pdl.strategies.base import AllReduceStrategy, GossipStrategy, Strategy, StrategyContext, build_codec
from p2pdl.strategies.choco import ChocoGossipStrategy
from p2pdl.strategies.ps import ParameterServerStrategy
from p2pdl.strategies.pushsum import PushSumStrategy

__all__ = ["build_strategy"]


def build_strategy(ctx: StrategyContext) -> Strategy:
    """The strategy named by ``ctx.config.kind`` (the config has validated the kind)."""

    kinds: dict[str, Callable[[StrategyContext], Strategy]] = {
        "gossip": GossipStrategy,
        "allreduce": AllReduceStrategy,
        "async-gossip": AsyncGossipStrategy,
        "ps": ParameterServerStrategy,
        "push-sum": PushSumStrategy,
    }
    if ctx.config.kind == "gossip":
        codec = build_codec(ctx, error_feedback=False)  # CHOCO compensates through its public copies
        if codec is not None:
            return ChocoGossipStrategy(ctx, codec)
    return kinds[ctx.config.kind](ctx)
