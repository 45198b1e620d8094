"""``gossip``: D-PSGD (Lian et al. 2017), synchronous parameter gossip with the graph neighbours.

Every H local steps a peer runs one round with its neighbours: x_i <- sum_j W_ij x_j with
Metropolis-Hastings weights. A neighbour whose frame misses the round deadline (learnt from
recent round times, at most ``round_timeout``: :meth:`StrategyBase.round_deadline`) is left out
and its weight moves to the peer itself; the round is recorded as *partial*, with who was missing.

After a freeze nobody throws away what it learned, by two rules:

* *A minority does not run ahead.* A peer that sees fewer than half of the configured peers live
  (e.g. the one peer left running while three of four are frozen) has almost nobody to mix with:
  it holds its training, at most ``minority_wait`` seconds, until enough of them are back. The
  frozen majority therefore finds it at most the few rounds ahead that it trained before its
  failure detector dropped them, instead of the hundreds it could train alone. After the wait it
  trains on with whoever is left (a real crash of most of the swarm costs one wait, not one per
  round), and it never waits in the last two rounds, when peers finish and leave rather than fail.
* *A peer behind catches up by round, not by discarding.* A peer that finds a neighbour's frame
  for a later round (it was frozen, joined, restarted) mixes at that round, keeping its own
  parameters; the node advances its step count to match, so every peer's last round is the same
  and the final models agree. What the peer skips is only the lead of the peer ahead, which the
  first rule keeps to a few rounds.

Trade-off: peers finishing together (a last round every peer shares, so final models agree) is
bought with those few skipped steps for the peers that were behind. Keeping every step instead
(a round offset per peer) lets the peer ahead finish first and the others train their last
steps without it, and the final models drift apart by what those unmixed steps change.
Optional robust rules (``strategy.robust``) bound what a faulty neighbour can do to a round, at
the cost of mixing that is no longer exactly doubly stochastic. With ``[compression]`` on, the
registry builds :class:`~p2pdl.strategies.choco.ChocoGossipStrategy` instead.
"""

from __future__ import annotations

import asyncio
import logging
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
MINORITY_POLL_SECONDS = 0.1

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class GossipConfig(RoundConfig):
    """The ``[strategy]`` keys D-PSGD reads: its round, and the robust mixing rule."""

    robust: RobustKind  # "clip": self-centred clipping; "trimmed-mean": coordinate-wise trimmed mean
    clip_radius: float  # clip: fixed L2 radius over the whole model; 0 = adaptive
    reject_factor: float  # clip: ignore a neighbour farther than this x the median accepted distance
    trim: int  # trimmed-mean: values dropped at each end, per coordinate
    minority_wait: float  # seconds a peer seeing under half the configured peers live holds training


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
        self._held_alone = False  # waited minority_wait once already: train on with who is left
        self.minority_waits = 0
        self.minority_wait_seconds = 0.0
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
        if ctx.last_step is None or step + 2 * self.config.local_steps <= ctx.last_step:
            await self._hold_while_minority()  # not in the last two rounds: peers finishing leave
        neighbors = self._neighbors()
        round_index = step // self.config.local_steps
        ahead = ctx.exchange.highest_round(PARAMS, neighbors)
        if ahead is not None and round_index < ahead <= round_index + MAX_ROUND_LEAD:
            round_index = ahead  # behind (thawed, joined, restarted): mix at the neighbours' round
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
        return ctx.ledger.record(round_index, missing, started)

    def _in_minority(self) -> bool:
        configured = len(self._ctx.configured)
        return configured > 1 and 2 * len(self._ctx.topology().names) < configured

    async def _hold_while_minority(self) -> None:
        """Wait (at most ``minority_wait`` s) while fewer than half of the configured peers are live."""
        if not self._in_minority():
            self._held_alone = False
            return
        if self._held_alone or self.config.minority_wait <= 0:
            return
        self.minority_waits += 1
        started = time.perf_counter()
        deadline = started + self.config.minority_wait
        # Polled: the live set changes in the membership layer, which has no event for a strategy.
        while time.perf_counter() < deadline:
            if not self._in_minority():
                break
            await asyncio.sleep(MINORITY_POLL_SECONDS)
        self.minority_wait_seconds += time.perf_counter() - started
        self._held_alone = self._in_minority()
        if self._held_alone:
            log.warning(
                "%s: only %s of %d configured peers live after %.0f s; training on with them",
                self._ctx.name,
                list(self._ctx.topology().names),
                len(self._ctx.configured),
                self.config.minority_wait,
            )

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
            "minority_waits": self.minority_waits,
            "minority_wait_seconds": round(self.minority_wait_seconds, 3),
            "neighbors": list(self._neighbors()),
            "last_mixing_weights": {k: round(v, 6) for k, v in self._row.items()},
            "robust": self.config.robust,
            "robust_stats": dict(self.robust_stats),
        }
