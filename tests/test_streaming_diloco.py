"""Streaming DiLoCo: the fragment schedule, block quantization, the config and a real swarm.

The schedule must sync every parameter exactly once per outer period (the issue's invariant);
quantization must stay within half a step of each block's scale for every length and range;
and a swarm of real peer processes on 127.0.0.1 must finish every step and, after the final
full sync that ends a run, hold bit-identical parameters on every peer.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import torch
from helpers import assert_identical_models, free_ports, read_json, run_cluster, write_config

from p2pdl import Peer
from p2pdl.config import Config, StrategyConfig, config_from_mapping
from p2pdl.core.fragments import FragmentOuter, FragmentSchedule, split_fragments
from p2pdl.core.outer import OuterOptimizer
from p2pdl.core.quantize import Quantized, dequantize, error_bound, payload_numel, quantize
from p2pdl.errors import ConfigError
from p2pdl.strategies.streaming import StreamingDiLoCoStrategy
from p2pdl.wire import Frame, encode_frame

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"

# ------------------------------------------------------------------ fragments and their schedule


@pytest.mark.parametrize(
    ("local_steps", "fragments", "overlap"), [(8, 4, 2), (10, 3, 1), (5, 5, 4), (7, 1, 0), (12, 5, 11)]
)
def test_fragment_schedule_covers_every_parameter_exactly_once_per_outer_period(
    local_steps: int, fragments: int, overlap: int
) -> None:
    generator = torch.Generator().manual_seed(local_steps * 100 + fragments)
    sizes = [int(s) for s in torch.randint(1, 5000, (fragments * 3 + 2,), generator=generator)]
    ranges = split_fragments(sizes, fragments)
    schedule = FragmentSchedule(local_steps, fragments, overlap)
    # The fragments partition the parameters, in order, none empty.
    assert [i for r in ranges for i in r] == list(range(len(sizes)))
    assert all(len(r) > 0 for r in ranges)
    # Any H consecutive steps send every fragment exactly once, so every parameter exactly once.
    for first in range(1, 4 * local_steps):
        window = range(first, first + local_steps)
        synced = [i for t in window for f in schedule.sends_after(t) for i in ranges[f]]
        assert sorted(synced) == list(range(len(sizes))), (first, synced)
        # Each send is applied exactly tau steps later, never twice.
        for t in window:
            assert schedule.applies_after(t + overlap) == schedule.sends_after(t)
    # Distinct offsets: never two fragments after one step; nothing before the first step.
    assert all(len(schedule.sends_after(t)) <= 1 for t in range(1, 5 * local_steps))
    assert schedule.sends_after(0) == () and schedule.applies_after(overlap) == ()


def test_fragments_are_balanced_by_size() -> None:
    assert [len(r) for r in split_fragments([10] * 12, 4)] == [3, 3, 3, 3]
    sizes = [1000, 10, 10, 10, 500, 500, 1000, 20, 20, 1000]
    ranges = split_fragments(sizes, 3)
    totals = [sum(sizes[i] for i in r) for r in ranges]
    # Each cut sits at the tensor boundary nearest its share: off by at most one tensor's size.
    assert max(totals) - sum(sizes) / 3 <= max(sizes)
    assert split_fragments([0, 0, 7], 3) == [range(0, 1), range(1, 2), range(2, 3)]


@pytest.mark.parametrize(("sizes", "count"), [([1, 2], 3), ([5], 0), ([1, -1], 1)])
def test_fragment_split_refuses_what_cannot_be_cut(sizes: list[int], count: int) -> None:
    with pytest.raises(ValueError):
        split_fragments(sizes, count)


@pytest.mark.parametrize(
    ("local_steps", "fragments", "overlap"), [(4, 5, 0), (4, 0, 0), (4, 2, 4), (4, 2, -1), (0, 1, 0)]
)
def test_fragment_schedule_refuses_overlapping_periods(local_steps: int, fragments: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        FragmentSchedule(local_steps, fragments, overlap)


def test_fragment_outer_step_is_diloco_s_outer_step_and_merge_mixes_with_alpha() -> None:
    torch.manual_seed(0)
    params = [torch.randn(3, 4), torch.randn(5)]
    reference = [p.clone() for p in params]
    fragment = FragmentOuter(params, lr=0.7, momentum=0.9)
    outer = OuterOptimizer(reference, lr=0.7, momentum=0.9)
    for _ in range(3):
        averaged = [p + 0.1 * torch.randn_like(p) for p in reference]  # what an exact sync produced
        delta = torch.cat([(a - x).reshape(-1) for a, x in zip(outer.anchor, averaged, strict=True)])
        outer.step(averaged)
        fragment.step(delta)
        torch.testing.assert_close(fragment.anchor, torch.cat([a.reshape(-1) for a in outer.anchor]))
    local = [p.clone() for p in params]
    fragment.merge(0.5)
    offset = 0
    for before, after in zip(local, params, strict=True):
        anchor = fragment.anchor[offset : offset + before.numel()].view_as(before)
        offset += before.numel()
        torch.testing.assert_close(after, 0.5 * before + 0.5 * anchor)
    fragment.merge(0.0)
    assert torch.equal(torch.cat([p.reshape(-1) for p in params]), fragment.anchor)
    with pytest.raises(ValueError, match="not finite"):
        fragment.step(torch.full((fragment.numel,), float("nan")))
    # The final sync's plain average: anchor - mean(anchor - x_i) is the mean of the replicas.
    replicas = [fragment.anchor + torch.randn(fragment.numel) for _ in range(3)]
    mean_gradient = torch.stack([fragment.anchor - x for x in replicas]).mean(dim=0)
    fragment.average(mean_gradient)
    torch.testing.assert_close(fragment.anchor, torch.stack(replicas).mean(dim=0))


# ------------------------------------------------------------------ quantization


def _cases() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mixed = torch.randn(1001, generator=generator)
    mixed[:128] *= 1e-6  # a block far smaller than the next: its own scale keeps it
    mixed[500] = 300.0  # one outlier only spoils its own block
    return [
        torch.randn(1, generator=generator),
        torch.randn(127, generator=generator),
        torch.randn(129, generator=generator),
        torch.randn(4096, generator=generator) * 1e-3,
        mixed,
        torch.zeros(300),
        torch.full((257,), 1e-42),  # subnormal: the step underflows
        torch.full((33,), -1e-30),
    ]


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("block", [128, 256, 2])
def test_quantize_round_trip_stays_within_half_a_step_of_each_block(kind: str, block: int) -> None:
    for values in _cases():
        quantized = quantize(values, kind, block)  # type: ignore[arg-type]
        codes, scales = payload_numel(kind, values.numel(), block)  # type: ignore[arg-type]
        assert quantized.codes.shape == (codes,) and quantized.scales.shape == (scales,)
        decoded = dequantize(quantized)
        assert decoded.shape == (values.numel(),) and decoded.dtype == torch.float32
        error = (decoded - values).abs()
        bound = error_bound(values, kind, block)  # type: ignore[arg-type]
        assert bool((error <= bound).all()), (kind, block, values.numel(), float((error - bound).max()))
        assert bool((decoded[values == 0] == 0).all())  # zeros are exact
        # The same input always gives the same bits: every peer decodes the same average.
        again = quantize(values.clone(), kind, block)  # type: ignore[arg-type]
        assert torch.equal(again.codes, quantized.codes) and torch.equal(again.scales, quantized.scales)


def test_quantize_error_is_relative_to_each_block_only() -> None:
    values = torch.cat([torch.full((128,), 1e-4), torch.full((128,), 1e4)])
    for kind, relative in (("int8", 1 / 254), ("int4", 1 / 14)):
        decoded = dequantize(quantize(values, kind, 128))  # type: ignore[arg-type]
        small = (decoded[:128] - 1e-4).abs().max()
        assert float(small) <= 1e-4 * relative * 1.001


def test_quantize_refuses_non_finite_values_and_bad_blocks() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([1.0, float("inf")]), "int8", 128)
    with pytest.raises(ValueError, match="even"):
        quantize(torch.ones(4), "int8", 3)


def test_dequantize_refuses_a_contribution_that_does_not_fit() -> None:
    good = quantize(torch.randn(300), "int4", 128)

    def bad(**changes: object) -> Quantized:
        fields = {
            "kind": good.kind,
            "block": good.block,
            "numel": good.numel,
            "codes": good.codes,
            "scales": good.scales,
        }
        return Quantized(**{**fields, **changes})  # type: ignore[arg-type]

    for broken, match in [
        (bad(codes=good.codes[:-1]), "codes"),
        (bad(codes=good.codes.to(torch.int8)), "codes"),
        (bad(scales=good.scales[:-1]), "scales"),
        (bad(scales=-good.scales), ">= 0"),
        (bad(scales=torch.full_like(good.scales, float("inf"))), "finite"),
        (bad(codes=torch.zeros_like(good.codes)), "outside"),  # nibble 0 is code -8
        (bad(numel=good.numel + 200), "shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            dequantize(broken)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"local_steps": 4, "fragments": 5}, "strategy.fragments"),
        ({"local_steps": 4, "fragments": 0}, "strategy.fragments"),
        ({"local_steps": 4, "overlap_steps": 4}, "strategy.overlap_steps"),
        ({"local_steps": 8, "quant_block": 127}, "strategy.quant_block"),
        ({"local_steps": 8, "quant_block": 0}, "strategy.quant_block"),
        ({"local_steps": 8, "merge_alpha": 1.5}, "strategy.merge_alpha"),
        ({"local_steps": 8, "outer": "diloco"}, "strategy.outer"),
    ],
)
def test_config_refuses_bad_streaming_keys_by_name(table: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        StrategyConfig(kind="streaming-diloco", **table)  # type: ignore[arg-type]


def test_streaming_keys_are_refused_on_other_kinds() -> None:
    with pytest.raises(ConfigError, match=re.escape("strategy.fragments, strategy.merge_alpha apply only")):
        StrategyConfig(kind="allreduce", local_steps=8, fragments=2, merge_alpha=0.2)
    assert StrategyConfig(kind="streaming-diloco", local_steps=8, fragments=8, overlap_steps=7, outer_quant="int4")


# ------------------------------------------------------------------ a real swarm


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("mnist1d_built")
# int4 runs in the in-process two-peer test below; one swarm of processes covers the rest
@pytest.mark.parametrize(("peers", "quant", "overlap"), [(4, "int8", 2)])
def test_streaming_swarm_finishes_every_step_with_identical_parameters(
    tmp_path: Path, peers: int, quant: str, overlap: int
) -> None:
    names = [f"p{i}" for i in range(peers)]
    steps, local_steps, fragments = 60, 8, 4  # 60 is no multiple of 8: the final sync still ends it
    config = write_config(
        tmp_path / "swarm.toml",
        names=names,
        ports=free_ports(peers),
        run={"steps": steps, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
        strategy={
            "kind": "streaming-diloco",
            "local_steps": local_steps,
            "fragments": fragments,
            "overlap_steps": overlap,
            "outer_quant": quant,
            "outer_lr": 0.5,
            "outer_momentum": 0.5,
            "round_timeout": 20.0,
        },
        topology={"kind": "full"},
        membership={"suspect_after": 20.0, "dead_after": 40.0},
    )
    out = tmp_path / "run"
    summary = run_cluster(config, out)
    assert [p["steps"] for p in summary["peers"]] == [steps] * peers
    assert_identical_models(out / n for n in names)
    schedule = FragmentSchedule(local_steps, fragments, overlap)
    # Every due fragment landed (sends from steps 1..steps-1; the last step ends in the full sync).
    expected = sum(len(schedule.sends_after(t)) for t in range(1, steps))
    for name in names:
        state = read_json(out / name / "summary.json")["strategy_status"]
        assert state["kind"] == "streaming-diloco" and state["final_sync"], state
        assert state["fragment_syncs"] == expected, state
        assert state["in_flight"] == [] and state["bad_frames"] == 0, state
        assert state["payload_compression_ratio"] > (3.5 if quant == "int8" else 6.5), state
    assert min(p["test_accuracy"] for p in summary["peers"]) > 0.2  # it trained: chance is 0.1


def test_every_combination_of_small_periods_syncs_each_fragment_once() -> None:
    """Exhaustive over small H, F and tau: per period, each fragment sends once and lands once."""
    for local_steps in range(1, 9):
        for fragments, overlap in itertools.product(range(1, local_steps + 1), range(local_steps)):
            schedule = FragmentSchedule(local_steps, fragments, overlap)
            for first in range(1, 2 * local_steps + 1):
                sent = [f for t in range(first, first + local_steps) for f in schedule.sends_after(t)]
                landed = [
                    f for t in range(first + overlap, first + overlap + local_steps) for f in schedule.applies_after(t)
                ]
                assert sorted(sent) == sorted(landed) == list(range(fragments))


# ------------------------------------------------------------------ two in-process peers


def _two_peer_config(steps: int) -> Config:
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py"), "lr": 0.1, "momentum": 0.0, "steps": steps},
            "strategy": {
                "kind": "streaming-diloco",
                "local_steps": 4,
                "fragments": 2,
                "overlap_steps": 1,
                "outer_quant": "int4",
                "quant_block": 8,
                "outer_lr": 0.7,
                "outer_momentum": 0.9,
                "round_timeout": 5.0,
            },
            "topology": {"kind": "full"},
            "transport": {"startup_timeout": 10.0, "heartbeat_interval": 1.0},
            "peers": [{"name": "a", "address": "127.0.0.1:0"}, {"name": "b", "address": "127.0.0.1:0"}],
        }
    )


def _closure(model: torch.nn.Module, seed: int) -> Callable[[], torch.Tensor]:
    data = torch.Generator().manual_seed(seed)

    def closure() -> torch.Tensor:
        loss = model(torch.randn(8, 4, generator=data)).pow(2).mean()
        loss.backward()
        return loss

    return closure


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


async def test_two_peers_share_anchors_refuse_bad_fragments_and_end_identical() -> None:
    steps = 11  # sends after steps 2, 4, 6, 8, 10; the last step lands them and syncs everything
    config = _two_peer_config(steps)
    models = []
    for _ in range(2):
        torch.manual_seed(0)  # the same initial model on both peers, as a run builds it
        models.append(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)))
    b = Peer(config, "b", models[1], torch.optim.SGD(models[1].parameters(), lr=0.1))  # type: ignore[arg-type]
    port = await b.transport.start()
    a = Peer(  # type: ignore[arg-type]
        config, "a", models[0], torch.optim.SGD(models[0].parameters(), lr=0.1), bootstrap=(f"127.0.0.1:{port}",)
    )
    closures = [_closure(models[0], 1), _closure(models[1], 2)]
    try:
        await asyncio.gather(a.start(), b.start())
        strategies = [cast(StreamingDiLoCoStrategy, peer.strategy) for peer in (a, b)]
        # A fragment index the strategy does not have, and a fragment of the wrong size: refused.
        codes, scales = payload_numel("int4", strategies[0]._outers[0].numel, 8)
        for kind, tensors in (
            ("sd2", {"codes": torch.zeros(codes, dtype=torch.uint8), "scales": torch.zeros(scales)}),
            ("sd0", {"codes": torch.zeros(codes + 1, dtype=torch.uint8), "scales": torch.zeros(scales)}),
        ):
            frame = Frame(kind=kind, sender="a", round=2, step=2, meta={"group": "a,b"}, tensors=tensors)
            await a.transport.send_encoded("b", encode_frame(frame))
        for step in range(steps - 1):
            await asyncio.gather(a.step(closures[0]), b.step(closures[1]))
            # Anchors and outer momentum are the same bits on both peers after every step.
            for mine, theirs in zip(strategies[0]._outers, strategies[1]._outers, strict=True):
                assert torch.equal(mine.anchor, theirs.anchor), step
                assert torch.equal(mine.momentum_buffer, theirs.momentum_buffer), step
        assert not torch.equal(_flat(models[0]), _flat(models[1]))  # each kept half of its own
        assert [s.fragment_syncs for s in strategies] == [4, 4]
        assert [(f, sent) for f, (sent, *_) in strategies[0]._in_flight.items()] == [(1, 10)]  # lands at the end
        await asyncio.gather(a.step(closures[0]), b.step(closures[1]))
        assert torch.equal(_flat(models[0]), _flat(models[1]))  # the final sync: one model
        status = b.status()
        assert status["frames_rejected"]["by_reason"] == {"schema": 1, "shape": 1}, status["frames_rejected"]
        assert status["strategy"]["fragment_syncs"] == 5 and status["strategy"]["final_sync"]
    finally:
        await asyncio.gather(a.close(), b.close())
