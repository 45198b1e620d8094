"""Robust mixing: one of eight peers sends its parameters x 1000 every round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PEER_ENV, REPO, PeerProcesses, free_ports, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAMES = [f"p{i}" for i in range(8)]
HONEST = NAMES[:-1]
STEPS = 700


def run_swarm(tmp_path: Path, label: str, robust: str, attacker: bool) -> list[float]:
    """Honest peers' final accuracies; a peer that crashed (its loss went NaN) counts as 0."""
    config = write_config(
        tmp_path / f"{label}.toml",
        names=NAMES,
        ports=free_ports(8),
        run={"steps": STEPS, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        strategy={"kind": "gossip", "round_timeout": 10.0, "robust": robust},
        topology={"kind": "ring"},
    )
    procs = PeerProcesses(tmp_path / label)
    try:
        for name in HONEST:
            procs.start(config, name)
        if attacker:
            command = [
                sys.executable,
                str(REPO / "tests" / "workloads" / "attacker_peer.py"),
                str(config),
                "p7",
                str(STEPS),
            ]
            procs.procs["p7"] = subprocess.Popen(command, env={**os.environ, **PEER_ENV}, cwd=REPO)
        else:
            procs.start(config, "p7")
        codes = procs.wait_all(timeout=700)
    finally:
        procs.close()
    if robust != "none" or not attacker:
        assert all(codes[n] == 0 for n in HONEST), {n: procs.log(n)[-1500:] for n in HONEST if codes[n]}
    accuracies = []
    for name in HONEST:
        summary = tmp_path / label / name / "summary.json"
        accuracies.append(json.loads(summary.read_text())["test_accuracy"] if codes[name] == 0 else 0.0)
    return accuracies


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_robust_mixing_limits_a_poisoning_neighbour(tmp_path: Path) -> None:
    clean = run_swarm(tmp_path, "clean", "none", attacker=False)
    defended = run_swarm(tmp_path, "clipped", "clip", attacker=True)
    undefended = run_swarm(tmp_path, "undefended", "none", attacker=True)
    print(f"honest accuracy: clean {mean(clean):.4f}, clip {mean(defended):.4f}, none {mean(undefended):.4f}")
    assert mean(defended) >= mean(clean) - 0.02, (clean, defended)
    # The attacker's two neighbours lose one honest edge each and end a few points lower (0.874-0.891
    # seen against a clean mean of 0.92); without the option they diverge to NaN.
    assert min(defended) >= 0.85, (clean, defended)
    # Without the option the damage shows: the poison spreads until honest losses go NaN.
    assert mean(undefended) < mean(clean) - 0.2, (clean, undefended)
