"""The training loop's parts: optimizer and schedule from the config, accumulation, clipping after
averaging, mixed precision with one skip decision for the swarm, resume, the workload hooks."""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from p2pdl import Peer
from p2pdl.config import Config, OptimizerConfig, ScheduleConfig, config_from_mapping
from p2pdl.errors import ConfigError, WorkloadError
from p2pdl.train.build import build_model, build_training
from p2pdl.train.checkpoints import load_checkpoint, save_checkpoint
from p2pdl.train.loop import PeerOptions, run_peer
from p2pdl.train.optim import build_optimizer, build_schedule
from p2pdl.train.precision import MixedPrecision
from p2pdl.train.shards import ShardedBatches
from p2pdl.train.update import TrainStep
from p2pdl.train.workload import LoadedWorkload, load_workload
from tests.helpers import LOCAL_CLUSTER, PEER_ENV, free_ports, read_json, write_config

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "peers"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def config(run: dict[str, Any] | None = None, **sections: Any) -> Config:
    data: dict[str, Any] = {
        "run": {"workload": str(PEERS / "mnist1d_cnn.py"), **(run or {})},
        "peers": [{"name": "a", "address": "127.0.0.1:0"}, {"name": "b", "address": "127.0.0.1:0"}],
        **sections,
    }
    return config_from_mapping(data)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def synthetic_workload(examples: int = 256, seed: int = 0) -> LoadedWorkload:
    """A real classification problem (a fixed random linear teacher), built in memory."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(examples, 8, generator=generator)
    targets = (inputs @ torch.randn(8, 3, generator=generator)).argmax(dim=1)

    def load_shard(index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs[index::count], targets[index::count]

    def evaluate(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        with torch.no_grad():
            output = model(inputs)
        return {"test_accuracy": float((output.argmax(1) == targets).float().mean())}

    return LoadedWorkload(
        path=PEERS / "synthetic.py",
        name="synthetic",
        description="",
        build_model=mlp,
        load_shard=load_shard,
        loss_fn=torch.nn.functional.cross_entropy,
        evaluate=evaluate,
    )


# --------------------------------------------------------------------------- config


def test_legacy_run_keys_describe_the_optimizer() -> None:
    settings = config({"optimizer": "sgd", "lr": 0.2, "momentum": 0.5}).optimizer_settings
    assert (settings.kind, settings.lr, settings.momentum) == ("sgd", 0.2, 0.5)
    adam = config({"optimizer": "adam", "lr": 0.01}).optimizer_settings
    assert (adam.kind, adam.lr, adam.momentum) == ("adam", 0.01, 0.0)


def test_optimizer_and_schedule_sections_load() -> None:
    loaded = config(
        {"grad_clip": 1.0, "accumulate": 2, "precision": "bf16", "param_dtype": "bfloat16"},
        optimizer={"kind": "adamw", "lr": 0.003, "betas": [0.9, 0.95], "weight_decay": 0.1},
        schedule={"kind": "cosine", "warmup_steps": 10, "final_lr_fraction": 0.1},
    )
    assert loaded.optimizer_settings == OptimizerConfig(kind="adamw", lr=0.003, betas=(0.9, 0.95), weight_decay=0.1)
    assert loaded.schedule == ScheduleConfig(kind="cosine", warmup_steps=10, final_lr_fraction=0.1)
    optimizer = build_optimizer(loaded.optimizer_settings, mlp())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize(
    ("run", "sections", "key"),
    [
        ({"grad_clip": -1.0}, {}, "run.grad_clip"),
        ({"accumulate": 0}, {}, "run.accumulate"),
        ({"precision": "fp8"}, {}, "run.precision"),
        ({"param_dtype": "float64"}, {}, "run.param_dtype"),
        ({"precision": "fp16", "param_dtype": "float16"}, {}, "run.precision = 'fp16' needs run.param_dtype"),
        ({}, {"optimizer": {"kind": "lion"}}, "optimizer.kind"),
        ({}, {"optimizer": {"lr": 0.0}}, "optimizer.lr"),
        ({}, {"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas"),
        ({}, {"optimizer": {"betas": [0.9]}}, "optimizer.betas"),
        ({}, {"optimizer": {"eps": 0.0}}, "optimizer.eps"),
        ({}, {"optimizer": {"weight_decay": -0.1}}, "optimizer.weight_decay"),
        ({}, {"optimizer": {"kind": "sgd", "momentum": 1.0}}, "optimizer.momentum"),
        ({}, {"optimizer": {"kind": "adamw", "momentum": 0.9}}, "optimizer.momentum and optimizer.nesterov"),
        ({}, {"optimizer": {"kind": "sgd", "nesterov": True}}, "optimizer.nesterov needs"),
        ({}, {"optimizer": {"kind": "sgd", "betas": [0.8, 0.9]}}, "optimizer.betas and optimizer.eps"),
        ({"lr": 0.1}, {"optimizer": {"lr": 0.2}}, "run.lr: set it in [optimizer]"),
        ({}, {"schedule": {"kind": "step"}}, "schedule.kind"),
        ({}, {"schedule": {"warmup_steps": -1}}, "schedule.warmup_steps"),
        ({}, {"schedule": {"kind": "cosine", "final_lr_fraction": 1.5}}, "schedule.final_lr_fraction"),
        ({}, {"schedule": {"final_lr_fraction": 0.5}}, "schedule.final_lr_fraction applies"),
        ({}, {"schedule": {"total_steps": -1}}, "schedule.total_steps"),
        ({"steps": 10}, {"schedule": {"warmup_steps": 11}}, "schedule.warmup_steps (11)"),
        ({"steps": 10}, {"schedule": {"kind": "cosine", "total_steps": 5}}, "schedule.total_steps (5)"),
        ({"precision": "fp16"}, {"compression": {"kind": "int8"}}, "run.precision = 'fp16' cannot"),
        ({"grad_clip": 1.0}, {"strategy": {"kind": "ps"}}, "run.grad_clip and run.precision = 'fp16'"),
    ],
)
def test_each_bad_training_key_is_refused_by_name(run: dict[str, Any], sections: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config(run, **sections)


def test_every_shipped_config_still_loads() -> None:
    from p2pdl.config import load_config

    for path in sorted((REPO / "configs").glob("*.toml")):
        loaded = load_config(path)
        assert loaded.optimizer_settings.lr > 0, path
    gpt = load_config(REPO / "configs" / "gpt_tiny_allreduce4.toml")
    assert gpt.optimizer_settings.kind == "adamw" and gpt.schedule.kind == "cosine" and gpt.run.grad_clip > 0


# --------------------------------------------------------------------------- schedule


def learning_rates(optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_equals_torchs_schedulers_step_by_step(kind: str) -> None:
    peak, warmup, total, floor = 0.003, 7, 40, 0.1
    settings = ScheduleConfig(kind=kind, warmup_steps=warmup, final_lr_fraction=floor)  # type: ignore[arg-type]
    ours_optimizer = torch.optim.AdamW(mlp().parameters(), lr=peak)
    ours = learning_rates(ours_optimizer, build_schedule(settings, ours_optimizer, total), total)

    reference_optimizer = torch.optim.AdamW(mlp().parameters(), lr=peak)
    ramp = LinearLR(reference_optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    decay: Any
    if kind == "cosine":
        decay = CosineAnnealingLR(reference_optimizer, T_max=total - warmup, eta_min=peak * floor)
    else:
        decay = LinearLR(reference_optimizer, start_factor=1.0, end_factor=floor, total_iters=total - warmup)
    reference = learning_rates(
        reference_optimizer, SequentialLR(reference_optimizer, [ramp, decay], milestones=[warmup]), total
    )
    assert ours == reference
    # The curve's anchors: a linear ramp, one peak at the end of warm-up, then down towards the floor.
    assert ours[0] == pytest.approx(peak / (warmup + 1))
    assert max(ours) == pytest.approx(peak) and ours.index(max(ours)) == warmup
    assert all(a >= b for a, b in zip(ours[warmup:], ours[warmup + 1 :], strict=False))
    assert ours[-1] > peak * floor and ours[-1] < peak * 0.2


def test_constant_schedule_holds_the_lr() -> None:
    optimizer = torch.optim.SGD(mlp().parameters(), lr=0.05)
    rates = learning_rates(optimizer, build_schedule(ScheduleConfig(), optimizer, 20), 20)
    assert rates == [0.05] * 20


# --------------------------------------------------------------------------- accumulation


def gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_k_micro_batches_of_b_equal_one_batch_of_k_times_b() -> None:
    workload = synthetic_workload()
    small = ShardedBatches(workload, config({"batch_size": 8, "accumulate": 4}).run, 2, CPU)
    large = ShardedBatches(workload, config({"batch_size": 32}).run, 2, CPU)
    for step in (0, 3, 7):  # step 7 crosses into the second epoch (128 examples, batches of 32)
        micro, whole = small.batch([1], step), large.batch([1], step)
        assert micro is not None and whole is not None
        assert len(micro) == 4 and all(len(x) == 8 for x, _ in micro)
        # The same examples in the same order: data position depends on (step, micro-batch) only.
        assert torch.equal(torch.cat([x for x, _ in micro]), whole[0][0])
        assert torch.equal(torch.cat([y for _, y in micro]), whole[0][1])
        losses = []
        grads = []
        for batches in (micro, whole):
            model = mlp()
            step_fn = TrainStep(
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                None,
                MixedPrecision("fp32", CPU),
                loss_fn=workload.loss_fn,
            )
            losses.append(float(step_fn.backward(batches)))
            grads.append(gradients(model))
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
        for accumulated, direct in zip(*grads, strict=True):
            torch.testing.assert_close(accumulated, direct, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- precision


def train_alone(precision: str, param_dtype: str = "float32", steps: int = 30) -> list[float]:
    workload = synthetic_workload()
    loaded = config(
        {"precision": precision, "param_dtype": param_dtype, "batch_size": 32},
        optimizer={"kind": "adamw", "lr": 0.01},
    )
    model = build_model(workload, 0, CPU, loaded.run.param_dtype)
    training = build_training(loaded, workload, model, CPU)
    data = ShardedBatches(workload, loaded.run, 1, CPU)
    losses = []
    for step in range(steps):
        batch = data.batch([0], step)
        assert batch is not None
        training.optimizer.zero_grad(set_to_none=True)
        losses.append(float(training.step.backward(batch)))
        training.step.optimizer_step()
    assert training.step.applied + training.step.skipped == steps
    return losses


@pytest.mark.parametrize(("precision", "param_dtype"), [("bf16", "float32"), ("fp16", "float32"), ("bf16", "bfloat16")])
def test_low_precision_trains_on_cpu(precision: str, param_dtype: str) -> None:
    losses = train_alone(precision, param_dtype)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_param_dtype_converts_the_model() -> None:
    model = build_model(synthetic_workload(), 0, CPU, "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------- two peers under allreduce


class InfGradient(torch.autograd.Function):
    """Identity forward; backward sends +inf (an fp16 overflow that the loss does not show)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("inf"))


