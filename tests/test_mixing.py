"""Hermetic tests of the flat-buffer helpers used by the exact all-reduce."""

from __future__ import annotations

import pytest
import torch

from p2pdl.core.mixing import chunk_bounds, flatten_into, unflatten_chunks_into, unflatten_into

SHAPES = [(3, 4), (5,), (0,), (2, 2, 2), (1,)]


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7, 40])
def test_unflatten_chunks_matches_unflatten_of_the_concatenation(parts: int) -> None:
    generator = torch.Generator().manual_seed(parts)
    tensors = [torch.empty(shape) for shape in SHAPES] + [torch.empty(3, 2).t()]  # last: non-contiguous
    total = sum(t.numel() for t in tensors)
    flat = torch.randn(total, generator=generator)
    bounds = chunk_bounds(total, parts)
    chunks = [flat[bounds[k] : bounds[k + 1]] for k in range(parts)]
    reference = [torch.empty_like(t) for t in tensors]
    unflatten_into(flat, reference)
    unflatten_chunks_into(chunks, tensors)
    for got, want in zip(tensors, reference, strict=True):
        assert torch.equal(got, want)
    # And the round trip back through flatten_into is the identity.
    assert torch.equal(flatten_into(tensors, torch.empty(total)), flat)


def test_unflatten_chunks_refuses_a_size_mismatch() -> None:
    with pytest.raises(AssertionError):
        unflatten_chunks_into([torch.zeros(3)], [torch.empty(4)])
    with pytest.raises(AssertionError):
        unflatten_chunks_into([torch.zeros(5)], [torch.empty(4)])
