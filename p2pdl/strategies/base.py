"""Training strategies: how a peer shares what it learned. One interface, pluggable parts.

The node calls a strategy twice per step: ``reduce_gradients`` between backward and the optimizer
step (where exact all-reduce works), and ``after_optimizer_step`` (where parameter gossip works).
A strategy talks to the network only through the small :class:`Exchange` protocol, and to the
model only through the parameters and a ``run_compute`` hook that runs heavy torch work on the
peer's compute thread, never on the event loop.

Strategies here:

* ``gossip`` — D-PSGD (Lian et al. 2017): H local steps, then a synchronous round with the graph
  neighbours, x_i <- sum_j W_ij x_j with Metropolis-Hastings weights. A neighbour whose frame
  misses the ``round_timeout`` is left out and its weight moves to the peer itself; the round is
  recorded as *partial*, with who was missing.
* ``allreduce`` — exact data-parallel averaging of gradients, the same result as DDP. It runs a
  reduce-scatter then an all-gather over the full mesh (each peer owns 1/n of the flat gradient),
  so each peer sends 2(n-1)/n of the gradient, like a ring, but in two latency steps. Chunks are
  summed in rank order, so every peer ends with bit-identical gradients. A missing contribution
  raises :class:`~p2pdl.errors.AllReduceIncompleteError`; it never falls back to local values.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from p2pdl.compression.compressors import CompressionPolicy, TensorCodec, build_compressor
from p2pdl.config import CompressionConfig, StrategyConfig
from p2pdl.core.mixing import (
    chunk_bounds,
    exact_mean,
    flatten_into,
    mix_into,
    unflatten_chunks_into,
)
from p2pdl.core.robust import OutlierClipper, trimmed_mean
from p2pdl.core.topology import Graph, mh_weight
from p2pdl.errors import (
    AllReduceIncompleteError,
    ConfigError,
    FrameError,
    FrameSchemaError,
    TransportError,
    UnknownSenderError,
)
from p2pdl.wire import Frame, TensorSpec

T = TypeVar("T")
RunCompute = Callable[[Callable[[], T]], Awaitable[T]]

PARAMS = "params"
# A peer behind its neighbours (a joiner, a restarted peer) catches up to their round, but never by
# more than this: one bogus frame naming round 2**62 must not end everybody's training.
MAX_ROUND_LEAD = 1000
REDUCE_SCATTER = "rs"
COMPRESSED_GRADIENTS = "cgrad"
ALL_GATHER = "ag"


class Exchange(Protocol):
    """What a strategy needs from the transport."""

    async def encode(self, frame: Frame) -> bytes: ...

    async def send_encoded(self, neighbor: str, data: bytes) -> None: ...

    async def broadcast(self, frame: Frame, neighbors: Collection[str]) -> dict[str, TransportError]: ...

    async def collect(
        self, kind: str, round_index: int, senders: Collection[str], timeout: float
    ) -> dict[str, Frame]: ...

    def advance(self, kind: str, floor: int) -> None: ...

    def highest_round(self, kind: str, senders: Collection[str]) -> int | None: ...

    def take_latest(self, kind: str, sender: str) -> Frame | None: ...

    async def wait_for_senders(self, kind: str, senders: Collection[str], count: int, timeout: float) -> set[str]: ...

    def is_connected(self, neighbor: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """One communication round as it really happened."""

    round: int
    complete: bool
    missing: tuple[str, ...]
    seconds: float


@dataclass
class RoundLedger:
    """Complete versus partial rounds; a round missing any contribution is never 'complete'."""

    complete: int = 0
    partial: int = 0
    missing_by_peer: Counter[str] = field(default_factory=Counter)
    recent_partial: deque[tuple[int, tuple[str, ...]]] = field(default_factory=lambda: deque(maxlen=16))
    last: RoundOutcome | None = None

    def record(self, round_index: int, missing: Sequence[str], started: float) -> RoundOutcome:
        outcome = RoundOutcome(
            round=round_index,
            complete=not missing,
            missing=tuple(sorted(missing)),
            seconds=time.perf_counter() - started,
        )
        if outcome.complete:
            self.complete += 1
        else:
            self.partial += 1
            self.missing_by_peer.update(outcome.missing)
            self.recent_partial.append((round_index, outcome.missing))
        self.last = outcome
        return outcome

    def as_dict(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "partial": self.partial,
            "missing_by_peer": dict(self.missing_by_peer),
            "recent_partial": [{"round": r, "missing": list(m)} for r, m in self.recent_partial],
            "last_round_seconds": None if self.last is None else round(self.last.seconds, 6),
        }


@dataclass(frozen=True, kw_only=True)
class StrategyContext:
    """Everything a strategy may touch, handed over by the node."""

    name: str
    topology: Callable[[], Graph]  # the graph over the live members, in agreed (rank) order, now
    parameters: tuple[tuple[str, torch.nn.Parameter], ...]
    optimizer: torch.optim.Optimizer
    configured: tuple[str, ...]  # the [[peers]] names, in config order
    device: torch.device
    exchange: Exchange
    run_compute: Callable[[Callable[[], Any]], Awaitable[Any]]
    config: StrategyConfig
    ledger: RoundLedger
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    last_step: int | None = None  # run.steps - 1: the step the swarm's run ends on (None: unknown)


class Strategy(Protocol):
    """The pluggable part of a peer that decides what is exchanged, when, and how it is mixed."""

    name: str

    def communication_peers(self) -> tuple[str, ...]:
        """The peers this one keeps a link to."""
        ...

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        """The tensors a frame of ``kind`` from ``sender`` must carry; FrameSchemaError if unknown."""
        ...

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        """Runs after backward, before the optimizer step."""
        ...

    def wants_local_step(self) -> bool:
        """Whether the node should run the local optimizer step after ``reduce_gradients``."""
        ...

    async def after_optimizer_step(self, step: int) -> RoundOutcome | None:
        """Runs after the optimizer step."""
        ...

    def status(self) -> dict[str, Any]: ...

    def swarm_step(self) -> int | None:
        """For strategies without a barrier: the furthest step seen from other peers (else None)."""
        ...

    async def finish(self) -> None:
        """A last word before this peer leaves (the node calls it while links are still up, before
        the leave is announced), e.g. a parameter server's final parameters to its workers."""
        ...

    async def close(self) -> None:
        """Cancel background work (the node calls this before closing the transport)."""
        ...


