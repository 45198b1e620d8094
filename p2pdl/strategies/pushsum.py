"""``push-sum``: Stochastic Gradient Push (Assran et al. 2019) over the one-peer exponential graph.

In round t, peer i (rank in the agreed live order) sends half of its push-sum mass to peer
i + 2^(t mod ceil(log2 n)) and keeps the other half; it receives from exactly one peer. The
mixing matrix is column-stochastic and changes every round (a directed, time-varying graph), and
each message carries its push-sum weight so receivers can de-bias: the model parameters always
hold x = z / w, which is what the gradient is evaluated at (see :mod:`p2pdl.core.pushsum`).

Trade-off: one message per round per peer (the cheapest possible gossip) and exact averaging in
log2 n rounds when n is a power of two, but a message that is lost takes its mass with it: the
weights no longer sum to n and the consensus point shifts slightly (reported in ``/status``).

Parameters stored in bfloat16 or float16 work: the push-sum weight is a Python float in the
frame's meta, never a tensor, the message ``w s x`` travels in the parameters' dtype (exact when
``w s`` is a power of two, as on the uniform one-peer schedule), and the rebias-mix-debias runs
on float32 copies that are rounded once into the parameters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pdl.core.mixing import accumulation_dtype
from p2pdl.core.pushsum import (
    PushSumMessage,
    one_peer_exponential_sources,
    one_peer_exponential_target,
    pushsum_mix_debiased,
    pushsum_outgoing,
    pushsum_schedule_period,
)
from p2pdl.errors import FrameSchemaError, TransportError
from p2pdl.strategies.base import MAX_ROUND_LEAD, RoundConfig, RoundOutcome, StrategyBase, StrategyContext
from p2pdl.wire import Frame, TensorSpec

PUSH = "pushsum"
SHARE = 0.5  # one out-neighbour per round: keep half, send half


@dataclass(frozen=True, kw_only=True, slots=True)
class PushSumConfig(RoundConfig):
    """The ``[strategy]`` keys SGP reads."""


class PushSumStrategy(StrategyBase):
    name = "push-sum"

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.config = PushSumConfig.from_table(ctx.config)
        self.weight = 1.0
        self.lost_sends = 0
        self.bad_weights = 0

    def _schedule(self, round_index: int) -> tuple[str | None, list[str]]:
        live = self._ctx.topology().names
        n = len(live)
        me = live.index(self._ctx.name)
        if n < 2:
            return None, []
        target = live[one_peer_exponential_target(me, n, round_index)]
        sources = [live[j] for j in one_peer_exponential_sources(me, n, round_index)]
        return target, sources

    def communication_peers(self) -> tuple[str, ...]:
        live = self._ctx.topology().names
        peers: set[str] = set()
        for offset in range(pushsum_schedule_period(max(len(live), 1))):
            target, sources = self._schedule(offset)
            peers.update([target] if target else [])
            peers.update(sources)
        peers.discard(self._ctx.name)
        return tuple(sorted(peers, key=live.index))

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        if kind != PUSH:
            raise FrameSchemaError(f"push-sum peers exchange only {PUSH!r} frames, got {kind!r}")
        return self._specs

    def _incoming_weight(self, frame: Frame) -> float | None:
        value = frame.meta.get("weight")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        weight = float(value)
        bound = 2.0 * max(len(self._ctx.topology().names), 1)
        return weight if math.isfinite(weight) and 0.0 < weight <= bound else None

    async def _parameter_round(self, step: int) -> RoundOutcome | None:
        ctx = self._ctx
        if (step + 1) % self.config.local_steps != 0:
            return None
        round_index = step // self.config.local_steps
        started = time.perf_counter()
        target, sources = self._schedule(round_index)
        ahead = ctx.exchange.highest_round(PUSH, sources)
        if ahead is not None and round_index < ahead <= round_index + MAX_ROUND_LEAD:
            round_index = ahead
            target, sources = self._schedule(round_index)
        self._round = round_index
        if target is None:
            return ctx.ledger.record(round_index, [], started)
        local = [p for _, p in ctx.parameters]
        weight_out, message = await ctx.run_compute(lambda: pushsum_outgoing(local, self.weight, SHARE))
        keep = 1.0 - SHARE
        frame = Frame(
            kind=PUSH,
            sender=ctx.name,
            round=round_index,
            step=step,
            meta={"weight": weight_out},
            tensors={name: tensor for (name, _), tensor in zip(ctx.parameters, message, strict=True)},
        )
        try:
            await ctx.exchange.send_encoded(target, await ctx.exchange.encode(frame))
        except TransportError:
            keep = 1.0  # the share never left: keep it, so no mass is lost on our side
            self.lost_sends += 1
        arrived = await ctx.exchange.collect(PUSH, round_index, sources, self.config.round_timeout)
        ctx.exchange.advance(PUSH, round_index + 1)
        incoming: list[PushSumMessage] = []
        for received in arrived.values():
            weight_in = self._incoming_weight(received)
            if weight_in is None:
                self.bad_weights += 1
                continue
            incoming.append((weight_in, [received.tensors[name] for name, _ in ctx.parameters]))
        self.weight = await ctx.run_compute(lambda: self._mix(local, keep, incoming))
        missing = [s for s in sources if s not in arrived]
        return ctx.ledger.record(round_index, missing, started)

    def _mix(self, local: Sequence[torch.Tensor], keep: float, incoming: Sequence[PushSumMessage]) -> float:
        """The de-biased push-sum mix in place; 16-bit parameters are mixed in float32 copies and
        rounded once, so a round costs one rounding, as a gossip round does."""
        wide = [p.detach().to(accumulation_dtype(p.dtype)) for p in local]  # the parameter itself when not 16-bit
        weight = pushsum_mix_debiased(wide, self.weight, keep, incoming)
        with torch.no_grad():
            for parameter, mixed in zip(local, wide, strict=True):
                if mixed.dtype != parameter.dtype:
                    parameter.copy_(mixed)
        return weight

    def status(self) -> dict[str, Any]:
        target, sources = self._schedule(self._round)
        return {
            **super().status(),
            "push_sum_weight": self.weight,
            "target": target,
            "sources": sources,
            "lost_sends": self.lost_sends,
            "bad_weights": self.bad_weights,
        }
