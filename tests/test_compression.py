"""Compressors, error feedback and CHOCO-gossip (p2pdl.compression): hermetic, pure torch.

Error bounds are the ones each compressor documents, asserted tight: fp16/bf16 relative
rounding, int8 within half a scale per chunk, top-k exactly the k largest, PowerSGD exact on a
rank-r matrix. Error feedback is asserted bit for bit where fp32 makes that possible (Sterbenz),
and CHOCO's consensus error must fall geometrically where naive compressed gossip stalls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pdl.compression import compressors as compression
from p2pdl.compression.choco import ChocoState
from p2pdl.compression.codec import CompressionPolicy, TensorCodec
from p2pdl.compression.compressors import (
    EXACT_TOPK_MAX_NUMEL,
    Compressor,
    CompressorKind,
    ErrorFeedback,
    TopKCompressor,
    build_compressor,
    wire_bytes,
)
from p2pdl.errors import ConfigError, FrameSchemaError, NonFiniteError, ShapeMismatchError
from p2pdl.wire import ALLOWED_DTYPES, Frame, Limits, TensorSpec, decode_frame, encode_frame

KINDS: tuple[CompressorKind, ...] = ("none", "fp16", "bf16", "int8", "topk", "powersgd")
# Decoded entries are zero or within a factor 2 of the input, so fp32 subtraction is exact.
STERBENZ_KINDS: tuple[CompressorKind, ...] = ("none", "fp16", "bf16", "int8", "topk")
SHAPES: list[tuple[int, ...]] = [
    (),
    (0,),
    (1,),
    (7,),
    (1000,),
    (1025,),
    (3, 5),
    (33, 17),
    (64, 64),
    (16, 3, 3, 3),
    (2, 0),
]
CPU = torch.device("cpu")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def roundtrip(compressor: Compressor, tensor: torch.Tensor, key: str = "w") -> torch.Tensor:
    parts = compressor.encode(key, tensor)
    return compressor.decode(key, parts, tuple(tensor.shape), tensor.device)


# --------------------------------------------------------------------------- error bounds


def test_none_is_exact_and_returns_a_fresh_tensor() -> None:
    compressor = build_compressor("none")
    x = randn(33, 17)
    decoded = roundtrip(compressor, x)
    assert torch.equal(decoded, x)
    decoded.add_(1.0)
    assert not torch.equal(decoded, x)


@pytest.mark.parametrize(("kind", "relative"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_relative_error(kind: CompressorKind, relative: float) -> None:
    x = randn(10_000) * 100.0
    err = (roundtrip(build_compressor(kind), x) - x).abs()
    # 2**-25: fp16's subnormal spacing / 2, for the few |x| < 6.1e-5.
    assert bool((err <= relative * x.abs() + 2.0**-25).all())


def test_fp16_clamps_instead_of_sending_inf() -> None:
    decoded = roundtrip(build_compressor("fp16"), torch.tensor([1e6, -1e9, 3.0]))
    assert decoded.tolist() == [65504.0, -65504.0, 3.0]


@pytest.mark.parametrize("numel", [1, 1000, 1024, 5000, 4097])
def test_int8_error_within_half_a_scale_per_chunk(numel: int) -> None:
    chunk = 1024
    compressor = build_compressor("int8", chunk=chunk)
    x = randn(numel) * torch.linspace(0.01, 100.0, numel)  # scales differ between chunks
    parts = compressor.encode("w", x)
    scales = parts["scales"]
    assert scales.shape == (math.ceil(numel / chunk),)
    for index in range(scales.numel()):
        piece = x[index * chunk : (index + 1) * chunk]
        assert float(scales[index]) == pytest.approx(float(piece.abs().max()) / 127, rel=1e-6)
    assert int(parts["values"].abs().max()) == 127
    err = (compressor.decode("w", parts, (numel,), CPU) - x).abs()
    per_element_scale = scales.repeat_interleave(chunk)[:numel]
    assert bool((err <= per_element_scale * (0.5 + 1e-6)).all())


def test_int8_all_zero_chunk_decodes_to_zero() -> None:
    compressor = build_compressor("int8", chunk=4)
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, -127.0])
    parts = compressor.encode("w", x)
    assert parts["scales"].tolist() == [0.0, 1.0]
    assert parts["values"].tolist() == [0, 0, 0, 0, 0, -127]  # 0.5 rounds half to even
    assert compressor.decode("w", parts, (6,), CPU).tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, -127.0]


def assert_exact_topk(decoded: torch.Tensor, x: torch.Tensor, k: int) -> None:
    nonzero = torch.nonzero(decoded).squeeze(1)
    expected = torch.sort(torch.topk(x.abs(), k).indices).values
    assert torch.equal(nonzero, expected)
    kept = x[expected]
    assert bool(((decoded[expected] - kept).abs() <= 2.0**-11 * kept.abs()).all())


def test_topk_exact_path_keeps_the_k_largest_and_zeros_elsewhere() -> None:
    compressor = build_compressor("topk", ratio=0.01)
    x = randn(100_000)
    k = math.ceil(0.01 * 100_000)
    decoded = roundtrip(compressor, x)
    assert int((decoded != 0).sum()) == k
    assert_exact_topk(decoded, x, k)


@pytest.mark.parametrize(("ratio", "numel", "k"), [(0.07, 100, 7), (0.01, 1, 1), (0.01, 150, 2), (1.0, 9, 9)])
def test_topk_k_is_ceil_of_the_decimal_ratio(ratio: float, numel: int, k: int) -> None:
    compressor = build_compressor("topk", ratio=ratio)
    assert compressor.wire_specs((numel,))["indices"].shape == (k,)


def test_topk_indices_are_delta_coded() -> None:
    x = torch.zeros(1000)
    x[[3, 10, 11, 500]] = torch.tensor([5.0, -6.0, 7.0, 8.0])
    parts = TopKCompressor(0.004).encode("w", x)
    assert parts["indices"].tolist() == [3, 7, 1, 489]
    assert parts["scale"].tolist() == [8.0]


@pytest.mark.parametrize("margin", [compression._CANDIDATE_MARGIN, 0.5, 0.1])
def test_topk_sampled_path_is_exact(monkeypatch: pytest.MonkeyPatch, margin: float) -> None:
    # margin 0.5 forces the retry, 0.1 the exact fallback; all must give the exact top-k.
    monkeypatch.setattr(compression, "_CANDIDATE_MARGIN", margin)
    numel = 4 * EXACT_TOPK_MAX_NUMEL
    compressor = TopKCompressor(0.01)
    k = compressor.k_for(numel)
    assert 4 * compressor._sample_size(numel, k) <= numel  # really the sampled path
    # Heavy-tailed, like real gradients: Student-t with 2 degrees of freedom.
    x = randn(numel) / torch.sqrt(randn(numel, seed=1).square().add(randn(numel, seed=2).square()).div(2))
    decoded = roundtrip(compressor, x)
    assert int((decoded != 0).sum()) == k
    assert_exact_topk(decoded, x, k)


def test_powersgd_is_exact_on_a_rank_r_matrix() -> None:
    compressor = build_compressor("powersgd", rank=4)
    x = randn(64, 4) @ randn(4, 48, seed=1)
    decoded = roundtrip(compressor, x)
    assert float((decoded - x).norm() / x.norm()) < 1e-5
    # The warm-started second encode stays exact.
    assert float((roundtrip(compressor, x) - x).norm() / x.norm()) < 1e-5


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation() -> None:
    compressor = build_compressor("powersgd", rank=2)
    x = randn(40, 30)
    singular = torch.linalg.svdvals(x)
    best = float(singular[2:].square().sum().sqrt())  # Eckart-Young
    errors = [float((roundtrip(compressor, x) - x).norm()) for _ in range(30)]
    assert errors[-1] < errors[0]
    assert errors[-1] == pytest.approx(best, rel=1e-3)
    # The cold start is seeded by (seed, key): another peer's compressor starts identically.
    twin = build_compressor("powersgd", rank=2)
    assert float((roundtrip(twin, x) - x).norm()) == errors[0]


@pytest.mark.parametrize("shape", [(100,), (4, 4), (3, 1000)])
def test_powersgd_falls_back_to_fp32_when_it_would_not_shrink(shape: tuple[int, ...]) -> None:
    compressor = build_compressor("powersgd", rank=4)
    assert compressor.wire_specs(shape) == {"values": TensorSpec(dtype="float32", shape=shape)}
    x = randn(*shape)
    assert torch.equal(roundtrip(compressor, x), x)


# --------------------------------------------------------------------------- wire contract


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_wire_specs_match_encode_exactly(kind: CompressorKind, shape: tuple[int, ...]) -> None:
    compressor = build_compressor(kind, ratio=0.05, rank=2, chunk=64)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    parts = compressor.encode("w", x)
    specs = compressor.wire_specs(shape)
    assert {suffix: TensorSpec.of_tensor(part) for suffix, part in parts.items()} == specs
    assert all(spec.dtype in ALLOWED_DTYPES for spec in specs.values())
    assert wire_bytes(parts) == sum(part.contiguous().view(-1).view(torch.uint8).numel() for part in parts.values())
    decoded = compressor.decode("w", parts, shape, CPU)
    assert decoded.dtype == torch.float32
    assert tuple(decoded.shape) == shape


@pytest.mark.parametrize("kind", KINDS)
def test_parts_survive_a_real_frame(kind: CompressorKind) -> None:
    """Encode, frame (lz4 auto), decode with expected specs, decode from read-only views."""
    compressor = build_compressor(kind, ratio=0.01, rank=4)
    shape = (256, 300)
    x = randn(*shape)
    parts = compressor.encode("layer.weight", x)
    frame = Frame(
        kind="grads",
        sender="p0",
        round=1,
        step=1,
        tensors={f"layer.weight.{suffix}": part for suffix, part in parts.items()},
    )
    expected = {f"layer.weight.{suffix}": spec for suffix, spec in compressor.wire_specs(shape).items()}
    received = decode_frame(
        encode_frame(frame), limits=Limits(max_frame_bytes=2**24, max_decompressed_bytes=2**24), expected=expected
    )
    received_parts = {name.removeprefix("layer.weight."): tensor for name, tensor in received.tensors.items()}
    decoded = compressor.decode("layer.weight", received_parts, shape, CPU)
    assert torch.equal(decoded, compressor.decode("layer.weight", parts, shape, CPU))


def test_decode_refuses_parts_that_do_not_match_the_specs() -> None:
    compressor = build_compressor("int8", chunk=8)
    parts = compressor.encode("w", randn(20))
    with pytest.raises(ShapeMismatchError):
        compressor.decode("w", parts, (21,), CPU)
    with pytest.raises(ShapeMismatchError):
        compressor.decode("w", {**parts, "scales": parts["scales"].double()}, (20,), CPU)
    with pytest.raises(ShapeMismatchError):
        compressor.decode("w", {"values": parts["values"]}, (20,), CPU)


@pytest.mark.parametrize(
    "gaps",
    [[-1, 2, 3], [0, 0, 3], [5, 2, -1], [0, 1, 99], [2**31 - 1, 1, 1]],
    ids=["negative-first", "duplicate", "decreasing", "out-of-range", "overflow"],
)
def test_topk_decode_refuses_hostile_indices(gaps: list[int]) -> None:
    compressor = TopKCompressor(0.03)
    parts = {
        "indices": torch.tensor(gaps, dtype=torch.int32),
        "values": torch.ones(3, dtype=torch.float16),
        "scale": torch.ones(1),
    }
    with pytest.raises(FrameSchemaError):
        compressor.decode("w", parts, (100,), CPU)


def test_decode_refuses_values_that_overflow() -> None:
    int8 = build_compressor("int8", chunk=4)
    with pytest.raises(NonFiniteError):
        int8.decode("w", {"values": torch.full((4,), 127, dtype=torch.int8), "scales": torch.tensor([3e38])}, (4,), CPU)
    topk = TopKCompressor(0.5)
    parts = {
        "indices": torch.tensor([0, 1], dtype=torch.int32),
        "values": torch.tensor([60000.0, 1.0], dtype=torch.float16),
        "scale": torch.tensor([3e38]),
    }
    with pytest.raises(NonFiniteError):
        topk.decode("w", parts, (4,), CPU)
    powersgd = build_compressor("powersgd", rank=1)
    big = {"p": torch.full((8, 1), 1e30), "q": torch.full((8, 1), 1e30)}
    with pytest.raises(NonFiniteError):
        powersgd.decode("w", big, (8, 8), CPU)


def test_build_compressor_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        build_compressor("zip", ratio=0.0, rank=0, chunk=0)  # type: ignore[arg-type]
    assert len(info.value.problems) == 4


def test_policy_sends_small_tensors_uncompressed() -> None:
    policy = CompressionPolicy(compressor=build_compressor("topk"), min_numel=4096)
    assert policy.for_tensor(4095).name == "none"
    assert policy.for_tensor(4096).name == "topk"
    with pytest.raises(ConfigError):
        CompressionPolicy(compressor=build_compressor("none"), min_numel=-1)


# --------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("kind", KINDS)
def test_error_feedback_carries_the_residual_over(kind: CompressorKind) -> None:
    compressor = build_compressor(kind, ratio=0.01, rank=2, chunk=64)
    feedback = ErrorFeedback(compressor)
    shape = (48, 40)
    steps = 12
    inputs = [randn(*shape, seed=step) for step in range(steps)]
    decoded_sum = torch.zeros(shape, dtype=torch.float64)
    rounding_bound = torch.zeros(shape, dtype=torch.float64)
    old = torch.zeros(shape)
    for step, x in enumerate(inputs):
        corrected = x + old  # the same fp32 add that compress does
        parts = feedback.compress("w", x)
        decoded = compressor.decode("w", parts, shape, CPU)
        new = feedback.residual("w")
        assert new is not None
        if kind in STERBENZ_KINDS:
            assert torch.equal(decoded + new, corrected), f"step {step}"
        else:
            # PowerSGD: corrected - decoded rounds once, then the check's add rounds once.
            slack = 2.0**-23 * (corrected.abs() + decoded.abs())
            assert bool(((decoded + new) - corrected).abs().le(slack).all()), f"step {step}"
        decoded_sum += decoded.double()
        rounding_bound += 2.0**-24 * corrected.abs().double()
        if kind not in STERBENZ_KINDS:
            rounding_bound += 2.0**-24 * (corrected - decoded).abs().double()
        old = new.clone()
    # Telescoping: sum of what was sent = sum of inputs - final residual, up to the fp32
    # roundings of the adds (and, for PowerSGD, of the subtractions).
    input_sum = torch.stack(inputs).double().sum(dim=0)
    gap = (decoded_sum + old.double() - input_sum).abs()
    assert bool((gap <= rounding_bound).all())
    if kind in ("topk", "powersgd"):
        assert float(old.abs().max()) > 0  # something really was carried


def test_error_feedback_none_does_not_alias_the_input() -> None:
    feedback = ErrorFeedback(build_compressor("none"))
    x = randn(10)
    parts = feedback.compress("w", x)
    assert torch.equal(parts["values"], x)
    residual = feedback.residual("w")
    assert residual is not None and float(residual.abs().max()) == 0.0
    assert parts["values"].data_ptr() != x.data_ptr()


# --------------------------------------------------------------------------- CHOCO-gossip


def ring_mixing_matrix(n: int) -> np.ndarray:
    """MH weights on a ring: 1/3 to self and to each neighbour."""
    w = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            w[i, j % n] = 1.0 / 3.0
    return w


CHOCO_GAMMA = 0.03  # top-1% on a ring of 8: gamma must be about 3 x the fraction kept


def flat_choco_state(compressor: Compressor, x: torch.Tensor, neighbours: Sequence[str]) -> ChocoState:
    """One simulated peer's CHOCO state over a single flat tensor named ``x``."""
    codec = TensorCodec(
        CompressionPolicy(compressor=compressor, min_numel=0), {"x": tuple(x.shape)}, error_feedback=False
    )
    return ChocoState(codec, {"x": x}, neighbours, CPU)


