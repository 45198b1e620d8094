"""``gossip`` with compression: CHOCO-gossip (Koloskova et al. 2019) over the wire.

The math (public copies, compressed differences, the consensus step) is
:class:`p2pdl.compression.choco.ChocoState`; this module adds the rounds, the frames and the
resync protocol that keeps the copies consistent under churn.

The public copies stay consistent only if every q_j reaches every neighbour. A round whose frame
from j is missing (a timeout, a rewiring, a joiner) marks j *out of sync*: this peer leaves j out
of the consensus step and asks j, in the ``resync`` meta of its next frame, for a full float32 copy
of x̂_j, which j sends along with its next compressed frame. Trade-off: one missed frame costs one
full-size message on that edge, instead of silently diverging copies.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from p2pdl.compression.choco import ChocoState
from p2pdl.compression.codec import TensorCodec
from p2pdl.core.topology import mh_weight
from p2pdl.errors import FrameError, FrameSchemaError, UnknownSenderError
from p2pdl.strategies.base import (
    MAX_ROUND_LEAD,
    RoundConfig,
    RoundOutcome,
    StrategyBase,
    StrategyContext,
    reported_degree,
)
from p2pdl.wire import Frame, TensorSpec

CHOCO = "choco"
CHOCO_FULL = "choco_full"
_MAX_META = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class ChocoConfig(RoundConfig):
    """The ``[strategy]`` keys CHOCO-gossip reads (its step size is ``compression.choco_gamma``)."""


class ChocoGossipStrategy(StrategyBase):
    name = "gossip"

    def __init__(self, ctx: StrategyContext, codec: TensorCodec) -> None:
        super().__init__(ctx)
        self.config = ChocoConfig.from_table(ctx.config)
        self._codec = codec
        self._gamma = ctx.compression.choco_gamma
        self._wire_specs = codec.wire_specs()
        # Every peer starts with all public copies at zero, so the initial neighbours are in sync.
        self._in_sync: set[str] = set(self._neighbors())
        self._state = ChocoState(codec, dict(ctx.parameters), self._in_sync, ctx.device)
        # A full copy is a public copy: float32 for 16-bit parameters (see ChocoState).
        self._full_specs = {name: TensorSpec.of_tensor(t) for name, t in self._state.public_self.items()}
        self._owe_full: set[str] = set()
        self._asked: set[str] = set()  # neighbours asked for a full copy in the last frame sent
        self.refused: Counter[str] = Counter()
        self.resyncs_requested = 0
        self.resyncs_served = 0
        self.raw_bytes = 0
        self.payload_bytes = 0

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        if sender not in self._neighbors():
            raise UnknownSenderError(f"{sender!r} is not a current neighbour of {self._ctx.name!r}")
        if kind == CHOCO:
            return self._wire_specs
        if kind == CHOCO_FULL:
            return self._full_specs
        raise FrameSchemaError(f"compressed gossip exchanges {CHOCO!r}/{CHOCO_FULL!r} frames, got {kind!r}")

    def _compress_difference(self) -> dict[str, torch.Tensor]:
        return self._state.compress_difference(dict(self._ctx.parameters))

    async def _parameter_round(self, step: int) -> RoundOutcome | None:
        ctx = self._ctx
        if (step + 1) % self.config.local_steps != 0:
            return None
        started = time.perf_counter()
        neighbors = self._neighbors()
        for gone in self._state.neighbours - set(neighbors):
            self._state.drop(gone)
            self._in_sync.discard(gone)
        round_index = step // self.config.local_steps
        ahead = ctx.exchange.highest_round(CHOCO, neighbors)
        if ahead is not None and round_index < ahead <= round_index + MAX_ROUND_LEAD:
            round_index = ahead
            # The compressed differences of the rounds skipped are lost to our public copies of
            # every neighbour: ask them all for full copies rather than drift silently.
            self._in_sync.clear()
        self._round = round_index
        parts = await ctx.run_compute(self._compress_difference)
        wanted = [n for n in neighbors if n not in self._in_sync]
        self.resyncs_requested += len(wanted)
        meta: dict[str, str | int | float | bool | None] = {
            "degree": len(neighbors),
            "resync": ",".join(wanted)[:_MAX_META],
        }
        frame = Frame(kind=CHOCO, sender=ctx.name, round=round_index, step=step, meta=meta, tensors=parts)
        await ctx.exchange.broadcast(frame, neighbors)
        owed = [n for n in self._owe_full if n in neighbors]
        if owed:
            full = Frame(
                kind=CHOCO_FULL, sender=ctx.name, round=round_index, step=step, tensors=dict(self._state.public_self)
            )
            await ctx.exchange.broadcast(full, owed)
            self.resyncs_served += len(owed)
        self._owe_full.clear()
        payload = sum(t.numel() * t.element_size() for t in parts.values())
        self.raw_bytes += self._codec.raw_bytes * len(neighbors)
        self.payload_bytes += payload * len(neighbors)
        arrived = await ctx.exchange.collect(CHOCO, round_index, neighbors, self.config.round_timeout)
        ctx.exchange.advance(CHOCO, round_index + 1)
        # A neighbour asked for a full copy in the previous round sends it right after its compressed
        # frame of this round; only a full copy of *this* round matches the compressed one we hold.
        asked_last_round = [n for n in self._asked if n in arrived]
        fulls = await ctx.exchange.collect(CHOCO_FULL, round_index, asked_last_round, self.config.round_timeout)
        ctx.exchange.advance(CHOCO_FULL, round_index + 1)
        self._asked = set(wanted)
        for sender, received in arrived.items():
            asked = received.meta.get("resync")
            if isinstance(asked, str) and ctx.name in asked.split(","):
                self._owe_full.add(sender)
        graph = ctx.topology()
        own_degree = len(neighbors)
        weights = {n: mh_weight(own_degree, reported_degree(f, graph, n, own_degree)) for n, f in arrived.items()}

        def update_and_mix() -> None:
            for sender, received in arrived.items():
                full = fulls.get(sender)
                if full is not None:
                    # The sender's public copy after this round's update: q_j is already in it.
                    self._state.set_public(sender, full.tensors)
                    self._in_sync.add(sender)
                elif sender in self._in_sync:
                    try:
                        self._state.apply_update(sender, received.tensors)
                    except FrameError as exc:
                        # Well-formed but undecodable (indices out of range, overflow): count it
                        # and treat the neighbour as out of sync, so a full copy is requested.
                        self.refused[exc.reason] += 1
                        self._in_sync.discard(sender)
            for neighbor in neighbors:
                if neighbor not in arrived:
                    self._in_sync.discard(neighbor)  # its q for this round is lost to us
            in_sync = {sender: weight for sender, weight in weights.items() if sender in self._in_sync}
            self._state.consensus_step(ctx.parameters, in_sync, self._gamma)

        await ctx.run_compute(update_and_mix)
        missing = [n for n in neighbors if n not in arrived]
        return ctx.ledger.record(round_index, missing, started)

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "compression": self._ctx.compression.kind,
            "choco_gamma": self._gamma,
            "neighbors": list(self._neighbors()),
            "in_sync": sorted(self._in_sync),
            "resyncs_requested": self.resyncs_requested,
            "resyncs_served": self.resyncs_served,
            "undecodable_frames": dict(self.refused),
            "payload_compression_ratio": self.raw_bytes / self.payload_bytes if self.payload_bytes else None,
        }
