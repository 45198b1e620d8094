"""State transfer for a peer that joins mid-training: parameters, optimizer state and step.

A strategy adds what it needs to the stream (:class:`~p2pdl.strategies.base.ServedState`): DiLoCo's
outer anchor and momentum as extra tensors, an exact strategy's agreed group in the meta frame,
and, between two syncs of local SGD, the parameters of the last sync instead of the live ones.

The donor takes a consistent snapshot at a step boundary (a CPU copy made on its compute thread,
so it keeps training while the copy streams out) and serves it as a sequence of ordinary wire
frames: one ``state_meta`` frame announcing the step and the tensor list, then ``state`` frames
of at most ``chunk_bytes`` of tensors each. On HTTP the stream is ``[u32 little-endian length]
[frame]`` repeated. The joiner validates every tensor against its *own* model and optimizer
(names, shapes, dtypes, finite values, a consistent optimizer state) before loading anything, so
a hostile donor can at worst refuse service; it cannot corrupt the joiner's model or optimizer.

Trade-off: the snapshot doubles the donor's host memory for the duration of one transfer, in
exchange for never pausing its training.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pdl.errors import FrameSchemaError, NonFiniteError, ShapeMismatchError
from p2pdl.strategies.base import ServedState
from p2pdl.wire import Frame, TensorSpec

STATE_META = "state_meta"
STATE = "state"
LENGTH = struct.Struct("<I")
MODEL_PREFIX = "model/"
OPTIMIZER_PREFIX = "opt/"
# Optimizer state entries p2pdl knows how to validate: param-shaped buffers and scalar counters.
_PARAM_SHAPED = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg"})
_SCALAR = frozenset({"step"})
# Second-moment buffers go under a square root: a negative entry would turn the next step into NaN.
_NON_NEGATIVE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg"})


@dataclass(frozen=True)
class StateSnapshot:
    """CPU copies of everything a joiner needs, taken at one step boundary."""

    step: int
    tensors: dict[str, torch.Tensor]  # "model/<name>", "opt/<param index>/<key>" and the strategy's extras
    meta: dict[str, Any] = field(default_factory=dict)  # the strategy's meta (scalars only)


@torch.no_grad()
def snapshot_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, served: ServedState | None = None
) -> StateSnapshot:
    """Copy parameters and optimizer state to host memory (run on the compute thread).

    ``served`` is the strategy's part: its extra tensors and meta, and, when set, the parameters
    (of the trainable parameters, in order) and step to serve instead of the live ones.
    """
    tensors: dict[str, torch.Tensor] = {
        MODEL_PREFIX + name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()
    }
    if served is not None and served.parameters is not None:
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        for name, tensor in zip(trainable, served.parameters, strict=True):
            tensors[MODEL_PREFIX + name] = tensor.detach().to("cpu", copy=True)
    if served is not None and served.step is not None:
        step = served.step
    state = optimizer.state_dict()["state"]
    for index, entries in state.items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIMIZER_PREFIX}{index}/{key}"] = value.detach().to("cpu", copy=True)
            elif isinstance(value, int | float):
                tensors[f"{OPTIMIZER_PREFIX}{index}/{key}"] = torch.tensor(float(value))
    if served is None:
        return StateSnapshot(step=step, tensors=tensors)
    for name, tensor in served.extra.items():
        tensors[name] = tensor.detach().to("cpu", copy=True)
    return StateSnapshot(step=step, tensors=tensors, meta=dict(served.meta))


def state_frames(snapshot: StateSnapshot, sender: str, *, chunk_bytes: int) -> Iterator[Frame]:
    """The snapshot as a meta frame and chunks of whole tensors."""
    names = list(snapshot.tensors)
    yield Frame(
        kind=STATE_META,
        sender=sender,
        round=0,
        step=snapshot.step,
        meta={
            **snapshot.meta,
            "tensors": len(names),
            "bytes": sum(t.numel() * t.element_size() for t in snapshot.tensors.values()),
        },
    )
    batch: dict[str, torch.Tensor] = {}
    size = 0
    for name in names:
        tensor = snapshot.tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        if batch and size + nbytes > chunk_bytes:
            yield Frame(kind=STATE, sender=sender, round=0, step=snapshot.step, tensors=batch)
            batch, size = {}, 0
        batch[name] = tensor
        size += nbytes
    if batch:
        yield Frame(kind=STATE, sender=sender, round=0, step=snapshot.step, tensors=batch)


def expected_state_specs(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, TensorSpec]:
    """Every tensor a valid state stream may carry for this model and optimizer."""
    params = dict(model.named_parameters())
    specs = {MODEL_PREFIX + name: TensorSpec.of_tensor(p) for name, p in params.items()}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(ordered):
        for key in _PARAM_SHAPED:
            # torch keeps moments and momentum buffers in the parameter's dtype (bf16 for a bf16 model)
            specs[f"{OPTIMIZER_PREFIX}{index}/{key}"] = TensorSpec.of_tensor(param.detach())
        for key in _SCALAR:
            specs[f"{OPTIMIZER_PREFIX}{index}/{key}"] = TensorSpec(dtype="float32", shape=())
    return specs


class StateAssembler:
    """Collects validated state frames from a donor, then loads them in one go."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra_specs: dict[str, TensorSpec] | None = None,
    ) -> None:
        self._model = model
        self._optimizer = optimizer
        self._extra_specs = dict(extra_specs or {})
        self._specs = {**expected_state_specs(model, optimizer), **self._extra_specs}
        self._received: dict[str, torch.Tensor] = {}
        self.step: int | None = None
        self.meta: dict[str, Any] = {}  # the donor's meta frame, for the strategy to validate
        self._announced: int | None = None

    def feed(self, frame: Frame) -> None:
        """Check one frame of the stream and keep its tensors; raises a FrameError, loads nothing."""
        if frame.kind == STATE_META:
            count = frame.meta.get("tensors")
            if self.step is not None or not isinstance(count, int) or not 0 < count <= len(self._specs):
                raise FrameSchemaError("state stream: bad or repeated state_meta frame")
            self.step, self._announced = frame.step, count
            self.meta = dict(frame.meta)
            return
        if frame.kind != STATE or self.step is None or frame.step != self.step:
            raise FrameSchemaError(f"state stream: unexpected {frame.kind!r} frame")
        for name, tensor in frame.tensors.items():
            spec = self._specs.get(name)
            if spec is None:
                raise ShapeMismatchError(f"state stream: unknown tensor {name!r}")
            if TensorSpec.of_tensor(tensor) != spec:
                raise ShapeMismatchError(f"state stream: {name!r} is {TensorSpec.of_tensor(tensor)}, expected {spec}")
            if name in self._received:
                raise FrameSchemaError(f"state stream: {name!r} sent twice")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(f"state stream: {name!r} contains NaN or Inf")
            key = name.rsplit("/", 1)[-1] if name.startswith(OPTIMIZER_PREFIX) else ""
            if key in _NON_NEGATIVE and bool((tensor < 0).any()):
                raise FrameSchemaError(f"state stream: {name!r} has negative entries")
            if key in _SCALAR and not (float(tensor) >= 0 and float(tensor).is_integer()):
                raise FrameSchemaError(f"state stream: {name!r} must be a whole number >= 0, got {float(tensor)}")
        assert self._announced is not None
        if len(self._received) + len(frame.tensors) > self._announced:
            raise FrameSchemaError(f"state stream: more than the {self._announced} tensors announced")
        # Kept only once the whole frame passed: a refused frame leaves nothing behind.
        self._received.update(frame.tensors)

    @property
    def extra(self) -> dict[str, torch.Tensor]:
        """The strategy's extra tensors received (shapes and values already checked)."""
        return {name: t for name, t in self._received.items() if name in self._extra_specs}

    @property
    def complete(self) -> bool:
        return self._announced is not None and len(self._received) == self._announced

    def _optimizer_state(self) -> dict[int, dict[str, Any]]:
        """The received optimizer state per parameter index, checked for consistency."""
        state: dict[int, dict[str, Any]] = {}
        for name, tensor in self._received.items():
            if name.startswith(OPTIMIZER_PREFIX) and name not in self._extra_specs:
                index_text, key = name[len(OPTIMIZER_PREFIX) :].split("/", 1)
                state.setdefault(int(index_text), {})[key] = tensor.clone()
        # Every parameter with state carries the same entries (Adam needs step, exp_avg and
        # exp_avg_sq together), and the same ones as this optimizer already holds, if any.
        key_sets = {frozenset(entries) for entries in state.values()}
        own_sets = {frozenset(entries) for entries in self._optimizer.state_dict()["state"].values()}
        if len(key_sets) > 1 or (key_sets and own_sets and key_sets != own_sets):
            found = sorted(sorted(keys) for keys in key_sets)
            raise FrameSchemaError(f"state stream: inconsistent optimizer state entries {found}")
        return state

    @torch.no_grad()
    def apply(self) -> int:
        """Load the received state into the model and optimizer; returns the donor's step.

        Every check runs before the first write, so a refused stream leaves both untouched.
        """
        if not self.complete or self.step is None:
            raise FrameSchemaError(f"state stream ended early: {len(self._received)} of {self._announced} tensors")
        missing = [n for n in (MODEL_PREFIX + k for k, _ in self._model.named_parameters()) if n not in self._received]
        if missing:
            raise FrameSchemaError(f"state stream lacks parameters: {', '.join(missing[:5])}")
        state = self._optimizer_state()
        current = self._optimizer.state_dict()
        for name, param in self._model.named_parameters():
            param.copy_(self._received[MODEL_PREFIX + name])
        self._optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
        return self.step
