"""Overlapped all-reduce (``strategy.overlap``): buckets reduced from backward hooks.

Hermetic: the bucket layout follows DDP (reverse registration order, a small first bucket), the
gradients backward produces land in the buckets bit-identical to plain autograd, each bucket is
reported ready exactly once, and the config refuses what overlap cannot be combined with.

Slow: real peers on 127.0.0.1 with several buckets end bit-identical to each other and to DDP
(2 peers: exactly; 4 peers: to float32 rounding, as the plain path), and the exact fault path
(SIGKILLs mid-run, redo from the kept local buckets) still ends with one model.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_allreduce_parity as parity
import test_exact_faults as faults
import torch
from helpers import PEERS_DIR, PeerProcesses, free_ports, read_metrics, status, wait_for, write_config

from p2pdl.config import config_from_mapping
from p2pdl.config.sections import OVERLAP_MAX_BUCKETS, StrategyConfig
from p2pdl.core.mixing import exact_mean
from p2pdl.core.topology import build_graph
from p2pdl.errors import ConfigError
from p2pdl.strategies.allreduce import AllReduceStrategy
from p2pdl.strategies.base import RoundLedger, StrategyContext
from p2pdl.strategies.buckets import PADDING, GradientBuckets, bucket_layout, is_view
from p2pdl.train.loop import build_model
from p2pdl.train.workload import load_workload
from p2pdl.wire import Frame

WORKLOAD = str(PEERS_DIR / "mnist1d_cnn.py")
# mnist1d_cnn has 5210 parameters (20.8 kB of float32): 5 kB buckets cut it into three.
SMALL_BUCKET_MB = 0.005
OVERLAP = {"overlap": True, "bucket_mb": SMALL_BUCKET_MB}


def _model() -> torch.nn.Module:
    return build_model(load_workload(PEERS_DIR / "mnist1d_cnn.py"), seed=0, device=torch.device("cpu"))


def _loss(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 40, generator=generator)
    targets = torch.randint(0, 10, (16,), generator=generator)
    return torch.nn.functional.cross_entropy(model(inputs), targets)


# ---------------------------------------------------------------------------- hermetic


def test_layout_is_reverse_registration_order_with_a_small_first_bucket() -> None:
    mib = 1024 * 1024
    # float32 sizes: 0.5 MiB, 0.5 MiB, 3 MiB, 0.25 MiB, 0.5 MiB
    sizes = [mib // 8, mib // 8, 3 * mib // 4, mib // 16, mib // 8]
    layout = bucket_layout(sizes, 4, 2 * mib)
    assert layout == [[4, 3, 2], [1, 0]]  # the first closes past 1 MiB; the 3 MiB one overflows it
    assert sorted(i for bucket in layout for i in bucket) == list(range(len(sizes)))
    assert bucket_layout(sizes, 4, 10 * mib) == [[4, 3, 2], [1, 0]]
    assert bucket_layout([1], 4, 10 * mib) == [[0]]


def test_gradients_land_in_the_buckets_bit_identical_to_autograd() -> None:
    reference, model = _model(), _model()
    _loss(reference).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    buckets = GradientBuckets(params, SMALL_BUCKET_MB)
    assert len(buckets.buckets) == 3
    ready: list[int] = []
    for _ in range(2):  # the second step reuses the same buffers, zeroed by arm
        ready.clear()
        for p in params:
            p.grad = None  # what the node's zero_grad(set_to_none=True) leaves
        buckets.arm(ready.append)
        _loss(model).backward()
        assert buckets.disarm() == []
        assert sorted(ready) == [0, 1, 2] and ready[0] == 0, ready  # each once, the last layers first
        for p, expected in zip(params, reference.parameters(), strict=True):
            assert p.grad is not None and torch.equal(p.grad, expected.grad)
        for bucket in buckets.buckets:
            base = bucket.local.data_ptr()
            span = bucket.local.numel() * bucket.local.element_size()
            for i in bucket.indices:
                grad = params[i].grad
                assert grad is not None and base <= grad.data_ptr() < base + span
            assert not bucket.local[bucket.numel :].any(), "the padding must stay zero"
    buckets.close()


def test_a_gradient_rebound_during_backward_is_copied_into_its_bucket() -> None:
    reference, model = _model(), _model()
    _loss(reference).backward()
    params = list(model.parameters())
    buckets = GradientBuckets(params, SMALL_BUCKET_MB)
    buckets.arm(lambda _bucket: None)
    model.zero_grad(set_to_none=True)  # a closure that zeroes its own gradients after the node did
    _loss(model).backward()
    buckets.bind_local()
    for p, expected in zip(params, reference.parameters(), strict=True):
        assert torch.equal(p.grad, expected.grad)  # type: ignore[arg-type]
    buckets.close()


def test_an_unused_parameter_leaves_its_bucket_incomplete_with_zeros() -> None:
    used, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    params = [*unused.parameters(), *used.parameters()]  # unused registered first: the last bucket
    buckets = GradientBuckets(params, 16 / (1024 * 1024))  # 16 bytes: one parameter per bucket
    ready: list[int] = []
    buckets.arm(ready.append)
    used(torch.ones(2, 4)).sum().backward()
    assert sorted(ready) == [0, 1]
    assert buckets.disarm() == [2, 3]
    assert all(p.grad is not None and not p.grad.any() for p in unused.parameters())


def test_bind_averaged_points_every_gradient_at_the_averaged_buffer() -> None:
    model = torch.nn.Linear(3, 2)
    params = list(model.parameters())
    buckets = GradientBuckets(params, 1.0)
    for bucket in buckets.buckets:
        bucket.averaged[: bucket.numel] = torch.arange(bucket.numel, dtype=torch.float32)
    buckets.bind_averaged()
    flat = torch.cat([params[i].grad.reshape(-1) for i in buckets.buckets[0].indices])  # type: ignore[union-attr]
    assert torch.equal(flat, torch.arange(8, dtype=torch.float32))
    assert buckets.buckets[0].averaged.numel() == 8 + PADDING
    buckets.close()


def test_too_many_buckets_are_refused_naming_bucket_mb() -> None:
    params = [torch.nn.Parameter(torch.zeros(64)) for _ in range(OVERLAP_MAX_BUCKETS + 1)]
    with pytest.raises(ConfigError, match=r"strategy\.bucket_mb"):
        GradientBuckets(params, 64 * 4 / (1024 * 1024))


def _problems(strategy: dict[str, object], **sections: dict[str, object]) -> tuple[str, ...]:
    data: dict[str, object] = {
        "run": {"workload": WORKLOAD, **sections.pop("run", {})},
        "peers": [{"name": f"p{i}", "address": f"127.0.0.1:{29700 + i}"} for i in range(2)],
        "strategy": strategy,
        **sections,
    }
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    return info.value.problems


@pytest.mark.parametrize(
    ("strategy", "sections", "fragment"),
    [
        ({"kind": "gossip", "overlap": True}, {}, "strategy.overlap applies to kind = 'allreduce'"),
        ({"kind": "allreduce", "local_steps": 4, "overlap": True}, {}, "local_steps = 4"),
        ({"kind": "allreduce", "overlap": True}, {"compression": {"kind": "int8"}}, "[compression]"),
        ({"kind": "allreduce", "overlap": True}, {"run": {"accumulate": 2}}, "run.accumulate = 1"),
        ({"kind": "allreduce", "overlap": True}, {"run": {"precision": "fp16"}}, "run.precision = 'fp16'"),
        ({"kind": "allreduce", "overlap": True}, {"transport": {"inbox_frames": 8}}, "transport.inbox_frames"),
        ({"kind": "allreduce", "bucket_mb": 0}, {}, "strategy.bucket_mb must be > 0"),
    ],
)
def test_overlap_refuses_what_it_cannot_combine_with(
    strategy: dict[str, object], sections: dict[str, dict[str, object]], fragment: str
) -> None:
    problems = _problems(strategy, **sections)
    assert any(fragment in p for p in problems), problems


def test_overlap_defaults_off_and_loads() -> None:
    data: dict[str, object] = {
        "run": {"workload": WORKLOAD},
        "peers": [{"name": f"p{i}", "address": f"127.0.0.1:{29700 + i}"} for i in range(2)],
        "strategy": {"kind": "allreduce"},
    }
    assert config_from_mapping(data).strategy.overlap is False
    data["strategy"] = {"kind": "allreduce", **OVERLAP}
    assert config_from_mapping(data).strategy.bucket_mb == SMALL_BUCKET_MB


# ---------------------------------------------------------------------------- real peers


# Seconds for the swarm and for the DDP run: four peer processes plus a DDP launcher and its four
# ranks import torch at once, which on a shared 2-core machine can outlast parity's 90 s.
PROCESS_TIMEOUT = 240.0


@pytest.mark.slow
@pytest.mark.timeout(2 * PROCESS_TIMEOUT + 60)
# Two ranks: gloo sums them in one order, so the match is bit for bit (with more ranks its ring
# order differs from the rank-order mean; tests/test_allreduce_parity.py checks 4 ranks within float32 rounding).
@pytest.mark.parametrize("peers", [2])
def test_overlapped_allreduce_matches_ddp(
    peers: int, tmp_path: Path, peer_processes: PeerProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parity, "PROCESS_TIMEOUT", PROCESS_TIMEOUT)
    names = [f"p{i}" for i in range(peers)]
    swarm, ddp_out = swarm_and_ddp(tmp_path, peer_processes, names, OVERLAP)
    models = [parity._load(d / "model.pt") for d in swarm]
    ddp = parity._load(ddp_out / "rank0" / "model.pt")
    for name, model in zip(names[1:], models[1:], strict=True):
        for key in models[0]:
            assert torch.equal(model[key], models[0][key]), f"{name}.{key} differs from p0.{key}"
    for key, value in _model().state_dict().items():
        assert float((models[0][key] - value).abs().max()) > 1e-3, f"{key} barely moved"
    rtol, atol = (0.0, 0.0) if peers == 2 else (parity.RTOL, parity.ATOL)
    for key in models[0]:
        torch.testing.assert_close(models[0][key], ddp[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


def swarm_and_ddp(
    tmp_path: Path, peer_processes: PeerProcesses, names: list[str], strategy: dict[str, object]
) -> tuple[list[Path], Path]:
    """test_allreduce_parity's run with ``strategy`` keys over plain allreduce: the peers' output
    folders and DDP's, both runs finished."""
    parity.datasets.mnist1d()
    config = write_config(
        tmp_path / "swarm.toml",
        names=names,
        ports=free_ports(len(names)),
        run=parity.RUN,
        strategy={"kind": "allreduce", "round_timeout": parity.ROUND_TIMEOUT, **strategy},
        topology={"kind": "full"},
        membership=parity.MEMBERSHIP,
    )
    swarm = parity._start_swarm(peer_processes, config, names, tmp_path / "p2pdl")
    parity._wait_swarm(peer_processes, swarm)
    ddp_out = tmp_path / "ddp"
    parity._wait_ddp(parity._start_ddp(config, ddp_out), ddp_out)
    return swarm, ddp_out


