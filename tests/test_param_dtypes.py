"""Parameters stored in bfloat16 or float16: every strategy, every compressor, the wire and DDP.

What must hold for a 16-bit model: its parameters keep their dtype through every round and stay
finite; frames carry the parameters' dtype and a frame of another dtype is refused and counted,
never mixed in; the exact strategies leave every peer bit-identical; compressors decode to float32
(the accumulation dtype), which rounds back into the parameter's dtype; averages are summed in
float32 and rounded once; and all-reduce follows torch DDP run on the same bf16 model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import free_ports

from p2pdl import Peer
from p2pdl.compression.codec import CompressionPolicy, TensorCodec
from p2pdl.compression.compressors import COMPRESSOR_KINDS, build_compressor
from p2pdl.config import StrategyConfig, config_from_mapping
from p2pdl.core.mixing import exact_mean, mix_into
from p2pdl.core.outer import OuterOptimizer
from p2pdl.core.topology import build_graph
from p2pdl.errors import ConfigError, ShapeMismatchError
from p2pdl.strategies import build_strategy
from p2pdl.strategies.base import RoundLedger, StrategyContext
from p2pdl.wire import Frame, Limits, check_tensors, decode_frame, encode_frame

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
SIXTEEN_BIT = [torch.bfloat16, torch.float16]
LIMITS = Limits(max_frame_bytes=2**24, max_decompressed_bytes=2**24)


def make_model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def swarm_config(n: int, strategy: dict[str, Any], compression: dict[str, Any] | None = None) -> Any:
    kind = strategy["kind"]
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py")},
            "strategy": {"round_timeout": 5.0, **strategy},
            "topology": {"kind": "full" if kind in ("allreduce", "ps") else "ring"},
            "transport": {"startup_timeout": 15.0},
            "compression": compression or {},
            "peers": [{"name": f"p{i}", "address": "127.0.0.1:0"} for i in range(n)],
        }
    )


@contextlib.asynccontextmanager
async def swarm(
    config: Any, models: list[torch.nn.Module], optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
) -> AsyncIterator[list[Peer]]:
    first = Peer(config, "p0", models[0], optimizer(models[0]))
    port = await first.transport.start()
    peers = [first] + [
        Peer(config, f"p{i}", model, optimizer(model), bootstrap=(f"127.0.0.1:{port}",))
        for i, model in enumerate(models[1:], start=1)
    ]
    try:
        await asyncio.gather(*(p.start() for p in peers))
        yield peers
    finally:
        await asyncio.gather(*(p.close() for p in peers))


def regression_closure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    return closure


def peer_data(
    peers: int, steps: int, dtype: torch.dtype, seed: int = 11
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Different batches per peer and step: (inputs (16, 16), targets (16, 4))."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [
            (torch.randn(16, 16, generator=generator).to(dtype), torch.randn(16, 4, generator=generator).to(dtype))
            for _ in range(steps)
        ]
        for _ in range(peers)
    ]


# --------------------------------------------------------------------------- pure math


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_averages_of_16_bit_tensors_are_summed_in_float32_and_rounded_once(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    chunks = [torch.randn(1000).to(dtype) for _ in range(5)]
    out = torch.empty(1000, dtype=dtype)
    exact_mean(chunks, out)
    reference = (sum(c.float() for c in chunks[1:]) + chunks[0].float()) / 5  # type: ignore[operator]
    assert out.dtype == dtype
    assert torch.equal(out, reference.to(dtype))
    naive = chunks[0].clone()
    for chunk in chunks[1:]:
        naive.add_(chunk)  # rounds after every term
    naive.div_(5)
    assert not torch.equal(naive, out), "16-bit accumulation would round differently (the check can fail)"

    local = [chunks[0].clone()]
    mix_into(local, 0.25, [(0.5, [chunks[1]]), (0.25, [chunks[2].float()])])
    mixed = 0.25 * chunks[0].float() + 0.5 * chunks[1].float() + 0.25 * chunks[2].float()
    assert local[0].dtype == dtype and torch.equal(local[0], mixed.to(dtype))


def test_the_diloco_anchor_and_momentum_are_float32_for_16_bit_parameters() -> None:
    parameter = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    outer = OuterOptimizer([parameter], lr=0.7, momentum=0.9)
    assert outer.anchor[0].dtype == torch.float32
    with torch.no_grad():
        parameter.add_(0.01)
    outer.step()
    assert parameter.dtype == torch.bfloat16
    assert torch.equal(parameter, outer.anchor[0].to(torch.bfloat16))  # the parameter is the anchor, rounded
    assert outer.state_dict()["momentum_buffer"][0].dtype == torch.float32  # type: ignore[index]


# --------------------------------------------------------------------------- compressors


@pytest.mark.parametrize("error_feedback", [False, True], ids=["plain", "error_feedback"])
@pytest.mark.parametrize("kind", COMPRESSOR_KINDS)
@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_every_compressor_round_trips_16_bit_tensors_through_the_wire(
    dtype: torch.dtype, kind: Any, error_feedback: bool
) -> None:
    torch.manual_seed(1)
    tensors = {"weight": torch.randn(48, 40).to(dtype), "bias": torch.randn(40).to(dtype)}
    policy = CompressionPolicy(compressor=build_compressor(kind, ratio=0.1, rank=2, chunk=64), min_numel=100)
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    dtypes = {name: t.dtype for name, t in tensors.items()}
    codec = TensorCodec(policy, shapes, error_feedback=error_feedback, dtypes=dtypes)
    specs = codec.wire_specs()
    # The bias goes uncompressed, in the parameter's own dtype: a compatible sender must send that.
    wire_name = str(dtype).removeprefix("torch.")
    assert specs["bias.values"].dtype == wire_name
    sent_sum = {name: torch.zeros(t.shape) for name, t in tensors.items()}
    for _ in range(3):
        parts = codec.encode(tensors)
        data = encode_frame(Frame(kind="c", sender="a", round=0, step=0, tensors=parts))
        frame = decode_frame(data, limits=LIMITS, expected=specs)
        decoded = codec.decode(frame.tensors, torch.device("cpu"))
        for name, tensor in tensors.items():
            assert decoded[name].dtype == torch.float32  # the accumulation dtype
            back = decoded[name].to(dtype)
            assert back.shape == tensor.shape and torch.isfinite(back).all()
            sent_sum[name] += decoded[name]
    bias = decoded["bias"].to(dtype)
    assert torch.equal(bias, tensors["bias"]), "the pass-through is exact"
    lossless = kind == "none" or (kind, dtype) in {("bf16", torch.bfloat16), ("fp16", torch.float16)}
    if lossless:
        assert torch.equal(decoded["weight"].to(dtype), tensors["weight"])
    if error_feedback:
        # Everything sent plus what is still owed equals everything given, up to float32 rounding.
        for name, tensor in tensors.items():
            residual = codec._feedback[id(codec._compressors[name])].residual(name)
            assert residual is not None and residual.dtype == torch.float32
            torch.testing.assert_close(sent_sum[name] + residual, 3 * tensor.float(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- refusals


class _NoExchange:
    async def encode(self, frame: Frame) -> bytes:
        return b""

    async def send_encoded(self, neighbor: str, data: bytes) -> None:
        return None

    async def broadcast(self, frame: Frame, neighbors: Any) -> dict[str, Any]:
        return {}

    async def collect(self, kind: str, round_index: int, senders: Any, timeout: float) -> dict[str, Frame]:
        return {}

    def advance(self, kind: str, floor: int) -> None:
        return None

    def highest_round(self, kind: str, senders: Any) -> int | None:
        return None

    def take_latest(self, kind: str, sender: str) -> Frame | None:
        return None

    async def wait_for_senders(self, kind: str, senders: Any, count: int, timeout: float) -> set[str]:
        return set()

    def is_connected(self, neighbor: str) -> bool:
        return True


def _context(kind: str, parameters: tuple[tuple[str, torch.nn.Parameter], ...]) -> StrategyContext:
    graph = build_graph("full", ("a", "b"))

    async def run_compute(fn: Callable[[], Any]) -> Any:
        return fn()

    return StrategyContext(
        name="a",
        topology=lambda: graph,
        parameters=parameters,
        optimizer=torch.optim.SGD([p for _, p in parameters], lr=0.1),
        configured=graph.names,
        device=torch.device("cpu"),
        exchange=_NoExchange(),
        run_compute=run_compute,
        config=StrategyConfig(kind=kind),  # type: ignore[arg-type]
        ledger=RoundLedger(),
    )


@pytest.mark.parametrize("kind", ["gossip", "allreduce", "async-gossip", "ps", "push-sum"])
def test_a_parameter_dtype_the_wire_cannot_carry_is_refused_by_name(kind: str) -> None:
    parameters = (
        ("weight", torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))),
        ("phase", torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))),
    )
    with pytest.raises(ConfigError) as refused:
        build_strategy(_context(kind, parameters))
    message = str(refused.value)
    assert f"strategy.kind = {kind!r}" in message and "phase (complex64)" in message
    assert "weight" not in message.split("refused:")[1], "a bfloat16 parameter is not refused"


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_allreduce_chunks_travel_in_the_parameter_dtype_and_a_mixed_model_in_float32(dtype: torch.dtype) -> None:
    uniform = tuple(make_model(dtype).named_parameters())
    spec = build_strategy(_context("allreduce", uniform)).expected_tensors("rs2", "b")["chunk"]
    assert spec.dtype == str(dtype).removeprefix("torch.")
    model = make_model(dtype)
    model[2].float()  # the head in float32, the rest 16-bit
    spec = build_strategy(_context("allreduce", tuple(model.named_parameters()))).expected_tensors("rs2", "b")["chunk"]
    assert spec.dtype == "float32"
    wrong = Frame(kind="rs2", sender="b", round=0, step=0, tensors={"chunk": torch.zeros(spec.shape, dtype=dtype)})
    with pytest.raises(ShapeMismatchError, match="expected float32"):
        check_tensors(wrong, {"chunk": spec})


# --------------------------------------------------------------------------- every strategy, in real peers

CASES: dict[str, tuple[dict[str, Any], dict[str, Any] | None, bool]] = {
    # name: ([strategy], [compression], exact: every peer ends bit-identical)
    "gossip": ({"kind": "gossip"}, None, False),
    "gossip-clip": ({"kind": "gossip", "robust": "clip"}, None, False),
    "choco-topk": ({"kind": "gossip"}, {"kind": "topk", "ratio": 0.1, "min_numel": 64, "choco_gamma": 0.3}, False),
    "allreduce": ({"kind": "allreduce"}, None, True),
    "allreduce-int8-ef": ({"kind": "allreduce"}, {"kind": "int8", "min_numel": 64}, True),
    "allreduce-powersgd-ef": ({"kind": "allreduce"}, {"kind": "powersgd", "rank": 2, "min_numel": 64}, True),
    "allreduce-local-sgd": ({"kind": "allreduce", "local_steps": 2}, None, True),
    "allreduce-diloco": ({"kind": "allreduce", "local_steps": 2, "outer": "diloco"}, None, True),
    "async-gossip": ({"kind": "async-gossip"}, None, False),
    "ps-sync": ({"kind": "ps"}, None, False),
    "ps-sync-topk": ({"kind": "ps"}, {"kind": "topk", "ratio": 0.1, "min_numel": 64}, False),
    "ps-sync-local-sgd": ({"kind": "ps", "local_steps": 2}, None, False),
    "ps-async": ({"kind": "ps", "ps_mode": "async"}, None, False),
    "push-sum": ({"kind": "push-sum"}, None, False),
}
STEPS = 4


# Variants of a path the fast tier already covers (clipping, PowerSGD, H > 1, the server's top-k
# and local SGD) run in the slow tier only.
SLOW_CASES = {"gossip-clip", "allreduce-powersgd-ef", "allreduce-local-sgd", "ps-sync-topk", "ps-sync-local-sgd"}


@pytest.mark.parametrize(
    "dtype",
    # bf16 in the fast tier; fp16 takes the same code paths with another rounding, in the slow tier
    [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
async def test_every_strategy_trains_a_16_bit_model(case: str, dtype: torch.dtype) -> None:
    strategy, compression, exact = CASES[case]
    models = [make_model(dtype) for _ in range(3)]  # the same start; different data per peer
    data = peer_data(3, STEPS, dtype)
    config = swarm_config(3, strategy, compression)
    async with swarm(config, models, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5)) as peers:
        before = flat(peers[0].model).clone()
        for step in range(STEPS):
            await asyncio.gather(*(p.step(regression_closure(p.model, *data[i][step])) for i, p in enumerate(peers)))
        rounds = [p.status()["rounds"] for p in peers]
    for peer in peers:
        assert all(p.dtype == dtype for p in peer.model.parameters()), f"{peer.name} changed its dtype"
        assert torch.isfinite(flat(peer.model)).all(), f"{peer.name} has non-finite parameters"
    assert not torch.equal(flat(peers[0].model), before), "the swarm did not move"
    assert sum(r["complete"] for r in rounds) > 0, f"no round completed: {rounds}"
    if exact:
        for peer in peers[1:]:
            assert torch.equal(flat(peer.model), flat(peers[0].model)), f"{peer.name} differs from p0"


# --------------------------------------------------------------------------- hostile frames


@pytest.mark.parametrize("kind", ["gossip", "allreduce"])
async def test_a_frame_of_the_wrong_dtype_is_refused_and_counted(kind: str) -> None:
    models = [make_model(torch.bfloat16) for _ in range(2)]
    data = peer_data(2, 2, torch.bfloat16)
    config = swarm_config(2, {"kind": kind})
    async with swarm(config, models, lambda m: torch.optim.SGD(m.parameters(), lr=0.05)) as (a, b):
        before = flat(b.model).clone()
        if kind == "gossip":
            tensors = {name: p.detach().float() for name, p in a.model.named_parameters()}  # right shapes, float32
            frame = Frame(kind="params", sender="p0", round=0, step=0, meta={"degree": 1}, tensors=tensors)
        else:
            chunk = torch.zeros(-(-before.numel() // 2), dtype=torch.float32)  # a chunk of 2, in float32
            frame = Frame(kind="rs2", sender="p0", round=0, step=0, tensors={"chunk": chunk})
        await a.transport.send_encoded("p1", encode_frame(frame))
        for _ in range(200):
            rejected = b.status()["frames_rejected"]
            if rejected["total"] >= 1:
                break
            await asyncio.sleep(0.02)
        assert rejected["by_reason"] == {"shape": 1}
        assert torch.equal(flat(b.model), before)
        # The link survived: an honest round still completes, in bfloat16.
        results = await asyncio.gather(
            *(p.step(regression_closure(p.model, *data[i][0])) for i, p in enumerate((a, b)))
        )
        outcome = results[1].gradient_round if kind == "allreduce" else results[1].parameter_round
        assert outcome is not None and outcome.complete
        assert all(p.dtype == torch.bfloat16 for p in b.model.parameters())


# --------------------------------------------------------------------------- DDP parity

DDP_STEPS = 8
DDP_LR, DDP_MOMENTUM = 0.1, 0.9
DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def run(rank, world, blob_path, port, out):
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
        dist.init_process_group("gloo", rank=rank, world_size=world)
        blob = torch.load(blob_path, weights_only=True)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        model = model.to(torch.bfloat16)
        model.load_state_dict(blob["init"])
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=blob["lr"], momentum=blob["momentum"])
        for x, y in zip(blob["inputs"][rank], blob["targets"][rank]):
            optimizer.zero_grad()
            (ddp(x) - y).pow(2).mean().backward()
            optimizer.step()
        if rank == 0:
            torch.save(model.state_dict(), out)
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(2, sys.argv[1], sys.argv[2], sys.argv[3]), nprocs=2)
    """
)


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in bfloat16 units in the last place between equally shaped tensors."""
    spacing = torch.finfo(torch.bfloat16).eps * torch.maximum(a.float().abs(), b.float().abs()).clamp_min(2**-20)
    return int(((a.float() - b.float()).abs() / spacing).ceil().max())


@pytest.mark.slow
@pytest.mark.timeout(300)  # two spawned gloo ranks import torch: most of a minute on a busy machine
async def test_bf16_allreduce_matches_ddp_in_bf16(tmp_path: Path) -> None:
    init = make_model(torch.bfloat16, seed=3).state_dict()
    data = peer_data(2, DDP_STEPS, torch.bfloat16, seed=5)
    blob = {
        "init": init,
        "inputs": [[x for x, _ in peer] for peer in data],
        "targets": [[y for _, y in peer] for peer in data],
        "lr": DDP_LR,
        "momentum": DDP_MOMENTUM,
    }
    torch.save(blob, tmp_path / "blob.pt")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    ddp = await asyncio.create_subprocess_exec(
        sys.executable,
        str(tmp_path / "ddp.py"),
        str(tmp_path / "blob.pt"),
        str(free_ports(1)[0]),
        str(tmp_path / "ddp.pt"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    models = [make_model(torch.bfloat16) for _ in range(2)]
    for model in models:
        model.load_state_dict(init)
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] = lambda m: torch.optim.SGD(  # noqa: E731
        m.parameters(), lr=DDP_LR, momentum=DDP_MOMENTUM
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the DDP ranks run: the same kernels, the same roundings
    try:
        async with swarm(swarm_config(2, {"kind": "allreduce"}), models, optimizer) as peers:
            for step in range(DDP_STEPS):
                await asyncio.gather(
                    *(p.step(regression_closure(p.model, *data[i][step])) for i, p in enumerate(peers))
                )
    finally:
        torch.set_num_threads(threads)
    output, _ = await asyncio.wait_for(ddp.communicate(), timeout=240)
    assert ddp.returncode == 0, output.decode(errors="replace")[-3000:]
    reference = torch.load(tmp_path / "ddp.pt", weights_only=True)

    # The peers agree bit for bit and kept bfloat16.
    assert torch.equal(flat(models[0]), flat(models[1]))
    assert all(p.dtype == torch.bfloat16 for p in models[0].parameters())
    # Bit-identical to DDP, not merely close. With 2 ranks DDP halves each bf16 gradient (exact)
    # and gloo sums the halves, one rounding to bf16: round(g0/2 + g1/2). p2pdl sums g0 + g1 in
    # float32 (exact for two bf16 values of nearby magnitude), halves it (exact) and rounds once:
    # the same number. Forward, backward and the bf16 SGD step run the same kernels on one thread
    # in both, so every step, and therefore the end, must agree to the last bit.
    for name, parameter in models[0].named_parameters():
        assert torch.equal(parameter, reference[name]), (
            f"{name} is {_ulps_apart(parameter, reference[name])} bf16 ulps from DDP"
        )
    # The comparison can fail: training on p0's batches alone ends far from DDP.
    alone = make_model(torch.bfloat16)
    alone.load_state_dict(init)
    solo = optimizer(alone)
    for x, y in data[0]:
        solo.zero_grad()
        (alone(x) - y).pow(2).mean().backward()
        solo.step()
    assert max(_ulps_apart(p, reference[name]) for name, p in alone.named_parameters()) > 16
