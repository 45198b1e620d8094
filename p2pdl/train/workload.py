"""Workloads: the model, data and loss a peer trains, loaded from a Python file.

A workload is a plain Python file (see ``peers/``) that a config names by path. It is
imported with :func:`importlib.util.spec_from_file_location` under a private module name,
never ``exec``'d from config text, and must define four module-level functions::

    build_model() -> torch.nn.Module
    load_shard(shard_index: int, shard_count: int) -> tuple[torch.Tensor, torch.Tensor]
    loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor
    evaluate(model: torch.nn.Module, device: torch.device) -> dict[str, float]

and may define ``DESCRIPTION: str`` and these optional hooks::

    build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer
    build_schedule(optimizer: torch.optim.Optimizer, config: Config) -> LRScheduler
    sample(model: torch.nn.Module, device: torch.device) -> str
    HEADLINE: tuple[str, "min" | "max"]

``build_optimizer`` and ``build_schedule`` replace what ``[optimizer]`` and ``[schedule]`` would
build (for per-group weight decay, say); the schedule is stepped once per applied optimizer
step. ``sample`` runs once at the end of a run and its text is written to ``OUT/sample.txt``
(a language model's continuation of a fixed prompt). ``HEADLINE`` names the ``evaluate`` key a
swarm view shows and whether lower or higher is better; the default is
``("test_accuracy", "max")``. p2pdl calls ``torch.manual_seed(seed)`` right before
``build_model()`` so every peer starts from identical weights. ``load_shard`` returns this
peer's CPU training inputs and int64 targets; ``loss_fn`` averages over the batch;
``evaluate`` scores held-out data under ``torch.no_grad()`` in eval mode, restores the
model's previous mode, and returns at least ``test_accuracy`` (a fraction in 0..1) and
``test_loss``.

Trade-off: a workload is arbitrary trusted code on the local disk, which keeps models and
data pipelines unconstrained; the price is that loading one runs it, so only the operator's
own files are ever named (never anything received from the network).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal, Protocol, cast

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from p2pdl.config import Config
from p2pdl.errors import WorkloadError
from p2pdl.train.datasets import shard_indices

__all__ = [
    "DEFAULT_HEADLINE",
    "OPTIONAL_FUNCTIONS",
    "REQUIRED_FUNCTIONS",
    "BuildModel",
    "BuildOptimizer",
    "BuildSchedule",
    "Evaluate",
    "Headline",
    "LoadShard",
    "LoadedWorkload",
    "LossFn",
    "Sample",
    "Workload",
    "WorkloadHooks",
    "load_workload",
]

BuildModel = Callable[[], torch.nn.Module]
LoadShard = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Evaluate = Callable[[torch.nn.Module, torch.device], dict[str, float]]

BuildOptimizer = Callable[[torch.nn.Module, Config], torch.optim.Optimizer]
BuildSchedule = Callable[[torch.optim.Optimizer, Config], LRScheduler]
Sample = Callable[[torch.nn.Module, torch.device], str]
Headline = tuple[str, Literal["min", "max"]]

REQUIRED_FUNCTIONS: tuple[str, ...] = ("build_model", "load_shard", "loss_fn", "evaluate")
OPTIONAL_FUNCTIONS: tuple[str, ...] = ("build_optimizer", "build_schedule", "sample")
DEFAULT_HEADLINE: Headline = ("test_accuracy", "max")


class Workload(Protocol):
    """What p2pdl needs from a workload. A loaded workload module satisfies it."""

    @property
    def build_model(self) -> BuildModel: ...

    @property
    def load_shard(self) -> LoadShard: ...

    @property
    def loss_fn(self) -> LossFn: ...

    @property
    def evaluate(self) -> Evaluate: ...


class WorkloadHooks(Protocol):
    """The optional hooks a workload file may define (each one alone; see the module docstring)."""

    def build_optimizer(self, model: torch.nn.Module, config: Config) -> torch.optim.Optimizer: ...

    def build_schedule(self, optimizer: torch.optim.Optimizer, config: Config) -> LRScheduler: ...

    def sample(self, model: torch.nn.Module, device: torch.device) -> str: ...

    @property
    def HEADLINE(self) -> Headline: ...  # the module-level constant


@dataclass(frozen=True)
class LoadedWorkload:
    """A workload file after loading and checking; satisfies :class:`Workload`, with each optional
    hook of :class:`WorkloadHooks` or None (``headline`` always set)."""

    path: Path
    name: str
    description: str
    build_model: BuildModel
    load_shard: LoadShard
    loss_fn: LossFn
    evaluate: Evaluate
    build_optimizer: BuildOptimizer | None = None
    build_schedule: BuildSchedule | None = None
    sample: Sample | None = None
    headline: Headline = DEFAULT_HEADLINE


def _module_name(path: Path) -> str:
    # One private name per file, so two workloads never clobber each other in sys.modules
    # and a workload named like a real package (``peers/torch.py``) cannot shadow it.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return f"_p2pdl_workload_{path.stem}_{digest}"


def _import_file(path: Path) -> ModuleType:
    module_name = _module_name(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise WorkloadError(f"workload {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    # Registered before execution because dataclasses and typing look the module up there.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, Exception):
            raise WorkloadError(f"workload {path}: import failed: {type(exc).__name__}: {exc}") from exc
        raise
    return module


def _description(module: ModuleType, path: Path) -> str:
    description = getattr(module, "DESCRIPTION", None)
    if description is None:
        doc = module.__doc__ or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""
    if not isinstance(description, str):
        raise WorkloadError(f"workload {path}: DESCRIPTION must be a str, got {type(description).__name__}")
    return description


def _headline(module: ModuleType, path: Path) -> Headline:
    value = getattr(module, "HEADLINE", DEFAULT_HEADLINE)
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not value[0]
        or value[1] not in ("min", "max")
    ):
        raise WorkloadError(f"workload {path}: HEADLINE must be (metric name, 'min' or 'max'), got {value!r}")
    return cast(Headline, value)


def load_workload(path: str | Path) -> LoadedWorkload:
    """Import the workload file at ``path`` and check it defines every required function.

    Raises :class:`WorkloadError` when the file is missing, fails to import (the original
    exception is chained), or lacks any of :data:`REQUIRED_FUNCTIONS` as a callable; the
    message names the path and every missing or non-callable attribute at once.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise WorkloadError(f"workload {resolved}: no such file")
    if resolved.suffix != ".py":
        raise WorkloadError(f"workload {resolved}: expected a .py file")

    module = _import_file(resolved)

    problems: list[str] = []
    for name in REQUIRED_FUNCTIONS:
        if not hasattr(module, name):
            problems.append(f"{name} (missing)")
        elif not callable(getattr(module, name)):
            problems.append(f"{name} (not callable: {type(getattr(module, name)).__name__})")
    for name in OPTIONAL_FUNCTIONS:
        if getattr(module, name, None) is not None and not callable(getattr(module, name)):
            problems.append(f"{name} (optional, but not callable: {type(getattr(module, name)).__name__})")
    if problems:
        raise WorkloadError(
            f"workload {resolved}: must define module-level functions "
            f"{', '.join(REQUIRED_FUNCTIONS)}; problems: {'; '.join(problems)}"
        )

    return LoadedWorkload(
        path=resolved,
        name=resolved.stem,
        description=_description(module, resolved),
        build_model=module.build_model,
        load_shard=module.load_shard,
        loss_fn=module.loss_fn,
        evaluate=module.evaluate,
        build_optimizer=getattr(module, "build_optimizer", None),
        build_schedule=getattr(module, "build_schedule", None),
        sample=getattr(module, "sample", None),
        headline=_headline(module, resolved),
    )