@pytest.fixture
def fault_peers(tmp_path: Path) -> Iterator[PeerProcesses]:
    procs = PeerProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("mnist1d_built")
def test_overlapped_allreduce_redoes_around_two_sigkills(tmp_path: Path, fault_peers: PeerProcesses) -> None:
    """test_exact_faults' two-kill case with overlap on: survivors redo from their kept buckets."""
    strategy = {"kind": "allreduce", "local_steps": 1, "round_timeout": faults.ROUND_TIMEOUT, **OVERLAP}
    steps = 120
    ports = free_ports(len(faults.NAMES))
    # Two of four die: the two survivors keep training only because min_peers says 2 suffice.
    config = faults.swarm_config(tmp_path / "swarm.toml", strategy, ports, steps=steps, min_peers=2)
    for name in faults.NAMES:
        fault_peers.start(config, name)
    wait_for(lambda: status(ports[0])["step"] >= 30, 300, "p0 past step 30")
    fault_peers.procs["p3"].send_signal(signal.SIGKILL)
    wait_for(lambda: status(ports[0])["step"] >= 60, 300, "p0 past step 60")
    fault_peers.procs["p2"].send_signal(signal.SIGKILL)
    survivors = ["p0", "p1"]
    fault_peers.assert_all_finished(faults.FINISH_TIMEOUT, steps, names=survivors)
    figures = faults.check_outcome(tmp_path, survivors, steps)  # every step run, one model
    for name in survivors:
        assert figures[name]["overlap"] == {"buckets": 3}, faults.report(figures)
        assert {"4", "2"} <= set(figures[name]["rounds_by_group_size"]), faults.report(figures)
        assert figures[name]["rounds_redone"] >= 1, faults.report(figures)
    logged = [{r["step"] for r in read_metrics(tmp_path / name) if "loss" in r} for name in survivors]
    assert set().union(*logged) == set(range(steps)), faults.report(figures)  # no lost step


