"""The strategy layer without a network: the registry, the shared base, and DiLoCo's outer step.

A fake exchange stands in for the transport: the test delivers frames, ``collect`` hands back
those of the asked round, and sends are recorded. The outer step is checked bit for bit against
:class:`~p2pdl.core.outer.OuterOptimizer` run by hand on the same averaged parameters, which is
what the node used to do and what the strategy must now do on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

import pytest
import torch

from p2pdl.config import CompressionConfig, StrategyConfig
from p2pdl.core.mixing import mix_into
from p2pdl.core.outer import OuterOptimizer
from p2pdl.core.topology import Graph, build_graph
from p2pdl.errors import AllReduceIncompleteError, FrameSchemaError
from p2pdl.strategies import build_strategy
from p2pdl.strategies.allreduce import AllReduceConfig, AllReduceStrategy
from p2pdl.strategies.async_gossip import AsyncGossipConfig, AsyncGossipStrategy
from p2pdl.strategies.base import OuterConfig, RoundLedger, StrategyBase, StrategyContext
from p2pdl.strategies.choco import ChocoConfig, ChocoGossipStrategy
from p2pdl.strategies.gossip import PARAMS, GossipConfig, GossipStrategy
from p2pdl.strategies.ps import GRADIENT, PARAMETERS, ParameterServerConfig
from p2pdl.strategies.ps_server import ParameterServer
from p2pdl.strategies.ps_worker import ParameterServerWorker
from p2pdl.strategies.pushsum import PushSumConfig, PushSumStrategy
from p2pdl.wire import Frame


class FakeExchange:
    def __init__(self) -> None:
        self.inbox: list[Frame] = []
        self.sent: list[tuple[str, Frame]] = []

    async def encode(self, frame: Frame) -> bytes:
        return b""

    async def send_encoded(self, neighbor: str, data: bytes) -> None:
        return None

    async def broadcast(self, frame: Frame, neighbors: Collection[str]) -> dict[str, Any]:
        self.sent.extend((n, frame) for n in neighbors)
        return {}

    async def collect(self, kind: str, round_index: int, senders: Collection[str], timeout: float) -> dict[str, Frame]:
        return {f.sender: f for f in self.inbox if f.kind == kind and f.round == round_index and f.sender in senders}

    def advance(self, kind: str, floor: int) -> None:
        self.inbox = [f for f in self.inbox if f.kind != kind or f.round >= floor]

    def highest_round(self, kind: str, senders: Collection[str]) -> int | None:
        return None

    def take_latest(self, kind: str, sender: str) -> Frame | None:
        return None

    async def wait_for_senders(self, kind: str, senders: Collection[str], count: int, timeout: float) -> set[str]:
        return set()

    def is_connected(self, neighbor: str) -> bool:
        return True


def make_context(
    name: str,
    graph: Graph,
    config: StrategyConfig,
    *,
    seed: int = 0,
    compression: CompressionConfig | None = None,
) -> tuple[StrategyContext, torch.nn.Module, FakeExchange]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    exchange = FakeExchange()

    async def run_compute(fn: Callable[[], Any]) -> Any:
        return fn()

    ctx = StrategyContext(
        name=name,
        topology=lambda: graph,
        parameters=tuple(model.named_parameters()),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        configured=graph.names,
        device=torch.device("cpu"),
        exchange=exchange,
        run_compute=run_compute,
        config=config,
        ledger=RoundLedger(),
        compression=compression or CompressionConfig(),
    )
    return ctx, model, exchange


def params_frame(sender: str, round_index: int, model: torch.nn.Module) -> Frame:
    return Frame(
        kind=PARAMS,
        sender=sender,
        round=round_index,
        step=round_index,
        meta={"degree": 1},
        tensors={n: p.detach().clone() for n, p in model.named_parameters()},
    )


def local_step(model: torch.nn.Module, amount: float) -> None:
    """Stands in for an optimizer step: moves every parameter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


DILOCO = {"outer": "diloco", "outer_lr": 0.7, "outer_momentum": 0.9}

# --------------------------------------------------------------------------- the registry


