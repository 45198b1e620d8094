"""Push-sum math: exact averages on directed and time-varying graphs, mass conservation, schedules.

Hermetic: each "peer" is a list of tensors in one process, and a round is simulated the way a
real one runs, every message built from the pre-round state before anyone mixes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from p2pdl.core.pushsum import (
    PushSumState,
    debias,
    debias_,
    one_peer_exponential_matrix,
    one_peer_exponential_sources,
    one_peer_exponential_target,
    paper_gradient_scale,
    pushsum_matrix,
    pushsum_mix,
    pushsum_mix_debiased,
    pushsum_outgoing,
    pushsum_schedule_period,
    rebias,
    rebias_,
)

SHAPES = [(3, 4), (5,), ()]

# Directed ring 0 -> 1 -> ... -> 5 -> 0 plus the chord 0 -> 3: strongly connected, not
# balanced (peer 0 has out-degree 2, peer 3 in-degree 2), so the column-stochastic P is not row
# stochastic and only the de-biasing by w recovers the true average.
RING_WITH_CHORD = [[1, 3], [2], [3], [4], [5], [0]]


def initial_states(n: int, seed: int = 0) -> list[PushSumState]:
    generator = torch.Generator().manual_seed(seed)
    return [
        PushSumState([torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES])
        for _ in range(n)
    ]


def mean_of(states: list[PushSumState]) -> list[torch.Tensor]:
    return [torch.stack([s.debiased()[k] for s in states]).mean(dim=0) for k in range(len(SHAPES))]


def simulate_round(states: list[PushSumState], out_neighbours: list[list[int]]) -> None:
    """One synchronous round: all messages from the pre-round state, then everyone mixes."""
    inbox: list[list[tuple[float, list[torch.Tensor]]]] = [[] for _ in states]
    shares = []
    for sender, targets in enumerate(out_neighbours):
        share = states[sender].outgoing_share(len(targets))
        shares.append(share)
        message = states[sender].message(share)
        for target in targets:
            inbox[target].append(message)
    for peer, state in enumerate(states):
        state.mix(shares[peer], inbox[peer])


def one_peer_out_neighbours(n: int, round_index: int) -> list[list[int]]:
    return [[one_peer_exponential_target(i, n, round_index)] if n > 1 else [] for i in range(n)]


def assert_all_at(states: list[PushSumState], target: list[torch.Tensor], atol: float) -> None:
    for state in states:
        for got, want in zip(state.debiased(), target, strict=True):
            torch.testing.assert_close(got, want, rtol=0.0, atol=atol)


def test_fixed_directed_graph_converges_to_exact_average() -> None:
    states = initial_states(len(RING_WITH_CHORD))
    target = mean_of(states)
    numerator_sum = [torch.stack([s.numerators[k] for s in states]).sum(0) for k in range(len(SHAPES))]
    # λ2 of this P is 0.753, so 100 rounds shrink the disagreement by ~5e-13.
    for _ in range(100):
        simulate_round(states, RING_WITH_CHORD)
        # Mass conservation: both sums are invariant under a column-stochastic P.
        assert math.isclose(sum(s.weight for s in states), len(states), rel_tol=0.0, abs_tol=1e-12)
        for k in range(len(SHAPES)):
            mass = sum(s.numerators[k] for s in states)
            assert float((mass - numerator_sum[k]).abs().max()) < 1e-12
    # The weights themselves are not all 1 (P is not doubly stochastic), yet z / w is exact.
    assert max(abs(s.weight - 1.0) for s in states) > 0.05
    assert_all_at(states, target, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_one_peer_exponential_is_exact_in_log2_n_rounds(n: int) -> None:
    states = initial_states(n, seed=n)
    target = mean_of(states)
    rounds = int(math.log2(n))
    assert pushsum_schedule_period(n) == rounds
    for t in range(rounds):
        simulate_round(states, one_peer_out_neighbours(n, t))
        assert sum(s.weight for s in states) == n
    assert all(s.weight == 1.0 for s in states)
    assert_all_at(states, target, atol=1e-12)


@pytest.mark.parametrize("n", [3, 5, 6, 7, 12])
def test_one_peer_exponential_converges_for_other_n(n: int) -> None:
    states = initial_states(n, seed=n)
    target = mean_of(states)
    for t in range(60 * pushsum_schedule_period(n)):
        simulate_round(states, one_peer_out_neighbours(n, t))
        # A cyclic shift is a permutation: every peer receives exactly one half-share.
        assert all(s.weight == 1.0 for s in states)
    assert_all_at(states, target, atol=1e-6)


def implied_matrix(out_neighbours: list[list[int]]) -> np.ndarray:
    """P read off pushsum_mix itself: column j is the round's image of the unit vector e_j."""
    n = len(out_neighbours)
    matrix = np.zeros((n, n))
    for j in range(n):
        states = [PushSumState([torch.tensor(float(i == j), dtype=torch.float64)]) for i in range(n)]
        simulate_round(states, out_neighbours)
        matrix[:, j] = [float(s.numerators[0]) for s in states]
    return matrix


@pytest.mark.parametrize(
    "out_neighbours",
    [RING_WITH_CHORD, one_peer_out_neighbours(8, 2), one_peer_out_neighbours(6, 1), [[1, 2], [], [0]]],
)
def test_implied_mixing_matrix_is_column_stochastic(out_neighbours: list[list[int]]) -> None:
    matrix = implied_matrix(out_neighbours)
    assert (matrix >= 0).all()
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(matrix, pushsum_matrix(out_neighbours), rtol=0, atol=1e-15)