# ---------------------------------------------------------------------------- in-process round


class LoopbackExchange:
    """Delivers frames between in-process strategies (no sockets): enough for one exact round."""

    def __init__(self, name: str, hub: dict[str, LoopbackExchange]) -> None:
        self.name, self.hub = name, hub
        self.inbox: list[Frame] = []
        self.floors: dict[str, int] = {}
        self.encoded: dict[bytes, Frame] = {}

    def _deliver(self, to: str, frame: Frame) -> None:
        target = self.hub[to]
        if frame.round >= target.floors.get(frame.kind, 0):
            tensors = {k: v.clone() for k, v in frame.tensors.items()}  # what a decoded frame holds
            target.inbox.append(
                Frame(
                    kind=frame.kind,
                    sender=frame.sender,
                    round=frame.round,
                    step=frame.step,
                    meta=dict(frame.meta),
                    tensors=tensors,
                )
            )

    async def encode(self, frame: Frame) -> bytes:
        key = str(id(frame)).encode()
        self.encoded[key] = frame
        return key

    async def send_encoded(self, neighbor: str, data: bytes) -> None:
        self._deliver(neighbor, self.encoded[data])

    async def broadcast(self, frame: Frame, neighbors: Collection[str]) -> dict[str, Any]:
        for neighbor in neighbors:
            self._deliver(neighbor, frame)
        return {}

    async def collect(self, kind: str, round_index: int, senders: Collection[str], timeout: float) -> dict[str, Frame]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            got = {f.sender: f for f in self.inbox if f.kind == kind and f.round == round_index and f.sender in senders}
            if len(got) == len(senders) or asyncio.get_running_loop().time() >= deadline:
                return got
            await asyncio.sleep(0.005)

    def advance(self, kind: str, floor: int) -> None:
        self.floors[kind] = max(floor, self.floors.get(kind, 0))
        self.inbox = [f for f in self.inbox if f.kind != kind or f.round >= floor]

    def highest_round(self, kind: str, senders: Collection[str]) -> int | None:
        return None

    def take_latest(self, kind: str, sender: str) -> Frame | None:
        """The newest frame of ``kind`` from ``sender`` (group notices), taking all of them."""
        frames = [f for f in self.inbox if f.kind == kind and f.sender == sender]
        self.inbox = [f for f in self.inbox if not (f.kind == kind and f.sender == sender)]
        return max(frames, key=lambda f: f.round) if frames else None

    async def wait_for_senders(self, kind: str, senders: Collection[str], count: int, timeout: float) -> set[str]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            ready = {f.sender for f in self.inbox if f.kind == kind and f.sender in senders}
            if len(ready) >= count or asyncio.get_running_loop().time() >= deadline:
                return ready
            await asyncio.sleep(0.005)

    def is_connected(self, neighbor: str) -> bool:
        return True


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))


