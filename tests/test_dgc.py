"""DGC's momentum correction, momentum factor masking and sparsity warm-up (p2pdl.compression.dgc),
and the [compression] keys that turn them on (refused wherever the optimizer would apply momentum twice)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pdl.compression.compressors import TopKCompressor
from p2pdl.compression.dgc import Accumulator, stage_ratio, warmup_stage, warmup_stages
from p2pdl.config import config_from_mapping
from p2pdl.errors import ConfigError

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- warm-up


def test_warmup_follows_the_papers_exponential_schedule() -> None:
    # 75%, 93.75%, 98.4375%, 99.6% sparsity, then the configured 99.9%.
    assert warmup_stages(0.001) == 4
    assert [stage_ratio(s, 0.001) for s in range(5)] == [0.25, 0.0625, 0.015625, 0.00390625, 0.001]
    # 400 warm-up steps in 4 equal stages of 100, then the final stage for good.
    stages = [warmup_stage(step, 0.001, 400) for step in range(0, 1000, 50)]
    assert stages == [0, 0, 1, 1, 2, 2, 3, 3] + [4] * 12
    assert warmup_stage(99, 0.001, 400) == 0 and warmup_stage(100, 0.001, 400) == 1


def test_warmup_never_keeps_fewer_entries_than_the_ratio_and_falls_monotonically() -> None:
    for ratio in (0.3, 0.25, 0.2, 0.01, 0.001, 1e-5):
        stages = warmup_stages(ratio)
        kept = [stage_ratio(s, ratio) for s in range(stages + 1)]
        assert kept[-1] == ratio
        assert all(k >= ratio for k in kept)
        assert all(a > b for a, b in itertools.pairwise(kept))
    assert warmup_stages(0.25) == 0  # nothing to warm up from: the first stage is the ratio
    assert warmup_stage(0, 0.25, 100) == 0


# --------------------------------------------------------------------------- accumulator


def run_topk_round(accumulator: Accumulator, gradient: torch.Tensor, compressor: TopKCompressor) -> torch.Tensor:
    """One DGC step through real top-k: returns what the peers decode."""
    v = accumulator.accumulate(gradient)
    parts = compressor.encode("g", v)
    decoded = compressor.decode("g", parts, tuple(v.shape), CPU)
    accumulator.sent(decoded, compressor.sent_indices(parts))
    return decoded


def test_momentum_factor_masking_clears_the_velocity_at_sent_coordinates_only() -> None:
    torch.manual_seed(0)
    accumulator = Accumulator(1000, momentum=0.9, feedback=True, device=CPU)
    compressor = TopKCompressor(0.01)
    run_topk_round(accumulator, torch.randn(1000), compressor)
    gradient = torch.randn(1000)
    velocity_before = accumulator.velocity.clone()
    v = accumulator.accumulate(gradient)
    expected_velocity = 0.9 * velocity_before + gradient
    parts = compressor.encode("g", v)
    sent = compressor.sent_indices(parts)
    accumulator.sent(compressor.decode("g", parts, (1000,), CPU), sent)
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[sent] = True
    assert int(mask.sum()) == 10
    assert torch.all(accumulator.velocity[mask] == 0)
    assert torch.equal(accumulator.velocity[~mask], expected_velocity[~mask])


def test_sent_plus_residual_is_exactly_what_was_accumulated() -> None:
    torch.manual_seed(1)
    accumulator = Accumulator(4096, momentum=0.9, feedback=True, device=CPU)
    compressor = TopKCompressor(0.005)
    for _ in range(20):
        v = accumulator.accumulate(torch.randn(4096))
        accumulated = v.clone()
        parts = compressor.encode("g", v)
        decoded = compressor.decode("g", parts, (4096,), CPU)
        accumulator.sent(decoded, compressor.sent_indices(parts))
        # Exact in float32: each decoded entry is zero or within a factor 2 of v's (Sterbenz).
        assert torch.equal(decoded + accumulator.accumulated, accumulated)
        # The sent coordinates keep only the float16 rounding of the wire.
        sent = compressor.sent_indices(parts)
        assert float(accumulator.accumulated[sent].abs().max()) <= float(accumulated[sent].abs().max()) * 2**-10


def test_momentum_correction_without_masking_is_sgd_with_momentum() -> None:
    # With every coordinate sent exactly (k = numel, exact wire) and no masking, sending v and
    # applying it with momentum 0 is step for step SGD with momentum m.
    torch.manual_seed(2)
    target = torch.randn(50)
    reference = torch.zeros(50, requires_grad=True)
    optimizer = torch.optim.SGD([reference], lr=0.1, momentum=0.9)
    mine = torch.zeros(50)
    accumulator = Accumulator(50, momentum=0.9, feedback=True, device=CPU)
    for _ in range(30):
        optimizer.zero_grad()
        (reference - target).pow(2).sum().backward()
        optimizer.step()
        v = accumulator.accumulate(2 * (mine - target))
        update = v.clone()
        accumulator.sent(update, None)
        mine -= 0.1 * update
        torch.testing.assert_close(mine, reference.detach(), rtol=1e-5, atol=1e-6)


def test_plain_error_feedback_and_no_feedback() -> None:
    feedback = Accumulator(4, momentum=0.0, feedback=True, device=CPU)
    feedback.accumulate(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    feedback.sent(torch.tensor([0.0, 0.0, 0.0, 4.0]), torch.tensor([3]))
    assert feedback.accumulated.tolist() == [1.0, 2.0, 3.0, 0.0]
    assert feedback.accumulate(torch.ones(4)).tolist() == [2.0, 3.0, 4.0, 1.0]
    forget = Accumulator(4, momentum=0.0, feedback=False, device=CPU)
    forget.accumulate(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    forget.sent(torch.tensor([0.0, 0.0, 0.0, 4.0]), torch.tensor([3]))
    assert forget.accumulate(torch.ones(4)).tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="needs error feedback"):
        Accumulator(4, momentum=0.9, feedback=False, device=CPU)


# --------------------------------------------------------------------------- config


def config(compression: dict[str, Any], *, strategy: str = "allreduce", run: dict[str, Any] | None = None) -> Any:
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py"), "optimizer": "sgd", "momentum": 0.0, **(run or {})},
            "strategy": {"kind": strategy},
            "compression": compression,
            "peers": [{"name": f"p{i}", "address": f"127.0.0.1:{9000 + i}"} for i in range(3)],
        }
    )


def test_dgc_keys_are_accepted_with_sgd_without_momentum() -> None:
    loaded = config({"kind": "topk", "ratio": 0.001, "momentum_correction": 0.9, "warmup_steps": 200})
    assert loaded.compression.momentum_correction == 0.9
    assert loaded.compression.warmup_steps == 200


@pytest.mark.parametrize(
    ("compression", "strategy", "run", "named"),
    [
        ({"kind": "topk", "momentum_correction": 1.0}, "allreduce", None, "compression.momentum_correction must be"),
        ({"kind": "topk", "warmup_steps": -1}, "allreduce", None, "compression.warmup_steps must be >= 0"),
        ({"kind": "fp16", "momentum_correction": 0.9}, "allreduce", None, "apply to kind = 'topk', not 'fp16'"),
        ({"kind": "int8", "warmup_steps": 10}, "allreduce", None, "apply to kind = 'topk', not 'int8'"),
        (
            {"kind": "topk", "momentum_correction": 0.9, "error_feedback": False},
            "allreduce",
            None,
            "needs compression.error_feedback = true",
        ),
        ({"kind": "topk", "momentum_correction": 0.9}, "gossip", None, "apply to strategy.kind = 'allreduce'"),
        ({"kind": "topk", "momentum_correction": 0.9}, "allreduce", {"momentum": 0.9}, "momentum = 0.9"),
        ({"kind": "topk", "momentum_correction": 0.9}, "allreduce", {"optimizer": "adamw"}, "kind = 'adamw'"),
    ],
)
def test_dgc_keys_refuse_bad_values_and_a_second_momentum(
    compression: dict[str, Any], strategy: str, run: dict[str, Any] | None, named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")) as refused:
        config(compression, strategy=strategy, run=run)
    assert "compression." in str(refused.value)
