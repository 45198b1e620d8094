"""scripts/local_cluster.py's fault schedule: bad schedules are refused up front; real faults on real peers.

The schedule's check runs before any peer starts, so its tests are fast (in-process for each
rule, one launcher process for the refusal). The swarm tests kill, freeze and restart real peer
processes and check what the launcher promises: every event fired at or after its planned step,
a peer killed by the schedule does not fail the run, the others reach run.steps, a frozen peer
made no step while it was stopped, and a restarted peer resumed from its own checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import LOCAL_CLUSTER, PEER_ENV, REPO, free_ports, read_json, read_metrics, write_config

from p2pdl.config import load_config

NAMES = [f"p{i}" for i in range(4)]
RECIPE = {"batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9}
ROUND_TIMEOUT = 2.0
# dead_after outlasts the freeze below: the frozen peer is suspected, not buried, while stopped.
MEMBERSHIP = {"gossip_interval": 0.25, "gossip_timeout": 1.0, "suspect_after": 3.0, "dead_after": 6.0}
FREEZE_SECONDS = 3.0
SLOW_WORKLOAD = REPO / "tests" / "workloads" / "slow_cnn.py"  # sleeps P2PDL_TEST_STEP_SLEEP s per step


def script_module(name: str) -> ModuleType:
    """scripts/NAME.py, imported the way the launcher imports its sibling modules."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, LOCAL_CLUSTER.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fault_schedule() -> ModuleType:
    return script_module("fault_schedule")


def swarm_config(path: Path, *, steps: int, checkpoint_every: int = 0, workload: str = "mnist1d_cnn.py") -> Path:
    return write_config(
        path,
        workload=workload,
        names=NAMES,
        ports=free_ports(len(NAMES)),
        run={**RECIPE, "steps": steps},
        strategy={"kind": "gossip", "round_timeout": ROUND_TIMEOUT},
        topology={"kind": "ring"},
        membership=MEMBERSHIP,
        checkpoint={"every": checkpoint_every} if checkpoint_every else None,
    )


