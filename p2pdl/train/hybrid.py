"""Multi-GPU peers (hybrid parallelism): K local ranks under ``torch.distributed`` train one peer.

``p2pdl peer --nproc-per-node K`` keeps the peer's identity in the process the user started:
that process is local rank 0, it runs the normal training loop and is the only one on the wire.
It starts K-1 follower processes (``python -m p2pdl.train.hybrid``) that join a process group
on 127.0.0.1 (NCCL when the peer's device is CUDA, gloo otherwise), rendezvoused through a
``TCPStore`` that rank 0 serves on a port the OS picks, so there is no free-port race.

Each step, rank 0 drives the followers from the closure that :meth:`Peer.step` runs on the peer's
compute thread (the only thread that issues collectives while the peer trains):

1. it posts a command in the store (``step`` with the batch's shapes and dtypes, or ``stop``);
2. it broadcasts its parameters and buffers, so every rank computes on rank 0's exact model,
   whatever the strategy, a state download or an outer step did to it since the last step;
3. it broadcasts the peer's batch; rank r trains on slice r of ``tensor_split(batch, K)``;
4. every rank runs forward and backward through ``DistributedDataParallel``, which averages the
   gradients over the local ranks during backward; the closure returns the mean loss.

Rank 0 then goes on as any peer does: the strategy round with the other peers, the optimizer step,
evaluation, checkpoints. Trade-offs: ``run.batch_size`` stays the peer's batch per step (split
K ways, so it must divide by K), which keeps the training maths of a peer independent of its GPU
count; and the parameters travel to the followers once per step (one broadcast of the model,
about what DDP's gradient all-reduce already costs) instead of every rank repeating the
strategy's and the optimizer's work, which only rank 0 can do because only it sees the wire.

Followers wait for commands on the store, not inside a collective, so rank 0 may spend any time
between steps (a slow round, an evaluation) without tripping the collectives' timeout, which is
derived from ``strategy.round_timeout``.

Failures: rank 0 polls its followers; when one dies it cancels the training loop, so the peer
closes its wire side (neighbours see it leave, as with any leaving peer), and the process exits
non-zero with a :class:`~p2pdl.errors.LocalRankError` naming the rank. A follower dies with rank 0:
the kernel kills it (``PR_SET_PDEATHSIG``) and, where that is unavailable, a watchdog thread that
sees its parent change exits it; a broken collective or store connection ends it too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import hashlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import TCPStore  # torch.distributed re-exports it, but untyped
from torch.distributed.distributed_c10d import Store
from torch.nn.parallel import DistributedDataParallel

from p2pdl.config import Config
from p2pdl.errors import LocalRankError, P2PDLError
from p2pdl.train.files import atomic_write_json
from p2pdl.train.workload import LoadedWorkload, LossFn, load_workload

log = logging.getLogger(__name__)

T = TypeVar("T")
Batch = tuple[torch.Tensor, torch.Tensor]

MIN_COLLECTIVE_TIMEOUT = 60.0  # seconds: covers the followers' start (imports, model build) too
STORE_WAIT_SLICE = timedelta(minutes=10)  # a follower re-arms its wait for the next command this often
MONITOR_INTERVAL = 0.1  # seconds between rank 0's checks of its followers
DEATH_GRACE = 2.0  # seconds a failed collective waits for the rank that broke it to be seen dead
REAP_TIMEOUT = 10.0  # seconds a follower gets to exit on its own before SIGTERM, then SIGKILL
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def collective_timeout(config: Config) -> float:
    """Seconds any one collective (and the rendezvous) may take: a round's worth, with a floor."""
    return max(MIN_COLLECTIVE_TIMEOUT, 2 * config.strategy.round_timeout)


def local_rank_problems(
    nproc: int,
    device: torch.device | None,
    batch_size: int,
    *,
    accumulate: int = 1,
    precision: str = "fp32",
    param_dtype: str = "float32",
) -> list[str]:
    """Every problem with ``--nproc-per-node`` for this device and ``[run]`` (empty: fine).

    The followers run plain float32 forward and backward on one micro-batch per step, so
    accumulation, autocast and 16-bit parameters stay single-rank features for now: refused by
    name rather than silently trained differently on the followers.
    """
    if nproc < 1:
        return [f"--nproc-per-node must be >= 1, got {nproc}"]
    problems = []
    if nproc > 1:
        for key, value, plain in (
            ("run.accumulate", accumulate, 1),
            ("run.precision", precision, "fp32"),
            ("run.param_dtype", param_dtype, "float32"),
        ):
            if value != plain:
                problems.append(f"--nproc-per-node {nproc} needs {key} = {plain!r} (got {value!r})")
    if device is not None and device.type == "cuda" and nproc > torch.cuda.device_count():
        problems.append(
            f"--nproc-per-node {nproc} needs {nproc} CUDA devices (one per local rank); "
            f"this machine has {torch.cuda.device_count()}"
        )
    if batch_size % nproc:
        problems.append(
            f"run.batch_size ({batch_size}) must divide by --nproc-per-node ({nproc}): "
            "each local rank trains an equal slice of the peer's batch"
        )
    return problems


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Local rank ``rank``'s device: its own GPU on CUDA, the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


