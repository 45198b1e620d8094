"""One-step-delayed gossip (``strategy.delay = 1``) preserves the average on a doubly stochastic graph.

Four tiers. The pure rule (:mod:`p2pdl.core.delayed`) on random tensors: mixing snapshot
differences keeps the network average to float rounding while the peers reach consensus, moves
it by exactly the local updates and no more, and is D-PSGD's ``x <- W s + u``; a one-sided miss
does move it (so the invariant is one the code can break). The strategy against a fake exchange:
a snapshot that does not come, or a neighbour our own send missed, contributes nothing; a peer
behind catches up without mixing; the last round sends nothing. Real Peers on 127.0.0.1 in one event
loop: the mean of the four models moves by exactly the mean local update, every round is
complete, and with no updates the disagreement shrinks at λ2 per round. Real peer processes
train MNIST-1D with the delay on. Config refusals close the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_finished, free_ports, run_cluster, write_config

from p2pdl import Peer
from p2pdl.config import Config, StrategyConfig, config_from_mapping
from p2pdl.core.delayed import delayed_round, mix_delayed_into, snapshot
from p2pdl.core.topology import build_graph, mixing_matrix, second_largest_eigenvalue_modulus
from p2pdl.errors import ConfigError, TransportError
from p2pdl.strategies.base import RoundLedger, RoundOutcome, StrategyContext
from p2pdl.strategies.gossip import PARAMS, GossipStrategy
from p2pdl.wire import Frame

WORKLOAD = Path(__file__).resolve().parent.parent / "peers" / "mnist1d_cnn.py"
NAMES8 = [f"p{i}" for i in range(8)]


def metropolis(kind: str, count: int) -> torch.Tensor:
    graph = build_graph(kind, [f"p{i}" for i in range(count)])  # type: ignore[arg-type]
    return torch.from_numpy(mixing_matrix(graph))


def random_models(count: int, seed: int, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 2, 4)]
    return [[torch.randn(shape, generator=generator, dtype=dtype) + 3.0 for shape in shapes] for _ in range(count)]


def network_mean(models: list[list[torch.Tensor]]) -> torch.Tensor:
    """(params,) float64: the average over peers of the flattened models."""
    flat = torch.stack([torch.cat([t.reshape(-1).double() for t in model]) for model in models])
    return flat.mean(dim=0)


def disagreement(models: list[list[torch.Tensor]]) -> float:
    flat = torch.stack([torch.cat([t.reshape(-1).double() for t in model]) for model in models])
    return float((flat - flat.mean(dim=0)).norm())


# ------------------------------------------------------------------ the pure rule


@pytest.mark.parametrize(("kind", "count"), [("ring", 8), ("full", 5), ("ring", 4)])
def test_delayed_mixing_keeps_the_average_and_reaches_consensus(kind: str, count: int) -> None:
    weights = metropolis(kind, count)
    models = random_models(count, seed=count)
    start_mean = network_mean(models)
    start_disagreement = disagreement(models)
    for _ in range(200):
        snapshots = [snapshot(model) for model in models]  # zero local updates: x = s at every mix
        delayed_round(models, snapshots, weights)
    relative = float((network_mean(models) - start_mean).norm() / start_mean.norm())
    assert relative < 1e-6, relative
    assert disagreement(models) < 1e-4 * start_disagreement


def test_delayed_mixing_moves_the_average_by_the_local_updates_only() -> None:
    """x_i = s_i + u_i at mixing time: the mean after the round is mean(s) + mean(u), exactly."""
    weights = metropolis("ring", 8)
    models = random_models(8, seed=1, dtype=torch.float64)
    for round_index in range(30):
        snapshots = [snapshot(model) for model in models]
        generator = torch.Generator().manual_seed(100 + round_index)
        updates = [[torch.randn(t.shape, generator=generator, dtype=t.dtype) * 0.1 for t in m] for m in models]
        for model, update in zip(models, updates, strict=True):
            for tensor, delta in zip(model, update, strict=True):
                tensor.add_(delta)
        expected = network_mean(snapshots) + network_mean(updates)
        delayed_round(models, snapshots, weights)
        torch.testing.assert_close(network_mean(models), expected, rtol=0.0, atol=1e-12)


def test_delayed_mixing_is_dpsgd_mixing_of_the_snapshots_plus_the_local_update() -> None:
    """x_i <- sum_j W_ij s_j + u_i (Lian et al. 2017, with the gradient taken while x is averaged)."""
    weights = metropolis("full", 4)
    snapshots = random_models(4, seed=2, dtype=torch.float64)
    updates = random_models(4, seed=3, dtype=torch.float64)
    models = [[s + u for s, u in zip(sm, um, strict=True)] for sm, um in zip(snapshots, updates, strict=True)]
    delayed_round(models, snapshots, weights)
    for i in range(4):
        for position in range(3):
            expected = sum(float(weights[i, j]) * snapshots[j][position] for j in range(4)) + updates[i][position]
            torch.testing.assert_close(models[i][position], expected, rtol=0.0, atol=1e-12)


def test_a_one_sided_miss_moves_the_average_and_a_mutual_one_does_not() -> None:
    weights = metropolis("ring", 4)
    base = random_models(4, seed=4, dtype=torch.float64)
    one_sided = torch.ones(4, 4, dtype=torch.bool)
    one_sided[0, 1] = False  # p1's snapshot missed p0's deadline; p0's reached p1
    mutual = one_sided.clone()
    mutual[1, 0] = False
    for arrived, preserved in ((one_sided, False), (mutual, True)):
        models = [snapshot(m) for m in base]
        delayed_round(models, [snapshot(m) for m in base], weights, arrived)
        moved = float((network_mean(models) - network_mean(base)).abs().max())
        assert (moved < 1e-12) == preserved, moved


def test_sixteen_bit_parameters_mix_in_float32_and_peers_that_agree_stay_put() -> None:
    own = [torch.full((64,), 1.5, dtype=torch.bfloat16)]
    local = [own[0] + 0.25]  # the local update, exact in bfloat16
    same = [own[0].clone()]
    mix_delayed_into(local, own, [(0.3, same), (0.3, [s.float() for s in same])])
    assert local[0].dtype == torch.bfloat16
    assert torch.equal(local[0], own[0] + 0.25)  # differences of equal snapshots add exactly zero


# ------------------------------------------------------------------ the strategy, with a fake exchange


class FakeExchange:
    """Frames the test delivers; ``broadcast`` records and may fail for chosen neighbours."""

    def __init__(self) -> None:
        self.inbox: list[Frame] = []
        self.sent: list[Frame] = []
        self.unreachable: set[str] = set()
        self.ahead: int | None = None

    async def encode(self, frame: Frame) -> bytes:
        return b""

    async def send_encoded(self, neighbor: str, data: bytes) -> None:
        return None

    async def broadcast(self, frame: Frame, neighbors: Collection[str]) -> dict[str, TransportError]:
        self.sent.append(frame)
        return {n: TransportError(f"{n} unreachable") for n in neighbors if n in self.unreachable}

    async def collect(self, kind: str, round_index: int, senders: Collection[str], timeout: float) -> dict[str, Frame]:
        return {f.sender: f for f in self.inbox if f.kind == kind and f.round == round_index and f.sender in senders}

    def advance(self, kind: str, floor: int) -> None:
        self.inbox = [f for f in self.inbox if f.round >= floor]

    def highest_round(self, kind: str, senders: Collection[str]) -> int | None:
        return self.ahead

    def take_latest(self, kind: str, sender: str) -> Frame | None:
        return None

    async def wait_for_senders(self, kind: str, senders: Collection[str], count: int, timeout: float) -> set[str]:
        return set()

    def is_connected(self, neighbor: str) -> bool:
        return True


def delayed_strategy(last_step: int | None = None) -> tuple[GossipStrategy, torch.nn.Module, FakeExchange]:
    """p0 of a complete graph of 3 (neighbours p1, p2; MH weight 1/3 each), delay = 1, H = 1."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2, dtype=torch.float64)
    exchange = FakeExchange()

    async def run_compute(fn: Callable[[], Any]) -> Any:
        return fn()

    ctx = StrategyContext(
        name="p0",
        topology=lambda: build_graph("full", ["p0", "p1", "p2"]),
        parameters=tuple(model.named_parameters()),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        configured=("p0", "p1", "p2"),
        device=torch.device("cpu"),
        exchange=exchange,
        run_compute=run_compute,
        config=StrategyConfig(kind="gossip", delay=1, round_margin=0.0, round_timeout=0.01),
        ledger=RoundLedger(),
        last_step=last_step,
    )
    return GossipStrategy(ctx), model, exchange


