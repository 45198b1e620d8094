"""The peer: an asyncio node that ties one model, one optimizer, a strategy and the transport.

:class:`Peer` is the public training API. A user's loop calls ``await peer.step(closure)`` where
the closure runs forward and backward and returns the loss, as with ``optimizer.step(closure)``.
The peer runs the closure and the optimizer step on its single compute thread (so the event loop
keeps serving heartbeats and frames during a step), and calls the strategy around the optimizer
step. The node itself holds no mixing math and no wire format: those live in the layers below.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from p2pdl.config import Config, parse_address
from p2pdl.errors import ConfigError, TransportError
from p2pdl.strategies import RoundLedger, RoundOutcome, Strategy, StrategyContext, build_strategy
from p2pdl.topology import build_graph
from p2pdl.transport import Transport

log = logging.getLogger(__name__)

T = TypeVar("T")
PeerState = Literal["created", "starting", "training", "stopping", "closed"]


def resolve_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is a config error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["--device cuda: no CUDA device is available on this machine"])
    return torch.device(choice)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one call of :meth:`Peer.step` did."""

    step: int  # the step index that just finished (0-based)
    loss: float
    gradient_round: RoundOutcome | None  # set by gradient strategies (allreduce)
    parameter_round: RoundOutcome | None  # set by parameter strategies (gossip)


class Peer:
    """One member of a swarm. Use as ``async with Peer(...) as peer: await peer.step(closure)``.

    Args:
        config: the swarm's validated config.
        name: this peer's name; must be in ``config.peers``.
        model: any ``nn.Module``, already on ``device`` and identically initialised on every peer.
        optimizer: any torch optimizer over ``model``'s parameters.
        device: where the model lives; mixing runs there.
        listen: ``host:port`` to bind instead of the configured address (e.g. ``0.0.0.0:29500``).
        start_step: the step to start counting from.
    """

    def __init__(
        self,
        config: Config,
        name: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device | None = None,
        listen: str | None = None,
        start_step: int = 0,
    ) -> None:
        entry = config.peer(name)
        self.config = config
        self.name = name
        self.model = model
        self.optimizer = optimizer
        self.device = device or next(model.parameters()).device
        bind = listen or entry.address
        try:
            host, port = parse_address(bind)
        except ValueError as exc:
            raise ConfigError([f"--listen: {exc}"]) from exc
        self.step_index = start_step
        self.state: PeerState = "created"
        self.last_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self.ledger = RoundLedger()
        self._started_at = time.monotonic()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"p2pdl-compute-{name}")
        graph = build_graph(
            config.topology.kind,
            config.peer_names,
            rows=config.topology.rows,
            cols=config.topology.cols,
            center=config.topology.center,
            edges=config.topology.edges,
        )
        self.graph = graph
        self.transport = Transport(
            name=name,
            listen_host=host,
            listen_port=port,
            addresses={p.name: p.address for p in config.peers},
            config=config.transport,
            expected_tensors=lambda kind, sender: self.strategy.expected_tensors(kind, sender),
            status=self.status,
        )
        self._strategy: Strategy = build_strategy(
            StrategyContext(
                name=name,
                peers=config.peer_names,
                graph=graph,
                parameters=tuple((n, p) for n, p in model.named_parameters() if p.requires_grad),
                device=self.device,
                exchange=self.transport,
                run_compute=self.run_compute,
                config=config.strategy,
                ledger=self.ledger,
            )
        )
        self.transport.set_neighbors(self._strategy.communication_peers())

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind, connect to neighbours and wait for them (bounded by ``startup_timeout``)."""
        self.state = "starting"
        await self.transport.start()
        missing = await self.transport.wait_connected(self.config.transport.startup_timeout)
        if missing:
            message = (
                f"{self.name}: no link to {', '.join(missing)} after "
                f"startup_timeout={self.config.transport.startup_timeout}s"
            )
            if self.config.strategy.kind == "allreduce":
                await self.close()
                raise TransportError(message + "; exact all-reduce needs every peer")
            log.warning("%s; training starts without them", message)
        self.state = "training"

    async def close(self) -> None:
        """Announce the leave, close every link, stop the compute thread."""
        if self.state == "closed":
            return
        self.state = "stopping"
        try:
            await self.transport.close(announce=True)
        finally:
            self._compute.shutdown(wait=True)
            self.state = "closed"

    async def __aenter__(self) -> Peer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ training

    async def run_compute(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this peer's compute thread (one at a time, off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn)

    def _forward_backward(self, closure: Callable[[], torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.name}: loss is {value} at step {self.step_index}")
        return value

    async def step(self, closure: Callable[[], torch.Tensor]) -> StepResult:
        """One training step: closure (forward + backward), strategy, optimizer, strategy.

        The closure must compute the loss, call ``backward()`` on it and return it; gradients are
        zeroed before it runs.
        """
        if self.state != "training":
            raise RuntimeError(f"peer {self.name} is {self.state}; use 'async with Peer(...)'")
        step = self.step_index
        loss = await self.run_compute(lambda: self._forward_backward(closure))
        gradient_round = await self.strategy.reduce_gradients(step)
        await self.run_compute(self.optimizer.step)
        parameter_round = await self.strategy.after_optimizer_step(step)
        self.step_index = step + 1
        self.last_loss = loss
        return StepResult(
            step=step, loss=loss, gradient_round=gradient_round, parameter_round=parameter_round
        )

    def record_eval(self, metrics: dict[str, float]) -> None:
        """Publish evaluation results (e.g. ``test_accuracy``) in ``/status``."""
        self.last_eval = dict(metrics)

    # ------------------------------------------------------------------ introspection

    def status(self) -> dict[str, Any]:
        strategy = self.strategy.status()
        return {
            "name": self.name,
            "state": self.state,
            "pid": os.getpid(),
            "device": str(self.device),
            "port": self.transport.port,
            "step": self.step_index,
            "round": strategy.get("round", 0),
            "strategy": strategy,
            "neighbors": self.transport.neighbor_states(),
            "loss": self.last_loss,
            "test_accuracy": self.last_eval.get("test_accuracy"),
            "eval": self.last_eval,
            "rounds": self.ledger.as_dict(),
            "uptime_seconds": round(time.monotonic() - self._started_at, 3),
            **self.transport.stats.as_dict(),
        }
