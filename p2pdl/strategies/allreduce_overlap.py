"""Overlapped exact rounds (``strategy.overlap``): gradient buckets reduced from backward hooks.

The gradients live in flat buckets (:mod:`p2pdl.strategies.buckets`), and each bucket's
reduce-scatter and all-gather start as soon as backward has filled it, so the exchange runs while
the rest of backward does (as DDP's Reducer). The round is the strategy's: one group per attempt,
every bucket a sub-round of it (kinds ``rs<n>_<k>``/``ag<n>_<k>``), decided and applied only when
every bucket completed, redone over all buckets from the untouched local buffers otherwise. Each
element is averaged in rank order either way, so overlap changes no bit of the result.

Trade-off: the exact means run on a reduce thread of their own, because the compute thread is
busy with backward; on a machine with few cores that thread competes with backward.
:class:`OverlapRounds` owns the buckets, that thread and the step's launch; the group agreement,
the phases, the decision and the redo loop stay with the rounds that own it
(:class:`~p2pdl.strategies.allreduce_round.AllReduceRounds`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from p2pdl.core.groups import ABORT, Agreement, Group, wire_round
from p2pdl.strategies.base import RoundOutcome, StrategyContext
from p2pdl.strategies.buckets import GradientBuckets
from p2pdl.strategies.exact_rounds import ALL_GATHER, REDUCE_SCATTER, Attempt, Behind, GroupNotices, first_failure
from p2pdl.tasks import TaskOwner, reap
from p2pdl.wire import Frame, TensorSpec
from p2pdl.wire.frame import dtype_name

__all__ = ["ExactRounds", "Launch", "OverlapRounds"]

T = TypeVar("T")


class ExactRounds(Protocol):
    """What the overlapped attempt uses of the rounds that own it (``AllReduceRounds``, which
    imports this module): their agreement and notices, their phases over one vector, and their
    round loop."""

    ctx: StrategyContext
    agreement: Agreement
    notices: GroupNotices
    tasks: TaskOwner
    quorum: int
    strict: bool
    wire_dtype: torch.dtype
    ag_out: set[str]
    phase_seconds: dict[str, float]

    def participants(self) -> tuple[str, ...]: ...

    def gradients(self) -> list[torch.Tensor]: ...

    async def scatter_gather(
        self,
        round_index: int,
        group: Group,
        local: torch.Tensor,
        averaged: torch.Tensor,
        chunk: int,
        suffix: str,
        run: Callable[[Callable[[], Any]], Awaitable[Any]],
    ) -> tuple[Attempt | None, dict[str, Frame]]: ...

    async def settle_failure(self, round_index: int, group: Group, failed: Attempt, *, all_out: bool) -> Attempt: ...

    async def average(
        self,
        round_index: int,
        tensors: Callable[[], list[torch.Tensor]],
        launch: Launch | None = None,
        *,
        gradients: bool = False,
    ) -> RoundOutcome | None: ...


@dataclass(slots=True)
class Launch:
    """One step's overlapped round: which buckets are ready to send, and its first attempt."""

    step: int
    ready: list[asyncio.Event]
    backward_done: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.perf_counter)
    first: tuple[Group, asyncio.Task[Attempt]] | None = None
    declined: bool = False  # below quorum at the first bucket: the round starts after backward


