"""Push-sum gossip over directed, time-varying graphs: pure torch, no I/O.

Symmetric gossip (:mod:`p2pdl.core.mixing` with Metropolis-Hastings rows) needs a doubly stochastic
``W``, which in turn needs every edge to be used in both directions in the same round. Push-sum
(Kempe, Dobra & Gehrke 2003) drops that requirement: each peer ``i`` keeps a numerator ``z_i``
(a list of tensors shaped like the model) and a scalar weight ``w_i``, and in every round it
keeps a share of both and pushes equal shares to its out-neighbours. The shares a peer hands
out sum to one, so the implied mixing matrix ``P`` is only *column* stochastic, yet the
de-biased ratio ``x_i = z_i / w_i`` still converges to the exact average of the initial ``x``
on any strongly connected (or jointly, over a period, strongly connected) directed graph,
because ``sum_i z_i`` and ``sum_i w_i`` are both conserved and the ratio cancels the bias
that column-stochastic mixing puts on each of them.

Stochastic Gradient Push (SGP, Assran et al. 2019) interleaves this with local SGD steps on
the one-peer exponential graph: in round ``t`` peer ``i`` sends to exactly one peer,
``(i + 2^(t mod ceil(log2 n))) mod n``. Each round costs one message per peer (the cheapest
possible) and, with uniform 1/2 shares and ``n`` a power of two, ``log2 n`` consecutive rounds
average *exactly*, like a butterfly all-reduce, without any peer ever waiting on two senders.
For other ``n`` the map ``i -> i + 2^k`` is still a permutation, so every peer receives exactly
one message per round and all weights stay at 1, but the average is only reached
geometrically.

Trade-offs. Push-sum tolerates asymmetric links and one-way schedules, but (a) each message
carries one extra scalar, (b) a lost message loses mass: the weight and numerator it carried
vanish, which biases the consensus towards the peers whose messages got through. A sender
that knows its push failed should therefore keep that share itself (add it to its
``keep_share``), which conserves mass exactly. (c) With weights far from 1, ``x = z / w`` is
computed in the parameters' dtype; for float32 this is harmless for weights in, say,
[1e-3, 1e3], which any connected schedule stays well within.

How a trainer uses this (the SGP update implemented here). The model parameters hold the
de-biased ``x_i`` so that the forward pass, the backward pass and the local optimizer need no
changes; ``w_i`` lives beside them. One SGP iteration is then:

1. local step on ``x``: the optimizer computes ``x <- x - lr * u`` with ``u`` its update
   direction (plain SGD: ``u = grad f(x)``);
2. gossip: :func:`pushsum_outgoing` builds the message ``(s * w, s * w * x)`` for each
   out-neighbour, and :func:`pushsum_mix_debiased` turns ``x`` into ``z = w * x``, mixes in
   place with ``keep_share = s`` and the messages received, and divides by the new weight.

In numerator terms step 1 is ``z <- z - lr * w * u``: the step the paper writes as
``z <- z - lr * grad f(x)``, scaled by ``w``. The two coincide whenever ``w == 1``, which is
always the case on the one-peer exponential schedule with uniform shares (every peer receives
exactly one message per round), and for other schedules ``w`` stays close to 1. A caller that
wants the paper's update exactly under plain SGD divides the gradient by ``w`` before the step
(:func:`paper_gradient_scale`). The lower-level :class:`PushSumState`, :func:`pushsum_mix`,
:func:`debias` and :func:`rebias` expose the numerator form directly for callers (and tests)
that keep ``z`` as the stored state instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "PushSumState",
    "debias",
    "debias_",
    "one_peer_exponential_matrix",
    "one_peer_exponential_sources",
    "one_peer_exponential_target",
    "paper_gradient_scale",
    "pushsum_matrix",
    "pushsum_mix",
    "pushsum_mix_debiased",
    "pushsum_outgoing",
    "pushsum_schedule_period",
    "rebias",
    "rebias_",
    "uniform_share",
]

# A message is (weight share, numerator shares): what one sender pushes to one receiver.
PushSumMessage = tuple[float, Sequence[torch.Tensor]]


def pushsum_schedule_period(n: int) -> int:
    """``ceil(log2 n)``, at least 1: the number of distinct offsets of the one-peer schedule."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    # (n - 1).bit_length() is ceil(log2 n) in exact integer arithmetic (no float log rounding).
    return max(1, (n - 1).bit_length())


def _one_peer_offset(n: int, round_index: int) -> int:
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    # 2^k < n for every k < ceil(log2 n), so the offset is never 0 mod n: no self-sends for n > 1.
    return 1 << (round_index % pushsum_schedule_period(n))