def allreduce_config(run: dict[str, Any]) -> Config:
    return config(
        run,
        optimizer={"kind": "sgd", "lr": 0.5},
        strategy={"kind": "allreduce", "round_timeout": 5.0},
        topology={"kind": "full"},
        transport={"startup_timeout": 10.0, "heartbeat_interval": 1.0},
    )


@contextlib.asynccontextmanager
async def two_training_peers(loaded: Config) -> AsyncIterator[list[tuple[Peer, TrainStep]]]:
    built = []
    for _ in range(2):
        model = mlp(0)
        training = build_training(loaded, synthetic_workload(), model, CPU)
        built.append((model, training))
    b = Peer(loaded, "b", built[1][0], built[1][1].optimizer, hooks=built[1][1].step)
    port_b = await b.transport.start()
    a = Peer(
        loaded, "a", built[0][0], built[0][1].optimizer, hooks=built[0][1].step, bootstrap=(f"127.0.0.1:{port_b}",)
    )
    try:
        await asyncio.gather(a.start(), b.start())
        yield [(a, built[0][1].step), (b, built[1][1].step)]
    finally:
        await asyncio.gather(a.close(), b.close())


def batch_for(peer_index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Different data on each peer: the averaged gradient differs from either peer's own."""
    generator = torch.Generator().manual_seed(100 + peer_index)
    inputs = torch.randn(16, 8, generator=generator) * (1 + 3 * peer_index)
    return [(inputs, torch.randint(0, 3, (16,), generator=generator))]


async def test_clipping_applies_to_the_averaged_gradient() -> None:
    clip = 0.05
    loaded = allreduce_config({"grad_clip": clip})
    # The reference: each peer's gradient, their average, clip_grad_norm_, one SGD step.
    own = []
    for index in range(2):
        model = mlp(0)
        torch.nn.functional.cross_entropy(model(batch_for(index)[0][0]), batch_for(index)[0][1]).backward()
        own.append(gradients(model))
    reference = mlp(0)
    for parameter, *grads in zip(reference.parameters(), *own, strict=True):
        parameter.grad = (grads[0] + grads[1]) / 2
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
    assert norm > 4 * clip  # the clip really bites
    torch.optim.SGD(reference.parameters(), lr=0.5).step()

    async with two_training_peers(loaded) as peers:

        def closure(index: int) -> Callable[[], torch.Tensor]:
            return lambda: peers[index][1].backward(batch_for(index))

        await asyncio.gather(*(peer.step(closure(i)) for i, (peer, _) in enumerate(peers)))
        for peer, update in peers:
            assert update.last_grad_norm == pytest.approx(float(norm), rel=1e-6)
            for ours, expected in zip(peer.model.parameters(), reference.parameters(), strict=True):
                torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
async def test_one_peers_overflow_makes_every_peer_skip(precision: str) -> None:
    loaded = allreduce_config({"precision": precision})
    async with two_training_peers(loaded) as peers:
        start = [torch.cat([p.detach().reshape(-1) for p in peer.model.parameters()]) for peer, _ in peers]
        scales = [u.precision.scaler.get_scale() if u.precision.scaler else None for _, u in peers]
        plain = [update.loss_fn for _, update in peers]

        def closure(index: int, overflow: bool) -> Callable[[], torch.Tensor]:
            update, inner = peers[index][1], plain[index]

            def poisoned(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return inner(InfGradient.apply(output) if overflow else output, target)

            update.loss_fn = poisoned
            return lambda: update.backward(batch_for(index))

        # Step 1: only a's gradients overflow. Neither peer may step; both must agree.
        await asyncio.gather(*(peer.step(closure(i, i == 0)) for i, (peer, _) in enumerate(peers)))
        for (peer, update), before in zip(peers, start, strict=True):
            assert update.skipped == 1 and update.applied == 0
            assert torch.equal(torch.cat([p.detach().reshape(-1) for p in peer.model.parameters()]), before)
            assert peer.optimizer.param_groups[0]["lr"] == 0.5
        if precision == "fp16":
            after = [u.precision.scaler.get_scale() for _, u in peers]  # type: ignore[union-attr]
            assert after[0] == after[1] == scales[0] / 2  # type: ignore[operator]
        # Step 2: clean gradients everywhere; both step to the same parameters.
        await asyncio.gather(*(peer.step(closure(i, False)) for i, (peer, _) in enumerate(peers)))
        flat = [torch.cat([p.detach().reshape(-1) for p in peer.model.parameters()]) for peer, _ in peers]
        assert all(update.applied == 1 for _, update in peers)
        assert torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], start[0])


