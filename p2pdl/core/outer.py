"""DiLoCo's outer optimizer and local-SGD sync bookkeeping: pure torch, no I/O.

Local SGD lets each peer take ``H`` inner optimizer steps between syncs, then averages
parameters. DiLoCo (Douillard et al. 2023) treats what a sync does as an optimizer step of its
own: with ``θ`` the parameters at the last sync (the *anchor*) and ``x̄`` the average the sync
produced, the *pseudo-gradient* ``Δ = θ - x̄`` is fed to an outer optimizer, by default SGD
with Nesterov momentum 0.9 and learning rate 0.7, and the result becomes both the new model
parameters and the new anchor. With lr 1 and no momentum this is plain parameter averaging;
the paper found outer Nesterov momentum markedly better than plain averaging at large ``H``.

The outer SGD is torch.optim.SGD's update written out (``buf <- momentum * buf + Δ``; Nesterov:
``anchor <- anchor - lr * (Δ + momentum * buf)``, else ``anchor <- anchor - lr * buf``) rather
than a ``torch.optim.SGD`` instance: it is three in-place ops per tensor, its state is two plain
tensor lists that checkpoint as such, and constructing any ``torch.optim`` optimizer imports
``torch._dynamo`` (seconds), which a pure-math module should not force on its callers.

Trade-offs. The anchor and the momentum buffer are two extra copies of the parameters, kept
on the parameters' device so that an outer step is a few fused passes and no host copies.
Parameters stored in a 16-bit float type get float32 anchors: the pseudo-gradient is the
difference of two nearby numbers, which 16-bit floats would mostly round away. The outer step
runs once every ``H`` inner steps, so its cost is negligible next to the inner steps; it does
one host sync per call to refuse a non-finite average before it can poison the momentum.

Every peer must call :meth:`OuterOptimizer.step` with the same ``x̄`` and start from the same
anchor and momentum for the peers to stay identical; that is the exact-averaging (all-reduce)
setting. With gossip averaging ``x̄`` differs per peer and each peer's outer momentum drifts
accordingly (as in SlowMo over SGP); that is allowed but no longer equals DiLoCo exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["OuterOptimizer", "sync_due"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def sync_due(steps_completed: int, local_steps: int) -> bool:
    """Whether a sync follows inner step number ``steps_completed`` (counted from 1).

    Local SGD with ``local_steps = H`` syncs after steps H, 2H, 3H, ...; ``H = 1`` syncs after
    every step (plain synchronous data parallelism when the average is exact).
    """
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}")
    if steps_completed < 0:
        raise ValueError(f"steps_completed must be >= 0, got {steps_completed}")
    return steps_completed > 0 and steps_completed % local_steps == 0


def _anchor_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class OuterOptimizer:
    """The anchor (parameters at the last sync) and outer SGD (Nesterov) momentum over it.

    ``parameters`` are the live model parameters; the anchor starts as a copy of them, so build
    this after the model is initialised (and, for every peer to agree, after the initial
    broadcast). ``nesterov`` is ignored when ``momentum == 0``, where it makes no difference.
    """

    def __init__(
        self,
        parameters: Sequence[torch.Tensor],
        *,
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
    ) -> None:
        problems = []
        if not math.isfinite(lr) or lr <= 0.0:
            problems.append(f"lr must be finite and > 0, got {lr!r}")
        if not math.isfinite(momentum) or not 0.0 <= momentum < 1.0:
            problems.append(f"momentum must be in [0, 1), got {momentum!r}")
        if not parameters:
            problems.append("needs at least one parameter")
        if problems:
            raise ValueError("; ".join(problems))
        self._parameters: list[torch.Tensor] = list(parameters)
        with torch.no_grad():
            self._anchor: list[torch.Tensor] = [
                p.detach().to(dtype=_anchor_dtype(p.dtype), copy=True) for p in self._parameters
            ]
        self.lr = float(lr)
        self.momentum = float(momentum)
        # With momentum 0 both forms are plain SGD (torch.optim even refuses nesterov=True there).
        self.nesterov = bool(nesterov) and momentum > 0.0
        # buf: one per parameter, anchor dtype. Zero before the first step, which is exactly
        # torch's "buf = g on the first step" because dampening is 0.
        self._momentum_buffer: list[torch.Tensor] = [torch.zeros_like(a) for a in self._anchor]
        self.steps = 0

    @property
    def anchor(self) -> tuple[torch.Tensor, ...]:
        """The parameters as of the last sync (read them, do not modify them)."""
        return tuple(self._anchor)

    @torch.no_grad()
    def step(self, averaged: Sequence[torch.Tensor] | None = None) -> None:
        """One outer step after a sync produced ``averaged`` (``x̄``); writes the result into the model.

        ``averaged`` defaults to the model parameters themselves (the sync already averaged in
        place). Computes ``Δ = anchor - x̄``, takes the outer SGD step ``anchor <- anchor - lr *
        update(Δ)`` (torch's Nesterov form: ``buf <- momentum * buf + Δ``, ``update = Δ +
        momentum * buf``), then copies the new anchor into the model parameters.
        Raises ``ValueError`` (and changes nothing) if ``x̄`` has a NaN or inf.
        """
        targets = self._parameters if averaged is None else list(averaged)
        if len(targets) != len(self._anchor):
            raise ValueError(f"averaged has {len(targets)} tensors, expected {len(self._anchor)}")
        pseudo_gradients = []
        for position, (anchor, average) in enumerate(zip(self._anchor, targets, strict=True)):
            if average.shape != anchor.shape:
                raise ValueError(
                    f"averaged[{position}] has shape {tuple(average.shape)}, expected {tuple(anchor.shape)}"
                )
            # Δ: (same shape as the parameter), anchor dtype. Built before anything is written,
            # so averaged may alias the model parameters.
            pseudo_gradients.append(anchor - average.to(device=anchor.device, dtype=anchor.dtype))
        finite = torch.stack([torch.isfinite(delta).all() for delta in pseudo_gradients]).all()
        if not bool(finite):
            raise ValueError("the averaged parameters are not finite; outer step refused")
        for anchor, buffer, delta, parameter in zip(
            self._anchor, self._momentum_buffer, pseudo_gradients, self._parameters, strict=True
        ):
            # torch.optim.SGD's update (dampening 0, no weight decay), written out.
            buffer.mul_(self.momentum).add_(delta)
            update = delta.add_(buffer, alpha=self.momentum) if self.nesterov else buffer
            anchor.add_(update, alpha=-self.lr)
            parameter.copy_(anchor)
        self.steps += 1

    @torch.no_grad()
    def reset_anchor(self) -> None:
        """Make the current model parameters the anchor, keeping the momentum.

        For when the model was overwritten outside a sync, e.g. by a state transfer to a peer
        that joins late (it should also take the momentum over with :meth:`load_state_dict`).
        """
        for anchor, parameter in zip(self._anchor, self._parameters, strict=True):
            anchor.copy_(parameter)

    def state_dict(self) -> dict[str, object]:
        """Checkpointable state: lists of plain tensors (CPU copies), floats and an int.

        Safe for ``torch.load(weights_only=True)``. The momentum buffer is all zeros before the
        first step (and stays so with momentum 0).
        """
        return {
            "anchor": [a.detach().to("cpu", copy=True) for a in self._anchor],
            "momentum_buffer": [b.detach().to("cpu", copy=True) for b in self._momentum_buffer],
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": float(self.nesterov),
            "steps": self.steps,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict` output (anchor, momentum, hyperparameters); the model is untouched."""
        anchors = state["anchor"]
        buffers = state["momentum_buffer"]
        if not isinstance(anchors, Sequence) or not isinstance(buffers, Sequence):
            raise ValueError("state['anchor'] and state['momentum_buffer'] must be lists of tensors")
        if len(anchors) != len(self._anchor) or len(buffers) != len(self._anchor):
            raise ValueError(
                f"state holds {len(anchors)} anchors and {len(buffers)} buffers, expected {len(self._anchor)}"
            )
        for position, (anchor, saved_anchor, saved_buffer) in enumerate(
            zip(self._anchor, anchors, buffers, strict=True)
        ):
            for key, saved in (("anchor", saved_anchor), ("momentum_buffer", saved_buffer)):
                if not isinstance(saved, torch.Tensor) or saved.shape != anchor.shape:
                    raise ValueError(f"state[{key!r}][{position}] is not a tensor of shape {tuple(anchor.shape)}")
        lr, momentum, nesterov, steps = state["lr"], state["momentum"], state["nesterov"], state["steps"]
        if not isinstance(lr, float | int) or not isinstance(momentum, float | int):
            raise ValueError("state['lr'] and state['momentum'] must be numbers")
        if not isinstance(nesterov, float | int | bool) or not isinstance(steps, int):
            raise ValueError("state['nesterov'] must be a number and state['steps'] an int")
        self.lr, self.momentum = float(lr), float(momentum)
        self.nesterov = bool(nesterov) and self.momentum > 0.0
        for anchor, buffer, saved_anchor, saved_buffer in zip(
            self._anchor, self._momentum_buffer, anchors, buffers, strict=True
        ):
            assert isinstance(saved_anchor, torch.Tensor) and isinstance(saved_buffer, torch.Tensor)
            anchor.copy_(saved_anchor)
            buffer.copy_(saved_buffer)
        self.steps = steps
