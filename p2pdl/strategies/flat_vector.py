"""The flat vector of an exact round without overlap: one host buffer whose views are the gradients.

An exact round (:mod:`p2pdl.strategies.allreduce_round`) reduces one flat vector of every
parameter, (total,) in the wire dtype, followed by zeros so that every chunk of any group size is
``ceil(total / n)`` long. Its result is assembled in a second buffer of the same size, the
averaged buffer, so the flat vector keeps this peer's own contribution, from which a failed
attempt is redone.

On the H = 1 path (uncompressed, parameters of the wire dtype on the buffer's device) every
``.grad`` is bound to its view of the flat vector before backward, as DDP's
``gradient_as_bucket_view`` does: backward accumulates straight into it, so a round has no
flatten copy; applying the result rebinds the gradients to their views of the averaged buffer and
swaps the two buffers' roles (:meth:`FlatVector.swap`), so it has no unflatten copy either. A
gradient rebound by other code is copied in once and bound again. Parameters (H > 1) and other
dtypes or devices are copied in and written back.

Trade-off: two buffers of the model's size live for the whole run (as the overlapped buckets'
``local`` and ``averaged``, :mod:`p2pdl.strategies.buckets`), in exchange for no copy in or out
of a gradient round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from p2pdl.core.mixing import flatten_into, unflatten_chunks_into
from p2pdl.strategies.buckets import flat_views, is_view

__all__ = ["FlatVector"]


class FlatVector:
    """The flat vector and the averaged buffer of one model's parameters, and the gradients' views of both."""

    def __init__(
        self, parameters: Sequence[torch.nn.Parameter], dtype: torch.dtype, *, padding: int, views: bool
    ) -> None:
        """``padding``: zeros after each buffer (the most members a group may have); ``views``: bind
        the gradients to the flat vector where the parameters allow it (the H = 1 gradient path)."""
        self._parameters = tuple(parameters)
        self.total = sum(p.numel() for p in self._parameters)
        # Host-side wire buffers, reused every step: the flat vector (total,) and the averaged
        # result, each followed by zeros so that every chunk of any group size is ceil(total / n) long.
        self.local = torch.zeros(self.total + padding, dtype=dtype)
        self.averaged = torch.zeros(self.total + padding, dtype=dtype)
        self.local_views: list[torch.Tensor] | None = None
        self.averaged_views: list[torch.Tensor] = []  # the same views of the averaged buffer
        self.grads_are_views = False  # this round's gradients are the views (set by into_flat)
        params = self._parameters
        if views and params and all(p.dtype == dtype and p.device == self.local.device for p in params):
            self.local_views = flat_views(self.local, params)
            self.averaged_views = flat_views(self.averaged, params)

    def bind_views(self) -> None:
        """On the compute thread, before backward: zero the flat vector and bind every gradient to
        its view of it, so backward accumulates into it (nothing without views)."""
        if self.local_views is None:
            return
        with torch.no_grad():
            self.local[: self.total].zero_()
        for p, view in zip(self._parameters, self.local_views, strict=True):
            p.grad = view

    def views_bound(self) -> bool:
        """Whether every gradient is still its view of the flat vector (backward accumulated into
        it): then the round needs no copy, and this check needs no hop to the compute thread."""
        views = self.local_views
        self.grads_are_views = views is not None and all(
            is_view(p.grad, view) for p, view in zip(self._parameters, views, strict=True)
        )
        return self.grads_are_views

    @torch.no_grad()
    def into_flat(self, tensors: Sequence[torch.Tensor], *, gradients: bool) -> None:
        """Copy the round's input into the flat vector (compute thread); gradients that were not
        the views (:meth:`views_bound`) are bound to them from here on."""
        flatten_into(tensors, self.local[: self.total])
        views = self.local_views if gradients else None
        if views is not None:
            for p, view in zip(self._parameters, views, strict=True):
                p.grad = view
        self.grads_are_views = views is not None

    def swap(self) -> None:
        """Apply a gradient round whose result is in the averaged buffer: bind every gradient to its
        view of it, and swap the two buffers' roles (as the overlapped buckets rebind theirs). The
        old flat vector, this peer's own contribution, is the next round's averaged buffer."""
        assert self.local_views is not None
        for p, view in zip(self._parameters, self.averaged_views, strict=True):
            p.grad = view
        # The own chunk of the last piece reaches past the vector: its mean of the members' padding
        # is 0 from honest peers, but the padding this peer sends must be 0 whatever they sent.
        self.averaged[self.total :].zero_()
        self.local, self.averaged = self.averaged, self.local
        self.local_views, self.averaged_views = self.averaged_views, self.local_views

    @torch.no_grad()
    def write_back(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy the averaged buffer straight into the tensors (compute thread): one copy, no
        intermediate."""
        unflatten_chunks_into([self.averaged[: self.total]], tensors)
