"""Exact averaging under faults: allreduce (H = 1) and DiLoCo (H = 5) with real peer processes.

Each case freezes, kills, adds or cuts off peers of a four-peer swarm and checks the
promises of docs/PROTOCOL.md §11: every peer running at the end exits 0 having run every step,
the final models are bit-identical, no group below the quorum ever trained (a strict majority of
4 is 3, so no round of 1 or 2 members unless ``min_peers`` says so), and summary.json counts the
rounds per group size, the rounds redone and the resyncs.

The two-kill case chooses the phase each crash hits with ``P2PDL_FAULT`` (p2pdl/faults.py): one
victim dies right after sending its reduce-scatter chunks, the other right after its all-gather
chunks. The other kills land mid-run at whatever the victim is doing; summary.json records the
phase of every redo. A killed peer restarted with ``--resume`` is tests/test_chaos_recovery.py's
case, for both strategies.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    REPO,
    PeerProcesses,
    assert_finished,
    assert_identical_models,
    assert_one_group_per_round,
    free_ports,
    get_json,
    log_tail,
    read_metrics,
    status,
    wait_for,
    write_config,
)
from netns_util import NetnsLab, require_netns

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.usefixtures("mnist1d_built")]

NAMES = ["p0", "p1", "p2", "p3"]
ROUND_TIMEOUT = 2.0
# dead_after outlasts a round's deadline: a slow round never sees live partners declared dead.
MEMBERSHIP = {"gossip_interval": 0.25, "gossip_timeout": 1.0, "suspect_after": 3.0, "dead_after": 6.0}
FREEZE_SECONDS = 14.0
STRATEGIES = {
    "allreduce": {"kind": "allreduce", "local_steps": 1},
    "diloco": {"kind": "allreduce", "local_steps": 5, "outer": "diloco"},
}
RUN = {"batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "eval_every": 0}
FINISH_TIMEOUT = 600.0
# Cases that start a process mid-run sleep in every step, so the swarm is still training however
# long the new process takes to import torch on a busy machine.
SLOW_WORKLOAD = REPO / "tests" / "workloads" / "slow_cnn.py"
SLOW = {"P2PDL_TEST_STEP_SLEEP": "0.15"}


@pytest.fixture(params=sorted(STRATEGIES))
def strategy(request: pytest.FixtureRequest) -> dict[str, object]:
    return {**STRATEGIES[request.param], "round_timeout": ROUND_TIMEOUT}


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[PeerProcesses]:
    procs = PeerProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


def swarm_config(
    path: Path,
    strategy: dict[str, object],
    ports: list[int],
    *,
    steps: int,
    host: str = "127.0.0.1",
    workload: str = "mnist1d_cnn.py",
    schedule: dict[str, object] | None = None,
    **extra: object,
) -> Path:
    return write_config(
        path,
        names=NAMES,
        ports=ports,
        workload=workload,
        run={**RUN, "steps": steps},
        strategy={**strategy, **extra},
        topology={"kind": "full"},
        transport={"startup_timeout": 120.0},
        membership=MEMBERSHIP,
        checkpoint={"every": 20},
        schedule=schedule,
        host=host,
    )


def check_outcome(tmp_path: Path, names: list[str], steps: int) -> dict[str, dict[str, Any]]:
    """Every named peer ran all ``steps`` and all of them hold one model; no group below quorum trained."""
    figures = {}
    for name in names:
        figures[name] = assert_finished(tmp_path / name, steps)["strategy_status"]
    assert_identical_models(tmp_path / name for name in names)
    assert_one_group_per_round(figures)
    for name, status_ in figures.items():
        quorum = status_["min_peers"]
        sizes = {int(size) for size in status_["rounds_by_group_size"]}
        assert sizes and min(sizes) >= quorum, (name, status_)
    return figures


def steps_between(out: Path, start: float, end: float) -> list[int]:
    """The steps this peer finished between two wall-clock times."""
    return [row["step"] for row in read_metrics(out) if "loss" in row and start < row["wall"] < end]


def report(figures: dict[str, dict[str, Any]]) -> str:
    keys = ("rounds_by_group_size", "rounds_redone", "resyncs", "decisions", "attempt_endings", "group")
    return "\n".join(f"{n}: { ({k: f.get(k) for k in keys}) }" for n, f in figures.items())


def test_a_freeze_of_three_of_four_stops_the_lone_peer_and_the_swarm_resumes(
    tmp_path: Path, peers: PeerProcesses, strategy: dict[str, object]
) -> None:
    steps = 120
    ports = free_ports(len(NAMES))
    config = swarm_config(tmp_path / "swarm.toml", strategy, ports, steps=steps)
    for name in NAMES:
        peers.start(config, name)
    wait_for(lambda: min(status(p)["step"] for p in ports) >= 20, 300, "every peer past step 20")
    frozen = NAMES[1:]
    for name in frozen:
        peers.procs[name].send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    time.sleep(FREEZE_SECONDS)
    for name in frozen:
        peers.procs[name].send_signal(signal.SIGCONT)
    thawed_at = time.time()
    peers.assert_all_finished(FINISH_TIMEOUT, steps)
    figures = check_outcome(tmp_path, NAMES, steps)
    # p0 alone is below the quorum of 3: after its round's deadline it made no step at all.
    alone = steps_between(tmp_path / "p0", stopped_at + 3 * ROUND_TIMEOUT, thawed_at)
    assert alone == [], (alone, report(figures))
    # Where in a round the freeze lands decides which of two correct outcomes follows: the round
    # is abandoned and redone (or the thawed peers resync), or the three froze after their
    # all-gather went out, p0 waited through the freeze in that round's decision, and the round
    # committed with all four. In the second case no group ever shrank.
    redone = sum(f["rounds_redone"] + f["resyncs"] for f in figures.values())
    only_full = all(set(f["rounds_by_group_size"]) == {str(len(NAMES))} for f in figures.values())
    assert redone >= 1 or only_full, report(figures)
    print(report(figures))


def test_a_freeze_of_one_of_four_is_redone_around_and_the_thawed_peer_resyncs(
    tmp_path: Path, peers: PeerProcesses, strategy: dict[str, object]
) -> None:
    # Slow steps: the three must still be training when p3 thaws, however fast an idle machine is.
    steps = 200
    ports = free_ports(len(NAMES))
    # With a warm-up and cosine schedule: the resynced peer's schedule must land on the group's step.
    schedule = {"kind": "cosine", "warmup_steps": 10, "final_lr_fraction": 0.1}
    config = swarm_config(
        tmp_path / "swarm.toml", strategy, ports, steps=steps, workload=str(SLOW_WORKLOAD), schedule=schedule
    )
    for name in NAMES:
        peers.start(config, name, env=SLOW)
    wait_for(lambda: min(status(p)["step"] for p in ports) >= 20, 300, "every peer past step 20")
    peers.procs["p3"].send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    time.sleep(FREEZE_SECONDS)
    peers.procs["p3"].send_signal(signal.SIGCONT)
    thawed_at = time.time()
    peers.assert_all_finished(FINISH_TIMEOUT, steps)
    figures = check_outcome(tmp_path, NAMES, steps)
    # The three others kept a quorum and trained on while p3 was stopped...
    assert steps_between(tmp_path / "p0", stopped_at + 3 * ROUND_TIMEOUT, thawed_at), report(figures)
    assert "3" in figures["p0"]["rounds_by_group_size"], report(figures)
    assert figures["p0"]["rounds_redone"] >= 1, report(figures)
    # ...and p3 noticed it was behind, downloaded a member's state and rejoined.
    assert figures["p3"]["resyncs"] >= 1, report(figures)
    print(report(figures))


def stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP): state T in /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "T"


@pytest.mark.parametrize("strategy", ["allreduce"], indirect=True)  # DiLoCo decides by the same code
def test_a_member_frozen_before_its_all_gather_never_applies_the_round_the_others_redo(
    tmp_path: Path, peers: PeerProcesses, strategy: dict[str, object]
) -> None:
    """The split brain of issue 12: p3 freezes with every reduce-scatter chunk of a round in hand,
    before its all-gather chunk goes out. The others lack that chunk: they decide ABORT and redo
    the round without it. p3 thaws with all of their all-gather chunks buffered (it is full), and
    must not apply the attempt the others aborted (PROTOCOL.md §11.4)."""
    steps = 120
    ports = free_ports(len(NAMES))
    config = swarm_config(tmp_path / "swarm.toml", strategy, ports, steps=steps)
    frozen_round = 40 // int(str(strategy["local_steps"]))
    for name in NAMES:
        peers.start(config, name, env={"P2PDL_FAULT": f"stop:mean:{frozen_round}"} if name == "p3" else None)
    wait_for(lambda: stopped(peers.procs["p3"].pid), 300, "p3 stopped in its all-gather")
    assert "fault injection: SIGSTOP at mean" in log_tail(tmp_path / "p3")
    wait_for(lambda: status(ports[0])["step"] >= 60, 300, "p0 training on without p3")
    peers.procs["p3"].send_signal(signal.SIGCONT)
    peers.assert_all_finished(FINISH_TIMEOUT, steps)
    figures = check_outcome(tmp_path, NAMES, steps)  # one group per round: p3 applied no stale average
    for name in NAMES[:3]:
        assert figures[name]["decisions"].get("abort", 0) >= 1, report(figures)
    decided = figures["p3"]["decisions"]
    assert decided.get("abort", 0) + decided.get("left_behind", 0) >= 1, report(figures)
    assert figures["p3"]["resyncs"] >= 1, report(figures)
    print(report(figures))


@pytest.mark.parametrize("strategy", ["allreduce"], indirect=True)  # DiLoCo runs the same phases
def test_a_member_whose_frames_stop_while_it_heartbeats_is_cut_at_the_learnt_deadline(
    tmp_path: Path, peers: PeerProcesses, strategy: dict[str, object]
) -> None:
    """Item 6 of issue 12: p3's round hangs for 12 s before its all-gather chunk goes out while its
    event loop runs on, so the membership keeps it alive and no rule declares it lost. With a
    60 s ``round_timeout`` the others would wait the hang out and complete the round with it;
    the deadline learnt from their phase times (at most the detector's dead limit of a few
    seconds) ends their attempt first (``attempt_endings.deadline``), they decide ABORT and redo
    the round without p3, which then resyncs."""
    steps, hang = 90, 12.0
    ports = free_ports(len(NAMES))
    config = write_config(
        tmp_path / "swarm.toml",
        names=NAMES,
        ports=ports,
        workload=str(SLOW_WORKLOAD),
        run={**RUN, "steps": steps},
        strategy={**strategy, "round_timeout": 60.0},
        topology={"kind": "full"},
        transport={"startup_timeout": 120.0, "shutdown_timeout": 60.0},
        membership={**MEMBERSHIP, "dead_after": 90.0},  # adaptive (phi): a few seconds for a silent peer
        checkpoint={"every": 20},
    )
    for name in NAMES:
        fault = {"P2PDL_FAULT": f"hang:mean:30:{hang}"} if name == "p3" else {}
        peers.start(config, name, env={**SLOW, **fault})
    peers.assert_all_finished(FINISH_TIMEOUT, steps)
    assert "fault injection: hang" in peers.log("p3")
    figures = check_outcome(tmp_path, NAMES, steps)
    for name in NAMES[:3]:
        assert figures[name]["attempt_endings"].get("deadline", 0) >= 1, report(figures)
        assert figures[name]["decisions"].get("abort", 0) >= 1, report(figures)
        assert figures[name]["round_deadline_seconds"] < hang, report(figures)
    assert figures["p3"]["resyncs"] >= 1, report(figures)
    print(report(figures))


@pytest.mark.parametrize("strategy", ["allreduce"], indirect=True)  # DiLoCo finishes by the same code
def test_a_member_that_thaws_after_the_others_finished_downloads_the_final_state(
    tmp_path: Path, peers: PeerProcesses, strategy: dict[str, object]
) -> None:
    """p3 freezes ten steps before the end and thaws after the others trained those steps
    without it: they wait (within ``transport.shutdown_timeout``) before leaving, so p3 finds them
    ahead, downloads the final state and exits 0 with their model, instead of waiting below
    quorum for peers that are gone."""
    steps = 60
    ports = free_ports(len(NAMES))
    config = write_config(
        tmp_path / "swarm.toml",
        names=NAMES,
        ports=ports,
        workload=str(SLOW_WORKLOAD),
        run={**RUN, "steps": steps},
        strategy={**strategy, "quorum_timeout": 30.0},
        topology={"kind": "full"},
        transport={"startup_timeout": 120.0, "shutdown_timeout": 60.0},
        # A fixed dead_after of 120 s (no phi-accrual): p3 stays a live (suspect) member while
        # frozen, as a restarted peer that is catching up is one.
        membership={**MEMBERSHIP, "dead_after": 120.0, "phi_threshold": 0.0},
        checkpoint={"every": 20},
    )
    for name in NAMES:
        peers.start(config, name, env=SLOW)
    wait_for(lambda: status(ports[3])["step"] >= steps - 10, 300, "p3 ten steps before the end")
    peers.procs["p3"].send_signal(signal.SIGSTOP)
    wait_for(lambda: status(ports[0])["step"] >= steps - 1, 120, "p0 at its last step without p3")
    time.sleep(2.0)  # p0, p1 and p2 are done and waiting for p3 to catch up
    peers.procs["p3"].send_signal(signal.SIGCONT)
    peers.assert_all_finished(FINISH_TIMEOUT, steps)
    figures = check_outcome(tmp_path, NAMES, steps)
    assert figures["p3"]["resyncs"] >= 1, report(figures)
    print(report(figures))


def test_a_sigkill_in_a_reduce_scatter_and_one_in_an_all_gather_are_redone_around_without_a_lost_step(
    tmp_path: Path, peers: PeerProcesses, strategy: dict[str, object]
) -> None:
    steps = 160
    ports = free_ports(len(NAMES))
    # Two of four die: the two survivors keep training only because min_peers says 2 suffice.
    config = swarm_config(tmp_path / "swarm.toml", strategy, ports, steps=steps, min_peers=2)
    local_steps = int(str(strategy["local_steps"]))
    # p3 dies after sending round 40's reduce-scatter chunks (every survivor lacks its all-gather
    # chunk: the round is redone); p2 dies after sending its all-gather chunks of round 80 (the
    # survivors may have completed that round, or redo the next).
    deaths = {"p3": f"kill:rs:{40 // local_steps}", "p2": f"kill:ag:{80 // local_steps}"}
    for name in NAMES:
        peers.start(config, name, env={"P2PDL_FAULT": deaths[name]} if name in deaths else None)
    for victim in deaths:
        assert peers.procs[victim].wait(timeout=FINISH_TIMEOUT) == -signal.SIGKILL, log_tail(tmp_path / victim)
        assert "fault injection: SIGKILL at" in log_tail(tmp_path / victim)
    survivors = ["p0", "p1"]
    peers.assert_all_finished(FINISH_TIMEOUT, steps, names=survivors)
    figures = check_outcome(tmp_path, survivors, steps)
    for name in survivors:
        assert {"4", "2"} <= set(figures[name]["rounds_by_group_size"]), report(figures)
        assert figures[name]["rounds_redone"] >= 1, report(figures)
    # No lost step. A survivor that fell behind (a busy machine can make a live peer miss a round
    # that the others, at quorum, complete without it) loads a member's state and jumps ahead: its
    # own log then has a gap, one per resync at most, and the steps it skipped are in the other's.
    logged = {}
    for name in survivors:
        logged[name] = [r["step"] for r in read_metrics(tmp_path / name) if "loss" in r]
        seen = logged[name]
        assert seen == sorted(set(seen)) and seen[0] == 0 and seen[-1] == steps - 1, seen
        gaps = sum(1 for a, b in itertools.pairwise(seen) if b != a + 1)
        assert gaps <= figures[name]["resyncs"], (name, seen, report(figures))
    assert set().union(*logged.values()) == set(range(steps)), report(figures)
    print(report(figures))


def test_a_fifth_peer_joins_the_group_and_ends_identical(
    tmp_path: Path, peers: PeerProcesses, strategy: dict[str, object]
) -> None:
    steps = 240
    ports = free_ports(len(NAMES) + 1)
    config = swarm_config(tmp_path / "swarm.toml", strategy, ports[:4], steps=steps, workload=str(SLOW_WORKLOAD))
    for name in NAMES:
        peers.start(config, name, env=SLOW)
    wait_for(lambda: status(ports[0])["step"] >= 10, 300, "p0 past step 10")
    joiner = f"127.0.0.1:{ports[4]}"
    peers.start(config, "p4", "--join", "--listen", joiner, "--bootstrap", f"127.0.0.1:{ports[0]}", env=SLOW)
    names = [*NAMES, "p4"]
    peers.assert_all_finished(FINISH_TIMEOUT, steps, names=names)
    figures = check_outcome(tmp_path, names, steps)
    assert "5" in figures["p0"]["rounds_by_group_size"], report(figures)
    assert "p4" in figures["p0"]["group"]["members"], report(figures)
    joined = [row for row in read_metrics(tmp_path / "p4") if row.get("event") == "joined"]
    assert len(joined) == 1 and joined[0]["step"] > 0, joined
    print(report(figures))


def test_a_three_one_partition_trains_only_on_the_quorum_side_then_heals(
    tmp_path: Path, strategy: dict[str, object]
) -> None:
    require_netns()
    port, steps = 29500, 200
    with NetnsLab(len(NAMES)) as lab:
        address = {name: f"{lab.addresses[i]}:{port}" for i, name in enumerate(NAMES)}
        ports = [port] * len(NAMES)
        config = swarm_config(tmp_path / "swarm.toml", strategy, ports, steps=steps, workload=str(SLOW_WORKLOAD))
        text = config.read_text()
        for name in NAMES:
            text = text.replace(f'"127.0.0.1:{port}"', f'"{address[name]}"', 1)
        config.write_text(text)
        procs = NamespacedPeers(lab, tmp_path)
        try:
            for name in NAMES:
                procs.start(config, name, env=SLOW)  # the majority is still training after the heal

            def step_of(name: str) -> int:
                return int(get_json(address[name], "/status")["step"])

            wait_for(lambda: min(step_of(n) for n in NAMES) >= 20, 300, "every peer past step 20")
            lab.cut((0, 1, 2), (3,))
            cut_at = time.time()
            time.sleep(FREEZE_SECONDS)
            lab.heal()
            healed_at = time.time()
            procs.assert_all_finished(FINISH_TIMEOUT, steps)
        finally:
            procs.close()
    figures = check_outcome(tmp_path, NAMES, steps)
    # The side with the quorum trained on; the lone side made no step once its round timed out
    # (DiLoCo: it trains the rest of its round's local steps, then its sync cannot complete).
    assert steps_between(tmp_path / "p0", cut_at + 3 * ROUND_TIMEOUT, healed_at), report(figures)
    assert steps_between(tmp_path / "p3", cut_at + 3 * ROUND_TIMEOUT, healed_at) == [], report(figures)
    assert figures["p3"]["resyncs"] >= 1, report(figures)
    print(report(figures))


class NamespacedPeers(PeerProcesses):
    """``p2pdl peer`` processes, each inside its own network namespace."""

    def __init__(self, lab: NetnsLab, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.lab = lab

    def prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.lab.names[NAMES.index(name)]]
