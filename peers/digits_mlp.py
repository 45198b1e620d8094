"""scikit-learn's 8x8 digits with an MLP, 64 -> 128 -> 10 (9,610 parameters).

A second, independent dataset that ships with scikit-learn (no generation, no cache), for
checking that nothing in p2pdl is specific to MNIST-1D.
"""

from __future__ import annotations

import torch
from torch import nn

from p2pdl.train.datasets import digits
from p2pdl.train.workload import HeldOutClassification, classification_shard

DESCRIPTION = "sklearn digits, MLP 64-128-10 (9,610 params), cross-entropy"

_FEATURES = 64
_CLASSES = 10
_HIDDEN = 128


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(_FEATURES, _HIDDEN),
        nn.ReLU(),
        nn.Linear(_HIDDEN, _CLASSES),
    )


def load_shard(shard_index: int, shard_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    return classification_shard(digits(), shard_index, shard_count)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


evaluate = HeldOutClassification(digits)
