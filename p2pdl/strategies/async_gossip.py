"""``async-gossip``: AD-PSGD (Lian et al. 2018), decentralized SGD without a round barrier.

Every H steps a peer mixes with the *latest* parameters it holds from each neighbour, without
waiting for any particular one, then sends its mixed parameters to them. Sends run in the
background, one in flight per neighbour at most (a newer frame never queues behind an older one
to a slow peer), so a straggler slows only itself. A neighbour's parameters are used at most once
(mixing the same old copy round after round would drag a peer back towards it) and only while
they are at most ``max_staleness`` steps behind this peer; older ones are dropped and counted.

Peers share one step clock: a peer more than ``max_staleness`` steps behind its neighbours moves
its counter up (it trains fewer steps, and drops its optimizer state, which the swarm has left
behind), so contributions stay fresh and everybody finishes together. The other way round, a
peer never runs more than ``max_lead`` steps (plus H) ahead of its *fastest* connected
neighbour: beyond that it waits (at most ``round_timeout``) for a newer copy from any of them.
The fastest answers, so a straggler holds it up only when no fast neighbour is left (a peer
whose every neighbour is slow runs at their pace), and no peer runs away from the swarm and
trains alone.

Every frame carries the furthest step its sender knows of (``swarm_step``); a peer stops when
that horizon reaches the end of the run, and before it leaves it makes sure each neighbour got
its last frame (a neighbour left without the horizon would train on alone). Horizons are read
from every frame, stale ones and those of neighbours that have already left included. A peer
that learns the swarm has finished while it is still behind (a straggler) ends on the average of
its neighbours' latest copies, which are the swarm's final model, rather than on its own older one.

Trade-off: mixing is not synchronised, so the swarm runs at the speed of its fast peers, but the
average of the parameters is preserved only approximately (each peer mixes with slightly old
copies), which is the price AD-PSGD pays for wait-freedom.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from p2pdl.core.mixing import mix_into
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

ASYNC_PARAMS = "aparams"


@dataclass(frozen=True, kw_only=True, slots=True)
class AsyncGossipConfig(RoundConfig):
    """The ``[strategy]`` keys AD-PSGD reads (``round_timeout`` bounds its wait for a neighbour)."""

    max_staleness: int  # steps: drop neighbour parameters older than this
    max_lead: int  # steps (plus H) this peer may run ahead of its fastest neighbour; 0 = off


class AsyncGossipStrategy(StrategyBase):
    name = "async-gossip"

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.config = AsyncGossipConfig.from_table(ctx.config)
        self._tasks = TaskOwner(f"{ctx.name}:async-gossip")  # the sends in flight, awaited in finish()
        self._sends: dict[str, asyncio.Task[None]] = {}  # the latest send to each neighbour
        self._sent: dict[str, bytes] = {}  # the frame last handed to each neighbour's send
        self._last_frame: bytes | None = None
        self._ever_neighbors: set[str] = set()
        self._latest: dict[str, Frame] = {}
        self._catch_up_to: int | None = None
        self.catch_ups = 0
        self.used = 0
        self.dropped_stale = 0
        self.skipped_sends = 0
        self.failed_sends = 0
        self._staleness_sum = 0
        self._swarm_step = 0
        self.ended_on_swarm_model = 0  # copies averaged when it stopped behind the swarm (0: did not)
        self._heard: dict[str, int] = {}  # the newest step seen from each neighbour
        self._silent = False  # a lead wait timed out; no more waits until some neighbour is heard
        self.waits = 0
        self.wait_seconds = 0.0

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        return neighbour_frame_specs(self._ctx, kind, sender, ASYNC_PARAMS, self._specs)

    async def _send(self, neighbor: str, data: bytes) -> None:
        try:
            await self._ctx.exchange.send_encoded(neighbor, data)
        except TransportError:
            self.failed_sends += 1

    def _take(self, neighbor: str, step: int) -> Frame | None:
        """The newest unread frame from ``neighbor``; its step and horizon are noted."""
        frame = self._ctx.exchange.take_latest(ASYNC_PARAMS, neighbor)
        if frame is not None:
            self._heard[neighbor] = max(self._heard.get(neighbor, frame.step), frame.step)
            self._silent = False
            self._learn_horizon(frame, step)
        return frame

    async def _keep_within_reach(self, neighbors: tuple[str, ...], step: int) -> None:
        """Wait while this peer is more than ``max_lead`` (+ H) steps ahead of every connected neighbour.

        Wait-free mixing has a runaway mode: a peer that finds no fresh copy skips mixing, so its
        steps get cheaper, while its neighbours spend theirs decoding the frames it floods them
        with; it runs further ahead, finds even fewer fresh copies and ends up training alone on
        its shard, where its momentum, built up against the pull of mixing, throws its loss up and
        it ends well below its neighbours. The wait ends with a copy from *any* neighbour, so the
        fastest one answers; a straggler paces this peer only when every connected neighbour is
        slow.
        A wait that times out (neighbours connected but silent) is not repeated until one is
        heard again, so a hung neighbour costs one ``round_timeout``, not one per step.
        """
        ctx = self._ctx
        lead = self.config.max_lead
        connected = [n for n in neighbors if ctx.exchange.is_connected(n)]
        if not lead or not connected or self._silent:
            return
        floor = step - lead - self.config.local_steps

        def within_reach() -> bool:
            return max((self._heard.get(n, -1) for n in connected), default=-1) >= floor

        if within_reach():
            return
        self.waits += 1
        started = time.perf_counter()
        deadline = started + self.config.round_timeout
        try:
            while not within_reach():
                remaining = deadline - time.perf_counter()
                ready = await ctx.exchange.wait_for_senders(ASYNC_PARAMS, connected, 1, max(remaining, 0.0))
                if not ready:
                    self._silent = True
                    return
                for neighbor in ready:
                    frame = self._take(neighbor, step)
                    if frame is not None:
                        self._latest[neighbor] = frame
        finally:
            self.wait_seconds += time.perf_counter() - started

    def _horizon_to_send(self, step: int) -> int:
        """The furthest step this peer knows of. In its last sync before the run's end (the steps
        after it, fewer than H, are local and send nothing) that is the end itself: with run.steps
        not a multiple of H, no frame would otherwise ever say the run is over."""
        horizon = max(self._swarm_step, step)
        last = self._ctx.last_step
        if last is not None and step + self.config.local_steps > last:
            horizon = max(horizon, last)
        return horizon

    async def _end_on_the_swarms_model(self, copies: list[Frame], step: int) -> None:
        """The swarm has finished and this peer is behind it: end on its neighbours' latest copies.

        A peer behind the swarm's end (a straggler) holds parameters a few of the swarm's steps
        old, and keeping its MH share of them would leave it clearly below its neighbours. Its
        last copies of the neighbours that are at least as far on hold the swarm's final model,
        so it ends on their plain average, as a parameter-server worker ends on the server's
        final frame. It is stopping: nobody mixes
        with the result except through its own last frame.
        """
        ahead = [f for f in copies if f.step >= step]
        if not ahead:
            return
        ctx = self._ctx
        local = [p for _, p in ctx.parameters]
        share = 1.0 / len(ahead)
        contributions = [(share, [f.tensors[name] for name, _ in ctx.parameters]) for f in ahead]
        # A mix that gives its own copy no weight.
        await ctx.run_compute(lambda: mix_into(local, 0.0, contributions))
        self.ended_on_swarm_model = len(ahead)

    def _start_send(self, neighbor: str, data: bytes) -> None:
        self._sent[neighbor] = data
        self._sends[neighbor] = self._tasks.spawn(self._send(neighbor, data), f"send:{neighbor}")

    def _learn_horizon(self, frame: Frame, step: int) -> None:
        """The furthest step the swarm has reached, as far as ``frame`` knows (stale frames too)."""
        reported = frame.meta.get("swarm_step")
        known = reported if isinstance(reported, int) and not isinstance(reported, bool) else frame.step
        # A bogus horizon could end training early; never trust more than MAX_ROUND_LEAD ahead.
        self._swarm_step = max(self._swarm_step, min(max(known, frame.step), step + MAX_ROUND_LEAD))

    async def _parameter_round(self, step: int) -> RoundOutcome | None:
        ctx = self._ctx
        if (step + 1) % self.config.local_steps != 0:
            return None
        started = time.perf_counter()
        neighbors = self._neighbors()
        self._round = step // self.config.local_steps
        self._ever_neighbors.update(neighbors)
        await self._keep_within_reach(neighbors, step)
        for neighbor in neighbors:
            newest = self._take(neighbor, step)
            if newest is not None:
                self._latest[neighbor] = newest
        departed: list[Frame] = []
        for gone in self._ever_neighbors.difference(neighbors):
            # A neighbour that has left may have said in its last frame that the swarm is done; its
            # leave can be processed before that frame is, and a straggler that missed it would
            # train on alone. Its parameters are not mixed (it is no longer a neighbour), but the
            # horizon it reported counts.
            self._latest.pop(gone, None)
            last = ctx.exchange.take_latest(ASYNC_PARAMS, gone)
            if last is not None:
                self._learn_horizon(last, step)
                departed.append(last)
        # The swarm shares one step clock (run.steps is a swarm-wide budget). A peer that has
        # fallen more than max_staleness steps behind its neighbours (a straggler, a late starter)
        # moves its clock up to stay within reach: it trains fewer steps, but its contributions
        # stay fresh and it finishes with the others.
        ahead = max((f.step for f in self._latest.values()), default=step)
        if ahead - step > self.config.max_staleness:
            self._catch_up_to = min(ahead - self.config.max_staleness // 2, step + MAX_ROUND_LEAD)
            step = self._catch_up_to
            self.catch_ups += 1
            # Its optimizer state (momentum) is an average over its own last steps, which the swarm
            # left behind long ago: keeping it carries stale directions into every step. A peer
            # that had really taken the steps it skipped would have decayed it by
            # momentum^skipped, so it starts afresh, as a PS worker does on each pull.
            await ctx.run_compute(ctx.optimizer.state.clear)
        usable: dict[str, Frame] = {}
        for neighbor in neighbors:
            candidate = self._latest.pop(neighbor, None)
            if candidate is None:
                continue
            staleness = step - candidate.step
            if staleness > self.config.max_staleness:
                self.dropped_stale += 1
                continue
            usable[neighbor] = candidate
            self._staleness_sum += max(staleness, 0)
        own_degree = len(neighbors)
        graph = ctx.topology()
        row = {n: mh_weight(own_degree, reported_degree(f, graph, n, own_degree)) for n, f in usable.items()}
        self_weight = 1.0 - sum(row.values())
        if usable:
            local = [p for _, p in ctx.parameters]
            contributions = [(row[n], [usable[n].tensors[name] for name, _ in ctx.parameters]) for n in usable]
            await ctx.run_compute(lambda: mix_into(local, self_weight, contributions))
            self.used += len(usable)
        missing = [n for n in neighbors if n not in usable]
        if ctx.last_step is not None and step < ctx.last_step <= self._swarm_step:
            await self._end_on_the_swarms_model([*usable.values(), *departed], step)
        # Send after mixing: neighbours get the mixed copy, and the swarm horizon just learnt travels
        # on at once (a peer that stops at the horizon has told its neighbours in its last frame).
        frame = Frame(
            kind=ASYNC_PARAMS,
            sender=ctx.name,
            round=step,  # the sender's (caught-up) step: receivers measure staleness against their own
            step=step,
            # The furthest step this peer knows of travels on, so the end of training reaches every
            # peer, not only the neighbours of the first to finish.
            meta={"degree": len(neighbors), "swarm_step": self._horizon_to_send(step)},
            tensors={name: p.detach() for name, p in ctx.parameters},
        )
        data = await ctx.exchange.encode(frame)
        self._last_frame = data
        for neighbor in neighbors:
            previous = self._sends.get(neighbor)
            if previous is not None and not previous.done():
                self.skipped_sends += 1  # still sending an older copy to a slow peer: skip, never queue
                continue
            self._start_send(neighbor, data)
        if self._catch_up_to is not None:
            # Report the new clock as this round; the node moves its step counter to it.
            self._round = self._catch_up_to // self.config.local_steps
            self._catch_up_to = None
        return ctx.ledger.record(self._round, missing, started)

    def swarm_step(self) -> int | None:
        """The furthest step any neighbour has reported: a straggler stops when the swarm is done."""
        return self._swarm_step

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "neighbors": list(self._neighbors()),
            "max_staleness": self.config.max_staleness,
            "mean_staleness": self._staleness_sum / self.used if self.used else None,
            "contributions_used": self.used,
            "dropped_stale": self.dropped_stale,
            "skipped_sends": self.skipped_sends,
            "failed_sends": self.failed_sends,
            "catch_ups": self.catch_ups,
            "max_lead": self.config.max_lead,
            "lead_waits": self.waits,
            "ended_on_swarm_model": self.ended_on_swarm_model,
            "wait_seconds": round(self.wait_seconds, 3),
        }

    async def finish(self) -> None:
        """Make sure every neighbour gets this peer's last frame, which carries the swarm's horizon.

        A send still in flight to a slow neighbour makes the last frame skip it; that neighbour
        would then never learn that the swarm is done and train on alone (the node bounds this
        wait by ``transport.shutdown_timeout``).
        """
        last = self._last_frame
        if last is None:
            return

        async def deliver(neighbor: str) -> None:
            # Per neighbour: one hung link must not hold back the last frame to the others.
            previous = self._sends.get(neighbor)
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            if self._sent.get(neighbor) is not last:
                self._start_send(neighbor, last)
                await asyncio.wait([self._sends[neighbor]])

        await asyncio.gather(*(deliver(n) for n in self._neighbors()))

    async def close(self) -> None:
        await reap(self._tasks.cancel(), expected=(TransportError,))