# --------------------------------------------------------------------------- checkpoints and hooks


def test_checkpoint_restores_schedule_and_scaler(tmp_path: Path) -> None:
    def setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
        model = mlp()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        settings = ScheduleConfig(kind="cosine", warmup_steps=3, final_lr_fraction=0.1)
        return model, optimizer, build_schedule(settings, optimizer, 20), torch.amp.GradScaler("cpu", init_scale=64.0)

    model, optimizer, scheduler, scaler = setup()
    learning_rates(optimizer, scheduler, 9)
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first scale() on
    scaler.update(new_scale=8.0)
    save_checkpoint(model, optimizer, 9, tmp_path / "c.pt", scheduler=scheduler, scaler=scaler)
    restored = setup()
    assert load_checkpoint(restored[0], restored[1], tmp_path / "c.pt", scheduler=restored[2], scaler=restored[3]) == 9
    assert restored[3].get_scale() == 8.0
    assert learning_rates(restored[1], restored[2], 11) == learning_rates(optimizer, scheduler, 11)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["data_position"] == 9


def test_workload_hooks_replace_the_config(tmp_path: Path) -> None:
    path = tmp_path / "hooked.py"
    path.write_text(
        "import torch\n"
        "from tests.test_training_loop import synthetic_workload\n"
        "_w = synthetic_workload()\n"
        "build_model, load_shard, loss_fn, evaluate = _w.build_model, _w.load_shard, _w.loss_fn, _w.evaluate\n"
        "HEADLINE = ('test_accuracy', 'max')\n"
        "def build_optimizer(model, config):\n"
        "    return torch.optim.SGD(model.parameters(), lr=0.123)\n"
        "def build_schedule(optimizer, config):\n"
        "    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)\n"
        "def sample(model, device):\n"
        "    return 'hello'\n"
    )
    workload = load_workload(path)
    training = build_training(config(), workload, mlp(), CPU)
    assert isinstance(training.optimizer, torch.optim.SGD) and training.optimizer.param_groups[0]["lr"] == 0.123
    assert isinstance(training.scheduler, torch.optim.lr_scheduler.StepLR)
    assert workload.sample is not None and workload.sample(mlp(), CPU) == "hello"
    path.write_text(path.read_text().replace("('test_accuracy', 'max')", "('val_loss', 'lowest')"))
    with pytest.raises(WorkloadError, match="HEADLINE"):
        load_workload(path)


