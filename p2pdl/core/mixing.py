"""Gossip and averaging math: pure torch, no I/O, testable without a socket.

Everything here runs on whatever device the tensors live on (the GPU when the model is there),
in place where it can, so a mixing round costs one pass over the parameters and no host
round-trips beyond the wire buffers that the caller already moved to the device.

Parameters stored in a 16-bit float type (bfloat16, float16) are mixed in float32
(:func:`accumulation_dtype`) and rounded once into the parameter: a weighted sum of n terms
accumulated in bfloat16 would round after every term, and bfloat16 keeps 8 significant bits, so
the error would grow with the degree. The price is one float32 temporary per tensor during the
round. The order of the terms is fixed, so the result is still bit-identical wherever the same
terms are mixed (what the exact all-reduce relies on). float32 and float64 are mixed in their
own dtype, exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums over tensors of ``dtype`` are accumulated in: float32 for 16-bit floats."""
    return torch.float32 if dtype in _SIXTEEN_BIT else dtype


@torch.no_grad()
def mix_into(
    local: Sequence[torch.Tensor],
    self_weight: float,
    contributions: Sequence[tuple[float, Sequence[torch.Tensor]]],
) -> None:
    """x_i <- w_ii x_i + sum_j w_ij x_j, in place on ``local``'s device.

    ``contributions`` holds (w_ij, tensors of neighbour j) with tensors in the same order and
    shapes as ``local``; they may be on the CPU (wire buffers) or of another dtype and are
    moved once each. A 16-bit ``local`` tensor is mixed in float32 and rounded once.
    """
    for position, tensor in enumerate(local):
        accumulator = _accumulator(tensor)
        accumulator.mul_(self_weight)
        for weight, tensors in contributions:
            accumulator.add_(_matching(tensors[position], accumulator), alpha=weight)
        if accumulator is not tensor:
            tensor.copy_(accumulator)


def _accumulator(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or a float32 copy of it when it is 16-bit (the caller copies it back)."""
    wide = accumulation_dtype(tensor.dtype)
    return tensor if wide == tensor.dtype else tensor.to(wide)


def _matching(incoming: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``incoming`` on ``like``'s device and dtype (wire buffers arrive on the CPU)."""
    if incoming.device != like.device or incoming.dtype != like.dtype:
        return incoming.to(device=like.device, dtype=like.dtype)
    return incoming


def chunk_bounds(total: int, parts: int) -> list[int]:
    """Split ``total`` elements into ``parts`` contiguous chunks differing in size by at most one.

    Returns ``parts + 1`` offsets; chunk k is ``[bounds[k], bounds[k + 1])``.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(total, parts)
    bounds = [0]
    for k in range(parts):
        bounds.append(bounds[-1] + base + (1 if k < extra else 0))
    return bounds


@torch.no_grad()
def flatten_into(tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy ``tensors`` into the 1-D buffer ``out`` (shape (sum numel,)) and return it."""
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        out[offset : offset + count].copy_(tensor.reshape(-1))
        offset += count
    assert offset == out.numel(), "flat buffer size does not match the tensors"
    return out


@torch.no_grad()
def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy the 1-D buffer ``flat`` back into ``tensors`` (the inverse of :func:`flatten_into`)."""
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].view_as(tensor))
        offset += count
    assert offset == flat.numel(), "flat buffer size does not match the tensors"


@torch.no_grad()
def unflatten_chunks_into(chunks: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> None:
    """:func:`unflatten_into` of ``torch.cat(chunks)``, without building the concatenation.

    ``chunks`` are consecutive 1-D pieces of the flat buffer (e.g. all-gathered chunks in rank
    order). Each element is copied once, straight into its tensor, on the tensor's device.
    """
    pieces = [c for c in chunks if c.numel() > 0]
    index, position = 0, 0  # the next unread element is pieces[index][position]
    for tensor in tensors:
        needed = tensor.numel()
        parts: list[torch.Tensor] = []
        while needed > 0:
            assert index < len(pieces), "chunks hold fewer elements than the tensors"
            chunk = pieces[index]
            count = min(needed, chunk.numel() - position)
            parts.append(chunk[position : position + count])
            needed -= count
            position += count
            if position == chunk.numel():
                index, position = index + 1, 0
        if len(parts) == 1:
            tensor.copy_(parts[0].view_as(tensor))
        elif tensor.is_contiguous():  # spans a chunk boundary: fill it piece by piece
            flat = tensor.view(-1)  # (numel,)
            offset = 0
            for part in parts:
                flat[offset : offset + part.numel()].copy_(part)
                offset += part.numel()
        elif parts:
            tensor.copy_(torch.cat(parts).view_as(tensor))
    assert index == len(pieces), "chunks hold more elements than the tensors"


@torch.no_grad()
def exact_mean(chunks_in_rank_order: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out <- mean of equally shaped chunks, summed in the given (rank) order.

    A fixed order makes the result bit-identical wherever it is computed, which is what lets
    every peer of an all-reduce end with exactly the same parameters. A 16-bit ``out`` is
    summed and divided in float32 and rounded once; the chunks may be of any float dtype, and
    ``out`` may alias the first chunk (an average taken in place).
    """
    wide = accumulation_dtype(out.dtype)
    accumulator = out if wide == out.dtype else torch.empty_like(out, dtype=wide)
    first, rest = chunks_in_rank_order[0], list(chunks_in_rank_order[1:])
    if rest and first.dtype == wide:  # c0 + c1 in one pass: the same sum as copy, then add
        torch.add(first, _matching(rest.pop(0), accumulator), out=accumulator)
    else:
        accumulator.copy_(first)
    for chunk in rest:
        accumulator.add_(_matching(chunk, accumulator))
    accumulator.div_(len(chunks_in_rank_order))
    if accumulator is not out:
        out.copy_(accumulator)
    return out


@torch.no_grad()
def consensus_distance(vectors: Sequence[torch.Tensor]) -> float:
    """max_i ||x_i - mean|| / ||mean|| over flat parameter vectors of equal shape."""
    if not vectors:
        raise ValueError("consensus_distance needs at least one vector")
    stacked = torch.stack([v.detach().reshape(-1).to(torch.float64) for v in vectors])
    mean = stacked.mean(dim=0)
    norm = float(mean.norm())
    deviations = (stacked - mean).norm(dim=1)
    worst = float(deviations.max())
    return worst / norm if norm > 0 else worst
