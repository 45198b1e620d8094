"""The exact round of all-reduce: one round's attempts over agreed groups, and the loop that redoes them.

:class:`AllReduceRounds` runs each round of :class:`~p2pdl.strategies.allreduce.AllReduceStrategy`
(PROTOCOL.md §11.3-§11.6): it proposes or adopts a group, runs an attempt over it (a
reduce-scatter, the exact mean of this peer's chunk in rank order, an all-gather), has the members
decide it (:class:`~p2pdl.strategies.exact_rounds.GroupNotices`) and applies it; a failed attempt
is redone over a new group from the untouched input, the loop waits for the group to re-form below
quorum, and a peer found behind hands over to the strategy's catch-up. With
``strategy.pipeline`` > 1 an attempt runs over pieces of the flat vector
(:mod:`p2pdl.strategies.flat_vector`) at once; with ``strategy.overlap`` the attempts over the
gradient buckets are :class:`~p2pdl.strategies.allreduce_overlap.OverlapRounds`', which this class
owns and whose redo loop it runs.

Trade-off: the rounds own their tensors, tasks and counters, but not the agreement, the notices
or the state transfer, which the strategy keeps for ``served_state``, ``state_replaced`` and its
``/status``: it hands them in, with the adaptive deadline and the catch-up as callables, so this
module imports nothing above it at the price of a wide constructor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch

from p2pdl.core.groups import ABORT, Agreement, Group, group_meta, wire_round
from p2pdl.core.mixing import exact_mean
from p2pdl.errors import AllReduceIncompleteError, QuorumLostError
from p2pdl.faults import at as inject_fault
from p2pdl.strategies.allreduce_compressed import Send
from p2pdl.strategies.allreduce_overlap import Launch, OverlapRounds
from p2pdl.strategies.base import RoundOutcome, StrategyContext
from p2pdl.strategies.buckets import GradientBuckets, piece_layout
from p2pdl.strategies.exact_rounds import (
    ALL_GATHER,
    LOOK_EVERY,
    REDUCE_SCATTER,
    Attempt,
    Behind,
    GroupNotices,
    first_failure,
)
from p2pdl.strategies.flat_vector import FlatVector
from p2pdl.tasks import TaskOwner, reap
from p2pdl.wire import Frame

__all__ = ["AllReduceRounds"]

log = logging.getLogger(__name__)


class AllReduceRounds:
    """The exact rounds of one all-reduce strategy over the flat vector or (overlap) the buckets.

    The members are in the agreed (rank) order; rank r owns chunk r of the vector. An attempt is
    applied only when every member's contributions carried the same group and the members
    decided it.
    """

    def __init__(
        self,
        ctx: StrategyContext,
        agreement: Agreement,
        notices: GroupNotices,
        buffers: FlatVector | GradientBuckets,
        *,
        total: int,
        wire_dtype: torch.dtype,
        quorum: int,
        strict: bool,
        quorum_timeout: float,
        pipeline: int,
        phase_seconds: dict[str, float],
        send: Send,
        round_deadline: Callable[[], float],
        observe_round: Callable[[float], None],
        catch_up: Callable[[Sequence[str]], Awaitable[int]],
    ) -> None:
        """``buffers``: where the round's input lives, the flat vector or (overlap) the gradient
        buckets. ``total``: elements of the flat vector. ``strict``: ``strategy.on_failure =
        "strict"``. ``phase_seconds``: the strategy's counters, which the copies add to.
        ``send``: the strategy's encode-once sender. ``round_deadline`` / ``observe_round``: the
        adaptive deadline of each phase's wait, and what feeds it. ``catch_up(donors)``: load a
        member's state; returns the step it holds."""
        self.ctx = ctx
        self.agreement = agreement
        self.notices = notices
        self.quorum = quorum
        self.strict = strict
        self.wire_dtype = wire_dtype
        self.phase_seconds = phase_seconds
        self._total = total
        self._quorum_timeout = quorum_timeout
        self._pipeline = pipeline
        self._send = send
        self._round_deadline = round_deadline
        self._observe_round = observe_round
        self._catch_up = catch_up
        self.tasks = TaskOwner(f"{ctx.name}:allreduce")
        self._sizes: set[int] = set()  # data kinds used, so their mailbox rounds can be closed
        # Which of this attempt's all-gather chunks went out (suffixes; "" without buckets): once
        # all did, the attempt ends only by a decision (PROTOCOL.md §11.4).
        self.ag_out: set[str] = set()
        self.pieces_applied = 0  # sub-rounds of applied attempts (one per attempt without pieces)
        self.flat: FlatVector | None = None
        self.overlap: OverlapRounds | None = None
        if isinstance(buffers, GradientBuckets):
            self.overlap = OverlapRounds(self, buffers)
        else:
            self.flat = buffers

    def participants(self) -> tuple[str, ...]:
        return self.ctx.topology().names

    def layout(self, size: int) -> list[tuple[int, int, int]]:
        """(start, length, chunk) of each piece a group of ``size`` reduces (``strategy.pipeline``)."""
        return piece_layout(self._total, self._pipeline, size)

    def piece_kinds(self, size: int) -> list[str]:
        """The data kinds' suffixes of a group of ``size``: "" for the whole vector, "_k" per piece."""
        if self._pipeline == 1:
            return [""]
        return [f"_{k}" for k in range(len(self.layout(size)))]

    def gradients(self) -> list[torch.Tensor]:
        grads = []
        for _, p in self.ctx.parameters:
            if p.grad is None:  # an unused parameter contributes zeros, as DDP does
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        return grads

    def before_backward(self, step: int) -> None:
        """On the compute thread, before the closure: bind the gradients to the flat vector (the
        plain path) or to the buckets, arming the hooks that start each bucket's exchange as soon
        as backward has filled it (overlap)."""
        if self.overlap is not None:
            self.overlap.arm(step)
        elif self.flat is not None:
            self.flat.bind_views()  # views only on the H = 1 path (the strategy asks for them only then)

    async def close(self, timeout: float) -> None:
        await self.tasks.cancel_all(timeout)
        if self.overlap is not None:
            self.overlap.close()

    # ------------------------------------------------------------------ one attempt

    async def _gather(
        self, kind: str, wire: int, others: Sequence[str], round_index: int, group: Group, *, act: bool
    ) -> tuple[dict[str, Frame], Group | None]:
        """The members' frames of one phase, until all came, the deadline passed, a pending member
        is known lost (:meth:`GroupNotices.lost`) or (``act``) a higher proposal that includes this peer appeared."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + self._round_deadline()
        encoded = group.encoded()
        got: dict[str, Frame] = {}
        down_since: dict[str, float] = {}
        while True:
            pending = [n for n in others if n not in got]
            now = loop.time()
            lost, reason = self.notices.lost(pending, round_index, group, down_since, now)
            if not pending or now >= deadline or lost:
                if not lost:  # every frame came, or the deadline passed: a measured phase wait
                    self._observe_round(now - began)
                if pending:
                    self.notices.attempt_endings[reason.partition(":")[0] or "deadline"] += 1
                    log.info(
                        "%s: round %d epoch %d %s: no frame from %s after %.2f s (%s)",
                        self.ctx.name,
                        round_index,
                        group.epoch,
                        kind,
                        ",".join(pending),
                        now - began,
                        reason or "deadline",
                    )
                return got, None
            arrived = await self.ctx.exchange.collect(kind, wire, pending, min(LOOK_EVERY, deadline - now))
            for sender, frame in arrived.items():
                # Same wire round means same epoch; a different member list (a conflicting
                # proposal of the same epoch) makes the contribution unusable: it counts as missing.
                if frame.meta.get("group") == encoded and frame.step == round_index:
                    got[sender] = frame
            adopt = self.notices.read(round_index, group, act=act)
            if adopt is not None:
                self.notices.attempt_endings["adopted"] += 1
                log.info(
                    "%s: round %d epoch %d %s: adopting epoch %d %s after %.2f s",
                    self.ctx.name,
                    round_index,
                    group.epoch,
                    kind,
                    adopt.epoch,
                    adopt.encoded(),
                    loop.time() - began,
                )
                return got, adopt

    async def scatter_gather(
        self,
        round_index: int,
        group: Group,
        local: torch.Tensor,
        averaged: torch.Tensor,
        chunk: int,
        suffix: str,
        run: Callable[[Callable[[], Any]], Awaitable[Any]],
    ) -> tuple[Attempt | None, dict[str, Frame]]:
        """Steps 3 and 5 of PROTOCOL.md §11.3 over one vector: send chunk r of ``local`` to rank r
        (kind ``rs<n><suffix>``), average the chunk this peer owns in rank order into its chunk of
        ``averaged`` (on ``run``'s thread) and send it to every member (``ag<n><suffix>``).
        Returns the failed attempt, or None and the members' all-gather frames."""
        members, me = group.members, self.ctx.name
        size, rank = group.size, members.index(me)
        others = tuple(p for p in members if p != me)
        wire = wire_round(round_index, group.epoch)
        meta = group_meta(round_index, group, self.agreement.prev, "rs")
        rs_kind, ag_kind = f"{REDUCE_SCATTER}{size}{suffix}", f"{ALL_GATHER}{size}{suffix}"

        def piece(buffer: torch.Tensor, index: int) -> torch.Tensor:
            return buffer[index * chunk : (index + 1) * chunk]

        scatter = {
            p: Frame(
                kind=rs_kind, sender=me, round=wire, step=round_index, meta=meta, tensors={"chunk": piece(local, r)}
            )
            for r, p in enumerate(members)
            if p != me
        }
        await self._send(scatter)
        if hold := inject_fault("rs", round_index):  # P2PDL_FAULT: die with the chunks out
            await asyncio.sleep(hold)  # hang: heartbeats go on, this peer's frames do not
        scattered, adopt = await self._gather(rs_kind, wire, others, round_index, group, act=True)
        if adopt is not None:
            return Attempt(False, phase="rs", adopt=adopt), {}
        missing = tuple(p for p in others if p not in scattered)
        if missing:
            return Attempt(False, missing, "rs"), {}
        in_rank_order = [piece(local, rank) if p == me else scattered[p].tensors["chunk"] for p in members]
        own = piece(averaged, rank)
        if hold := inject_fault("mean", round_index):  # P2PDL_FAULT: freeze with every rs chunk in hand
            await asyncio.sleep(hold)  # hang: heartbeats go on, this peer's frames do not
        await run(lambda: exact_mean(in_rank_order, own))
        gather_frame = Frame(kind=ag_kind, sender=me, round=wire, step=round_index, meta=meta, tensors={"chunk": own})
        # From here on this peer's average is out: some members may be full, so this attempt ends
        # only by a decision (PROTOCOL.md §11.4).
        self.ag_out.add(suffix)
        await self._send(dict.fromkeys(others, gather_frame))
        if hold := inject_fault("ag", round_index):
            await asyncio.sleep(hold)  # hang: heartbeats go on, this peer's frames do not
        gathered, _ = await self._gather(ag_kind, wire, others, round_index, group, act=False)
        missing = tuple(p for p in others if p not in gathered)
        if missing:
            return Attempt(False, missing, "ag"), {}
        return None, gathered

    async def settle_failure(self, round_index: int, group: Group, failed: Attempt, *, all_out: bool) -> Attempt:
        """An attempt that lacked a frame. Before this peer's all-gather chunks all went out, no
        member can be full: the attempt is aborted here and now. After, the members decide it
        (a COMMIT raises Behind: this peer downloads the result)."""
        if all_out and not self.strict:
            await self.notices.decide(round_index, group, full=False)  # only ABORT returns
        else:
            self.notices.abandon(round_index, group.epoch)
        return failed

    async def _attempt(self, round_index: int, group: Group, tensors: Callable[[], list[torch.Tensor]]) -> Attempt:
        """One attempt of ``round_index`` over ``group``; the tensors change only if it completes.

        With ``strategy.pipeline`` = P > 1 the flat vector is reduced in pieces (:func:`piece_layout`),
        each a sub-round of this attempt run at once with the others: a piece's exact mean runs as
        soon as its chunks are in and its all-gather goes out while later pieces are still in
        flight. The first piece that fails ends the attempt (the others are cancelled). Each piece
        assembles its result in the averaged buffer as soon as its all-gather is in (the flat
        vector, this peer's contribution, stays untouched for a redo); it is applied only when
        every piece completed and the attempt is decided: the gradient views are rebound to the
        averaged buffer and the two buffers swap roles (no copy), or the parameters are written
        from it. Each element is averaged in rank order either way: the bits do not depend on P.
        """
        ctx = self.ctx
        members, me = group.members, ctx.name
        size = group.size
        others = tuple(p for p in members if p != me)
        wire = wire_round(round_index, group.epoch)
        await self.notices.notify(round_index, group, "rs")
        if not others:
            return Attempt(True)
        flat = self.flat
        assert flat is not None  # without overlap the round's input is the flat vector
        layout = self.layout(size)
        suffixes = self.piece_kinds(size)
        self._sizes.add(size)
        self.ag_out.clear()

        async def piece(start: int, length: int, chunk: int, suffix: str) -> Attempt | None:
            result = flat.averaged  # this attempt's: the buffers swap only after a complete one
            failed, gathered = await self.scatter_gather(
                round_index, group, flat.local[start:], result[start:], chunk, suffix, ctx.run_compute
            )
            if failed is not None:
                return failed

            @torch.no_grad()
            def assemble() -> float:  # the members' averaged chunks next to this peer's own
                began = time.perf_counter()
                for index, member in enumerate(members):
                    count = max(0, min(chunk, length - index * chunk))
                    if member != me and count:
                        begin = start + index * chunk
                        result[begin : begin + count].copy_(gathered[member].tensors["chunk"][:count])
                return time.perf_counter() - began

            # One compute thread runs every job in order: a job of a cancelled attempt still ends
            # before any job of the next one, so it cannot write into a buffer applied later.
            self.phase_seconds["copies"] += await ctx.run_compute(assemble)
            return None

        pieces = [
            self.tasks.spawn(piece(start, length, chunk, suffix), f"round{round_index}{suffix}")
            for (start, length, chunk), suffix in zip(layout, suffixes, strict=True)
        ]
        try:
            try:
                failed = await first_failure(pieces, lambda outcome: outcome)
            except Behind:
                if len(self.ag_out) < len(pieces):
                    self.notices.abandon(round_index, group.epoch)
                raise
            finally:
                # The first failure ends every piece (PROTOCOL.md §6), before the decision below.
                for task in pieces:
                    if not task.done():
                        task.cancel()
                await reap(pieces, expected=(Behind,))
            if failed is not None:
                return await self.settle_failure(round_index, group, failed, all_out=len(self.ag_out) == len(pieces))
            if not self.strict and await self.notices.decide(round_index, group, full=True) == ABORT:
                return Attempt(False, phase="decided")
            applying = time.perf_counter()
            if flat.grads_are_views:  # the gradients are views of the flat vector: rebind, no copy
                flat.swap()
            else:
                await ctx.run_compute(lambda: flat.write_back(tensors()))
            self.phase_seconds["copies"] += time.perf_counter() - applying
            self.pieces_applied += len(pieces)
            return Attempt(True)
        finally:
            # Close this attempt's slots (and those of older attempts of any group size).
            for kind in (
                f"{prefix}{n}{suffix}"
                for n in self._sizes
                for prefix in (REDUCE_SCATTER, ALL_GATHER)
                for suffix in self.piece_kinds(n)
            ):
                ctx.exchange.advance(kind, wire + 1)

    # ------------------------------------------------------------------ the round

    async def average(
        self,
        round_index: int,
        tensors: Callable[[], list[torch.Tensor]],
        launch: Launch | None = None,
        *,
        gradients: bool = False,
    ) -> RoundOutcome | None:
        """Replace ``tensors()`` by their exact mean over an agreed group, in place; None when this
        peer found itself behind and loaded a member's state instead.

        With ``launch`` (overlap) the gradients are already in the buckets, and the first attempt
        may be running since the first bucket was ready; a redo runs over all buckets at once.
        """
        ctx = self.ctx
        started = time.perf_counter() if launch is None else launch.started
        strict = self.strict
        if launch is None:
            flat = self.flat
            assert flat is not None  # without overlap (no launch) the round's input is the flat vector
            if not (gradients and flat.views_bound()):
                await ctx.run_compute(lambda: flat.into_flat(tensors(), gradients=gradients))
                self.phase_seconds["copies"] += time.perf_counter() - started
        first = launch.first if launch is not None else None
        failed: Group | None = None
        adopt: Group | None = None
        stalled_since: float | None = None
        waited = False
        waiting_with: Group | None = None  # the group last waited with below quorum (logged once)
        while True:
            live = self.participants()
            if first is not None:
                group = first[0]  # proposed (above quorum) when the first bucket was ready
            else:
                group = adopt if adopt is not None else self.agreement.propose(round_index, live, failed, waited=waited)
            adopt, waited = None, False
            try:
                if first is not None:
                    running, first = first[1], None
                    outcome = await running
                elif group.size < self.quorum:
                    if strict:
                        missing = self.agreement.missing_from(group)
                        ctx.ledger.record(round_index, missing, started)
                        raise AllReduceIncompleteError(round_index, missing)
                    if group != waiting_with:
                        log.info("%s: round %d: below quorum with %s", ctx.name, round_index, group.encoded())
                        waiting_with = group
                    stalled_since = stalled_since if stalled_since is not None else time.monotonic()
                    adopt = await self.notices.wait_for_quorum(round_index, group, stalled_since)
                    failed, waited = group, True
                    continue
                elif launch is not None:
                    assert self.overlap is not None
                    outcome = await self.overlap.attempt(round_index, group, launch)
                else:
                    outcome = await self._attempt(round_index, group, tensors)
            except Behind as behind:
                if strict or ctx.resync is None:
                    raise AllReduceIncompleteError(round_index, behind.donors) from None
                log.info("%s: round %d: behind %s, downloading state", ctx.name, round_index, ",".join(behind.donors))
                # Tell the members this peer has left the round: none waits for its frames or
                # proposes it until it announces again from the round it joins (PROTOCOL.md §11.5).
                await self.notices.notify(round_index, group, "sync")
                resyncing = time.perf_counter()
                adopted = await self._catch_up(behind.donors)
                log.info(
                    "%s: round %d: resynced to step %s in %.2f s",
                    ctx.name,
                    round_index,
                    adopted,
                    time.perf_counter() - resyncing,
                )
                return None
            if outcome.complete:
                self.agreement.applied(group)
                self.notices.record_applied(round_index, group.epoch)
                ctx.ledger.record_group(group.size)
                if stalled_since is not None:
                    log.info(
                        "%s: round %d applied over epoch %d (%d members) %.2f s after its first failure",
                        ctx.name,
                        round_index,
                        group.epoch,
                        group.size,
                        time.monotonic() - stalled_since,
                    )
                return ctx.ledger.record(round_index, [], started)
            if strict:
                ctx.ledger.record(round_index, outcome.missing, started)
                raise AllReduceIncompleteError(round_index, outcome.missing)
            ctx.ledger.record_redo(round_index, group.epoch, outcome.phase, outcome.missing)
            self.agreement.missed(outcome.missing)
            adopt, failed = outcome.adopt, group
            stalled_since = stalled_since if stalled_since is not None else time.monotonic()
            stalled = time.monotonic() - stalled_since
            if stalled >= self._quorum_timeout:
                raise QuorumLostError(round_index, list(outcome.missing), group.size, self.quorum, stalled)
