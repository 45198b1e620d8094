"""The peer: an asyncio node that ties one model, one optimizer, a strategy and the transport.

:class:`Peer` is the public training API. A user's loop calls ``await peer.step(closure)`` where
the closure runs forward and backward and returns the loss, as with ``optimizer.step(closure)``.
The peer runs the closure and the optimizer step on its single compute thread (so the event loop
keeps serving heartbeats and frames during a step), and calls the strategy around the optimizer
step. The node itself holds no mixing math, no wire format and no membership protocol: those
live in the layers below (:mod:`p2pdl.membership.gossip` keeps the view current; the node only
rewires the graph when the live set changes). State transfer (``GET /state``, joins and resyncs)
is its :class:`~p2pdl.peer.stateservice.StateService`, telemetry its
:class:`~p2pdl.peer.telemetry.PeerTelemetry`.

Trade-off: everything that reads or writes the model (the step, the strategy's mixing, a state
snapshot or load) runs on the one compute thread, one at a time, so none of it needs a lock;
none of it runs in parallel with the rest either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch

from p2pdl.config import Config, parse_address
from p2pdl.core.topology import Graph, build_graph
from p2pdl.errors import ConfigError, TrainingDivergedError, TransportError
from p2pdl.membership.gossip import MembershipGossip
from p2pdl.membership.view import MembershipView, Timing
from p2pdl.net.auth import security_from_config
from p2pdl.net.transport import Transport
from p2pdl.obs.digest import LINK_DOWN, LINK_UP, links_of
from p2pdl.peer.stateservice import StateService
from p2pdl.peer.telemetry import PeerTelemetry
from p2pdl.strategies import build_strategy
from p2pdl.strategies.base import RoundLedger, RoundOutcome, Strategy, StrategyContext

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


class StepHooks(Protocol):
    """What a training loop may run in place of the plain ``optimizer.step()`` of :meth:`Peer.step`.

    ``optimizer_step`` runs on the compute thread after the strategy's ``reduce_gradients`` (so it
    sees the averaged gradients under allreduce, identical on every peer) and only when the
    strategy wants a local step. It owns the whole update: unscaling, a non-finite check,
    clipping, ``optimizer.step()`` (or not) and the learning-rate schedule. A decision it takes
    from the averaged gradients alone is the same on every peer.
    """

    def optimizer_step(self) -> None: ...

    def state_loaded(self, step: int) -> None:
        """The parameters and optimizer state were just replaced by a donor's, which stood at
        ``step`` (a join or a resync): put the learning-rate schedule there too, so that this
        peer's next update uses the group's learning rate. Runs on the compute thread."""
        ...


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
        name: this peer's name; a name not in ``config.peers`` joins by bootstrap and needs ``listen``.
        model: any ``nn.Module``, already on ``device`` and identically initialised on every peer.
        optimizer: any torch optimizer over ``model``'s parameters.
        device: where the model lives; mixing runs there.
        listen: ``host:port`` to bind instead of the configured address (e.g. ``0.0.0.0:29500``).
        advertise: ``host:port`` other peers should dial (default: the configured or listen address).
        bootstrap: extra ``host:port`` addresses of live peers to learn the membership from.
        start_step: the step to start counting from (e.g. after resuming a checkpoint).
        hooks: replaces the plain ``optimizer.step()`` (see :class:`StepHooks`); None keeps it.
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
        advertise: str | None = None,
        bootstrap: tuple[str, ...] = (),
        start_step: int = 0,
        hooks: StepHooks | None = None,
    ) -> None:
        entry = config.peer(name)
        if entry is None and listen is None:
            known = ", ".join(config.peer_names) or "none"
            raise ConfigError(
                [f"--name {name!r} is not in [[peers]] (known: {known}); a joining peer needs --listen HOST:PORT"]
            )
        bind = listen or (entry.address if entry is not None else "")
        advertised = advertise or (entry.address if entry is not None else bind)
        try:
            host, port = parse_address(bind)
            advertised_host, _ = parse_address(advertised)
        except ValueError as exc:
            raise ConfigError([f"--listen/--advertise: {exc}"]) from exc
        if advertised_host in ("0.0.0.0", "::", ""):
            raise ConfigError(
                [f"{name!r} would advertise {advertised!r}, which no other machine can dial; pass --advertise"]
            )
        self.config = config
        self.name = name
        self.model = model
        self.optimizer = optimizer
        self.hooks = hooks
        self.device = device or next(model.parameters()).device
        self.step_index = start_step
        self.state: PeerState = "created"
        self.last_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self.headline: str | None = None  # the workload's headline metric, a key of last_eval
        self.ledger = RoundLedger()
        self.rewires: list[dict[str, Any]] = []
        self._started_at = time.monotonic()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"p2pdl-compute-{name}")
        membership = config.membership
        self.membership = MembershipView(
            name=name,
            address=advertised,
            configured=[(p.name, p.address) for p in config.peers],
            timing=Timing(
                gossip_interval=membership.gossip_interval,
                suspect_after=membership.suspect_after,
                dead_after=membership.dead_after,
                phi_threshold=membership.phi_threshold,
            ),
        )
        self._graph = self._graph_over(self.membership.live_names())
        self.security = security_from_config(config.security, name)
        self.transport = Transport(
            name=name,
            listen_host=host,
            listen_port=port,
            addresses=self.membership.addresses(),
            config=config.transport,
            expected_tensors=lambda kind, sender: self.strategy.expected_tensors(kind, sender),
            status=self.status,
            admit=lambda other: other in self._graph.names,
            on_peer_left=self._on_peer_left,
            on_heard=self.membership.touch,
            security=self.security,
        )
        self.telemetry = PeerTelemetry(
            name=name,
            view=self.membership,
            status=self.status,
            observe=config.observe,
            interval=membership.gossip_interval,
            on_reject=lambda reason: self.transport.stats.auth_rejected.update([reason]),
        )
        self._compute_seconds = 0.0  # time on the compute thread, for the step's time split
        self.state_service = StateService(
            name=name,
            model=model,
            optimizer=optimizer,
            transport=self.transport,
            membership=self.membership,
            config=config.transport,
            host=self,
        )
        self.gossip = MembershipGossip(
            view=self.membership,
            transport=self.transport,
            config=membership,
            seeds=tuple(dict.fromkeys([*membership.bootstrap, *bootstrap])),
            request_timeout=config.transport.request_timeout,
            on_change=self._on_membership_change,
            describe=self._describe_members,
            figures=self.telemetry.figures,
        )
        self.transport.add_route("GET", "/state", self.state_service.state_handler)
        for method, path, handler in self.telemetry.route_table():
            self.transport.add_route(method, path, handler)
        self._strategy: Strategy = build_strategy(
            StrategyContext(
                name=name,
                topology=lambda: self._graph,
                parameters=tuple((n, p) for n, p in model.named_parameters() if p.requires_grad),
                optimizer=optimizer,
                configured=config.peer_names,
                device=self.device,
                exchange=self.transport,
                run_compute=self.run_compute,
                config=config.strategy,
                ledger=self.ledger,
                compression=config.compression,
                last_step=config.run.steps - 1,
                resync=self.state_service.resync,
                dead_limit=self.membership.dead_limit,
                member_steps=self._member_steps,
            )
        )
        self.transport.set_neighbors(self._strategy.communication_peers())

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @property
    def graph(self) -> Graph:
        """The communication graph over the live members, as this peer sees it now."""
        return self._graph

    def live_members(self) -> tuple[str, ...]:
        return self._graph.names

    def _current_figures(self) -> dict[str, dict[str, Any]]:
        """The figures (PROTOCOL.md §3.6) of the other live members, current life only."""
        current = {}
        for name in self.membership.live_names():
            member, entry = self.membership.member(name), self.telemetry.figures.get(name)
            if name != self.name and member is not None and entry is not None and entry["v"][0] == member.incarnation:
                current[name] = entry
        return current

    def _reported_down(self) -> set[str]:
        """Peers that some live member reports its link to as down and none reports as up (the
        figures' ``k``): a crashed peer that the others still relay as live until their detectors
        declare it dead. Hearsay, so it only ever shortens a wait (:meth:`_start`)."""
        up: set[str] = set()
        down: set[str] = set()
        for entry in self._current_figures().values():
            for link in links_of(entry):
                if link.health == LINK_UP:
                    up.add(link.neighbor)
                elif link.health == LINK_DOWN:
                    down.add(link.neighbor)
        return down - up

    def _member_steps(self) -> dict[str, int]:
        """The step each live member gossiped last (its figures, PROTOCOL.md §3.6), current life only."""
        return {name: int(entry["s"]) for name, entry in self._current_figures().items()}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind, learn the membership, connect to neighbours (all bounded by ``startup_timeout``).

        If anything fails on the way, what was started is closed again before the error propagates
        (``__aexit__`` never runs when ``__aenter__`` raises).
        """
        try:
            await self._start()
        except BaseException:
            if self.state != "closed":
                await self.close()
            raise

    async def _start(self) -> None:
        self.state = "starting"
        deadline = time.monotonic() + self.config.transport.startup_timeout
        port = await self.transport.start()
        own = self.membership.member(self.name)
        assert own is not None
        host, advertised_port = parse_address(own.address)
        if advertised_port == 0:
            self.membership.set_own_address(f"{host}:{port}")
        self.gossip.start()
        await self.telemetry.start()
        configured = [n for n in self.config.peer_names if n != self.name]
        while time.monotonic() < deadline:
            heard = [n for n in configured if self.membership.heard_from(n)]
            others = [n for n in self.membership.live_names() if n != self.name]
            if len(heard) == len(configured) and (configured or others or not self.gossip.seeds):
                break
            await asyncio.sleep(0.05)
        self._rewire(reason="startup")
        # Wait in slices and rewire when the live set moved: a configured peer that is dead (e.g.
        # when this peer restarts with --resume) drops out of the neighbours once the detector
        # declares it dead. One that the others report their links to as down is not waited for:
        # they relay it as live until their own detectors give up on it (PROTOCOL.md §3.6).
        # The figures are trusted only after a grace: a peer that restarts at the same time as
        # this one is reported down from its first life until its links are up again.
        trust_figures_at = time.monotonic() + max(1.0, 2 * self.config.membership.gossip_interval)
        while True:
            missing = await self.transport.wait_connected(min(0.25, max(0.0, deadline - time.monotonic())))
            if not missing or time.monotonic() >= deadline:
                break
            if time.monotonic() >= trust_figures_at and set(missing) <= self._reported_down():
                log.info(
                    "%s: not waiting for %s: the members report their links to them down",
                    self.name,
                    ", ".join(missing),
                )
                missing = ()
                break
            if self.membership.live_names() != self._graph.names:
                self._rewire(reason="startup")
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
        """Announce the leave (membership and links), close every link, stop the compute thread."""
        if self.state == "closed":
            return
        announce = self.state in ("training", "starting")
        self.state = "stopping"
        # Downloads held for the end of a step that will not come get the current state now.
        self.state_service.release_held()
        try:
            if announce:
                # The strategy's last word first, while every link is still up (leave rewires at once).
                with contextlib.suppress(TimeoutError, TransportError):
                    async with asyncio.timeout(self.config.transport.shutdown_timeout):
                        await self._strategy.finish()
                await self.gossip.leave(self.config.transport.shutdown_timeout)
            await self.gossip.close(self.config.transport.shutdown_timeout)
            await self.telemetry.close(self.config.transport.shutdown_timeout)
            async with asyncio.timeout(self.config.transport.shutdown_timeout):
                await self._strategy.close()
            await self.transport.close(announce=True)
        finally:
            # Off the loop: the compute thread may still be finishing a step or a mix.
            await asyncio.to_thread(self._compute.shutdown, wait=True)
            self.state = "closed"

    async def __aenter__(self) -> Peer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ membership

    def _graph_over(self, live: Sequence[str]) -> Graph:
        """The configured topology kind over the live members, adapted where it must be."""
        topo = self.config.topology
        names = list(live)
        if len(names) < 2:
            return build_graph("full", names)
        try:
            if topo.kind == "torus":
                fits = topo.rows is not None and topo.cols is not None and topo.rows * topo.cols == len(names)
                return build_graph("torus", names, rows=topo.rows if fits else None, cols=topo.cols if fits else None)
            if topo.kind == "star":
                center = topo.center if topo.center in names else names[0]
                return build_graph("star", names, center=center)
            if topo.kind == "explicit":
                edges = [(a, b) for a, b in topo.edges or () if a in names and b in names]
                return build_graph("explicit", names, edges=edges)
            return build_graph(topo.kind, names)
        except ConfigError as exc:
            log.warning("%s: %s over %s is invalid (%s); using a ring", self.name, topo.kind, names, exc)
            return build_graph("ring", names)

    def _rewire(self, *, reason: str) -> None:
        live = self.membership.live_names()
        if self.name not in live:
            # This peer is leaving (close() marked it left): its graph stays as it was. Seen when
            # the peers of a run all close at once: a neighbour's goodbye arrived after our own.
            return
        graph = self._graph_over(live)
        for member, address in self.membership.addresses().items():
            if member != self.name:
                self.transport.update_address(member, address)
        before = set(self.transport.neighbors)
        self._graph = graph
        self.transport.set_neighbors(self._strategy.communication_peers())
        after = set(self.transport.neighbors)
        if after != before:
            record = {
                "time": time.time(),
                "step": self.step_index,
                "reason": reason,
                "removed": sorted(before - after),
                "added": sorted(after - before),
                "neighbors": sorted(after),
            }
            self.rewires.append(record)
            del self.rewires[:-50]
            log.info("%s: rewired (%s): -%s +%s", self.name, reason, record["removed"], record["added"])

    def _on_peer_left(self, name: str) -> None:
        if self.membership.mark_left(name):
            self._rewire(reason=f"{name} left")

    def _on_membership_change(self) -> None:
        # During startup the start sequence rewires itself once it has heard the configured peers.
        if self.state == "training":
            self._rewire(reason="membership")

    def _describe_members(self) -> dict[str, Any]:
        """This node's fields of ``GET /members`` (the view adds its own)."""
        return {
            "frames_superseded": self.transport.mailbox.superseded,
            "compression": self._compression_status(),
            "live": list(self.live_members()),
            "neighbors": list(self._graph.neighbors.get(self.name, ())),
        }

    # ------------------------------------------------------------------ state transfer

    async def fetch_state(self, donor: str | None = None, *, at_least: int = 0, fresh: bool = False) -> int:
        """Download parameters, optimizer state and step from a live neighbour; returns the step.

        A donor whose state is before step ``at_least`` is refused as soon as its first frame
        says so, before anything is loaded, and the next candidate is tried. With ``fresh`` the
        donor serves the state at the end of its next step (PROTOCOL.md §3.5).
        """
        return await self.state_service.fetch_state(donor, at_least=at_least, fresh=fresh)

    # ------------------------------------------------------------------ training

    async def run_compute(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this peer's compute thread (one at a time, off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, self._timed, fn)

    def _timed(self, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return fn()
        finally:
            self._compute_seconds += time.perf_counter() - started  # only the compute thread writes it

    def _forward_backward(self, closure: Callable[[], torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.before_backward(self.step_index)  # overlap: bind gradients to buckets, arm hooks
        loss = closure()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDivergedError(f"{self.name}: loss is {value} at step {self.step_index}")
        return value

    async def catch_up(self) -> bool:
        """Before choosing the batch of the next step: when the group is already past the round
        of :attr:`step_index` (this peer restarted, thawed or was cut off), download its state now
        instead of training that round in vain. Returns whether :attr:`step_index` moved."""
        if self.state != "training":
            raise RuntimeError(f"peer {self.name} is {self.state}; use 'async with Peer(...)'")
        step = await self.strategy.before_step(self.step_index)
        if step is None or step == self.step_index:
            return False
        self.step_index = step
        return True

    async def step(self, closure: Callable[[], torch.Tensor]) -> StepResult:
        """One training step: closure (forward + backward), strategy, optimizer, strategy.

        The closure must compute the loss, call ``backward()`` on it and return it; gradients are
        zeroed before it runs.
        """
        if self.state != "training":
            raise RuntimeError(f"peer {self.name} is {self.state}; use 'async with Peer(...)'")
        step = self.step_index
        started, compute_before = time.perf_counter(), self._compute_seconds
        waited_before = float(getattr(self.strategy, "wait_seconds", 0.0))
        loss = await self.run_compute(lambda: self._forward_backward(closure))
        gradient_round = await self.strategy.reduce_gradients(step)
        if self.strategy.wants_local_step():
            if self.hooks is None:
                await self.run_compute(self.optimizer.step)
            else:
                await self.run_compute(self.hooks.optimizer_step)
        parameter_round = await self.strategy.after_optimizer_step(step)
        self.step_index = step + 1
        if parameter_round is not None:
            # A peer behind its neighbours (a joiner, a restarted peer) skips ahead to their round.
            self.step_index = max(self.step_index, (parameter_round.round + 1) * self.config.strategy.local_steps)
        adopted = self.strategy.adopted_step()
        if adopted is not None:
            # Another peer keeps the run's clock (a sync parameter server): its step is ours.
            self.step_index = adopted
        self.last_loss = loss
        await self.state_service.serve_fresh()
        wall = time.perf_counter() - started
        self.state_service.step_took(wall)
        self.telemetry.step_done(
            wall=wall,
            compute=self._compute_seconds - compute_before,
            waiting=float(getattr(self.strategy, "wait_seconds", 0.0)) - waited_before,
        )
        for outcome in (gradient_round, parameter_round):
            if outcome is not None:
                self.telemetry.round_done(self.strategy.name, outcome.seconds)
        return StepResult(step=step, loss=loss, gradient_round=gradient_round, parameter_round=parameter_round)

    def record_eval(self, metrics: dict[str, float], headline: str | None = None) -> None:
        """Publish evaluation results (e.g. ``test_accuracy``) in ``/status``; ``headline`` names
        the one a swarm view shows (the workload's, e.g. ``val_loss`` for a language model)."""
        self.last_eval = dict(metrics)
        if headline is not None:
            self.headline = headline

    # ------------------------------------------------------------------ introspection

    def _compression_status(self) -> dict[str, Any]:
        """Wire bytes against what the same tensors would take as float32 (the honest ratio)."""
        raw = getattr(self.strategy, "raw_bytes", 0)
        sent = self.transport.stats.bytes_sent
        return {
            "kind": self.config.compression.kind,
            "fp32_equivalent_bytes": raw,
            "wire_bytes_sent": sent,
            "ratio": round(raw / sent, 3) if raw and sent else None,
        }

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
            "headline": None
            if self.headline is None
            else {"metric": self.headline, "value": self.last_eval.get(self.headline)},
            "rounds": self.ledger.as_dict(),
            "frames_superseded": self.transport.mailbox.superseded,
            "compression": self._compression_status(),
            "incarnation": self.membership.incarnation,
            "live_members": list(self.live_members()),
            "rewires": self.rewires[-5:],
            "uptime_seconds": round(time.monotonic() - self._started_at, 3),
            "telemetry": self.telemetry.status(),
            **self.transport.stats.as_dict(),
        }
