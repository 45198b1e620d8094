"""CHOCO-gossip's public copies (Koloskova et al. 2019, Algorithm 1): pure torch, no I/O.

Gossiping compressed *parameters* naively (x_i <- sum_j w_ij Q(x_j)) does not converge to the
average: every round loses what Q drops. CHOCO keeps *public copies*: every peer holds x̂_i of
itself and x̂_j of each neighbour, sends only q_i = Q(x_i - x̂_i), updates x̂_i += q_i and
x̂_j += q_j on receipt, and takes a consensus step x_i <- x_i + gamma * sum_j w_ij (x̂_j - x̂_i).
Only compressed differences cross the wire.

Trade-offs. It converges linearly with any compressor that keeps a fixed fraction of the
signal, at the price of one fp32 copy of the model per neighbour and an in-order, lossless
stream of updates per edge: a lost q_j leaves this peer's x̂_j behind j's own for good, so the
holder must resync it from a full copy (:meth:`ChocoState.set_public`). The step gamma must
shrink with the fraction the compressor keeps (roughly gamma ~ 3 x ratio for top-k on a ring;
int8 tolerates gamma near 1); the paper's theoretical gamma is far smaller than what works.
Decoding runs the same code on every peer, so the copies agree bit for bit when peers decode on
the same kind of device; PowerSGD's matmul may differ across devices, the elementwise
compressors do not.

The public copies are float32 even for parameters stored in bfloat16 or float16 (they are sums of
many small decoded updates, which a 16-bit copy would round after each one), and the consensus
step is summed in float32 and rounded once into the parameter. A full copy (a resync) therefore
travels as float32.

:class:`ChocoState` is the one implementation: the ``gossip`` strategy with compression
(:mod:`p2pdl.strategies.choco`) wraps it with the wire and the resync protocol, and the tests
simulate swarms with it directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from p2pdl.compression.codec import TensorCodec
from p2pdl.core.mixing import accumulation_dtype

__all__ = ["ChocoState"]


class ChocoState:
    """One peer's public copies: x̂ of itself and of each neighbour, one tensor per parameter name.

    ``like`` names the model's tensors; every copy starts at zero, with their shapes, in their
    accumulation dtype (float32 for 16-bit tensors), on ``device`` (so peers that start together
    start in sync). ``codec`` compresses this peer's
    differences; it is the peer's own (its encoder may keep warm starts), and it decodes what any
    neighbour with the same policy sent. Each round::

        q = state.compress_difference(x)        # send q; x̂_self += decode(q)
        state.apply_update(j, q_j)              # for each neighbour j's q_j (in order, none lost)
        state.consensus_step(x, row, gamma)     # x += gamma * sum_j w_ij (x̂_j - x̂_self)
    """

    def __init__(
        self,
        codec: TensorCodec,
        like: Mapping[str, torch.Tensor],
        neighbours: Iterable[str],
        device: torch.device,
    ) -> None:
        self._codec = codec
        self._like = dict(like)
        self._device = device
        self.public_self: dict[str, torch.Tensor] = self._zeros()
        self._public: dict[str, dict[str, torch.Tensor]] = {name: self._zeros() for name in neighbours}

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {
            name: torch.zeros_like(t, dtype=accumulation_dtype(t.dtype), device=self._device)
            for name, t in self._like.items()
        }

    @property
    def neighbours(self) -> frozenset[str]:
        """The neighbours this peer holds a public copy of."""
        return frozenset(self._public)

    def public(self, neighbour: str) -> Mapping[str, torch.Tensor]:
        """x̂ of ``neighbour`` (read it, do not write it); KeyError for one without a copy."""
        return self._public[neighbour]

    @torch.no_grad()
    def compress_difference(self, parameters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """q = C(x - x̂_self), the wire parts this peer sends; applies q to x̂_self as every holder will."""
        # x - x̂ in the copies' dtype (a 16-bit x is widened, exactly, to float32 first).
        difference = {
            name: x.detach().to(self.public_self[name].dtype) - self.public_self[name] for name, x in parameters.items()
        }
        parts = self._codec.encode(difference)
        for name, delta in self._codec.decode(parts, self._device).items():
            self.public_self[name].add_(delta)
        return parts

    @torch.no_grad()
    def apply_update(self, neighbour: str, parts: Mapping[str, torch.Tensor]) -> None:
        """x̂_neighbour += decode(parts); ``parts`` may be the read-only CPU tensors of a frame.

        KeyError for a neighbour without a copy; :class:`~p2pdl.errors.FrameError` (from the
        decoder) for parts that do not decode, in which case the copy is unchanged.
        """
        public = self._public[neighbour]
        for name, delta in self._codec.decode(parts, self._device).items():
            public[name].add_(delta)

    def set_public(self, neighbour: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace x̂_neighbour by a full copy (a resync after a lost update, or a new neighbour)."""
        self._public[neighbour] = {
            name: t.to(self._device, dtype=accumulation_dtype(self._like[name].dtype), copy=True)
            for name, t in tensors.items()
        }

    def drop(self, neighbour: str) -> None:
        """Forget a neighbour's copy (it is no longer a neighbour)."""
        self._public.pop(neighbour, None)

    @torch.no_grad()
    def consensus_step(
        self, parameters: Sequence[tuple[str, torch.Tensor]], weights: Mapping[str, float], gamma: float
    ) -> None:
        """x <- x + gamma * sum_j w_ij (x̂_j - x̂_self), in place, over the neighbours in ``weights``.

        Only the neighbours named in ``weights`` take part (the caller leaves out those whose
        copy is out of sync); the terms are added one neighbour at a time, in ``weights`` order.
        """
        for name, x in parameters:
            own = self.public_self[name]
            accumulator = x if x.dtype == own.dtype else x.to(own.dtype)  # 16-bit x: a float32 copy
            for neighbour, weight in weights.items():
                accumulator.add_(self._public[neighbour][name] - own, alpha=gamma * weight)
            if accumulator is not x:
                x.copy_(accumulator)