def _peers(names: list[str], config: StrategyConfig) -> tuple[list[torch.nn.Module], list[AllReduceStrategy]]:
    """In-process all-reduce peers over a loopback hub, each with ``_mlp(0)`` (the same init)."""
    graph = build_graph("full", names)
    hub: dict[str, LoopbackExchange] = {}
    models, strategies = [], []
    for name in names:
        model = _mlp(0)
        hub[name] = LoopbackExchange(name, hub)

        async def run_compute(fn: Callable[[], Any]) -> Any:
            return fn()

        ctx = StrategyContext(
            name=name,
            topology=lambda: graph,
            parameters=tuple(model.named_parameters()),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            configured=graph.names,
            device=torch.device("cpu"),
            exchange=hub[name],
            run_compute=run_compute,
            config=config,
            ledger=RoundLedger(),
        )
        models.append(model)
        strategies.append(AllReduceStrategy(ctx))
    return models, strategies


async def _round(names: list[str], *, overlap: bool, steps: int) -> list[list[torch.Tensor]]:
    """``steps`` H = 1 rounds on in-process peers (same init, different data); their gradients."""
    config = StrategyConfig(kind="allreduce", round_timeout=5.0, overlap=overlap, bucket_mb=1024 / (1024 * 1024))
    models, strategies = _peers(names, config)
    if overlap:
        assert all(s.status()["overlap"]["buckets"] == 3 for s in strategies)  # 1 kB: one layer each

    async def peer(index: int, step: int) -> None:
        model, strategy = models[index], strategies[index]
        generator = torch.Generator().manual_seed(100 * step + index)
        inputs = torch.randn(32, 8, generator=generator)

        def backward() -> None:
            model.zero_grad(set_to_none=True)
            strategy.before_backward(step)
            model(inputs).pow(2).mean().backward()

        await asyncio.to_thread(backward)  # hooks reach the loop with call_soon_threadsafe
        outcome = await strategy.reduce_gradients(step)
        assert outcome is not None and not outcome.missing
        await strategy.after_optimizer_step(step)

    try:
        for step in range(steps):
            await asyncio.gather(*(peer(i, step) for i in range(len(names))))
    finally:
        for strategy in strategies:
            await strategy.close()
    return [[p.grad.clone() for p in model.parameters()] for model in models]  # type: ignore[union-attr]