def frame_of(sender: str, round_index: int, tensors: dict[str, torch.Tensor], degree: int = 2) -> Frame:
    return Frame(
        kind=PARAMS, sender=sender, round=round_index, step=round_index, meta={"degree": degree}, tensors=tensors
    )


async def round_after(strategy: GossipStrategy, step: int) -> RoundOutcome | None:
    """The strategy's work after optimizer step ``step``, then one loop turn for its send task."""
    outcome = await strategy.after_optimizer_step(step)
    await asyncio.sleep(0)
    return outcome


def shifted(model: torch.nn.Module, amount: float) -> dict[str, torch.Tensor]:
    return {n: p.detach() + amount for n, p in model.named_parameters()}


async def test_a_missing_snapshot_contributes_nothing_and_the_round_is_partial() -> None:
    strategy, model, exchange = delayed_strategy()
    assert await round_after(strategy, 0) is None  # round 0 only sends
    own = {n: t.clone() for n, t in exchange.sent[-1].tensors.items()}
    exchange.inbox.append(frame_of("p1", 0, shifted(model, 3.0)))  # p2's snapshot never comes
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # the local update of the next step
    outcome = await round_after(strategy, 1)
    assert outcome is not None and outcome.round == 0 and outcome.missing == ("p2",)
    for name, p in model.named_parameters():
        # x = s + u + w (s_1 - s_0): only p1's difference, with its MH weight 1 / (1 + 2)
        torch.testing.assert_close(p.detach(), own[name] + 0.5 + 3.0 / 3, rtol=0.0, atol=1e-12)
    assert exchange.sent[-1].round == 1


