"""The end-of-run and runaway rules of async-gossip and the async parameter server, without a network.

A fake exchange stands in for the transport: frames are delivered by the test (``deliver``), and
sends are recorded (decoded with the real wire codec, so what a neighbour would receive is checked).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import pytest
import torch

from p2pdl.config import StrategyConfig
from p2pdl.core.topology import Graph, build_graph
from p2pdl.strategies.async_gossip import ASYNC_PARAMS, AsyncGossipStrategy
from p2pdl.strategies.base import RoundLedger, StrategyContext
from p2pdl.strategies.ps import GRADIENT, PARAMETERS
from p2pdl.strategies.ps_server import ParameterServer
from p2pdl.strategies.ps_worker import ParameterServerWorker
from p2pdl.wire import Frame, Limits, decode_frame, encode_frame

LIMITS = Limits(max_frame_bytes=1 << 20, max_decompressed_bytes=1 << 20)


class FakeExchange:
    def __init__(self) -> None:
        self.inbox: dict[tuple[str, str], list[Frame]] = {}
        self.sent: list[tuple[str, Frame]] = []
        self.connected: set[str] = set()
        self.send_gate: dict[str, asyncio.Event] = {}  # a neighbour whose sends block until set
        self._arrival = asyncio.Event()

    def deliver(self, frame: Frame) -> None:
        self.inbox.setdefault((frame.kind, frame.sender), []).append(frame)
        self._arrival.set()

    async def encode(self, frame: Frame) -> bytes:
        return encode_frame(frame)

    async def send_encoded(self, neighbor: str, data: bytes) -> None:
        gate = self.send_gate.get(neighbor)
        if gate is not None:
            await gate.wait()
        self.sent.append((neighbor, decode_frame(data, limits=LIMITS)))

    async def broadcast(self, frame: Frame, neighbors: Collection[str]) -> dict[str, Any]:
        data = await self.encode(frame)
        for neighbor in neighbors:
            await self.send_encoded(neighbor, data)
        return {}

    async def collect(self, kind: str, round_index: int, senders: Collection[str], timeout: float) -> dict[str, Frame]:
        raise NotImplementedError

    def advance(self, kind: str, floor: int) -> None:
        raise NotImplementedError

    def highest_round(self, kind: str, senders: Collection[str]) -> int | None:
        raise NotImplementedError

    def take_latest(self, kind: str, sender: str) -> Frame | None:
        frames = self.inbox.pop((kind, sender), [])
        return max(frames, key=lambda f: f.round) if frames else None

    async def wait_for_senders(self, kind: str, senders: Collection[str], count: int, timeout: float) -> set[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._arrival.clear()
            ready = {s for s in senders if self.inbox.get((kind, s))}
            remaining = deadline - loop.time()
            if len(ready) >= count or remaining <= 0:
                return ready
            try:
                async with asyncio.timeout(remaining):
                    await self._arrival.wait()
            except TimeoutError:
                pass

    def is_connected(self, neighbor: str) -> bool:
        return neighbor in self.connected

    def sent_to(self, neighbor: str) -> list[Frame]:
        return [f for n, f in self.sent if n == neighbor]


def make_context(
    name: str, graph: list[Graph], exchange: FakeExchange, strategy: StrategyConfig, last_step: int | None = None
) -> tuple[StrategyContext, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    async def run_compute(fn: Any) -> Any:
        return fn()

    ctx = StrategyContext(
        name=name,
        topology=lambda: graph[0],
        parameters=tuple(model.named_parameters()),
        optimizer=optimizer,
        configured=graph[0].names,
        device=torch.device("cpu"),
        exchange=exchange,
        run_compute=run_compute,
        config=strategy,
        ledger=RoundLedger(),
        last_step=last_step,
    )
    return ctx, model


def params_frame(sender: str, step: int, model: torch.nn.Module, **meta: Any) -> Frame:
    return Frame(
        kind=ASYNC_PARAMS,
        sender=sender,
        round=step,
        step=step,
        meta={"degree": 2, **meta},
        tensors={n: p.detach().clone() for n, p in model.named_parameters()},
    )


async def test_the_horizon_of_a_neighbour_that_has_left_still_stops_this_peer() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["a", "b", "c"])]
    ctx, model = make_context("a", graph, exchange, StrategyConfig(kind="async-gossip", max_lead=0))
    strategy = AsyncGossipStrategy(ctx)
    await strategy.after_optimizer_step(10)
    # b finishes the run (horizon 99) and leaves before a's next round reads its last frame.
    exchange.deliver(params_frame("b", 99, model, swarm_step=99))
    graph[0] = build_graph("full", ["a", "c"])
    await strategy.after_optimizer_step(11)
    assert strategy.swarm_step() == 99
    assert strategy.used == 0  # not mixed: b is no longer a neighbour
    await strategy.close()


async def test_the_horizon_of_a_stale_frame_counts() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["a", "b"])]
    config = StrategyConfig(kind="async-gossip", max_staleness=5, max_lead=0)
    ctx, model = make_context("a", graph, exchange, config)
    strategy = AsyncGossipStrategy(ctx)
    # Too old to mix (step 40 against 60), but it knows the swarm reached 99.
    exchange.deliver(params_frame("b", 40, model, swarm_step=99))
    await strategy.after_optimizer_step(60)
    assert strategy.dropped_stale == 1
    assert strategy.swarm_step() == 99
    await strategy.close()


async def test_a_peer_ahead_of_every_neighbour_waits_for_the_fastest() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["a", "b", "c"])]
    exchange.connected = {"b", "c"}
    config = StrategyConfig(kind="async-gossip", max_lead=2, round_timeout=5.0)
    ctx, model = make_context("a", graph, exchange, config)
    strategy = AsyncGossipStrategy(ctx)
    for step in range(3):  # within max_lead + H = 3 steps of the start: no wait
        await strategy.after_optimizer_step(step)
    assert strategy.waits == 0
    # Step 3 is too far ahead of everyone heard: it waits. c answers 50 ms later with its step 2;
    # b (a straggler) never does and does not hold it up.
    asyncio.get_running_loop().call_later(0.05, exchange.deliver, params_frame("c", 2, model))
    await strategy.after_optimizer_step(3)
    assert strategy.waits == 1
    assert strategy.used == 1  # the copy it waited for is mixed in that round
    assert strategy.wait_seconds >= 0.04
    await strategy.after_optimizer_step(4)  # c's step 2 is within reach of step 4: no wait
    assert strategy.waits == 1
    await strategy.close()


async def test_the_wait_is_bounded_and_not_repeated_for_silent_neighbours() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["a", "b"])]
    config = StrategyConfig(kind="async-gossip", max_lead=1, round_timeout=0.2)
    ctx, model = make_context("a", graph, exchange, config)
    strategy = AsyncGossipStrategy(ctx)
    for step in range(5):  # b is not connected: never waits
        await strategy.after_optimizer_step(step)
    assert strategy.waits == 0
    exchange.connected = {"b"}
    loop = asyncio.get_running_loop()
    started = loop.time()
    await strategy.after_optimizer_step(5)  # connected but silent: waits round_timeout, then goes on
    assert strategy.waits == 1
    assert 0.15 <= loop.time() - started < 2.0
    await strategy.after_optimizer_step(6)  # still silent: no second wait
    assert strategy.waits == 1
    exchange.deliver(params_frame("b", 1, model))  # heard again (far behind): waits resume
    await strategy.after_optimizer_step(7)
    await strategy.after_optimizer_step(8)
    assert strategy.waits == 2
    await strategy.close()


async def test_finish_hands_the_last_frame_to_a_neighbour_whose_send_was_skipped() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["a", "b", "c"])]
    config = StrategyConfig(kind="async-gossip", max_lead=0)
    ctx, _ = make_context("a", graph, exchange, config)
    strategy = AsyncGossipStrategy(ctx)
    exchange.send_gate["b"] = asyncio.Event()  # b is slow: the first send to it is still in flight
    await strategy.after_optimizer_step(98)
    await asyncio.sleep(0.01)  # the send to c completes; the one to b hangs
    await strategy.after_optimizer_step(99)  # the last frame: skipped for b, sent to c
    await asyncio.sleep(0)
    assert strategy.skipped_sends == 1
    assert [f.step for f in exchange.sent_to("c")] == [98, 99]
    finishing = asyncio.ensure_future(strategy.finish())
    await asyncio.sleep(0.01)
    exchange.send_gate["b"].set()
    await asyncio.wait_for(finishing, 5.0)
    assert [f.step for f in exchange.sent_to("b")] == [98, 99]
    assert exchange.sent_to("b")[-1].meta["swarm_step"] == 99
    assert [f.step for f in exchange.sent_to("c")] == [98, 99]  # c already had it: not sent twice
    await strategy.close()


async def test_a_peer_that_catches_up_drops_its_optimizer_state() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["a", "b"])]
    config = StrategyConfig(kind="async-gossip", max_staleness=10, max_lead=0)
    ctx, model = make_context("a", graph, exchange, config)
    model(torch.ones(3, 4)).sum().backward()
    ctx.optimizer.step()
    assert ctx.optimizer.state
    exchange.deliver(params_frame("b", 100, model))
    outcome = await strategy_step(AsyncGossipStrategy(ctx), 20)
    assert outcome.round == 95  # moved up to newest - max_staleness / 2
    assert not ctx.optimizer.state


async def test_a_straggler_that_learns_the_swarm_is_done_ends_on_its_neighbours_copies() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["a", "b", "c"])]
    config = StrategyConfig(kind="async-gossip", max_staleness=100, max_lead=0)
    ctx, model = make_context("a", graph, exchange, config, last_step=99)
    strategy = AsyncGossipStrategy(ctx)
    finished_b, finished_c = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    exchange.deliver(params_frame("b", 99, finished_b, swarm_step=99))
    exchange.deliver(params_frame("c", 97, finished_c, swarm_step=99))
    await strategy.after_optimizer_step(60)
    assert strategy.swarm_step() == 99
    assert strategy.ended_on_swarm_model == 2
    for name, p in model.named_parameters():
        expected = (dict(finished_b.named_parameters())[name] + dict(finished_c.named_parameters())[name]) / 2
        torch.testing.assert_close(p.detach(), expected.detach())
    # Its last frame carries the swarm's model.
    await asyncio.sleep(0.01)
    torch.testing.assert_close(exchange.sent_to("b")[-1].tensors["bias"], model.bias.detach())
    await strategy.close()


async def test_a_peer_that_has_not_heard_the_end_keeps_its_own_mix() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["a", "b"])]
    config = StrategyConfig(kind="async-gossip", max_staleness=100, max_lead=0)
    ctx, _ = make_context("a", graph, exchange, config, last_step=99)
    strategy = AsyncGossipStrategy(ctx)
    exchange.deliver(params_frame("b", 70, torch.nn.Linear(4, 2), swarm_step=70))
    await strategy.after_optimizer_step(60)
    assert strategy.ended_on_swarm_model == 0
    assert strategy.used == 1
    await strategy.close()


async def strategy_step(strategy: AsyncGossipStrategy, step: int) -> Any:
    outcome = await strategy.after_optimizer_step(step)
    await strategy.close()
    return outcome


async def test_no_async_ps_reply_follows_the_servers_final_frame() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["s", "w1", "w2"])]
    exchange.connected = {"w1", "w2"}
    config = StrategyConfig(kind="ps", server="s", ps_mode="async")
    ctx, model = make_context("s", graph, exchange, config)
    server = ParameterServer(ctx)

    def gradient(sender: str, step: int) -> Frame:
        return Frame(
            kind=GRADIENT,
            sender=sender,
            round=0,
            step=step,
            tensors={n: torch.ones_like(p) for n, p in model.named_parameters()},
        )

    model(torch.ones(3, 4)).sum().backward()
    await server.reduce_gradients(0)  # starts the consumer
    exchange.deliver(gradient("w1", 0))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if exchange.sent_to("w1"):
            break
    assert [f.meta.get("final") for f in exchange.sent_to("w1")] == [None]
    await server.finish()
    exchange.deliver(gradient("w1", 1))  # a push that arrives after the final frame went out
    exchange.deliver(gradient("w2", 1))
    await asyncio.sleep(0.2)
    for worker in ("w1", "w2"):
        frames = exchange.sent_to(worker)
        assert frames[-1].kind == PARAMETERS
        assert frames[-1].meta.get("final") is True, frames
        assert frames[-1].round > max((f.round for f in frames[:-1]), default=-1)
    await server.close()


@pytest.fixture(autouse=True)
def _quiet_readonly_warning() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        yield


async def test_the_last_sync_before_the_end_announces_the_end() -> None:
    # run.steps = 10 with H = 4: the last sync is at step 7; steps 8-9 are local and send nothing.
    exchange = FakeExchange()
    graph = [build_graph("full", ["a", "b"])]
    config = StrategyConfig(kind="async-gossip", local_steps=4, max_lead=0)
    ctx, _ = make_context("a", graph, exchange, config, last_step=9)
    strategy = AsyncGossipStrategy(ctx)
    await strategy.after_optimizer_step(3)
    await asyncio.sleep(0.01)
    await strategy.after_optimizer_step(7)
    await asyncio.sleep(0.01)
    assert [f.meta["swarm_step"] for f in exchange.sent_to("b")] == [3, 9]
    assert strategy.swarm_step() == 0  # its own run goes on to step 9
    await strategy.close()


async def test_one_hung_neighbour_does_not_hold_back_the_last_frame_to_the_others() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["a", "b", "c"])]
    ctx, _ = make_context("a", graph, exchange, StrategyConfig(kind="async-gossip", max_lead=0))
    strategy = AsyncGossipStrategy(ctx)
    exchange.send_gate["b"] = asyncio.Event()  # b never takes a frame
    exchange.send_gate["c"] = asyncio.Event()  # c is slow, then recovers
    await strategy.after_optimizer_step(98)
    await strategy.after_optimizer_step(99)  # skipped for both: their sends of step 98 are in flight
    finishing = asyncio.ensure_future(strategy.finish())
    await asyncio.sleep(0.01)
    exchange.send_gate["c"].set()
    await asyncio.sleep(0.05)
    assert [f.step for f in exchange.sent_to("c")] == [98, 99]
    assert not finishing.done()  # still waiting on b, which the node bounds by shutdown_timeout
    finishing.cancel()
    await strategy.close()


def ps_parameters(round_index: int, model: torch.nn.Module, **meta: Any) -> Frame:
    return Frame(
        kind=PARAMETERS,
        sender="s",
        round=round_index,
        step=0,
        meta={"server_step": 0, **meta},
        tensors={n: p.detach().clone() for n, p in model.named_parameters()},
    )


async def test_ps_local_sgd_worker_loads_a_late_average_then_pushes_it_as_current() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["s", "w1"])]
    exchange.connected = {"s"}
    config = StrategyConfig(kind="ps", server="s", ps_mode="sync", local_steps=2, round_timeout=5.0)
    ctx, model = make_context("w1", graph, exchange, config)
    worker = ParameterServerWorker(ctx)
    late = torch.nn.Linear(4, 2)
    exchange.deliver(ps_parameters(3, late))  # the average of round 3 came after w1 stopped waiting
    reply = torch.nn.Linear(4, 2)
    asyncio.get_running_loop().call_later(0.05, exchange.deliver, ps_parameters(4, reply))
    assert await worker.reduce_gradients(1) is None and worker.wants_local_step()
    outcome = await worker.after_optimizer_step(1)
    assert outcome is not None and outcome.complete
    pushed = exchange.sent_to("s")
    assert [(f.kind, f.round) for f in pushed] == [("ps_avg", 3)]  # tagged current: not dropped as stale
    torch.testing.assert_close(pushed[0].tensors["weight"], late.weight.detach())
    torch.testing.assert_close(model.weight.detach(), reply.weight.detach())  # then the round-4 average
    await worker.close()


async def test_ps_local_sgd_worker_ends_on_the_servers_final_frame() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["s", "w1"])]
    config = StrategyConfig(kind="ps", server="s", ps_mode="sync", local_steps=2)
    ctx, model = make_context("w1", graph, exchange, config)
    worker = ParameterServerWorker(ctx)
    final = torch.nn.Linear(4, 2)
    exchange.deliver(ps_parameters(7, final, final=True, server_step=99))
    await worker.after_optimizer_step(1)
    assert exchange.sent_to("s") == []  # the server has gone: nothing pushed
    torch.testing.assert_close(model.weight.detach(), final.weight.detach())
    assert worker.swarm_step() == 99
    await worker.close()


async def test_a_sync_ps_worker_takes_the_servers_step_with_each_reply() -> None:
    """A worker that went on alone while the server was late (steps 0-4) falls back to the
    server's clock with the first reply, so it cannot reach the end before the server."""
    exchange = FakeExchange()
    graph = [build_graph("full", ["s", "w1"])]
    exchange.connected = {"s"}
    config = StrategyConfig(kind="ps", server="s", ps_mode="sync", round_timeout=5.0)
    ctx, model = make_context("w1", graph, exchange, config)
    worker = ParameterServerWorker(ctx)
    assert worker.adopted_step() is None  # nothing heard yet: the node keeps its own count
    reply = torch.nn.Linear(4, 2)
    asyncio.get_running_loop().call_later(0.05, exchange.deliver, ps_parameters(1, reply, server_step=2))
    outcome = await worker.reduce_gradients(5)
    assert outcome is not None and outcome.complete and not worker.wants_local_step()
    assert [(f.kind, f.step) for f in exchange.sent_to("s")] == [("ps_grad", 5)]
    torch.testing.assert_close(model.weight.detach(), reply.weight.detach())
    assert worker.adopted_step() == 3  # the server finished its step 2: the next step is 3
    assert worker.adopted_step() is None  # read once
    await worker.close()


async def test_a_sync_ps_worker_without_a_reply_keeps_its_own_step() -> None:
    exchange = FakeExchange()
    graph = [build_graph("full", ["s", "w1"])]
    exchange.connected = {"s"}
    config = StrategyConfig(kind="ps", server="s", ps_mode="sync", round_timeout=0.05)
    ctx, _ = make_context("w1", graph, exchange, config)
    worker = ParameterServerWorker(ctx)
    outcome = await worker.reduce_gradients(0)
    assert outcome is not None and outcome.missing == ("s",) and worker.wants_local_step()
    assert worker.adopted_step() is None
    await worker.close()