@pytest.mark.parametrize("peers", [2, 3])
async def test_overlapped_rounds_are_bit_identical_to_the_plain_path(peers: int) -> None:
    names = [f"p{i}" for i in range(peers)]
    plain = await _round(names, overlap=False, steps=2)
    overlapped = await _round(names, overlap=True, steps=2)
    for grads in [*plain[1:], *overlapped]:
        for got, expected in zip(grads, plain[0], strict=True):
            assert torch.equal(got, expected)
    assert any(g.abs().sum() > 0 for g in plain[0])


async def _plain_round(names: list[str], *, rebind: bool) -> tuple[list[list[torch.Tensor]], list[bool]]:
    """One H = 1 round without overlap; ``rebind``: peer 0's code replaces its ``.grad`` tensors
    after backward (a closure that clones them). The peers' gradients after the round, and
    whether each peer's gradients are then the views of its flat vector."""
    models, strategies = _peers(names, StrategyConfig(kind="allreduce", round_timeout=5.0))

    async def peer(index: int) -> None:
        model, strategy = models[index], strategies[index]
        model.zero_grad(set_to_none=True)
        strategy.before_backward(0)
        model(_inputs(index)).pow(2).mean().backward()
        if rebind and index == 0:
            for p in model.parameters():
                p.grad = p.grad.clone()  # type: ignore[union-attr]
        outcome = await strategy.reduce_gradients(0)
        assert outcome is not None and not outcome.missing

    try:
        await asyncio.gather(*(peer(i) for i in range(len(names))))
    finally:
        for strategy in strategies:
            await strategy.close()
    views = [strategy._rounds.flat.local_views if strategy._rounds.flat else None for strategy in strategies]
    bound = [
        all(is_view(p.grad, view) for p, view in zip(model.parameters(), peer_views or [], strict=True))
        and peer_views is not None
        for model, peer_views in zip(models, views, strict=True)
    ]
    return [[p.grad.clone() for p in model.parameters()] for model in models], bound  # type: ignore[union-attr]


def _inputs(index: int) -> torch.Tensor:
    return torch.randn(32, 8, generator=torch.Generator().manual_seed(100 + index))


@pytest.mark.parametrize("rebind", [False, True], ids=["bound", "rebound-by-the-closure"])
async def test_plain_gradients_are_views_of_the_flat_vector_and_average_exactly(rebind: bool) -> None:
    """Without overlap backward accumulates into the flat vector (no flatten copy) and the result is
    applied by rebinding the gradients to the averaged buffer, which becomes the next round's flat
    vector; a gradient that other code replaced is copied in and bound again. Either
    way every peer ends with the rank-order exact mean of independently computed gradients."""
    names = ["p0", "p1", "p2"]
    grads, bound = await _plain_round(names, rebind=rebind)
    local = []
    for index in range(len(names)):
        model = _mlp(0)
        model(_inputs(index)).pow(2).mean().backward()
        local.append([p.grad for p in model.parameters()])
    expected = [exact_mean([g[k] for g in local], torch.empty_like(local[0][k])) for k in range(len(local[0]))]
    assert bound == [True, True, True]
    for peer_grads in grads:
        for got, want in zip(peer_grads, expected, strict=True):
            assert torch.equal(got, want)
