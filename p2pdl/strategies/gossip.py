"""``gossip``: D-PSGD (Lian et al. 2017), synchronous parameter gossip with the graph neighbours.

Every H local steps a peer runs one round with its neighbours: x_i <- sum_j W_ij x_j with
Metropolis-Hastings weights. A neighbour whose frame misses the round deadline (learnt from
recent round times, at most ``round_timeout``: :meth:`StrategyBase.round_deadline`) is left out
and its weight moves to the peer itself; the round is recorded as *partial*, with who was missing.

Catch-up keeps what every peer learned. A frame is matched to a round by its *wire round*,
which is the peer's own round (step // H) plus an offset. A peer that finds a neighbour's frame
for a later wire round (it joined, restarted, or was frozen while the others went on) raises
its offset to meet it: from the next round on it mixes with its neighbours at their wire round,
with its own parameters and its own step count. It does not skip steps: every peer trains all of
its ``run.steps``, and mixing averages the progress of the peer that ran ahead with the progress
of those that were held up. (The previous rule, jumping the step count to the neighbours' round,
made a thawed majority skip the rounds one lone peer had trained alone, and the swarm's average
was dominated by three undertrained models.) Trade-off: peers no longer finish together; the
one that ran ahead finishes first and leaves, and the others finish their steps without it.
Optional robust rules (``strategy.robust``) bound what a faulty neighbour can do to a round, at
the cost of mixing that is no longer exactly doubly stochastic. With ``[compression]`` on, the
registry builds :class:`~p2pdl.strategies.choco.ChocoGossipStrategy` instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pdl.config import RobustKind
from p2pdl.core.mixing import mix_into
from p2pdl.core.robust import OutlierClipper, trimmed_mean
from p2pdl.core.topology import mh_weight
from p2pdl.strategies.base import (
    MAX_ROUND_LEAD,
    RoundConfig,
    RoundOutcome,
    StrategyBase,
    StrategyContext,
    neighbour_frame_specs,
    reported_degree,
)
from p2pdl.wire import Frame, TensorSpec

PARAMS = "params"


@dataclass(frozen=True, kw_only=True, slots=True)
class GossipConfig(RoundConfig):
    """The ``[strategy]`` keys D-PSGD reads: its round, and the robust mixing rule."""

    robust: RobustKind  # "clip": self-centred clipping; "trimmed-mean": coordinate-wise trimmed mean
    clip_radius: float  # clip: fixed L2 radius over the whole model; 0 = adaptive
    reject_factor: float  # clip: ignore a neighbour farther than this x the median accepted distance
    trim: int  # trimmed-mean: values dropped at each end, per coordinate


class GossipStrategy(StrategyBase):
    """D-PSGD: synchronous parameter gossip with the graph neighbours every H local steps.

    Under churn the neighbours are re-read from the live graph every round, and the
    Metropolis-Hastings weight of each neighbour uses the degree it reports in its frame, so the
    weights stay symmetric and doubly stochastic after every membership change.
    """

    name = "gossip"

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.config = GossipConfig.from_table(ctx.config)
        self._row: dict[str, float] = {}
        self.robust_stats: dict[str, float] = {"clipped": 0, "rejected": 0, "trimmed_rounds": 0, "last_radius": 0.0}
        self._offset = 0  # wire round - own round: raised to meet a neighbour that is ahead
        self._clipper = OutlierClipper(radius=self.config.clip_radius, reject_factor=self.config.reject_factor)

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        return neighbour_frame_specs(self._ctx, kind, sender, PARAMS, self._specs)

    def _row_for(self, neighbors: Sequence[str], arrived: Mapping[str, Frame]) -> dict[str, float]:
        """This round's weights: MH from reported degrees; missing neighbours' weight stays home."""
        own_degree = len(neighbors)
        graph = self._ctx.topology()
        row = {s: mh_weight(own_degree, reported_degree(f, graph, s, own_degree)) for s, f in arrived.items()}
        row[self._ctx.name] = 1.0 - sum(row.values())
        return row

    async def _parameter_round(self, step: int) -> RoundOutcome | None:
        if (step + 1) % self.config.local_steps != 0:
            return None
        ctx = self._ctx
        neighbors = self._neighbors()
        own_round = step // self.config.local_steps
        round_index = own_round + self._offset  # the wire round
        ahead = ctx.exchange.highest_round(PARAMS, neighbors)
        if ahead is not None and round_index < ahead <= round_index + MAX_ROUND_LEAD:
            # Behind a neighbour (joined, restarted, thawed): meet it at its wire round, keep our steps.
            self._offset += ahead - round_index
            round_index = ahead
        self._round = round_index
        started = time.perf_counter()
        # Training is paused while the round runs, so the parameters can be encoded in place.
        frame = Frame(
            kind=PARAMS,
            sender=ctx.name,
            round=round_index,
            step=step,
            meta={"degree": len(neighbors)},
            tensors={name: p.detach() for name, p in ctx.parameters},
        )
        await ctx.exchange.broadcast(frame, neighbors)
        arrived = await ctx.exchange.collect(PARAMS, round_index, neighbors, self.round_deadline())
        self.observe_round(time.perf_counter() - started)
        ctx.exchange.advance(PARAMS, round_index + 1)
        row = self._row_for(neighbors, arrived)
        self._row = row
        local = [p for _, p in ctx.parameters]
        contributions = [
            (row[sender], [arrived[sender].tensors[name] for name, _ in ctx.parameters]) for sender in arrived
        ]
        if contributions:
            await ctx.run_compute(lambda: self._mix(local, row[ctx.name], contributions))
        missing = [n for n in neighbors if n not in arrived]
        # The peer's own round: its step count never jumps (see the module docstring).
        return ctx.ledger.record(own_round, missing, started)

    def _mix(
        self,
        local: Sequence[torch.Tensor],
        self_weight: float,
        contributions: Sequence[tuple[float, Sequence[torch.Tensor]]],
    ) -> None:
        """Plain Metropolis-Hastings mixing, or one of the robust rules (runs on the compute thread)."""
        config = self._ctx.config
        if config.robust == "clip":
            report = self._clipper.mix(local, self_weight, contributions)
            self.robust_stats["clipped"] = self._clipper.clipped
            self.robust_stats["rejected"] = self._clipper.rejected
            self.robust_stats["last_radius"] = report.radius
        elif config.robust == "trimmed-mean" and 2 * config.trim < 1 + len(contributions):
            trimmed_mean(local, [tensors for _, tensors in contributions], config.trim)
            self.robust_stats["trimmed_rounds"] += 1
        else:
            mix_into(local, self_weight, contributions)

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "local_steps": self.config.local_steps,
            "round_offset": self._offset,
            "neighbors": list(self._neighbors()),
            "last_mixing_weights": {k: round(v, 6) for k, v in self._row.items()},
            "robust": self.config.robust,
            "robust_stats": dict(self.robust_stats),
        }