# --------------------------------------------------------------------------- shared by every rank


def _model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, in the module's order (the same on every rank)."""
    return [*model.parameters(), *model.buffers()]


def _broadcast_state(model: torch.nn.Module) -> None:
    """Every rank's parameters and buffers become rank 0's: one broadcast per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in _model_tensors(model):
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    with torch.no_grad():
        for tensors in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            dist.broadcast(flat, src=0)
            if dist.get_rank() != 0:
                offset = 0
                for tensor in tensors:
                    tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                    offset += tensor.numel()


def _state_sha256(model: torch.nn.Module) -> str:
    """A digest of the parameters' and buffers' exact bytes."""
    digest = hashlib.sha256()
    for tensor in _model_tensors(model):
        digest.update(tensor.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _gather_digests(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Every rank's :func:`_state_sha256`, in rank order."""
    own = torch.frombuffer(bytearray.fromhex(_state_sha256(model)), dtype=torch.int64).to(device)
    gathered = [torch.empty_like(own) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, own)
    return [t.cpu().numpy().tobytes().hex() for t in gathered]


def _train_slice(ddp: DistributedDataParallel, loss_fn: LossFn, batch: Batch, world: int) -> torch.Tensor:
    """Forward and backward on this rank's slice of the peer's batch; the loss averaged over ranks."""
    rank = dist.get_rank()
    inputs = torch.tensor_split(batch[0], world)[rank]
    targets = torch.tensor_split(batch[1], world)[rank]
    loss = loss_fn(ddp(inputs), targets)
    torch.autograd.backward(loss)  # DDP averages the gradients over the local ranks here
    mean = loss.detach().float().clone()
    dist.all_reduce(mean)
    return mean / world


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def _command_key(sequence: int) -> str:
    return f"p2pdl/command/{sequence}"


# --------------------------------------------------------------------------- rank 0