def simulate_gossip(
    x0: Sequence[torch.Tensor],
    mixing: npt.NDArray[np.floating],
    rounds: int,
    make_compressor: Callable[[], Compressor],
    *,
    choco: bool,
    gamma: float = 1.0,
) -> list[float]:
    """Consensus error per round of compressed gossip among ``len(x0)`` simulated peers.

    ``mixing``: the symmetric, doubly stochastic n x n matrix W; each peer has its own compressor
    from ``make_compressor``. With ``choco`` each peer runs the strategy's :class:`ChocoState`
    with step ``gamma``; without, each runs naive compressed gossip x_i <- w_ii x_i + sum_{j != i}
    w_ij decode(C(x_j)). Returns e_t = (1/n) sum_i ||x_i - x̄_0||^2 / ((1/n) sum_i ||x_i^0 -
    x̄_0||^2) after each round t, where x̄_0 is the true initial mean; it tends to 0 only if the
    peers agree AND agree on the true average.
    """
    n = len(x0)
    assert mixing.shape == (n, n)
    names = [f"peer{i}" for i in range(n)]
    xs = [x.detach().reshape(-1).to(torch.float32).clone() for x in x0]
    numel = xs[0].numel()
    true_mean = torch.stack(xs).to(torch.float64).mean(dim=0)

    def error() -> float:
        return sum(float((x.to(torch.float64) - true_mean).square().sum()) for x in xs) / n

    scale = error() or 1.0
    rows = [{names[j]: float(mixing[i, j]) for j in range(n) if mixing[i, j] != 0.0 and i != j} for i in range(n)]
    compressors = [make_compressor() for _ in range(n)]
    states = [flat_choco_state(compressors[i], xs[i], list(rows[i])) for i in range(n)]
    errors: list[float] = []
    for _ in range(rounds):
        if choco:
            sent = [state.compress_difference({"x": x}) for state, x in zip(states, xs, strict=True)]
            for state, row in zip(states, rows, strict=True):
                for name in row:
                    state.apply_update(name, sent[names.index(name)])
            for state, x, row in zip(states, xs, rows, strict=True):
                state.consensus_step([("x", x)], row, gamma)
        else:
            received = [
                c.decode(names[j], c.encode(names[j], x), (numel,), CPU)
                for j, (c, x) in enumerate(zip(compressors, xs, strict=True))
            ]
            mixed_xs = []
            for i in range(n):
                mixed = torch.zeros(numel)
                for j in range(n):
                    if mixing[i, j] != 0.0:
                        mixed.add_(xs[j] if i == j else received[j], alpha=float(mixing[i, j]))
                mixed_xs.append(mixed)
            xs = mixed_xs
        errors.append(error() / scale)
    return errors


