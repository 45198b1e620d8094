"""MNIST-1D with a wide MLP, 40 -> 2048 -> 2048 -> 10 (~4.3M parameters, ~17 MB fp32).

For benchmarks where communication matters: each exchange moves megabytes, so topology,
compression and overlap show up in wall-clock time, while a step stays cheap on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from p2pdl.train.datasets import mnist1d
from p2pdl.train.workload import HeldOutClassification, classification_shard

DESCRIPTION = "MNIST-1D, MLP 40-2048-2048-10 (~4.3M params), cross-entropy"

_FEATURES = 40
_CLASSES = 10
_HIDDEN = 2048


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(_FEATURES, _HIDDEN),
        nn.ReLU(),
        nn.Linear(_HIDDEN, _HIDDEN),
        nn.ReLU(),
        nn.Linear(_HIDDEN, _CLASSES),
    )


def load_shard(shard_index: int, shard_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    return classification_shard(mnist1d(), shard_index, shard_count)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


evaluate = HeldOutClassification(mnist1d)
