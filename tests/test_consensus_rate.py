"""Gossip consensus decays at the rate the spectral gap predicts (STYLE.md rule 14).

Real Peers on 127.0.0.1 share one event loop and only gossip: the closure returns a zero loss
without ``backward``, so no parameter gets a gradient, SGD skips them all and only mixing moves
them. Then the disagreement ``D_t = sqrt(sum_i ||x_i - x̄||^2)`` must shrink by λ2 (the second
largest eigenvalue modulus of the MH matrix) per round once the faster modes have died out, and
the mean x̄ must not move, since W is symmetric and doubly stochastic.

The parameters are float64 and every round is complete, so the arithmetic is deterministic: the
fitted rate matches λ2 to ~1e-4 and the 1% tolerance is slack, not noise allowance. It is
tighter than 5% on purpose: MH weights of 1/max(d_i, d_j) instead of 1/(1 + max(d_i, d_j)) on a
ring of 8 move λ2 by 5.6%.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import free_ports

from p2pdl import Peer
from p2pdl.config import config_from_mapping
from p2pdl.core.topology import build_graph, mixing_matrix, second_largest_eigenvalue_modulus

WORKLOAD = Path(__file__).resolve().parent.parent / "peers" / "mnist1d_cnn.py"
ROUNDS = 30
FIT_FROM = 5  # by round 5 the next-fastest modes are below 1e-4 of the slowest on both graphs
RATE_TOLERANCE = 0.01  # relative


def zero_closure() -> torch.Tensor:
    return torch.zeros(())


def stacked_parameters(peers: list[Peer]) -> torch.Tensor:
    """(peers, params) float64."""
    return torch.stack([torch.cat([p.detach().reshape(-1) for p in peer.model.parameters()]) for peer in peers])


@pytest.mark.parametrize(
    ("topology", "count"),
    # the 16-peer torus runs 16 in-process peers for many rounds: slow tier
    [({"kind": "ring"}, 8), pytest.param({"kind": "torus", "rows": 4, "cols": 4}, 16, marks=pytest.mark.slow)],
    ids=["ring-8", "torus-4x4"],
)
async def test_gossip_contracts_at_lambda2_and_keeps_the_mean(topology: dict[str, Any], count: int) -> None:
    config = config_from_mapping(
        {
            "run": {"workload": str(WORKLOAD), "lr": 0.01, "momentum": 0.0},
            "strategy": {"kind": "gossip", "local_steps": 1, "round_timeout": 5.0},
            "topology": topology,
            "transport": {"startup_timeout": 10.0, "handshake_timeout": 5.0},
            "peers": [{"name": f"p{i}", "address": f"127.0.0.1:{port}"} for i, port in enumerate(free_ports(count))],
        }
    )
    graph = build_graph(config.topology.kind, config.peer_names, rows=config.topology.rows, cols=config.topology.cols)
    lambda2 = second_largest_eigenvalue_modulus(mixing_matrix(graph))
    peers = []
    for index, name in enumerate(config.peer_names):
        torch.manual_seed(index)
        model = torch.nn.Linear(16, 16, dtype=torch.float64)
        peers.append(Peer(config, name, model, torch.optim.SGD(model.parameters(), lr=0.01)))

    async with contextlib.AsyncExitStack() as stack:
        for peer in peers:
            stack.push_async_callback(peer.close)
        # Together: each start waits until its neighbours are up.
        await asyncio.gather(*(peer.start() for peer in peers))
        # Every peer sees the whole configured graph, so its mixing row is the row of W.
        assert all(dict(peer.graph.neighbors) == dict(graph.neighbors) for peer in peers)

        start = stacked_parameters(peers)
        mean = start.mean(dim=0)
        disagreement = [float((start - mean).norm())]
        for _ in range(ROUNDS):
            await asyncio.gather(*(peer.step(zero_closure) for peer in peers))
            x = stacked_parameters(peers)
            disagreement.append(float((x - x.mean(dim=0)).norm()))
            torch.testing.assert_close(x.mean(dim=0), mean, rtol=0.0, atol=1e-13)

        assert [peer.ledger.partial for peer in peers] == [0] * count
        assert [peer.ledger.complete for peer in peers] == [ROUNDS] * count

    rounds = np.arange(FIT_FROM, ROUNDS + 1)
    slope = np.polyfit(rounds, np.log(disagreement[FIT_FROM:]), 1)[0]
    measured = math.exp(slope)
    assert measured == pytest.approx(lambda2, rel=RATE_TOLERANCE), (measured, lambda2, disagreement)