def launch(
    config: Path, out: Path, *schedule: str, timeout: float = 400, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run scripts/local_cluster.py with a fault schedule; its exit status and output."""
    command = [sys.executable, str(LOCAL_CLUSTER), str(config), "--out", str(out), *schedule]
    return subprocess.run(
        [*command, "--no-progress", "--threads", "1", "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 100,
        env={**os.environ, **PEER_ENV, **(env or {})},
        check=False,
    )


def report(result: subprocess.CompletedProcess[str], out: Path) -> str:
    logs = [f"--- {p.parent.name}:\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(out.glob("*/peer.log"))]
    return "\n".join([f"exit {result.returncode}", result.stdout[-3000:], result.stderr[-3000:], *logs])


def peers_by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {peer["name"]: peer for peer in summary["peers"]}


# ---------------------------------------------------------------------------------- the schedule check


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ([("kill", "p3")], "--kill 'p3': expected NAME@STEP"),
        ([("freeze", "p1@10")], "--freeze 'p1@10': expected NAME@STEP:SECONDS"),
        ([("freeze", "p1@10:-1")], "SECONDS must be a finite number > 0"),
        ([("freeze", "p1@10:0")], "SECONDS must be a finite number > 0"),
        ([("kill", "p3@ten")], "STEP 'ten' is not a whole number"),
        ([("kill", "p3@100")], "STEP must be from 0 to 99"),
        ([("kill", "p3@-1")], "STEP must be from 0 to 99"),
        ([("kill", "p9@10")], "no peer 'p9'"),
        ([("join", "p1@10")], "p1 is in [[peers]], so it runs from the start"),
        ([("join", "p4@10"), ("join", "p4@20")], "--join p4@20: p4 is already running (joined by --join p4@10)"),
        ([("join", "bad/name@10")], "a peer name is 1-64 characters"),
        ([("kill", "p4@5"), ("join", "p4@10")], "--kill p4@5: p4 has not joined yet at step 5"),
        ([("kill", "p3@10"), ("freeze", "p3@20:1")], "p3 is dead by then (killed by --kill p3@10)"),
        ([("kill", "p3@10"), ("kill", "p3@10")], "--kill p3@10: p3 is dead by then"),
        ([("restart", "p2@50")], "checkpoint.every is 0"),
    ],
)
def test_each_bad_schedule_names_its_problem(given: list[tuple[str, str]], problem: str) -> None:
    _, problems = fault_schedule().build_schedule(given, configured=NAMES, steps=100, checkpoint_every=0)
    assert len(problems) == 1, problems
    assert problem in problems[0], problems


def test_a_restart_needs_a_checkpoint_written_before_it() -> None:
    build = fault_schedule().build_schedule
    _, early = build([("restart", "p2@19")], configured=NAMES, steps=100, checkpoint_every=20)
    assert early and "first checkpoint at step 20" in early[0], early
    # A joiner's first checkpoint counts from its join step.
    _, joined = build([("join", "p4@30"), ("restart", "p4@40")], configured=NAMES, steps=100, checkpoint_every=20)
    assert joined and "first checkpoint at step 50" in joined[0], joined
    _, sound = build(
        [("restart", "p2@20"), ("kill", "p3@10"), ("restart", "p3@30"), ("join", "p4@30"), ("restart", "p4@50")],
        configured=NAMES,
        steps=100,
        checkpoint_every=20,
    )
    assert sound == []


def test_events_fire_in_step_order_then_command_line_order() -> None:
    given = [("kill", "p3@40"), ("join", "p4@10"), ("freeze", "p1@10:2.5"), ("restart", "p3@60")]
    events, problems = fault_schedule().build_schedule(given, configured=NAMES, steps=100, checkpoint_every=20)
    assert problems == []
    assert [e.label for e in events] == ["--join p4@10", "--freeze p1@10:2.5", "--kill p3@40", "--restart p3@60"]
    assert events[1].seconds == 2.5


def test_the_launcher_refuses_a_bad_schedule_before_starting_any_peer(tmp_path: Path) -> None:
    config = swarm_config(tmp_path / "swarm.toml", steps=100)
    out = tmp_path / "out"
    result = launch(config, out, "--kill", "p9@10", "--freeze", "p1@10:-3", "--join", "p0@5", "--kill", "p3@100")
    assert result.returncode == 2, report(result, out)
    for problem in ("no peer 'p9'", "SECONDS must be a finite number > 0", "p0 is in [[peers]]", "from 0 to 99"):
        assert problem in result.stderr, result.stderr
    assert not out.exists(), "a refused schedule must not start anything"


def test_faults_on_processes_are_applied_and_recorded(tmp_path: Path) -> None:
    """The launcher's bookkeeping on stand-in processes: kill, freeze and thaw, and a skipped event."""
    fault_schedule()
    local_cluster = script_module("local_cluster")
    config_path = swarm_config(tmp_path / "swarm.toml", steps=100)
    args = argparse.Namespace(config=config_path, snapshot_every=None, device=None)
    cluster = local_cluster.Cluster(args, load_config(config_path), tmp_path / "out", 100, dict(os.environ))
    try:
        for name in ("p0", "p1"):
            cluster.procs[name] = subprocess.Popen(["sleep", "60"])
        events, problems = fault_schedule().build_schedule(
            [("kill", "p0@5"), ("freeze", "p1@6:30"), ("kill", "p4@9"), ("join", "p4@7")],
            configured=NAMES,
            steps=100,
            checkpoint_every=0,
        )
        assert problems == []
        kill, freeze, join, late_kill = events
        assert "SIGKILL, exit -9" in cluster.fire(kill, 7)
        assert cluster.procs["p0"].returncode == -signal.SIGKILL and cluster.killed == {"p0"}
        assert (kill.fired_step, kill.exit_code) == (7, -signal.SIGKILL)
        cluster.fire(freeze, 8)
        assert cluster.polled() == [] and cluster.running() == ["p1"]  # stopped: not asked for /status
        assert "no running peer to join through" in cluster.fire(join, 8)
        assert "p4 never started" in cluster.fire(late_kill, 9)
        assert cluster.thaw_due() == []  # 30 s are not up
        assert cluster.thaw_due(everyone=True) == ["p1: SIGCONT"]
        assert freeze.resumed_at is not None and freeze.resumed_at >= freeze.fired_at
        assert cluster.polled() == ["p1"]
        records = [event.record() for event in events]
        assert [r.get("skipped") is None for r in records] == [True, True, False, False], records
    finally:
        for proc in cluster.procs.values():
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------- real faults


def longest_pause(out: Path) -> float:
    """The longest wall-clock gap between two consecutive training steps of one peer."""
    walls = [row["wall"] for row in read_metrics(out) if "loss" in row]
    return max((b - a for a, b in itertools.pairwise(walls)), default=0.0)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("mnist1d_built")
def test_a_ring_survives_a_scheduled_kill_and_freeze(tmp_path: Path) -> None:
    steps = 300
    config = swarm_config(tmp_path / "swarm.toml", steps=steps)
    out = tmp_path / "out"
    result = launch(config, out, "--kill", "p3@60", "--freeze", f"p1@80:{FREEZE_SECONDS:g}")
    assert result.returncode == 0, report(result, out)
    summary = read_json(out / "summary.json")
    events = {event["kind"]: event for event in summary["events"]}
    assert len(summary["events"]) == 2 and set(events) == {"kill", "freeze"}, summary["events"]
    kill, freeze = events["kill"], events["freeze"]
    assert kill["name"] == "p3" and kill["step"] == 60 and kill["fired_step"] >= 60, kill
    assert kill["killed_exit_code"] == -9, kill
    assert freeze["name"] == "p1" and freeze["step"] == 80 and freeze["fired_step"] >= 80, freeze
    # Both times are rounded to the millisecond in summary.json.
    assert freeze["resumed_seconds"] - freeze["fired_seconds"] >= FREEZE_SECONDS - 0.002, freeze
    assert "skipped" not in kill and "skipped" not in freeze
    peers = peers_by_name(summary)
    assert peers["p3"]["killed_by_schedule"] is True and peers["p3"]["exit_code"] == -9, peers["p3"]
    assert not (out / "p3" / "summary.json").exists(), "p3 was killed, not stopped"
    assert max(row["step"] for row in read_metrics(out / "p3") if "loss" in row) < steps
    for name in ("p0", "p1", "p2"):
        peer = peers[name]
        assert peer["exit_code"] == 0 and peer["killed_by_schedule"] is False, peer
        assert peer["steps"] == steps and peer["stopped_early"] is False, peer
    # p1 really was stopped: it made no step for as long as the freeze lasted.
    assert longest_pause(out / "p1") >= FREEZE_SECONDS * 0.95
    assert "--kill p3@60: SIGKILL" in result.stdout and "p1: SIGCONT" in result.stdout, result.stdout
    assert (out / "training.png").stat().st_size > 0
    assert summary["final_consensus_distance"] is not None  # over the three survivors


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("mnist1d_built")
def test_a_restarted_peer_resumes_from_its_checkpoint_and_finishes(tmp_path: Path) -> None:
    steps, every, at = 240, 20, 80
    config = swarm_config(tmp_path / "swarm.toml", steps=steps, checkpoint_every=every)
    out = tmp_path / "out"
    result = launch(config, out, "--restart", f"p2@{at}")
    assert result.returncode == 0, report(result, out)
    summary = read_json(out / "summary.json")
    [restart] = summary["events"]
    assert restart["kind"] == "restart" and restart["name"] == "p2" and restart["fired_step"] >= at, restart
    assert restart["killed_exit_code"] == -9 and restart["exit_code"] == 0, restart
    peers = peers_by_name(summary)
    assert peers["p2"]["restarts"] == 1 and peers["p2"]["killed_by_schedule"] is False, peers["p2"]
    for name in NAMES:
        assert peers[name]["exit_code"] == 0, peers[name]
        assert peers[name]["steps"] == steps and peers[name]["stopped_early"] is False, peers[name]
    log = (out / "p2" / "peer.log").read_text(errors="replace")
    before, marker, after = log.partition(f"--- local_cluster: --restart p2@{at} at swarm step")
    assert marker, log[-3000:]
    resumed = re.search(r"p2 resumed from \S+checkpoint\.pt at step (\d+)", after)
    assert resumed, after[-3000:]
    step = int(resumed.group(1))
    # The last checkpoint p2 wrote before it was killed: at least the first one, never past the swarm.
    assert every <= step <= restart["fired_step"] and step % every == 0, (step, restart)
    assert "resumed from" not in before


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("mnist1d_built")
def test_a_scheduled_joiner_downloads_the_swarm_state_and_finishes(tmp_path: Path) -> None:
    """Every step sleeps 0.2 s, so the swarm still trains for a minute after the join fires,
    however long the joiner's process takes to start on a busy machine."""
    steps, at = 300, 20
    config = swarm_config(tmp_path / "swarm.toml", steps=steps, workload=str(SLOW_WORKLOAD))
    out = tmp_path / "out"
    result = launch(config, out, "--join", f"p4@{at}", env={"P2PDL_TEST_STEP_SLEEP": "0.2"})
    assert result.returncode == 0, report(result, out)
    summary = read_json(out / "summary.json")
    [join] = summary["events"]
    assert join["kind"] == "join" and join["name"] == "p4" and join["fired_step"] >= at, join
    assert join["exit_code"] == 0 and join["address"].startswith("127.0.0.1:"), join
    peers = peers_by_name(summary)
    assert list(peers) == [*NAMES, "p4"]
    for peer in peers.values():
        assert peer["exit_code"] == 0 and peer["steps"] == steps and peer["stopped_early"] is False, peer
    # It took the swarm's state instead of starting from step 0, and the others rewired to it.
    joined = [row for row in read_metrics(out / "p4") if row.get("event") == "joined"]
    assert len(joined) == 1 and joined[0]["step"] > 0, joined
    first = min(row["step"] for row in read_metrics(out / "p4") if "loss" in row)
    assert first >= joined[0]["step"], (first, joined)
    assert any("p4" in rewire["added"] for rewire in read_json(out / "p0" / "summary.json")["rewires"])
