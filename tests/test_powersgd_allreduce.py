"""PowerSGD's two all-reduces (p2pdl.strategies.allreduce_powersgd) on real sockets.

The peers average P = M Q and then Q = M^T P̄ with fp32 reduce-scatters, so every peer applies the
same P̄ Q̄^T: peers that start from the same model must hold bit-identical parameters after every
step. The applied update must be the paper's (the projection of the mean gradient onto the
orthonormalised mean P), and each peer must send exactly the factors' reduce-scatters and
all-gathers: 2 (n - 1) chunks of each vector, far less than the fp32 all-reduce.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import torch
from test_compressed_reduce_scatter import (
    closure_for,
    fp32_allreduce_bytes,
    parameters,
    swarm,
    swarm_config,
    train_identically,
)

from p2pdl.errors import AllReduceIncompleteError, FrameSchemaError
from p2pdl.strategies.allreduce import AllReduceStrategy
from p2pdl.strategies.allreduce_powersgd import orthonormalize

RANK = 2
STEPS = 5
# The test model (Linear(64, 96), Tanh, Linear(96, 8)) at rank 2: both weights are compressed
# (2 (96 + 64) < 96 x 64 and 2 (8 + 96) < 8 x 96), both biases are averaged uncompressed.
P_TOTAL = (96 + 8) + 96 * RANK + 8 * RANK  # the biases, then P of each weight
Q_TOTAL = 64 * RANK + 96 * RANK


def powersgd(**extra: Any) -> dict[str, Any]:
    return {"kind": "powersgd", "rank": RANK, **extra}


def factor_bytes(n: int) -> int:
    """The payload one peer sends per round: both phases' reduce-scatter and all-gather."""
    return sum(2 * (n - 1) * math.ceil(total / n) * 4 for total in (P_TOTAL, Q_TOTAL))


@pytest.mark.parametrize("n", [3, pytest.param(4, marks=pytest.mark.slow)])
async def test_every_peer_applies_the_same_factors_and_sends_only_them(n: int) -> None:
    async with swarm(swarm_config(n, powersgd()), n) as peers:
        strategy = peers[0].strategy
        assert isinstance(strategy, AllReduceStrategy)
        assert strategy.expected_tensors(f"prs{n}", "p1")["values"].shape == (math.ceil(P_TOTAL / n),)
        assert strategy.expected_tensors(f"qag{n}", "p1")["values"].shape == (math.ceil(Q_TOTAL / n),)
        await train_identically(peers, STEPS, "powersgd")
        for peer in peers:
            status = peer.status()["strategy"]
            # Exact counters: the factors' payload, against the fp32 reduce-scatter + all-gather.
            expected = fp32_allreduce_bytes(peer, n) / factor_bytes(n)
            assert status["payload_compression_ratio"] == pytest.approx(expected, rel=1e-12)
            assert expected > 10


async def test_every_update_is_the_projection_of_the_mean_with_error_feedback_and_warm_start() -> None:
    """Three steps against a reference written from the paper: M_i = g_i + e_i, P̄ = mean(M_i Q),
    orthonormalised, Q̄ = mean(M_i^T P̄), update P̄ Q̄^T, e_i = M_i - P̄ Q̄^T, next Q = Q̄. From the
    second step on, a missing or wrong residual or warm start changes the update."""
    n, lr = 3, 0.05
    async with swarm(swarm_config(n, powersgd()), n) as peers:
        torch.manual_seed(11)
        batches = [(torch.randn(32, 64), torch.randint(0, 8, (32,))) for _ in peers]
        warm = [q.clone() for q in peers[0].strategy._powersgd._warm]  # type: ignore[attr-defined]
        residuals = [[torch.zeros_like(q) for q in peers[0].model.parameters()] for _ in peers]
        for _ in range(3):
            start = parameters(peers[0])  # every peer holds these (checked below)
            grads = []  # each peer's own gradient at the shared point, computed apart from the swarm
            for (x, y), residual in zip(batches, residuals, strict=True):
                params = [q.clone().requires_grad_(True) for q in start]
                w1, b1, w2, b2 = params
                loss = torch.nn.functional.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)
                grads.append([g + e for g, e in zip(torch.autograd.grad(loss, params), residual, strict=True)])
            await asyncio.gather(*(p.step(closure_for(p, x, y)) for p, (x, y) in zip(peers, batches, strict=True)))
            expected, matrix = [], 0
            for index, before in enumerate(start):
                accumulated = [g[index] for g in grads]
                if before.dim() == 1:  # a bias: averaged exactly, nothing carried
                    update = sum(accumulated) / n
                else:
                    p_mean = sum(m @ warm[matrix] for m in accumulated) / n
                    orthonormalize(p_mean)
                    q_mean = sum(m.T @ p_mean for m in accumulated) / n
                    update = p_mean @ q_mean.T
                    for residual, m in zip(residuals, accumulated, strict=True):
                        residual[index] = m - update
                    warm[matrix] = q_mean
                    matrix += 1
                expected.append(before - lr * update)
            for peer in peers:
                for got, want in zip(parameters(peer), expected, strict=True):
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


