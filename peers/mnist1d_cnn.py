"""MNIST-1D with the paper's ConvBase CNN (5,210 parameters): p2pdl's default workload.

Small enough that a training step costs well under a millisecond of communication per
peer, yet it reaches ~90% test accuracy, so gossip and averaging effects show up in the
accuracy curve rather than being drowned by the model.
"""

from __future__ import annotations

import torch
from torch import nn

from p2pdl.train.datasets import mnist1d
from p2pdl.train.workload import HeldOutClassification, classification_shard

DESCRIPTION = "MNIST-1D, ConvBase CNN (5,210 params), cross-entropy"

_FEATURES = 40
_CLASSES = 10
_CHANNELS = 25


def build_model() -> nn.Module:
    # Sequence length 40 -> 19 -> 10 -> 5 through the three stride-2 convolutions.
    return nn.Sequential(
        nn.Unflatten(1, (1, _FEATURES)),  # (B, 40) -> (B, 1, 40)
        nn.Conv1d(1, _CHANNELS, kernel_size=5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(_CHANNELS, _CHANNELS, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(_CHANNELS, _CHANNELS, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),  # (B, 25, 5) -> (B, 125)
        nn.Linear(_CHANNELS * 5, _CLASSES),
    )


def load_shard(shard_index: int, shard_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    return classification_shard(mnist1d(), shard_index, shard_count)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


evaluate = HeldOutClassification(mnist1d)
