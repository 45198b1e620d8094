"""``ps``: a parameter server. One configured peer holds the model and the optimizer.

Workers push their gradient every step and pull the server's parameters, which replace their
own; the server also trains on its own shard. Two modes:

* ``sync`` (bulk-synchronous, K-of-N): each server round waits for ``ps_quorum`` workers (all
  live workers by default) or ``round_timeout``, averages their gradients with its own, takes one
  optimizer step and sends the new parameters to every connected worker. Gradients computed on
  older parameters are dropped. Consistency: with K = N every step is an exact synchronous
  average, like all-reduce through a hub; with K < N, stragglers' gradients are dropped.
* ``async``: the server applies each worker gradient as it arrives, with a staleness-aware
  learning rate lr / (n (1 + staleness)) for n gradient sources (Zhang et al. 2016), and answers
  that worker with the parameters it produced; its own gradient is one more such update
  (staleness 0). Consistency: asynchronous SGD; a worker's gradient may be computed on
  parameters that are ``staleness`` updates old. The run's clock is the server's: when it
  finishes it sends its final parameters (``final`` in the frame's meta) and workers stop on them.

With ``local_steps`` = H > 1 (sync mode only), the PS runs local SGD through the server: every
peer, the server included, takes its own optimizer steps, and every H steps the workers send
their parameters (``ps_avg``); the server averages them with its own (``ps_quorum`` of them, or
what arrived within ``round_timeout``) and sends the average back, which every worker loads
(keeping its optimizer state, as all-reduce local SGD does). Consistency: as local SGD; after
each sync every worker that took part holds the server's average.

Fault tolerance: a dead worker is just a missing contribution; the server never waits past the
round timeout. When the server is unreachable, workers keep training locally (their own
optimizer step) and resume pushing when it is back; a restarted server resumes from its own
checkpoint (``--resume``) and its parameters overwrite the workers' local drift on the next pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

from p2pdl.errors import FrameError, FrameSchemaError, TransportError
from p2pdl.strategies.base import MAX_ROUND_LEAD, RoundOutcome, StrategyContext, build_codec, parameter_specs
from p2pdl.wire import Frame, TensorSpec

log = logging.getLogger(__name__)

GRADIENT = "ps_grad"
PARAMETERS = "ps_params"
AVERAGE = "ps_avg"  # local SGD through the server: a worker's parameters every H steps
FINAL_REPLY_GRACE = 2.0  # seconds replies in flight get to land before the server's final frame


class ParameterServerStrategy:
    name = "ps"

    def __init__(self, ctx: StrategyContext) -> None:
        self._ctx = ctx
        self.server = ctx.config.server or (ctx.configured[0] if ctx.configured else ctx.name)
        self.is_server = ctx.name == self.server
        self._specs = parameter_specs(ctx.parameters)
        # Workers may compress their gradients (with error feedback); parameters go back in fp32.
        self._codec = build_codec(ctx, error_feedback=ctx.compression.error_feedback)
        # local_steps = H > 1 (sync mode): local SGD through the server; every H steps the server
        # averages its parameters with the workers' and sends the average back.
        self._periodic = ctx.config.local_steps > 1
        self._version = 0  # server: updates applied; worker: the server version its parameters are
        self._server_step = 0  # server: its own step; worker: the latest the server reported
        self._worker_step = 0  # server: the furthest step a worker has reported
        self._local_step = True
        self._consumer: asyncio.Task[None] | None = None
        self._replies: set[asyncio.Task[None]] = set()
        self._finishing = False  # server: the final frame is going out; no reply may follow it
        self.pushes = 0
        self.pulls = 0
        self.server_unreachable = 0
        self.applied = 0
        self.dropped_stale = 0
        self.undecodable = 0
        self.raw_bytes = 0
        self._staleness_sum = 0

    # ------------------------------------------------------------------ plumbing

    def _workers(self) -> tuple[str, ...]:
        return tuple(n for n in self._ctx.topology().names if n != self.server)

    def communication_peers(self) -> tuple[str, ...]:
        if self.is_server:
            return self._workers()
        return (self.server,) if self.server in self._ctx.topology().names else ()

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        if self.is_server and kind == GRADIENT and not self._periodic:
            return self._codec.wire_specs() if self._codec is not None else self._specs
        if self.is_server and kind == AVERAGE and self._periodic:
            return self._specs
        if not self.is_server and kind == PARAMETERS and sender == self.server:
            return self._specs
        raise FrameSchemaError(f"ps {'server' if self.is_server else 'worker'} does not take {kind!r} from {sender!r}")

    async def _send(self, to: str, frame: Frame) -> None:
        data = await self._ctx.exchange.encode(frame)
        await self._ctx.exchange.send_encoded(to, data)

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

    def _own_gradients(self) -> dict[str, torch.Tensor]:
        return {
            name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach() for name, p in self._ctx.parameters
        }

    def wants_local_step(self) -> bool:
        return self._periodic or self._local_step

    # ------------------------------------------------------------------ worker

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
        await ctx.exchange.wait_for_senders(PARAMETERS, (self.server,), 1, ctx.config.round_timeout)
        reply = ctx.exchange.take_latest(PARAMETERS, self.server)
        if reply is None:
            self.server_unreachable += 1
            return ctx.ledger.record(round_index, [self.server], started)
        await self._load(reply, push.step, final=reply.meta.get("final") is True, keep_state=keep_state)
        return ctx.ledger.record(round_index, [], started)

    async def _worker_average(self, step: int) -> RoundOutcome:
        """Local SGD through the server: send this worker's parameters, load the server's average."""
        ctx = self._ctx
        started = time.perf_counter()
        round_index = step // ctx.config.local_steps
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
                for frame in used:
                    p.add_(frame.tensors[name].to(device=p.device, dtype=p.dtype))
                p.div_(1 + len(used))

        await ctx.run_compute(average)
        self.applied += len(used)
        self._version += 1
        if workers:
            await ctx.exchange.broadcast(self._parameters_frame(step), workers)
        missing = [w for w in self._workers() if w not in {f.sender for f in used}]
        return ctx.ledger.record(step // ctx.config.local_steps, missing, started)

    async def _load(self, reply: Frame, step: int, *, final: bool = False, keep_state: bool = False) -> None:
        """Replace this worker's parameters with the server's; the node then skips its local step.

        The server's step is believed at most MAX_ROUND_LEAD ahead, except in its final frame.
        """
        ctx = self._ctx

        @torch.no_grad()
        def load() -> None:
            for name, p in ctx.parameters:
                p.copy_(reply.tensors[name])
            # The worker's own optimizer state (momentum) belongs to the parameters it just dropped;
            # a local step during a later outage starts afresh from the server's (measured: a
            # stale momentum buffer took a worker from 0.93 to 0.78 in a handful of local steps).
            if not keep_state:
                ctx.optimizer.state.clear()

        await ctx.run_compute(load)
        self._version = reply.round
        reported = reply.meta.get("server_step")
        if isinstance(reported, int) and not isinstance(reported, bool):
            self._server_step = max(self._server_step, reported if final else min(reported, step + MAX_ROUND_LEAD))
        self._local_step = False  # the server's step replaced ours
        self.pulls += 1

    # ------------------------------------------------------------------ server

    async def _gather_quorum(self, kind: str) -> tuple[list[str], list[Frame]]:
        """Wait for ``ps_quorum`` frames of ``kind`` (all connected workers when 0) or the round
        timeout; return the connected workers and the frames that are not older than this
        server's version (older ones are counted in ``dropped_stale``)."""
        ctx = self._ctx
        workers = [w for w in self._workers() if ctx.exchange.is_connected(w)]
        quorum = min(ctx.config.ps_quorum or len(workers), len(workers))
        ready = await ctx.exchange.wait_for_senders(kind, workers, quorum, ctx.config.round_timeout)
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
            count = 1 + len(dense)
            for name, p in ctx.parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                for gradients in dense:
                    p.grad.add_(gradients[name].to(p.grad.device))
                p.grad.div_(count)

        await ctx.run_compute(average_into_grads)
        self.applied += len(used)
        missing = [w for w in self._workers() if w not in {f.sender for f in used}]
        return ctx.ledger.record(step, missing, started)

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
                task = asyncio.ensure_future(self._reply(worker, reply))
                self._replies.add(task)
                task.add_done_callback(self._replies.discard)

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
        gradient stepped at the full lr moves the model n times too far (measured: async PS
        collapsed to chance with momentum 0.9 until the server's own steps were changed to this).
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

    # ------------------------------------------------------------------ the Strategy protocol

    def _async_share(self) -> float:
        """Async mode: each of the n gradient sources (live workers + the server) steps with lr / n,
        so n asynchronous updates move the model as far as one synchronous averaged step; applying
        every gradient at the full lr (with momentum 0.9) diverged here."""
        return 1.0 / (1 + len(self._workers()))

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        if self._periodic:
            if self.is_server:
                self._server_step = step
            return None  # every step is local; parameters are averaged after the H-th
        if not self.is_server:
            return await self._worker_round(step)
        self._server_step = step
        self._local_step = True
        if self._ctx.config.ps_mode == "async":
            if self._consumer is None or self._consumer.done():
                self._consumer = asyncio.ensure_future(self._consume_async())
            # The server's own gradient is one more asynchronous update (staleness 0), at the same
            # scaled learning rate as the workers'; the node's plain optimizer step is skipped.
            await self._ctx.run_compute(functools.partial(self._async_step, 0))
            self._local_step = False
            return None
        return await self._server_sync_round(step)

    async def after_optimizer_step(self, step: int) -> RoundOutcome | None:
        if self._periodic:
            if (step + 1) % self._ctx.config.local_steps != 0:
                return None
            return await (self._server_average(step) if self.is_server else self._worker_average(step))
        if not self.is_server:
            return None
        self._version += 1
        if self._ctx.config.ps_mode == "sync":
            workers = [w for w in self._workers() if self._ctx.exchange.is_connected(w)]
            if workers:
                await self._ctx.exchange.broadcast(self._parameters_frame(step), workers)
        return None

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "round": self._version,
            "role": "server" if self.is_server else "worker",
            "server": self.server,
            "mode": self._ctx.config.ps_mode,
            "local_steps": self._ctx.config.local_steps,
            "version": self._version,
            "pushes": self.pushes,
            "pulls": self.pulls,
            "server_unreachable": self.server_unreachable,
            "applied": self.applied,
            "dropped_stale": self.dropped_stale,
            "undecodable": self.undecodable,
            "mean_staleness": self._staleness_sum / self.applied if self.applied and self.is_server else None,
        }

    def swarm_step(self) -> int | None:
        """The run's shared clock. Workers follow the server's step (an async server runs ahead of
        its workers; its final frame ends their run). The server follows the furthest worker: after
        a crash and ``--resume`` it is behind workers that trained on alone, and it stops with them
        rather than train the rest by itself."""
        return self._worker_step if self.is_server else self._server_step

    async def finish(self) -> None:
        """The server's last word: its final parameters and step to every connected worker, so
        asynchronous workers stop with it and every worker ends on the server's final model."""
        if not self.is_server:
            return
        # No reply may follow the final frame: a worker keeps only the newest frame, and a later
        # reply (higher version, no "final") would hide it; that worker then trained on alone after
        # the server left (seen: 0.64). Stop the consumer; let replies in flight land (they are
        # older than the final frame), dropping any still stuck after FINAL_REPLY_GRACE.
        self._finishing = True
        if self._consumer is not None:
            self._consumer.cancel()
            # wait(), not await: neither swallows a cancel of finish() itself nor re-raises a
            # failure of the consumer here (close() reports nothing either way).
            await asyncio.wait([self._consumer])
        if self._replies:
            _, stuck = await asyncio.wait(set(self._replies), timeout=FINAL_REPLY_GRACE)
            for task in stuck:
                task.cancel()
        workers = [w for w in self._workers() if self._ctx.exchange.is_connected(w)]
        if workers:
            # A round of its own: with the round of the last reply to a worker, the worker's
            # transport refused it as a duplicate (seen: that worker then trained on alone).
            # The snapshot is taken on the compute thread, after any update still running there.
            self._version += 1
            final = await self._ctx.run_compute(functools.partial(self._parameters_frame, self._server_step, copy=True))
            await self._ctx.exchange.broadcast(dataclasses.replace(final, meta={**final.meta, "final": True}), workers)

    async def close(self) -> None:
        tasks = [t for t in (self._consumer, *self._replies) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                await task