def test_gpt_run_writes_a_text_sample_and_reports_val_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 400)
    monkeypatch.setenv("P2PDL_GPT_TEXT", str(text))
    monkeypatch.setenv("P2PDL_CACHE_DIR", str(tmp_path / "cache"))
    [port] = free_ports(1)
    loaded = config_from_mapping(
        {
            "run": {"workload": str(PEERS / "gpt_tiny.py"), "steps": 2, "batch_size": 4, "eval_every": 0},
            "optimizer": {"kind": "adamw", "lr": 0.003},
            "strategy": {"kind": "allreduce"},
            "topology": {"kind": "full"},
            "peers": [{"name": "p0", "address": f"127.0.0.1:{port}"}],
        }
    )
    summary = asyncio.run(run_peer(loaded, "p0", PeerOptions(out_dir=tmp_path / "p0")))
    sample = (tmp_path / "p0" / "sample.txt").read_text(encoding="utf-8")
    assert sample.startswith("def ") and len(sample) > len("def ")
    assert summary["headline"]["metric"] == "val_loss" and summary["headline"]["goal"] == "min"
    assert math.isfinite(summary["headline"]["value"])
    assert summary["test_accuracy"] is not None  # kept for compatibility
    assert summary["optimizer_steps"] == 2


# --------------------------------------------------------------------------- resume, two real processes


