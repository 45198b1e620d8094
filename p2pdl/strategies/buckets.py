"""Gradient buckets for the overlapped all-reduce: flat buffers whose views are the gradients.

The parameters are cut into buckets in reverse registration order (the order backward produces
their gradients, as DDP's Reducer does): the first bucket holds at most 1 MiB, each later one
about ``bucket_mb``. Every bucket owns two flat buffers that live for the whole run:

* ``local``: backward accumulates straight into it, because each parameter's ``.grad`` is bound
  to a view of it before backward. It is what the peer sends, and it stays untouched until the
  next step, so a failed round is redone from it.
* ``averaged``: the round writes the exact mean here (own chunk and all-gathered chunks); when
  the whole round is applied, each ``.grad`` is rebound to its view of this buffer.

So a step has no flatten copy and no unflatten copy: the cost is one extra buffer of the model's
size. A post-accumulate-grad hook per parameter counts the parameters still missing in its bucket
and calls ``on_ready(bucket)`` on the compute thread when the last one arrives.

Each buffer is followed by :data:`PADDING` zeros so that every chunk of any group size (up to
that many members) is ``ceil(numel / n)`` long, as the flat vector of the plain path is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from p2pdl.config.strategy import OVERLAP_MAX_BUCKETS
from p2pdl.errors import ConfigError

__all__ = [
    "FIRST_BUCKET_BYTES",
    "MAX_BUCKETS",
    "PADDING",
    "Bucket",
    "GradientBuckets",
    "bucket_layout",
    "flat_views",
    "is_view",
    "piece_layout",
]

FIRST_BUCKET_BYTES = 1024 * 1024  # DDP's first bucket: the last layers' gradients leave early
MAX_BUCKETS = OVERLAP_MAX_BUCKETS  # each bucket's frames occupy mailbox slots (transport.inbox_frames)
PADDING = 4096  # zeros after each buffer: the most members a group may have


@dataclass(slots=True)
class Bucket:
    """Parameters ``indices`` (into the parameter list) and their two flat buffers, (numel + PADDING,)."""

    indices: tuple[int, ...]
    numel: int
    local: torch.Tensor
    averaged: torch.Tensor
    local_views: list[torch.Tensor] = field(default_factory=list)
    averaged_views: list[torch.Tensor] = field(default_factory=list)


def bucket_layout(sizes: Sequence[int], element_size: int, bucket_bytes: int) -> list[list[int]]:
    """Parameter indices per bucket, from the last parameter to the first (DDP's assignment).

    A bucket is closed once it holds at least its limit: 1 MiB for the first (capped by
    ``bucket_bytes``), ``bucket_bytes`` for the others; a parameter larger than the limit fills a
    bucket alone.
    """
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index in reversed(range(len(sizes))):
        current.append(index)
        filled += sizes[index] * element_size
        limit = min(FIRST_BUCKET_BYTES, bucket_bytes) if not buckets else bucket_bytes
        if filled >= limit:
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


class GradientBuckets:
    """The buckets of one model's trainable parameters (all of one dtype, on one device)."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], bucket_mb: float) -> None:
        self._parameters = list(parameters)
        dtype, device = self._parameters[0].dtype, self._parameters[0].device
        sizes = [p.numel() for p in self._parameters]
        layout = bucket_layout(sizes, self._parameters[0].element_size(), max(1, int(bucket_mb * 1024 * 1024)))
        if len(layout) > MAX_BUCKETS:
            raise ConfigError(
                [
                    f"strategy.bucket_mb = {bucket_mb} cuts the model into {len(layout)} buckets; at most "
                    f"{MAX_BUCKETS} fit the mailbox: raise strategy.bucket_mb"
                ]
            )
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[int, int] = {}
        self._view_of: dict[int, torch.Tensor] = {}
        for number, indices in enumerate(layout):
            numel = sum(sizes[i] for i in indices)
            bucket = Bucket(
                indices=tuple(indices),
                numel=numel,
                local=torch.zeros(numel + PADDING, dtype=dtype, device=device),
                averaged=torch.zeros(numel + PADDING, dtype=dtype, device=device),
            )
            offset = 0
            for i in indices:
                shape = self._parameters[i].shape
                bucket.local_views.append(bucket.local[offset : offset + sizes[i]].view(shape))
                bucket.averaged_views.append(bucket.averaged[offset : offset + sizes[i]].view(shape))
                self._bucket_of[i] = number
                self._view_of[i] = bucket.local_views[-1]
                offset += sizes[i]
            self.buckets.append(bucket)
        self._missing = [0] * len(self.buckets)
        self._armed = False
        self._on_ready: Callable[[int], None] = lambda _bucket: None
        self._handles = []
        for i, p in enumerate(self._parameters):
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))  # type: ignore[no-untyped-call]

    @property
    def total(self) -> int:
        return sum(b.numel for b in self.buckets)

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        view = self._view_of[index]

        @torch.no_grad()
        def ready(parameter: torch.Tensor) -> None:
            if not self._armed:
                return
            grad = parameter.grad
            if grad is None or grad.data_ptr() != view.data_ptr():
                # Something rebound .grad during backward (a closure that zeroed to None):
                # copy it into the bucket and rebind, so the bucket still holds the gradient.
                view.copy_(grad if grad is not None else torch.zeros_like(view))
                parameter.grad = view
            bucket = self._bucket_of[index]
            self._missing[bucket] -= 1
            if self._missing[bucket] == 0:
                self._on_ready(bucket)

        return ready

    @torch.no_grad()
    def arm(self, on_ready: Callable[[int], None]) -> None:
        """Before backward (compute thread): zero the local buffers, bind every ``.grad`` to its
        view, and call ``on_ready(bucket)`` when a bucket's last gradient has accumulated."""
        for number, bucket in enumerate(self.buckets):
            bucket.local.zero_()
            self._missing[number] = len(bucket.indices)
        self.bind_local()
        self._on_ready = on_ready
        self._armed = True

    def disarm(self) -> list[int]:
        """After backward: stop counting; the buckets that never completed (unused parameters)."""
        self._armed = False
        return [number for number, missing in enumerate(self._missing) if missing > 0]

    def bind_local(self) -> None:
        """Point every ``.grad`` at the local buffers (the gradients this peer computed)."""
        for bucket in self.buckets:
            for i, view in zip(bucket.indices, bucket.local_views, strict=True):
                self._parameters[i].grad = view

    def bind_averaged(self) -> None:
        """Point every ``.grad`` at the averaged buffers (a round was applied)."""
        for bucket in self.buckets:
            for i, view in zip(bucket.indices, bucket.averaged_views, strict=True):
                self._parameters[i].grad = view

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def piece_layout(total: int, pieces: int, members: int) -> list[tuple[int, int, int]]:
    """``(start, length, chunk)`` of each piece of a flat vector of ``total`` elements that ``members``
    reduce in (at most) ``pieces`` pieces (``strategy.pipeline``; PROTOCOL.md §6).

    One piece is the whole vector, chunk ``ceil(total / members)``. Otherwise every piece but the
    last spans ``members * ceil(ceil(total / pieces) / members)`` elements, a multiple of
    ``members``, so that its chunks tile it exactly and no chunk reaches into the next piece; the
    last holds the rest (fewer pieces than asked when that span covers the vector sooner), and its
    last chunk runs into the zero padding after the vector, as the single piece's does.
    """
    if pieces <= 1 or total == 0:
        return [(0, total, math.ceil(total / members))]
    span = members * math.ceil(math.ceil(total / pieces) / members)
    lengths = [(start, min(span, total - start)) for start in range(0, total, span)]
    return [(start, length, math.ceil(length / members)) for start, length in lengths]


def flat_views(flat: torch.Tensor, parameters: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive pieces of the 1-D ``flat``, one per parameter, of its shape."""
    views, offset = [], 0
    for p in parameters:
        views.append(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    return views


def is_view(tensor: torch.Tensor | None, view: torch.Tensor) -> bool:
    """Whether ``tensor`` is exactly ``view`` (same memory, shape and strides): still bound."""
    return (
        tensor is not None
        and tensor.data_ptr() == view.data_ptr()
        and tensor.shape == view.shape
        and tensor.stride() == view.stride()
    )