class OverlapRounds:
    """The buckets of one all-reduce strategy, and the attempts that run while backward does."""

    def __init__(self, rounds: ExactRounds, buckets: GradientBuckets) -> None:
        self._rounds = rounds
        self.buckets = buckets
        self._reducer = ThreadPoolExecutor(1, thread_name_prefix=f"{rounds.ctx.name}-reduce")
        self._launch: Launch | None = None
        self._sizes: set[int] = set()  # group sizes used, so their mailbox rounds can be closed
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # taken at the first round instead

    def expected_tensors(self, bucket_kind: tuple[int, int] | None) -> Mapping[str, TensorSpec] | None:
        """The spec of a bucket frame (``bucket_kind``: its group size and bucket), or None."""
        if bucket_kind is None or bucket_kind[1] >= len(self.buckets.buckets):
            return None
        members, bucket = bucket_kind
        chunk = math.ceil(self.buckets.buckets[bucket].numel / members)
        return {"chunk": TensorSpec(dtype=dtype_name(self._rounds.wire_dtype), shape=(chunk,))}

    def arm(self, step: int) -> None:
        """On the compute thread, before the closure: bind the gradients to the buckets and arm
        the hooks that start each bucket's exchange as soon as backward has filled it."""
        loop = self._loop
        if loop is None:
            self.buckets.arm(lambda _number: None)  # no loop known yet: all buckets go after backward
            return

        def ready(number: int) -> None:
            loop.call_soon_threadsafe(self._bucket_ready, step, number)

        self.buckets.arm(ready)

    def close(self) -> None:
        self.buckets.close()
        self._reducer.shutdown(wait=False, cancel_futures=True)

    async def reduce(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the reduce thread (the compute thread may be running backward)."""
        return await asyncio.get_running_loop().run_in_executor(self._reducer, fn)

    async def attempt(self, round_index: int, group: Group, launch: Launch) -> Attempt:
        """One attempt over ``group``, bucket by bucket as each is ready; the first bucket that
        fails ends the attempt (the others are cancelled), and nothing is applied. Complete: every
        ``.grad`` is rebound to the averaged buffers."""
        buckets = self.buckets
        await self._rounds.notices.notify(round_index, group, "rs")
        if group.size == 1:
            await launch.backward_done.wait()
            buckets.bind_local()  # the mean of one contribution is itself
            return Attempt(True)
        wire = wire_round(round_index, group.epoch)
        self._sizes.add(group.size)
        self._rounds.ag_out.clear()
        exchanges = [
            self._rounds.tasks.spawn(self._exchange(number, round_index, group, launch), f"bucket{number}")
            for number in range(len(buckets.buckets))
        ]
        try:
            failed = await first_failure(exchanges, lambda outcome: None if outcome.complete else outcome)
        except Behind:
            if len(self._rounds.ag_out) < len(buckets.buckets):
                self._rounds.notices.abandon(round_index, group.epoch)
            raise
        finally:
            for task in exchanges:
                task.cancel()
            await reap(exchanges, expected=(Behind,))
            for kind in (
                f"{prefix}{n}_{number}"
                for n in self._sizes
                for prefix in (REDUCE_SCATTER, ALL_GATHER)
                for number in range(len(buckets.buckets))
            ):
                self._rounds.ctx.exchange.advance(kind, wire + 1)
        if failed is not None:
            all_out = len(self._rounds.ag_out) == len(buckets.buckets)
            return await self._rounds.settle_failure(round_index, group, failed, all_out=all_out)
        if not self._rounds.strict and await self._rounds.notices.decide(round_index, group, full=True) == ABORT:
            return Attempt(False, phase="decided")
        applied = time.perf_counter()
        buckets.bind_averaged()
        self._rounds.phase_seconds["copies"] += time.perf_counter() - applied
        return Attempt(True)

    async def _exchange(self, number: int, round_index: int, group: Group, launch: Launch) -> Attempt:
        """Reduce-scatter then all-gather of bucket ``number`` (as the plain attempt, over the
        bucket's buffers: chunk c = ceil(numel / n), kinds ``rs<n>_<k>`` / ``ag<n>_<k>``)."""
        bucket = self.buckets.buckets[number]
        members, me = group.members, self._rounds.ctx.name
        chunk = math.ceil(bucket.numel / group.size)

        def piece(buffer: torch.Tensor, index: int) -> torch.Tensor:
            return buffer[index * chunk : (index + 1) * chunk]

        await launch.ready[number].wait()
        if not launch.backward_done.is_set() and not await self.reduce(
            lambda: bool(torch.isfinite(bucket.local[: bucket.numel].sum()))
        ):
            # A non-finite gradient is refused by every receiver: wait until backward is over,
            # when the training loop has replaced it by its overflow sentinel.
            await launch.backward_done.wait()
        failed, gathered = await self._rounds.scatter_gather(
            round_index, group, bucket.local, bucket.averaged, chunk, f"_{number}", self.reduce
        )
        if failed is not None:
            return failed

        @torch.no_grad()
        def write_back() -> None:
            for index, p in enumerate(members):
                if p != me:
                    piece(bucket.averaged, index).copy_(gathered[p].tensors["chunk"])

        await self.reduce(write_back)
        return Attempt(True)

    def _launch_for(self, step: int) -> Launch:
        if self._launch is None or self._launch.step != step:
            self._launch = Launch(step=step, ready=[asyncio.Event() for _ in self.buckets.buckets])
        return self._launch

    def _bucket_ready(self, step: int, number: int) -> None:
        """On the event loop: bucket ``number`` of ``step`` is complete; the first one proposes the
        round's group and starts its first attempt (every later bucket joins that attempt)."""
        launch = self._launch_for(step)
        launch.ready[number].set()
        if launch.first is not None or launch.declined:
            return
        group = self._rounds.agreement.propose(step, self._rounds.participants(), None)
        if group.size < self._rounds.quorum:
            launch.declined = True  # the round's loop waits for the quorum after backward
            return
        task = self._rounds.tasks.spawn(self.attempt(step, group, launch), f"round{step}")
        launch.first = (group, task)

    async def run(self, step: int) -> RoundOutcome | None:
        """H = 1 with overlap: wait for the buckets' round (redo it from the local buffers if it failed)."""
        self._loop = asyncio.get_running_loop()
        launch = self._launch_for(step)
        self.buckets.disarm()  # unused parameters keep the zeros their bucket started with
        launch.backward_done.set()
        for ready in launch.ready:
            ready.set()
        try:
            return await self._rounds.average(step, self._rounds.gradients, launch)
        finally:
            self._launch = None
            if launch.first is not None and not launch.first[1].done():
                launch.first[1].cancel()
                await reap([launch.first[1]], expected=(Behind,))
