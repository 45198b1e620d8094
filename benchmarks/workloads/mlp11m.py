"""MNIST-1D with an 11M-parameter MLP, 40 -> 3300 -> 3300 -> 10 (11,061,610 parameters, ~44 MB fp32).

For the state-transfer benchmark (benchmarks/churn.py): a joiner downloads ~88 MB of parameters and
SGD momentum buffers, the size of a ResNet-18, while a training step stays cheap on a CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from p2pdl.datasets import mnist1d, shard_indices

DESCRIPTION = "MNIST-1D, MLP 40-3300-3300-10 (11.06M params), cross-entropy"

_FEATURES = 40
_CLASSES = 10
_HIDDEN = 3300

# Held-out tensors per device, built on first use; evaluation runs as one batch.
_test_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(_FEATURES, _HIDDEN),
        nn.ReLU(),
        nn.Linear(_HIDDEN, _HIDDEN),
        nn.ReLU(),
        nn.Linear(_HIDDEN, _CLASSES),
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
