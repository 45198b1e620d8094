"""The ``[strategy]`` and ``[compression]`` sections: how peers share what they learn, and what goes
on the wire instead of fp32 tensors.

They sit apart from :mod:`p2pdl.config.sections` (the network, membership, security and run-time
sections) because they are the largest and the ones a new strategy or compressor extends. The
trade-off: a cross-section rule that needs both (e.g. a compressor that a strategy cannot run)
is checked in :class:`~p2pdl.config.load.Config`, where every section is known.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from p2pdl.config.base import (
    CompressorKind,
    OuterKind,
    OuterQuant,
    PsMode,
    RobustKind,
    StrategyKind,
    _check,
    _Validated,
)

__all__ = ["OVERLAP_MAX_BUCKETS", "CompressionConfig", "StrategyConfig"]


# strategy.overlap: the most gradient buckets a model may be cut into (each bucket's frames occupy
# mailbox slots while a slower peer is still in backward, so transport.inbox_frames must hold them)
OVERLAP_MAX_BUCKETS = 6


@dataclass(frozen=True, kw_only=True, slots=True)
class StrategyConfig(_Validated):
    """How peers share what they learn. See docs/CONFIG.md for when to choose each kind.

    * ``gossip``: synchronous D-PSGD over the topology (parameters, every H steps).
    * ``allreduce``: exact averaging of gradients every step (H = 1), or of parameters every H steps.
    * ``async-gossip``: AD-PSGD; mixes with the latest parameters from each neighbour, never waits.
    * ``ps``: a parameter server (``server``) holds the model; workers push gradients, pull parameters.
    * ``push-sum``: SGP over the one-peer exponential graph (directed, time-varying).
    * ``streaming-diloco``: DiLoCo synced one fragment at a time, each sync overlapping inner steps.
    """

    _section: typing.ClassVar[str] = "strategy"
    kind: StrategyKind = "gossip"
    local_steps: int = 1  # H: local optimizer steps between communication rounds
    round_timeout: float = 10.0  # seconds a round waits for contributions at most (the adaptive deadline's ceiling)
    # Adaptive round deadline: wait round_margin x the 90th percentile of recent round times,
    # never less than min_round_timeout seconds (capped at round_timeout) nor more than round_timeout
    # (round_margin = 0: always round_timeout)
    round_margin: float = 4.0
    min_round_timeout: float = 1.0
    max_staleness: int = 20  # async-gossip: drop neighbour parameters older than this many steps
    # async-gossip: never run more than this many steps (plus local_steps) ahead of the fastest
    # connected neighbour; beyond it, wait up to round_timeout for a newer copy from any (0: off)
    max_lead: int = 4
    outer: OuterKind = "none"  # "diloco": Nesterov outer step on the averaged change after each sync
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    server: str | None = None  # ps: the name of the server peer (default: the first configured peer)
    ps_mode: PsMode = "sync"
    ps_quorum: int = 0  # ps sync: gradients the server waits for per round; 0 = every live worker
    # Robust mixing against a faulty or malicious neighbour (gossip): "clip" is self-centred clipping
    # (He, Karimireddy & Jaggi 2022), "trimmed-mean" a coordinate-wise trimmed mean over self + neighbours.
    robust: RobustKind = "none"
    clip_radius: float = 0.0  # clip: fixed radius (L2, whole model); 0 = 2 x the median accepted neighbour distance
    reject_factor: float = 10.0  # clip: a neighbour farther than this x the median accepted distance is ignored
    trim: int = 1  # trimmed-mean: values dropped at each end, per coordinate
    # allreduce: what a failed exact round does: "redo" agrees on a new group and redoes the round;
    # "strict" raises AllReduceIncompleteError as soon as one contribution is missing.
    on_failure: typing.Literal["redo", "strict"] = "redo"
    min_peers: int = 0  # allreduce: members an exact round needs; 0 = a strict majority of [[peers]]
    quorum_timeout: float = 120.0  # allreduce: seconds below min_peers before QuorumLostError
    # gossip: a peer that sees fewer than half of the configured peers live holds its training up
    # to this many seconds for them to return (0: never), so it does not run ahead of a frozen majority
    minority_wait: float = 20.0
    # streaming-diloco: F fragments synced at staggered steps; each sync overlaps overlap_steps
    # (tau) inner steps; outer gradients travel as outer_quant with one float32 scale per
    # quant_block values; the average is merged as merge_alpha * local + (1 - merge_alpha) * global
    fragments: int = 4
    overlap_steps: int = 1
    outer_quant: OuterQuant = "int8"
    quant_block: int = 128
    merge_alpha: float = 0.5
    # gossip: rounds by which mixing lags the send. 0: synchronous D-PSGD (wait for the neighbours'
    # copies before the next step); 1: send a snapshot and train on, mixing the neighbours'
    # snapshots one round later (p2pdl/core/delayed.py)
    delay: int = 0
    # allreduce, local_steps = 1: reduce gradient buckets from backward hooks while backward runs
    # (gradients live in reusable flat buckets); bucket_mb: MiB per bucket, the first at most 1 MiB
    overlap: bool = False
    bucket_mb: float = 25.0
    # allreduce without overlap: the exact average's vector is reduced in this many pieces at once;
    # each piece's mean runs as soon as its chunks are in, and its all-gather goes out while later
    # pieces are still in flight (1: one reduce-scatter and all-gather over the whole vector)
    pipeline: int = 1

    def problems(self) -> list[str]:
        found: list[str] = []
        _check(found, self.local_steps >= 1, f"strategy.local_steps must be >= 1, got {self.local_steps}")
        _check(found, self.round_timeout > 0, f"strategy.round_timeout must be > 0 seconds, got {self.round_timeout}")
        _check(
            found,
            self.round_margin == 0 or self.round_margin >= 1,
            f"strategy.round_margin must be 0 (off) or >= 1, got {self.round_margin}",
        )
        _check(
            found,
            self.min_round_timeout > 0,
            f"strategy.min_round_timeout must be > 0 seconds, got {self.min_round_timeout}",
        )
        _check(found, self.max_staleness >= 0, f"strategy.max_staleness must be >= 0, got {self.max_staleness}")
        _check(
            found,
            self.max_lead >= 0,
            f"strategy.max_lead must be >= 0, got {self.max_lead}",
        )
        _check(found, self.outer_lr > 0, f"strategy.outer_lr must be > 0, got {self.outer_lr}")
        _check(
            found, 0 <= self.outer_momentum < 1, f"strategy.outer_momentum must be in [0, 1), got {self.outer_momentum}"
        )
        _check(found, self.ps_quorum >= 0, f"strategy.ps_quorum must be >= 0, got {self.ps_quorum}")
        _check(found, self.clip_radius >= 0, f"strategy.clip_radius must be >= 0, got {self.clip_radius}")
        _check(found, self.trim >= 1, f"strategy.trim must be >= 1, got {self.trim}")
        _check(found, self.minority_wait >= 0, f"strategy.minority_wait must be >= 0 seconds, got {self.minority_wait}")
        _check(found, self.delay in (0, 1), f"strategy.delay must be 0 or 1 rounds, got {self.delay}")
        _check(
            found,
            self.delay == 0 or (self.kind == "gossip" and self.robust == "none" and self.outer == "none"),
            "strategy.delay = 1 applies to kind = 'gossip' with robust = 'none' and outer = 'none' "
            "(delayed mixing of snapshot differences; robust rules and DiLoCo's outer step need the "
            f"synchronous round); got kind = {self.kind!r}, robust = {self.robust!r}, outer = {self.outer!r}",
        )
        _check(found, self.reject_factor > 1, f"strategy.reject_factor must be > 1, got {self.reject_factor}")
        _check(found, self.min_peers >= 0, f"strategy.min_peers must be >= 0, got {self.min_peers}")
        _check(found, self.bucket_mb > 0, f"strategy.bucket_mb must be > 0 MiB, got {self.bucket_mb}")
        _check(
            found,
            1 <= self.pipeline <= OVERLAP_MAX_BUCKETS,
            f"strategy.pipeline must be in [1, {OVERLAP_MAX_BUCKETS}] pieces (each piece's frames occupy "
            f"mailbox slots), got {self.pipeline}",
        )
        _check(
            found,
            self.pipeline == 1 or (self.kind == "allreduce" and not self.overlap),
            "strategy.pipeline > 1 applies to kind = 'allreduce' without strategy.overlap (overlap reduces "
            f"its buckets as backward fills them), got kind = {self.kind!r}, overlap = {self.overlap}",
        )
        _check(
            found,
            not self.overlap or (self.kind == "allreduce" and self.local_steps == 1),
            "strategy.overlap applies to kind = 'allreduce' with local_steps = 1 (gradients averaged every step), "
            f"got kind = {self.kind!r}, local_steps = {self.local_steps}",
        )
        _check(
            found,
            self.quorum_timeout > 0,
            f"strategy.quorum_timeout must be > 0 seconds, got {self.quorum_timeout}",
        )
        _check(
            found,
            self.robust == "none" or self.kind == "gossip",
            "strategy.robust applies to kind = 'gossip' (parameter mixing with neighbours)",
        )
        _check(
            found,
            self.kind == "ps" or (self.server is None and self.ps_quorum == 0),
            "strategy.server and strategy.ps_quorum apply only to kind = 'ps'",
        )
        _check(
            found,
            self.kind != "ps" or self.local_steps == 1 or self.ps_mode == "sync",
            "strategy.local_steps > 1 with kind = 'ps' needs ps_mode = 'sync' (the server averages "
            "parameters every H steps; asynchronous workers push every gradient)",
        )
        _check(
            found,
            self.outer == "none" or self.kind in ("gossip", "allreduce", "push-sum", "async-gossip"),
            "strategy.outer = 'diloco' needs a parameter-averaging kind (gossip, allreduce, push-sum, async-gossip)",
        )
        _check(
            found,
            self.outer == "none" or self.kind != "allreduce" or self.local_steps > 1,
            "strategy.outer = 'diloco' with kind = 'allreduce' needs local_steps > 1 (parameters are averaged "
            "every H steps; with H = 1 gradients are averaged and there is no outer step)",
        )
        found.extend(self._streaming_problems())
        return found

    def _streaming_problems(self) -> list[str]:
        found: list[str] = []
        if self.kind != "streaming-diloco":
            defaults = StrategyConfig.__dataclass_fields__
            changed = [
                key
                for key in ("fragments", "overlap_steps", "outer_quant", "quant_block", "merge_alpha")
                if getattr(self, key) != defaults[key].default
            ]
            _check(
                found, not changed, f"strategy.{', strategy.'.join(changed)} apply only to kind = 'streaming-diloco'"
            )
            return found
        _check(
            found,
            self.outer == "none",
            "strategy.outer must stay 'none' with kind = 'streaming-diloco' (it runs its own outer step per fragment)",
        )
        _check(
            found,
            1 <= self.fragments <= self.local_steps,
            f"strategy.fragments must be in [1, local_steps = {self.local_steps}] (one sync offset per fragment), "
            f"got {self.fragments}",
        )
        _check(
            found,
            0 <= self.overlap_steps < self.local_steps,
            f"strategy.overlap_steps must be in [0, local_steps = {self.local_steps}) (a fragment's sync ends "
            f"before its next one starts), got {self.overlap_steps}",
        )
        _check(
            found,
            2 <= self.quant_block <= 1 << 20 and self.quant_block % 2 == 0,
            f"strategy.quant_block must be an even number of values in [2, 1048576], got {self.quant_block}",
        )
        _check(found, 0 <= self.merge_alpha <= 1, f"strategy.merge_alpha must be in [0, 1], got {self.merge_alpha}")
        return found


@dataclass(frozen=True, kw_only=True, slots=True)
class CompressionConfig(_Validated):
    """What goes on the wire instead of fp32 tensors. See docs/CONFIG.md for when to use which.

    ``allreduce`` (H = 1) and ``ps`` compress gradients with error feedback; ``gossip`` runs
    CHOCO-gossip (compressed differences to public copies, consensus step ``choco_gamma``).
    """

    _section: typing.ClassVar[str] = "compression"
    kind: CompressorKind = "none"
    ratio: float = 0.01  # topk: fraction of entries kept
    rank: int = 4  # powersgd: rank of the factors
    chunk: int = 1024  # int8: elements per scale
    min_numel: int = 4096  # tensors smaller than this go uncompressed (fp32)
    error_feedback: bool = True  # gradient strategies: carry what compression dropped to the next step
    choco_gamma: float = 0.03  # gossip: CHOCO consensus step size (top-1%: 0.02-0.04; int8: 0.5-1.0)
    # allreduce + topk: DGC momentum correction (0 = off); the optimizer must then run momentum 0
    momentum_correction: float = 0.0
    warmup_steps: int = 0  # allreduce + topk: steps over which the kept fraction falls 25%, 6.25%, ... to ratio

    def problems(self) -> list[str]:
        found: list[str] = []
        _check(found, 0 < self.ratio <= 1, f"compression.ratio must be in (0, 1], got {self.ratio}")
        _check(found, self.rank >= 1, f"compression.rank must be >= 1, got {self.rank}")
        _check(found, self.chunk >= 1, f"compression.chunk must be >= 1, got {self.chunk}")
        _check(found, self.min_numel >= 0, f"compression.min_numel must be >= 0, got {self.min_numel}")
        _check(found, 0 < self.choco_gamma <= 1, f"compression.choco_gamma must be in (0, 1], got {self.choco_gamma}")
        _check(
            found,
            0 <= self.momentum_correction < 1,
            f"compression.momentum_correction must be in [0, 1), got {self.momentum_correction}",
        )
        _check(found, self.warmup_steps >= 0, f"compression.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(
            found,
            self.kind == "topk" or (self.momentum_correction == 0 and self.warmup_steps == 0),
            f"compression.momentum_correction and compression.warmup_steps apply to kind = 'topk', not {self.kind!r}",
        )
        _check(
            found,
            self.momentum_correction == 0 or self.error_feedback,
            "compression.momentum_correction needs compression.error_feedback = true (DGC accumulates the velocity "
            "in the error-feedback residual)",
        )
        return found
