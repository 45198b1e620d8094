"""Every sharing strategy trains MNIST-1D with real peer processes; a straggler never slows async gossip."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, PeerProcesses, free_ports, run_cluster, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RECIPE = {"batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9}
STRATEGIES: dict[str, Any] = {
    # name: (strategy table, topology table, steps)
    "async-gossip": ({"kind": "async-gossip", "max_staleness": 20}, {"kind": "ring"}, 1500),
    "ps-sync": ({"kind": "ps", "server": "p0", "ps_mode": "sync"}, {"kind": "full"}, 1000),
    # The server counts steps of its own; at lr / (n (1 + staleness)) per update, 2500 of them reach
    # 0.91-0.93 in our runs; 3500 leave a margin above 90%.
    "ps-async": ({"kind": "ps", "server": "p0", "ps_mode": "async"}, {"kind": "full"}, 3500),
    "push-sum": ({"kind": "push-sum"}, {"kind": "ring"}, 1000),
    # Local SGD through the server: parameters averaged on the server every 8 steps.
    "ps-local-sgd": ({"kind": "ps", "server": "p0", "ps_mode": "sync", "local_steps": 8}, {"kind": "full"}, 1000),
    "local-sgd": ({"kind": "allreduce", "local_steps": 8}, {"kind": "full"}, 1000),
    # The paper's outer lr 0.7 / momentum 0.9 diverges on top of inner momentum 0.9 (measured: 9.9%);
    # 0.5 / 0.5 reaches ~94% in a simulation of the same run.
    "diloco": (
        {"kind": "allreduce", "local_steps": 8, "outer": "diloco", "outer_lr": 0.5, "outer_momentum": 0.5},
        {"kind": "full"},
        1000,
    ),
}


@pytest.mark.parametrize("spec", list(STRATEGIES.values()), ids=list(STRATEGIES))
def test_strategy_trains_mnist1d_to_90_percent(tmp_path: Path, spec: Any) -> None:
    strategy, topology, steps = spec
    names = [f"p{i}" for i in range(4)]
    config = write_config(
        tmp_path / "swarm.toml",
        names=names,
        ports=free_ports(4),
        run={**RECIPE, "steps": steps, "eval_every": 250},
        strategy={**strategy, "round_timeout": 10.0},
        topology=topology,
    )
    summary = run_cluster(config, tmp_path / "run")
    accuracies = [p["test_accuracy"] for p in summary["peers"]]
    assert all(p["exit_code"] == 0 for p in summary["peers"])
    assert min(accuracies) >= 0.90, (strategy, accuracies)
    assert all(p["bytes_sent"] > 0 for p in summary["peers"])


def step_rate(out: Path, names: list[str]) -> float:
    """Mean steps computed per second by ``names`` over the middle half of their runs.

    Counts the steps a peer computed (one metrics row each), not its step index: a straggler moves
    its index up to stay within ``max_staleness`` of the swarm, which is not speed.
    """
    rates = []
    for name in names:
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        times = [r["time"] for r in rows if "loss" in r]
        start, end = len(times) // 4, 3 * len(times) // 4
        rates.append((end - start) / (times[end] - times[start]))
    return sum(rates) / len(rates)


def test_async_gossip_is_not_slowed_by_a_straggler(tmp_path: Path) -> None:
    names = [f"p{i}" for i in range(4)]
    fast = ["p0", "p1", "p3"]
    rates: dict[str, float] = {}
    accuracy: dict[str, list[float]] = {}
    for label, sleep in (("alone", 0.0), ("straggler", 0.05)):
        config = write_config(
            tmp_path / f"{label}.toml",
            names=names,
            ports=free_ports(4),
            workload=str(REPO / "tests" / "workloads" / "slow_cnn.py"),
            run={**RECIPE, "steps": 1500},
            strategy={"kind": "async-gossip", "max_staleness": 50, "round_timeout": 10.0},
            # Fully connected: on a ring of 4 the straggler's two neighbours are left with one
            # fresh neighbour each, and one of them once ended at 0.849 (its shard overfitted).
            topology={"kind": "full"},
        )
        procs = PeerProcesses(tmp_path / label)
        try:
            for name in names:
                env = {"P2PDL_TEST_STEP_SLEEP": str(sleep)} if name == "p2" else {}
                procs.start(config, name, env=env)
            codes = procs.wait_all(timeout=600)
        finally:
            procs.close()
        assert all(code == 0 for code in codes.values()), {n: procs.log(n)[-2000:] for n in names}
        rates[label] = step_rate(tmp_path / label, fast)
        accuracy[label] = [
            json.loads((tmp_path / label / n / "summary.json").read_text())["test_accuracy"] for n in names
        ]
    straggler_rate = step_rate(tmp_path / "straggler", ["p2"])
    assert straggler_rate < rates["straggler"] / 3, "the straggler was not slow"
    assert rates["straggler"] >= 0.9 * rates["alone"], rates
    assert min(accuracy["straggler"]) >= 0.90, accuracy


def test_parameter_server_survives_worker_and_server_deaths(tmp_path: Path) -> None:
    """A worker dies: the server goes on. The server dies: workers train locally, then reconnect to
    the server restarted with --resume, and everybody ends on one good model.

    Every step sleeps 10 ms, so the outage (a process restart, seconds) is a small part of the run
    whatever the machine's speed, and workers are still running when the server is back.
    """
    names = [f"p{i}" for i in range(4)]
    ports = free_ports(4)
    config = write_config(
        tmp_path / "ps.toml",
        names=names,
        ports=ports,
        workload=str(REPO / "tests" / "workloads" / "slow_cnn.py"),
        run={**RECIPE, "steps": 2000},
        strategy={"kind": "ps", "server": "p0", "ps_mode": "sync", "round_timeout": 2.0},
        topology={"kind": "full"},
        membership={"gossip_interval": 0.25, "gossip_timeout": 1.0, "suspect_after": 1.5, "dead_after": 3.0},
        checkpoint={"every": 50},
    )
    slow = {"P2PDL_TEST_STEP_SLEEP": "0.01"}
    procs = PeerProcesses(tmp_path)

    def server_step() -> int:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/status", timeout=2) as response:
            return int(json.loads(response.read())["step"])

    def wait_for_server_step(target: int) -> int:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                step = server_step()
                if step >= target:
                    return step
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server never reached step {target}")

    try:
        for name in names:
            procs.start(config, name, env=slow)
        wait_for_server_step(200)
        procs.procs["p3"].send_signal(signal.SIGKILL)  # a worker dies: the server goes on
        wait_for_server_step(400)
        procs.procs["p0"].send_signal(signal.SIGKILL)  # the server dies: workers train locally
        procs.procs["p0"].wait(timeout=30)
        time.sleep(2)
        procs.start(config, "p0", "--resume", env=slow)  # and it comes back from its checkpoint
        codes = {n: procs.procs[n].wait(timeout=600) for n in ("p0", "p1", "p2")}
    finally:
        procs.close()
    assert codes == {"p0": 0, "p1": 0, "p2": 0}, {n: procs.log(n)[-1500:] for n in names}
    assert "resumed from" in procs.log("p0"), procs.log("p0")[-1500:]
    for name in ("p1", "p2"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        missing = [bool(r.get("missing")) for r in steps]
        assert missing.count(True) >= 10, f"{name} never noticed the server was gone"
        # The outage is the first long run of steps without the server; then it must be back.
        start = next(i for i in range(len(missing) - 10) if all(missing[i : i + 10]))
        end = missing.index(False, start)
        back = missing[end:].count(False)
        assert back >= 100, f"{name} did not go back to the restarted server ({back} steps with it)"
    accuracies = {n: json.loads((tmp_path / n / "summary.json").read_text())["test_accuracy"] for n in names[:3]}
    assert min(accuracies.values()) >= 0.85, accuracies
