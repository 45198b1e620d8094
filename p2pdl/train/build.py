"""Everything a peer trains with, built from a config and a workload: the model (seeded, in its
parameter dtype), the optimizer, the schedule, the precision and the update step.

This is the Python API's shortcut to the CLI loop's training setup::

    model = build_model(workload, config.run.seed, device, config.run.param_dtype)
    training = build_training(config, workload, model, device)
    async with Peer(config, name, model, training.optimizer, hooks=training.step) as peer:
        await peer.step(lambda: training.step.backward(micro_batches))

A workload's ``build_optimizer`` and ``build_schedule`` hooks replace the config's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LRScheduler

from p2pdl.config import Config, ParamDtype
from p2pdl.train.optim import build_optimizer, build_schedule
from p2pdl.train.precision import PARAM_DTYPES, MixedPrecision
from p2pdl.train.update import TrainStep
from p2pdl.train.workload import LoadedWorkload

__all__ = ["Training", "build_model", "build_training"]


def build_model(
    workload: LoadedWorkload, seed: int, device: torch.device, param_dtype: ParamDtype = "float32"
) -> torch.nn.Module:
    """Identical initial parameters on every peer: seed, build, then move and convert."""
    torch.manual_seed(seed)
    return workload.build_model().to(device=device, dtype=PARAM_DTYPES[param_dtype])


@dataclass(frozen=True, slots=True)
class Training:
    """What the loop trains with; ``step`` is the peer's :class:`~p2pdl.peer.node.StepHooks` and
    owns the schedule."""

    optimizer: torch.optim.Optimizer
    precision: MixedPrecision
    step: TrainStep
    build_schedule: Callable[[], LRScheduler]

    @property
    def scheduler(self) -> LRScheduler:
        assert self.step.scheduler is not None
        return self.step.scheduler


def build_training(config: Config, workload: LoadedWorkload, model: torch.nn.Module, device: torch.device) -> Training:
    """Optimizer, schedule, precision and update step for ``model`` under ``config``."""
    if workload.build_optimizer is not None:
        optimizer = workload.build_optimizer(model, config)
    else:
        optimizer = build_optimizer(config.optimizer_settings, model)

    def schedule() -> LRScheduler:
        if workload.build_schedule is not None:
            return workload.build_schedule(optimizer, config)
        return build_schedule(config.schedule, optimizer, config.run.steps)

    scheduler = schedule()
    precision = MixedPrecision(config.run.precision, device)
    step = TrainStep(
        model,
        optimizer,
        scheduler,
        precision,
        loss_fn=workload.loss_fn,
        grad_clip=config.run.grad_clip,
        build_schedule=schedule,
    )
    return Training(optimizer=optimizer, precision=precision, step=step, build_schedule=schedule)