async def test_a_neighbour_our_send_missed_is_left_out_even_when_its_snapshot_came() -> None:
    strategy, model, exchange = delayed_strategy()
    exchange.unreachable = {"p2"}
    await round_after(strategy, 0)
    exchange.unreachable = set()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    exchange.inbox += [frame_of("p1", 0, shifted(model, 0.0)), frame_of("p2", 0, shifted(model, 9.0))]
    outcome = await round_after(strategy, 1)
    assert outcome is not None and outcome.missing == ("p2",)
    assert strategy.failed_sends == 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0.0, atol=0.0)  # p1 agreed: nothing moved


async def test_a_peer_behind_catches_up_without_mixing_and_the_last_round_sends_nothing() -> None:
    strategy, model, exchange = delayed_strategy(last_step=7)
    await round_after(strategy, 0)
    exchange.ahead = 5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    outcome = await round_after(strategy, 1)
    assert outcome is not None and outcome.round == 5  # the node moves its step to 6
    assert (strategy.catch_ups, strategy._ctx.ledger.complete, strategy._ctx.ledger.partial) == (1, 0, 0)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert exchange.sent[-1].round == 5
    exchange.ahead = None
    exchange.inbox += [frame_of(n, 5, shifted(model, 0.0)) for n in ("p1", "p2")]
    sends = len(exchange.sent)
    outcome = await round_after(strategy, 6)
    assert outcome is not None and outcome.round == 5 and outcome.complete
    assert len(exchange.sent) == sends + 1 and exchange.sent[-1].round == 6
    exchange.inbox += [frame_of(n, 6, shifted(model, 0.0)) for n in ("p1", "p2")]
    await round_after(strategy, 7)  # the run's last step: mixes round 6, sends nothing
    assert len(exchange.sent) == sends + 1
    await strategy.close()


