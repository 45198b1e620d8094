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
With ``strategy.delay = 1`` the round no longer stops training: after the optimizer step of
round r the peer snapshots its parameters (on the compute thread), sends the snapshot from an
owned background task and returns; the next round's local steps run while the copies travel,
and at the end of round r + 1 the peer waits (at most the round deadline) for the neighbours'
round-r snapshots and adds ``sum_j W_ij (s_j - s_i)`` to its parameters. The derivation, and why
this mixing of snapshot differences preserves the network average on a doubly stochastic W,
are in :mod:`p2pdl.core.delayed`. The weights are the MH weights of the degrees both sides
reported with their snapshots, over the neighbours the snapshot was sent to; a snapshot that
did not arrive in time (or a neighbour this peer's own send failed to reach) contributes
nothing, the delayed form of "its weight stays home". A peer behind its neighbours relabels
its parameters as their round and sends them as its snapshot for it, mixing from the next
round on. The last round sends nothing: nobody would mix it.

Optional robust rules (``strategy.robust``) bound what a faulty neighbour can do to a round, at
the cost of mixing that is no longer exactly doubly stochastic. With ``[compression]`` on, the
registry builds :class:`~p2pdl.strategies.choco.ChocoGossipStrategy` instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pdl.config import RobustKind
from p2pdl.core.delayed import mix_delayed_into, snapshot
from p2pdl.core.mixing import mix_into
from p2pdl.core.robust import OutlierClipper, trimmed_mean
from p2pdl.core.topology import mh_weight
from p2pdl.errors import TransportError
from p2pdl.strategies.base import (
    MAX_ROUND_LEAD,
    RoundConfig,
    RoundOutcome,
    StrategyBase,
    StrategyContext,
    neighbour_frame_specs,
    reported_degree,
)
from p2pdl.tasks import TaskOwner, reap
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
    delay: int  # 0: synchronous rounds; 1: mix the neighbours' snapshots one round later


@dataclass
class _SentSnapshot:
    """This peer's snapshot of one round, kept until the neighbours' snapshots of it are mixed."""

    round: int
    tensors: list[torch.Tensor]  # s_i, in ctx.parameters order (the frame sent carries the same tensors)
    degree: int  # the degree reported with it: both sides of an edge weigh it with the same pair
    neighbors: tuple[str, ...]  # whom it was sent to
    unreached: set[str]  # neighbours the send failed to reach (filled in by the send task)


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
        # strategy.delay = 1: the snapshot awaiting its round's mix, and its send in flight.
        self._tasks = TaskOwner(f"{ctx.name}:gossip")
        self._sent: _SentSnapshot | None = None
        self._send: asyncio.Task[None] | None = None
        self.wait_seconds = 0.0  # blocked collecting neighbour copies (the node's "waiting" phase)
        self.catch_ups = 0
        self.failed_sends = 0
        self.cancelled_sends = 0

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        return neighbour_frame_specs(self._ctx, kind, sender, PARAMS, self._specs)

    def _row_for(
        self, neighbors: Sequence[str], arrived: Mapping[str, Frame], own_degree: int | None = None
    ) -> dict[str, float]:
        """This round's weights: MH from reported degrees; missing neighbours' weight stays home."""
        own_degree = len(neighbors) if own_degree is None else own_degree
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
        if self.config.delay:
            return await self._delayed_round(step)
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
        waited = time.perf_counter()
        arrived = await ctx.exchange.collect(PARAMS, round_index, neighbors, self.round_deadline())
        self.wait_seconds += time.perf_counter() - waited
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

    async def _delayed_round(self, step: int) -> RoundOutcome | None:
        """strategy.delay = 1: mix the neighbours' snapshots of the previous round, send this one's."""
        ctx = self._ctx
        local_steps = self.config.local_steps
        neighbors = self._neighbors()
        round_index = step // local_steps
        started = time.perf_counter()
        outcome: RoundOutcome | None = None
        mix: Callable[[], None] | None = None
        # On time, a neighbour is at most at this round (it mixes our snapshot of the previous one
        # before it sends its next); a later round means it went on without us: catch up.
        ahead = ctx.exchange.highest_round(PARAMS, neighbors)
        if ahead is not None and round_index < ahead <= round_index + MAX_ROUND_LEAD:
            round_index = ahead
            self._sent = None  # a round the neighbours have closed: nothing of it will be mixed
            ctx.exchange.advance(PARAMS, round_index)
            self.catch_ups += 1
            # Not a mixing round (the ledger does not count it); it moves the node's step count.
            outcome = RoundOutcome(round=round_index, complete=False, missing=(), seconds=0.0)
        elif self._sent is not None:
            outcome, mix = await self._collect_previous(self._sent, started)
        self._round = round_index
        round_end = (round_index + 1) * local_steps - 1
        send = bool(neighbors) and (ctx.last_step is None or round_end < ctx.last_step)
        self._sent = None  # alone, or the last round (every peer mixes only up to the previous one)
        if send:
            await self._settle_previous_send()
        if mix is None and not send:
            return outcome
        parameters = [p for _, p in ctx.parameters]

        def mix_then_copy() -> list[torch.Tensor] | None:
            # One trip to the compute thread for both: the copy is of the parameters just mixed.
            if mix is not None:
                mix()
            return snapshot(parameters) if send else None

        tensors = await ctx.run_compute(mix_then_copy)
        if tensors is not None:
            self._start_send(round_index, round_end, neighbors, tensors)
        return outcome

    async def _collect_previous(
        self, sent: _SentSnapshot, started: float
    ) -> tuple[RoundOutcome, Callable[[], None] | None]:
        """Wait (bounded by the round deadline) for the neighbours' snapshots of ``sent.round``.

        Returns the round's outcome and the mix to run on the compute thread (None: nothing came).
        """
        ctx = self._ctx
        deadline = self.round_deadline()
        if self._send is not None and not self._send.done():
            await TaskOwner.wait([self._send], deadline)  # our own copy must be out before we mix theirs
        # Not those our send missed (they do not mix ours), nor those no longer neighbours (their
        # frames are refused now): both sides of an edge leave each other out.
        current = set(self._neighbors())
        senders = [n for n in sent.neighbors if n not in sent.unreached and n in current]
        remaining = max(0.0, deadline - (time.perf_counter() - started))
        arrived = await ctx.exchange.collect(PARAMS, sent.round, senders, remaining)
        waited = time.perf_counter() - started
        self.wait_seconds += waited
        self.observe_round(waited)
        ctx.exchange.advance(PARAMS, sent.round + 1)
        row = self._row_for(sent.neighbors, arrived, own_degree=sent.degree)
        self._row = row
        local = [p for _, p in ctx.parameters]
        contributions = [
            (row[sender], [arrived[sender].tensors[name] for name, _ in ctx.parameters]) for sender in arrived
        ]
        missing = [n for n in sent.neighbors if n not in arrived]
        outcome = ctx.ledger.record(sent.round, missing, started)
        if not contributions:
            return outcome, None
        return outcome, lambda: mix_delayed_into(local, sent.tensors, contributions)

    async def _settle_previous_send(self) -> None:
        """At most one send in flight: a link slower than a whole round holds the next one back."""
        previous = self._send
        if previous is None:
            return
        if not previous.done():
            await TaskOwner.wait([previous], self.round_deadline())
            if not previous.done():
                previous.cancel()
                self.cancelled_sends += 1
        await reap([previous], expected=(TransportError,))

    def _start_send(self, round_index: int, step: int, neighbors: tuple[str, ...], tensors: list[torch.Tensor]) -> None:
        """Send the snapshot ``tensors`` from a background task and keep it until its round is mixed."""
        ctx = self._ctx
        sent = _SentSnapshot(
            round=round_index, tensors=tensors, degree=len(neighbors), neighbors=neighbors, unreached=set()
        )
        frame = Frame(
            kind=PARAMS,
            sender=ctx.name,
            round=round_index,
            step=step,
            meta={"degree": sent.degree},
            tensors={name: tensor for (name, _), tensor in zip(ctx.parameters, tensors, strict=True)},
        )
        self._sent = sent
        self._send = self._tasks.spawn(self._broadcast(frame, sent), f"send:{round_index}")

    async def _broadcast(self, frame: Frame, sent: _SentSnapshot) -> None:
        failures = await self._ctx.exchange.broadcast(frame, sent.neighbors)
        if failures:
            self.failed_sends += len(failures)
            sent.unreached.update(failures)  # they do not mix ours, so we leave theirs out too
            log.info("%s: round %d snapshot not sent to %s", self._ctx.name, frame.round, sorted(failures))

    async def finish(self) -> None:
        """Let the last snapshot reach the neighbours that mix it (the node bounds this wait)."""
        if self._send is not None:
            await reap([self._send], expected=(TransportError,))

    async def close(self) -> None:
        await reap(self._tasks.cancel(), expected=(TransportError,))

    def state_replaced(
        self, extra: Mapping[str, torch.Tensor] | None = None, meta: Mapping[str, Any] | None = None
    ) -> None:
        self._sent = None  # a snapshot of a model that was just overwritten
        super().state_replaced(extra, meta)

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
            "delay": self.config.delay,
            "wait_seconds": round(self.wait_seconds, 3),
            "catch_ups": self.catch_ups,
            "failed_sends": self.failed_sends,
            "cancelled_sends": self.cancelled_sends,
        }
