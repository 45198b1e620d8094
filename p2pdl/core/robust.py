"""Robust parameter mixing against faulty or malicious neighbours: pure torch, no I/O.

Plain gossip (:func:`p2pdl.core.mixing.mix_into`) is a weighted mean, so one neighbour that sends
parameters scaled by 1000 (a bug, a bit flip, an attacker) drags every peer it talks to
arbitrarily far in a single round, and gossip then spreads the damage to the whole network.
:mod:`p2pdl.wire.decode` already refuses NaN/inf and wrong shapes; this module bounds what *finite but
wrong* values can do. Two rules, with different trade-offs:

* :func:`clipped_gossip` is self-centered clipping (He, Karimireddy & Jaggi 2022, "Byzantine-
  robust decentralized learning via ClippedGossip"): ``x_i <- x_i + sum_j w_ij clip(x_j - x_i,
  τ)``, where ``clip`` scales the *whole* difference (all tensors jointly, L2 norm) down to at
  most ``τ``. One round can move an honest peer by at most ``τ * sum_j w_ij``, however bad the
  neighbours, while honest neighbours that are already within ``τ`` are mixed exactly as plain
  gossip would mix them, so the convergence of the honest peers is unchanged once they agree to
  within ``τ``. The cost is one extra pass to compute the difference norms (and one host sync
  for them), and the choice of ``τ``: too small slows honest consensus, too large lets a
  Byzantine neighbour push ``τ`` per round. :func:`adaptive_radius` sets it from the observed
  norms.
* :func:`trimmed_mean` is the coordinate-wise trimmed mean over self and neighbours: per
  coordinate, drop the ``trim`` largest and smallest values and average the rest. It ignores up
  to ``trim`` arbitrary neighbours exactly, with no radius to tune, but it needs every
  neighbour's full tensors at once (memory ``count`` times one tensor, sorted), treats all
  neighbours with equal weight (so it is not a doubly stochastic mixing step and biases the
  consensus on irregular graphs), and discards honest information even when nobody misbehaves.

Everything runs on ``local``'s device; neighbour tensors (wire buffers, usually on the CPU)
are moved per tensor when used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ClippingReport",
    "RadiusRule",
    "adaptive_radius",
    "clipped_gossip",
    "difference_norms",
    "trimmed_mean",
]

# A radius rule maps this round's difference norms (one per contribution, in order; inf or nan
# for a non-finite difference) to the clipping radius.
RadiusRule = Callable[[Sequence[float]], float]


@dataclass(frozen=True, slots=True)
class ClippingReport:
    """What :func:`clipped_gossip` did, one entry per contribution in the order given.

    ``scales[j]`` is the factor applied to ``x_j - x_i``: 1 when within the radius, in (0, 1)
    when clipped, 0 when the difference was not finite and the neighbour was dropped (its weight
    moved to self).
    """

    radius: float
    difference_norms: tuple[float, ...]
    scales: tuple[float, ...]

    @property
    def clipped_count(self) -> int:
        """Neighbours whose difference was scaled down (not counting dropped ones)."""
        return sum(1 for scale in self.scales if 0.0 < scale < 1.0)

    @property
    def dropped_count(self) -> int:
        """Neighbours whose difference was not finite and got no weight."""
        return sum(1 for scale in self.scales if scale == 0.0)

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for logs and ``/status``."""
        finite = [norm for norm in self.difference_norms if math.isfinite(norm)]
        return {
            "radius": self.radius,
            "neighbours": float(len(self.scales)),
            "clipped": float(self.clipped_count),
            "dropped": float(self.dropped_count),
            "max_difference_norm": max(finite, default=0.0),
            "mean_difference_norm": math.fsum(finite) / len(finite) if finite else 0.0,
        }


