"""Parity of p2pdl's exact all-reduce with ``torch.distributed`` DDP (STYLE.md rule 14).

Real ``p2pdl peer`` processes train a few steps with ``strategy.kind = "allreduce"``; then
``benchmarks/ddp_reference.py`` trains the same config (same init, shards, batch order,
optimizer) under DDP on gloo. Every p2pdl peer must end bit-identical to every other (chunks are
summed in rank order), and equal to DDP up to float32 rounding: DDP pre-divides each gradient
by the world size and sums in its own order, p2pdl sums then divides, so the two differ in the
last bits of each step's gradient. A p2pdl run with a different learning rate must *not* match,
which proves the comparison can fail. Finally, an all-reduce peer whose partner never starts
must exit 1 with a clear message instead of training alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PEER_ENV, PEERS_DIR, REPO, PeerProcesses, assert_finished, free_ports, write_config

from p2pdl.train import datasets
from p2pdl.train.loop import build_model
from p2pdl.train.workload import load_workload

pytestmark = pytest.mark.slow

DDP_REFERENCE = REPO / "benchmarks" / "ddp_reference.py"
STEPS = 25
RUN = {"steps": STEPS, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "eval_every": 0}
# With 2 peers p2pdl's (g0 + g1) / 2 and DDP's g0 / 2 + g1 / 2 are the same float32 number
# (halving is exact and a two-term sum does not depend on order), so they must be bit-identical.
# With 4 peers, dividing by 4 is still exact but the sums run in different orders (rank order
# here, gloo's ring order there); after 25 SGD+momentum steps the largest difference seen is
# 3e-8, and these bounds leave 30x headroom.
RTOL = 1e-5
ATOL = 1e-6
# Generous because the tier runs beside other process-heavy tests on a 2-core machine; on an idle
# one each run takes under 10 s, and a stall anywhere fails loudly rather than hanging.
PROCESS_TIMEOUT = 90.0  # seconds for any swarm or DDP run of this file to finish
ROUND_TIMEOUT = 30.0  # seconds; a slow start under load must not look like a missing peer
# Membership must outlast a round: with the default dead_after (10 s) a first round slowed past
# 10 s by a busy machine saw its partners declared dead and a peer finished the run alone.
MEMBERSHIP = {"suspect_after": ROUND_TIMEOUT, "dead_after": 2 * ROUND_TIMEOUT}


@pytest.fixture(scope="module", autouse=True)
def _mnist1d_built() -> None:
    """Build the dataset once here, not in every peer and rank process at once."""
    datasets.mnist1d()


def _swarm(tmp_path: Path, label: str, names: list[str], *, lr: float = 0.05) -> Path:
    return write_config(
        tmp_path / f"{label}.toml",
        names=names,
        ports=free_ports(len(names)),
        run={**RUN, "lr": lr},
        strategy={"kind": "allreduce", "round_timeout": ROUND_TIMEOUT},
        topology={"kind": "full"},
        membership=MEMBERSHIP,
    )


def _start_swarm(procs: PeerProcesses, config: Path, names: list[str], out: Path) -> list[Path]:
    for name in names:
        procs.start(config, name, out=out / name)
    return [out / name for name in names]


def _start_ddp(config: Path, out: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, str(DDP_REFERENCE), str(config),
        "--steps", str(STEPS), "--out", str(out), "--eval-every", "0",
        "--master-port", str(free_ports(1)[0]), "--timeout", str(PROCESS_TIMEOUT),
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **PEER_ENV}, cwd=REPO
    )


def _wait_ddp(proc: subprocess.Popen[bytes], out: Path) -> None:
    try:
        output, _ = proc.communicate(timeout=PROCESS_TIMEOUT + 15)  # it stops itself at PROCESS_TIMEOUT
    except subprocess.TimeoutExpired:
        proc.terminate()  # the launcher reaps its ranks on SIGTERM
        output, _ = proc.communicate(timeout=30)
    logs = "\n".join(
        f"{p.parent.name} (summary written: {(p.parent / 'summary.json').exists()}):\n"
        + p.read_text(errors="replace")[-2000:]
        for p in sorted(out.glob("rank*/worker.log"))
    )
    assert proc.returncode == 0, f"ddp_reference failed ({proc.returncode}):\n{output.decode()}\n{logs}"


def _wait_swarm(procs: PeerProcesses, dirs: list[Path]) -> None:
    codes = procs.wait_all(timeout=PROCESS_TIMEOUT)
    failed = {name: code for name, code in codes.items() if code != 0}
    assert not failed, f"peers failed {failed}:\n" + "\n".join(
        (d / "peer.log").read_text(errors="replace")[-2000:] for d in dirs
    )
    for out in dirs:  # each peer ran every step itself: none finished the run alone
        summary = assert_finished(out, STEPS)
        assert summary["rounds"]["partial"] == 0, (out.name, summary["rounds"])


def _load(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.timeout(2 * PROCESS_TIMEOUT + 30)  # a swarm, then a DDP run
@pytest.mark.parametrize("peers", [2, 4])
def test_allreduce_matches_ddp(peers: int, tmp_path: Path, peer_processes: PeerProcesses) -> None:
    names = [f"p{i}" for i in range(peers)]
    config = _swarm(tmp_path, "swarm", names)
    swarm = _start_swarm(peer_processes, config, names, tmp_path / "p2pdl")
    # The negative control rides along with the 2-peer case, so it costs no extra DDP run: the
    # same swarm with lr 0.06 must end far from DDP at lr 0.05. Different names keep its
    # processes tracked (and reaped) separately.
    control_names = ["c0", "c1"] if peers == 2 else []
    control = _swarm(tmp_path, "control", control_names, lr=0.06) if control_names else None
    control_dirs = _start_swarm(peer_processes, control, control_names, tmp_path / "control") if control else []
    _wait_swarm(peer_processes, swarm + control_dirs)
    ddp_out = tmp_path / "ddp"  # after the swarms, so the two never compete for the cores
    _wait_ddp(_start_ddp(config, ddp_out), ddp_out)

    p2pdl_models = [_load(d / "model.pt") for d in swarm]
    ddp_models = [_load(ddp_out / f"rank{r}" / "model.pt") for r in range(peers)]
    reference = p2pdl_models[0]
    assert list(reference) == list(ddp_models[0]), "p2pdl and DDP state_dict keys differ"

    for name, model in zip(names[1:], p2pdl_models[1:], strict=True):
        for key in reference:
            assert torch.equal(model[key], reference[key]), f"{name}.{key} differs from {names[0]}.{key}"
    for model in ddp_models[1:]:  # DDP's own replicas agree too
        for key in reference:
            torch.testing.assert_close(model[key], ddp_models[0][key], rtol=0, atol=0)

    initial = build_model(load_workload(PEERS_DIR / "mnist1d_cnn.py"), seed=0, device=torch.device("cpu"))
    for key, value in initial.state_dict().items():
        moved = float((reference[key] - value).abs().max())
        assert moved > 1e-3, f"{key} barely moved from its initial value (max change {moved:.2e})"

    diff = _max_abs_diff(reference, ddp_models[0])
    print(f"\n{peers} peers, {STEPS} steps: max |p2pdl - DDP| = {diff:.3e}")
    rtol, atol = (0.0, 0.0) if peers == 2 else (RTOL, ATOL)
    for key in reference:
        torch.testing.assert_close(
            reference[key], ddp_models[0][key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )

    if control is not None:
        controlled = _load(control_dirs[0] / "model.pt")
        control_diff = _max_abs_diff(controlled, ddp_models[0])
        print(f"negative control (lr 0.06 vs 0.05): max |p2pdl - DDP| = {control_diff:.3e}")
        with pytest.raises(AssertionError):
            for key in reference:
                torch.testing.assert_close(controlled[key], ddp_models[0][key], rtol=RTOL, atol=ATOL)
        assert control_diff > 100 * ATOL


def test_allreduce_fails_loudly_when_a_peer_never_starts(tmp_path: Path, peer_processes: PeerProcesses) -> None:
    config = write_config(
        tmp_path / "lonely.toml",
        names=["p0", "p1"],
        ports=free_ports(2),
        run={**RUN, "steps": 5},
        strategy={"kind": "allreduce", "round_timeout": 2.0},
        topology={"kind": "full"},
        transport={"startup_timeout": 3.0, "handshake_timeout": 1.0, "connect_timeout": 1.0},
    )
    peer_processes.start(config, "p0")  # p1 is never started
    code = peer_processes.wait_all(timeout=PROCESS_TIMEOUT)["p0"]
    log = peer_processes.log("p0")
    assert code == 1, f"expected exit 1, got {code}:\n{log}"
    assert "no link to p1" in log, log
    assert "exact all-reduce needs every peer" in log, log
    assert not (tmp_path / "p0" / "model.pt").exists(), "a lone all-reduce peer saved a model"
    metrics = tmp_path / "p0" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == "", "a lone all-reduce peer trained"
