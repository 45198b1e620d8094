"""MNIST-1D with the paper's ConvBase CNN (5,210 parameters): p2pdl's default workload.

Small enough that a training step costs well under a millisecond of communication per
peer, yet it reaches ~90% test accuracy, so gossip and averaging effects show up in the
accuracy curve rather than being drowned by the model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from p2pdl.datasets import mnist1d, shard_indices

DESCRIPTION = "MNIST-1D, ConvBase CNN (5,210 params), cross-entropy"

_FEATURES = 40
_CLASSES = 10
_CHANNELS = 25

# Held-out tensors per device, built on first use; evaluation runs as one batch.
_test_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


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
    data = mnist1d()
    indices = shard_indices(len(data["y"]), shard_index, shard_count)
    inputs: np.ndarray = data["x"][indices]
    targets: np.ndarray = data["y"][indices]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


def _test_set(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = str(device)
    if key not in _test_tensors:
        data = mnist1d()
        _test_tensors[key] = (
            torch.from_numpy(data["x_test"]).to(device),
            torch.from_numpy(data["y_test"]).to(device),
        )
    return _test_tensors[key]


def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
    inputs, targets = _test_set(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(inputs)
            test_loss = loss_fn(output, targets).item()
            test_accuracy = (output.argmax(dim=1) == targets).float().mean().item()
    finally:
        model.train(was_training)
    return {"test_accuracy": test_accuracy, "test_loss": test_loss}
