"""The optimizer and the learning-rate schedule of a run, built from ``[optimizer]`` and ``[schedule]``.

The schedule is composed of torch's own schedulers (``LinearLR`` warm-up, then ``CosineAnnealingLR``,
``LinearLR`` or a constant factor, joined by ``SequentialLR``), so its state saves and loads with
``state_dict()`` and a resumed run continues on the same curve; no learning-rate arithmetic lives
in the loop. It is stepped once per applied optimizer step (a step the loss scaler skips does not
advance it), which keeps the curve tied to the updates actually made.

Warm-up over ``W`` steps uses ``lr * (s + 1) / (W + 1)`` at step ``s < W`` (as nanoGPT does), so the
peak comes once, at step ``W``; decay then runs over the remaining ``total_steps - W`` steps and
reaches ``final_lr_fraction * lr`` at step ``total_steps``
(the floor of each parameter group relative to its own peak for ``linear``; for ``cosine`` the
floor is ``final_lr_fraction`` times the first group's peak, as ``CosineAnnealingLR`` takes one
``eta_min``). A workload file may replace either builder (:mod:`p2pdl.train.workload`).
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

from p2pdl.config import OptimizerConfig, ScheduleConfig

__all__ = ["build_optimizer", "build_schedule"]


def build_optimizer(settings: OptimizerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer every peer (and a DDP reference) uses, over the trainable parameters."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if settings.kind == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.nesterov,
            weight_decay=settings.weight_decay,
        )
    adam = torch.optim.AdamW if settings.kind == "adamw" else torch.optim.Adam
    return adam(parameters, lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)


def _unit(_: int) -> float:
    return 1.0


def build_schedule(settings: ScheduleConfig, optimizer: torch.optim.Optimizer, run_steps: int) -> LRScheduler:
    """The schedule of ``settings`` over ``settings.total_steps`` (or ``run_steps``) optimizer steps."""
    span = settings.span(run_steps)
    warmup = settings.warmup_steps
    decay_steps = span - warmup
    decay: LRScheduler
    if settings.kind == "constant" or decay_steps <= 0:
        decay = LambdaLR(optimizer, _unit)
    elif settings.kind == "cosine":
        floor = settings.final_lr_fraction * float(optimizer.param_groups[0]["lr"])
        decay = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=floor)
    else:
        decay = LinearLR(optimizer, start_factor=1.0, end_factor=settings.final_lr_fraction, total_iters=decay_steps)
    if warmup == 0:
        return decay
    ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, decay], milestones=[warmup])