def cluster(config_path: Path, out: Path, steps: int, *extra: str) -> None:
    command = [sys.executable, str(LOCAL_CLUSTER), str(config_path), "--out", str(out), "--steps", str(steps)]
    result = subprocess.run(
        [*command, "--no-progress", "--threads", "1", "--timeout", "300", *extra],
        capture_output=True,
        text=True,
        timeout=400,
        env={**__import__("os").environ, **PEER_ENV},
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three short swarms, started one after the other
@pytest.mark.usefixtures("mnist1d_built")
def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path: Path) -> None:
    names = ["p0", "p1"]
    path = write_config(
        tmp_path / "resume.toml",
        names=names,
        ports=free_ports(2),
        run={"steps": 12, "batch_size": 16, "grad_clip": 0.5, "accumulate": 2},
        strategy={"kind": "allreduce"},
        topology={"kind": "full"},
    )
    path.write_text(
        path.read_text().replace(
            "[strategy]",
            '[optimizer]\nkind = "adamw"\nlr = 0.01\nbetas = [0.9, 0.95]\nweight_decay = 0.1\n\n'
            '[schedule]\nkind = "cosine"\nwarmup_steps = 3\nfinal_lr_fraction = 0.1\ntotal_steps = 12\n\n[strategy]',
        )
    )
    cluster(path, tmp_path / "whole", 12)
    cluster(path, tmp_path / "split", 5)
    cluster(path, tmp_path / "split", 12, "--resume")
    for name in names:
        whole = torch.load(tmp_path / "whole" / name / "model.pt", weights_only=True)
        resumed = torch.load(tmp_path / "split" / name / "model.pt", weights_only=True)
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[key], resumed[key]) for key in whole), name
        assert read_json(tmp_path / "split" / name / "summary.json")["steps"] == 12


def test_a_joiner_places_its_schedule_at_the_swarms_step() -> None:
    loaded = config(
        {"steps": 40},
        optimizer={"kind": "adamw", "lr": 0.01},
        schedule={"kind": "cosine", "warmup_steps": 5, "final_lr_fraction": 0.1},
    )
    veteran = build_training(loaded, synthetic_workload(), mlp(), CPU)
    rates = learning_rates(veteran.optimizer, veteran.scheduler, 17)
    joiner = build_training(loaded, synthetic_workload(), mlp(), CPU)
    joiner.optimizer.load_state_dict(veteran.optimizer.state_dict())  # what a state download carries
    joiner.step.state_loaded(17)
    assert joiner.optimizer.param_groups[0]["lr"] == pytest.approx(veteran.optimizer.param_groups[0]["lr"])
    assert learning_rates(joiner.optimizer, joiner.scheduler, 10) == pytest.approx(
        learning_rates(veteran.optimizer, veteran.scheduler, 10)
    )
    assert rates[5] == pytest.approx(0.01)
