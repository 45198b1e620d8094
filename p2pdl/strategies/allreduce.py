"""``allreduce``: exact data-parallel averaging over an agreed group of live members.

With H = 1 it averages gradients before the optimizer step, the same result as DDP; with H > 1
(local SGD) it averages the parameters every H steps, and with ``strategy.outer = "diloco"`` each
such average feeds the outer optimizer (:class:`~p2pdl.strategies.base.StrategyBase` runs it).
It runs a reduce-scatter then an all-gather (each peer owns 1/n of the flat vector), so each peer
sends 2(n-1)/n of it, like a ring, but in two latency steps. Chunks are summed in rank order, so
every peer ends with bit-identical values; it never falls back to local values.

Every round averages over a *group* (epoch + ordered members, :mod:`p2pdl.core.groups`) that each
frame names. When a member fails mid-round (known lost from its closed link, the membership, its
resync notice or another member giving up on it; else at the round's deadline), the survivors abort
without touching a parameter, agree on a new group and redo the same round (``strategy.on_failure =
"redo"``; with ``"strict"`` a missing contribution raises
:class:`~p2pdl.errors.AllReduceIncompleteError`). A round needs ``strategy.min_peers`` members (a
strict majority of the configured peers by default); below it the peer waits for the group to
re-form, then gives up with :class:`~p2pdl.errors.QuorumLostError`. A peer that finds its group
ahead of it downloads a member's state and joins the round it reaches, without the group waiting
for it. The protocol and its failure cases: docs/PROTOCOL.md §11. The attempts, their phases and
the redo loop are :class:`~p2pdl.strategies.allreduce_round.AllReduceRounds`'; this class keeps the
agreement, the resync and the state it serves, and chooses how the gradients reach the round.

Trade-offs: chunks are padded to equal size ceil(total / n), so a receiver checks a frame's shape
from its kind alone (``rs<n>``/``ag<n>``); with H > 1 a copy of the parameters of the last sync is
kept, so a peer can serve a resumable state between syncs without stopping.

Without overlap the gradients are views of one flat vector that backward accumulates into (as with
DDP's ``gradient_as_bucket_view``), so a round copies nothing in
(:mod:`p2pdl.strategies.flat_vector`). With ``strategy.overlap`` (H = 1, uncompressed, float32
parameters on the CPU) they live in flat buckets instead, and each bucket's reduce-scatter and
all-gather start from a backward hook as soon as backward has filled it
(:mod:`p2pdl.strategies.allreduce_overlap`). The round is the same: one group per attempt, every
bucket a sub-round of it, applied only when every bucket completed. Each element is averaged in
rank order either way, so overlap changes no bit of the result.

With ``[compression]`` on, gradients go through a compressed reduce-scatter that re-compresses
the partial sums instead (:mod:`p2pdl.strategies.allreduce_compressed`): every peer decodes the
same bytes, so the result is still identical everywhere, though no longer the exact mean of the
uncompressed gradients. PowerSGD instead averages its low-rank factors with two fp32
reduce-scatters (:mod:`p2pdl.strategies.allreduce_powersgd`). Both paths are strict: they run
outside the group agreement, so a failed round is not redone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pdl.core.groups import Agreement, donor_group, quorum
from p2pdl.errors import FrameSchemaError, TransportError
from p2pdl.strategies.allreduce_compressed import CompressedReduceScatter
from p2pdl.strategies.allreduce_powersgd import PowerSGDRounds
from p2pdl.strategies.allreduce_round import AllReduceRounds
from p2pdl.strategies.base import (
    RoundConfig,
    RoundOutcome,
    ServedState,
    StrategyBase,
    StrategyContext,
    wire_dtype,
)
from p2pdl.strategies.buckets import PADDING, GradientBuckets
from p2pdl.strategies.exact_rounds import ALL_GATHER, GROUP_NOTICE, REDUCE_SCATTER, GroupNotices
from p2pdl.strategies.flat_vector import FlatVector
from p2pdl.wire import Frame, TensorSpec
from p2pdl.wire.frame import dtype_name

MAX_GROUP = PADDING  # the most members a group may have (also the zero padding of the flat buffers)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class AllReduceConfig(RoundConfig):
    """The ``[strategy]`` keys all-reduce reads: H = 1 averages gradients, H > 1 parameters."""

    on_failure: str  # "redo" | "strict"
    min_peers: int  # 0: a strict majority of the configured peers
    quorum_timeout: float
    overlap: bool  # H = 1: reduce gradient buckets from backward hooks while backward runs
    bucket_mb: float  # MiB of gradients per bucket (the first holds at most 1 MiB)
    pipeline: int  # without overlap: pieces of the flat vector reduced at once (1: the whole vector)


def _number(digits: str) -> int | None:
    return int(digits) if digits.isdigit() and digits == str(int(digits)) else None


def _group_size(kind: str, prefix: str) -> int | None:
    size = _number(kind[len(prefix) :]) if kind.startswith(prefix) else None
    return size if size is not None and 2 <= size <= MAX_GROUP else None


def _bucket_kind(kind: str, prefix: str) -> tuple[int, int] | None:
    """(group size, bucket) of an overlapped data kind ``rs<n>_<k>`` / ``ag<n>_<k>``."""
    head, _, tail = kind.partition("_")
    size, bucket = _group_size(head, prefix), _number(tail)
    return (size, bucket) if size is not None and bucket is not None else None


class AllReduceStrategy(StrategyBase):
    """Exact averaging: reduce-scatter + all-gather over the agreed group of live members.

    The members are in the agreed (rank) order; rank r owns chunk r of the flat vector. A round
    is applied only when every member's contributions carried the same group.
    """

    name = "allreduce"

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.config = AllReduceConfig.from_table(ctx.config)
        self._total = sum(p.numel() for _, p in ctx.parameters)
        self._wire_dtype = wire_dtype(ctx.parameters)
        # PowerSGD averages its factors (allreduce_powersgd.py); any other compressor runs the
        # compressed reduce-scatter (allreduce_compressed.py).
        kind = ctx.compression.kind
        self._powersgd: PowerSGDRounds | None = None
        if kind == "powersgd":
            self._powersgd = PowerSGDRounds(
                ctx,
                ctx.compression,
                participants=self._participants,
                send=self._send,
                round_timeout=self.config.round_timeout,
            )
        self._compressed: CompressedReduceScatter | None = None
        if kind not in ("none", "powersgd"):
            self._compressed = CompressedReduceScatter(
                ctx,
                ctx.compression,
                participants=self._participants,
                send=self._send,
                round_timeout=self.config.round_timeout,
            )
        self.raw_bytes = 0
        self.payload_bytes = 0
        self._quorum = quorum(len(ctx.configured), self.config.min_peers)
        initial = [n for n in ctx.configured if n in ctx.topology().names]
        self._agreement = Agreement(ctx.name, ctx.configured, initial)  # PROTOCOL.md §11.3
        self._adopted: int | None = None  # the step a resync loaded, for the node
        self._skip_local_step = False
        self._consistent = asyncio.Event()  # clear between an applied gradient round and its step
        self._consistent.set()
        self._completed_round = -1  # H > 1: the last parameter round applied, and its parameters
        self._joined_round = -1  # the round the last resync joined at
        self._round_params: list[torch.Tensor] | None = None
        if self.config.local_steps > 1:
            self._round_params = [p.detach().clone() for _, p in ctx.parameters]
        self._notices = GroupNotices(
            ctx,
            self._agreement,
            quorum=self._quorum,
            round_deadline=self.round_deadline,
            quorum_timeout=self.config.quorum_timeout,
        )
        # H = 1: seconds per phase of the step, summed (status()["phase_seconds"]): forward and
        # backward (from before_backward to reduce_gradients), the wait in reduce_gradients (the
        # whole exchange without overlap, the buckets' tail with it), and the copies into and out
        # of the flat vector (flatten, the members' chunks into the averaged buffer, the rebinding
        # of the gradients; with overlap, the rebinding only). Copies are timed on the compute
        # thread, so pieces whose copies queue behind each other are not counted twice.
        self.phase_seconds = {"forward_backward": 0.0, "reduce": 0.0, "copies": 0.0}
        self._backward_started: float | None = None
        # The exact rounds (allreduce_round.py), over the flat vector or the buckets.
        self._rounds = AllReduceRounds(
            ctx,
            self._agreement,
            self._notices,
            self._gradient_buffers(),
            total=self._total,
            wire_dtype=self._wire_dtype,
            quorum=self._quorum,
            strict=self._strict,
            quorum_timeout=self.config.quorum_timeout,
            pipeline=self.config.pipeline,
            phase_seconds=self.phase_seconds,
            send=self._send,
            round_deadline=self.round_deadline,
            observe_round=self.observe_round,
            catch_up=self._catch_up,
        )

    def _gradient_buffers(self) -> FlatVector | GradientBuckets:
        """Where a round's input lives. With overlap (H = 1, uncompressed, float32 parameters on
        the CPU) the gradients live in buckets reduced while backward runs (allreduce_overlap.py).
        Otherwise in the flat vector (flat_vector.py), whose views they are on the plain path
        (H = 1, uncompressed, parameters of the wire dtype on the CPU), as DDP's
        gradient_as_bucket_view makes them: a gradient round then copies nothing in or out."""
        params = [p for _, p in self._ctx.parameters]
        if self.config.overlap and self.config.local_steps == 1 and self._powersgd is None:
            if params and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params):
                return GradientBuckets(params, self.config.bucket_mb)
            log.info(
                "strategy.overlap: parameters are not all float32 on the CPU; gradients are averaged after backward"
            )
        uncompressed = self._powersgd is None and self._compressed is None
        views = self.config.local_steps == 1 and uncompressed
        return FlatVector(params, self._wire_dtype, padding=MAX_GROUP, views=views)

    # ------------------------------------------------------------------ wire

    def _participants(self) -> tuple[str, ...]:
        return self._ctx.topology().names

    @property
    def _strict(self) -> bool:
        return self.config.on_failure == "strict"

    def round_deadline(self) -> float:
        """Seconds one phase of an attempt (and its decision) waits for the members' frames.

        Learnt (PROTOCOL.md §11.3): ``round_margin`` x the 90th percentile of the last 50 phase
        waits (a phase whose frames all came counts with how long it waited, one that hit its
        deadline with the deadline), within [``min_round_timeout``, ``round_timeout``], and
        ``round_timeout`` until 4 are measured. Never below the membership's current dead limit for
        any member of the agreed group: a member that falls silent for good is declared dead by then
        anyway (:meth:`GroupNotices.lost` ends the wait), so the deadline only ever cuts short a
        member whose heartbeats go on while its frames do not come, and a member descheduled for
        less than its detector tolerates is waited for. A spurious abort costs a redo and a state
        download, never a wrong model (§11.4).
        """
        learnt = super().round_deadline()
        dead_limit = self._ctx.dead_limit
        if dead_limit is None or learnt >= self.config.round_timeout:
            return learnt
        me = self._ctx.name
        floor = max((dead_limit(n) for n in self._agreement.agreed.members if n != me), default=0.0)
        return min(self.config.round_timeout, max(learnt, floor))

    def _chunk_size(self, size: int) -> int:
        return math.ceil(self._total / size)

    def communication_peers(self) -> tuple[str, ...]:
        return tuple(p for p in self._participants() if p != self._ctx.name)

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        if sender not in self._participants():
            raise FrameSchemaError(f"{sender!r} is not an all-reduce participant")
        if kind == GROUP_NOTICE:
            return {}
        factors = self._powersgd.expected_tensors(kind) if self._powersgd is not None else None
        if factors is not None:
            return factors
        overlap = self._rounds.overlap
        if overlap is not None:
            spec = overlap.expected_tensors(_bucket_kind(kind, REDUCE_SCATTER) or _bucket_kind(kind, ALL_GATHER))
            if spec is not None:
                return spec
        compressed = self._compressed.expected_tensors(kind) if self._compressed is not None else None
        if compressed is not None:
            return compressed
        piece = _bucket_kind(kind, REDUCE_SCATTER) or _bucket_kind(kind, ALL_GATHER)
        if overlap is None and self.config.pipeline > 1 and piece is not None:
            layout = self._rounds.layout(piece[0])
            if piece[1] < len(layout):
                return {"chunk": TensorSpec(dtype=dtype_name(self._wire_dtype), shape=(layout[piece[1]][2],))}
        size = _group_size(kind, REDUCE_SCATTER) or _group_size(kind, ALL_GATHER)
        if size is None or self.config.pipeline > 1:
            raise FrameSchemaError(
                f"allreduce peers exchange only 'xg', 'rs<n>' and 'ag<n>' frames (and 'rs<n>_<k>', 'ag<n>_<k>' "
                f"for bucket k < {len(overlap.buckets.buckets) if overlap else 0} with strategy.overlap, "
                f"for piece k of the group's layout with strategy.pipeline = {self.config.pipeline} > 1), got {kind!r}"
            )
        return {"chunk": TensorSpec(dtype=dtype_name(self._wire_dtype), shape=(self._chunk_size(size),))}

    async def _send(self, frames: Mapping[str, Frame]) -> None:
        """Send each distinct frame once to its recipients; a broken link is a missing frame, not an error.

        ``broadcast`` sends the chunks from the wire buffers themselves (no copy), so no send may
        outlive this call: the next phase or round writes those buffers again.
        """
        exchange = self._ctx.exchange
        recipients: dict[int, list[str]] = {}
        for n in frames:
            recipients.setdefault(id(frames[n]), []).append(n)
        # return_exceptions: no send outlives this call, even when another one raised.
        results = await asyncio.gather(
            *(exchange.broadcast(frames[names[0]], names) for names in recipients.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # ------------------------------------------------------------------ resync

    async def before_step(self, step: int) -> int | None:
        """A member that gossiped a step past this step's round has completed that round without
        this peer (it restarted, thawed or was cut off): download its state now rather than at
        the round's end, after training the round's local steps in vain (PROTOCOL.md §11.5).

        The gossiped steps are hearsay; a donor is trusted only for the state it serves itself,
        and one that serves a state before the round's end is refused before anything loads.
        """
        ctx = self._ctx
        if ctx.member_steps is None or ctx.resync is None or self._strict:
            return None
        if self._compressed is not None or self._powersgd is not None:
            return None
        local_steps = self.config.local_steps
        round_index = step // local_steps
        round_end = (round_index + 1) * local_steps  # a member's step once it applied this round
        steps = ctx.member_steps()
        donors = [n for n, s in steps.items() if s >= round_end]  # _catch_up tries the furthest first
        if not donors:
            return None
        log.info("%s: step %d: %s past round %d, downloading state", ctx.name, step, ",".join(donors), round_index)
        await self._notices.notify(round_index, self._agreement.agreed, "sync")
        try:
            await self._catch_up(donors, at_least=round_end)
        except TransportError as exc:
            log.info("%s: step %d: no state past round %d (%s); training on", ctx.name, step, round_index, exc)
            return None
        self._skip_local_step = False  # no gradient round was taken: the next step is a whole one
        return self.adopted_step()

    async def _catch_up(self, donors: Sequence[str], *, at_least: int = 0) -> int:
        """Re-admission: load the state of a member ahead of this peer; join at the donor's round.
        Returns the step it loaded.

        The donors furthest ahead by their gossiped steps are tried first: a member left out of
        the round that the others applied is as far as this peer by its notices, not by its step.
        """
        ctx = self._ctx
        assert ctx.resync is not None
        steps = ctx.member_steps() if ctx.member_steps is not None else {}
        donors = sorted(donors, key=lambda n: -steps.get(n, -1))  # stable: notice order among equals
        # H = 1: the state at the end of the donor's next step (fresh), not mid-step. A donor busy
        # with a forward pass serves its current state only after it, just as its group starts the
        # round's exchange; this peer's announcement then came after the round, and it chased the
        # group step after step. Fresh, it has the group's whole next step to load and announce.
        fresh = self.config.local_steps == 1
        step = await ctx.resync(donors, at_least=at_least, fresh=fresh)  # state_replaced takes the donor's group
        ctx.ledger.resyncs += 1
        joined = step // self.config.local_steps
        self._joined_round = joined
        self._agreement.keep_notices_for(joined)
        self._adopted = step
        self._skip_local_step = self.config.local_steps == 1
        # Announce the round it joins at once, before computing it: the members, busy with the
        # same step, find it eligible when they propose that round (PROTOCOL.md §11.5). Announced
        # only when it arrives there, it would always be one round late and chase the group.
        await self._notices.notify(joined, self._agreement.propose(joined, self._participants(), None), "rs")
        return step

    # ------------------------------------------------------------------ the node's calls

    def before_backward(self, step: int) -> None:
        """On the compute thread, before the closure: bind the gradients to the flat vector (the
        plain path) or to the buckets, arming the hooks that start each bucket's exchange as soon
        as backward has filled it (overlap)."""
        self._backward_started = time.perf_counter()
        self._rounds.before_backward(step)

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        """H = 1: average gradients before the optimizer step (what DDP does)."""
        if self.config.local_steps != 1:
            return None
        self._round = step
        reducing = time.perf_counter()
        if self._backward_started is not None:
            self.phase_seconds["forward_backward"] += reducing - self._backward_started
            self._backward_started = None
        outcome: RoundOutcome | None
        if self._compressed is not None:
            try:
                outcome = await self._compressed.run(step, self._rounds.gradients)
            finally:
                self.raw_bytes, self.payload_bytes = self._compressed.raw_bytes, self._compressed.payload_bytes
        elif self._powersgd is not None:
            try:
                outcome = await self._powersgd.run(step, self._rounds.gradients)
            finally:
                self.raw_bytes, self.payload_bytes = self._powersgd.raw_bytes, self._powersgd.payload_bytes
        elif self._rounds.overlap is not None:
            outcome = await self._rounds.overlap.run(step)
        else:
            outcome = await self._rounds.average(step, self._rounds.gradients, gradients=True)
        if outcome is not None:
            self._consistent.clear()  # until the optimizer step and the step count that follow it
        self.phase_seconds["reduce"] += time.perf_counter() - reducing
        return outcome

    def wants_local_step(self) -> bool:
        skip, self._skip_local_step = self._skip_local_step, False
        return not skip

    async def after_optimizer_step(self, step: int) -> RoundOutcome | None:
        try:
            return await super().after_optimizer_step(step)
        finally:
            self._consistent.set()
            if self._notices.post_commit is not None:
                # A contested round was applied: members that were not full wait for a member in
                # the next round to download the result from (PROTOCOL.md §11.4).
                next_round, self._notices.post_commit = self._notices.post_commit, None
                await self._notices.notify(next_round, self._agreement.agreed, "rs")

    async def finish(self) -> None:
        """Stay, within the node's shutdown bound, until every live peer has reached the end: a
        member behind (a restarted or thawed one) resyncs to the final state instead of finding
        nobody left to train its last rounds with (PROTOCOL.md §11.5)."""
        if self._compressed is not None or self._powersgd is not None or self._strict:
            return
        last = self._round if self.config.local_steps == 1 else self._completed_round
        await self._notices.linger(max(last + 1, self._joined_round), self._agreement.agreed)

    def adopted_step(self) -> int | None:
        adopted, self._adopted = self._adopted, None
        return adopted

    async def close(self) -> None:
        await self._rounds.close(self.config.round_timeout)
        await super().close()

    async def _parameter_round(self, step: int) -> RoundOutcome | None:
        """H > 1 (local SGD): average the parameters exactly every H steps."""
        local_steps = self.config.local_steps
        if local_steps == 1 or (step + 1) % local_steps != 0:
            return None
        self._round = step // local_steps
        return await self._rounds.average(self._round, lambda: [p.data for _, p in self._ctx.parameters])

    def _round_applied(self) -> None:
        if self._round_params is not None:
            for kept, (_, p) in zip(self._round_params, self._ctx.parameters, strict=True):
                kept.copy_(p.detach())
            self._completed_round = self._round

    # ------------------------------------------------------------------ state transfer

    async def state_ready(self) -> None:
        await self._consistent.wait()

    def served_state(self) -> ServedState:
        base = super().served_state() or ServedState()
        meta = {**base.meta, **self._agreement.state_meta(), "xr_completed": self._completed_round}
        if self._round_params is None:
            return ServedState(extra=base.extra, meta=meta)
        # Between two syncs the live model is mid-way; the last sync's parameters are resumable.
        return ServedState(
            step=(self._completed_round + 1) * self.config.local_steps,
            parameters=tuple(self._round_params),
            extra=base.extra,
            meta=meta,
        )

    def state_replaced(
        self, extra: Mapping[str, torch.Tensor] | None = None, meta: Mapping[str, Any] | None = None
    ) -> None:
        super().state_replaced(extra, meta)
        meta = meta or {}
        donor = donor_group(meta)
        if donor is not None:  # a donor without a (valid) group: this peer keeps its own
            self._agreement.take_history(*donor)
        completed = meta.get("xr_completed")
        if isinstance(completed, int) and not isinstance(completed, bool):
            self._completed_round = max(-1, completed)
        if self._round_params is not None:
            for kept, (_, p) in zip(self._round_params, self._ctx.parameters, strict=True):
                kept.copy_(p.detach())

    def status(self) -> dict[str, Any]:
        ledger, overlap = self._ctx.ledger, self._rounds.overlap
        return {
            **super().status(),
            "world_size": len(self._participants()),
            "group": {"epoch": self._agreement.agreed.epoch, "members": list(self._agreement.agreed.members)},
            "min_peers": self._quorum,
            "on_failure": self.config.on_failure,
            "rounds_by_group_size": {str(k): v for k, v in sorted(ledger.by_group_size.items())},
            "rounds_redone": ledger.redone,
            "resyncs": ledger.resyncs,
            **self._notices.status(),
            "compression": self._ctx.compression.kind,
            "payload_compression_ratio": self.raw_bytes / self.payload_bytes if self.payload_bytes else None,
            "overlap": {"buckets": len(overlap.buckets.buckets)} if overlap is not None else None,
            "pipeline": {"pieces": self.config.pipeline, "pieces_applied": self._rounds.pieces_applied},
            "phase_seconds": {phase: round(value, 6) for phase, value in self.phase_seconds.items()},
            **({"warmup_stage": self._compressed.stage(self._round)} if self._compressed is not None else {}),
        }
