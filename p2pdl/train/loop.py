"""The CLI's training loop, built on the public :class:`~p2pdl.peer.node.Peer` API and a workload.

It loads the workload named by the config, builds the model (seeded identically on every peer),
takes this peer's shard and runs ``run.steps`` steps, evaluating every ``run.eval_every`` steps.
It writes, under ``--out``: ``metrics.jsonl`` (one JSON object per step), ``summary.json``, and the
checkpoint, final model and snapshots of :mod:`p2pdl.train.checkpoints`, all through
:mod:`p2pdl.train.files`. A stop request (SIGTERM, Ctrl+C) lets the current step finish
(each step is bounded by the round timeout), then saves and leaves cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from p2pdl.config import Config, RunConfig
from p2pdl.errors import AllReduceIncompleteError
from p2pdl.peer.node import Peer, StepResult, resolve_device
from p2pdl.train.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint, save_model, save_snapshot
from p2pdl.train.data import BatchStream
from p2pdl.train.files import MetricsWriter, atomic_write_json
from p2pdl.train.hybrid import LocalRanks
from p2pdl.train.tensorboard import TensorBoardLog
from p2pdl.train.workload import LoadedWorkload, load_workload

log = logging.getLogger(__name__)


def build_optimizer(run: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer every peer (and the DDP reference) uses for a run config."""
    if run.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)


def build_model(workload: LoadedWorkload, seed: int, device: torch.device) -> torch.nn.Module:
    """Identical initial parameters on every peer: seed, then build."""
    torch.manual_seed(seed)
    return workload.build_model().to(device)


def data_seed(run: RunConfig, shard_index: int) -> int:
    """Each peer shuffles its own shard with its own stream."""
    return run.seed * 1000 + shard_index


def assigned_shards(live: Sequence[str], name: str, shard_count: int) -> list[int]:
    """The data rule under churn: shard s belongs to the live member at position s mod L.

    ``live`` is the agreed order of live members (configured peers in config order, then joiners
    by name), so every peer computes the same assignment: the live set always covers all
    ``shard_count`` shards and each shard has exactly one owner. A peer that rejoins under its
    old name takes its old position back, so no shard is trained twice at double weight.
    """
    if name not in live:
        return []
    position, members = live.index(name), len(live)
    return [shard for shard in range(shard_count) if shard % members == position]