# --------------------------------------------------------------------------- helpers for workload files


def classification_shard(
    data: Mapping[str, np.ndarray], shard_index: int, shard_count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard ``shard_index`` of ``data["x"]``/``data["y"]`` (see :func:`p2pdl.train.datasets.shard_indices`)."""
    indices = shard_indices(len(data["y"]), shard_index, shard_count)
    return torch.from_numpy(data["x"][indices]), torch.from_numpy(data["y"][indices])


class HeldOutClassification:
    """``evaluate`` for a classifier on ``x_test``/``y_test``: accuracy and cross-entropy, one batch.

    The test tensors are built on first use per device and kept, so evaluation costs one forward.
    """

    def __init__(self, load: Callable[[], Mapping[str, np.ndarray]]) -> None:
        self._load = load
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _test_set(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._tensors:
            data = self._load()
            inputs = torch.from_numpy(data["x_test"]).to(device)
            self._tensors[key] = (inputs, torch.from_numpy(data["y_test"]).to(device))
        return self._tensors[key]

    def __call__(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        inputs, targets = self._test_set(device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model(inputs)
                test_loss = torch.nn.functional.cross_entropy(output, targets).item()
                test_accuracy = (output.argmax(dim=1) == targets).float().mean().item()
        finally:
            model.train(was_training)
        return {"test_accuracy": test_accuracy, "test_loss": test_loss}