# ------------------------------------------------------------------ real peers, one event loop


def stacked_parameters(peers: list[Peer]) -> torch.Tensor:
    """(peers, params) float64."""
    return torch.stack([torch.cat([p.detach().reshape(-1) for p in peer.model.parameters()]) for peer in peers])


def delay_config(count: int, local_steps: int) -> Config:
    return config_from_mapping(
        {
            "run": {"workload": str(WORKLOAD), "lr": 0.01, "momentum": 0.0},
            # round_margin = 0: every round waits up to round_timeout, so a busy machine cannot
            # turn a round partial (a one-sided miss would move the mean this test checks).
            "strategy": {
                "kind": "gossip",
                "delay": 1,
                "local_steps": local_steps,
                "round_timeout": 8.0,
                "round_margin": 0.0,
            },
            "topology": {"kind": "ring"},
            "transport": {"startup_timeout": 10.0, "handshake_timeout": 5.0},
            "peers": [{"name": f"p{i}", "address": f"127.0.0.1:{port}"} for i, port in enumerate(free_ports(count))],
        }
    )


async def run_peers(
    count: int, local_steps: int, steps: int, slopes: list[float]
) -> tuple[list[Peer], list[torch.Tensor]]:
    """Train ``count`` float64 peers on loss = slope_i * sum(params) with SGD; return the stacked history."""
    config = delay_config(count, local_steps)
    peers = []
    for index, name in enumerate(config.peer_names):
        torch.manual_seed(index)  # each peer starts from its own model: there is something to mix
        model = torch.nn.Linear(16, 8, dtype=torch.float64)
        peers.append(Peer(config, name, model, torch.optim.SGD(model.parameters(), lr=0.01)))

    def closure_for(peer: Peer, slope: float) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            if slope == 0.0:
                return torch.zeros(())  # no gradient at all: SGD skips, only mixing moves the model
            loss = torch.stack([p.sum() for p in peer.model.parameters()]).sum() * slope
            loss.backward()
            return loss.detach()

        return closure

    history = []
    async with contextlib.AsyncExitStack() as stack:
        for peer in peers:
            stack.push_async_callback(peer.close)
        await asyncio.gather(*(peer.start() for peer in peers))
        history.append(stacked_parameters(peers))
        for _ in range(steps):
            await asyncio.gather(
                *(peer.step(closure_for(peer, slope)) for peer, slope in zip(peers, slopes, strict=True))
            )
            history.append(stacked_parameters(peers))
    return peers, history


@pytest.mark.parametrize("local_steps", [1, 3])
async def test_real_peers_move_the_mean_by_exactly_the_local_updates(local_steps: int) -> None:
    """Each SGD step moves peer i by -lr * slope_i per element; mixing must add nothing to the mean."""
    slopes = [0.5, -1.0, 2.0, 0.25]
    steps = 6 * local_steps
    peers, history = await run_peers(4, local_steps, steps, slopes)
    drift = -0.01 * sum(slopes) / len(slopes)  # per step, per element, of the mean
    for step, stacked in enumerate(history):
        torch.testing.assert_close(stacked.mean(dim=0), history[0].mean(dim=0) + drift * step, rtol=0.0, atol=1e-12)
    rounds = steps // local_steps - 1  # the first round only sends
    assert [(peer.ledger.complete, peer.ledger.partial) for peer in peers] == [(rounds, 0)] * 4
    assert all(peer.strategy.status()["delay"] == 1 for peer in peers)
    # Mixing happened: the disagreement is far below that of peers training alone for as long.
    alone = history[0] + torch.tensor(slopes, dtype=torch.float64)[:, None] * -0.01 * steps
    assert float((history[-1] - history[-1].mean(0)).norm()) < 0.5 * float((alone - alone.mean(0)).norm())


