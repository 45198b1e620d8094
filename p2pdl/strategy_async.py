"""``async-gossip``: AD-PSGD (Lian et al. 2018), decentralized SGD without a round barrier.

Every H steps a peer mixes with the *latest* parameters it holds from each neighbour, without
waiting for anybody, then sends its mixed parameters to them. Sends run in the background, one in
flight per neighbour at most (a newer frame never queues behind an older one to a slow peer), so
a straggler slows only itself. A neighbour's parameters are used at most once (mixing the same old
copy round after round drags a peer back; measured here) and only while they are at most
``max_staleness`` steps behind this peer; older ones are dropped and counted. Peers
share one step clock: a peer more than ``max_staleness`` steps behind its neighbours moves its
counter up (it trains fewer steps), so contributions stay fresh and everybody finishes together.

Trade-off: no peer ever waits, so the swarm runs at the speed of its fast peers, but mixing is
not synchronised: the average of the parameters is preserved only approximately (each peer mixes
with slightly old copies), which is the price AD-PSGD pays for wait-freedom.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

from p2pdl.errors import TransportError
from p2pdl.mixing import mix_into
from p2pdl.strategies import (
    MAX_ROUND_LEAD,
    RoundOutcome,
    StrategyContext,
    neighbour_frame_specs,
    parameter_specs,
    reported_degree,
)
from p2pdl.topology import mh_weight
from p2pdl.wire import Frame, TensorSpec

ASYNC_PARAMS = "aparams"


class AsyncGossipStrategy:
    name = "async-gossip"

    def __init__(self, ctx: StrategyContext) -> None:
        self._ctx = ctx
        self._specs = parameter_specs(ctx.parameters)
        self._sends: dict[str, asyncio.Task[None]] = {}
        self._latest: dict[str, Frame] = {}
        self._catch_up_to: int | None = None
        self.catch_ups = 0
        self._round = 0
        self.used = 0
        self.dropped_stale = 0
        self.skipped_sends = 0
        self.failed_sends = 0
        self._staleness_sum = 0
        self._swarm_step = 0

    def _neighbors(self) -> tuple[str, ...]:
        return self._ctx.topology().neighbors.get(self._ctx.name, ())

    def communication_peers(self) -> tuple[str, ...]:
        return self._neighbors()

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        return neighbour_frame_specs(self._ctx, kind, sender, ASYNC_PARAMS, self._specs)

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        return None

    def wants_local_step(self) -> bool:
        return True

    async def _send(self, neighbor: str, data: bytes) -> None:
        try:
            await self._ctx.exchange.send_encoded(neighbor, data)
        except TransportError:
            self.failed_sends += 1

    async def after_optimizer_step(self, step: int) -> RoundOutcome | None:
        ctx = self._ctx
        if (step + 1) % ctx.config.local_steps != 0:
            return None
        started = time.perf_counter()
        neighbors = self._neighbors()
        self._round = step // ctx.config.local_steps
        for neighbor in neighbors:
            newest = ctx.exchange.take_latest(ASYNC_PARAMS, neighbor)
            if newest is not None:
                self._latest[neighbor] = newest
        # The swarm shares one step clock (run.steps is a swarm-wide budget). A peer that has
        # fallen more than max_staleness steps behind its neighbours (a straggler, a late starter)
        # moves its clock up to stay within reach: it trains fewer steps, but its contributions
        # stay fresh and it finishes with the others.
        ahead = max((f.step for f in self._latest.values()), default=step)
        if ahead - step > ctx.config.max_staleness:
            self._catch_up_to = min(ahead - ctx.config.max_staleness // 2, step + MAX_ROUND_LEAD)
            step = self._catch_up_to
            self.catch_ups += 1
        usable: dict[str, Frame] = {}
        for neighbor in neighbors:
            candidate = self._latest.pop(neighbor, None)
            if candidate is None:
                continue
            staleness = step - candidate.step
            if staleness > ctx.config.max_staleness:
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
        for frame in usable.values():
            reported = frame.meta.get("swarm_step")
            known = reported if isinstance(reported, int) and not isinstance(reported, bool) else frame.step
            # A bogus horizon could end training early; never trust more than MAX_ROUND_LEAD ahead.
            self._swarm_step = max(self._swarm_step, frame.step, min(known, step + MAX_ROUND_LEAD))
        # Send after mixing: neighbours get the mixed copy, and the swarm horizon just learnt travels
        # on at once (a peer that stops at the horizon has told its neighbours in its last frame).
        frame = Frame(
            kind=ASYNC_PARAMS,
            sender=ctx.name,
            round=step,  # the sender's (caught-up) step: receivers measure staleness against their own
            step=step,
            # The furthest step this peer knows of travels on, so the end of training reaches every
            # peer, not only the neighbours of the first to finish.
            meta={"degree": len(neighbors), "swarm_step": max(self._swarm_step, step)},
            tensors={name: p.detach() for name, p in ctx.parameters},
        )
        data = await ctx.exchange.encode(frame)
        for neighbor in neighbors:
            previous = self._sends.get(neighbor)
            if previous is not None and not previous.done():
                self.skipped_sends += 1  # still sending an older copy to a slow peer: skip, never queue
                continue
            self._sends[neighbor] = asyncio.ensure_future(self._send(neighbor, data))
        if self._catch_up_to is not None:
            # Report the new clock as this round; the node moves its step counter to it.
            self._round = self._catch_up_to // ctx.config.local_steps
            self._catch_up_to = None
        return ctx.ledger.record(self._round, missing, started)

    def swarm_step(self) -> int | None:
        """The furthest step any neighbour has reported: a straggler stops when the swarm is done."""
        return self._swarm_step

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "round": self._round,
            "neighbors": list(self._neighbors()),
            "max_staleness": self._ctx.config.max_staleness,
            "mean_staleness": self._staleness_sum / self.used if self.used else None,
            "contributions_used": self.used,
            "dropped_stale": self.dropped_stale,
            "skipped_sends": self.skipped_sends,
            "failed_sends": self.failed_sends,
            "catch_ups": self.catch_ups,
        }

    async def finish(self) -> None:
        return None

    async def close(self) -> None:
        for task in self._sends.values():
            task.cancel()
        for task in self._sends.values():
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                await task
