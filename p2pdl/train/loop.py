"""The CLI's training loop, built on the public :class:`~p2pdl.peer.node.Peer` API and a workload.

It loads the workload named by the config, builds the model (seeded identically on every peer,
in ``run.param_dtype``) and its training setup (:mod:`p2pdl.train.build`: optimizer, schedule,
precision and the update step the peer runs in place of ``optimizer.step()``), takes this peer's
shard and runs ``run.steps`` steps of ``run.accumulate`` micro-batches each, evaluating every
``run.eval_every`` steps. It writes, under ``--out``: ``metrics.jsonl`` (one JSON object per
step), ``summary.json`` (with the workload's headline metric), ``sample.txt`` when the workload
defines ``sample``, and the checkpoint, final model and snapshots of
:mod:`p2pdl.train.checkpoints`, all through :mod:`p2pdl.train.files`. A stop request (SIGTERM,
Ctrl+C) lets the current step finish (each step is bounded by the round timeout), then saves and
leaves cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from p2pdl.config import Config
from p2pdl.errors import AllReduceIncompleteError, QuorumLostError
from p2pdl.peer.node import Peer, StepResult, resolve_device
from p2pdl.train.build import Training, build_model, build_training
from p2pdl.train.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint, save_model, save_snapshot
from p2pdl.train.files import MetricsWriter, atomic_write_json, atomic_write_text
from p2pdl.train.hybrid import LocalRanks
from p2pdl.train.shards import Batch, ShardedBatches, assigned_shards
from p2pdl.train.tensorboard import TensorBoardLog
from p2pdl.train.workload import LoadedWorkload, load_workload

__all__ = ["PeerOptions", "assigned_shards", "build_model", "headline_of", "run_peer"]

log = logging.getLogger(__name__)


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
    model = build_model(workload, run.seed, device, run.param_dtype)
    training = build_training(config, workload, model, device)
    optimizer, update = training.optimizer, training.step
    headline = workload.headline[0]
    if local is not None:  # hybrid parallelism: join the local ranks' process group, wrap in DDP
        await local.attach(model, workload)
    # torch.optim imports torch._dynamo on the first optimizer step, which takes seconds. Pay that
    # before joining the swarm, so the first step after the start barrier does not stall the neighbours.
    await asyncio.to_thread(importlib.import_module, "torch._dynamo")
    checkpoint = out_dir / CHECKPOINT
    start_step = 0
    resumed = options.resume and checkpoint.exists()
    if resumed:
        start_step = await asyncio.to_thread(
            functools.partial(
                load_checkpoint,
                model,
                optimizer,
                checkpoint,
                scheduler=training.scheduler,
                scaler=training.precision.scaler,
            )
        )
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
        hooks=update,
    )
    try:
        async with peer:
            if not resumed and (options.join or config.peer(name) is None):
                fetch_started = time.perf_counter()
                await peer.fetch_state()  # the step hooks put the schedule at the donor's step
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
                if await peer.catch_up():
                    continue  # downloaded the group's state: its step may be the last one
                swarm_step = peer.strategy.swarm_step()
                if swarm_step is not None and swarm_step >= run.steps - 1:
                    log.info("%s: the swarm reached step %d; a straggler stops with it", name, swarm_step)
                    break
                shards = assigned_shards(peer.live_members(), name, config.shard_count)
                # On the compute thread: cutting a new shard's batches (after a membership change)
                # reads and concatenates arrays, which must not stall the event loop's heartbeats.
                batch = await peer.run_compute(functools.partial(data.batch, shards, peer.step_index))

                def closure(batch: list[Batch] | None = batch) -> torch.Tensor:
                    if batch is None:  # no shard assigned right now: only mix with neighbours
                        return torch.zeros(())
                    return update.backward(batch)

                # hybrid: all local ranks train the step's one micro-batch (the CLI refuses accumulation
                # and autocast with --nproc-per-node > 1)
                step_closure = closure if local is None else local.closure(None if batch is None else batch[0])
                try:
                    stepped = await _step_unless_stopped(
                        peer.step(step_closure), stop, config.transport.shutdown_timeout
                    )
                    if stepped is None:
                        log.info("%s: stopping; abandoned a round still waiting on stopped partners", name)
                        stopped_early = True
                        break
                    result = stepped
                except (AllReduceIncompleteError, QuorumLostError) as exc:
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
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": update.last_grad_norm,
                    "steps_skipped": update.skipped,
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
                    peer.record_eval(evaluation, headline)
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
                    await peer.run_compute(functools.partial(_checkpoint, training, model, done, checkpoint))
                    next_checkpoint = _next_multiple(done, config.checkpoint.every)
            evaluation = await peer.run_compute(lambda: workload.evaluate(model, device))
            peer.record_eval(evaluation, headline)
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
    await asyncio.to_thread(_checkpoint, training, model, final_step, checkpoint)
    await asyncio.to_thread(save_model, model, out_dir / "model.pt")
    sample = workload.sample
    if sample is not None:
        text = await asyncio.to_thread(sample, model, device)
        await asyncio.to_thread(atomic_write_text, out_dir / "sample.txt", text)
    summary = {
        "name": name,
        "steps": final_step,
        "stopped_early": stopped_early,
        "final_loss": None if result is None else result.loss,
        "headline": headline_of(workload, evaluation),
        "test_accuracy": evaluation.get("test_accuracy"),
        "test_loss": evaluation.get("test_loss"),
        "optimizer_steps": update.applied,
        "steps_skipped": update.skipped,
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


def headline_of(workload: LoadedWorkload, evaluation: dict[str, float]) -> dict[str, Any]:
    """The workload's headline metric, its direction and its value in ``evaluation`` (None if absent)."""
    metric, goal = workload.headline
    return {"metric": metric, "goal": goal, "value": evaluation.get(metric)}


def _checkpoint(training: Training, model: torch.nn.Module, step: int, path: Path) -> None:
    save_checkpoint(
        model,
        training.optimizer,
        step,
        path,
        scheduler=training.scheduler,
        scaler=training.precision.scaler,
    )


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