async def test_malformed_factor_kinds_are_refused() -> None:
    async with swarm(swarm_config(2, powersgd()), 2) as peers:
        strategy = peers[0].strategy
        assert isinstance(strategy, AllReduceStrategy)
        assert set(strategy.expected_tensors("pag4096", "p1")) == {"values"}
        for kind in ("prs1", "prs4097", "prs02", "prs", "qag2_0", "qrsx", "cgrad", "crs2_0"):
            with pytest.raises(FrameSchemaError):
                strategy.expected_tensors(kind, "p1")
        with pytest.raises(FrameSchemaError):
            strategy.expected_tensors("prs2", "stranger")


def test_orthonormalize_gives_orthonormal_columns_and_zeroes_a_dependent_one() -> None:
    torch.manual_seed(0)
    matrix = torch.randn(50, 3)
    matrix[:, 2] = 2 * matrix[:, 0] - matrix[:, 1]  # in the span of the first two
    orthonormalize(matrix)
    gram = matrix[:, :2].T @ matrix[:, :2]
    torch.testing.assert_close(gram, torch.eye(2), rtol=0, atol=1e-5)
    assert float(matrix[:, 2].abs().max()) < 1e-5


@pytest.mark.parametrize("phase", ["_p_vector", "_q_vector"])
async def test_factors_whose_sum_overflows_are_refused_before_anything_changes(phase: str) -> None:
    # Every contribution is finite (the frame decoder refuses NaN and Inf), but two members' huge
    # P (or Q) values overflow float32 when summed: the owners refuse the round, naming them, and,
    # after a good round has left residuals and warm starts to lose, no peer's parameters,
    # residuals or warm starts move.
    n = 3
    async with swarm(swarm_config(n, powersgd()), n) as peers:
        await train_identically(peers, 1, "before the hostile round")
        for hostile in peers[1:]:
            rounds = hostile.strategy._powersgd  # type: ignore[attr-defined]
            honest = getattr(rounds, phase)

            def huge(*args: Any, honest: Any = honest) -> Any:
                result = honest(*args)
                if isinstance(result, tuple):  # _p_vector: (accumulated, vector)
                    return result[0], torch.full_like(result[1], 2e38)
                return torch.full_like(result, 2e38)

            setattr(rounds, phase, huge)
        torch.manual_seed(5)
        batches = [(torch.randn(16, 64), torch.randint(0, 8, (16,))) for _ in peers]
        before = [parameters(p) for p in peers]
        kept = [
            ([q.clone() for q in r._warm], [e.clone() for e in r._residual])
            for r in (p.strategy._powersgd for p in peers)  # type: ignore[attr-defined]
        ]
        assert any(bool(e.any()) for e in kept[0][1]), "the good round left no residual to lose"
        results = await asyncio.gather(
            *(p.step(closure_for(p, x, y)) for p, (x, y) in zip(peers, batches, strict=True)),
            return_exceptions=True,
        )
        assert all(isinstance(r, AllReduceIncompleteError) for r in results), results
        assert isinstance(results[0], AllReduceIncompleteError)
        assert set(results[0].missing) == {"p1", "p2"}  # p0 owns chunk 0 and names the two
        for peer, params, (warm, residual) in zip(peers, before, kept, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(parameters(peer), params, strict=True))
            rounds = peer.strategy._powersgd  # type: ignore[attr-defined]
            assert all(torch.equal(a, b) for a, b in zip(rounds._warm, warm, strict=True))
            assert all(torch.equal(a, b) for a, b in zip(rounds._residual, residual, strict=True))


def test_orthonormalize_keeps_the_columns_of_a_tiny_matrix() -> None:
    # The threshold is relative: columns of a matrix whose entries are ~1e-6 are not "zero".
    torch.manual_seed(1)
    matrix = torch.randn(50, 3) * 1e-6
    orthonormalize(matrix)
    torch.testing.assert_close(matrix.T @ matrix, torch.eye(3), rtol=0, atol=1e-5)