def test_naive_compressed_gossip_does_not_reach_the_average() -> None:
    x0 = [randn(2000, seed=i) for i in range(8)]
    errors = simulate_gossip(x0, ring_mixing_matrix(8), 150, lambda: build_compressor("topk", ratio=0.01), choco=False)
    # Every round drops 99% of each neighbour's parameters: all peers decay towards zero, so
    # they "agree" far from the true mean (error ~ ||mean||^2 / initial spread = 1/7).
    assert min(errors[50:]) > 0.1


def test_choco_gossip_with_top1_percent_converges_geometrically() -> None:
    x0 = [randn(2000, seed=i) for i in range(8)]
    rounds = 450
    errors = simulate_gossip(
        x0,
        ring_mixing_matrix(8),
        rounds,
        lambda: build_compressor("topk", ratio=0.01),
        choco=True,
        gamma=CHOCO_GAMMA,
    )
    assert errors[-1] < 1e-2
    # Linear convergence: log-error falls by a steady slope over the tail.
    log_errors = np.log(errors)
    window = 50
    slopes = [(log_errors[t + window] - log_errors[t]) / window for t in range(150, rounds - window, window)]
    assert max(slopes) < -0.005
    assert max(slopes) - min(slopes) < 0.5 * abs(float(np.mean(slopes)))