def build_codec(ctx: StrategyContext, *, error_feedback: bool) -> TensorCodec | None:
    """The per-parameter codec of ``[compression]``, or None when it is off."""
    config = ctx.compression
    if config.kind == "none":
        return None
    compressor = build_compressor(config.kind, ratio=config.ratio, rank=config.rank, chunk=config.chunk)
    policy = CompressionPolicy(compressor=compressor, min_numel=config.min_numel)
    shapes = {name: tuple(p.shape) for name, p in ctx.parameters}
    return TensorCodec(policy, shapes, error_feedback=error_feedback)


def parameter_specs(parameters: Sequence[tuple[str, torch.nn.Parameter]]) -> dict[str, TensorSpec]:
    """What a parameter frame must carry: every trainable parameter, with its dtype and shape."""
    return {name: TensorSpec.of_tensor(p) for name, p in parameters}


def neighbour_frame_specs(
    ctx: StrategyContext, kind: str, sender: str, accepted_kind: str, specs: Mapping[str, TensorSpec]
) -> Mapping[str, TensorSpec]:
    """``specs`` for a frame of ``accepted_kind`` from a current graph neighbour; refuse anything else."""
    if kind != accepted_kind:
        raise FrameSchemaError(f"{ctx.config.kind} peers exchange only {accepted_kind!r} frames, got {kind!r}")
    if sender not in ctx.topology().neighbors.get(ctx.name, ()):
        raise UnknownSenderError(f"{sender!r} is not a current neighbour of {ctx.name!r}")
    return specs


