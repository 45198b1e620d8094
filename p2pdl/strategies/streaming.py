"""``streaming-diloco``: DiLoCo synced one fragment at a time, each sync hidden behind inner steps.

Streaming DiLoCo (Douillard et al. 2025) keeps DiLoCo's H inner steps per outer step, but the
model is cut into F fragments (:func:`~p2pdl.core.fragments.split_fragments`) that sync at
staggered steps (:class:`~p2pdl.core.fragments.FragmentSchedule`), so only one fragment's
bytes are on the wire at a time. After inner step t a fragment's outer gradient
``anchor - current`` is quantized (int8 by default, 4 bits as an option, one float32 scale per
``quant_block`` values: :mod:`p2pdl.core.quantize`) and sent by a background task while
training goes on; after step ``t + overlap_steps`` its average feeds the fragment's outer
Nesterov step, and the new global fragment is merged into the then-current parameters as
``merge_alpha * local + (1 - merge_alpha) * global`` (the paper's mixing; 0.5 by default).

The exchange is an all-gather of the quantized outer gradients among the live members (frame
kind ``sd<f>``, PROTOCOL.md §12). Every peer decodes every contribution, its own included,
from the same bytes, and sums them in float32 in the members' agreed order, so the average,
the anchors and the outer momentum are bit-identical on every peer. The local parameters are
not (each peer keeps ``merge_alpha`` of its own), so the run ends with a full sync of every
fragment after the last step, plain averaging with no mixing: every peer then holds the same
parameters.

Trade-offs: an all-gather sends each fragment to each of the n - 1 others, n / 2 times the
bytes of a reduce-scatter + all-gather, in exchange for one phase, no re-quantization of
partial sums and no group agreement. It is strict: a member missing from a fragment's exchange
(or a contribution that does not decode) raises :class:`~p2pdl.errors.AllReduceIncompleteError`
when the fragment is due, since a partial average would no longer be the same on every peer.
A peer joining mid-run is not supported (the fragments' anchors are not served on ``/state``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from p2pdl.core.fragments import FragmentOuter, FragmentSchedule, split_fragments
from p2pdl.core.quantize import Quantized, QuantKind, dequantize, payload_numel, quantize
from p2pdl.errors import AllReduceIncompleteError, ConfigError, FrameSchemaError, TransportError, UnknownSenderError
from p2pdl.strategies.base import RoundConfig, RoundOutcome, StrategyBase, StrategyContext
from p2pdl.tasks import TaskOwner
from p2pdl.wire import Frame, TensorSpec

FRAGMENT = "sd"  # frame kinds "sd<f>": fragment f's outer gradient (PROTOCOL.md §12)
_CLOSE_TIMEOUT = 5.0  # seconds close() waits for cancelled exchanges
_APPLY_MARGIN = 5.0  # seconds beyond an exchange's own bounds that applying it waits


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamingConfig(RoundConfig):
    """The ``[strategy]`` keys Streaming DiLoCo reads (``local_steps`` is H, the outer period)."""

    fragments: int  # F
    overlap_steps: int  # tau: inner steps between sending a fragment and applying its average
    outer_quant: str  # "int8" | "int4" | "none"
    quant_block: int  # values per float32 scale
    merge_alpha: float  # the local share kept when a fragment's global update lands
    outer_lr: float
    outer_momentum: float


class StreamingDiLoCoStrategy(StrategyBase):
    """Streaming DiLoCo over the live members; owns its fragment schedule and exchange tasks."""

    name = "streaming-diloco"

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        config = self.config = StreamingConfig.from_table(ctx.config)
        sizes = [p.numel() for _, p in ctx.parameters]
        if config.fragments > len(sizes):
            raise ConfigError(
                [f"strategy.fragments = {config.fragments} but the model has only {len(sizes)} parameter tensors"]
            )
        self._ranges = split_fragments(sizes, config.fragments)
        self._outers = [
            FragmentOuter([ctx.parameters[i][1] for i in indices], lr=config.outer_lr, momentum=config.outer_momentum)
            for indices in self._ranges
        ]
        self._schedule = FragmentSchedule(config.local_steps, config.fragments, config.overlap_steps)
        self._kinds = {f"{FRAGMENT}{f}": self._fragment_specs(outer.numel) for f, outer in enumerate(self._outers)}
        self._tasks = TaskOwner(f"{ctx.name}:streaming")
        # fragment -> (the step it was sent after, when, the exchange task yielding the mean outer gradient)
        self._in_flight: dict[int, tuple[int, float, asyncio.Task[torch.Tensor]]] = {}
        self._finished = False
        self.wait_seconds = 0.0  # held waiting for an exchange that was due (the node reads it)
        self.training_wait_seconds = 0.0  # the same, before the last step's full sync
        self.raw_bytes = 0  # the same contributions as float32, for the node's compression ratio
        self.payload_bytes = 0
        self.fragment_syncs = 0
        self.bad_frames = 0

    # ------------------------------------------------------------------ wire

    def _fragment_specs(self, numel: int) -> dict[str, TensorSpec]:
        kind = self.config.outer_quant
        if kind == "none":
            return {"delta": TensorSpec(dtype="float32", shape=(numel,))}
        codes, scales = payload_numel(cast(QuantKind, kind), numel, self.config.quant_block)
        return {
            "codes": TensorSpec(dtype="int8" if kind == "int8" else "uint8", shape=(codes,)),
            "scales": TensorSpec(dtype="float32", shape=(scales,)),
        }

    def _participants(self) -> tuple[str, ...]:
        return self._ctx.topology().names

    def communication_peers(self) -> tuple[str, ...]:
        return tuple(p for p in self._participants() if p != self._ctx.name)

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        if sender not in self._participants():
            raise UnknownSenderError(f"{sender!r} is not a live member of {self._ctx.name!r}'s group")
        specs = self._kinds.get(kind)
        if specs is None:
            raise FrameSchemaError(f"streaming-diloco peers exchange only 'sd<fragment>' frames, got {kind!r}")
        return specs

    def _encode(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """One contribution's tensors (on the CPU, ready for the wire)."""
        kind = self.config.outer_quant
        if kind == "none":
            return {"delta": delta.detach().to("cpu", torch.float32).contiguous()}
        quantized = quantize(delta, cast(QuantKind, kind), self.config.quant_block)
        return {"codes": quantized.codes.cpu(), "scales": quantized.scales.cpu()}

    def _decode(self, fragment: int, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The float32 outer gradient (numel,) a contribution stands for; ValueError if it is bad."""
        numel = self._outers[fragment].numel
        kind = self.config.outer_quant
        if kind == "none":
            delta = tensors["delta"]
            if not bool(torch.isfinite(delta).all()):
                raise ValueError("outer gradient is not finite")
            return delta.to(torch.float32)
        quantized = Quantized(
            kind=cast(QuantKind, kind),
            block=self.config.quant_block,
            numel=numel,
            codes=tensors["codes"],
            scales=tensors["scales"],
        )
        return dequantize(quantized)

    def _mean(
        self, fragment: int, group: Sequence[str], contributions: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> torch.Tensor:
        """The mean of the members' decoded contributions, summed in float32 in the group's order."""
        total = torch.zeros(self._outers[fragment].numel, dtype=torch.float32)
        for member in group:
            total.add_(self._decode(fragment, contributions[member]))
        return total.div_(len(group))

    # ------------------------------------------------------------------ one fragment's exchange

    async def _exchange(self, fragment: int, sent_after: int, group: tuple[str, ...], frame: Frame) -> torch.Tensor:
        """Send this peer's contribution to every other member, collect theirs, average them all.

        Runs as a background task; every await is bounded by ``round_timeout``.
        """
        ctx = self._ctx
        kind = frame.kind
        others = tuple(p for p in group if p != ctx.name)
        try:
            data = await ctx.exchange.encode(frame)
            async with asyncio.timeout(self.config.round_timeout):
                results = await asyncio.gather(
                    *(ctx.exchange.send_encoded(n, data) for n in others), return_exceptions=True
                )
            unsent = {n for n, r in zip(others, results, strict=True) if isinstance(r, TransportError)}
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, TransportError):
                    raise result
            arrived = await ctx.exchange.collect(kind, sent_after, others, self.config.round_timeout)
        except TimeoutError:
            raise AllReduceIncompleteError(sent_after, list(others)) from None
        finally:
            ctx.exchange.advance(kind, sent_after + 1)
        payload = sum(t.numel() * t.element_size() for t in frame.tensors.values())
        self.payload_bytes += payload * (len(others) - len(unsent))
        self.raw_bytes += 4 * self._outers[fragment].numel * (len(others) - len(unsent))
        # A contribution made for another group would average over different members: missing.
        missing = sorted(
            unsent | {n for n in others if n not in arrived or arrived[n].meta.get("group") != ",".join(group)}
        )
        if missing:
            raise AllReduceIncompleteError(sent_after, missing)
        contributions = {n: arrived[n].tensors for n in others}
        contributions[ctx.name] = frame.tensors
        try:
            # Decoding and summing F-th of the model: off the event loop and off the compute thread.
            return await asyncio.to_thread(self._mean, fragment, group, contributions)
        except ValueError as exc:
            self.bad_frames += 1
            bad = [n for n in others if not self._decodes(fragment, contributions[n])]
            raise AllReduceIncompleteError(sent_after, bad or list(others)) from exc

    def _decodes(self, fragment: int, tensors: Mapping[str, torch.Tensor]) -> bool:
        try:
            self._decode(fragment, tensors)
        except ValueError:
            return False
        return True

    async def _send(self, fragment: int, sent_after: int) -> None:
        """Start fragment ``fragment``'s exchange of its outer gradient as of now (after step ``sent_after``)."""
        assert fragment not in self._in_flight, "a fragment's exchange outlived its period"
        outer = self._outers[fragment]
        tensors = await self._ctx.run_compute(lambda: self._encode(outer.outer_gradient()))
        group = self._participants()
        frame = Frame(
            kind=f"{FRAGMENT}{fragment}",
            sender=self._ctx.name,
            round=sent_after,
            step=sent_after,
            meta={"group": ",".join(group)},
            tensors=tensors,
        )
        task = self._tasks.spawn(self._exchange(fragment, sent_after, group, frame), f"{frame.kind}@{sent_after}")
        self._in_flight[fragment] = (sent_after, time.perf_counter(), task)

    async def _settle(self, fragment: int) -> tuple[int, float, torch.Tensor]:
        """Wait (bounded) for fragment ``fragment``'s exchange; its mean outer gradient."""
        sent_after, started, task = self._in_flight.pop(fragment)
        waiting = time.perf_counter()
        try:
            async with asyncio.timeout(3 * self.config.round_timeout + _APPLY_MARGIN):
                mean = await task
        except AllReduceIncompleteError as exc:
            self._ctx.ledger.record(sent_after, exc.missing, started)
            raise
        except TimeoutError:
            self._ctx.ledger.record(sent_after, list(self.communication_peers()), started)
            raise AllReduceIncompleteError(sent_after, list(self.communication_peers())) from None
        finally:
            self.wait_seconds += time.perf_counter() - waiting
        return sent_after, started, mean

    async def _apply(self, fragment: int) -> None:
        """The due fragment's outer step and merge into the live parameters."""
        sent_after, started, mean = await self._settle(fragment)
        outer, alpha = self._outers[fragment], self.config.merge_alpha

        def land() -> None:
            outer.step(mean)
            outer.merge(alpha)

        await self._ctx.run_compute(land)
        self.fragment_syncs += 1
        self._round = sent_after
        self._ctx.ledger.record(sent_after, [], started)

    async def _final_sync(self, steps_completed: int) -> None:
        """Every fragment averaged at once, no outer momentum, no mixing: identical parameters everywhere."""
        for fragment in range(len(self._outers)):
            await self._send(fragment, steps_completed)
        means = [(fragment, (await self._settle(fragment))[2]) for fragment in range(len(self._outers))]

        def land() -> None:
            for fragment, mean in means:
                self._outers[fragment].average(mean)
                self._outers[fragment].merge(0.0)

        await self._ctx.run_compute(land)
        self._round = steps_completed
        self._ctx.ledger.record(steps_completed, [], time.perf_counter())

    # ------------------------------------------------------------------ the node's calls

    async def after_optimizer_step(self, step: int) -> RoundOutcome | None:
        """Start the fragments due after this step, land those whose overlap has run out; after the
        run's last step, land everything and sync every fragment once more."""
        if self._finished:
            return None
        steps_completed = step + 1
        last = self._ctx.last_step
        final = last is not None and step >= last
        if not final:
            for fragment in self._schedule.sends_after(steps_completed):
                await self._send(fragment, steps_completed)
        for fragment in self._schedule.applies_after(steps_completed):
            if (
                fragment in self._in_flight
                and self._in_flight[fragment][0] == steps_completed - self.config.overlap_steps
            ):
                await self._apply(fragment)
        if final:
            self.training_wait_seconds = self.wait_seconds
            for fragment in sorted(self._in_flight):
                await self._apply(fragment)
            await self._final_sync(steps_completed)
            self._finished = True
        return None

    async def close(self) -> None:
        await self._tasks.cancel_all(_CLOSE_TIMEOUT)
        self._in_flight.clear()

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "world_size": len(self._participants()),
            "fragments": [outer.numel for outer in self._outers],
            "fragment_syncs": self.fragment_syncs,
            "outer_steps": [outer.steps for outer in self._outers],
            "in_flight": sorted(self._in_flight),
            "overlap_steps": self.config.overlap_steps,
            "outer_quant": self.config.outer_quant,
            "wait_seconds": round(self.wait_seconds, 6),
            "training_wait_seconds": round(self.training_wait_seconds if self._finished else self.wait_seconds, 6),
            "payload_bytes": self.payload_bytes,
            "payload_compression_ratio": self.raw_bytes / self.payload_bytes if self.payload_bytes else None,
            "bad_frames": self.bad_frames,
            "final_sync": self._finished,
        }
