"""Churn: peers crash, leave, join and restart while the rest keep training (real processes, real signals)."""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import PeerProcesses, free_ports, read_json, read_metrics, status, wait_for, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.usefixtures("mnist1d_built")]

FAST_MEMBERSHIP = {"gossip_interval": 0.25, "gossip_timeout": 1.0, "suspect_after": 1.5, "dead_after": 3.0}
ROUND_TIMEOUT = 2.0  # below dead_after: a round gives up on a partner before membership does


def metrics(out: Path) -> list[dict[str, Any]]:
    return read_metrics(out)


def summary(out: Path) -> dict[str, Any]:
    return read_json(out / "summary.json")


def swarm_config(path: Path, names: list[str], ports: list[int], **run: object) -> Path:
    return write_config(
        path,
        names=names,
        ports=ports,
        run={"steps": 1000, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "eval_every": 0, **run},
        strategy={"kind": "gossip", "round_timeout": ROUND_TIMEOUT},
        topology={"kind": "ring"},
        transport={"startup_timeout": 90.0},
        membership=FAST_MEMBERSHIP,
        checkpoint={"every": 50},
    )


def longest_gap_between_complete_rounds(rows: list[dict[str, Any]]) -> float:
    times = [r["wall"] for r in rows if r.get("complete")]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def test_survivors_of_two_sigkills_keep_training_and_rewire_around_them(tmp_path: Path) -> None:
    names = [f"p{i}" for i in range(6)]
    victims = ("p1", "p4")
    steps = 500
    ports = free_ports(len(names))
    config = swarm_config(tmp_path / "swarm.toml", names, ports, steps=steps)
    procs = PeerProcesses(tmp_path)
    try:
        for name in names:
            procs.start(config, name)
        wait_for(lambda: status(ports[1])["step"] >= 150, 180, "p1 to reach step 150")
        for victim in victims:
            procs.procs[victim].send_signal(signal.SIGKILL)
        survivors = [n for n in names if n not in victims]
        procs.assert_all_finished(timeout=400, steps=steps, names=survivors)
    finally:
        procs.close()
    for name in survivors:
        rows = [r for r in metrics(tmp_path / name) if "loss" in r]
        gap = longest_gap_between_complete_rounds(rows)
        # Never longer than dead_after plus one round timeout without a complete round
        # (a little slack for scheduling on a loaded 2-core machine).
        assert gap <= FAST_MEMBERSHIP["dead_after"] + ROUND_TIMEOUT + 1.5, (name, gap)
        # Training went on: a floor far above chance (0.1) and below what these runs reach.
        assert summary(tmp_path / name)["test_accuracy"] >= 0.75, (name, summary(tmp_path / name))
    # The crashed peers were rewired around: the survivors' neighbours are all alive.
    for name in ("p0", "p2", "p3", "p5"):
        rewires = summary(tmp_path / name)["rewires"]
        assert rewires, f"{name} never rewired"
        assert not set(victims) & set(rewires[-1]["neighbors"])


def flat(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True).reshape(-1).double()


