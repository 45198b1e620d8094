#!/usr/bin/env python3
"""The parity and benchmark reference: a p2pdl run config trained under ``torch.distributed`` DDP.

    python benchmarks/ddp_reference.py CONFIG --steps N --out DIR [--eval-every K] [--stop-at-accuracy A]
        [--max-seconds S] [--comm-hook fp16|powersgd [--powersgd-rank R]]
        [--rank-prefix "ip netns exec NS-{rank}" --master-addr 10.232.0.1 --gloo-ifname eth0]

It starts one process per ``[[peers]]`` entry (rank r = peer index r) on 127.0.0.1, joined by a
gloo process group (``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``), and trains exactly p2pdl's
recipe: the same workload file, :func:`p2pdl.train.build.build_model` (same seed, so the same initial
weights), :func:`p2pdl.train.optim.build_optimizer` and ``build_schedule`` (``[optimizer]``,
``[schedule]``; the schedule steps after every optimizer step), clipping to ``run.grad_clip`` by
the global norm of the averaged gradient (as p2pdl's allreduce does), ``workload.load_shard(rank, N)``, a
:class:`~p2pdl.train.data.BatchStream` seeded with :func:`p2pdl.train.shards.data_seed`, ``workload.loss_fn``
and ``zero_grad(set_to_none=True)`` before each forward. The only difference from a p2pdl
``allreduce`` run is who averages the gradients (DDP's bucketed gloo all-reduce instead of p2pdl's
reduce-scatter + all-gather), so the two must agree to floating-point rounding; that is what
``tests/test_allreduce_parity.py`` checks, and what ``benchmarks/time_to_accuracy.py`` times.

Each rank writes under ``DIR/rank{r}/``: ``model.pt`` (the final ``state_dict``, ``module.`` prefix
stripped, CPU tensors), ``metrics.jsonl`` (per step: ``step`` (0-based), ``time`` (seconds since
training began), ``loss``; plus ``test_accuracy``/``test_loss`` every ``--eval-every`` steps and a
``final`` record) and ``summary.json``. The launcher writes ``DIR/summary.json`` with every rank's
exit code and the wall time from launch to the last exit.

Timing matches p2pdl's ``metrics.jsonl``: the clock starts once the model, optimizer and shard are
built, so it includes the rendezvous (``init_process_group`` and DDP's initial broadcast), as
p2pdl's includes connecting to its neighbours. Trade-off: every rank evaluates the (identical)
model itself, which costs a little time but keeps every rank's metrics complete; with
``--stop-at-accuracy`` rank 0's accuracy decides, broadcast so that all ranks stop at one step;
``--max-seconds`` does the same with rank 0's training clock (checked after every step, a 4-byte
broadcast), so a time-boxed run still ends with a final evaluation on every rank.

Benchmark options (off by default, so the parity run is plain DDP): ``--comm-hook`` registers
DDP's ``fp16_compress_hook`` or PowerSGD (``--powersgd-rank``, vanilla all-reduce for the first
``--powersgd-start-iter`` steps, error feedback and warm start on, as torch's defaults).
``--rank-prefix`` runs each rank under a command prefix whose ``{rank}`` is replaced, e.g. to put
rank r in network namespace r (``benchmarks/netns.py``); ``--master-addr`` is then rank 0's
address there and ``--gloo-ifname`` the interface gloo binds to (default ``lo`` on Linux only
when the master address is a loopback one).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from p2pdl.config import Config, RunConfig, load_config, with_overrides
from p2pdl.errors import ConfigError
from p2pdl.net.ports import free_ports
from p2pdl.peer.node import resolve_device
from p2pdl.train.build import build_model
from p2pdl.train.data import BatchStream
from p2pdl.train.files import MetricsWriter, atomic_write_bytes
from p2pdl.train.optim import build_optimizer, build_schedule
from p2pdl.train.shards import data_seed
from p2pdl.train.workload import load_workload

DEFAULT_THRESHOLDS = (0.90, 0.93)
# glibc maps big buffers freshly without this; the same environment p2pdl's peers get.
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}
COMM_HOOKS = ("none", "fp16", "powersgd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a p2pdl TOML config; one rank per [[peers]] entry")
    parser.add_argument("--steps", type=int, help="override run.steps")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--eval-every", type=int, help="steps between evaluations (default run.eval_every; 0: final only)"
    )
    parser.add_argument(
        "--stop-at-accuracy",
        type=float,
        help="stop every rank once rank 0's test accuracy reaches this fraction",
    )
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="*",
        default=list(DEFAULT_THRESHOLDS),
        help="test accuracies whose first step, time and samples are recorded (default 0.90 0.93)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override run.device")
    parser.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the ranks are killed")
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="stop every rank (with a final evaluation) once rank 0 has trained this many seconds",
    )
    parser.add_argument(
        "--comm-hook", choices=COMM_HOOKS, default="none", help="DDP gradient compression hook (default none)"
    )
    parser.add_argument("--powersgd-rank", type=int, default=1, help="PowerSGD matrix_approximation_rank")
    parser.add_argument(
        "--powersgd-start-iter", type=int, default=2, help="PowerSGD start_powerSGD_iter (vanilla before; >= 2)"
    )
    parser.add_argument(
        "--rank-prefix",
        help="command prefix for each rank, '{rank}' replaced (e.g. 'ip netns exec NS-{rank}')",
    )
    parser.add_argument("--master-addr", default="127.0.0.1", help="rank 0's address for the rendezvous")
    parser.add_argument(
        "--gloo-ifname", help="GLOO_SOCKET_IFNAME for every rank (default: lo for a loopback --master-addr)"
    )
    # Internal: set by the launcher for each worker process.
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.eval_every is not None and args.eval_every < 0:
        parser.error(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.stop_at_accuracy is not None and not 0 < args.stop_at_accuracy <= 1:
        parser.error(f"--stop-at-accuracy must be in (0, 1], got {args.stop_at_accuracy}")
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.powersgd_rank < 1:
        parser.error(f"--powersgd-rank must be >= 1, got {args.powersgd_rank}")
    if args.powersgd_start_iter < 2:
        parser.error(
            f"--powersgd-start-iter must be >= 2 (error feedback and warm start), got {args.powersgd_start_iter}"
        )
    return args


# --------------------------------------------------------------------------- one rank


def run_rank(config: Config, rank: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train rank ``rank`` of the DDP reference; return its summary."""
    run = config.run
    world_size = len(config.peers)
    eval_every = run.eval_every if args.eval_every is None else args.eval_every
    thresholds = sorted(set(args.thresholds) | ({args.stop_at_accuracy} - {None}))
    device = resolve_device(run.device)
    if run.torch_threads:
        torch.set_num_threads(run.torch_threads)
    rank_out = out / f"rank{rank}"
    rank_out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json", "model.pt"):
        (rank_out / stale).unlink(missing_ok=True)

    workload = load_workload(run.workload)
    unsupported = [
        what
        for what, used in (
            (f"run.precision = {run.precision!r}", run.precision != "fp32"),
            (f"run.accumulate = {run.accumulate}", run.accumulate != 1),
            ("the workload's build_optimizer hook", workload.build_optimizer is not None),
            ("the workload's build_schedule hook", workload.build_schedule is not None),
        )
        if used
    ]
    if unsupported:
        raise SystemExit(f"ddp_reference.py does not replicate {', '.join(unsupported)}; the reference would differ")
    model = build_model(workload, run.seed, device)
    inputs, targets = workload.load_shard(rank, world_size)
    stream = BatchStream(inputs, targets, run.batch_size, seed=data_seed(run, rank), start_step=0)
    metrics = MetricsWriter(rank_out / "metrics.jsonl")
    started = time.perf_counter()
    dist.init_process_group(
        backend="gloo", init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=args.timeout)
    )
    reached: dict[str, dict[str, float | int]] = {}
    stopped_early = False
    loss_value: float | None = None
    done = 0
    try:
        ddp = DistributedDataParallel(model, device_ids=None)
        register_comm_hook(ddp, args)
        # Same parameter order as p2pdl's optimizer over the bare model.
        optimizer = build_optimizer(config.optimizer_settings, ddp)
        schedule = build_schedule(config.schedule, optimizer, run.steps)
        ddp.train()
        for step in range(run.steps):
            batch_inputs, batch_targets = next(stream)
            batch_inputs, batch_targets = batch_inputs.to(device), batch_targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = workload.loss_fn(ddp(batch_inputs), batch_targets)
            loss.backward()  # DDP all-reduces (averages) the gradients during backward
            if run.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), run.grad_clip)
            optimizer.step()
            schedule.step()
            loss_value = float(loss.detach())
            done = step + 1
            record: dict[str, Any] = {
                "step": step,
                "time": round(time.perf_counter() - started, 4),
                "loss": loss_value,
            }
            if eval_every and done % eval_every == 0 and done != run.steps:
                evaluation = workload.evaluate(ddp.module, device)
                record.update(evaluation)
                _note_thresholds(reached, thresholds, evaluation, done, record["time"], run, world_size)
                if args.stop_at_accuracy is not None:
                    # Every rank evaluates at the same steps, so every rank joins this broadcast.
                    decision = torch.tensor(
                        [1 if evaluation["test_accuracy"] >= args.stop_at_accuracy else 0],
                        dtype=torch.int32,
                    )
                    dist.broadcast(decision, src=0)
                    stopped_early = bool(decision.item())
            if args.max_seconds is not None and not stopped_early and done != run.steps:
                # Every rank joins every step's broadcast; rank 0's clock decides for all.
                decision = torch.tensor([1 if record["time"] >= args.max_seconds else 0], dtype=torch.int32)
                dist.broadcast(decision, src=0)
                stopped_early = bool(decision.item())
            metrics.write(record)
            if stopped_early:
                break
        evaluation = workload.evaluate(ddp.module, device)
        elapsed = round(time.perf_counter() - started, 4)
        _note_thresholds(reached, thresholds, evaluation, done, elapsed, run, world_size)
        metrics.write({"step": done - 1, "time": elapsed, "final": True, **evaluation})
        dist.barrier()
    finally:
        metrics.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    state = {key.removeprefix("module."): value.detach().cpu() for key, value in ddp.state_dict().items()}
    torch.save(state, rank_out / "model.pt")
    summary = {
        "rank": rank,
        "name": config.peers[rank].name,
        "world_size": world_size,
        "steps": done,
        "stopped_early": stopped_early,
        "final_loss": loss_value,
        "test_accuracy": evaluation.get("test_accuracy"),
        "test_loss": evaluation.get("test_loss"),
        "thresholds": reached,
        "backend": "gloo",
        "comm_hook": args.comm_hook,
        "device": str(device),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_bytes(rank_out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def register_comm_hook(ddp: DistributedDataParallel, args: argparse.Namespace) -> None:
    """Install ``--comm-hook`` on ``ddp``: fp16 casts each bucket, PowerSGD sends low-rank factors."""
    if args.comm_hook == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(state=None, hook=default_hooks.fp16_compress_hook)
    elif args.comm_hook == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=args.powersgd_rank,
            start_powerSGD_iter=args.powersgd_start_iter,
        )
        ddp.register_comm_hook(state=state, hook=powerSGD_hook.powerSGD_hook)


def _note_thresholds(
    reached: dict[str, dict[str, float | int]],
    thresholds: list[float],
    evaluation: dict[str, float],
    done: int,
    elapsed: float,
    run: RunConfig,
    world_size: int,
) -> None:
    """First step, time and samples (over all ranks) at which each accuracy threshold was met."""
    for threshold in thresholds:
        key = f"{threshold:g}"
        if key not in reached and evaluation["test_accuracy"] >= threshold:
            reached[key] = {
                "steps": done,
                "time": elapsed,
                "samples": done * run.batch_size * world_size,
                "test_accuracy": evaluation["test_accuracy"],
            }


# --------------------------------------------------------------------------- launcher


def launch(args: argparse.Namespace, config: Config, argv: list[str]) -> int:
    """Start one worker process per rank, wait for all, reap every one; 0 only if all succeed."""
    world_size = len(config.peers)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    port = args.master_port or free_ports(1)[0]
    env = {**os.environ, **WORKER_ENV, "MASTER_ADDR": args.master_addr, "MASTER_PORT": str(port)}
    if args.gloo_ifname:
        env["GLOO_SOCKET_IFNAME"] = args.gloo_ifname
    elif sys.platform.startswith("linux") and ipaddress.ip_address(args.master_addr).is_loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback, whatever the hostname says
    # SIGTERM unwinds through the finally below, so the ranks are reaped, never orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for rank in range(world_size):
            (out / f"rank{rank}").mkdir(parents=True, exist_ok=True)
            log = open(out / f"rank{rank}" / "worker.log", "wb")  # noqa: SIM115 - closed below
            logs.append(log)
            command = [sys.executable, str(Path(__file__).resolve()), *argv, "--rank", str(rank)]
            if args.rank_prefix:
                command = [part.replace("{rank}", str(rank)) for part in shlex.split(args.rank_prefix)] + command
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
        deadline = started + args.timeout
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # the others would block in a collective until gloo's timeout
            if time.perf_counter() > deadline:
                running = [rank for rank, p in enumerate(procs) if p.poll() is None]
                print(f"ddp_reference: timeout after {args.timeout}s; ranks {running} still running", file=sys.stderr)
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    wall = time.perf_counter() - started
    codes = [p.returncode for p in procs]
    ranks = []
    for rank in range(world_size):
        path = out / f"rank{rank}" / "summary.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else {"rank": rank})
    result = {
        "config": str(args.config),
        "world_size": world_size,
        "exit_codes": codes,
        "wall_seconds": round(wall, 3),
        "ranks": ranks,
    }
    atomic_write_bytes(out / "summary.json", json.dumps(result, indent=2).encode())
    if any(code != 0 for code in codes):
        print(
            f"ddp_reference: ranks failed with exit codes {codes} (see {out}/rank*/worker.log)",
            file=sys.stderr,
        )
        return 1
    head = ranks[0]
    print(
        f"ddp_reference: {world_size} ranks, {head.get('steps')} steps in {wall:.1f}s, "
        f"test accuracy {head.get('test_accuracy', float('nan')):.4f}; wrote {out / 'summary.json'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    try:
        config = with_overrides(load_config(args.config), steps=args.steps, device=args.device)
    except ConfigError as exc:
        print(f"ddp_reference: {exc}", file=sys.stderr)
        return 2
    if config.shard_count != len(config.peers):
        # p2pdl then gives each peer several shards; this reference keeps one shard per rank.
        print(
            f"ddp_reference: run.data_shards = {config.run.data_shards} differs from the "
            f"{len(config.peers)} [[peers]]; only one shard per rank is supported",
            file=sys.stderr,
        )
        return 2
    if args.rank is None:
        return launch(args, config, raw)
    if not 0 <= args.rank < len(config.peers):
        print(f"ddp_reference: --rank {args.rank} is outside 0..{len(config.peers) - 1}", file=sys.stderr)
        return 2
    run_rank(config, args.rank, args.out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