def test_choco_keeps_the_mean_and_public_copies_agree() -> None:
    n, numel = 4, 300
    names = [f"p{i}" for i in range(n)]
    xs = [randn(numel, seed=i) for i in range(n)]
    mean = torch.stack(xs).double().mean(dim=0)
    neighbours = {name: [names[(i - 1) % n], names[(i + 1) % n]] for i, name in enumerate(names)}
    # Ring of 4: the same weight (1/3) to self and each side; the self term cancels in CHOCO.
    states = {
        name: flat_choco_state(build_compressor("int8", chunk=64), x, neighbours[name])
        for name, x in zip(names, xs, strict=True)
    }
    for _ in range(5):
        sent = {name: states[name].compress_difference({"x": x}) for name, x in zip(names, xs, strict=True)}
        for name in names:
            for other in neighbours[name]:
                states[name].apply_update(other, sent[other])
        for name, x in zip(names, xs, strict=True):
            states[name].consensus_step([("x", x)], dict.fromkeys(neighbours[name], 1.0 / 3.0), 0.5)
    # Everyone's copy of p1 is p1's own, bit for bit.
    for holder in neighbours["p1"]:
        assert torch.equal(states[holder].public("p1")["x"], states["p1"].public_self["x"])
    assert torch.allclose(torch.stack(xs).double().mean(dim=0), mean, atol=1e-5)
    with pytest.raises(KeyError):
        states["p0"].apply_update("p2", sent["p2"])