def test_a_fifth_peer_joins_mid_run_and_catches_up(tmp_path: Path, peer_processes: PeerProcesses) -> None:
    names = [f"p{i}" for i in range(4)]
    ports = free_ports(5)
    steps = 1000  # long enough that a joiner started at step 150 joins well before the end, even on a busy box
    config = swarm_config(tmp_path / "swarm.toml", names, ports[:4], steps=steps, data_shards=20)
    for name in names:
        peer_processes.start(config, name, "--snapshot-every", "5")
    wait_for(lambda: status(ports[0])["step"] >= 150, 180, "the swarm to reach step 150")
    peer_processes.start(
        config,
        "p4",
        "--listen",
        f"127.0.0.1:{ports[4]}",
        "--bootstrap",
        f"127.0.0.1:{ports[0]}",
        "--snapshot-every",
        "5",
    )
    peer_processes.assert_all_finished(timeout=400, steps=steps)
    joined = next(r for r in metrics(tmp_path / "p4") if r.get("event") == "joined")
    assert joined["step"] >= 150 and joined["seconds"] < 10
    assert joined["step"] <= steps - 30, f"the joiner came too late to be checked (step {joined['step']})"
    # Within 20 rounds of joining, the joiner is as close to the swarm mean as the others are.
    check = (joined["step"] // 5 + 5) * 5  # the first common snapshot >= 20 rounds after the join
    everyone = [*names, "p4"]
    vectors = {n: flat(tmp_path / n / "snapshots" / f"step_{check}.pt") for n in everyone}
    mean = torch.stack(list(vectors.values())).mean(dim=0)
    distance = {n: float((v - mean).norm() / mean.norm()) for n, v in vectors.items()}
    spread = max(distance[n] for n in names)
    assert distance["p4"] <= max(spread, 1e-3) * 1.5, distance
    members = [r for r in summary(tmp_path / "p0")["rewires"] if "p4" in r["added"]]
    assert members, "p0 never saw p4"


def test_sigterm_makes_neighbours_rewire_without_waiting_for_timeouts(
    tmp_path: Path, peer_processes: PeerProcesses
) -> None:
    names = [f"p{i}" for i in range(5)]
    ports = free_ports(5)
    config = write_config(
        tmp_path / "swarm.toml",
        names=names,
        ports=ports,
        run={"steps": 100_000, "eval_every": 0},
        strategy={"kind": "gossip", "round_timeout": 30.0},
        topology={"kind": "ring"},
        membership={"gossip_interval": 0.5, "suspect_after": 30.0, "dead_after": 60.0},
    )
    for name in names:
        peer_processes.start(config, name)
    wait_for(lambda: all(status(p)["step"] >= 20 for p in ports), 120, "every peer at step 20")
    sent = time.time()
    peer_processes.procs["p2"].send_signal(signal.SIGTERM)
    for neighbor, port in (("p1", ports[1]), ("p3", ports[3])):
        wait_for(
            lambda port=port: "p2" not in status(port)["strategy"]["neighbors"],
            10,
            f"{neighbor} to drop p2",
        )
    rewired = [r for r in status(ports[1])["rewires"] if "p2" in r["removed"]]
    # Far below suspect_after (30 s) and the round timeout (30 s): the leave was announced.
    assert rewired and rewired[-1]["time"] - sent < 5.0, rewired
    assert peer_processes.procs["p2"].wait(timeout=60) == 0
    assert status(ports[1])["strategy"]["neighbors"] == ["p0", "p3"]
    assert (tmp_path / "p2" / "checkpoint.pt").exists()


def test_kill_all_and_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    names = [f"p{i}" for i in range(3)]
    ports = free_ports(3)
    config = swarm_config(tmp_path / "swarm.toml", names, ports, steps=400)
    first = PeerProcesses(tmp_path)
    try:
        for name in names:
            first.start(config, name)
        wait_for(lambda: all(status(p)["step"] >= 160 for p in ports), 180, "every peer past step 160")
        for proc in first.procs.values():
            proc.send_signal(signal.SIGKILL)
        for proc in first.procs.values():
            proc.wait(timeout=30)
    finally:
        first.close()
    checkpointed = {}
    for name in names:
        state = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        checkpointed[name] = int(state["step"])
        assert checkpointed[name] >= 150 and checkpointed[name] % 50 == 0
    losses_before = {n: [r["loss"] for r in metrics(tmp_path / n) if "loss" in r] for n in names}
    second = PeerProcesses(tmp_path)
    try:
        for name in names:
            second.start(config, name, "--resume")
        second.assert_all_finished(timeout=300, steps=400)
    finally:
        second.close()
    for name in names:
        rows = [r for r in metrics(tmp_path / name) if "loss" in r]
        resumed = rows[len(losses_before[name]) :]
        assert resumed[0]["step"] == checkpointed[name], "resume must restart at the checkpointed step"
        untrained = losses_before[name][0]
        recent = sum(losses_before[name][checkpointed[name] - 20 : checkpointed[name]]) / 20
        first_after = sum(r["loss"] for r in resumed[:20]) / 20
        assert first_after < 0.6 * untrained, (untrained, first_after)
        assert first_after < recent * 1.5 + 0.1, (recent, first_after)