def _check_index(index: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= index < n:
        raise ValueError(f"index must be in [0, {n}), got {index}")


def one_peer_exponential_target(index: int, n: int, round_index: int) -> int:
    """The one peer that ``index`` pushes to in round ``round_index``.

    ``(index + 2^(round_index mod ceil(log2 n))) mod n``. For ``n == 1`` this is ``index``
    itself, which callers treat as "send nothing, keep everything" (out-degree 0).
    """
    _check_index(index, n)
    if n == 1:
        return index
    return (index + _one_peer_offset(n, round_index)) % n


def one_peer_exponential_sources(index: int, n: int, round_index: int) -> list[int]:
    """The peers that push to ``index`` in round ``round_index`` (its in-neighbours).

    The schedule is a cyclic shift, hence a permutation: every peer has exactly one source
    for ``n > 1`` (``index - 2^k mod n``) and none for ``n == 1``.
    """
    _check_index(index, n)
    if n == 1:
        return []
    return [(index - _one_peer_offset(n, round_index)) % n]


def uniform_share(out_degree: int) -> float:
    """The column-stochastic share ``1 / (out_degree + 1)``: kept once and sent to each out-neighbour."""
    if out_degree < 0:
        raise ValueError(f"out_degree must be >= 0, got {out_degree}")
    return 1.0 / (out_degree + 1)


def _check_weight(weight: float, what: str) -> None:
    # Weights come (indirectly) off the wire: reject NaN/inf and non-positive values, which
    # would turn z / w into garbage for every later round.
    if not math.isfinite(weight) or weight <= 0.0:
        raise ValueError(f"{what} must be finite and > 0, got {weight!r}")


def _check_incoming(incoming: Sequence[PushSumMessage]) -> float:
    total = 0.0
    for position, (weight, _) in enumerate(incoming):
        if not math.isfinite(weight) or weight < 0.0:
            raise ValueError(f"incoming[{position}] weight must be finite and >= 0, got {weight!r}")
        total += weight
    return total


def _matching(incoming: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``incoming`` on ``like``'s device and dtype (wire buffers arrive on the CPU)."""
    if incoming.device != like.device or incoming.dtype != like.dtype:
        return incoming.to(device=like.device, dtype=like.dtype)
    return incoming


@dataclass(slots=True)
class PushSumState:
    """One peer's push-sum state in numerator form: ``z`` (tensors shaped like the model) and ``w``.

    ``x = z / w`` is the estimate of the network average; :meth:`debiased` computes it.
    """

    numerators: list[torch.Tensor]
    weight: float = 1.0

    def outgoing_share(self, out_degree: int) -> float:
        """Column-stochastic share: keep ``1/(d+1)`` and send ``1/(d+1)`` to each of ``d`` out-neighbours."""
        return uniform_share(out_degree)

    @torch.no_grad()
    def message(self, share: float) -> tuple[float, list[torch.Tensor]]:
        """``(share * w, [share * z])``: what this peer pushes to one out-neighbour (new tensors)."""
        return share * self.weight, [share * z for z in self.numerators]

    def mix(self, keep_share: float, incoming: Sequence[PushSumMessage]) -> None:
        """``z <- keep_share * z + sum z_in``, ``w <- keep_share * w + sum w_in``, in place."""
        self.weight = pushsum_mix(self.numerators, self.weight, keep_share, incoming)

    def debiased(self) -> list[torch.Tensor]:
        """``x = z / w`` as new tensors."""
        return debias(self.numerators, self.weight)


@torch.no_grad()
def pushsum_mix(
    numerators: Sequence[torch.Tensor],
    weight: float,
    keep_share: float,
    incoming: Sequence[PushSumMessage],
) -> float:
    """``z <- keep_share * z + sum_j z_j``, in place; return ``keep_share * w + sum_j w_j``.

    ``incoming`` holds ``(w_j, z_j)`` pairs that the *sender* already scaled by its share, with
    tensors in the order and shapes of ``numerators``; they may live on another device or
    dtype (wire buffers on the CPU) and are moved once each.
    """
    if not math.isfinite(keep_share) or not 0.0 <= keep_share <= 1.0:
        raise ValueError(f"keep_share must be in [0, 1], got {keep_share!r}")
    if not math.isfinite(weight) or weight < 0.0:
        raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
    incoming_weight = _check_incoming(incoming)
    for _, tensors in incoming:
        if len(tensors) != len(numerators):
            raise ValueError(f"an incoming message has {len(tensors)} tensors, expected {len(numerators)}")
    for position, numerator in enumerate(numerators):
        numerator.mul_(keep_share)
        for _, tensors in incoming:
            numerator.add_(_matching(tensors[position], numerator))
    return keep_share * weight + incoming_weight


@torch.no_grad()
def debias(numerators: Sequence[torch.Tensor], weight: float) -> list[torch.Tensor]:
    """``x = z / w`` as new tensors."""
    _check_weight(weight, "weight")
    return [z / weight for z in numerators]


@torch.no_grad()
def rebias(parameters: Sequence[torch.Tensor], weight: float) -> list[torch.Tensor]:
    """``z = w * x`` as new tensors: the numerators of de-biased ``parameters`` at weight ``w``."""
    _check_weight(weight, "weight")
    return [x * weight for x in parameters]


@torch.no_grad()
def debias_(tensors: Sequence[torch.Tensor], weight: float) -> None:
    """In place ``z -> z / w`` (numerators become de-biased parameters)."""
    _check_weight(weight, "weight")
    for tensor in tensors:
        tensor.div_(weight)


@torch.no_grad()
def rebias_(tensors: Sequence[torch.Tensor], weight: float) -> None:
    """In place ``x -> w * x`` (de-biased parameters become numerators)."""
    _check_weight(weight, "weight")
    for tensor in tensors:
        tensor.mul_(weight)


@torch.no_grad()
def pushsum_outgoing(
    parameters: Sequence[torch.Tensor], weight: float, share: float
) -> tuple[float, list[torch.Tensor]]:
    """The message for one out-neighbour when ``parameters`` hold de-biased ``x``.

    Returns ``(share * w, [share * w * x])`` as new tensors (on ``parameters``' device; the
    caller moves them to the wire). Build every message of a round *before* calling
    :func:`pushsum_mix_debiased`, which overwrites ``parameters``.
    """
    _check_weight(weight, "weight")
    if not math.isfinite(share) or not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share!r}")
    scale = share * weight
    return scale, [x * scale for x in parameters]


@torch.no_grad()
def pushsum_mix_debiased(
    parameters: Sequence[torch.Tensor],
    weight: float,
    keep_share: float,
    incoming: Sequence[PushSumMessage],
) -> float:
    """One push-sum round when ``parameters`` hold de-biased ``x``; returns the new weight.

    In place: ``x <- (keep_share * w * x + sum_j z_j) / (keep_share * w + sum_j w_j)``, i.e.
    rebias, :func:`pushsum_mix`, debias, fused into one pass per tensor. ``incoming`` is as for
    :func:`pushsum_mix` (messages from :func:`pushsum_outgoing`).
    """
    _check_weight(weight, "weight")
    if not math.isfinite(keep_share) or not 0.0 <= keep_share <= 1.0:
        raise ValueError(f"keep_share must be in [0, 1], got {keep_share!r}")
    new_weight = keep_share * weight + _check_incoming(incoming)
    # Keeping nothing and receiving nothing would leave z = 0, w = 0: the peer has lost all of
    # its mass and x is undefined. Refuse rather than divide by zero.
    _check_weight(new_weight, "the new push-sum weight")
    for _, tensors in incoming:
        if len(tensors) != len(parameters):
            raise ValueError(f"an incoming message has {len(tensors)} tensors, expected {len(parameters)}")
    for position, parameter in enumerate(parameters):
        parameter.mul_(keep_share * weight)
        for _, tensors in incoming:
            parameter.add_(_matching(tensors[position], parameter))
        parameter.div_(new_weight)
    return new_weight


def paper_gradient_scale(weight: float) -> float:
    """``1 / w``: multiply the gradient by this before a plain-SGD step on ``x`` to get SGP's ``z <- z - lr * grad``.

    A step ``x <- x - lr * g / w`` is ``z = w * x <- z - lr * g`` exactly. Without it the step
    is ``z <- z - lr * w * g`` (see the module docstring); both are 1 on the uniform one-peer
    exponential schedule.
    """
    _check_weight(weight, "weight")
    return 1.0 / weight


def pushsum_matrix(out_neighbours: Sequence[Sequence[int]]) -> npt.NDArray[np.float64]:
    """The column-stochastic ``P`` of one round with uniform shares: ``z_new = P @ z``.

    ``out_neighbours[i]`` lists whom peer ``i`` pushes to (no self, no repeats). Column ``i``
    has ``1/(d_i + 1)`` on row ``i`` and on each out-neighbour's row.
    """
    n = len(out_neighbours)
    matrix = np.zeros((n, n), dtype=np.float64)
    for sender, targets in enumerate(out_neighbours):
        if len(set(targets)) != len(targets) or sender in targets:
            raise ValueError(f"out_neighbours[{sender}] must list distinct peers other than {sender}")
        share = uniform_share(len(targets))
        matrix[sender, sender] = share
        for target in targets:
            if not 0 <= target < n:
                raise ValueError(f"out_neighbours[{sender}] names peer {target}, not in [0, {n})")
            matrix[target, sender] = share
    return matrix


def one_peer_exponential_matrix(n: int, round_index: int) -> npt.NDArray[np.float64]:
    """``P`` of round ``round_index`` on the one-peer exponential graph with 1/2 shares."""
    if n == 1:
        return np.ones((1, 1), dtype=np.float64)
    return pushsum_matrix([[one_peer_exponential_target(i, n, round_index)] for i in range(n)])