def test_ring_with_chord_is_not_row_stochastic() -> None:
    # Guards the premise of the convergence test above: this graph needs the de-biasing.
    assert not np.allclose(pushsum_matrix(RING_WITH_CHORD).sum(axis=1), 1.0)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_one_peer_matrix_product_over_a_period_is_exact_average(n: int) -> None:
    product = np.eye(n)
    for t in range(pushsum_schedule_period(n)):
        product = one_peer_exponential_matrix(n, t) @ product
    np.testing.assert_allclose(product, np.full((n, n), 1.0 / n), rtol=0, atol=1e-15)


@given(n=st.integers(1, 70), round_index=st.integers(0, 1000))
def test_sources_and_targets_agree(n: int, round_index: int) -> None:
    targets = [one_peer_exponential_target(i, n, round_index) for i in range(n)]
    if n == 1:
        assert targets == [0]
        assert one_peer_exponential_sources(0, 1, round_index) == []
        return
    assert sorted(targets) == list(range(n))  # a permutation
    assert all(target != i for i, target in enumerate(targets))  # no self-sends
    for i in range(n):
        sources = one_peer_exponential_sources(i, n, round_index)
        assert sources == [j for j in range(n) if targets[j] == i]
    offset = 1 << (round_index % pushsum_schedule_period(n))
    assert targets[0] == offset % n


@pytest.mark.parametrize(("n", "period"), [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (1024, 10)])
def test_schedule_period(n: int, period: int) -> None:
    assert pushsum_schedule_period(n) == period


def test_debiased_form_matches_numerator_form() -> None:
    """pushsum_outgoing + pushsum_mix_debiased on x equal PushSumState on z = w * x."""
    n = 6
    states = initial_states(n, seed=3)
    # Scramble the weights first so w != 1 and the two forms are actually distinguished.
    for _ in range(3):
        simulate_round(states, RING_WITH_CHORD)
    weights = [s.weight for s in states]
    parameters = [s.debiased() for s in states]
    inbox: list[list[tuple[float, list[torch.Tensor]]]] = [[] for _ in range(n)]
    shares = []
    for sender, targets in enumerate(RING_WITH_CHORD):
        share = 1.0 / (len(targets) + 1)
        shares.append(share)
        for target in targets:
            inbox[target].append(pushsum_outgoing(parameters[sender], weights[sender], share))
    new_weights = [pushsum_mix_debiased(parameters[i], weights[i], shares[i], inbox[i]) for i in range(n)]
    simulate_round(states, RING_WITH_CHORD)
    for i, state in enumerate(states):
        assert math.isclose(new_weights[i], state.weight, rel_tol=1e-15)
        for got, want in zip(parameters[i], state.debiased(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_rebias_debias_round_trip_and_sgp_step() -> None:
    x = [torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)]
    weight = 0.8
    z = rebias(x, weight)
    torch.testing.assert_close(debias(z, weight), x)
    in_place = [t.clone() for t in x]
    rebias_(in_place, weight)
    torch.testing.assert_close(in_place, z)
    debias_(in_place, weight)
    torch.testing.assert_close(in_place, x)
    # SGP's z <- z - lr * g, done as a step on x with the gradient scaled by 1 / w.
    lr, gradient = 0.1, [torch.tensor([0.5, 0.25], dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)]
    stepped_x = [xi - lr * gi * paper_gradient_scale(weight) for xi, gi in zip(x, gradient, strict=True)]
    torch.testing.assert_close(rebias(stepped_x, weight), [zi - lr * gi for zi, gi in zip(z, gradient, strict=True)])


def test_sender_that_keeps_a_failed_share_conserves_mass() -> None:
    states = initial_states(4, seed=9)
    target = mean_of(states)
    for t in range(12):
        out_neighbours = one_peer_out_neighbours(4, t)
        inbox: list[list[tuple[float, list[torch.Tensor]]]] = [[] for _ in states]
        keep = []
        for sender, (destination,) in enumerate(out_neighbours):
            message = states[sender].message(0.5)
            if (sender + t) % 3 == 0:  # this push "failed": the sender keeps its share
                keep.append(1.0)
            else:
                keep.append(0.5)
                inbox[destination].append(message)
        for peer, state in enumerate(states):
            state.mix(keep[peer], inbox[peer])
        assert math.isclose(sum(s.weight for s in states), 4.0, rel_tol=1e-15)
    for t in range(12, 52):
        simulate_round(states, one_peer_out_neighbours(4, t))
    assert_all_at(states, target, atol=1e-9)


def test_mix_moves_wire_tensors_to_the_local_dtype() -> None:
    numerators = [torch.ones(3, dtype=torch.float64)]
    # The sender already scaled its message: 0.5 * 3.0 = 1.5, on the wire as float32.
    weight = pushsum_mix(numerators, 1.0, 0.5, [(0.5, [torch.full((3,), 1.5, dtype=torch.float32)])])
    assert weight == 1.0
    torch.testing.assert_close(numerators[0], torch.full((3,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_hostile_weights_are_refused(bad: float) -> None:
    parameters = [torch.zeros(2)]
    with pytest.raises(ValueError):
        pushsum_mix_debiased(parameters, 1.0, 0.5, [(bad, [torch.zeros(2)])])
    with pytest.raises(ValueError):
        pushsum_mix([torch.zeros(2)], 1.0, 0.5, [(bad, [torch.zeros(2)])])
    torch.testing.assert_close(parameters[0], torch.zeros(2))


def test_losing_all_mass_is_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        pushsum_mix_debiased([torch.zeros(2)], 1.0, 0.0, [])
    with pytest.raises(ValueError):
        debias([torch.zeros(2)], 0.0)


def test_index_and_round_validation() -> None:
    with pytest.raises(ValueError):
        one_peer_exponential_target(4, 4, 0)
    with pytest.raises(ValueError):
        one_peer_exponential_sources(0, 4, -1)
    with pytest.raises(ValueError):
        pushsum_schedule_period(0)
