"""The exact average in pieces (``strategy.pipeline``): sub-rounds at once, reduced as they arrive.

Hermetic: the layout tiles the vector exactly (every piece but the last a multiple of the group
size, so no chunk reaches into the next piece), the config refuses what pieces cannot be combined
with, a frame of a piece outside the layout is refused, and in-process peers over a loopback hub
end bit-identical to the whole-vector path for gradients (bound views and rebound gradients)
and for DiLoCo's parameter rounds, with each piece's frames on the wire.

Slow: real peers with pieces end bit-identical to DDP (2 peers), and the exact fault path
(a SIGKILL after a reduce-scatter, one after an all-gather) still ends with one model.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import test_allreduce_overlap as overlap
import test_allreduce_parity as parity
import test_exact_faults as faults
import torch
from helpers import PeerProcesses, assert_finished

from p2pdl.config import config_from_mapping
from p2pdl.config.sections import OVERLAP_MAX_BUCKETS, StrategyConfig
from p2pdl.core.mixing import exact_mean
from p2pdl.errors import FrameSchemaError
from p2pdl.strategies.buckets import is_view, piece_layout

# ---------------------------------------------------------------------------- hermetic


@pytest.mark.parametrize("total", [1, 7, 5210, 11_172_306])
@pytest.mark.parametrize("pieces", [1, 2, 3, 6])
@pytest.mark.parametrize("members", [2, 3, 4, 8])
def test_the_pieces_tile_the_vector_and_no_chunk_crosses_into_the_next_piece(
    total: int, pieces: int, members: int
) -> None:
    layout = piece_layout(total, pieces, members)
    assert 1 <= len(layout) <= pieces
    end = 0
    for index, (start, length, chunk) in enumerate(layout):
        assert start == end and length > 0
        assert chunk * members >= length  # the chunks cover the piece
        if index < len(layout) - 1:
            assert chunk * members == length  # exactly: the last chunk ends where the next piece starts
        end = start + length
    assert end == total
    # The last chunk of the last piece runs at most members - 1 elements into the padding.
    start, length, chunk = layout[-1]
    assert start + chunk * members - total < members
    # PROTOCOL.md §6, exactly: L = n ceil(ceil(total / P) / n), piece k = [kL, min((k + 1)L, total)).
    if pieces > 1:
        span = members * math.ceil(math.ceil(total / pieces) / members)
        ends = [(k * span, min(span, total - k * span)) for k in range(math.ceil(total / span))]
        assert layout == [(start, length, math.ceil(length / members)) for start, length in ends]


def test_one_piece_is_the_whole_vector() -> None:
    assert piece_layout(5210, 1, 3) == [(0, 5210, 1737)]
    assert piece_layout(10, 4, 8) == [(0, 8, 1), (8, 2, 1)]  # fewer pieces than asked


@pytest.mark.parametrize(
    ("strategy", "sections", "fragment"),
    [
        ({"kind": "allreduce", "pipeline": 0}, {}, "strategy.pipeline must be in [1, 6]"),
        ({"kind": "allreduce", "pipeline": OVERLAP_MAX_BUCKETS + 1}, {}, "strategy.pipeline must be in"),
        ({"kind": "gossip", "pipeline": 2}, {}, "strategy.pipeline > 1 applies to kind = 'allreduce'"),
        ({"kind": "allreduce", "pipeline": 2, "overlap": True}, {}, "without strategy.overlap"),
        ({"kind": "allreduce", "pipeline": 2}, {"compression": {"kind": "int8"}}, "[compression]"),
        ({"kind": "allreduce", "pipeline": 4}, {"transport": {"inbox_frames": 9}}, "transport.inbox_frames >= 10"),
    ],
)
def test_pipeline_refuses_what_it_cannot_combine_with(
    strategy: dict[str, object], sections: dict[str, dict[str, object]], fragment: str
) -> None:
    problems = overlap._problems(strategy, **sections)
    assert any(fragment in p for p in problems), problems


def test_pipeline_defaults_to_one_piece_and_loads() -> None:
    data: dict[str, Any] = {
        "run": {"workload": overlap.WORKLOAD},
        "peers": [{"name": f"p{i}", "address": f"127.0.0.1:{29700 + i}"} for i in range(2)],
        "strategy": {"kind": "allreduce"},
    }
    assert config_from_mapping(data).strategy.pipeline == 1
    data["strategy"] = {"kind": "allreduce", "local_steps": 4, "outer": "diloco", "pipeline": 3}
    assert config_from_mapping(data).strategy.pipeline == 3


async def test_frames_outside_the_layout_are_refused() -> None:
    names = ["p0", "p1", "p2"]
    _, strategies = overlap._peers(names, StrategyConfig(kind="allreduce", round_timeout=5.0, pipeline=3))
    try:
        strategy = strategies[0]
        total = strategy._total
        for members in (3, 4096):
            layout = piece_layout(total, 3, members)
            for k, (_, _, chunk) in enumerate(layout):
                for prefix in ("rs", "ag"):
                    assert strategy.expected_tensors(f"{prefix}{members}_{k}", "p1")["chunk"].shape == (chunk,)
            with pytest.raises(FrameSchemaError):
                strategy.expected_tensors(f"rs{members}_{len(layout)}", "p1")
        assert len(piece_layout(total, 3, 4096)) == 2  # fewer pieces than asked: rs4096_2 is outside
        for kind in ("ag3_9", "rs3", "ag3", "rs3_01", "rs1_0", "rs4097_0"):
            with pytest.raises(FrameSchemaError):
                strategy.expected_tensors(kind, "p1")
    finally:
        for s in strategies:
            await s.close()


# ---------------------------------------------------------------------------- in-process rounds


def _record_kinds(exchange: Any) -> set[str]:
    """Wrap ``exchange.broadcast`` so that the data kinds it sends are recorded in the returned set."""
    kinds: set[str] = set()
    send = exchange.broadcast

    async def broadcast(frame: Any, neighbors: Any) -> dict[str, Any]:
        kinds.add(frame.kind)
        return dict(await send(frame, neighbors))

    exchange.broadcast = broadcast
    return kinds


async def _gradient_round(
    names: list[str], pipeline: int, *, rebind: bool, padding: float = 0.0
) -> list[list[torch.Tensor]]:
    """One H = 1 round; the peers' averaged gradients. ``padding``: what each peer's flat vector
    holds past its end before the round (as if a member had sent non-zero padding); it is zero
    after the round either way."""
    config = StrategyConfig(kind="allreduce", round_timeout=5.0, pipeline=pipeline)
    models, strategies = overlap._peers(names, config)
    sent = [_record_kinds(strategy._ctx.exchange) for strategy in strategies]

    async def peer(index: int) -> None:
        model, strategy = models[index], strategies[index]
        model.zero_grad(set_to_none=True)
        strategy.before_backward(0)
        model(overlap._inputs(index)).pow(2).mean().backward()
        if rebind:
            for p in model.parameters():
                p.grad = p.grad.clone()  # type: ignore[union-attr]
        flat = strategy._rounds.flat
        assert flat is not None
        flat.local[strategy._total :].fill_(padding)
        result_buffer = flat.averaged.data_ptr()
        outcome = await strategy.reduce_gradients(0)
        assert outcome is not None and not outcome.missing
        # Applied without a copy: the gradients are now views of the buffer the result was assembled
        # in, which is the next round's flat vector; the old flat vector is the next averaged buffer.
        assert flat.local.data_ptr() == result_buffer
        assert all(is_view(p.grad, v) for p, v in zip(model.parameters(), flat.local_views or [], strict=True))
        # The views path: backward's gradients, or (rebound) copied in once and bound again.
        assert flat.grads_are_views
        applied = len(strategy._rounds.layout(len(names)))
        assert strategy.status()["pipeline"] == {"pieces": pipeline, "pieces_applied": applied}
        assert not flat.local[strategy._total :].any()  # the padding this peer sends next

    try:
        await asyncio.gather(*(peer(i) for i in range(len(names))))
    finally:
        for strategy in strategies:
            await strategy.close()
    size = len(names)
    expected_kinds = (
        {f"rs{size}", f"ag{size}"}
        if pipeline == 1
        else {f"{prefix}{size}_{k}" for prefix in ("rs", "ag") for k in range(pipeline)}
    )
    assert all(kinds - {"xg"} == expected_kinds for kinds in sent), sent
    return [[p.grad.clone() for p in model.parameters()] for model in models]  # type: ignore[union-attr]


@pytest.mark.parametrize("peers", [2, 3])
@pytest.mark.parametrize("rebind", [False, True], ids=["views", "rebound"])
async def test_gradient_rounds_in_pieces_are_bit_identical_to_the_whole_vector(peers: int, rebind: bool) -> None:
    names = [f"p{i}" for i in range(peers)]
    whole = await _gradient_round(names, 1, rebind=rebind)
    pieces = await _gradient_round(names, 3, rebind=rebind)
    local = []
    for index in range(peers):
        model = overlap._mlp(0)
        model(overlap._inputs(index)).pow(2).mean().backward()
        local.append([p.grad for p in model.parameters()])
    expected = [exact_mean([g[k] for g in local], torch.empty_like(local[0][k])) for k in range(len(local[0]))]
    for grads in [*whole, *pieces]:
        for got, want in zip(grads, expected, strict=True):
            assert torch.equal(got, want)


async def _diloco_rounds(names: list[str], pipeline: int) -> list[list[torch.Tensor]]:
    """Two DiLoCo outer rounds (H = 2) on in-process peers training on different data; their parameters."""
    config = StrategyConfig(kind="allreduce", round_timeout=5.0, local_steps=2, outer="diloco", pipeline=pipeline)
    models, strategies = overlap._peers(names, config)
    sent = [_record_kinds(strategy._ctx.exchange) for strategy in strategies]

    async def peer(index: int) -> None:
        model, strategy = models[index], strategies[index]
        for step in range(4):
            model.zero_grad(set_to_none=True)
            model(overlap._inputs(10 * step + index)).pow(2).mean().backward()
            strategy._ctx.optimizer.step()
            await strategy.after_optimizer_step(step)
        assert strategy._rounds.flat is not None
        assert not strategy._rounds.flat.grads_are_views  # parameter rounds: written back through write_back

    try:
        await asyncio.gather(*(peer(i) for i in range(len(names))))
    finally:
        for strategy in strategies:
            await strategy.close()
    data_kinds = {"rs3", "ag3"} if pipeline == 1 else {f"{x}3_{k}" for x in ("rs", "ag") for k in range(pipeline)}
    assert all(kinds - {"xg"} == data_kinds for kinds in sent), sent
    return [[p.detach().clone() for p in model.parameters()] for model in models]


async def test_diloco_parameter_rounds_in_pieces_are_bit_identical_to_the_whole_vector() -> None:
    names = ["p0", "p1", "p2"]
    whole = await _diloco_rounds(names, 1)
    pieces = await _diloco_rounds(names, 4)
    for params in [*whole[1:], *pieces]:
        for got, want in zip(params, whole[0], strict=True):
            assert torch.equal(got, want)
    assert any(not torch.equal(p, q) for p, q in zip(whole[0], overlap._mlp(0).parameters(), strict=True))


# ---------------------------------------------------------------------------- real peers


PIPELINE = {"pipeline": 3}


@pytest.mark.slow
@pytest.mark.timeout(2 * overlap.PROCESS_TIMEOUT + 60)
def test_allreduce_in_pieces_matches_ddp(
    tmp_path: Path, peer_processes: PeerProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks: gloo sums them in one order, so p2pdl in pieces matches DDP bit for bit."""
    monkeypatch.setattr(parity, "PROCESS_TIMEOUT", overlap.PROCESS_TIMEOUT)
    swarm, ddp_out = overlap.swarm_and_ddp(tmp_path, peer_processes, ["p0", "p1"], PIPELINE)
    for folder in swarm:
        pipeline = assert_finished(folder, parity.STEPS)["strategy_status"]["pipeline"]
        assert pipeline == {"pieces": 3, "pieces_applied": 3 * parity.STEPS}, pipeline
    models = [parity._load(d / "model.pt") for d in swarm]
    ddp = parity._load(ddp_out / "rank0" / "model.pt")
    for key in models[0]:
        assert torch.equal(models[1][key], models[0][key]), key
        assert torch.equal(models[0][key], ddp[key]), key


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("mnist1d_built")
def test_allreduce_in_pieces_redoes_around_a_sigkill_in_each_phase(tmp_path: Path) -> None:
    """test_exact_faults' two-kill case with pieces: a peer dies with its first piece's reduce-scatter
    out, another with its first piece's all-gather out and the others' pieces in flight."""
    strategy = {**faults.STRATEGIES["allreduce"], "round_timeout": faults.ROUND_TIMEOUT, **PIPELINE}
    procs = PeerProcesses(tmp_path)
    try:
        faults.test_a_sigkill_in_a_reduce_scatter_and_one_in_an_all_gather_are_redone_around_without_a_lost_step(
            tmp_path, procs, strategy
        )
    finally:
        procs.close()
    for name in ("p0", "p1"):
        pipeline = assert_finished(tmp_path / name, 160)["strategy_status"]["pipeline"]
        assert pipeline["pieces"] == 3 and pipeline["pieces_applied"] >= 3 * 100, pipeline


@pytest.mark.parametrize("pipeline", [1, 3])
async def test_the_padding_a_peer_sends_is_zero_after_every_swap(pipeline: int) -> None:
    """The last chunk reaches past the vector, and its mean of the members' padding lands in the
    buffer that becomes the flat vector: whatever the members' padding held, the padding this peer
    sends next is zero again (asserted in _gradient_round)."""
    names = ["p0", "p1", "p2"]
    total = sum(p.numel() for p in overlap._mlp(0).parameters())
    last = piece_layout(total, pipeline, len(names))[-1]
    assert last[0] + last[2] * len(names) > total  # the last chunk does reach past the end
    await _gradient_round(names, pipeline, rebind=False, padding=1.0)