class ShardedBatches:
    """This peer's batches, re-cut whenever the live membership changes its shard assignment."""

    def __init__(self, workload: LoadedWorkload, run: RunConfig, shard_count: int, device: torch.device) -> None:
        self._workload = workload
        self._run = run
        self._shard_count = shard_count
        self._device = device
        self._shards: list[int] | None = None
        self._stream: BatchStream | None = None
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def shards(self) -> list[int]:
        return list(self._shards or [])

    def _load(self, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
        if shard not in self._cache:
            self._cache[shard] = self._workload.load_shard(shard, self._shard_count)
        return self._cache[shard]

    def preload(self, shards: list[int]) -> None:
        """Load ``shards`` now (a first run builds the dataset here, which takes seconds)."""
        for shard in shards:
            self._load(shard)

    def batch(self, shards: list[int], step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch for ``step`` from ``shards``; None when this peer owns no data right now."""
        if not shards:
            self._shards, self._stream = shards, None
            return None
        if shards != self._shards or self._stream is None or self._stream.step != step:
            parts = [self._load(s) for s in shards]
            inputs = torch.cat([x for x, _ in parts])
            targets = torch.cat([y for _, y in parts])
            self._stream = BatchStream(
                inputs, targets, self._run.batch_size, seed=data_seed(self._run, shards[0]), start_step=step
            )
            self._shards = shards
        inputs, targets = next(self._stream)
        return inputs.to(self._device, non_blocking=True), targets.to(self._device, non_blocking=True)


@dataclass(frozen=True, kw_only=True)
class PeerOptions:
    """How this process runs its peer (the CLI flags of ``p2pdl peer``)."""

    out_dir: Path
    listen: str | None = None
    advertise: str | None = None
    bootstrap: tuple[str, ...] = ()
    join: bool = False  # download the swarm's current state before training
    resume: bool = False  # continue from OUT/checkpoint.pt when it exists
    snapshot_every: int = 0
    tensorboard: Path | None = None  # write TensorBoard event files here


async def run_peer(
    config: Config,
    name: str,
    options: PeerOptions,
    stop: asyncio.Event | None = None,
    local: LocalRanks | None = None,
) -> dict[str, Any]:
    """Train this peer to ``config.run.steps`` (or until ``stop`` is set); return the summary.

    With ``local`` (``--nproc-per-node K``, :mod:`p2pdl.train.hybrid`) this process is local rank 0
    and each step's batch is trained by all K local ranks under DDP.
    """
    run = config.run
    out_dir = options.out_dir
    board = TensorBoardLog(options.tensorboard) if options.tensorboard is not None else None
    device = resolve_device(run.device)
    if run.torch_threads:
        torch.set_num_threads(run.torch_threads)
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    workload = load_workload(run.workload)
    model = build_model(workload, run.seed, device)
    optimizer = build_optimizer(run, model)
    if local is not None:  # hybrid parallelism: join the local ranks' process group, wrap in DDP
        await local.attach(model, workload)
    # torch.optim imports torch._dynamo on the first optimizer step, which takes seconds. Pay that
    # before joining the swarm, so the first step after the start barrier does not stall the neighbours.
    await asyncio.to_thread(importlib.import_module, "torch._dynamo")
    checkpoint = out_dir / CHECKPOINT
    start_step = 0
    resumed = options.resume and checkpoint.exists()
    if resumed:
        start_step = await asyncio.to_thread(load_checkpoint, model, optimizer, checkpoint)
        log.info("%s resumed from %s at step %d", name, checkpoint, start_step)
    data = ShardedBatches(workload, run, config.shard_count, device)
    # Build or read the dataset before the peer goes live: once it is live, its event loop must
    # stay free for heartbeats, and a first run's dataset build takes seconds.
    configured = list(config.peer_names)
    await asyncio.to_thread(data.preload, assigned_shards(configured, name, config.shard_count))
    metrics = MetricsWriter(out_dir / "metrics.jsonl")
    started = time.perf_counter()
    stopped_early = False
    result: StepResult | None = None
    peer = Peer(
        config,
        name,
        model,
        optimizer,
        device=device,
        listen=options.listen,
        advertise=options.advertise,
        bootstrap=options.bootstrap,
        start_step=start_step,
    )
    try:
        async with peer:
            if not resumed and (options.join or config.peer(name) is None):
                fetch_started = time.perf_counter()
                await peer.fetch_state()
                metrics.write(
                    {"event": "joined", "step": peer.step_index, "seconds": time.perf_counter() - fetch_started}
                )
            log.info(
                "%s training %s with strategy %s from step %d to %d on %s",
                name,
                workload.name,
                peer.strategy.name,
                peer.step_index,
                run.steps,
                device,
            )
            next_eval = _next_multiple(peer.step_index, run.eval_every)
            next_checkpoint = _next_multiple(peer.step_index, config.checkpoint.every)
            next_snapshot = _next_multiple(peer.step_index, options.snapshot_every)
            while peer.step_index < run.steps:
                if stop is not None and stop.is_set():
                    stopped_early = True
                    break
                swarm_step = peer.strategy.swarm_step()
                if swarm_step is not None and swarm_step >= run.steps - 1:
                    log.info("%s: the swarm reached step %d; a straggler stops with it", name, swarm_step)
                    break
                shards = assigned_shards(peer.live_members(), name, config.shard_count)
                # On the compute thread: cutting a new shard's batches (after a membership change)
                # reads and concatenates arrays, which must not stall the event loop's heartbeats.
                batch = await peer.run_compute(functools.partial(data.batch, shards, peer.step_index))

                def closure(batch: tuple[torch.Tensor, torch.Tensor] | None = batch) -> torch.Tensor:
                    if batch is None:  # no shard assigned right now: only mix with neighbours
                        return torch.zeros(())
                    loss = workload.loss_fn(model(batch[0]), batch[1])
                    torch.autograd.backward(loss)
                    return loss

                step_closure = closure if local is None else local.closure(batch)  # hybrid: all local ranks
                try:
                    stepped = await _step_unless_stopped(
                        peer.step(step_closure), stop, config.transport.shutdown_timeout
                    )
                    if stepped is None:
                        log.info("%s: stopping; abandoned a round still waiting on stopped partners", name)
                        stopped_early = True
                        break
                    result = stepped
                except AllReduceIncompleteError as exc:
                    if stop is None or not stop.is_set():
                        raise
                    # Told to stop while a round was in flight and its partners, also stopping,
                    # left first: the unfinished round is dropped (no parameter was touched), and
                    # this is the clean stop it was asked for, not a failure.
                    log.info("%s: stopping; dropped the unfinished round (%s)", name, exc)
                    stopped_early = True
                    break
                done = peer.step_index
                record: dict[str, Any] = {
                    "step": result.step,
                    "time": round(time.perf_counter() - started, 4),
                    "wall": round(time.time(), 3),
                    "loss": result.loss,
                    "bytes_sent": peer.transport.stats.bytes_sent,
                    "bytes_received": peer.transport.stats.bytes_received,
                    "rounds_partial": peer.ledger.partial,
                    "shards": len(shards),
                }
                for outcome in (result.gradient_round, result.parameter_round):
                    if outcome is not None:
                        record["round"] = outcome.round
                        record["round_seconds"] = round(outcome.seconds, 5)
                        record["complete"] = outcome.complete
                        if outcome.missing:
                            record["missing"] = list(outcome.missing)
                if next_eval is not None and done >= next_eval and done < run.steps:
                    evaluation = await peer.run_compute(lambda: workload.evaluate(model, device))
                    peer.record_eval(evaluation)
                    record.update(evaluation)
                    record["strategy"] = peer.strategy.status()  # its own figures: staleness, weight, ...
                    next_eval = _next_multiple(done, run.eval_every)
                    if board is not None:
                        board.evaluation(result.step, evaluation)
                metrics.write(record)
                if board is not None:
                    board.step(result.step, record, steps_per_second=peer.telemetry.steps_per_second)
                if next_snapshot is not None and done >= next_snapshot:
                    await peer.run_compute(functools.partial(save_snapshot, model, out_dir, done))
                    next_snapshot = _next_multiple(done, options.snapshot_every)
                if next_checkpoint is not None and done >= next_checkpoint:
                    await peer.run_compute(functools.partial(save_checkpoint, model, optimizer, done, checkpoint))
                    next_checkpoint = _next_multiple(done, config.checkpoint.every)
            evaluation = await peer.run_compute(lambda: workload.evaluate(model, device))
            peer.record_eval(evaluation)
            final_step = peer.step_index
            if board is not None:
                board.evaluation(final_step - 1, evaluation)
            metrics.write(
                {"step": final_step - 1, "time": round(time.perf_counter() - started, 4), "final": True, **evaluation}
            )
            status = peer.status()
    finally:
        metrics.close()
        if board is not None:
            board.close()
    await asyncio.to_thread(save_checkpoint, model, optimizer, final_step, checkpoint)
    await asyncio.to_thread(save_model, model, out_dir / "model.pt")
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
        "compression": status["compression"],
        "rounds": status["rounds"],
        "rewires": peer.rewires,
        "strategy": config.strategy.kind,
        "strategy_status": status["strategy"],  # the strategy's own figures (staleness, push-sum weight, ...)
        "device": str(device),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    await asyncio.to_thread(atomic_write_json, out_dir / "summary.json", summary)
    return summary


async def _step_unless_stopped(
    step: Coroutine[Any, Any, StepResult], stop: asyncio.Event | None, grace: float
) -> StepResult | None:
    """Run one step; if a stop is requested meanwhile, give it ``grace`` seconds, then abandon it.

    A step blocked in a round whose partners are stopping too would otherwise wait the full
    ``round_timeout``. Abandoning it is safe: it is cancelled at an await, and every piece of work
    on the compute thread (a mix, a write-back) runs whole or not at all, so the model is the one
    before the step or a valid average; the step counter does not move.
    """
    if stop is None:
        return await step
    task = asyncio.ensure_future(step)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=grace)
        return task.result() if task.done() else None
    finally:
        # Both tasks are owned here: neither outlives this call, also when the caller is cancelled.
        for owned in (task, stopper):
            if not owned.done():
                owned.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await owned


def _next_multiple(step: int, every: int) -> int | None:
    """The first multiple of ``every`` after ``step`` (None when ``every`` is 0: disabled)."""
    return (step // every + 1) * every if every else None