def test_the_registry_builds_each_kind_and_each_ps_role() -> None:
    graph = build_graph("full", ["s", "w"])
    expected: list[tuple[StrategyConfig, str, type]] = [
        (StrategyConfig(kind="gossip"), "s", GossipStrategy),
        (StrategyConfig(kind="allreduce"), "s", AllReduceStrategy),
        (StrategyConfig(kind="async-gossip"), "s", AsyncGossipStrategy),
        (StrategyConfig(kind="push-sum"), "s", PushSumStrategy),
        (StrategyConfig(kind="ps", server="s"), "s", ParameterServer),
        (StrategyConfig(kind="ps", server="s"), "w", ParameterServerWorker),
    ]
    for config, name, cls in expected:
        ctx, _, _ = make_context(name, graph, config)
        strategy = build_strategy(ctx)
        assert type(strategy) is cls
        assert isinstance(strategy, StrategyBase)
        assert strategy.status()["kind"] == config.kind
    int8 = CompressionConfig(kind="int8")
    compressed, _, _ = make_context("s", graph, StrategyConfig(kind="gossip"), compression=int8)
    assert type(build_strategy(compressed)) is ChocoGossipStrategy


def test_the_ps_roles_take_only_their_own_frames() -> None:
    graph = build_graph("full", ["s", "w1", "w2"])
    server_ctx, _, _ = make_context("s", graph, StrategyConfig(kind="ps", server="s"))
    worker_ctx, _, _ = make_context("w1", graph, StrategyConfig(kind="ps", server="s"))
    server, worker = ParameterServer(server_ctx), ParameterServerWorker(worker_ctx)
    assert set(server.expected_tensors(GRADIENT, "w1")) == {"weight", "bias"}
    assert set(worker.expected_tensors(PARAMETERS, "s")) == {"weight", "bias"}
    with pytest.raises(FrameSchemaError, match="ps server"):
        server.expected_tensors(PARAMETERS, "w1")
    with pytest.raises(FrameSchemaError, match="ps worker"):
        worker.expected_tensors(PARAMETERS, "w2")  # parameters from a peer that is not the server
    assert server.communication_peers() == ("w1", "w2")
    assert worker.communication_peers() == ("s",)
    assert server.status()["role"] == "server" and worker.status()["role"] == "worker"


# --------------------------------------------------------------------------- DiLoCo, owned by the strategy


