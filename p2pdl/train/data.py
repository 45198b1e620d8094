"""Deterministic, resumable batch iteration.

The batch used at global step ``s`` is a pure function of ``(num_examples, batch_size,
seed, s)``: epoch ``e = s // batches_per_epoch`` is ordered by ``torch.randperm`` with a
generator seeded ``seed * 1_000_003 + e``, and the step takes the next ``batch_size``
positions of that order (the incomplete last batch is dropped). A peer that restarts from
a checkpoint at step ``s`` and a ``torch.distributed`` DDP reference run therefore see
exactly the same batches, with no sampler state to save.

Trade-off: dropping the last partial batch wastes up to ``batch_size - 1`` examples per
epoch, in exchange for every step having the same batch size (and so the same gradient
scale) on every peer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["BatchStream", "batch_indices", "batches_per_epoch"]

# Spreads consecutive seeds far apart so (seed, epoch) pairs never share a generator seed
# within 1_000_003 epochs.
_SEED_STRIDE = 1_000_003


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (``drop_last``); ValueError unless at least one fits."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = num_examples // batch_size
    if count < 1:
        raise ValueError(f"batch_size {batch_size} exceeds num_examples {num_examples}: no full batch fits in an epoch")
    return count


def _epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch)
    return torch.randperm(num_examples, generator=generator)


def batch_indices(num_examples: int, batch_size: int, *, seed: int, step: int) -> torch.Tensor:
    """Indices (int64, shape ``(batch_size,)``) of the batch at global step ``step``."""
    per_epoch = batches_per_epoch(num_examples, batch_size)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, position = divmod(step, per_epoch)
    order = _epoch_order(num_examples, seed, epoch)
    return order[position * batch_size : (position + 1) * batch_size]


class BatchStream:
    """Endless iterator of ``(x_batch, y_batch)`` starting at global step ``start_step``.

    Yields exactly the batches :func:`batch_indices` names, step after step, computing each
    epoch's permutation once. ``step`` is the global step of the next batch to be yielded.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
    ) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets differ in length: {inputs.shape[0]} vs {targets.shape[0]}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.seed = seed
        self.num_examples = int(inputs.shape[0])
        self.batches_per_epoch = batches_per_epoch(self.num_examples, batch_size)
        self.step = start_step
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def indices(self) -> torch.Tensor:
        """Indices of the batch at ``self.step`` (the next one to be yielded)."""
        epoch, position = divmod(self.step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._order = _epoch_order(self.num_examples, self.seed, epoch)
            self._epoch = epoch
        return self._order[position * self.batch_size : (position + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.indices()
        self.step += 1
        return self.inputs[indices], self.targets[indices]
