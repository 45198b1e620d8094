"""The default MNIST-1D CNN workload, with an optional per-process sleep in every loss.

A test makes one peer a straggler by starting it with ``P2PDL_TEST_STEP_SLEEP`` (seconds) set;
the other peers run the same file at full speed.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "_p2pdl_test_cnn", Path(__file__).resolve().parents[2] / "peers" / "mnist1d_cnn.py"
)
assert _spec is not None and _spec.loader is not None
_cnn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cnn)

DESCRIPTION = "MNIST-1D CNN with an optional sleep per step (straggler tests)"
_SLEEP = float(os.environ.get("P2PDL_TEST_STEP_SLEEP", "0"))

build_model = _cnn.build_model
load_shard = _cnn.load_shard
evaluate = _cnn.evaluate


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if _SLEEP:
        time.sleep(_SLEEP)
    loss: torch.Tensor = _cnn.loss_fn(output, target)
    return loss