async def test_gossip_with_diloco_takes_the_outer_step_after_each_round_and_only_then() -> None:
    graph = build_graph("full", ["a", "b"])
    ctx, model, exchange = make_context("a", graph, StrategyConfig(kind="gossip", local_steps=2, **DILOCO))
    _, neighbour, _ = make_context("b", graph, StrategyConfig(kind="gossip"), seed=1)
    strategy = GossipStrategy(ctx)
    reference = [p.detach().clone() for p in model.parameters()]
    outer = OuterOptimizer(reference, lr=0.7, momentum=0.9)
    for step in range(4):
        local_step(model, 0.01 * (step + 1))
        for p in reference:
            p.add_(0.01 * (step + 1))
        if step % 2 == 1:
            exchange.inbox.append(params_frame("b", step // 2, neighbour))
        outcome = await strategy.after_optimizer_step(step)
        if step % 2 == 0:
            assert outcome is None  # a local step: no round, no outer step
        else:
            assert outcome is not None and outcome.complete
            mix_into(reference, 0.5, [(0.5, [p.detach() for p in neighbour.parameters()])])
            outer.step()
        for actual, expected in zip(model.parameters(), reference, strict=True):
            assert torch.equal(actual.detach(), expected)
    assert strategy.status()["outer_steps"] == outer.steps == 2


async def test_allreduce_local_sgd_with_diloco_steps_the_outer_optimizer() -> None:
    graph = build_graph("full", ["a"])  # alone: the average is its own parameters
    ctx, model, _ = make_context("a", graph, StrategyConfig(kind="allreduce", local_steps=3, **DILOCO))
    strategy = AllReduceStrategy(ctx)
    reference = [p.detach().clone() for p in model.parameters()]
    outer = OuterOptimizer(reference, lr=0.7, momentum=0.9)
    for step in range(6):
        assert await strategy.reduce_gradients(step) is None  # H > 1: parameters, not gradients
        local_step(model, -0.02)
        for p in reference:
            p.add_(-0.02)
        if await strategy.after_optimizer_step(step) is not None:
            outer.step()
    assert outer.steps == 2
    for actual, expected in zip(model.parameters(), reference, strict=True):
        assert torch.equal(actual.detach(), expected)


async def test_a_state_transfer_makes_the_new_model_the_anchor() -> None:
    graph = build_graph("full", ["a", "b"])
    ctx, model, exchange = make_context("a", graph, StrategyConfig(kind="gossip", **DILOCO))
    strategy = GossipStrategy(ctx)
    _, donor, _ = make_context("b", graph, StrategyConfig(kind="gossip"), seed=1)
    with torch.no_grad():
        for p, q in zip(model.parameters(), donor.parameters(), strict=True):
            p.copy_(q)  # what a state transfer does to the model
    strategy.state_replaced()
    exchange.inbox.append(params_frame("b", 0, donor))
    await strategy.after_optimizer_step(0)
    # The average is the donor's model, and so is the anchor: no pseudo-gradient, no move.
    for actual, expected in zip(model.parameters(), donor.parameters(), strict=True):
        assert torch.equal(actual.detach(), expected.detach())


async def test_without_diloco_a_round_is_the_plain_average() -> None:
    graph = build_graph("full", ["a", "b"])
    ctx, model, exchange = make_context("a", graph, StrategyConfig(kind="gossip"))
    _, neighbour, _ = make_context("b", graph, StrategyConfig(kind="gossip"), seed=1)
    strategy = GossipStrategy(ctx)
    expected = [p.detach().clone() for p in model.parameters()]
    mix_into(expected, 0.5, [(0.5, [p.detach() for p in neighbour.parameters()])])
    exchange.inbox.append(params_frame("b", 0, neighbour))
    await strategy.after_optimizer_step(0)
    for actual, value in zip(model.parameters(), expected, strict=True):
        assert torch.equal(actual.detach(), value)
    assert "outer_steps" not in strategy.status()


# --------------------------------------------------------------------------- config beside each strategy


def test_each_strategy_config_reads_only_keys_of_the_strategy_table() -> None:
    table_keys = {f.name for f in dataclasses.fields(StrategyConfig)}
    table = StrategyConfig(kind="async-gossip", local_steps=3, round_timeout=2.5, max_staleness=7, max_lead=1)
    for config_class in (
        GossipConfig,
        AllReduceConfig,
        AsyncGossipConfig,
        PushSumConfig,
        ChocoConfig,
        ParameterServerConfig,
        OuterConfig,
    ):
        keys = {f.name for f in dataclasses.fields(config_class)}
        assert keys <= table_keys, keys - table_keys
        built = config_class.from_table(table)
        assert all(getattr(built, key) == getattr(table, key) for key in keys)
    assert "robust" not in {f.name for f in dataclasses.fields(AsyncGossipConfig)}  # only what it reads
    graph = build_graph("full", ["a", "b"])
    ctx, _, _ = make_context("a", graph, table)
    assert AsyncGossipStrategy(ctx).config == AsyncGossipConfig(
        local_steps=3, round_timeout=2.5, max_staleness=7, max_lead=1
    )


async def test_an_allreduce_contribution_tagged_with_another_group_is_missing_not_a_crash() -> None:
    # b proposed the same epoch with another member list (a conflicting proposal): its chunk has
    # the right size but the wrong group, so it is never averaged in; strict mode then gives up.
    graph = build_graph("full", ["a", "b"])
    ctx, _, exchange = make_context(
        "a", graph, StrategyConfig(kind="allreduce", on_failure="strict", round_timeout=0.2)
    )
    strategy = AllReduceStrategy(ctx)
    meta = {"xr": 0, "epoch": 0, "group": "b,a", "prev": -1, "phase": "rs"}
    exchange.inbox.append(Frame(kind="rs2", sender="b", round=0, step=0, meta=meta, tensors={"chunk": torch.zeros(5)}))
    with pytest.raises(AllReduceIncompleteError) as info:
        await strategy.reduce_gradients(0)
    assert info.value.missing == ("b",)
    assert ctx.ledger.partial == 1
