"""DiLoCo outer optimizer: hand-computed Nesterov updates, the averaging special case, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from p2pdl.core.outer import OuterOptimizer, sync_due

SHAPES = [(2, 3), (4,), (), (1, 2, 2)]


def make_parameters(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in SHAPES]


def averages(seed: int, like: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [p.detach() + 0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in like]


def test_three_syncs_match_hand_computed_nesterov() -> None:
    lr, momentum = 0.7, 0.9
    parameters = make_parameters()
    outer = OuterOptimizer(parameters, lr=lr, momentum=momentum, nesterov=True)
    # Reference state, by the formulas of torch's Nesterov SGD:
    #   buf <- momentum * buf + g   (buf starts at g, i.e. at 0 before the first step)
    #   update = g + momentum * buf;  p <- p - lr * update
    anchor = [p.detach().clone() for p in parameters]
    buffer = [torch.zeros_like(a) for a in anchor]
    for sync in range(3):
        averaged = averages(100 + sync, parameters)
        expected = []
        for k in range(len(SHAPES)):
            gradient = anchor[k] - averaged[k]
            buffer[k] = momentum * buffer[k] + gradient
            anchor[k] = anchor[k] - lr * (gradient + momentum * buffer[k])
            expected.append(anchor[k])
        outer.step(averaged)
        for got, want, saved in zip(parameters, expected, outer.anchor, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(saved, want, rtol=1e-14, atol=1e-14)
        # Between syncs the model drifts (inner steps); the anchor must not follow it.
        with torch.no_grad():
            for p in parameters:
                p.add_(0.01)
    assert outer.steps == 3


def test_plain_sgd_momentum_without_nesterov() -> None:
    lr, momentum = 0.5, 0.6
    parameters = make_parameters(1)
    outer = OuterOptimizer(parameters, lr=lr, momentum=momentum, nesterov=False)
    anchor = [p.detach().clone() for p in parameters]
    buffer = [torch.zeros_like(a) for a in anchor]
    for sync in range(2):
        averaged = averages(200 + sync, parameters)
        for k in range(len(SHAPES)):
            buffer[k] = momentum * buffer[k] + (anchor[k] - averaged[k])
            anchor[k] = anchor[k] - lr * buffer[k]
        outer.step(averaged)
        for got, want in zip(parameters, anchor, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-14, atol=1e-14)


def test_lr_one_no_momentum_is_plain_averaging() -> None:
    parameters = make_parameters(2)
    outer = OuterOptimizer(parameters, lr=1.0, momentum=0.0)
    for sync in range(3):
        averaged = averages(300 + sync, parameters)
        outer.step(averaged)
        for got, want in zip(parameters, averaged, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-15)


def test_averaged_in_place_is_the_default() -> None:
    """The sync may write x̄ into the model first; step() then reads it from there."""
    parameters = make_parameters(3)
    twin = make_parameters(3)
    outer, reference = OuterOptimizer(parameters), OuterOptimizer(twin)
    averaged = averages(400, parameters)
    with torch.no_grad():
        for p, a in zip(parameters, averaged, strict=True):
            p.copy_(a)
    outer.step()
    reference.step(averaged)
    for got, want in zip(parameters, twin, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_state_dict_round_trip_through_torch_save() -> None:
    parameters = make_parameters(4)
    outer = OuterOptimizer(parameters, lr=0.6, momentum=0.8)
    outer.step(averages(500, parameters))
    buffer = io.BytesIO()
    torch.save(outer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored_parameters = [torch.nn.Parameter(p.detach().clone()) for p in parameters]
    restored = OuterOptimizer(restored_parameters)  # default hyperparameters, overwritten by load
    restored.load_state_dict(state)
    assert (restored.lr, restored.momentum, restored.nesterov, restored.steps) == (0.6, 0.8, True, 1)
    for sync in range(2):
        averaged = averages(600 + sync, parameters)
        outer.step(averaged)
        restored.step(averaged)
    for got, want in zip(restored_parameters, parameters, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_state_dict_before_first_step_is_equivalent() -> None:
    parameters = make_parameters(5)
    outer = OuterOptimizer(parameters)
    restored_parameters = [torch.nn.Parameter(p.detach().clone()) for p in parameters]
    restored = OuterOptimizer(restored_parameters)
    restored.load_state_dict(outer.state_dict())  # zero momentum buffers == "no buffer yet"
    for sync in range(2):
        averaged = averages(700 + sync, parameters)
        outer.step(averaged)
        restored.step(averaged)
    for got, want in zip(restored_parameters, parameters, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_non_finite_average_is_refused_without_changes() -> None:
    parameters = make_parameters(6)
    outer = OuterOptimizer(parameters)
    before = [p.detach().clone() for p in parameters]
    averaged = averages(800, parameters)
    averaged[1][0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        outer.step(averaged)
    for got, want in zip(parameters, before, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
    assert outer.steps == 0


def test_bfloat16_parameters_get_float32_anchors() -> None:
    parameters = make_parameters(7, dtype=torch.bfloat16)
    outer = OuterOptimizer(parameters, lr=1.0, momentum=0.0)
    assert all(a.dtype == torch.float32 for a in outer.anchor)
    averaged = averages(900, parameters)
    outer.step(averaged)
    for got, want in zip(parameters, averaged, strict=True):
        torch.testing.assert_close(got.detach(), want)


def test_validation() -> None:
    with pytest.raises(ValueError, match="momentum"):
        OuterOptimizer(make_parameters(), momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        OuterOptimizer(make_parameters(), lr=0.0)
    outer = OuterOptimizer(make_parameters())
    with pytest.raises(ValueError, match="shape"):
        outer.step([torch.zeros(1) for _ in SHAPES])
    with pytest.raises(ValueError, match="tensors"):
        outer.step([])


def test_sync_due() -> None:
    assert [step for step in range(0, 13) if sync_due(step, 4)] == [4, 8, 12]
    assert all(sync_due(step, 1) for step in range(1, 5))
    assert not sync_due(0, 1)
    with pytest.raises(ValueError):
        sync_due(3, 0)
