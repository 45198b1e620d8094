"""The worker's side of the parameter server (:mod:`p2pdl.strategies.ps`).

A worker pushes its gradient (or, with H > 1, its parameters every H steps) to the server and
loads the server's reply in place of its own parameters; the node then skips its local optimizer
step. Without a reply within ``round_timeout`` it goes on with its own model and its own step,
and the round records the server as missing. The server's step is the worker's clock: in sync
gradient mode a worker takes the server's step with each reply (steps it took alone while the
server was late or down are overwritten with their parameters, so they do not count), and a
final frame from the server ends the worker's run on the server's model. Otherwise a worker
that had to go on alone for its first rounds would stay that many steps ahead, reach the end
before the server and finish on its own model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from p2pdl.errors import TransportError
from p2pdl.strategies.base import MAX_ROUND_LEAD, RoundOutcome, StrategyContext
from p2pdl.strategies.ps import AVERAGE, GRADIENT, PARAMETERS, ParameterServerRole
from p2pdl.wire import Frame, TensorSpec


class ParameterServerWorker(ParameterServerRole):
    """A worker: pushes to the server, pulls its parameters."""

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self._adopted: int | None = None  # the server's clock after this step's reply (sync mode)

    def communication_peers(self) -> tuple[str, ...]:
        return (self.server,) if self.server in self._ctx.topology().names else ()

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        if kind == PARAMETERS and sender == self.server:
            return self._specs
        raise self._refuse(kind, sender)

    def _own_gradients(self) -> dict[str, torch.Tensor]:
        return {
            name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach() for name, p in self._ctx.parameters
        }

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        if self._periodic:
            return None  # every step is local; parameters are averaged after the H-th
        return await self._worker_round(step)

    async def _parameter_round(self, step: int) -> RoundOutcome | None:
        if not self._periodic or (step + 1) % self.config.local_steps != 0:
            return None
        return await self._worker_average(step)

    def swarm_step(self) -> int | None:
        """The run's shared clock: the server's step (an async server runs ahead of its workers;
        its final frame ends their run)."""
        return self._server_step

    def adopted_step(self) -> int | None:
        adopted, self._adopted = self._adopted, None
        return adopted

    async def _worker_round(self, step: int) -> RoundOutcome:
        ctx = self._ctx
        started = time.perf_counter()
        self._local_step = True
        earlier = ctx.exchange.take_latest(PARAMETERS, self.server)  # replies to earlier pushes: dropped
        if earlier is not None and earlier.meta.get("final") is True:
            # The server has finished and said so: take its final model and its clock (async
            # workers stop with it).
            await self._load(earlier, step, final=True)
            return ctx.ledger.record(step, [], started)
        if not ctx.exchange.is_connected(self.server):
            self.server_unreachable += 1
            return ctx.ledger.record(step, [self.server], started)
        gradients = self._own_gradients()
        if self._codec is not None:
            codec = self._codec
            gradients = await ctx.run_compute(lambda: codec.encode(gradients))
            self.raw_bytes += codec.raw_bytes
        push = Frame(kind=GRADIENT, sender=ctx.name, round=self._version, step=step, tensors=gradients)
        return await self._push_and_pull(push, step, started, keep_state=False)

    async def _push_and_pull(self, push: Frame, round_index: int, started: float, *, keep_state: bool) -> RoundOutcome:
        """Send ``push`` to the server and load its reply (within ``round_timeout``); without one
        the worker goes on with its own model and the round records the server as missing."""
        ctx = self._ctx
        try:
            await self._send(self.server, push)
        except TransportError:
            self.server_unreachable += 1
            return ctx.ledger.record(round_index, [self.server], started)
        self.pushes += 1
        await ctx.exchange.wait_for_senders(PARAMETERS, (self.server,), 1, self.config.round_timeout)
        reply = ctx.exchange.take_latest(PARAMETERS, self.server)
        if reply is None:
            self.server_unreachable += 1
            return ctx.ledger.record(round_index, [self.server], started)
        final = reply.meta.get("final") is True
        reported = await self._load(reply, push.step, final=final, keep_state=keep_state)
        if not keep_state and not final and self.config.ps_mode == "sync" and reported is not None:
            # The reply holds the server's parameters after its step ``reported``: the next is ours.
            self._adopted = reported + 1
        return ctx.ledger.record(round_index, [], started)

    async def _worker_average(self, step: int) -> RoundOutcome:
        """Local SGD through the server: send this worker's parameters, load the server's average."""
        ctx = self._ctx
        started = time.perf_counter()
        round_index = step // self.config.local_steps
        late = ctx.exchange.take_latest(PARAMETERS, self.server)
        if late is not None and (late.meta.get("final") is True or late.round > self._version):
            # The server's final model, or an average that came after this worker stopped waiting
            # for it. The final one ends the run; a late average is loaded, and the worker then
            # pushes it tagged with the current version, so the server (waiting for this worker's
            # frame of the round) does not drop it as stale and sit out round_timeout.
            final = late.meta.get("final") is True
            await self._load(late, step, final=final, keep_state=True)
            if final:
                return ctx.ledger.record(round_index, [], started)
        if not ctx.exchange.is_connected(self.server):
            self.server_unreachable += 1
            return ctx.ledger.record(round_index, [self.server], started)
        push = Frame(
            kind=AVERAGE,
            sender=ctx.name,
            round=self._version,
            step=step,
            tensors={name: p.detach() for name, p in ctx.parameters},
        )
        # Local SGD keeps each worker's optimizer state across syncs, as allreduce with H > 1 does.
        return await self._push_and_pull(push, round_index, started, keep_state=True)

    async def _load(self, reply: Frame, step: int, *, final: bool = False, keep_state: bool = False) -> int | None:
        """Replace this worker's parameters with the server's; the node then skips its local step.

        Returns the server's step as believed: at most MAX_ROUND_LEAD ahead, except in its final
        frame (None when the reply names none).
        """
        ctx = self._ctx

        @torch.no_grad()
        def load() -> None:
            for name, p in ctx.parameters:
                p.copy_(reply.tensors[name])
            # The worker's own optimizer state (momentum) belongs to the parameters it just dropped;
            # a local step during a later outage starts afresh from the server's rather than
            # carry a stale momentum buffer into it.
            if not keep_state:
                ctx.optimizer.state.clear()

        await ctx.run_compute(load)
        self._version = reply.round
        reported = reply.meta.get("server_step")
        believed: int | None = None
        if isinstance(reported, int) and not isinstance(reported, bool) and reported >= 0:
            believed = reported if final else min(reported, step + MAX_ROUND_LEAD)
            self._server_step = max(self._server_step, believed)
        self._local_step = False  # the server's step replaced ours
        self.pulls += 1
        return believed
