"""Multi-process tier: real ``p2pdl peer`` processes, real sockets, real signals.

The ``smoke`` tests are short enough for the fast tier (``make test``): a two-peer run through
``scripts/local_cluster.py`` and a lone all-reduce peer refusing to train. The rest are ``slow``.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import (
    PeerProcesses,
    assert_identical_models,
    flat_model,
    free_ports,
    get_json,
    read_metrics,
    run_cluster,
    wait_for,
)

from p2pdl.core.mixing import consensus_distance

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("mnist1d_built")]


@pytest.mark.smoke
def test_two_peer_allreduce_cluster_runs_every_step_to_one_model(
    tmp_path: Path, config_writer: Callable[..., Path]
) -> None:
    """The launcher, the CLI and the exact all-reduce end to end, in a few seconds of training."""
    names = ["p0", "p1"]
    config = config_writer(
        names=names,
        ports=free_ports(2),
        run={"steps": 30, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
        strategy={"kind": "allreduce", "round_timeout": 20.0},
        topology={"kind": "full"},
    )
    out = tmp_path / "run"
    summary = run_cluster(config, out, timeout=300)  # every peer ran its 30 steps, not stopped early
    assert summary["timed_out"] is False
    assert_identical_models(out / n for n in names)
    assert summary["final_consensus_distance"] == 0.0
    for peer in summary["peers"]:
        assert peer["rounds"]["partial"] == 0 and peer["rounds"]["complete"] >= 30, peer
        assert peer["bytes_sent"] > 0 and peer["bytes_received"] > 0
    assert [m["step"] for m in read_metrics(out / "p0") if "loss" in m] == list(range(30))


@pytest.mark.slow  # 10-21 s of real processes: the full tier, to keep `make test` under 3 minutes
def test_a_cluster_stopped_at_its_timeout_fails_even_though_its_peers_exit_0(
    tmp_path: Path, config_writer: Callable[..., Path]
) -> None:
    """local_cluster stops the peers at --timeout; they still evaluate and exit 0, so only the
    launcher's ``timed_out`` (and its exit code) tells a stalled run from a finished one."""
    config = config_writer(
        names=["p0", "p1"],
        ports=free_ports(2),
        run={"steps": 1_000_000, "batch_size": 32},
        strategy={"kind": "gossip", "round_timeout": 5.0},
        topology={"kind": "full"},
    )
    out = tmp_path / "run"
    with pytest.raises(AssertionError, match="timeout"):
        run_cluster(config, out, timeout=15)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timed_out"] is True
    for peer in summary["peers"]:  # a peer that got to train was stopped before its last step
        assert peer["steps"] is None or (peer["stopped_early"] is True and peer["steps"] < 1_000_000), peer


@pytest.mark.slow
def test_ring_of_four_learns_mnist1d_and_agrees(tmp_path: Path, config_writer: Callable[..., Path]) -> None:
    steps = 600  # gossip on this ring passes 90% near step 500 (docs/BENCHMARKS.md); the floor is 0.75
    names = [f"p{i}" for i in range(4)]
    config = config_writer(
        names=names,
        ports=free_ports(4),
        run={"steps": steps, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "eval_every": 200},
        strategy={"kind": "gossip", "round_timeout": 10.0},
        topology={"kind": "ring"},
        membership={"suspect_after": 10.0, "dead_after": 20.0},
    )
    out = tmp_path / "run"
    summary = run_cluster(config, out, timeout=450)
    assert len(summary["peers"]) == 4
    for peer in summary["peers"]:
        assert peer["test_accuracy"] >= 0.75, peer
        assert peer["bytes_sent"] > 0 and peer["bytes_received"] > 0
        assert peer["rounds"]["partial"] == 0
    assert summary["final_consensus_distance"] < 1e-2
    assert (out / "training.png").stat().st_size > 10_000
    # The consensus figure is recomputed from the peers' own model files, not trusted from the script.
    recomputed = consensus_distance([flat_model(out / n / "model.pt") for n in names])
    assert recomputed == pytest.approx(summary["final_consensus_distance"], rel=1e-6)
    assert [m["step"] for m in read_metrics(out / "p0") if "loss" in m] == list(range(steps))


def wait_for_status(port: int, predicate: Callable[[dict[str, object]], bool], timeout: float) -> dict[str, object]:
    last: dict[str, object] = {}

    def check() -> bool:
        nonlocal last
        last = get_json(f"127.0.0.1:{port}")
        return predicate(last)

    try:
        wait_for(check, timeout, f"/status of 127.0.0.1:{port} to satisfy the condition")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {last}") from None
    return last


@pytest.mark.slow
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
    members = {m["name"]: m["state"] for m in get_json(f"127.0.0.1:{ports[0]}", "/members")["members"]}
    assert members["p1"] == "left"
    assert status["state"] == "training"


@pytest.mark.slow  # 10-21 s of real processes: the full tier, to keep `make test` under 3 minutes
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
    assert proc.wait(timeout=150) == 1  # a loaded machine can take a minute to import torch
    log = peer_processes.log("p0")
    assert "exact all-reduce needs every peer" in log
    assert not (tmp_path / "p0" / "model.pt").exists()


@pytest.mark.slow
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
