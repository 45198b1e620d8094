"""Streaming DiLoCo's fragments, their staggered schedule and their outer step: pure torch, no I/O.

Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication")
splits the model into ``F`` fragments and syncs one fragment at a time instead of the whole
model every ``H`` inner steps. Fragment ``f`` syncs after the inner steps ``t`` with
``(t - offset_f) % H == 0`` (``t`` counted from 1), the offsets spread evenly over ``H``: each
parameter is still synced once per ``H`` steps, but the bytes on the wire at any moment are
one fragment's, so the peak bandwidth drops by about ``F``. Each sync also overlaps ``tau``
inner steps: the fragment's outer gradient (``anchor - current``) is sent after step ``t`` and
its average is applied after step ``t + tau``, merged into the then-current parameters as
``alpha * local + (1 - alpha) * global``.

:func:`split_fragments` cuts the parameter list into contiguous runs (whole tensors, so a
fragment is a few consecutive layers) with sizes as equal as the tensor boundaries allow;
:class:`FragmentSchedule` says which fragments send and which apply after a step; and
:class:`FragmentOuter` is one fragment's anchor and outer Nesterov momentum, the same update
as :class:`~p2pdl.core.outer.OuterOptimizer` but fed the averaged outer gradient itself (what
the peers exchange) and written into the model by a merge instead of a copy.

Trade-offs: fragments are whole tensors, so with one huge tensor (an embedding) the balance
is only as good as that tensor allows; offsets are distinct only when ``F <= H``, which the
config requires. The anchor and momentum of a fragment are float32 flat vectors (two extra
copies of the model, as in DiLoCo).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["FragmentOuter", "FragmentSchedule", "split_fragments"]


def split_fragments(sizes: Sequence[int], count: int) -> list[range]:
    """Cut tensors of ``sizes`` (element counts, in model order) into ``count`` contiguous runs.

    Returns ranges over the tensor indices that partition ``range(len(sizes))``, none empty.
    Cut ``k`` falls at the tensor boundary nearest to ``k / count`` of the total size, moved
    only as far as needed to leave every fragment at least one tensor.
    """
    if count < 1:
        raise ValueError(f"fragment count must be >= 1, got {count}")
    if count > len(sizes):
        raise ValueError(f"cannot cut {len(sizes)} tensors into {count} fragments")
    if any(size < 0 for size in sizes):
        raise ValueError("tensor sizes must be >= 0")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    total = prefix[-1]
    cuts = [0]
    for k in range(1, count):
        target = total * k / count
        # The boundary (an index into prefix) nearest to the target, kept strictly after the
        # previous cut and leaving one tensor for each of the count - k fragments still to come.
        low, high = cuts[-1] + 1, len(sizes) - (count - k)
        best = min(range(low, high + 1), key=lambda b: (abs(prefix[b] - target), b))
        cuts.append(best)
    cuts.append(len(sizes))
    return [range(a, b) for a, b in itertools.pairwise(cuts)]


@dataclass(frozen=True, slots=True)
class FragmentSchedule:
    """Which fragment sends and which applies after each inner step.

    ``local_steps`` is H, ``fragments`` is F (``1 <= F <= H``), ``overlap_steps`` is tau
    (``0 <= tau < H``: a fragment's exchange is applied before its next one starts).
    """

    local_steps: int
    fragments: int
    overlap_steps: int

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if not 1 <= self.fragments <= self.local_steps:
            raise ValueError(f"fragments must be in [1, local_steps={self.local_steps}], got {self.fragments}")
        if not 0 <= self.overlap_steps < self.local_steps:
            raise ValueError(f"overlap_steps must be in [0, local_steps={self.local_steps}), got {self.overlap_steps}")

    def offset(self, fragment: int) -> int:
        """Fragment ``fragment`` syncs after the steps t > 0 with t = offset (mod H); 0 is H itself."""
        return (fragment * self.local_steps) // self.fragments

    def sends_after(self, steps_completed: int) -> tuple[int, ...]:
        """The fragments whose outer gradient is sent after inner step ``steps_completed`` (from 1)."""
        if steps_completed <= 0:
            return ()
        return tuple(f for f in range(self.fragments) if (steps_completed - self.offset(f)) % self.local_steps == 0)

    def applies_after(self, steps_completed: int) -> tuple[int, ...]:
        """The fragments whose averaged update is applied after inner step ``steps_completed``."""
        return self.sends_after(steps_completed - self.overlap_steps)


class FragmentOuter:
    """One fragment's anchor (its global parameters at the last sync) and outer SGD momentum.

    ``parameters`` are the live tensors of the fragment, in order; the anchor starts as a flat
    float32 copy of them, so build this on the initial model (identical on every peer).
    """

    def __init__(
        self, parameters: Sequence[torch.Tensor], *, lr: float, momentum: float, nesterov: bool = True
    ) -> None:
        if not parameters:
            raise ValueError("a fragment needs at least one parameter")
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be finite and > 0, got {lr!r}")
        if not math.isfinite(momentum) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.parameters = list(parameters)
        self.numel = sum(p.numel() for p in self.parameters)
        device = self.parameters[0].device
        self.anchor = torch.empty(self.numel, dtype=torch.float32, device=device)
        self.flatten_into(self.anchor)
        self.momentum_buffer = torch.zeros_like(self.anchor)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = nesterov and momentum > 0
        self.steps = 0

    @torch.no_grad()
    def flatten_into(self, out: torch.Tensor) -> torch.Tensor:
        """The fragment's live parameters as one float32 vector (numel,), written into ``out``."""
        offset = 0
        for p in self.parameters:
            out[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
            offset += p.numel()
        return out

    @torch.no_grad()
    def outer_gradient(self) -> torch.Tensor:
        """``anchor - current`` (numel,) float32: what this peer contributes to the fragment's sync."""
        current = self.flatten_into(torch.empty_like(self.anchor))
        return self.anchor - current

    @torch.no_grad()
    def step(self, mean_outer_gradient: torch.Tensor) -> None:
        """The outer SGD step on the averaged outer gradient: a new anchor (the model is untouched).

        torch.optim.SGD's update with dampening 0 (``buf <- momentum * buf + g``; Nesterov:
        ``anchor <- anchor - lr * (g + momentum * buf)``). ValueError if ``g`` is not finite.
        """
        gradient = mean_outer_gradient.to(device=self.anchor.device, dtype=torch.float32).reshape(-1)
        if gradient.numel() != self.numel:
            raise ValueError(f"outer gradient has {gradient.numel()} values, the fragment {self.numel}")
        if not bool(torch.isfinite(gradient).all()):
            raise ValueError("the averaged outer gradient is not finite; outer step refused")
        self.momentum_buffer.mul_(self.momentum).add_(gradient)
        update = gradient.add(self.momentum_buffer, alpha=self.momentum) if self.nesterov else self.momentum_buffer
        self.anchor.add_(update, alpha=-self.lr)
        self.steps += 1

    @torch.no_grad()
    def average(self, mean_outer_gradient: torch.Tensor) -> None:
        """Plain averaging (no momentum): ``anchor <- anchor - g``, i.e. the mean of the replicas."""
        gradient = mean_outer_gradient.to(device=self.anchor.device, dtype=torch.float32).reshape(-1)
        if gradient.numel() != self.numel or not bool(torch.isfinite(gradient).all()):
            raise ValueError("the averaged outer gradient does not fit the fragment or is not finite")
        self.anchor.sub_(gradient)

    @torch.no_grad()
    def merge(self, alpha: float) -> None:
        """``param <- alpha * param + (1 - alpha) * anchor`` for every tensor of the fragment
        (``alpha = 0``: the parameters become the anchor exactly)."""
        offset = 0
        for p in self.parameters:
            global_values = self.anchor[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if alpha == 0:
                p.copy_(global_values)
            else:
                mixed = global_values.mul(1 - alpha).add_(p.detach().to(torch.float32), alpha=alpha)
                p.copy_(mixed)