def reported_degree(frame: Frame, graph: Graph, sender: str, fallback: int) -> int:
    """The degree a neighbour reports in its frame (for MH weights), or the graph's when absent/bad."""
    reported = frame.meta.get("degree")
    if isinstance(reported, int) and not isinstance(reported, bool) and 1 <= reported <= 4096:
        return reported
    return graph.degree(sender) if sender in graph.names else fallback


class GossipStrategy:
    """D-PSGD: synchronous parameter gossip with the graph neighbours every H local steps.

    Under churn the neighbours are re-read from the live graph every round, and the
    Metropolis-Hastings weight of each neighbour uses the degree it reports in its frame, so the
    weights stay symmetric and doubly stochastic after every membership change.
    """

    name = "gossip"

    def __init__(self, ctx: StrategyContext) -> None:
        self._ctx = ctx
        self._specs = parameter_specs(ctx.parameters)
        self._round = 0
        self._row: dict[str, float] = {}
        self.robust_stats: dict[str, float] = {"clipped": 0, "rejected": 0, "trimmed_rounds": 0, "last_radius": 0.0}
        self._clipper = OutlierClipper(radius=ctx.config.clip_radius, reject_factor=ctx.config.reject_factor)

    def _neighbors(self) -> tuple[str, ...]:
        return self._ctx.topology().neighbors.get(self._ctx.name, ())

    def communication_peers(self) -> tuple[str, ...]:
        return self._neighbors()

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        return neighbour_frame_specs(self._ctx, kind, sender, PARAMS, self._specs)

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        return None

    def wants_local_step(self) -> bool:
        return True

    def swarm_step(self) -> int | None:
        return None

    async def finish(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _row_for(self, neighbors: Sequence[str], arrived: Mapping[str, Frame]) -> dict[str, float]:
        """This round's weights: MH from reported degrees; missing neighbours' weight stays home."""
        own_degree = len(neighbors)
        graph = self._ctx.topology()
        row = {s: mh_weight(own_degree, reported_degree(f, graph, s, own_degree)) for s, f in arrived.items()}
        row[self._ctx.name] = 1.0 - sum(row.values())
        return row

    async def after_optimizer_step(self, step: int) -> RoundOutcome | None:
        if (step + 1) % self._ctx.config.local_steps != 0:
            return None
        ctx = self._ctx
        neighbors = self._neighbors()
        round_index = step // ctx.config.local_steps
        ahead = ctx.exchange.highest_round(PARAMS, neighbors)
        if ahead is not None and round_index < ahead <= round_index + MAX_ROUND_LEAD:
            round_index = ahead  # behind the swarm (joined or restarted): catch up to its round
        self._round = round_index
        started = time.perf_counter()
        # Training is paused while the round runs, so the parameters can be encoded in place.
        frame = Frame(
            kind=PARAMS,
            sender=ctx.name,
            round=round_index,
            step=step,
            meta={"degree": len(neighbors)},
            tensors={name: p.detach() for name, p in ctx.parameters},
        )
        await ctx.exchange.broadcast(frame, neighbors)
        arrived = await ctx.exchange.collect(PARAMS, round_index, neighbors, ctx.config.round_timeout)
        ctx.exchange.advance(PARAMS, round_index + 1)
        row = self._row_for(neighbors, arrived)
        self._row = row
        local = [p for _, p in ctx.parameters]
        contributions = [
            (row[sender], [arrived[sender].tensors[name] for name, _ in ctx.parameters]) for sender in arrived
        ]
        if contributions:
            await ctx.run_compute(lambda: self._mix(local, row[ctx.name], contributions))
        missing = [n for n in neighbors if n not in arrived]
        return ctx.ledger.record(round_index, missing, started)

    def _mix(
        self,
        local: Sequence[torch.Tensor],
        self_weight: float,
        contributions: Sequence[tuple[float, Sequence[torch.Tensor]]],
    ) -> None:
        """Plain Metropolis-Hastings mixing, or one of the robust rules (runs on the compute thread)."""
        config = self._ctx.config
        if config.robust == "clip":
            report = self._clipper.mix(local, self_weight, contributions)
            self.robust_stats["clipped"] = self._clipper.clipped
            self.robust_stats["rejected"] = self._clipper.rejected
            self.robust_stats["last_radius"] = report.radius
        elif config.robust == "trimmed-mean" and 2 * config.trim < 1 + len(contributions):
            trimmed_mean(local, [tensors for _, tensors in contributions], config.trim)
            self.robust_stats["trimmed_rounds"] += 1
        else:
            mix_into(local, self_weight, contributions)

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "round": self._round,
            "local_steps": self._ctx.config.local_steps,
            "neighbors": list(self._neighbors()),
            "last_mixing_weights": {k: round(v, 6) for k, v in self._row.items()},
            "robust": self._ctx.config.robust,
            "robust_stats": dict(self.robust_stats),
        }


