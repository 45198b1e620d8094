"""Deep Gradient Compression's momentum correction and sparsity warm-up (Lin et al. 2018).

Top-k with plain error feedback under SGD momentum lags: the optimizer's momentum acts on the
sparse averaged update, so a coordinate that waited in the residual for many steps arrives
without the momentum it would have gathered. DGC moves the momentum in front of the
compression. Each peer keeps a velocity ``u`` and an accumulation ``v`` (flat float32, one
element per gradient element) and, every step::

    u <- m u + g          (momentum correction: the local velocity)
    v <- v + u            (what is owed, the error-feedback residual of the velocity)
    send C(v)             (top-k of v)
    v <- v - decode(C(v)) (what was sent leaves v; only the wire's rounding stays)
    u[sent] <- 0          (momentum factor masking: a sent coordinate starts a fresh velocity)

and the optimizer applies the averaged sent values with momentum 0, since the momentum is
already inside them: with k = numel and an exact wire this is SGD with momentum m, step for
step. :class:`Accumulator` with ``momentum = 0`` is plain error feedback (u = g every step), so
one class serves both. The paper clears ``v`` at the sent coordinates; subtracting the decoded
values instead keeps the wire's rounding (top-k values travel as float16) for the next step, so
``sent + residual == accumulated`` holds exactly.

Warm-up: starting at 99.9% sparsity with momentum correction is unstable, so the kept fraction
falls exponentially over ``warmup_steps``: 25%, 6.25%, 1.5625%, 0.390625%, ... (each stage keeps
a quarter of the previous one) in equal stages, then the configured ratio. A stage is a small
integer both ends know, so it travels in the frame kind and the receiver knows the exact wire
shape of a top-k frame of any stage before reading it.
"""

from __future__ import annotations

from typing import Final

import torch

__all__ = ["WARMUP_FACTOR", "Accumulator", "stage_ratio", "warmup_stage", "warmup_stages"]

WARMUP_FACTOR: Final[float] = 0.25  # each warm-up stage keeps this fraction of the previous one


def warmup_stages(ratio: float) -> int:
    """How many warm-up stages lie above ``ratio``: stage s keeps 0.25**(s+1) of the entries."""
    stages = 0
    while WARMUP_FACTOR ** (stages + 1) > ratio:
        stages += 1
    return stages


def stage_ratio(stage: int, ratio: float) -> float:
    """The fraction kept at warm-up ``stage`` (the last stage, :func:`warmup_stages`, is ``ratio``)."""
    if stage >= warmup_stages(ratio):
        return ratio
    return float(WARMUP_FACTOR ** (stage + 1))


def warmup_stage(step: int, ratio: float, warmup_steps: int) -> int:
    """The warm-up stage of ``step``: equal stages over ``warmup_steps``, then the final one."""
    stages = warmup_stages(ratio)
    if step >= warmup_steps or stages == 0:
        return stages
    return max(0, step) * stages // warmup_steps


class Accumulator:
    """Momentum correction and error feedback over one flat float32 vector of ``numel`` elements.

    ``accumulate(g)`` returns ``v`` (the live buffer, to compress); ``sent(decoded, indices)``
    removes what went out and masks the velocity at ``indices``. ``momentum = 0`` is plain
    error feedback; ``feedback = False`` forgets what was not sent (v restarts at 0 each step).
    """

    def __init__(self, numel: int, *, momentum: float, feedback: bool, device: torch.device) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if momentum > 0 and not feedback:
            raise ValueError("momentum correction needs error feedback (v is the residual of the velocity)")
        self.momentum = momentum
        self.feedback = feedback
        self.velocity = torch.zeros(numel, dtype=torch.float32, device=device)  # u
        self.accumulated = torch.zeros(numel, dtype=torch.float32, device=device)  # v

    @torch.no_grad()
    def accumulate(self, gradient: torch.Tensor) -> torch.Tensor:
        """u <- m u + g; v <- v + u; returns v (float32, (numel,), updated in place later)."""
        flat = gradient.reshape(-1)
        if self.momentum > 0:
            self.velocity.mul_(self.momentum).add_(flat)
            self.accumulated.add_(self.velocity)
        else:
            self.accumulated.add_(flat)
        return self.accumulated

    @torch.no_grad()
    def sent(self, decoded: torch.Tensor, indices: torch.Tensor | None) -> None:
        """v <- v - decoded (what the peers will see); u[indices] <- 0 (momentum factor masking).

        ``indices`` (int64) are the coordinates sent, None for a dense compressor (nothing masked).
        """
        if not self.feedback:
            self.accumulated.zero_()
            return
        self.accumulated.sub_(decoded.reshape(-1))
        if self.momentum > 0 and indices is not None and indices.numel():
            self.velocity[indices] = 0.0

    def reset(self) -> None:
        """Forget the velocity and the residual (the model was replaced by a donor's)."""
        self.velocity.zero_()
        self.accumulated.zero_()
