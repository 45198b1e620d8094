"""The training sections of a config: ``[run]`` (what to train, for how long, in which precision),
``[optimizer]`` and ``[schedule]``.

``[optimizer]`` is optional: without it the legacy ``run.optimizer``/``run.lr``/``run.momentum``/
``run.weight_decay`` keys describe the optimizer (:meth:`OptimizerConfig.from_run`), so configs
written before the section existed keep their meaning. With it, those run keys are refused
(checked where the whole file is known, in :mod:`p2pdl.config.load`), so there is never a
question of which one wins.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

from p2pdl.config.base import (
    DeviceChoice,
    OptimizerKind,
    ParamDtype,
    Precision,
    ScheduleKind,
    _check,
    _Validated,
)

# The run keys that [optimizer] replaces; a file that has the section must not set them.
LEGACY_OPTIMIZER_KEYS: tuple[str, ...] = ("optimizer", "lr", "momentum", "weight_decay")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig(_Validated):
    """What to train and for how long. ``workload`` is a path relative to the config file."""

    _section: typing.ClassVar[str] = "run"
    workload: Path
    steps: int = 600
    seed: int = 0
    batch_size: int = 32  # examples per micro-batch per peer
    # Legacy optimizer keys, used when the file has no [optimizer] section.
    optimizer: OptimizerKind = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 50  # steps; 0 disables periodic evaluation (a final one always runs)
    device: DeviceChoice = "auto"
    torch_threads: int = 0  # intra-op threads per peer; 0 leaves torch's default
    data_shards: int = 0  # shards the training set is cut into; 0 means one per configured peer
    grad_clip: float = 0.0  # max global L2 norm of the (averaged) gradient; 0 = no clipping
    accumulate: int = 1  # micro-batches of batch_size per optimizer step
    precision: Precision = "fp32"  # autocast: "bf16", or "fp16" with a GradScaler
    param_dtype: ParamDtype = "float32"  # the model is converted to this dtype after build_model()

    def problems(self) -> list[str]:
        found: list[str] = []
        _check(found, self.steps >= 1, f"run.steps must be >= 1, got {self.steps}")
        _check(found, self.seed >= 0, f"run.seed must be >= 0, got {self.seed}")
        _check(found, self.batch_size >= 1, f"run.batch_size must be >= 1, got {self.batch_size}")
        _check(found, self.lr > 0, f"run.lr must be > 0, got {self.lr}")
        _check(found, 0 <= self.momentum < 1, f"run.momentum must be in [0, 1), got {self.momentum}")
        _check(found, self.weight_decay >= 0, f"run.weight_decay must be >= 0, got {self.weight_decay}")
        _check(found, self.eval_every >= 0, f"run.eval_every must be >= 0, got {self.eval_every}")
        _check(found, self.torch_threads >= 0, f"run.torch_threads must be >= 0, got {self.torch_threads}")
        _check(found, self.grad_clip >= 0, f"run.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _check(found, self.accumulate >= 1, f"run.accumulate must be >= 1, got {self.accumulate}")
        _check(
            found,
            self.precision != "fp16" or self.param_dtype == "float32",
            f"run.precision = 'fp16' needs run.param_dtype = 'float32' (GradScaler unscales float32 "
            f"gradients; got {self.param_dtype!r})",
        )
        return found


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig(_Validated):
    """``[optimizer]``: torch.optim.AdamW, Adam or SGD over every trainable parameter."""

    _section: typing.ClassVar[str] = "optimizer"
    kind: OptimizerKind = "adamw"
    lr: float = 1e-3  # the peak learning rate (what [schedule] warms up to)
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    eps: float = 1e-8  # adam, adamw
    weight_decay: float = 0.0  # decoupled for adamw, L2 for adam and sgd
    momentum: float = 0.0  # sgd
    nesterov: bool = False  # sgd, needs momentum > 0

    @classmethod
    def from_run(cls, run: RunConfig) -> OptimizerConfig:
        """The optimizer the legacy ``run.*`` keys describe (SGD keeps its momentum, Adam ignores it)."""
        if run.optimizer == "sgd":
            return cls(kind="sgd", lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
        return cls(kind=run.optimizer, lr=run.lr, weight_decay=run.weight_decay)

    def problems(self) -> list[str]:
        found: list[str] = []
        _check(found, self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        _check(
            found,
            all(0 <= beta < 1 for beta in self.betas),
            f"optimizer.betas must both be in [0, 1), got {list(self.betas)}",
        )
        _check(found, self.eps > 0, f"optimizer.eps must be > 0, got {self.eps}")
        _check(found, self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        _check(found, 0 <= self.momentum < 1, f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        _check(
            found,
            self.kind == "sgd" or (self.momentum == 0 and not self.nesterov),
            f"optimizer.momentum and optimizer.nesterov apply to kind = 'sgd', not {self.kind!r}",
        )
        _check(
            found,
            self.kind != "sgd" or (self.betas == (0.9, 0.999) and self.eps == 1e-8),
            "optimizer.betas and optimizer.eps apply to kind = 'adam' or 'adamw', not 'sgd'",
        )
        _check(
            found,
            not self.nesterov or self.momentum > 0,
            "optimizer.nesterov needs optimizer.momentum > 0",
        )
        return found


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig(_Validated):
    """``[schedule]``: linear warm-up from ``lr / warmup_steps`` to ``lr``, then constant, cosine or
    linear decay to ``final_lr_fraction * lr`` at step ``total_steps`` (optimizer steps)."""

    _section: typing.ClassVar[str] = "schedule"
    kind: ScheduleKind = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0  # cosine, linear: the floor, as a fraction of the peak lr
    total_steps: int = 0  # steps the schedule spans, warm-up included; 0 = run.steps

    def problems(self) -> list[str]:
        found: list[str] = []
        _check(found, self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(
            found,
            0 <= self.final_lr_fraction <= 1,
            f"schedule.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}",
        )
        _check(
            found, self.total_steps >= 0, f"schedule.total_steps must be >= 0 (0 = run.steps), got {self.total_steps}"
        )
        _check(
            found,
            self.kind != "constant" or self.final_lr_fraction == 0,
            "schedule.final_lr_fraction applies to kind = 'cosine' or 'linear', not 'constant'",
        )
        return found

    def span(self, run_steps: int) -> int:
        """The optimizer steps the schedule covers."""
        return self.total_steps or run_steps
