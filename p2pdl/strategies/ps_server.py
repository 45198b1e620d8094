"""The server's side of the parameter server (:mod:`p2pdl.strategies.ps`).

In sync mode the server gathers a quorum of worker gradients each step (or, with H > 1, worker
parameters every H steps), averages them with its own and broadcasts the result. In async mode a
background consumer applies each worker gradient on arrival and answers that worker at once; the
consumer and its replies are owned by the strategy (a :class:`~p2pdl.tasks.TaskOwner`), stopped
before the server's final frame goes out and cancelled on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Mapping

import torch

from p2pdl.core.mixing import exact_mean
from p2pdl.errors import FrameError, TransportError
from p2pdl.strategies.base import MAX_ROUND_LEAD, RoundOutcome, StrategyContext
from p2pdl.strategies.ps import AVERAGE, GRADIENT, PARAMETERS, ParameterServerRole
from p2pdl.tasks import TaskOwner, reap
from p2pdl.wire import Frame, TensorSpec

FINAL_REPLY_GRACE = 2.0  # seconds replies in flight get to land before the server's final frame


class ParameterServer(ParameterServerRole):
    """The server: holds the model every worker pulls, and trains on its own shard too."""

    is_server = True

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self._worker_step = 0  # the furthest step a worker has reported
        self._consumer: asyncio.Task[None] | None = None
        self._tasks = TaskOwner(f"{ctx.name}:ps-server")  # the async consumer
        self._replies = TaskOwner(f"{ctx.name}:ps-reply")  # async replies in flight
        self._finishing = False  # the final frame is going out; no reply may follow it

    def communication_peers(self) -> tuple[str, ...]:
        return self._workers()

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        if kind == GRADIENT and not self._periodic:
            return self._codec.wire_specs() if self._codec is not None else self._specs
        if kind == AVERAGE and self._periodic:
            return self._specs
        raise self._refuse(kind, sender)

    def _parameters_frame(self, step: int, *, copy: bool = False, version: int | None = None) -> Frame:
        """The server's parameters as a frame; ``copy`` snapshots them (run it on the compute thread)
        for a frame that is encoded while the server goes on updating them."""
        return Frame(
            kind=PARAMETERS,
            sender=self._ctx.name,
            round=self._version if version is None else version,
            step=step,
            # The server's own step: workers stop when the server's run is over (async mode).
            meta={"server_step": self._server_step},
            # A copy lives in host memory: replies queued to slow workers hold no device memory.
            tensors={name: p.detach().to("cpu", copy=True) if copy else p.detach() for name, p in self._ctx.parameters},
        )

    def _gradients_of(self, frame: Frame) -> Mapping[str, torch.Tensor]:
        """A worker's gradients as dense tensors (decoded when workers compress)."""
        if self._codec is None:
            return frame.tensors
        return self._codec.decode(frame.tensors, self._ctx.device)

    # ------------------------------------------------------------------ the strategy's rounds

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        self._server_step = step
        if self._periodic:
            return None  # every step is local; parameters are averaged after the H-th
        self._local_step = True
        if self.config.ps_mode == "async":
            if self._consumer is None or self._consumer.done():
                self._consumer = self._tasks.spawn(self._consume_async(), "consumer")
            # The server's own gradient is one more asynchronous update (staleness 0), at the same
            # scaled learning rate as the workers'; the node's plain optimizer step is skipped.
            await self._ctx.run_compute(functools.partial(self._async_step, 0))
            self._local_step = False
            return None
        return await self._server_sync_round(step)

    async def _parameter_round(self, step: int) -> RoundOutcome | None:
        if self._periodic:
            if (step + 1) % self.config.local_steps != 0:
                return None
            return await self._server_average(step)
        self._version += 1
        if self.config.ps_mode == "sync":
            workers = [w for w in self._workers() if self._ctx.exchange.is_connected(w)]
            if workers:
                await self._ctx.exchange.broadcast(self._parameters_frame(step), workers)
        return None

    def swarm_step(self) -> int | None:
        """The run's shared clock: the furthest worker. After a crash and ``--resume`` the server is
        behind workers that trained on alone, and it stops with them rather than train the rest
        by itself."""
        return self._worker_step

    # ------------------------------------------------------------------ sync mode

    async def _gather_quorum(self, kind: str) -> tuple[list[str], list[Frame]]:
        """Wait for ``ps_quorum`` frames of ``kind`` (all connected workers when 0) or the round
        timeout; return the connected workers and the frames that are not older than this
        server's version (older ones are counted in ``dropped_stale``)."""
        ctx = self._ctx
        workers = [w for w in self._workers() if ctx.exchange.is_connected(w)]
        quorum = min(self.config.ps_quorum or len(workers), len(workers))
        ready = await ctx.exchange.wait_for_senders(kind, workers, quorum, self.config.round_timeout)
        used: list[Frame] = []
        for worker in sorted(ready):
            frame = ctx.exchange.take_latest(kind, worker)
            if frame is None:
                continue
            if self._version - frame.round > 0:
                self.dropped_stale += 1
                continue
            used.append(frame)
            self._note_worker_step(frame)
        return workers, used

    async def _server_sync_round(self, step: int) -> RoundOutcome:
        ctx = self._ctx
        started = time.perf_counter()
        # A gradient older than the server's version was computed on parameters it has replaced.
        _, used = await self._gather_quorum(GRADIENT)

        @torch.no_grad()
        def average_into_grads() -> None:
            dense = []
            for frame in used:
                try:
                    dense.append(self._gradients_of(frame))
                except FrameError:
                    self.undecodable += 1  # a worker's compressed gradient that does not decode
            for name, p in ctx.parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                # The server's own gradient first, then the workers' in name order; a 16-bit
                # gradient is summed in float32 and rounded once.
                exact_mean([p.grad, *(gradients[name] for gradients in dense)], p.grad)

        await ctx.run_compute(average_into_grads)
        self.applied += len(used)
        missing = [w for w in self._workers() if w not in {f.sender for f in used}]
        return ctx.ledger.record(step, missing, started)

    async def _server_average(self, step: int) -> RoundOutcome:
        """Wait for K of N workers' parameters (or the timeout), average them with the server's own
        and send the average to every connected worker."""
        ctx = self._ctx
        started = time.perf_counter()
        # A frame older than the server's version missed an average: its model grew from an older one.
        workers, used = await self._gather_quorum(AVERAGE)

        @torch.no_grad()
        def average() -> None:
            for name, p in ctx.parameters:
                exact_mean([p, *(frame.tensors[name] for frame in used)], p)

        await ctx.run_compute(average)
        self.applied += len(used)
        self._version += 1
        if workers:
            await ctx.exchange.broadcast(self._parameters_frame(step), workers)
        missing = [w for w in self._workers() if w not in {f.sender for f in used}]
        return ctx.ledger.record(step // self.config.local_steps, missing, started)

    # ------------------------------------------------------------------ async mode

    async def _consume_async(self) -> None:
        """Async mode: apply each worker gradient on arrival and answer that worker."""
        ctx = self._ctx
        while not self._finishing:
            ready = await ctx.exchange.wait_for_senders(GRADIENT, self._workers(), 1, 1.0)
            for worker in sorted(ready):
                frame = ctx.exchange.take_latest(GRADIENT, worker)
                if frame is None or self._finishing:
                    continue
                staleness = max(0, self._version - frame.round)
                self._note_worker_step(frame)
                # The reply is a snapshot taken on the compute thread right after this update: the
                # server's own steps go on while it is being encoded and sent.
                self._version += 1  # on the event loop, like every other update of the version
                apply = functools.partial(self._apply_one, frame, staleness, self._version)
                reply = await ctx.run_compute(apply)
                self.applied += 1
                self._staleness_sum += staleness
                self._replies.spawn(self._reply(worker, reply), f"reply:{worker}")

    def _note_worker_step(self, frame: Frame) -> None:
        # A bogus step could end the server's run early; never believe more than MAX_ROUND_LEAD ahead.
        self._worker_step = max(self._worker_step, min(frame.step, self._server_step + MAX_ROUND_LEAD))

    async def _reply(self, worker: str, frame: Frame) -> None:
        with contextlib.suppress(TransportError):
            await self._send(worker, frame)

    @torch.no_grad()
    def _apply_one(self, frame: Frame, staleness: int, version: int) -> Frame:
        """One optimizer step with a worker's gradient (the server's own gradients are kept aside);
        returns the reply: a copy of the parameters it produced."""
        try:
            gradients = self._gradients_of(frame)
        except FrameError:
            self.undecodable += 1
            return self._parameters_frame(frame.step, copy=True, version=version)
        saved = [p.grad for _, p in self._ctx.parameters]
        try:
            for name, p in self._ctx.parameters:
                p.grad = gradients[name].to(device=p.device, dtype=p.dtype)
            self._async_step(staleness)
        finally:
            for (_, p), grad in zip(self._ctx.parameters, saved, strict=True):
                p.grad = grad
        return self._parameters_frame(frame.step, copy=True, version=version)

    def _async_step(self, staleness: int) -> None:
        """One optimizer step on the gradients in ``p.grad`` at lr / (n (1 + staleness)).

        Every asynchronous update, the server's own included, scales the *learning rate*, never
        the gradient: with momentum, a step applies the whole momentum buffer, so a pre-scaled
        gradient stepped at the full lr would move the model n times too far.
        """
        optimizer = self._ctx.optimizer
        rates = [group["lr"] for group in optimizer.param_groups]
        try:
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = rate * self._async_share() / (1 + staleness)
            optimizer.step()
        finally:
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = rate

    def _async_share(self) -> float:
        """Each of the n gradient sources (live workers + the server) steps with lr / n, so n
        asynchronous updates move the model as far as one synchronous averaged step."""
        return 1.0 / (1 + len(self._workers()))

    # ------------------------------------------------------------------ the end

    async def finish(self) -> None:
        """The server's last word: its final parameters and step to every connected worker, so
        asynchronous workers stop with it and every worker ends on the server's final model."""
        # No reply may follow the final frame: a worker keeps only the newest frame, and a later
        # reply (higher version, no "final") would hide it, leaving that worker to train on alone
        # after the server left. Stop the consumer; let replies in flight land (they are older
        # than the final frame), dropping any still stuck after FINAL_REPLY_GRACE.
        self._finishing = True
        if self._consumer is not None:
            self._consumer.cancel()
            # wait(), not await: neither swallows a cancel of finish() itself nor re-raises a
            # failure of the consumer here (close() reports nothing either way).
            await asyncio.wait([self._consumer])
        replies = list(self._replies)
        if replies:
            _, stuck = await asyncio.wait(replies, timeout=FINAL_REPLY_GRACE)
            for task in stuck:
                task.cancel()
        workers = [w for w in self._workers() if self._ctx.exchange.is_connected(w)]
        if workers:
            # A round of its own: a final frame with the round of the last reply to a worker would
            # be refused by that worker's transport as a duplicate.
            # The snapshot is taken on the compute thread, after any update still running there.
            self._version += 1
            final = await self._ctx.run_compute(functools.partial(self._parameters_frame, self._server_step, copy=True))
            await self._ctx.exchange.broadcast(dataclasses.replace(final, meta={**final.meta, "final": True}), workers)

    async def close(self) -> None:
        # The consumer even when it has ended: a failure of it is reported here.
        tasks = [t for t in (self._consumer, *self._tasks.cancel(), *self._replies.cancel()) if t is not None]
        for task in tasks:
            task.cancel()
        await reap(dict.fromkeys(tasks), expected=(TransportError,))