def _matching(incoming: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``incoming`` on ``like``'s device and dtype (wire buffers arrive on the CPU)."""
    if incoming.device != like.device or incoming.dtype != like.dtype:
        return incoming.to(device=like.device, dtype=like.dtype)
    return incoming


def _check_tensors(local: Sequence[torch.Tensor], neighbours: Sequence[Sequence[torch.Tensor]]) -> None:
    for position, tensor in enumerate(local):
        if not tensor.is_floating_point():
            raise ValueError(f"local[{position}] has dtype {tensor.dtype}; only floating point is mixed")
    for index, tensors in enumerate(neighbours):
        if len(tensors) != len(local):
            raise ValueError(f"neighbour {index} sent {len(tensors)} tensors, expected {len(local)}")
        for position, (mine, theirs) in enumerate(zip(local, tensors, strict=True)):
            if theirs.shape != mine.shape:
                raise ValueError(
                    f"neighbour {index} tensor {position} has shape {tuple(theirs.shape)}, expected {tuple(mine.shape)}"
                )


def _check_weights(self_weight: float, weights: Sequence[float]) -> None:
    for label, weight in (("self_weight", self_weight), *((f"weight {j}", w) for j, w in enumerate(weights))):
        if not math.isfinite(weight) or weight < 0.0:
            raise ValueError(f"{label} must be finite and >= 0, got {weight!r}")


@torch.no_grad()
def difference_norms(local: Sequence[torch.Tensor], neighbours: Sequence[Sequence[torch.Tensor]]) -> list[float]:
    """``||x_j - x_i||`` over all tensors jointly, for each neighbour ``j``; inf or nan if not finite.

    Per-tensor norms are taken on the device (in float32 for 16-bit tensors, which would lose
    the small differences) and combined on the host with ``math.hypot``, after a single
    device-to-host copy for all neighbours. A difference whose norm overflows the tensors'
    dtype reads as inf, and :func:`clipped_gossip` then drops that neighbour.
    """
    _check_tensors(local, neighbours)
    if not neighbours or not local:
        return [0.0] * len(neighbours)
    per_tensor: list[torch.Tensor] = []  # (neighbours * tensors) 0-dim norms, neighbour-major
    for tensors in neighbours:
        for mine, theirs in zip(local, tensors, strict=True):
            norm_dtype = torch.float32 if mine.dtype in (torch.float16, torch.bfloat16) else mine.dtype
            per_tensor.append(torch.linalg.vector_norm(_matching(theirs, mine) - mine, dtype=norm_dtype))
    common = per_tensor[0].dtype
    for norm in per_tensor[1:]:
        common = torch.promote_types(common, norm.dtype)
    values = torch.stack([norm.to(common) for norm in per_tensor]).cpu().tolist()
    count = len(local)
    return [math.hypot(*values[j * count : (j + 1) * count]) for j in range(len(neighbours))]


def adaptive_radius(
    norms: Sequence[float], *, quantile: float = 0.5, scale: float = 1.0, minimum: float = 0.0
) -> float:
    """A radius rule: ``max(minimum, scale * q)`` with ``q`` the lower ``quantile`` of the finite ``norms``.

    "Lower" means an observed value (index ``floor(quantile * (k - 1))`` of the sorted ``k``
    finite norms), never an interpolation towards an outlier. With the default median and
    ``b`` Byzantine neighbours out of ``k``, the chosen norm is at most the largest honest
    difference whenever ``floor((k - 1) / 2) < k - b``, i.e. a minority of bad neighbours cannot
    inflate the radius; honest neighbours beyond it are clipped, not ignored, so consensus
    still progresses. This is an unweighted take on the adaptive rule of He et al. (2022),
    which clips the neighbours with the largest differences up to a chosen share of the weight.
    Use it as ``clipped_gossip(..., radius=adaptive_radius)`` or through ``functools.partial``.
    """
    if not math.isfinite(quantile) or not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    if not math.isfinite(minimum) or minimum < 0.0:
        raise ValueError(f"minimum must be finite and >= 0, got {minimum!r}")
    finite = sorted(norm for norm in norms if math.isfinite(norm))
    if not finite:
        return minimum
    chosen = finite[math.floor(quantile * (len(finite) - 1))]
    return max(minimum, scale * chosen)


@torch.no_grad()
def clipped_gossip(
    local: Sequence[torch.Tensor],
    self_weight: float,
    contributions: Sequence[tuple[float, Sequence[torch.Tensor]]],
    radius: float | RadiusRule,
) -> ClippingReport:
    """Self-centered clipping, in place: ``x_i <- x_i + sum_j w_ij clip(x_j - x_i, τ)``.

    ``contributions`` holds ``(w_ij, tensors of j)`` as for :func:`p2pdl.core.mixing.mix_into`.
    In general the update is ``x_i <- (w_ii + sum_j w_ij) x_i + sum_j w_ij s_j (x_j - x_i)``
    with ``s_j = min(1, τ / ||x_j - x_i||)``; for a stochastic row (``w_ii + sum_j w_ij = 1``)
    it is the formula above, and with ``τ = inf`` it equals ``mix_into``. A neighbour whose
    difference is not finite gets ``s_j = 0``: its weight stays with self, as for a neighbour
    that did not arrive in a gossip round. ``radius`` is ``τ`` (>= 0,
    ``math.inf`` allowed) or a :data:`RadiusRule` applied to this round's difference norms.
    """
    weights = [weight for weight, _ in contributions]
    _check_weights(self_weight, weights)
    norms = difference_norms(local, [tensors for _, tensors in contributions])
    chosen = radius(norms) if callable(radius) else radius
    if math.isnan(chosen) or chosen < 0.0:
        raise ValueError(f"radius must be >= 0, got {chosen!r}")
    scales = []
    for norm in norms:
        if not math.isfinite(norm):
            scales.append(0.0)
        elif norm <= chosen:
            scales.append(1.0)
        else:
            scales.append(chosen / norm)
    total_weight = self_weight + math.fsum(weights)
    for position, tensor in enumerate(local):
        # accumulated: sum_j w_ij s_j (x_j - x_i), shape of the tensor. Accumulated apart from
        # x_i so that every difference is taken against the same, not yet updated, x_i.
        accumulated = torch.zeros_like(tensor)
        for (weight, tensors), scale in zip(contributions, scales, strict=True):
            if weight == 0.0 or scale == 0.0:
                continue
            accumulated.add_(_matching(tensors[position], tensor) - tensor, alpha=weight * scale)
        tensor.mul_(total_weight).add_(accumulated)
    return ClippingReport(radius=float(chosen), difference_norms=tuple(norms), scales=tuple(scales))


@torch.no_grad()
def trimmed_mean(local: Sequence[torch.Tensor], neighbours: Sequence[Sequence[torch.Tensor]], trim: int) -> None:
    """Coordinate-wise trimmed mean over self and ``neighbours``, written into ``local`` in place.

    Per coordinate, the ``trim`` largest and ``trim`` smallest of the ``count = 1 +
    len(neighbours)`` values are dropped and the remaining ``count - 2 * trim`` averaged;
    requires ``2 * trim < count``. ``trim = 0`` is the plain (unweighted) mean. NaN sorts above
    every number, so up to ``trim`` NaN senders per coordinate are trimmed away too.
    """
    count = 1 + len(neighbours)
    if trim < 0 or 2 * trim >= count:
        raise ValueError(f"trim must satisfy 0 <= 2 * trim < {count} (self + neighbours), got {trim}")
    _check_tensors(local, neighbours)
    for position, tensor in enumerate(local):
        # stacked: (count, *tensor.shape); sorted along the peer axis, per coordinate.
        stacked = torch.stack([tensor, *(_matching(tensors[position], tensor) for tensors in neighbours)])
        kept = torch.sort(stacked, dim=0).values.narrow(0, trim, count - 2 * trim)
        tensor.copy_(kept.mean(dim=0))


class OutlierClipper:
    """Clipped gossip with a radius learnt from history, and rejection of far outliers.

    Plain self-centred clipping with a radius taken from the current round (:func:`adaptive_radius`)
    lets a neighbour that always pulls towards the same far point move this peer by ``w * radius``
    every round, in the same direction: with a ring's two neighbours the radius then grows with the
    drift and the honest peers are dragged away by a single attacker that scales its parameters.
    So the reference distance is the median of the last ``history``
    *accepted* neighbour distances, a neighbour farther than ``reject_factor`` x reference is
    dropped for the round (its weight stays home), and the others are clipped to ``radius``
    (default: 2 x reference). Trade-off: an honest neighbour that is genuinely far (the other side
    of a healed partition) is rejected too; robust mixing assumes honest neighbours stay close.
    """

    def __init__(self, *, radius: float = 0.0, reject_factor: float = 10.0, history: int = 64) -> None:
        if radius < 0 or reject_factor <= 1 or history < 1:
            raise ValueError("radius must be >= 0, reject_factor > 1 and history >= 1")
        self.radius = radius
        self.reject_factor = reject_factor
        self._accepted: list[float] = []
        self._history = history
        self.rejected = 0
        self.clipped = 0

    def reference(self, norms: Sequence[float]) -> float:
        if self._accepted:
            ordered = sorted(self._accepted)
            return ordered[len(ordered) // 2]
        finite = sorted(n for n in norms if math.isfinite(n))
        return finite[0] if finite else 0.0

    @torch.no_grad()
    def mix(
        self,
        local: Sequence[torch.Tensor],
        self_weight: float,
        contributions: Sequence[tuple[float, Sequence[torch.Tensor]]],
    ) -> ClippingReport:
        norms = difference_norms(local, [tensors for _, tensors in contributions])
        reference = self.reference(norms)
        limit = self.reject_factor * reference if reference > 0 else math.inf
        kept: list[tuple[float, Sequence[torch.Tensor]]] = []
        home = self_weight
        for (weight, tensors), norm in zip(contributions, norms, strict=True):
            if not math.isfinite(norm) or norm > limit:
                home += weight  # rejected: its weight stays with this peer
                self.rejected += 1
                continue
            kept.append((weight, tensors))
            self._accepted.append(norm)
        del self._accepted[: -self._history]
        radius = self.radius if self.radius > 0 else max(2.0 * reference, 1e-12)
        report = clipped_gossip(local, home, kept, radius)
        self.clipped += report.clipped_count
        return report