class LocalRanks:
    """Rank 0's side: starts the followers, drives them each step, reaps them.

    Use as ``async with LocalRanks(...) as local: await local.supervise(run_peer(..., local=local))``;
    the training loop calls :meth:`attach` once its model exists and :meth:`closure` each step.
    """

    def __init__(self, config: Config, name: str, nproc: int, device: torch.device, out_dir: Path) -> None:
        if nproc < 2:
            raise ValueError(f"LocalRanks needs >= 2 local ranks, got {nproc}")
        self.config = config
        self.name = name
        self.nproc = nproc
        self.device = device
        self.backend = backend_for(device)
        self.timeout = collective_timeout(config)
        self._out_dir = out_dir
        self._store: TCPStore | None = None
        self._followers: dict[int, subprocess.Popen[bytes]] = {}
        self._model: torch.nn.Module | None = None
        self._ddp: DistributedDataParallel | None = None
        self._loss_fn: LossFn | None = None
        self._sequence = 0
        self._stopped = False  # the followers got the stop command and exit by themselves

    # -- lifecycle

    async def __aenter__(self) -> LocalRanks:
        # On the event loop's (main) thread: PR_SET_PDEATHSIG fires when the thread that forked
        # the child ends, so the followers must not be started from a short-lived worker thread.
        # Forking K-1 processes and binding the store's socket take milliseconds.
        self._spawn()
        return self

    def _spawn(self) -> None:
        self._store = TCPStore(
            "127.0.0.1", 0, self.nproc, True, timeout=timedelta(seconds=self.timeout), wait_for_workers=False
        )
        if sys.platform.startswith("linux"):
            # Keep gloo on loopback whatever the hostname resolves to (this process is rank 0).
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        run = self.config.run
        for rank in range(1, self.nproc):
            command = [
                sys.executable, "-m", "p2pdl.train.hybrid",
                "--rank", str(rank), "--world-size", str(self.nproc),
                "--store-port", str(self._store.port), "--parent-pid", str(os.getpid()),
                "--device", str(self.device), "--timeout", str(self.timeout),
                "--workload", str(Path(run.workload).resolve()), "--seed", str(run.seed),
                "--torch-threads", str(run.torch_threads), "--peer", self.name,
            ]  # fmt: skip
            self._followers[rank] = subprocess.Popen(command, env=env)
            log.info("%s: local rank %d is pid %d", self.name, rank, self._followers[rank].pid)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self._reap)

    def _reap(self) -> None:
        """Every follower exits: on its own after the stop command, else by SIGTERM, else by SIGKILL."""
        deadline = time.monotonic() + (REAP_TIMEOUT if self._stopped else 0.0)
        for proc in self._followers.values():
            if proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._followers.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._followers.values():
            try:
                proc.wait(timeout=REAP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- called by the training loop

    async def attach(self, model: torch.nn.Module, workload: LoadedWorkload) -> None:
        """Join the process group and wrap ``model`` in DDP (the followers do the same)."""
        assert self._store is not None, "use 'async with LocalRanks(...)'"
        store = self._store

        def join() -> DistributedDataParallel:
            _init_group(self.backend, store, 0, self.nproc, self.device, self.timeout)
            return _wrap(model, self.device)

        self._ddp = await _in_daemon_thread(join)
        self._model, self._loss_fn = model, workload.loss_fn

    def closure(self, batch: Batch | None) -> Callable[[], torch.Tensor]:
        """The step's closure for :meth:`Peer.step`: every local rank trains a slice of ``batch``."""

        def run() -> torch.Tensor:
            if batch is None:  # no shard assigned right now: the followers stay idle
                return torch.zeros(())
            assert self._ddp is not None and self._model is not None and self._loss_fn is not None
            inputs, targets = batch[0].contiguous(), batch[1].contiguous()
            self._post(
                {
                    "op": "step",
                    "shapes": [list(inputs.shape), list(targets.shape)],
                    "dtypes": [str(inputs.dtype), str(targets.dtype)],
                }
            )
            _broadcast_state(self._model)
            dist.broadcast(inputs, src=0)
            dist.broadcast(targets, src=0)
            return _train_slice(self._ddp, self._loss_fn, (inputs, targets), self.nproc)

        return run

    def _post(self, command: dict[str, Any]) -> None:
        """Publish the next command; the previous one is dropped (every follower has acted on it)."""
        assert self._store is not None
        if self._sequence:
            self._store.delete_key(_command_key(self._sequence - 1))
        self._store.set(_command_key(self._sequence), json.dumps(command))
        self._sequence += 1

    # -- supervision

    async def supervise(self, work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        """Run the training loop ``work`` while watching the followers; return its summary.

        A follower's death cancels ``work`` (the peer closes and leaves the swarm) and raises
        :class:`LocalRankError`. After a normal end the followers get rank 0's final parameters
        and stop; the summary (also ``summary.json``) gains ``local_ranks`` with each rank's digest.
        """
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=MONITOR_INTERVAL)
                dead = self._dead_follower()
                if dead is not None and not task.done():
                    await self._abandon(task)
                    raise self._death_error(dead)
            try:
                summary = task.result()
            except Exception as exc:
                dead = await self._await_death(DEATH_GRACE)
                if dead is not None:  # a collective broke because a rank died: name the rank
                    raise self._death_error(dead) from exc
                raise
        finally:
            if not task.done():  # supervise itself was cancelled: so is the loop
                await self._abandon(task)
        summary["local_ranks"] = await _in_daemon_thread(self._finish)
        await asyncio.to_thread(atomic_write_json, self._out_dir / "summary.json", summary)
        return summary

    def _finish(self) -> dict[str, Any]:
        """The stop command: final parameters to every rank, then every rank's digest back."""
        assert self._model is not None
        self._post({"op": "stop"})
        self._stopped = True
        _broadcast_state(self._model)
        digests = _gather_digests(self._model, rank_device(self.device, 0))
        dist.destroy_process_group()
        identical = len(set(digests)) == 1
        if not identical:
            log.error("%s: local ranks ended with different parameters: %s", self.name, digests)
        return {"nproc": self.nproc, "backend": self.backend, "param_sha256": digests, "identical": identical}

    async def _abandon(self, task: asyncio.Future[dict[str, Any]]) -> None:
        """Cancel the training loop and let its cleanup (the peer's leave) run, within a bound."""
        if self.backend == "nccl" and dist.is_initialized():
            # A NCCL collective waiting on a dead rank never returns on its own; abort it, so the
            # compute thread (which the peer's close waits for) gets free. gloo fails by itself.
            with contextlib.suppress(Exception):
                dist.distributed_c10d._abort_process_group()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=self.timeout + self.config.transport.shutdown_timeout)
        for finished in done:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                finished.result()  # the reason is the dead rank, raised by the caller

    def _dead_follower(self) -> int | None:
        for rank, proc in self._followers.items():
            if proc.poll() is not None:
                return rank
        return None

    async def _await_death(self, grace: float) -> int | None:
        for _ in range(round(grace / MONITOR_INTERVAL)):
            if (dead := self._dead_follower()) is not None:
                return dead
            await asyncio.sleep(MONITOR_INTERVAL)
        return self._dead_follower()

    def _death_error(self, rank: int) -> LocalRankError:
        proc = self._followers[rank]
        code = proc.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return LocalRankError(f"{self.name}: local rank {rank} (pid {proc.pid}) {how}; the peer leaves the swarm")


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run blocking ``fn`` off the loop in a daemon thread: a collective stuck on a dead rank
    must not keep the process from exiting (an executor's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, functools.partial(future.set_exception, exc))
        else:
            loop.call_soon_threadsafe(settle, functools.partial(future.set_result, result))

    threading.Thread(target=target, name="p2pdl-local-ranks", daemon=True).start()
    return await future


def _init_group(backend: str, store: Store, rank: int, world: int, device: torch.device, timeout: float) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device, rank))
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout),
        device_id=rank_device(device, rank) if backend == "nccl" else None,
    )


