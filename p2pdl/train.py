"""The CLI's training loop, built on the public :class:`~p2pdl.node.Peer` API and a workload.

It loads the workload named by the config, builds the model (seeded identically on every peer),
takes this peer's shard and runs ``run.steps`` steps, evaluating every ``run.eval_every`` steps.
It writes, under ``--out``: ``metrics.jsonl`` (one JSON object per step), ``model.pt`` (the final
``state_dict``) and ``summary.json``. A stop request (SIGTERM, Ctrl+C) lets the current step finish
(each step is bounded by the round timeout), then saves and leaves cleanly.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from p2pdl.config import Config, RunConfig
from p2pdl.data import BatchStream
from p2pdl.node import Peer, StepResult, resolve_device
from p2pdl.workload import LoadedWorkload, load_workload

log = logging.getLogger(__name__)


def build_optimizer(run: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer every peer (and the DDP reference) uses for a run config."""
    if run.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)


def build_model(workload: LoadedWorkload, seed: int, device: torch.device) -> torch.nn.Module:
    """Identical initial parameters on every peer: seed, then build."""
    torch.manual_seed(seed)
    return workload.build_model().to(device)


def data_seed(run: RunConfig, shard_index: int) -> int:
    """Each peer shuffles its own shard with its own stream."""
    return run.seed * 1000 + shard_index


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync and rename, so a crash never leaves a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def save_model(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)


def save_snapshot(model: torch.nn.Module, out_dir: Path, step: int) -> None:
    """The flat float parameters after ``step`` steps, for consensus plots."""
    folder = out_dir / "snapshots"
    folder.mkdir(exist_ok=True)
    flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
    torch.save(flat, folder / f"step_{step}.pt")


class MetricsWriter:
    """Append-only JSON lines; flushed every few records and on close."""

    def __init__(self, path: Path) -> None:
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._pending = 0

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._pending += 1
        if self._pending >= 20:
            self._handle.flush()
            self._pending = 0

    def close(self) -> None:
        self._handle.close()


def _batches(stream: BatchStream, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for inputs, targets in stream:
        yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


async def run_peer(
    config: Config,
    name: str,
    *,
    out_dir: Path,
    listen: str | None = None,
    stop: asyncio.Event | None = None,
    snapshot_every: int = 0,
) -> dict[str, Any]:
    """Train this peer to ``config.run.steps`` (or until ``stop`` is set); return the summary."""
    run = config.run
    device = resolve_device(run.device)
    if run.torch_threads:
        torch.set_num_threads(run.torch_threads)
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    workload = load_workload(run.workload)
    shard_index = config.peer_names.index(name)
    model = build_model(workload, run.seed, device)
    optimizer = build_optimizer(run, model)
    inputs, targets = workload.load_shard(shard_index, len(config.peers))
    stream = BatchStream(inputs, targets, run.batch_size, seed=data_seed(run, shard_index), start_step=0)
    batches = _batches(stream, device)
    metrics = MetricsWriter(out_dir / "metrics.jsonl")
    started = time.perf_counter()
    stopped_early = False
    result: StepResult | None = None
    try:
        async with Peer(config, name, model, optimizer, device=device, listen=listen) as peer:
            log.info("%s training %s for %d steps on %s", name, workload.name, run.steps, device)
            for _ in range(run.steps):
                if stop is not None and stop.is_set():
                    stopped_early = True
                    break
                batch_inputs, batch_targets = next(batches)

                def closure(x: torch.Tensor = batch_inputs, y: torch.Tensor = batch_targets) -> torch.Tensor:
                    loss = workload.loss_fn(model(x), y)
                    torch.autograd.backward(loss)
                    return loss

                result = await peer.step(closure)
                record: dict[str, Any] = {
                    "step": result.step,
                    "time": round(time.perf_counter() - started, 4),
                    "loss": result.loss,
                    "bytes_sent": peer.transport.stats.bytes_sent,
                    "bytes_received": peer.transport.stats.bytes_received,
                    "rounds_partial": peer.ledger.partial,
                }
                for outcome in (result.gradient_round, result.parameter_round):
                    if outcome is not None:
                        record["round"] = outcome.round
                        record["round_seconds"] = round(outcome.seconds, 5)
                        if outcome.missing:
                            record["missing"] = list(outcome.missing)
                done = result.step + 1
                if run.eval_every and done % run.eval_every == 0 and done != run.steps:
                    evaluation = await peer.run_compute(lambda: workload.evaluate(model, device))
                    peer.record_eval(evaluation)
                    record.update(evaluation)
                metrics.write(record)
                if snapshot_every and done % snapshot_every == 0:
                    await peer.run_compute(functools.partial(save_snapshot, model, out_dir, done))
            evaluation = await peer.run_compute(lambda: workload.evaluate(model, device))
            peer.record_eval(evaluation)
            final_step = peer.step_index
            metrics.write(
                {
                    "step": final_step - 1,
                    "time": round(time.perf_counter() - started, 4),
                    "final": True,
                    **evaluation,
                }
            )
            status = peer.status()
    finally:
        metrics.close()
    save_model(model, out_dir / "model.pt")
    summary = {
        "name": name,
        "steps": final_step,
        "stopped_early": stopped_early,
        "final_loss": None if result is None else result.loss,
        "test_accuracy": evaluation.get("test_accuracy"),
        "test_loss": evaluation.get("test_loss"),
        "bytes_sent": status["bytes_sent"],
        "bytes_received": status["bytes_received"],
        "frames_rejected": status["frames_rejected"],
        "rounds": status["rounds"],
        "strategy": config.strategy.kind,
        "device": str(device),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary
