"""Which data a peer trains on: the shard rule under churn and the batches of each step.

The batch of step ``s`` is a pure function of ``(shards, seed, s)``: one batch of
``batch_size * accumulate`` examples from :class:`~p2pdl.train.data.BatchStream` at position ``s``,
cut into ``accumulate`` micro-batches of ``batch_size``. So ``K`` micro-batches of ``B`` are
exactly the examples of one batch of ``K * B``, and a resumed run (or a DDP reference) finds the
same data at the same step with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from p2pdl.config import RunConfig
from p2pdl.train.data import BatchStream
from p2pdl.train.workload import LoadedWorkload

__all__ = ["Batch", "ShardedBatches", "assigned_shards", "data_seed"]

Batch = tuple[torch.Tensor, torch.Tensor]


def data_seed(run: RunConfig, shard_index: int) -> int:
    """Each peer shuffles its own shard with its own stream."""
    return run.seed * 1000 + shard_index


def assigned_shards(live: Sequence[str], name: str, shard_count: int) -> list[int]:
    """The data rule under churn: shard s belongs to the live member at position s mod L.

    ``live`` is the agreed order of live members (configured peers in config order, then joiners
    by name), so every peer computes the same assignment: the live set always covers all
    ``shard_count`` shards and each shard has exactly one owner. A peer that rejoins under its
    old name takes its old position back, so no shard is trained twice at double weight.
    """
    if name not in live:
        return []
    position, members = live.index(name), len(live)
    return [shard for shard in range(shard_count) if shard % members == position]


class ShardedBatches:
    """This peer's micro-batches, re-cut whenever the live membership changes its shard assignment."""

    def __init__(self, workload: LoadedWorkload, run: RunConfig, shard_count: int, device: torch.device) -> None:
        self._workload = workload
        self._run = run
        self._shard_count = shard_count
        self._device = device
        self._shards: list[int] | None = None
        self._stream: BatchStream | None = None
        self._cache: dict[int, Batch] = {}

    @property
    def shards(self) -> list[int]:
        return list(self._shards or [])

    def _load(self, shard: int) -> Batch:
        if shard not in self._cache:
            self._cache[shard] = self._workload.load_shard(shard, self._shard_count)
        return self._cache[shard]

    def preload(self, shards: list[int]) -> None:
        """Load ``shards`` now (a first run builds the dataset here, which takes seconds)."""
        for shard in shards:
            self._load(shard)

    def batch(self, shards: list[int], step: int) -> list[Batch] | None:
        """The ``run.accumulate`` micro-batches of ``step`` from ``shards``; None when this peer
        owns no data right now."""
        if not shards:
            self._shards, self._stream = shards, None
            return None
        run = self._run
        if shards != self._shards or self._stream is None or self._stream.step != step:
            parts = [self._load(s) for s in shards]
            inputs = torch.cat([x for x, _ in parts])
            targets = torch.cat([y for _, y in parts])
            self._stream = BatchStream(
                inputs, targets, run.batch_size * run.accumulate, seed=data_seed(run, shards[0]), start_step=step
            )
            self._shards = shards
        inputs, targets = next(self._stream)
        size = run.batch_size
        return [
            (
                inputs[begin : begin + size].to(self._device, non_blocking=True),
                targets[begin : begin + size].to(self._device, non_blocking=True),
            )
            for begin in range(0, size * run.accumulate, size)
        ]