class AllReduceStrategy:
    """Exact gradient averaging: reduce-scatter + all-gather over the full mesh of live members.

    The participants are the live members at the step, in the agreed order; rank r owns chunk r
    of the flat gradient. If any participant's contribution is missing the step fails.
    """

    name = "allreduce"

    def __init__(self, ctx: StrategyContext) -> None:
        self._ctx = ctx
        self._total = sum(p.numel() for _, p in ctx.parameters)
        dtypes = {p.dtype for _, p in ctx.parameters}
        if dtypes != {torch.float32}:
            raise ConfigError(
                [f"strategy.kind = 'allreduce' needs float32 parameters, the model has {sorted(map(str, dtypes))}"]
            )
        self._codec = build_codec(ctx, error_feedback=ctx.compression.error_feedback)
        self.raw_bytes = 0
        self.payload_bytes = 0
        # Host-side wire buffers, reused every step: the flat gradient (total,) and the result.
        self._flat = torch.empty(self._total, dtype=torch.float32)
        self._averaged = torch.empty(self._total, dtype=torch.float32)
        self._round = 0

    def _participants(self) -> tuple[str, ...]:
        return self._ctx.topology().names

    def _bounds(self, peers: Sequence[str]) -> list[int]:
        return chunk_bounds(self._total, len(peers))

    @staticmethod
    def _chunk(buffer: torch.Tensor, bounds: Sequence[int], rank: int) -> torch.Tensor:
        return buffer[bounds[rank] : bounds[rank + 1]]

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
        return {"chunk": TensorSpec(dtype="float32", shape=(bounds[owner + 1] - bounds[owner],))}

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
        arrived = await ctx.exchange.collect(kind, round_index, others, ctx.config.round_timeout)
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
        missing = [n for n in others if n not in arrived]
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
        missing = [n for n in others if n not in gathered]
        if missing:
            ctx.ledger.record(round_index, missing, started)
            raise AllReduceIncompleteError(round_index, missing)

        averaged_in_rank_order = [own if p == ctx.name else gathered[p].tensors["chunk"] for p in peers]
        await ctx.run_compute(lambda: self._write_back(averaged_in_rank_order, tensors()))
        return ctx.ledger.record(round_index, [], started)

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        """H = 1: average gradients before the optimizer step (what DDP does)."""
        if self._ctx.config.local_steps != 1:
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
        arrived = await ctx.exchange.collect(COMPRESSED_GRADIENTS, step, others, ctx.config.round_timeout)
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
                grad.copy_(decoded[0][name])
                for other in decoded[1:]:
                    grad.add_(other[name])
                grad.div_(len(peers))

        await ctx.run_compute(average)
        return ctx.ledger.record(step, [], started)

    async def after_optimizer_step(self, step: int) -> RoundOutcome | None:
        """H > 1 (local SGD): average the parameters exactly every H steps."""
        local_steps = self._ctx.config.local_steps
        if local_steps == 1 or (step + 1) % local_steps != 0:
            return None
        self._round = step // local_steps
        return await self._average(self._round, lambda: [p.data for _, p in self._ctx.parameters])

    def wants_local_step(self) -> bool:
        return True

    def swarm_step(self) -> int | None:
        return None

    async def finish(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "round": self._round,
            "world_size": len(self._participants()),
            "compression": self._ctx.compression.kind,
            "payload_compression_ratio": self.raw_bytes / self.payload_bytes if self.payload_bytes else None,
        }
