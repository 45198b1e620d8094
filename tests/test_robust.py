"""Robust mixing: one of eight peers on a ring sends its parameters x 1000 every round.

Invariants only; the accuracy of defended against clean runs is a benchmark
(benchmarks/robust_mixing.py, BENCHMARKS §7). With ``robust = "clip"`` every honest peer trains
through the attack to its last step on a finite loss. With ``robust = "none"`` the poison reaches
the attacker's neighbours and their loss goes non-finite: the peer stops with
``TrainingDivergedError`` (exit 1) rather than train on garbage.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PEER_ENV, REPO, PeerProcesses, assert_finished, free_ports, read_json, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.usefixtures("mnist1d_built")]

NAMES = [f"p{i}" for i in range(8)]
HONEST = NAMES[:-1]
ATTACKER = NAMES[-1]
STEPS = 300


def run_attacked_swarm(tmp_path: Path, robust: str) -> tuple[dict[str, int], PeerProcesses]:
    """Seven honest peers and the attacker p7 on a ring; the honest peers' exit codes."""
    config = write_config(
        tmp_path / f"{robust}.toml",
        names=NAMES,
        ports=free_ports(8),
        run={"steps": STEPS, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "eval_every": 0},
        strategy={"kind": "gossip", "round_timeout": 10.0, "robust": robust},
        topology={"kind": "ring"},
    )
    procs = PeerProcesses(tmp_path / robust)
    try:
        for name in HONEST:
            procs.start(config, name)
        command = [sys.executable, str(REPO / "tests" / "workloads" / "attacker_peer.py"), str(config), ATTACKER]
        procs.procs[ATTACKER] = subprocess.Popen([*command, str(STEPS)], env={**os.environ, **PEER_ENV}, cwd=REPO)
        codes = procs.wait_all(timeout=700)
    finally:
        procs.close()
    return {name: codes[name] for name in HONEST}, procs


def test_clipping_keeps_every_honest_peer_training_through_a_poisoning_neighbour(tmp_path: Path) -> None:
    codes, procs = run_attacked_swarm(tmp_path, "clip")
    assert all(code == 0 for code in codes.values()), {n: procs.log(n)[-1500:] for n, c in codes.items() if c}
    for name in HONEST:
        summary = assert_finished(tmp_path / "clip" / name, STEPS)
        assert math.isfinite(summary["final_loss"]), (name, summary)
        assert read_json(tmp_path / "clip" / name / "summary.json")["test_accuracy"] >= 0.5, (name, summary)


def test_without_clipping_the_poison_makes_the_attackers_neighbours_diverge(tmp_path: Path) -> None:
    codes, procs = run_attacked_swarm(tmp_path, "none")
    neighbours = ("p0", "p6")  # p7's two ring neighbours
    diverged = [n for n in neighbours if codes[n] != 0 and "TrainingDivergedError" in procs.log(n)]
    assert diverged, {n: (codes[n], procs.log(n)[-800:]) for n in neighbours}
