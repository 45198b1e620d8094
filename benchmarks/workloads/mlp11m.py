"""MNIST-1D with an 11M-parameter MLP, 40 -> 3300 -> 3300 -> 10 (11,061,610 parameters, ~44 MB fp32).

For the state-transfer benchmark (benchmarks/churn.py): a joiner downloads ~88 MB of parameters and
SGD momentum buffers, the size of a ResNet-18, while a training step stays cheap on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from p2pdl.train.datasets import mnist1d
from p2pdl.train.workload import HeldOutClassification, classification_shard

DESCRIPTION = "MNIST-1D, MLP 40-3300-3300-10 (11.06M params), cross-entropy"

_FEATURES = 40
_CLASSES = 10
_HIDDEN = 3300


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
