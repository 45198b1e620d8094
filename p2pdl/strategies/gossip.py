"""``gossip``: D-PSGD (Lian et al. 2017), synchronous parameter gossip with the graph neighbours.

Every H local steps a peer runs one round with its neighbours: x_i <- sum_j W_ij x_j with
Metropolis-Hastings weights. A neighbour whose frame misses the ``round_timeout`` is left out and
its weight moves to the peer itself; the round is recorded as *partial*, with who was missing.
Optional robust rules (``strategy.robust``) bound what a faulty neighbour can do to a round, at
the cost of mixing that is no longer exactly doubly stochastic. With ``[compression]`` on, the
registry builds :class:`~p2pdl.strategies.choco.ChocoGossipStrategy` instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from p2pdl.core.mixing import mix_into
from p2pdl.core.robust import OutlierClipper, trimmed_mean
from p2pdl.core.topology import mh_weight
from p2pdl.strategies.base import (
    MAX_ROUND_LEAD,
    RoundOutcome,
    StrategyBase,
    StrategyContext,
    neighbour_frame_specs,
    reported_degree,
)
from p2pdl.wire.codec import Frame, TensorSpec

PARAMS = "params"


class GossipStrategy(StrategyBase):
    """D-PSGD: synchronous parameter gossip with the graph neighbours every H local steps.

    Under churn the neighbours are re-read from the live graph every round, and the
    Metropolis-Hastings weight of each neighbour uses the degree it reports in its frame, so the
    weights stay symmetric and doubly stochastic after every membership change.
    """

    name = "gossip"

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self._row: dict[str, float] = {}
        self.robust_stats: dict[str, float] = {"clipped": 0, "rejected": 0, "trimmed_rounds": 0, "last_radius": 0.0}
        self._clipper = OutlierClipper(radius=ctx.config.clip_radius, reject_factor=ctx.config.reject_factor)

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
        if (step + 1) % self._ctx.config.local_steps != 0:
            return None
        ctx = self._ctx
        neighbors = self._neighbors()
        round_index = step // ctx.config.local_steps
        ahead = ctx.exchange.highest_round(PARAMS, neighbors)
        if ahead is not None and round_index < ahead <= round_index + MAX_ROUND_LEAD:
            round_index = ahead  # behind the swarm (joined or restarted): catch up to its round
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
        arrived = await ctx.exchange.collect(PARAMS, round_index, neighbors, ctx.config.round_timeout)
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
        return ctx.ledger.record(round_index, missing, started)

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
            "local_steps": self._ctx.config.local_steps,
            "neighbors": list(self._neighbors()),
            "last_mixing_weights": {k: round(v, 6) for k, v in self._row.items()},
            "robust": self._ctx.config.robust,
            "robust_stats": dict(self.robust_stats),
        }
