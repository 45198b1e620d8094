"""Robust mixing: clipping bounds what a malicious neighbour can do; trimmed means ignore it."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pdl.core.mixing import mix_into
from p2pdl.core.robust import ClippingReport, adaptive_radius, clipped_gossip, difference_norms, trimmed_mean

SHAPES = [(4, 5), (7,), ()]
FLOAT32_MAX = float(np.finfo(np.float32).max)
# The local peer is honest-ish: far enough from overflow that a clipped step cannot leave float32.
FLOAT32_BIG = float(np.float32(1e30))

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double().cpu() for t in tensors])


def honest_and_byzantine(device: str, seed: int = 0) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """7 honest peers within ~0.01 of a common point, and one that sends its parameters * 1000."""
    generator = torch.Generator().manual_seed(seed)
    center = [torch.randn(shape, generator=generator) for shape in SHAPES]
    honest = [[(c + 0.01 * torch.randn(c.shape, generator=generator)).to(device) for c in center] for _ in range(7)]
    byzantine = [1000.0 * t for t in honest[1]]
    return honest, byzantine


@pytest.mark.parametrize("device", DEVICES)
def test_clipping_bounds_a_scaled_neighbour_that_plain_gossip_follows(device: str) -> None:
    honest, byzantine = honest_and_byzantine(device)
    radius = 0.05
    weight = 1.0 / 8  # full graph of 8: uniform weights
    start = flat(honest[0])
    honest_mean = flat([torch.stack([peer[k] for peer in honest]).mean(0) for k in range(len(SHAPES))])

    clipped = [t.clone() for t in honest[0]]
    contributions = [(weight, peer) for peer in honest[1:]] + [(weight, byzantine)]
    report = clipped_gossip(clipped, weight, contributions, radius)

    plain = [t.clone() for t in honest[0]]
    mix_into(plain, weight, contributions)

    assert all(t.device.type == device for t in clipped)
    # One round moves a peer by at most radius * (sum of neighbour weights) = radius * 7/8.
    assert float((flat(clipped) - start).norm()) <= radius * 7 / 8 + 1e-6
    assert float((flat(clipped) - honest_mean).norm()) < 0.1
    # Unclipped, the peer is dragged ~1000/8 times its own norm away.
    assert float((flat(plain) - honest_mean).norm()) > 50 * float(honest_mean.norm())
    assert isinstance(report, ClippingReport)
    assert report.scales[-1] < 1e-3 and report.clipped_count >= 1 and report.dropped_count == 0
    assert report.difference_norms[-1] > 1000 * max(report.difference_norms[:-1])
    assert report.as_metrics()["clipped"] == report.clipped_count


@pytest.mark.parametrize("device", DEVICES)
def test_huge_radius_equals_plain_mixing(device: str) -> None:
    honest, byzantine = honest_and_byzantine(device, seed=1)
    row = [0.3, 0.2, 0.1, 0.15]  # self weight first; sums to 0.75 + 0.15 = 1 with the last
    contributions = list(zip(row[1:], [honest[1], honest[2], byzantine], strict=True))
    for radius in (math.inf, 1e12):
        clipped = [t.double() for t in honest[0]]
        plain = [t.double() for t in honest[0]]
        report = clipped_gossip(clipped, row[0], contributions, radius)
        mix_into(plain, row[0], contributions)
        assert report.clipped_count == 0
        torch.testing.assert_close(clipped, plain, rtol=1e-6, atol=1e-6)


def test_non_stochastic_rows_also_match_plain_mixing() -> None:
    """The general form (w_ii + sum w_ij) x_i + sum w_ij (x_j - x_i) equals mix_into for any row."""
    local = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
    contributions = [(0.5, [torch.tensor([3.0, -1.0], dtype=torch.float64)])]
    clipped = [local[0].clone()]
    plain = [local[0].clone()]
    clipped_gossip(clipped, 0.25, contributions, math.inf)
    mix_into(plain, 0.25, contributions)
    torch.testing.assert_close(clipped, plain)


def test_clip_scales_the_whole_difference_jointly() -> None:
    local = [torch.zeros(2, dtype=torch.float64), torch.zeros((), dtype=torch.float64)]
    neighbour = [torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)]
    report = clipped_gossip(local, 0.5, [(0.5, neighbour)], radius=1.0)
    # ||difference|| = 5 over both tensors jointly; clipped to 1 keeps its direction (0.6, 0, 0.8).
    assert report.difference_norms == (5.0,)
    assert report.scales == (0.2,)
    torch.testing.assert_close(local[0], torch.tensor([0.3, 0.0], dtype=torch.float64))
    torch.testing.assert_close(local[1], torch.tensor(0.4, dtype=torch.float64))


def test_non_finite_neighbour_is_dropped_and_its_weight_stays_home() -> None:
    local = [torch.ones(3)]
    bad = [torch.tensor([1.0, float("inf"), 0.0])]
    good = [torch.full((3,), 3.0)]
    report = clipped_gossip(local, 0.5, [(0.25, bad), (0.25, good)], radius=10.0)
    assert report.scales == (0.0, 1.0) and report.dropped_count == 1
    torch.testing.assert_close(local[0], torch.full((3,), 1.5))  # 0.75 * 1 + 0.25 * 3


def test_adaptive_radius_ignores_a_minority_outlier() -> None:
    assert adaptive_radius([0.1, 0.2, 0.3, 5000.0]) == 0.2
    assert adaptive_radius([0.1, 5000.0]) == 0.1  # lower median: an observed value, not 2500
    assert adaptive_radius([float("inf"), float("nan"), 0.4], scale=2.0) == 0.8
    assert adaptive_radius([], minimum=0.01) == 0.01
    assert adaptive_radius([0.0, 0.0], minimum=0.01) == 0.01


def test_adaptive_radius_as_a_rule() -> None:
    honest, byzantine = honest_and_byzantine("cpu", seed=2)
    local = [t.clone() for t in honest[0]]
    contributions = [(1.0 / 8, peer) for peer in honest[1:]] + [(1.0 / 8, byzantine)]
    norms = difference_norms(local, [tensors for _, tensors in contributions])
    report = clipped_gossip(local, 1.0 / 8, contributions, functools.partial(adaptive_radius, scale=2.0))
    assert report.radius == adaptive_radius(norms, scale=2.0)
    assert report.radius < 1.0  # chosen among honest norms, not the byzantine one
    assert report.scales[-1] < 1e-3


@settings(max_examples=50, deadline=None)
@given(
    local=hnp.arrays(np.float32, (6,), elements=st.floats(-FLOAT32_BIG, FLOAT32_BIG, width=32)),
    neighbours=st.lists(
        hnp.arrays(np.float32, (6,), elements=st.floats(-FLOAT32_MAX, FLOAT32_MAX, width=32)),
        min_size=1,
        max_size=4,
    ),
    radius=st.one_of(st.floats(0.0, 1e6), st.just(math.inf)),
)
def test_finite_inputs_give_finite_outputs(local: np.ndarray, neighbours: list[np.ndarray], radius: float) -> None:
    tensors = [torch.from_numpy(local.copy())]
    weight = 1.0 / (len(neighbours) + 1)
    clipped_gossip(tensors, weight, [(weight, [torch.from_numpy(n)]) for n in neighbours], radius)
    if math.isfinite(radius):
        # Unbounded radius may legitimately overflow float32 (like plain mixing would).
        assert torch.isfinite(tensors[0]).all()
    trimmed = [torch.from_numpy(local.copy())]
    trimmed_mean(trimmed, [[torch.from_numpy(n)] for n in neighbours], trim=len(neighbours) // 2)
    assert torch.isfinite(trimmed[0]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_trimmed_mean_ignores_one_outlier_exactly(device: str) -> None:
    honest, _ = honest_and_byzantine(device, seed=3)
    local = [t.double() for t in honest[0]]
    neighbours = [[t.double() for t in peer] for peer in honest[1:4]]
    outlier = [1e6 * torch.ones_like(t) for t in local]  # the largest value in every coordinate
    expected = []
    for k in range(len(SHAPES)):
        # Without the outlier, trim=1 drops the largest (the outlier) and the smallest honest value.
        values = torch.sort(torch.stack([local[k]] + [n[k] for n in neighbours]), dim=0).values
        expected.append(values[1:].mean(0))
    trimmed_mean(local, [*neighbours, outlier], trim=1)
    torch.testing.assert_close(local, expected, rtol=0, atol=1e-12)


def test_trimmed_mean_of_agreeing_peers_is_their_value() -> None:
    agreed = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    local = [agreed.clone()]
    neighbours = [[agreed.clone()] for _ in range(3)]
    outlier = torch.tensor([[1e9, -1e9], [float("nan"), 7.0]])
    trimmed_mean(local, [*neighbours, [outlier]], trim=1)
    torch.testing.assert_close(local[0], agreed, rtol=0, atol=0)


@given(
    values=hnp.arrays(np.float64, st.tuples(st.integers(1, 7), st.integers(1, 5)), elements=st.floats(-1e6, 1e6)),
    data=st.data(),
)
def test_trimmed_mean_matches_numpy_reference(values: np.ndarray, data: st.DataObject) -> None:
    count = values.shape[0]
    trim = data.draw(st.integers(0, (count - 1) // 2))
    local = [torch.from_numpy(values[0].copy())]
    trimmed_mean(local, [[torch.from_numpy(row)] for row in values[1:]], trim=trim)
    reference = np.sort(values, axis=0)[trim : count - trim].mean(axis=0)
    np.testing.assert_allclose(local[0].numpy(), reference, rtol=1e-12, atol=1e-9)


def test_validation() -> None:
    local = [torch.zeros(3)]
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(local, [[torch.zeros(3)]], trim=1)
    with pytest.raises(ValueError, match="shape"):
        trimmed_mean(local, [[torch.zeros(2)], [torch.zeros(3)]], trim=1)
    with pytest.raises(ValueError, match="radius"):
        clipped_gossip(local, 0.5, [(0.5, [torch.zeros(3)])], radius=-1.0)
    with pytest.raises(ValueError, match="weight"):
        clipped_gossip(local, 0.5, [(float("nan"), [torch.zeros(3)])], radius=1.0)
    with pytest.raises(ValueError, match="floating"):
        clipped_gossip([torch.zeros(3, dtype=torch.int64)], 1.0, [], radius=1.0)


def test_outlier_clipper_rejects_a_far_neighbour_and_leaves_honest_mixing_alone() -> None:
    from p2pdl.core.mixing import mix_into
    from p2pdl.core.robust import OutlierClipper

    torch.manual_seed(0)
    init = [torch.randn(20, 10), torch.randn(10)]
    local = [t + 0.01 * torch.randn_like(t) for t in init]
    honest = [t + 0.01 * torch.randn_like(t) for t in init]
    attacker = [t * 1000 for t in init]
    clipper = OutlierClipper()
    before = [t.clone() for t in local]
    clipper.mix(local, 1 / 3, [(1 / 3, honest), (1 / 3, attacker)])
    assert clipper.rejected == 1
    # Only the honest neighbour moved it: at most its own weight times its distance.
    moved = sum(float((a - b).norm() ** 2) for a, b in zip(local, before, strict=True)) ** 0.5
    distance = sum(float((h - b).norm() ** 2) for h, b in zip(honest, before, strict=True)) ** 0.5
    assert moved <= distance / 3 + 1e-6
    # Between honest neighbours within the radius it is exactly plain mixing.
    plain = [t.clone() for t in before]
    robust = [t.clone() for t in before]
    mix_into(plain, 0.5, [(0.5, honest)])
    OutlierClipper().mix(robust, 0.5, [(0.5, honest)])
    for a, b in zip(plain, robust, strict=True):
        torch.testing.assert_close(a, b)
