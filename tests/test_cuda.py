"""CUDA tier: the same in-process swarm with the models on the GPU (skipped without one).

Run on a GPU machine with ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from p2pdl import Peer
from p2pdl.config import config_from_mapping

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]
PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"


def swarm_config(kind: str) -> object:
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py"), "device": "cuda"},
            "strategy": {"kind": kind, "round_timeout": 10.0},
            "topology": {"kind": "full"},
            "transport": {"startup_timeout": 20.0},
            "peers": [{"name": "a", "address": "127.0.0.1:0"}, {"name": "b", "address": "127.0.0.1:0"}],
        }
    )


@pytest.mark.parametrize("kind", ["gossip", "allreduce"])
async def test_two_gpu_peers_average_on_the_device(kind: str) -> None:
    device = torch.device("cuda")
    config = swarm_config(kind)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(torch.nn.Linear(64, 32).to(device))
    before = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]).clone() for m in models]
    grads = [torch.randn_like(b) for b in before]
    b = Peer(config, "b", models[1], torch.optim.SGD(models[1].parameters(), lr=0.5), device=device)  # type: ignore[arg-type]
    port = await b.transport.start()
    a = Peer(  # type: ignore[arg-type]
        config,
        "a",
        models[0],
        torch.optim.SGD(models[0].parameters(), lr=0.5),
        device=device,
        bootstrap=(f"127.0.0.1:{port}",),
    )

    def closure_for(model: torch.nn.Module, grad: torch.Tensor):
        def closure() -> torch.Tensor:
            flat = torch.cat([p.reshape(-1) for p in model.parameters()])
            loss = (flat * grad).sum()
            loss.backward()
            return loss

        return closure

    try:
        await asyncio.gather(a.start(), b.start())
        await asyncio.gather(a.step(closure_for(models[0], grads[0])), b.step(closure_for(models[1], grads[1])))
    finally:
        await asyncio.gather(a.close(), b.close())
    after = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models]
    assert all(t.device.type == "cuda" for t in after)
    if kind == "gossip":
        expected = ((before[0] - 0.5 * grads[0]) + (before[1] - 0.5 * grads[1])) / 2
        for got in after:
            torch.testing.assert_close(got, expected)
    else:
        mean_grad = (grads[0] + grads[1]) / 2
        for got, start in zip(after, before, strict=True):
            torch.testing.assert_close(got, start - 0.5 * mean_grad)
