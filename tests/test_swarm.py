"""Multi-process tier: real ``p2pdl peer`` processes, real sockets, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import PEER_ENV, REPO, PeerProcesses, free_ports

from p2pdl.core.mixing import consensus_distance

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_ring_of_four_learns_mnist1d_and_agrees(tmp_path: Path, config_writer: Callable[..., Path]) -> None:
    names = [f"p{i}" for i in range(4)]
    config = config_writer(
        names=names,
        ports=free_ports(4),
        run={
            "steps": 1500,
            "batch_size": 32,
            "optimizer": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "eval_every": 500,
        },
        strategy={"kind": "gossip", "round_timeout": 10.0},
        topology={"kind": "ring"},
    )
    out = tmp_path / "run"
    script = str(REPO / "scripts" / "local_cluster.py")
    command = [sys.executable, script, str(config), "--out", str(out), "--no-progress", "--threads", "1"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=450, env={**os.environ, **PEER_ENV}, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["peers"]) == 4
    for peer in summary["peers"]:
        assert peer["exit_code"] == 0
        assert peer["steps"] == 1500
        assert peer["test_accuracy"] >= 0.90, peer
        assert peer["bytes_sent"] > 0 and peer["bytes_received"] > 0
        assert peer["rounds"]["partial"] == 0
    assert summary["final_consensus_distance"] < 1e-2
    assert (out / "training.png").stat().st_size > 10_000
    # The consensus figure is recomputed from the peers' own model files, not trusted from the script.
    vectors = [
        torch.cat([v.reshape(-1) for v in torch.load(out / n / "model.pt", weights_only=True).values()]) for n in names
    ]
    recomputed = consensus_distance(vectors)
    assert recomputed == pytest.approx(summary["final_consensus_distance"], rel=1e-6)
    metrics = [json.loads(line) for line in (out / "p0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1500))


def wait_for_status(port: int, predicate: Callable[[dict[str, object]], bool], timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    last: dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1) as response:
                last = json.loads(response.read())
            if predicate(last):
                return last
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"status never satisfied the condition; last: {last}")


def test_sigterm_stops_a_peer_cleanly_and_neighbours_see_the_leave(
    tmp_path: Path, config_writer: Callable[..., Path], peer_processes: PeerProcesses
) -> None:
    ports = free_ports(3)
    config = config_writer(
        names=["p0", "p1", "p2"],
        ports=ports,
        run={"steps": 100_000, "batch_size": 32},
        strategy={"kind": "gossip", "round_timeout": 30.0},
        topology={"kind": "ring"},
    )
    for name in ("p0", "p1", "p2"):
        peer_processes.start(config, name)
    wait_for_status(ports[1], lambda s: int(s["step"]) >= 20, timeout=90)  # type: ignore[call-overload]
    peer_processes.procs["p1"].send_signal(signal.SIGTERM)
    assert peer_processes.procs["p1"].wait(timeout=40) == 0, peer_processes.log("p1")
    summary = json.loads((tmp_path / "p1" / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["steps"] >= 20
    state = torch.load(tmp_path / "p1" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    status = wait_for_status(
        ports[0],
        lambda s: "p1" not in s["strategy"]["neighbors"],  # type: ignore[index, operator]
        timeout=10,
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/members", timeout=2) as response:
        members = {m["name"]: m["state"] for m in json.loads(response.read())["members"]}
    assert members["p1"] == "left"
    assert status["state"] == "training"


def test_allreduce_peer_alone_fails_loudly(
    tmp_path: Path, config_writer: Callable[..., Path], peer_processes: PeerProcesses
) -> None:
    config = config_writer(
        names=["p0", "p1"],
        ports=free_ports(2),
        run={"steps": 5},
        strategy={"kind": "allreduce", "round_timeout": 2.0},
        topology={"kind": "full"},
        transport={"startup_timeout": 2.0, "handshake_timeout": 1.0},
    )
    proc = peer_processes.start(config, "p0")
    assert proc.wait(timeout=60) == 1
    log = peer_processes.log("p0")
    assert "exact all-reduce needs every peer" in log
    assert not (tmp_path / "p0" / "model.pt").exists()


def test_allreduce_swarm_stopped_together_exits_cleanly(
    tmp_path: Path, config_writer: Callable[..., Path], peer_processes: PeerProcesses
) -> None:
    """SIGTERM to every peer (the end of a time budget): a peer caught in a round whose partners
    left first drops that round and stops cleanly (exit 0), with finite parameters."""
    ports = free_ports(3)
    config = config_writer(
        names=["p0", "p1", "p2"],
        ports=ports,
        run={"steps": 100_000, "batch_size": 32},
        # Longer than the waits below: a peer must not sit out a round's timeout once told to stop.
        strategy={"kind": "allreduce", "round_timeout": 300.0},
        topology={"kind": "full"},
    )
    for name in ("p0", "p1", "p2"):
        peer_processes.start(config, name)
    wait_for_status(ports[0], lambda s: int(s["step"]) >= 20, timeout=90)  # type: ignore[call-overload]
    for name in ("p2", "p1", "p0"):  # one after the other: the first to leave catches the others mid-round
        peer_processes.procs[name].send_signal(signal.SIGTERM)
    codes = {n: peer_processes.procs[n].wait(timeout=120) for n in ("p0", "p1", "p2")}
    assert codes == {"p0": 0, "p1": 0, "p2": 0}, {n: peer_processes.log(n)[-1500:] for n in codes}
    for name in codes:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["stopped_early"] is True
        state = torch.load(tmp_path / name / "model.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state.values())
