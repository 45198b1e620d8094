"""One optimizer step of the training loop: accumulated backward, then the update on the averaged
gradients (the :class:`~p2pdl.peer.node.StepHooks` the loop gives its peer).

:meth:`TrainStep.backward` runs ``K`` micro-batches, each loss divided by ``K`` (so ``K`` batches
of ``B`` give the gradient of one batch of ``K * B``), under autocast and the loss scale.
:meth:`TrainStep.optimizer_step` runs after the strategy has averaged the gradients and does what
a DDP user's loop does: unscale, check for non-finite values, clip to ``grad_clip`` by the global
norm, step the optimizer (or skip), update the loss scale and step the schedule.

The invariant under allreduce: every peer takes the same skip-or-step decision. Decisions are
taken on the averaged gradients, which are identical everywhere. A peer's own gradients can be
non-finite before averaging (an fp16 overflow), and the wire refuses non-finite tensors, so
:meth:`TrainStep.backward` then fills its gradients with a huge finite sentinel instead: the
average is then over :data:`OVERFLOW_THRESHOLD` on every peer, each of which treats it as an
overflow (NaN locally, so ``GradScaler.unscale_`` records it and ``step`` skips). No peer applies
an inf gradient, and none skips alone. The sentinel needs the range of float32 or bfloat16
gradients; with float16 parameters a non-finite gradient stops the peer instead.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

from p2pdl.errors import TrainingDivergedError
from p2pdl.train.precision import MixedPrecision

__all__ = ["OVERFLOW_SENTINEL", "OVERFLOW_THRESHOLD", "TrainStep"]

log = logging.getLogger(__name__)

# A peer's overflowed gradient is sent as this value in every entry; averaged over up to 1024
# peers it stays above the threshold, far beyond any real (even loss-scaled) gradient.
OVERFLOW_SENTINEL = 2.0**100
OVERFLOW_THRESHOLD = 2.0**90

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainStep:
    """Backward and update for one peer; satisfies :class:`p2pdl.peer.node.StepHooks`."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler | None,
        precision: MixedPrecision,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        grad_clip: float = 0.0,
        build_schedule: Callable[[], LRScheduler] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.build_schedule = build_schedule  # a fresh schedule over ``optimizer`` (for state_loaded)
        self.precision = precision
        self.loss_fn = loss_fn
        self.grad_clip = grad_clip
        self.applied = 0  # optimizer steps taken
        self.skipped = 0  # steps skipped on non-finite (averaged) gradients
        self.last_grad_norm: float | None = None  # before clipping, of the averaged unscaled gradient

    def _gradients(self) -> list[torch.Tensor]:
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def backward(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """Forward and backward over ``micro_batches`` (gradients accumulate); returns the mean loss.

        Runs on the compute thread inside the peer's closure, after the gradients were zeroed.
        """
        count = len(micro_batches)
        total = torch.zeros((), dtype=torch.float32)
        for inputs, targets in micro_batches:
            with self.precision.autocast():
                loss = self.loss_fn(self.model(inputs), targets)
            torch.autograd.backward(self.precision.scale(loss / count if count > 1 else loss))
            total = total + loss.detach().float().cpu()
        self._mark_overflow()
        return total / count

    @torch.no_grad()
    def _mark_overflow(self) -> None:
        """Replace this peer's non-finite gradients by the sentinel (see the module docstring)."""
        gradients = self._gradients()
        if not gradients or all(bool(torch.isfinite(g).all()) for g in gradients):
            return
        if any(g.dtype == torch.float16 for g in gradients):
            raise TrainingDivergedError("non-finite gradients with float16 parameters (no room for the sentinel)")
        log.info("non-finite local gradients: sending the overflow sentinel so every peer skips this step")
        for gradient in gradients:
            gradient.fill_(OVERFLOW_SENTINEL)

    @torch.no_grad()
    def _overflowed(self, gradients: list[torch.Tensor]) -> bool:
        """Whether the averaged gradients hold a non-finite value or an averaged sentinel."""
        largest = torch.stack([g.abs().max().float() for g in gradients]).max()
        return not bool(largest < OVERFLOW_THRESHOLD)  # NaN compares False: an overflow too

    def state_loaded(self, step: int) -> None:
        """Put the schedule at ``step`` after a donor's state replaced this peer's (a join or a
        resync; :class:`p2pdl.peer.node.StepHooks`).

        The downloaded optimizer carries the donor's current learning rate, which torch's
        recursive schedulers would compound from; so every group goes back to its peak, the
        schedule is built afresh, and it is stepped ``step`` times without optimizer steps.
        """
        if self.build_schedule is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = group.pop("initial_lr", group["lr"])
        schedule = self.build_schedule()
        with warnings.catch_warnings():
            # "lr_scheduler.step() before optimizer.step()": intended here, the steps were the donor's.
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                schedule.step()
        self.scheduler = schedule

    def optimizer_step(self) -> None:
        """Unscale, check, clip, step (or skip), update the scale, step the schedule."""
        gradients = self._gradients()
        overflow = bool(gradients) and self._overflowed(gradients)
        scaler = self.precision.scaler
        if scaler is not None:
            if overflow:
                with torch.no_grad():
                    for gradient in gradients:
                        gradient.fill_(float("nan"))  # unscale_ records the overflow; step() skips
            scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.get_total_norm(gradients) if gradients else torch.zeros(())
        self.last_grad_norm = float(norm)
        finite = not overflow and bool(torch.isfinite(norm))
        if finite and self.grad_clip > 0:
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grads_with_norm_(parameters, self.grad_clip, norm)
        if finite:
            if scaler is not None:
                scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if scaler is not None:
            scaler.update()
        if not finite:
            self.skipped += 1
            log.warning("skipped an optimizer step: the averaged gradient is not finite (norm %s)", float(norm))
            return
        self.applied += 1
        if self.scheduler is not None:
            self.scheduler.step()
