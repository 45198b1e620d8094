"""``allreduce``: exact data-parallel averaging over the full mesh of live members.

With H = 1 it averages gradients before the optimizer step, the same result as DDP; with H > 1
(local SGD) it averages the parameters every H steps, and with ``strategy.outer = "diloco"`` each
such average feeds the outer optimizer (:class:`~p2pdl.strategies.base.StrategyBase` runs it).
It runs a reduce-scatter then an all-gather (each peer owns 1/n of the flat vector), so each peer
sends 2(n-1)/n of it, like a ring, but in two latency steps. Chunks are summed in rank order, so
every peer ends with bit-identical values. A missing contribution raises
:class:`~p2pdl.errors.AllReduceIncompleteError`; it never falls back to local values.

With ``[compression]`` on, gradients are all-gathered compressed (with error feedback) instead:
every peer decodes the same streams and averages them in rank order, so the result is still
identical everywhere, though no longer the exact mean of the uncompressed gradients.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pdl.compression.codec import TensorCodec
from p2pdl.core.mixing import chunk_bounds, exact_mean, flatten_into, unflatten_chunks_into
from p2pdl.errors import AllReduceIncompleteError, FrameError, FrameSchemaError, TransportError
from p2pdl.strategies.base import RoundConfig, RoundOutcome, StrategyBase, StrategyContext, build_codec, wire_dtype
from p2pdl.wire import Frame, TensorSpec
from p2pdl.wire.frame import dtype_name

REDUCE_SCATTER = "rs"
COMPRESSED_GRADIENTS = "cgrad"
ALL_GATHER = "ag"


@dataclass(frozen=True, kw_only=True, slots=True)
class AllReduceConfig(RoundConfig):
    """The ``[strategy]`` keys all-reduce reads: H = 1 averages gradients, H > 1 parameters."""


class AllReduceStrategy(StrategyBase):
    """Exact gradient averaging: reduce-scatter + all-gather over the full mesh of live members.

    The participants are the live members at the step, in the agreed order; rank r owns chunk r
    of the flat gradient. If any participant's contribution is missing the step fails.
    """

    name = "allreduce"

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.config = AllReduceConfig.from_table(ctx.config)
        self._total = sum(p.numel() for _, p in ctx.parameters)
        self._wire_dtype = wire_dtype(ctx.parameters)
        self._codec = build_codec(ctx, error_feedback=ctx.compression.error_feedback)
        self.raw_bytes = 0
        self.payload_bytes = 0
        # Host-side wire buffers, reused every step: the flat gradient (total,) and the result.
        self._flat = torch.empty(self._total, dtype=self._wire_dtype)
        self._averaged = torch.empty(self._total, dtype=self._wire_dtype)

    def _participants(self) -> tuple[str, ...]:
        return self._ctx.topology().names

    def _bounds(self, peers: Sequence[str]) -> list[int]:
        return chunk_bounds(self._total, len(peers))

    @staticmethod
    def _chunk(buffer: torch.Tensor, bounds: Sequence[int], rank: int) -> torch.Tensor:
        return buffer[bounds[rank] : bounds[rank + 1]]

    @staticmethod
    def _fits(frame: Frame | None, bounds: Sequence[int], owner: int) -> bool:
        """Whether ``frame`` arrived with chunk ``owner`` of this round's split. A sender that saw
        a different membership when it split the vector sent chunks of other sizes (the frame
        passed the schema of the membership at arrival); it counts as missing, never as a crash."""
        return frame is not None and frame.tensors["chunk"].numel() == bounds[owner + 1] - bounds[owner]

    def communication_peers(self) -> tuple[str, ...]:
        return tuple(p for p in self._participants() if p != self._ctx.name)

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        peers = self._participants()
        if sender not in peers or self._ctx.name not in peers:
            raise FrameSchemaError(f"{sender!r} is not an all-reduce participant")
        if kind == COMPRESSED_GRADIENTS and self._codec is not None:
            return self._codec.wire_specs()
        if kind == REDUCE_SCATTER:
            owner = peers.index(self._ctx.name)  # the sender's slice of *my* chunk
        elif kind == ALL_GATHER:
            owner = peers.index(sender)  # the sender's averaged chunk
        else:
            raise FrameSchemaError(f"allreduce peers exchange only 'rs'/'ag' frames, got {kind!r}")
        bounds = self._bounds(peers)
        return {"chunk": TensorSpec(dtype=dtype_name(self._wire_dtype), shape=(bounds[owner + 1] - bounds[owner],))}

    def _gradients(self) -> list[torch.Tensor]:
        grads = []
        for _, p in self._ctx.parameters:
            if p.grad is None:  # an unused parameter contributes zeros, as DDP does
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        return grads

    @staticmethod
    @torch.no_grad()
    def _write_back(chunks_in_rank_order: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> None:
        """Copy the averaged chunks straight into the tensors: one copy, no flat intermediate."""
        unflatten_chunks_into(chunks_in_rank_order, tensors)

    async def _exchange(
        self, kind: str, round_index: int, others: Sequence[str], frames: Mapping[str, Frame]
    ) -> dict[str, Frame]:
        ctx = self._ctx
        # Each distinct frame is encoded once (the all-gather sends one frame to everyone) and
        # sent as soon as its own encoding is done, while the others are still being encoded.
        recipients: dict[int, list[str]] = {}
        for n in others:
            recipients.setdefault(id(frames[n]), []).append(n)

        async def encode_and_send(names: list[str]) -> list[BaseException | None]:
            data = await ctx.exchange.encode(frames[names[0]])
            return await asyncio.gather(*(ctx.exchange.send_encoded(n, data) for n in names), return_exceptions=True)

        results = await asyncio.gather(*(encode_and_send(names) for names in recipients.values()))
        for result in (r for group in results for r in group):
            if isinstance(result, BaseException) and not isinstance(result, TransportError):
                raise result
        arrived = await ctx.exchange.collect(kind, round_index, others, self.config.round_timeout)
        ctx.exchange.advance(kind, round_index + 1)
        return arrived

    async def _average(self, round_index: int, tensors: Callable[[], list[torch.Tensor]]) -> RoundOutcome:
        """Replace ``tensors()`` by their exact mean over the live participants, in place."""
        ctx = self._ctx
        started = time.perf_counter()
        peers = self._participants()
        rank = peers.index(ctx.name)
        others = tuple(p for p in peers if p != ctx.name)
        bounds = self._bounds(peers)
        await ctx.run_compute(lambda: flatten_into(tensors(), self._flat))
        if not others:
            return ctx.ledger.record(round_index, [], started)
        scatter = {
            n: Frame(
                kind=REDUCE_SCATTER,
                sender=ctx.name,
                round=round_index,
                step=round_index,
                tensors={"chunk": self._chunk(self._flat, bounds, peers.index(n))},
            )
            for n in others
        }
        arrived = await self._exchange(REDUCE_SCATTER, round_index, others, scatter)
        missing = [n for n in others if not self._fits(arrived.get(n), bounds, rank)]
        if missing:
            ctx.ledger.record(round_index, missing, started)
            raise AllReduceIncompleteError(round_index, missing)
        in_rank_order = [
            self._chunk(self._flat, bounds, rank) if p == ctx.name else arrived[p].tensors["chunk"] for p in peers
        ]
        own = self._chunk(self._averaged, bounds, rank)
        await ctx.run_compute(lambda: exact_mean(in_rank_order, own))
        gather_frame = Frame(
            kind=ALL_GATHER, sender=ctx.name, round=round_index, step=round_index, tensors={"chunk": own}
        )
        gathered = await self._exchange(ALL_GATHER, round_index, others, dict.fromkeys(others, gather_frame))
        missing = [n for n in others if not self._fits(gathered.get(n), bounds, peers.index(n))]
        if missing:
            ctx.ledger.record(round_index, missing, started)
            raise AllReduceIncompleteError(round_index, missing)

        averaged_in_rank_order = [own if p == ctx.name else gathered[p].tensors["chunk"] for p in peers]
        await ctx.run_compute(lambda: self._write_back(averaged_in_rank_order, tensors()))
        return ctx.ledger.record(round_index, [], started)

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        """H = 1: average gradients before the optimizer step (what DDP does)."""
        if self.config.local_steps != 1:
            return None
        self._round = step
        if self._codec is not None:
            return await self._average_compressed(step, self._codec)
        return await self._average(step, self._gradients)

    async def _average_compressed(self, step: int, codec: TensorCodec) -> RoundOutcome:
        """All-gather of compressed gradients (with error feedback); everyone averages the same
        decoded values in rank order, so the result is identical on every peer."""
        ctx = self._ctx
        started = time.perf_counter()
        peers = self._participants()
        others = tuple(p for p in peers if p != ctx.name)
        names = [name for name, _ in ctx.parameters]
        own = await ctx.run_compute(lambda: codec.encode(dict(zip(names, self._gradients(), strict=True))))
        frame = Frame(kind=COMPRESSED_GRADIENTS, sender=ctx.name, round=step, step=step, tensors=own)
        await ctx.exchange.broadcast(frame, others)
        self.raw_bytes += codec.raw_bytes * len(others)
        self.payload_bytes += sum(t.numel() * t.element_size() for t in own.values()) * len(others)
        arrived = await ctx.exchange.collect(COMPRESSED_GRADIENTS, step, others, self.config.round_timeout)
        ctx.exchange.advance(COMPRESSED_GRADIENTS, step + 1)
        missing = [n for n in others if n not in arrived]
        if missing:
            ctx.ledger.record(step, missing, started)
            raise AllReduceIncompleteError(step, missing)

        @torch.no_grad()
        def average() -> None:
            decoded = []
            for peer in peers:
                stream = own if peer == ctx.name else arrived[peer].tensors
                try:
                    decoded.append(codec.decode(stream, ctx.device))
                except FrameError as exc:
                    # Undecodable contribution: the average cannot be exact, so fail loudly.
                    raise AllReduceIncompleteError(step, [peer]) from exc
            for (name, _), grad in zip(ctx.parameters, self._gradients(), strict=True):
                exact_mean([stream[name] for stream in decoded], grad)  # float32 sum, one rounding

        await ctx.run_compute(average)
        return ctx.ledger.record(step, [], started)

    async def _parameter_round(self, step: int) -> RoundOutcome | None:
        """H > 1 (local SGD): average the parameters exactly every H steps."""
        local_steps = self.config.local_steps
        if local_steps == 1 or (step + 1) % local_steps != 0:
            return None
        self._round = step // local_steps
        return await self._average(self._round, lambda: [p.data for _, p in self._ctx.parameters])

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "world_size": len(self._participants()),
            "compression": self._ctx.compression.kind,
            "payload_compression_ratio": self.raw_bytes / self.payload_bytes if self.payload_bytes else None,
        }
