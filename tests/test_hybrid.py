"""Multi-GPU peers (``p2pdl peer --nproc-per-node K``, :mod:`p2pdl.train.hybrid`), on gloo.

Parity: 2 peers x 2 local ranks under exact all-reduce must match a 4-rank ``torch.distributed``
DDP run (this file, run as a script, is that reference) in which DDP rank ``2p + r`` trains the
micro-batch local rank r of peer p trained: slice r of ``tensor_split(batch, 2)`` of peer p's batch.
The two peers must end bit-identical, and every local rank must hold its peer's exact
parameters (the digests each rank reports in ``summary.json``).

Failures: a follower killed mid-run takes its peer down (exit 1, an error naming the rank, the
wire side closed so the neighbour sees it leave) while the neighbour trains on, as a gossip peer
does when a neighbour leaves; a rank 0 killed outright takes its followers with it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import (
    PEER_ENV,
    REPO,
    PeerProcesses,
    assert_finished,
    free_ports,
    load_state,
    read_json,
    read_metrics,
    wait_for,
    write_config,
)

from p2pdl.cli import main as cli_main
from p2pdl.train.hybrid import local_rank_problems

PROCESS_TIMEOUT = 240.0  # seconds for a swarm of hybrid peers on a busy 2-core machine
ROUND_TIMEOUT = 30.0
MEMBERSHIP = {"suspect_after": ROUND_TIMEOUT, "dead_after": 2 * ROUND_TIMEOUT}
STEPS = 12
NPROC = 2
RUN = {"steps": STEPS, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "torch_threads": 1}
# DDP pre-divides by the world size and sums in gloo's order; p2pdl averages over the local ranks
# (DDP, 2 ranks) then over the peers: the same maths, different float32 rounding per step.
RTOL = 1e-5
ATOL = 1e-6


def _swarm(
    tmp_path: Path, label: str, names: list[str], *, run: dict[str, object], strategy: dict[str, object]
) -> Path:
    return write_config(
        tmp_path / f"{label}.toml",
        names=names,
        ports=free_ports(len(names)),
        run=run,
        strategy={"round_timeout": ROUND_TIMEOUT, **strategy},
        topology={"kind": "full"},
        membership=MEMBERSHIP,
    )


def _wait_ok(procs: PeerProcesses, names: list[str]) -> None:
    codes = procs.wait_all(timeout=PROCESS_TIMEOUT)
    for name in names:
        assert codes[name] == 0, f"{name} exited {codes[name]}:\n{procs.log(name)[-3000:]}"


def _assert_local_ranks_identical(out: Path) -> dict[str, object]:
    summary = read_json(out / "summary.json")
    local = summary["local_ranks"]
    assert local["nproc"] == NPROC and local["backend"] == "gloo", local
    assert len(local["param_sha256"]) == NPROC, local
    assert len(set(local["param_sha256"])) == 1 and local["identical"] is True, local
    return summary


def _follower_pid(log: str) -> int:
    found = re.search(r"local rank 1 is pid (\d+)", log)
    assert found, log[-2000:]
    return int(found.group(1))


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


# --------------------------------------------------------------------------- fast: validation


def test_local_rank_problems() -> None:
    assert local_rank_problems(1, None, 32) == []
    assert local_rank_problems(2, torch.device("cpu"), 32) == []
    assert "must be >= 1, got 0" in local_rank_problems(0, None, 32)[0]
    (problem,) = local_rank_problems(3, torch.device("cpu"), 32)
    assert "run.batch_size (32) must divide by --nproc-per-node (3)" in problem
    assert local_rank_problems(1, None, 32, accumulate=4, precision="bf16", param_dtype="bfloat16") == []
    problems = local_rank_problems(2, None, 32, accumulate=4, precision="bf16", param_dtype="bfloat16")
    assert [p.split(" needs ")[1].split(" = ")[0] for p in problems] == [
        "run.accumulate",
        "run.precision",
        "run.param_dtype",
    ]


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    config = write_config(tmp_path / "c.toml", names=["a", "b"], ports=free_ports(2), run={"batch_size": 32})
    return ["peer", "--config", str(config), "--name", "a", "--out", str(tmp_path / "a"), *extra]


def test_cli_refuses_zero_local_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(_cli(tmp_path, "--nproc-per-node", "0")) == 2
    assert "--nproc-per-node must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists(), "a refused peer started anyway"


def test_cli_refuses_more_local_ranks_than_cuda_devices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli_main(_cli(tmp_path, "--device", "cuda", "--nproc-per-node", "2")) == 2
    assert "--nproc-per-node 2 needs 2 CUDA devices (one per local rank); this machine has 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists(), "a refused peer started anyway"


# --------------------------------------------------------------------------- slow: real processes


@pytest.mark.slow
@pytest.mark.timeout(2 * PROCESS_TIMEOUT + 60)
def test_two_peers_of_two_local_ranks_match_four_rank_ddp(
    tmp_path: Path, peer_processes: PeerProcesses, mnist1d_built: None
) -> None:
    names = ["a", "b"]
    config = _swarm(tmp_path, "allreduce", names, run=RUN, strategy={"kind": "allreduce"})
    for name in names:
        peer_processes.start(config, name, "--nproc-per-node", str(NPROC))
    _wait_ok(peer_processes, names)
    for name in names:
        summary = _assert_local_ranks_identical(peer_processes.outs[name])
        assert_finished(peer_processes.outs[name], STEPS)
        assert summary["rounds"]["partial"] == 0, summary["rounds"]

    ddp_out = tmp_path / "ddp"  # after the swarm, so the two never compete for the cores
    _run_ddp_reference(config, ddp_out, world=len(names) * NPROC)
    peer_a, peer_b = (load_state(peer_processes.outs[name] / "model.pt") for name in names)
    ddp = load_state(ddp_out / "model.pt")
    for key in peer_a:
        assert torch.equal(peer_a[key], peer_b[key]), f"{key}: the two peers' models differ"
    initial = load_state(ddp_out / "initial.pt")
    for key in peer_a:
        moved = float((peer_a[key] - initial[key]).abs().max())
        assert moved > 1e-3, f"{key} barely moved ({moved:.2e}): the comparison would prove nothing"
        torch.testing.assert_close(peer_a[key], ddp[key], rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(PROCESS_TIMEOUT + 30)
def test_diloco_with_two_local_ranks(tmp_path: Path, peer_processes: PeerProcesses, mnist1d_built: None) -> None:
    names = ["a", "b"]
    strategy = {"kind": "allreduce", "local_steps": 4, "outer": "diloco", "outer_lr": 0.7, "outer_momentum": 0.9}
    config = _swarm(tmp_path, "diloco", names, run=RUN, strategy=strategy)
    peer_processes.start(config, "a", "--nproc-per-node", str(NPROC))
    peer_processes.start(config, "b")  # hybrid and plain peers mix freely
    _wait_ok(peer_processes, names)
    _assert_local_ranks_identical(peer_processes.outs["a"])
    for name in names:
        summary = assert_finished(peer_processes.outs[name], STEPS)
        losses = [r["loss"] for r in read_metrics(peer_processes.outs[name]) if "loss" in r]
        assert len(losses) == STEPS and all(map(torch.isfinite, torch.tensor(losses))), losses
        assert summary["test_loss"] is not None and math.isfinite(summary["test_loss"]), summary
    models = [load_state(peer_processes.outs[name] / "model.pt") for name in names]
    for key in models[0]:  # the last step is an outer step: every peer holds the same average
        assert torch.equal(models[0][key], models[1][key]), key


@pytest.mark.slow
@pytest.mark.timeout(PROCESS_TIMEOUT + 60)
def test_a_dying_local_rank_takes_its_peer_down_cleanly(
    tmp_path: Path, peer_processes: PeerProcesses, mnist1d_built: None
) -> None:
    names = ["a", "b"]
    run = {**RUN, "steps": 100_000}
    config = _swarm(tmp_path, "gossip", names, run=run, strategy={"kind": "gossip"})
    a = peer_processes.start(config, "a", "--nproc-per-node", str(NPROC))
    b = peer_processes.start(config, "b", "--nproc-per-node", str(NPROC))
    out_a, out_b = peer_processes.outs["a"], peer_processes.outs["b"]
    wait_for(lambda: len(read_metrics(out_a)) >= 5, PROCESS_TIMEOUT, "peer a to train 5 steps")
    follower_a, follower_b = _follower_pid(peer_processes.log("a")), _follower_pid(peer_processes.log("b"))

    os.kill(follower_a, signal.SIGKILL)
    killed = time.monotonic()
    try:  # the peer's leave is bounded by its shutdown and collective timeouts
        code = a.wait(timeout=120)
    except subprocess.TimeoutExpired:
        log_a = peer_processes.log("a")[-3000:]
        raise AssertionError(f"peer a still runs 120 s after its rank 1 died:\n{log_a}") from None
    log_a = peer_processes.log("a")
    assert code == 1, f"peer a exited {code} after its local rank 1 died:\n{log_a[-3000:]}"
    expected = rf"LocalRankError: a: local rank 1 \(pid {follower_a}\) was killed by SIGKILL"
    assert re.search(expected, log_a), log_a[-3000:]
    assert not _alive(follower_a)
    print(f"\npeer a exited {time.monotonic() - killed:.1f} s after its local rank 1 was killed")

    # The wire side closed: b saw a leave, and trains on alone (gossip's reaction to a leaving peer).
    try:
        # The leave reaches b on its link to a or in the membership gossip, whichever comes first.
        left = re.compile(r"a announced its leave|rewired \((membership|a left)\): -\['a'\]")
        wait_for(lambda: left.search(peer_processes.log("b")) is not None, 60, "b to see a leave")
        steps_then = len(read_metrics(out_b))
        wait_for(lambda: len(read_metrics(out_b)) >= steps_then + 5, 120, "b to train on without a")
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{peer_processes.log('b')[-3000:]}") from None
    assert b.poll() is None, peer_processes.log("b")[-3000:]

    # Rank 0 killed outright: its follower goes with it (no orphan).
    os.kill(b.pid, signal.SIGKILL)
    b.wait(timeout=10)
    wait_for(lambda: not _alive(follower_b), 10, "b's local rank 1 to exit with its rank 0")


# --------------------------------------------------------------------------- the DDP reference


def _run_ddp_reference(config: Path, out: Path, *, world: int) -> None:
    """Run :func:`_ddp_rank` in ``world`` processes (this file as a script); fail with their logs."""
    out.mkdir(parents=True)
    env = {**os.environ, **PEER_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0])}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["GLOO_SOCKET_IFNAME"] = "lo"
    procs = []
    for rank in range(world):
        log = (out / f"rank{rank}.log").open("wb")
        command = [sys.executable, __file__, str(config), str(out), str(rank), str(world)]
        procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=PROCESS_TIMEOUT)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join((out / f"rank{r}.log").read_text(errors="replace")[-1500:] for r in range(world))
    assert all(proc.returncode == 0 for proc, _ in procs), f"DDP reference failed:\n{logs}"


def _ddp_rank(config_path: Path, out: Path, rank: int, world: int) -> None:
    """DDP rank ``rank`` = local rank ``rank % NPROC`` of peer ``rank // NPROC``, on that micro-batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from p2pdl.config import load_config
    from p2pdl.train.build import build_model
    from p2pdl.train.data import BatchStream
    from p2pdl.train.optim import build_optimizer
    from p2pdl.train.shards import assigned_shards, data_seed
    from p2pdl.train.workload import load_workload

    config = load_config(config_path)
    run = config.run
    torch.set_num_threads(1)
    peer, local = divmod(rank, NPROC)
    (shard,) = assigned_shards(list(config.peer_names), config.peer_names[peer], config.shard_count)
    workload = load_workload(run.workload)
    model = build_model(workload, run.seed, torch.device("cpu"))
    if rank == 0:
        torch.save(model.state_dict(), out / "initial.pt")
    inputs, targets = workload.load_shard(shard, config.shard_count)
    stream = BatchStream(inputs, targets, run.batch_size, seed=data_seed(run, shard))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=PROCESS_TIMEOUT))
    ddp = DistributedDataParallel(model)
    optimizer = build_optimizer(config.optimizer_settings, model)
    for _ in range(run.steps):
        batch_inputs, batch_targets = next(stream)
        optimizer.zero_grad(set_to_none=True)
        micro_inputs = torch.tensor_split(batch_inputs, NPROC)[local]
        micro_targets = torch.tensor_split(batch_targets, NPROC)[local]
        workload.loss_fn(ddp(micro_inputs), micro_targets).backward()
        optimizer.step()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        torch.save(model.state_dict(), out / "model.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of the 4-rank DDP reference")
    parser.add_argument("config", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("rank", type=int)
    parser.add_argument("world", type=int)
    cli = parser.parse_args()
    _ddp_rank(cli.config, cli.out, cli.rank, cli.world)
