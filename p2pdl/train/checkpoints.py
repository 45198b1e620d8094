"""What a peer keeps on disk to resume, and what it leaves behind for inspection.

* ``checkpoint.pt``: model, optimizer, learning-rate schedule, loss scaler, step, data position
  and torch RNG state, written every ``checkpoint.every`` steps and at the end; ``--resume``
  continues from it exactly where the run left off.
* ``model.pt``: the final ``state_dict`` on the CPU.
* ``snapshots/step_<n>.pt``: the flat float32 parameter vector after step ``n``, for consensus plots.

All are written through :func:`p2pdl.train.files.atomic_write`, so a crash mid-write leaves the
previous checkpoint intact. Checkpoints are local files this peer wrote itself, yet they are still
loaded with ``weights_only=True``: a checkpoint file is never a way to run code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.optim.lr_scheduler import LRScheduler

from p2pdl.train.files import atomic_torch_save

__all__ = ["CHECKPOINT", "load_checkpoint", "save_checkpoint", "save_model", "save_snapshot"]

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    path: Path,
    *,
    scheduler: LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    data_position: int | None = None,
) -> None:
    """Model, optimizer, schedule, loss scale, step, data position and RNG state, written atomically.

    ``data_position`` is the index of the next batch this peer's data stream yields (the batch
    of a step is a pure function of it, see :mod:`p2pdl.train.data`); it defaults to ``step``.
    """
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data_position": step if data_position is None else data_position,
        "torch_rng": torch.get_rng_state(),
    }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    atomic_torch_save(path, state)


def load_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    path: Path,
    *,
    scheduler: LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step.

    A schedule or loss scaler given here but absent from the file (a checkpoint from a run without
    them) starts fresh at its initial state.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def save_model(model: torch.nn.Module, path: Path) -> None:
    """The final ``state_dict`` on the CPU, written atomically."""
    atomic_torch_save(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})


def save_snapshot(model: torch.nn.Module, out_dir: Path, step: int) -> None:
    """The flat float32 parameters after ``step`` steps, as ``OUT/snapshots/step_<step>.pt``."""
    folder = out_dir / "snapshots"
    folder.mkdir(exist_ok=True)
    flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
    atomic_torch_save(folder / f"step_{step}.pt", flat)