async def test_real_peers_reach_consensus_at_lambda2_one_round_late() -> None:
    """With no updates, x <- W s every round: the disagreement shrinks by λ2 per round."""
    count, rounds = 8, 24
    _, history = await run_peers(count, 1, rounds, [0.0] * count)
    for stacked in history:
        torch.testing.assert_close(stacked.mean(dim=0), history[0].mean(dim=0), rtol=0.0, atol=1e-13)
    lambda2 = second_largest_eigenvalue_modulus(mixing_matrix(build_graph("ring", NAMES8)))
    spread = [float((x - x.mean(dim=0)).norm()) for x in history]
    # step 0 only sends, so step t has applied t - 1 rounds: fit from round 5 as the gossip test does
    fitted = np.arange(6, rounds + 1)
    rate = math.exp(np.polyfit(fitted, np.log(spread[6:]), 1)[0])
    assert rate == pytest.approx(lambda2, rel=0.01), (rate, lambda2, spread)
    assert spread[1] == spread[0]  # the first step sent its snapshot and mixed nothing


# ------------------------------------------------------------------ real peer processes


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("mnist1d_built")
def test_four_peer_processes_train_with_delayed_gossip(tmp_path: Path) -> None:
    names = [f"p{i}" for i in range(4)]
    steps, local_steps = 300, 2
    config = write_config(
        tmp_path / "delay.toml",
        names=names,
        ports=free_ports(4),
        run={"steps": steps, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "eval_every": 0},
        strategy={"kind": "gossip", "delay": 1, "local_steps": local_steps},
    )
    summary = run_cluster(config, tmp_path / "out")
    for entry in summary["peers"]:
        peer = assert_finished(tmp_path / "out" / entry["name"], steps)
        rounds = peer["rounds"]
        # every round but the first (it only sends) was mixed: complete or partial, none lost
        assert rounds["complete"] + rounds["partial"] == steps // local_steps - 1, rounds
        assert peer["strategy_status"]["delay"] == 1
        assert peer["test_accuracy"] > 0.5, peer["test_accuracy"]


# ------------------------------------------------------------------ config


def config_problems(strategy: dict[str, object], compression: dict[str, object] | None = None) -> str:
    data: dict[str, object] = {
        "run": {"workload": str(WORKLOAD)},
        "strategy": strategy,
        "peers": [{"name": "a", "address": "127.0.0.1:1"}, {"name": "b", "address": "127.0.0.1:2"}],
    }
    if compression is not None:
        data["compression"] = compression
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    return str(info.value)


@pytest.mark.parametrize(
    ("strategy", "compression", "needle"),
    [
        ({"kind": "gossip", "delay": 2}, None, "strategy.delay must be 0 or 1"),
        ({"kind": "gossip", "delay": -1}, None, "strategy.delay must be 0 or 1"),
        ({"kind": "allreduce", "delay": 1}, None, "strategy.delay = 1 applies to kind = 'gossip'"),
        ({"kind": "push-sum", "delay": 1}, None, "strategy.delay = 1 applies to kind = 'gossip'"),
        ({"kind": "gossip", "delay": 1, "robust": "clip"}, None, "robust = 'clip'"),
        ({"kind": "gossip", "delay": 1, "outer": "diloco", "local_steps": 4}, None, "outer = 'diloco'"),
        ({"kind": "gossip", "delay": 1}, {"kind": "int8"}, "cannot be combined with strategy.delay"),
    ],
)
def test_config_refuses_delay_where_it_does_not_apply(
    strategy: dict[str, object], compression: dict[str, object] | None, needle: str
) -> None:
    assert needle in config_problems(strategy, compression)


def test_config_accepts_delay_on_gossip_and_defaults_to_off() -> None:
    peers = [{"name": "a", "address": "127.0.0.1:1"}, {"name": "b", "address": "127.0.0.1:2"}]
    plain = config_from_mapping({"run": {"workload": str(WORKLOAD)}, "peers": peers})
    assert plain.strategy.delay == 0
    delayed = config_from_mapping(
        {"run": {"workload": str(WORKLOAD)}, "strategy": {"kind": "gossip", "delay": 1}, "peers": peers}
    )
    assert delayed.strategy.delay == 1