def test_a_full_copy_resyncs_a_public_copy_that_missed_an_update() -> None:
    x = randn(500, seed=1)
    sender = flat_choco_state(build_compressor("topk", ratio=0.05), x, ["r"])
    receiver = flat_choco_state(build_compressor("topk", ratio=0.05), randn(500, seed=2), ["s"])
    receiver.apply_update("s", sender.compress_difference({"x": x}))
    sender.compress_difference({"x": x * 2})  # lost on the way: the receiver's copy is now behind
    assert not torch.equal(receiver.public("s")["x"], sender.public_self["x"])
    receiver.set_public("s", sender.public_self)
    receiver.apply_update("s", sender.compress_difference({"x": x * 3}))
    assert torch.equal(receiver.public("s")["x"], sender.public_self["x"])
    receiver.drop("s")
    assert receiver.neighbours == frozenset()


# --------------------------------------------------------------------------- properties


shapes = st.lists(st.integers(min_value=0, max_value=40), min_size=0, max_size=3).map(tuple)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, seed=st.integers(0, 2**16), magnitude=st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e4, 1e6]))
def test_random_tensors_roundtrip_finite(
    kind: CompressorKind, shape: tuple[int, ...], seed: int, magnitude: float
) -> None:
    compressor = build_compressor(kind, ratio=0.1, rank=3, chunk=16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * magnitude
    feedback = ErrorFeedback(compressor)
    for _ in range(2):  # a second call exercises warm starts and residuals
        parts = feedback.compress("w", x)
        assert {suffix: TensorSpec.of_tensor(part) for suffix, part in parts.items()} == compressor.wire_specs(shape)
        decoded = compressor.decode("w", parts, shape, CPU)
        assert decoded.shape == x.shape
        assert bool(torch.isfinite(decoded).all())
