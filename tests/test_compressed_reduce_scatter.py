"""The compressed reduce-scatter of allreduce (p2pdl.strategies.allreduce_compressed) on real sockets.

Every peer decodes the same bytes, so peers that start from the same model must hold bit-identical
parameters after every step, with every compressor; and each peer must send no more than the fp32
all-reduce would (2 (n - 1) / n x 4 bytes per element), counted by its transport. The all-gather
it replaced sent (n - 1) whole compressed gradients: with fp16 on 4 peers exactly the fp32 bytes,
so the fp16 bound below (about half) fails for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_identical_models, free_ports, run_cluster, write_config

from p2pdl import Peer
from p2pdl.config import config_from_mapping
from p2pdl.errors import FrameSchemaError
from p2pdl.strategies.allreduce import AllReduceStrategy

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
STEPS = 6

# name: compression keys, the most wire bytes per round as a fraction of the fp32 all-reduce's
CASES: dict[str, tuple[dict[str, Any], float]] = {
    "fp16": ({"kind": "fp16"}, 0.55),
    "bf16": ({"kind": "bf16"}, 0.55),
    "int8": ({"kind": "int8", "chunk": 256}, 0.3),
    "topk": ({"kind": "topk", "ratio": 0.02}, 0.06),
    "topk-dgc": ({"kind": "topk", "ratio": 0.01, "momentum_correction": 0.9, "warmup_steps": 4}, 0.25),
    "topk-no-ef": ({"kind": "topk", "ratio": 0.05, "error_feedback": False}, 0.12),
}


def swarm_config(n: int, compression: dict[str, Any]) -> Any:
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py"), "optimizer": "sgd", "momentum": 0.0},
            "strategy": {"kind": "allreduce", "round_timeout": 10.0},
            "topology": {"kind": "full"},
            "transport": {"startup_timeout": 15.0},
            "membership": {"suspect_after": 10.0, "dead_after": 20.0},
            "compression": {"min_numel": 0, **compression},
            "peers": [{"name": f"p{i}", "address": "127.0.0.1:0"} for i in range(n)],
        }
    )


def model() -> torch.nn.Module:
    torch.manual_seed(0)  # every peer starts from the same model
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8))


@contextlib.asynccontextmanager
async def swarm(config: Any, n: int) -> AsyncIterator[list[Peer]]:
    models = [model() for _ in range(n)]
    first = Peer(config, "p0", models[0], torch.optim.SGD(models[0].parameters(), lr=0.05))
    port = await first.transport.start()
    peers = [first] + [
        Peer(
            config,
            f"p{i}",
            models[i],
            torch.optim.SGD(models[i].parameters(), lr=0.05),
            bootstrap=(f"127.0.0.1:{port}",),
        )
        for i in range(1, n)
    ]
    try:
        await asyncio.gather(*(p.start() for p in peers))
        yield peers
    finally:
        await asyncio.gather(*(p.close() for p in peers))


def closure_for(peer: Peer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(peer.model(x), y)
        loss.backward()
        return loss

    return closure


def parameters(peer: Peer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in peer.model.parameters()]


async def train_identically(peers: list[Peer], steps: int, label: str) -> None:
    """``steps`` steps on different data per peer; after each, every peer holds p0's parameters,
    and at the end the swarm has moved."""
    torch.manual_seed(7)
    batches = [(torch.randn(32, 64), torch.randint(0, 8, (32,))) for _ in peers]  # different data per peer
    start = parameters(peers[0])
    for _ in range(steps):
        await asyncio.gather(*(p.step(closure_for(p, x, y)) for p, (x, y) in zip(peers, batches, strict=True)))
        reference = parameters(peers[0])
        for peer in peers[1:]:
            for mine, theirs in zip(parameters(peer), reference, strict=True):
                assert torch.equal(mine, theirs), f"{label}: {peer.name} holds other parameters than p0"
    moved = max(float((a - b).abs().max()) for a, b in zip(parameters(peers[0]), start, strict=True))
    assert moved > 1e-4, f"{label}: the swarm did not move"


def fp32_allreduce_bytes(peer: Peer, n: int) -> int:
    """The payload the fp32 reduce-scatter + all-gather sends per peer per round."""
    total = sum(p.numel() for p in peer.model.parameters())
    return 2 * (n - 1) * math.ceil(total / n) * 4


# Three peers in the fast tier (a chunk owner receives two contributions and pads the last
# chunk); four take the same code paths, in the slow tier
@pytest.mark.parametrize("n", [3, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", list(CASES))
async def test_every_peer_decodes_the_same_values_and_sends_fewer_bytes(case: str, n: int) -> None:
    compression, most = CASES[case]
    async with swarm(swarm_config(n, compression), n) as peers:
        sent_before = [p.transport.stats.bytes_sent for p in peers]
        await train_identically(peers, STEPS, case)
        fp32 = fp32_allreduce_bytes(peers[0], n)
        for peer, before in zip(peers, sent_before, strict=True):
            per_round = (peer.transport.stats.bytes_sent - before) / STEPS
            # Everything the transport sent, membership gossip included, against the fp32 payload alone.
            assert per_round <= most * fp32, f"{case}: {peer.name} sent {per_round:.0f} B/round, fp32 {fp32} B"
            status = peer.status()["strategy"]
            assert status["payload_compression_ratio"] >= 1 / most


async def test_dgc_warm_up_moves_through_its_stages_on_the_wire() -> None:
    compression = {"kind": "topk", "ratio": 0.01, "momentum_correction": 0.9, "warmup_steps": 3}
    async with swarm(swarm_config(3, compression), 3) as peers:
        strategy = peers[0].strategy
        assert isinstance(strategy, AllReduceStrategy)
        # ratio 0.01: stages keep 25%, 6.25%, 1.5625%, then 1%; 3 warm-up steps, one per stage.
        sizes = [strategy.expected_tensors(f"crs3_{stage}", "p1")["values"].shape[0] for stage in range(4)]
        chunk = math.ceil(sum(p.numel() for p in peers[0].model.parameters()) / 3)
        assert sizes == [math.ceil(r * chunk) for r in (0.25, 0.0625, 0.015625, 0.01)]
        torch.manual_seed(3)
        batches = [(torch.randn(16, 64), torch.randint(0, 8, (16,))) for _ in peers]
        stages = []
        for _ in range(5):
            stages.append(strategy.status()["warmup_stage"])
            await asyncio.gather(*(p.step(closure_for(p, x, y)) for p, (x, y) in zip(peers, batches, strict=True)))
        assert stages[1:] == [0, 1, 2, 3]  # the status reads the last round's stage


async def test_malformed_compressed_kinds_are_refused() -> None:
    async with swarm(swarm_config(2, {"kind": "topk", "ratio": 0.01, "warmup_steps": 10}), 2) as peers:
        strategy = peers[0].strategy
        assert isinstance(strategy, AllReduceStrategy)
        assert set(strategy.expected_tensors("crs2_0", "p1")) == {"indices", "values", "scale"}
        assert set(strategy.expected_tensors("cag4096_3", "p1")) == {"indices", "values", "scale"}
        for kind in ("crs1_0", "crs4097_0", "crs02_0", "crs2_4", "crs2_", "crs2", "cag2_x", "crs2_01", "cgrad"):
            with pytest.raises(FrameSchemaError):
                strategy.expected_tensors(kind, "p1")
        with pytest.raises(FrameSchemaError):
            strategy.expected_tensors("crs2_0", "stranger")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("mnist1d_built")
def test_peer_processes_with_dgc_end_with_identical_models(tmp_path: Path) -> None:
    names = [f"p{i}" for i in range(4)]
    config = write_config(
        tmp_path / "dgc.toml",
        names=names,
        ports=free_ports(4),
        run={"steps": 40, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "eval_every": 0},
        strategy={"kind": "allreduce", "round_timeout": 30.0},
        topology={"kind": "full"},
        transport={"startup_timeout": 120.0},
        membership={"suspect_after": 30.0, "dead_after": 60.0},
        compression={"kind": "topk", "ratio": 0.01, "min_numel": 0, "momentum_correction": 0.9, "warmup_steps": 20},
    )
    summary = run_cluster(config, tmp_path / "out", timeout=600)
    assert_identical_models(tmp_path / "out" / name for name in names)
    for peer in summary["peers"]:
        compression = peer["compression"]
        assert compression["wire_bytes_sent"] <= compression["fp32_equivalent_bytes"], compression
