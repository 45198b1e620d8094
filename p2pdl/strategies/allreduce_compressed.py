"""All-reduce's compressed gradient round: a compressed reduce-scatter that re-compresses partial sums.

The flat gradient (float32, the parameters' order, zero-padded to n equal chunks of
ceil(total / n)) is split among the n participants in rank order; rank k owns chunk k. Each
round (docs/PROTOCOL.md §11.6):

1. every peer adds its gradient to its residual (error feedback, or DGC's momentum correction,
   :mod:`p2pdl.compression.dgc`), compresses each chunk k of the result and sends it to rank k
   (``crs<n>_<stage>``), keeping what the compressed chunks do not carry;
2. the owner decodes the n contributions to its chunk and sums them in rank order in float32,
   divides by n, adds its own residual of the mean (the second level of error feedback),
   compresses that once more and sends the same bytes to everyone (``cag<n>_<stage>``);
3. every peer, the owner included, decodes the n owners' streams into its gradients.

Everyone decodes the same bytes with the same stateless decoder, so every peer applies the same
gradient bit for bit, though not the exact mean of the raw gradients. Each peer sends
(n - 1) compressed chunks in each phase: 2 (n - 1) / n times the compressed size of the whole
gradient, never more than the fp32 all-reduce's 2 (n - 1) / n x 4 bytes per element. The
all-gather this replaces sent n - 1 whole compressed gradients, which with fp16 at 8 peers is
3.5x the fp32 all-reduce.

Why the owner's error feedback: re-compressing the mean of n top-k chunks keeps k of up to n k
non-zeros; without a residual the rest would be lost. With it, what the owner drops is sent in
later steps, as the peers' own residual does for their gradients (two-level error feedback, as
in 1-bit Adam's server-side compensation). Its residual belongs to the chunk the owner holds in
a group of a given size; when the group changes it starts again from zero (the old chunk's
debt is dropped, a one-off bias the peers' residuals do not share).

PowerSGD does not fit: a chunk of the flat vector is not a matrix. It averages its factors with
the paper's two all-reduces instead (:mod:`p2pdl.strategies.allreduce_powersgd`), through
:func:`scatter_gather` below with float32 chunks.

Trade-off: the compressed round is strict, as the all-gather was. Both levels of error feedback
(and DGC's velocity) have already moved when a member goes missing mid-round, so the round
cannot be redone over a smaller group without sending some gradient twice; a missing or
undecodable contribution raises :class:`~p2pdl.errors.AllReduceIncompleteError`. The group is
the participants in topology order, and every frame names it in ``meta["members"]``, so peers
that disagree about it never mix chunks of different layouts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import torch

from p2pdl.compression.compressors import Compressor, NoneCompressor, TopKCompressor, build_compressor, wire_bytes
from p2pdl.compression.dgc import Accumulator, stage_ratio, warmup_stage, warmup_stages
from p2pdl.config.strategy import CompressionConfig
from p2pdl.core.mixing import flatten_into, unflatten_into
from p2pdl.errors import AllReduceIncompleteError, FrameError
from p2pdl.strategies.base import RoundOutcome, StrategyContext
from p2pdl.wire import Frame, TensorSpec

__all__ = [
    "COMPRESSED_ALL_GATHER",
    "COMPRESSED_REDUCE_SCATTER",
    "CompressedReduceScatter",
    "scatter_gather",
]

COMPRESSED_REDUCE_SCATTER = "crs"  # kinds "crs<n>_<stage>" and "cag<n>_<stage>", n = group size
COMPRESSED_ALL_GATHER = "cag"
_MAX_GROUP = 4096

Send = Callable[[Mapping[str, Frame]], Awaitable[None]]
Parts = Mapping[str, torch.Tensor]  # one compressor's named wire tensors


def parse_kind(kind: str, max_stage: int) -> tuple[str, int, int] | None:
    """(prefix, group size, stage) of a ``crs<n>_<stage>``/``cag<n>_<stage>`` kind, None otherwise."""
    prefix, rest = kind[:3], kind[3:]
    if prefix not in (COMPRESSED_REDUCE_SCATTER, COMPRESSED_ALL_GATHER):
        return None
    size_text, underscore, stage_text = rest.partition("_")
    if not underscore or not all(t.isdigit() and t == str(int(t)) for t in (size_text, stage_text)):
        return None
    size, stage = int(size_text), int(stage_text)
    if not 2 <= size <= _MAX_GROUP or stage > max_stage:
        return None
    return prefix, size, stage


class CompressedReduceScatter:
    """The compressed gradient round of :class:`~p2pdl.strategies.allreduce.AllReduceStrategy`.

    Owns the per-peer accumulator (error feedback, or DGC momentum correction) over the flat
    gradient and the owner's residual of its chunk; ``send`` is the strategy's encode-once sender.
    """

    def __init__(
        self,
        ctx: StrategyContext,
        config: CompressionConfig,
        *,
        participants: Callable[[], tuple[str, ...]],
        send: Send,
        round_timeout: float,
    ) -> None:
        self._ctx = ctx
        self._config = config
        self._participants = participants
        self._send = send
        self._round_timeout = round_timeout  # seconds each phase waits for the members' frames
        self._total = sum(p.numel() for _, p in ctx.parameters)
        self._stages = warmup_stages(config.ratio) if config.kind == "topk" and config.warmup_steps else 0
        self._compressors: dict[int, Compressor] = {}
        self._passthrough = NoneCompressor()
        self._accumulator = Accumulator(
            self._total, momentum=config.momentum_correction, feedback=config.error_feedback, device=ctx.device
        )
        self._owner_layout: tuple[int, int] | None = None  # (group size, rank) of the owner residual
        self._owner_residual = torch.zeros(0, dtype=torch.float32, device=ctx.device)
        self._flat = torch.zeros(self._total, dtype=torch.float32, device=ctx.device)
        self._kinds: set[str] = set()
        self.raw_bytes = 0  # what the fp32 reduce-scatter + all-gather would have sent
        self.payload_bytes = 0  # what this one sent, before lz4

    # ------------------------------------------------------------------ wire shapes

    def chunk_size(self, size: int) -> int:
        return math.ceil(self._total / size)

    def compressor(self, stage: int, chunk: int) -> Compressor:
        """The compressor of a ``chunk``-element chunk at warm-up ``stage``; below
        ``min_numel`` elements a chunk goes as float32."""
        if chunk < self._config.min_numel:
            return self._passthrough
        found = self._compressors.get(stage)
        if found is None:
            config = self._config
            ratio = stage_ratio(stage, config.ratio) if self._stages else config.ratio
            found = build_compressor(config.kind, ratio=ratio, rank=config.rank, chunk=config.chunk)
            self._compressors[stage] = found
        return found

    def expected_tensors(self, kind: str) -> Mapping[str, TensorSpec] | None:
        """The exact specs of a ``crs``/``cag`` frame, None when ``kind`` is not one."""
        parsed = parse_kind(kind, self._stages)
        if parsed is None:
            return None
        _, size, stage = parsed
        chunk = self.chunk_size(size)
        return self.compressor(stage, chunk).wire_specs((chunk,))

    def stage(self, step: int) -> int:
        return warmup_stage(step, self._config.ratio, self._config.warmup_steps) if self._stages else 0

    def reset(self) -> None:
        """The model was replaced: forget both levels of residual and the velocity."""
        self._accumulator.reset()
        self._owner_layout = None

    # ------------------------------------------------------------------ one round

    def _encode_chunks(
        self, compressor: Compressor, size: int, gradients: Sequence[torch.Tensor]
    ) -> list[dict[str, torch.Tensor]]:
        """Phase 1 on the compute thread: v <- accumulate(g); the parts of each chunk of v."""
        chunk = self.chunk_size(size)
        flatten_into(gradients, self._flat)
        accumulated = self._accumulator.accumulate(self._flat)
        padded = torch.zeros(size * chunk, dtype=torch.float32, device=self._flat.device)
        padded[: self._total].copy_(accumulated)
        decoded = torch.empty_like(padded)
        parts_by_rank: list[dict[str, torch.Tensor]] = []
        sent_indices: list[torch.Tensor] = []
        for rank in range(size):
            piece = padded[rank * chunk : (rank + 1) * chunk]
            parts = compressor.encode(f"chunk{rank}", piece)
            decoded[rank * chunk : (rank + 1) * chunk] = compressor.decode(
                f"chunk{rank}", parts, (chunk,), piece.device
            )
            if isinstance(compressor, TopKCompressor):
                sent_indices.append(compressor.sent_indices(parts).to(piece.device) + rank * chunk)
            # Parts may alias the padded buffer (pass-through); the frames outlive this call.
            parts_by_rank.append({suffix: part.clone() for suffix, part in parts.items()})
        indices = torch.cat(sent_indices) if sent_indices else None
        if indices is not None:
            indices = indices[indices < self._total]  # top-k may pick padding zeros
        self._accumulator.sent(decoded[: self._total], indices)
        return parts_by_rank

    def _reduce_own(
        self, compressor: Compressor, size: int, rank: int, contributions: Sequence[Mapping[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Phase 2 on the compute thread: the owner's re-compressed mean and its decoded value."""
        chunk = self.chunk_size(size)
        device = self._ctx.device
        mean = torch.zeros(chunk, dtype=torch.float32, device=device)
        for parts in contributions:  # rank order: the same float32 sum on every owner
            mean.add_(compressor.decode("reduced", parts, (chunk,), device))
        mean.div_(size)
        if self._owner_layout != (size, rank) or self._owner_residual.numel() != chunk:
            self._owner_layout = (size, rank)
            self._owner_residual = torch.zeros(chunk, dtype=torch.float32, device=device)
        if self._config.error_feedback:
            mean.add_(self._owner_residual)
        parts = {suffix: part.clone() for suffix, part in compressor.encode("reduced", mean).items()}
        decoded = compressor.decode("reduced", parts, (chunk,), device)
        if self._config.error_feedback:
            torch.sub(mean, decoded, out=self._owner_residual)
        return parts, decoded

    def _apply(self, chunks_in_rank_order: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> None:
        """Phase 3: the decoded chunks, trimmed of padding, into the gradients (rounded once)."""
        unflatten_into(torch.cat(list(chunks_in_rank_order))[: self._total], gradients)

    async def run(self, step: int, gradients: Callable[[], list[torch.Tensor]]) -> RoundOutcome:
        """One compressed gradient round over the current participants; strict (see module doc)."""
        ctx = self._ctx
        started = time.perf_counter()
        members = self._participants()
        size, me = len(members), ctx.name
        if size < 2:  # alone: nothing to send; the gradient is applied as it is
            return ctx.ledger.record(step, [], started)
        rank = members.index(me)
        stage, chunk = self.stage(step), self.chunk_size(size)
        compressor = self.compressor(stage, chunk)
        kinds = (f"{COMPRESSED_REDUCE_SCATTER}{size}_{stage}", f"{COMPRESSED_ALL_GATHER}{size}_{stage}")
        self._kinds.update(kinds)
        own: list[torch.Tensor] = []  # the owner's decoded re-compressed mean, kept by reduce()

        def reduce(contributions: list[Parts]) -> Parts:
            try:
                parts, decoded = self._reduce_own(compressor, size, rank, contributions)
            except FrameError as exc:
                raise AllReduceIncompleteError(step, self._culprits(compressor, chunk, members, contributions)) from exc
            own.append(decoded)
            return parts

        try:
            parts_by_rank = await ctx.run_compute(lambda: self._encode_chunks(compressor, size, gradients()))
            reduced, payload = await scatter_gather(
                ctx, self._send, step, members, kinds, parts_by_rank, reduce, self._round_timeout, started
            )
            self.payload_bytes += payload
            self.raw_bytes += 2 * (size - 1) * chunk * 4  # the fp32 reduce-scatter and all-gather

            @torch.no_grad()
            def apply() -> None:
                chunks = []
                for p, parts in zip(members, reduced, strict=True):
                    if p == me:
                        chunks.append(own[0])
                        continue
                    try:
                        chunks.append(compressor.decode("reduced", parts, (chunk,), ctx.device))
                    except FrameError as exc:  # the owner's chunk is lost to every peer: fail loudly
                        raise AllReduceIncompleteError(step, [p]) from exc
                self._apply(chunks, gradients())

            await ctx.run_compute(apply)
            return ctx.ledger.record(step, [], started)
        finally:
            for kind in self._kinds:
                ctx.exchange.advance(kind, step + 1)

    @staticmethod
    def _culprits(
        compressor: Compressor, chunk: int, members: Sequence[str], contributions: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[str]:
        """The members whose contribution does not decode (what the owner tells the error)."""
        bad = []
        for member, parts in zip(members, contributions, strict=True):
            try:
                compressor.decode("reduced", parts, (chunk,), torch.device("cpu"))
            except FrameError:
                bad.append(member)
        return bad


async def scatter_gather(
    ctx: StrategyContext,
    send: Send,
    step: int,
    members: Sequence[str],
    kinds: tuple[str, str],
    scattered: Sequence[Parts],
    reduce: Callable[[list[Parts]], Parts],
    round_timeout: float,
    started: float,
) -> tuple[list[Parts], int]:
    """One reduce-scatter and all-gather over ``members`` (rank order), this peer among them.

    Sends ``scattered[k]`` to rank k as ``kinds[0]``; runs ``reduce`` on the compute thread over the
    n contributions to this peer's chunk (rank order, its own ``scattered`` part included); sends
    what it returns to every other member as ``kinds[1]``. Returns the n members' reduced parts in
    rank order (its own included) and the payload bytes it sent. Every frame carries the member
    list in ``meta["members"]``; one that names another list, or another step, counts as missing.
    Each phase waits ``round_timeout``; a missing frame is recorded in the ledger and raises
    :class:`~p2pdl.errors.AllReduceIncompleteError`. The caller closes the kinds' rounds.
    """
    me = ctx.name
    rank = members.index(me)
    others = tuple(p for p in members if p != me)
    meta = {"members": ",".join(members)}

    def frame(kind: str, parts: Parts) -> Frame:
        return Frame(kind=kind, sender=me, round=step, step=step, meta=meta, tensors=parts)

    async def gather(kind: str) -> dict[str, Frame]:
        arrived = await ctx.exchange.collect(kind, step, others, round_timeout)
        got = {p: f for p, f in arrived.items() if f.meta.get("members") == meta["members"] and f.step == step}
        missing = [p for p in others if p not in got]
        if missing:
            ctx.ledger.record(step, missing, started)
            raise AllReduceIncompleteError(step, missing)
        return got

    outgoing = {p: frame(kinds[0], scattered[index]) for index, p in enumerate(members) if p != me}
    await send(outgoing)
    payload = sum(wire_bytes(f.tensors) for f in outgoing.values())
    contributions = await gather(kinds[0])
    own = await ctx.run_compute(
        lambda: reduce([scattered[rank] if p == me else contributions[p].tensors for p in members])
    )
    await send(dict.fromkeys(others, frame(kinds[1], own)))
    payload += wire_bytes(own) * len(others)
    gathered = await gather(kinds[1])
    return [own if p == me else gathered[p].tensors for p in members], payload
