"""A peer's stream of named tensors through the compressors: which tensor gets which compressor.

:class:`CompressionPolicy` picks a compressor per tensor by size (small tensors go uncompressed:
the bytes saved are few and the relative error of top-k or low rank would be large), and
:class:`TensorCodec` applies it to a whole model, naming each wire part ``"<tensor>.<part>"`` so
one frame carries every tensor and a receiver knows the exact spec of every part in advance.
Encoding may keep state (error-feedback residuals, PowerSGD warm starts); decoding keeps none,
so one codec decodes what any peer with the same policy and shapes sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import torch

from p2pdl.compression.compressors import Compressor, ErrorFeedback, NoneCompressor
from p2pdl.errors import ConfigError
from p2pdl.wire import TensorSpec

__all__ = ["CompressionPolicy", "TensorCodec"]

_UNCOMPRESSED: Final[NoneCompressor] = NoneCompressor()


@dataclass(frozen=True, kw_only=True)
class CompressionPolicy:
    """Which compressor a tensor gets: ``compressor`` for tensors of at least ``min_numel``
    elements, fp32 ``none`` for smaller ones (biases, norms), where savings are a few bytes and
    the relative error of top-k or low rank would be large."""

    compressor: Compressor
    min_numel: int = 4096  # elements

    def __post_init__(self) -> None:
        if type(self.min_numel) is not int or self.min_numel < 0:
            raise ConfigError([f"compression min_numel must be an int >= 0, got {self.min_numel!r}"])

    def for_tensor(self, numel: int) -> Compressor:
        return self.compressor if numel >= self.min_numel else _UNCOMPRESSED


class TensorCodec:
    """Compression of one peer's stream of named tensors (its gradients, or its parameter deltas).

    Each tensor gets the compressor its size calls for (``policy``), and its wire parts are named
    ``"<tensor>.<part>"`` so a frame carries a whole model. With ``error_feedback`` each tensor
    keeps a residual (:class:`ErrorFeedback`). Decoding is stateless, so the same codec decodes
    what any peer sent with the same policy and shapes.
    """

    def __init__(
        self, policy: CompressionPolicy, shapes: Mapping[str, tuple[int, ...]], *, error_feedback: bool
    ) -> None:
        self._shapes = dict(shapes)
        self._compressors = {name: policy.for_tensor(math.prod(shape)) for name, shape in self._shapes.items()}
        distinct = {id(c): c for c in self._compressors.values()}
        self._feedback = {key: ErrorFeedback(c) for key, c in distinct.items()} if error_feedback else {}

    def wire_specs(self) -> dict[str, TensorSpec]:
        return {
            f"{name}.{suffix}": spec
            for name, shape in self._shapes.items()
            for suffix, spec in self._compressors[name].wire_specs(shape).items()
        }

    @property
    def raw_bytes(self) -> int:
        """What one encoded stream would take as float32 (for the compression ratio)."""
        return sum(4 * math.prod(shape) for shape in self._shapes.values())

    @torch.no_grad()
    def encode(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            compressor = self._compressors[name]
            feedback = self._feedback.get(id(compressor))
            source = tensor.detach().to(torch.float32)
            parts = feedback.compress(name, source) if feedback else compressor.encode(name, source)
            out.update({f"{name}.{suffix}": part for suffix, part in parts.items()})
        return out

    @torch.no_grad()
    def decode(self, parts: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, shape in self._shapes.items():
            compressor = self._compressors[name]
            mine = {suffix: parts[f"{name}.{suffix}"] for suffix in compressor.wire_specs(shape)}
            out[name] = compressor.decode(name, mine, shape, device)
        return out

    def reset(self) -> None:
        for feedback in self._feedback.values():
            feedback.reset()
