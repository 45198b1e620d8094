"""The strategy interface, the context a strategy gets, and the shared defaults of every strategy.

The node calls a strategy twice per step: ``reduce_gradients`` between backward and the optimizer
step (where exact all-reduce works), and ``after_optimizer_step`` (where parameter gossip works).
A strategy talks to the network only through the small :class:`Exchange` protocol, and to the
model only through the parameters and a ``run_compute`` hook that runs heavy torch work on the
peer's compute thread, never on the event loop.

:class:`StrategyBase` holds what every strategy would otherwise repeat: no gradient round, the
node's own optimizer step, no swarm clock, nothing to say or cancel at the end. It also owns the
DiLoCo outer step (``strategy.outer = "diloco"``): a strategy reports its parameter rounds by
implementing ``_parameter_round``, and the base follows every completed round with the outer
step, so the cadence of the outer optimizer lives with the strategy that makes the rounds and
the node never learns of it. The strategies themselves live one per module beside this one
and import only this module.

Parameters may be stored in float32, bfloat16, float16 or float64 (:data:`PARAMETER_DTYPES`),
one model mixing them if it likes; every strategy and compressor takes all of them. Frames carry
each parameter in its own dtype, averages over 16-bit values are accumulated in float32 and
rounded once (:mod:`p2pdl.core.mixing`), and the float32-only state (error-feedback residuals,
DiLoCo's anchor and outer momentum, CHOCO's public copies) stays float32. Any other dtype is
refused when the strategy is built, with a :class:`~p2pdl.errors.ConfigError` that names it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import torch

from p2pdl.compression.codec import CompressionPolicy, TensorCodec
from p2pdl.compression.compressors import build_compressor
from p2pdl.config import CompressionConfig, OuterKind, StrategyConfig
from p2pdl.core.deadline import RoundDeadline
from p2pdl.core.outer import OuterOptimizer
from p2pdl.core.topology import Graph
from p2pdl.errors import ConfigError, FrameSchemaError, TransportError, UnknownSenderError
from p2pdl.wire import Frame, TensorSpec

# A peer behind its neighbours (a joiner, a restarted peer) catches up to their round, but never by
# more than this: one bogus frame naming round 2**62 must not end everybody's training.
MAX_ROUND_LEAD = 1000
# Names of DiLoCo's outer state in a /state stream, per parameter index.
OUTER_ANCHOR = "outer/anchor/"
OUTER_MOMENTUM = "outer/momentum/"


class Exchange(Protocol):
    """What a strategy needs from the transport."""

    async def encode(self, frame: Frame) -> bytes: ...

    async def send_encoded(self, neighbor: str, data: bytes) -> None: ...

    async def broadcast(self, frame: Frame, neighbors: Collection[str]) -> dict[str, TransportError]: ...

    async def collect(
        self, kind: str, round_index: int, senders: Collection[str], timeout: float
    ) -> dict[str, Frame]: ...

    def advance(self, kind: str, floor: int) -> None: ...

    def highest_round(self, kind: str, senders: Collection[str]) -> int | None: ...

    def take_latest(self, kind: str, sender: str) -> Frame | None: ...

    async def wait_for_senders(self, kind: str, senders: Collection[str], count: int, timeout: float) -> set[str]: ...

    def is_connected(self, neighbor: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """One communication round as it really happened."""

    round: int
    complete: bool
    missing: tuple[str, ...]
    seconds: float


@dataclass
class RoundLedger:
    """Complete versus partial rounds; a round missing any contribution is never 'complete'.

    Exact rounds also count the group size each completed round averaged over, the attempts
    that were aborted and redone, and the state downloads (resyncs) of a peer that fell behind.
    """

    complete: int = 0
    partial: int = 0
    missing_by_peer: Counter[str] = field(default_factory=Counter)
    recent_partial: deque[tuple[int, tuple[str, ...]]] = field(default_factory=lambda: deque(maxlen=16))
    last: RoundOutcome | None = None
    by_group_size: Counter[int] = field(default_factory=Counter)
    redone: int = 0  # exact-round attempts aborted and redone with a new group
    resyncs: int = 0  # state downloads after falling behind the group
    recent_redone: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=16))

    def record_group(self, size: int) -> None:
        self.by_group_size[size] += 1

    def record_redo(self, round_index: int, epoch: int, phase: str, missing: Sequence[str]) -> None:
        self.redone += 1
        self.missing_by_peer.update(missing)
        self.recent_redone.append({"round": round_index, "epoch": epoch, "phase": phase, "missing": sorted(missing)})

    def record(self, round_index: int, missing: Sequence[str], started: float) -> RoundOutcome:
        outcome = RoundOutcome(
            round=round_index,
            complete=not missing,
            missing=tuple(sorted(missing)),
            seconds=time.perf_counter() - started,
        )
        if outcome.complete:
            self.complete += 1
        else:
            self.partial += 1
            self.missing_by_peer.update(outcome.missing)
            self.recent_partial.append((round_index, outcome.missing))
        self.last = outcome
        return outcome

    def as_dict(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "partial": self.partial,
            "missing_by_peer": dict(self.missing_by_peer),
            "recent_partial": [{"round": r, "missing": list(m)} for r, m in self.recent_partial],
            "last_round_seconds": None if self.last is None else round(self.last.seconds, 6),
            "by_group_size": {str(size): count for size, count in sorted(self.by_group_size.items())},
            "redone": self.redone,
            "resyncs": self.resyncs,
            "recent_redone": list(self.recent_redone),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundConfig:
    """The keys of ``[strategy]`` that every round-based strategy reads.

    Each strategy declares its own subclass beside it, holding only the keys it reads, and
    builds it with :meth:`from_table` from the table that :mod:`p2pdl.config` has validated.
    """

    local_steps: int  # H: local optimizer steps between communication rounds
    round_timeout: float  # seconds a round waits for contributions

    @classmethod
    def from_table(cls, table: StrategyConfig) -> Self:
        """This config's keys, read from the validated ``[strategy]`` table."""
        return cls(**{f.name: getattr(table, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, kw_only=True, slots=True)
class OuterConfig:
    """DiLoCo's outer optimizer (``strategy.outer``), run by :class:`StrategyBase` after each round."""

    outer: OuterKind  # "diloco": Nesterov outer step on the averaged change after each sync
    outer_lr: float  # outer learning rate (1 with no momentum: plain averaging)
    outer_momentum: float  # outer Nesterov momentum, in [0, 1)

    @classmethod
    def from_table(cls, table: StrategyConfig) -> Self:
        return cls(outer=table.outer, outer_lr=table.outer_lr, outer_momentum=table.outer_momentum)


class Resync(Protocol):
    """Download and load the state of the first of ``donors`` that serves one at step
    ``at_least`` or later (a donor behind that is refused before anything is loaded); returns
    its step. With ``fresh`` each donor serves its state at the end of its next step
    (PROTOCOL.md §3.5). Raises :class:`~p2pdl.errors.TransportError` when none does."""

    def __call__(self, donors: Sequence[str], *, at_least: int = 0, fresh: bool = False) -> Awaitable[int]: ...


@dataclass(frozen=True, kw_only=True)
class StrategyContext:
    """Everything a strategy may touch, handed over by the node."""

    name: str
    topology: Callable[[], Graph]  # the graph over the live members, in agreed (rank) order, now
    parameters: tuple[tuple[str, torch.nn.Parameter], ...]
    optimizer: torch.optim.Optimizer
    configured: tuple[str, ...]  # the [[peers]] names, in config order
    device: torch.device
    exchange: Exchange
    run_compute: Callable[[Callable[[], Any]], Awaitable[Any]]
    config: StrategyConfig
    ledger: RoundLedger
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    last_step: int | None = None  # run.steps - 1: the step the swarm's run ends on (None: unknown)
    # Download the state of one of the given peers (in preference order) over /state and load it
    # (model, optimizer, this strategy's extras); returns the step it holds. None: cannot resync.
    resync: Resync | None = None
    # Seconds of silence after which the membership declares a member dead (its adaptive
    # detector, PROTOCOL.md §7.3). None: no membership (in-process tests); exact rounds then
    # floor their learnt deadline at strategy.min_round_timeout alone.
    dead_limit: Callable[[str], float] | None = None
    # The training step each live member last gossiped in its figures (PROTOCOL.md §3.6, key
    # ``s``), its current life only; this peer excluded. None: no gossip (in-process tests).
    member_steps: Callable[[], Mapping[str, int]] | None = None


@dataclass(frozen=True, kw_only=True)
class ServedState:
    """What a strategy adds to (or overrides in) the state a peer serves on ``GET /state``.

    ``parameters`` (in ``ctx.parameters`` order) and ``step`` replace the live model and step
    when the live model is not a state another peer can resume from (mid-way between syncs).
    """

    step: int | None = None
    parameters: tuple[torch.Tensor, ...] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Strategy(Protocol):
    """The pluggable part of a peer that decides what is exchanged, when, and how it is mixed."""

    name: str

    def communication_peers(self) -> tuple[str, ...]:
        """The peers this one keeps a link to."""
        ...

    def expected_tensors(self, kind: str, sender: str) -> Mapping[str, TensorSpec]:
        """The tensors a frame of ``kind`` from ``sender`` must carry; FrameSchemaError if unknown."""
        ...

    def before_backward(self, step: int) -> None:
        """Runs on the compute thread after the gradients were zeroed, before forward and backward."""
        ...

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        """Runs after backward, before the optimizer step."""
        ...

    def wants_local_step(self) -> bool:
        """Whether the node should run the local optimizer step after ``reduce_gradients``."""
        ...

    async def after_optimizer_step(self, step: int) -> RoundOutcome | None:
        """Runs after the optimizer step."""
        ...

    def status(self) -> dict[str, Any]: ...

    def swarm_step(self) -> int | None:
        """For strategies without a barrier: the furthest step seen from other peers (else None)."""
        ...

    async def before_step(self, step: int) -> int | None:
        """Before the batch of ``step`` is chosen: a peer whose group is already past this step's
        round (a restarted or thawed one) downloads the group's state now, rather than training
        the round's steps in vain; returns the step it continues from (None: go on with ``step``)."""
        ...

    def adopted_step(self) -> int | None:
        """The step this peer is at by the run's clock after the round just taken, when another
        peer keeps that clock (a sync parameter server's workers); None keeps the node's own count.
        Reading it consumes it."""
        ...

    async def finish(self) -> None:
        """A last word before this peer leaves (the node calls it while links are still up, before
        the leave is announced), e.g. a parameter server's final parameters to its workers."""
        ...

    async def close(self) -> None:
        """Cancel background work (the node calls this before closing the transport)."""
        ...

    def state_replaced(
        self, extra: Mapping[str, torch.Tensor] | None = None, meta: Mapping[str, Any] | None = None
    ) -> None:
        """The model was overwritten outside a round (a state transfer from a live peer);
        ``extra`` and ``meta`` are what the donor's :meth:`served_state` added (validated
        against :meth:`state_specs`)."""
        ...

    async def state_ready(self) -> None:
        """Return once the live model, optimizer and step are consistent enough to be served."""
        ...

    def served_state(self) -> ServedState | None:
        """What to serve on ``/state`` besides the live model (called on the compute thread)."""
        ...

    def state_specs(self) -> dict[str, TensorSpec]:
        """The extra tensors a donor's state may carry for this strategy (see :class:`ServedState`)."""
        ...


def build_codec(ctx: StrategyContext, *, error_feedback: bool) -> TensorCodec | None:
    """The per-parameter codec of ``[compression]``, or None when it is off."""
    config = ctx.compression
    if config.kind == "none":
        return None
    compressor = build_compressor(config.kind, ratio=config.ratio, rank=config.rank, chunk=config.chunk)
    policy = CompressionPolicy(compressor=compressor, min_numel=config.min_numel)
    shapes = {name: tuple(p.shape) for name, p in ctx.parameters}
    dtypes = {name: p.dtype for name, p in ctx.parameters}
    return TensorCodec(policy, shapes, error_feedback=error_feedback, dtypes=dtypes)


# The parameter dtypes every strategy and compressor works with: each travels on the wire in its
# own dtype, and sums over 16-bit ones are accumulated in float32 (p2pdl.core.mixing).
PARAMETER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_parameter_dtypes(kind: str, parameters: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
    """ConfigError naming every parameter whose dtype no strategy can exchange (complex, float8...)."""
    refused = [f"{name} ({_short(p.dtype)})" for name, p in parameters if p.dtype not in PARAMETER_DTYPES]
    if refused:
        allowed = ", ".join(_short(d) for d in PARAMETER_DTYPES)
        raise ConfigError(
            [f"strategy.kind = {kind!r} exchanges parameters of dtype {allowed} only; refused: {', '.join(refused)}"]
        )


def wire_dtype(parameters: Sequence[tuple[str, torch.nn.Parameter]]) -> torch.dtype:
    """The dtype of the flat wire vector: the parameters' own, or float32 when they differ.

    One dtype serves the whole vector, so a model that mixes float32 and bfloat16 parameters (or
    bfloat16 and float16) sends float32: every 16-bit value is exact in float32 and the mean is
    rounded once into each parameter's dtype, the same result per-dtype buckets would give, at
    float32's bytes for the 16-bit part.
    """
    dtypes = {p.dtype for _, p in parameters}
    return functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32


def parameter_specs(parameters: Sequence[tuple[str, torch.nn.Parameter]]) -> dict[str, TensorSpec]:
    """What a parameter frame must carry: every trainable parameter, with its dtype and shape."""
    return {name: TensorSpec.of_tensor(p) for name, p in parameters}


def neighbour_frame_specs(
    ctx: StrategyContext, kind: str, sender: str, accepted_kind: str, specs: Mapping[str, TensorSpec]
) -> Mapping[str, TensorSpec]:
    """``specs`` for a frame of ``accepted_kind`` from a current graph neighbour; refuse anything else."""
    if kind != accepted_kind:
        raise FrameSchemaError(f"{ctx.config.kind} peers exchange only {accepted_kind!r} frames, got {kind!r}")
    if sender not in ctx.topology().neighbors.get(ctx.name, ()):
        raise UnknownSenderError(f"{sender!r} is not a current neighbour of {ctx.name!r}")
    return specs


def reported_degree(frame: Frame, graph: Graph, sender: str, fallback: int) -> int:
    """The degree a neighbour reports in its frame (for MH weights), or the graph's when absent/bad."""
    reported = frame.meta.get("degree")
    if isinstance(reported, int) and not isinstance(reported, bool) and 1 <= reported <= 4096:
        return reported
    return graph.degree(sender) if sender in graph.names else fallback


class StrategyBase:
    """The shared defaults of every strategy, and the DiLoCo outer step after each parameter round.

    A subclass sets ``name``, implements ``expected_tensors`` and whichever of
    ``reduce_gradients`` / ``_parameter_round`` it needs, and extends ``status``. Like a torchft
    local-SGD wrapper, the strategy counts its own rounds: ``after_optimizer_step`` runs the
    subclass's ``_parameter_round`` and, with ``strategy.outer = "diloco"``, follows every round
    that happened with one outer step on the averaged parameters.
    """

    name: str

    def __init__(self, ctx: StrategyContext) -> None:
        check_parameter_dtypes(ctx.config.kind, ctx.parameters)
        self._ctx = ctx
        self._specs = parameter_specs(ctx.parameters)
        self._round = 0
        outer = OuterConfig.from_table(ctx.config)
        self._outer: OuterOptimizer | None = None
        if outer.outer == "diloco":
            # The anchor is a copy of the parameters now: the strategy is built on the initial model.
            self._outer = OuterOptimizer(
                [p for _, p in ctx.parameters], lr=outer.outer_lr, momentum=outer.outer_momentum
            )
        table = ctx.config
        self._deadline: RoundDeadline | None = None
        if table.round_margin > 0:
            self._deadline = RoundDeadline(
                floor=min(table.min_round_timeout, table.round_timeout),
                ceiling=table.round_timeout,
                margin=table.round_margin,
            )

    def round_deadline(self) -> float:
        """Seconds the next round waits: learnt from recent rounds, within [min_round_timeout, round_timeout]."""
        if self._deadline is None:
            return self._ctx.config.round_timeout
        return self._deadline.deadline()

    def observe_round(self, seconds: float) -> None:
        """A round took ``seconds`` (what it waited, when it hit its deadline): feeds ``round_deadline``."""
        if self._deadline is not None:
            self._deadline.observe(seconds)

    def _neighbors(self) -> tuple[str, ...]:
        return self._ctx.topology().neighbors.get(self._ctx.name, ())

    def communication_peers(self) -> tuple[str, ...]:
        return self._neighbors()

    def before_backward(self, step: int) -> None:
        return None

    async def reduce_gradients(self, step: int) -> RoundOutcome | None:
        return None

    def wants_local_step(self) -> bool:
        return True

    async def after_optimizer_step(self, step: int) -> RoundOutcome | None:
        outcome = await self._parameter_round(step)
        if outcome is not None:
            # One compute call: a state snapshot (also on the compute thread) sees the outer state
            # and the round's bookkeeping either both before this round or both after it.
            await self._ctx.run_compute(self._finish_round)
        return outcome

    def _finish_round(self) -> None:
        """On the compute thread after a parameter round: DiLoCo's outer step, then the subclass's
        bookkeeping of the round just applied (:meth:`_round_applied`)."""
        if self._outer is not None:
            # DiLoCo: the change since the last sync, averaged, is the outer pseudo-gradient.
            self._outer.step()
        self._round_applied()

    def _round_applied(self) -> None:
        """Runs on the compute thread after each parameter round and its outer step (default: nothing)."""

    async def _parameter_round(self, step: int) -> RoundOutcome | None:
        """This strategy's exchange of parameters after optimizer step ``step`` (None: no round)."""
        return None

    def swarm_step(self) -> int | None:
        return None

    async def before_step(self, step: int) -> int | None:
        return None

    def adopted_step(self) -> int | None:
        return None

    async def finish(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def state_ready(self) -> None:
        return None

    def served_state(self) -> ServedState | None:
        """DiLoCo's outer state (anchor, momentum, step count) rides along with the model."""
        if self._outer is None:
            return None
        state = self._outer.state_dict()
        anchors, buffers = state["anchor"], state["momentum_buffer"]
        assert isinstance(anchors, list) and isinstance(buffers, list)
        extra = {f"{OUTER_ANCHOR}{i}": t for i, t in enumerate(anchors)}
        extra.update({f"{OUTER_MOMENTUM}{i}": t for i, t in enumerate(buffers)})
        return ServedState(extra=extra, meta={"outer_steps": self._outer.steps})

    def state_specs(self) -> dict[str, TensorSpec]:
        if self._outer is None:
            return {}
        specs = {}
        for i, anchor in enumerate(self._outer.anchor):
            spec = TensorSpec.of_tensor(anchor)
            specs[f"{OUTER_ANCHOR}{i}"] = spec
            specs[f"{OUTER_MOMENTUM}{i}"] = spec
        return specs

    def state_replaced(
        self, extra: Mapping[str, torch.Tensor] | None = None, meta: Mapping[str, Any] | None = None
    ) -> None:
        if self._outer is None:
            return
        count = len(self._outer.anchor)
        names = [f"{prefix}{i}" for prefix in (OUTER_ANCHOR, OUTER_MOMENTUM) for i in range(count)]
        steps = (meta or {}).get("outer_steps")
        if extra is not None and all(n in extra for n in names) and isinstance(steps, int) and steps >= 0:
            # The donor's outer state: the same anchor and momentum as every member of its group.
            self._outer.load_state_dict(
                {
                    "anchor": [extra[f"{OUTER_ANCHOR}{i}"] for i in range(count)],
                    "momentum_buffer": [extra[f"{OUTER_MOMENTUM}{i}"] for i in range(count)],
                    "lr": self._outer.lr,
                    "momentum": self._outer.momentum,
                    "nesterov": float(self._outer.nesterov),
                    "steps": steps,
                }
            )
        else:
            self._outer.reset_anchor()  # a donor without outer state: the new model is the anchor

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"kind": self.name, "round": self._round}
        if self._outer is not None:
            status["outer_steps"] = self._outer.steps
        status["round_deadline_seconds"] = round(self.round_deadline(), 3)
        return status
