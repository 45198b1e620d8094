"""Eight real peer processes train MNIST-1D with each compressor, within 1 point of uncompressed.

Gradient compressors run under the exact all-reduce (compressed all-gather with error feedback
for top-k and PowerSGD), so the comparison is against the uncompressed all-reduce on the same
seeds and data; CHOCO-gossip is compared with uncompressed gossip on the same ring. The wide MLP
(4.3M parameters) runs too, so that compression acts on large tensors, not only on the CNN's
small ones. Accuracy is the mean test accuracy over the 8 peers at the end of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import free_ports, run_cluster, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PEERS = 8
RECIPE = {"batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "eval_every": 0}
CNN_STEPS = 600
MLP_STEPS = 120

# name: (strategy, topology, compression, the least fp32/wire ratio it must report)
CNN_CASES: dict[str, tuple[dict[str, Any], str, dict[str, Any], float]] = {
    "fp16": ({"kind": "allreduce"}, "full", {"kind": "fp16", "min_numel": 0}, 1.9),
    "bf16": ({"kind": "allreduce"}, "full", {"kind": "bf16", "min_numel": 0}, 1.9),
    "int8": ({"kind": "allreduce"}, "full", {"kind": "int8", "min_numel": 0, "chunk": 256}, 3.0),
    "topk-ef": ({"kind": "allreduce"}, "full", {"kind": "topk", "ratio": 0.05, "min_numel": 1000}, 4.0),
    "powersgd-ef": ({"kind": "allreduce"}, "full", {"kind": "powersgd", "rank": 2, "min_numel": 1000}, 2.0),
    # CHOCO-gossip with int8 differences. With top-5% (consensus step 0.2) the swarm lagged plain
    # gossip by 4 points at this step count (0.861 vs 0.903): sparse CHOCO needs more rounds
    # (docs/BENCHMARKS.md has it at full length).
    "choco-int8": ({"kind": "gossip"}, "ring", {"kind": "int8", "min_numel": 0, "chunk": 256, "choco_gamma": 0.8}, 3.0),
}


def swarm(
    tmp: Path,
    label: str,
    workload: str,
    steps: int,
    strategy: dict[str, Any],
    topology: str,
    compression: dict[str, Any] | None,
) -> dict[str, Any]:
    names = [f"p{i}" for i in range(PEERS)]
    config = write_config(
        tmp / f"{label}.toml",
        names=names,
        ports=free_ports(PEERS),
        workload=workload,
        run={**RECIPE, "steps": steps},
        strategy={**strategy, "round_timeout": 30.0},
        topology={"kind": topology},
        transport={"startup_timeout": 120.0},
        compression=compression,
    )
    summary = run_cluster(config, tmp / label, timeout=900)
    assert all(p["exit_code"] == 0 for p in summary["peers"]), summary["peers"]
    return summary


def mean_accuracy(summary: dict[str, Any]) -> float:
    accuracies = [p["test_accuracy"] for p in summary["peers"]]
    return sum(accuracies) / len(accuracies)


def wire_ratio(summary: dict[str, Any]) -> float:
    """fp32-equivalent bytes over wire bytes, as the peers report them (mean over peers)."""
    ratios = [p["compression"]["ratio"] for p in summary["peers"]]
    assert all(r is not None for r in ratios), ratios
    return sum(ratios) / len(ratios)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """Uncompressed runs: the exact all-reduce and gossip on a ring, same seeds and schedule."""
    tmp = tmp_path_factory.mktemp("baselines")
    return {
        topology: mean_accuracy(swarm(tmp, kind, "mnist1d_cnn.py", CNN_STEPS, {"kind": kind}, topology, None))
        for kind, topology in (("allreduce", "full"), ("gossip", "ring"))
    }


@pytest.mark.parametrize("case", list(CNN_CASES))
def test_eight_peers_train_within_one_point_of_uncompressed(
    tmp_path: Path, baselines: dict[str, float], case: str
) -> None:
    strategy, topology, compression, least_ratio = CNN_CASES[case]
    summary = swarm(tmp_path, case, "mnist1d_cnn.py", CNN_STEPS, strategy, topology, compression)
    accuracy = mean_accuracy(summary)
    assert accuracy >= baselines[topology] - 0.01, (case, accuracy, baselines[topology])
    assert wire_ratio(summary) >= least_ratio, (case, [p["compression"] for p in summary["peers"]])


def test_wide_mlp_compressed_gradients_match_uncompressed(tmp_path: Path) -> None:
    """4.3M parameters: int8 gradients (scale per 256 values) cost no accuracy at equal steps.

    Top-1% with error feedback is *not* here: on this short schedule it lagged by 15 points (0.465
    vs 0.612 after 120 steps), the known early-training delay of error feedback under momentum;
    docs/BENCHMARKS.md measures it over longer runs.
    """
    allreduce = {"kind": "allreduce"}
    plain = swarm(tmp_path, "plain", "mnist1d_wide_mlp.py", MLP_STEPS, allreduce, "full", None)
    int8 = swarm(
        tmp_path, "int8", "mnist1d_wide_mlp.py", MLP_STEPS, allreduce, "full", {"kind": "int8", "min_numel": 4096}
    )
    assert mean_accuracy(int8) >= mean_accuracy(plain) - 0.01, (mean_accuracy(int8), mean_accuracy(plain))
    assert wire_ratio(int8) >= 3.5, [p["compression"] for p in int8["peers"]]