def _wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    device_ids = [device.index or 0] if device.type == "cuda" else None
    # Buffers travel with the parameters each step (_broadcast_state), not in DDP's forward; the
    # flag was renamed in torch 2.13 (the old name warns there).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


# --------------------------------------------------------------------------- followers


def _die_with_parent(parent_pid: int) -> None:
    """Exit when rank 0 does: the kernel's parent-death signal, and a watchdog where it is missing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent_pid:  # rank 0 died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="p2pdl-parent-watch", daemon=True).start()


def follow(args: argparse.Namespace) -> int:
    """A follower's life: join, then act on rank 0's commands until ``stop``."""
    _die_with_parent(args.parent_pid)
    # Ctrl+C reaches the whole process group; rank 0 alone decides when the peer stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = rank_device(torch.device(args.device), args.rank)
    workload = load_workload(args.workload)
    torch.manual_seed(args.seed)  # the same initial model as rank 0's (DDP broadcasts it anyway)
    model = workload.build_model().to(device)
    store = TCPStore("127.0.0.1", args.store_port, args.world_size, False, timeout=timedelta(seconds=args.timeout))
    _init_group(args.backend, store, args.rank, args.world_size, torch.device(args.device), args.timeout)
    ddp = _wrap(model, device)
    log.info("%s: local rank %d of %d joined (%s)", args.peer, args.rank, args.world_size, args.backend)
    sequence = 0
    while True:
        key = _command_key(sequence)
        while True:
            try:
                store.wait([key], STORE_WAIT_SLICE)
                break
            except dist.DistStoreError as exc:
                if "timeout" not in str(exc):
                    raise
        command = json.loads(store.get(key))
        sequence += 1
        _broadcast_state(model)
        if command["op"] == "stop":
            digests = _gather_digests(model, device)
            log.info("%s: local rank %d stops (parameters %s)", args.peer, args.rank, digests[args.rank][:16])
            dist.destroy_process_group()
            return 0
        model.zero_grad(set_to_none=True)
        inputs, targets = (
            torch.empty(shape, dtype=_dtype(dtype), device=device)
            for shape, dtype in zip(command["shapes"], command["dtypes"], strict=True)
        )
        dist.broadcast(inputs, src=0)
        dist.broadcast(targets, src=0)
        _train_slice(ddp, workload.loss_fn, (inputs, targets), args.world_size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A follower rank of a multi-GPU p2pdl peer (started by rank 0).")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store-port", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--timeout", type=float, required=True, help="seconds per collective")
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--peer", required=True, help="the peer's name, for the logs")
    args = parser.parse_args(argv)
    args.backend = backend_for(torch.device(args.device))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s[rank {args.rank}]: %(message)s",
        stream=sys.stderr,
    )
    try:
        return follow(args)
    except (P2PDLError, RuntimeError, ValueError) as exc:
        log.error("%s: local rank %d failed: %s: %s", args.peer, args.rank, type(exc).__name__, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
