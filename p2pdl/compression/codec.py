"""A peer's stream of named tensors through the compressors: which tensor gets which compressor.

:class:`CompressionPolicy` picks a compressor per tensor by size (small tensors go uncompressed:
the bytes saved are few and the relative error of top-k or low rank would be large), and
:class:`TensorCodec` applies it to a whole model, naming each wire part ``"<tensor>.<part>"`` so
one frame carries every tensor and a receiver knows the exact spec of every part in advance.
Encoding may keep state (error-feedback residuals, PowerSGD warm starts); decoding keeps none,
so one codec decodes what any peer with the same policy and shapes sent.

The codec knows each tensor's dtype: a bfloat16 or float16 tensor that goes uncompressed travels
in its own dtype (exact, half the bytes of float32), anything else as float32. Decoding always
gives float32, the dtype the caller averages in before it rounds once into the parameter.
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

# One pass-through per wire dtype, shared by every tensor that goes uncompressed in it.
_UNCOMPRESSED: Final[Mapping[torch.dtype, NoneCompressor]] = {
    torch.float16: NoneCompressor("float16"),
    torch.bfloat16: NoneCompressor("bfloat16"),
}
_UNCOMPRESSED_FLOAT32: Final[NoneCompressor] = NoneCompressor("float32")


def pass_through(dtype: torch.dtype) -> NoneCompressor:
    """The pass-through for a tensor of ``dtype``: its own dtype when 16-bit, else float32."""
    return _UNCOMPRESSED.get(dtype, _UNCOMPRESSED_FLOAT32)


@dataclass(frozen=True, kw_only=True)
class CompressionPolicy:
    """Which compressor a tensor gets: ``compressor`` for tensors of at least ``min_numel``
    elements, the pass-through for smaller ones (biases, norms), where savings are a few bytes
    and the relative error of top-k or low rank would be large."""

    compressor: Compressor
    min_numel: int = 4096  # elements

    def __post_init__(self) -> None:
        if type(self.min_numel) is not int or self.min_numel < 0:
            raise ConfigError([f"compression min_numel must be an int >= 0, got {self.min_numel!r}"])

    def for_tensor(self, numel: int, dtype: torch.dtype = torch.float32) -> Compressor:
        """The compressor of a tensor of ``numel`` elements stored in ``dtype``."""
        return self.compressor if numel >= self.min_numel else pass_through(dtype)


class TensorCodec:
    """Compression of one peer's stream of named tensors (its gradients, or its parameter deltas).

    Each tensor gets the compressor its size calls for (``policy``), and its wire parts are named
    ``"<tensor>.<part>"`` so a frame carries a whole model. With ``error_feedback`` each tensor
    keeps a residual (:class:`ErrorFeedback`). Decoding is stateless, so the same codec decodes
    what any peer sent with the same policy, shapes and dtypes. ``dtypes`` are the tensors'
    storage dtypes (float32 for any name left out).
    """

    def __init__(
        self,
        policy: CompressionPolicy,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        error_feedback: bool,
        dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        self._shapes = dict(shapes)
        stored = dict(dtypes or {})
        self._dtypes = {name: stored.get(name, torch.float32) for name in self._shapes}
        self._compressors = {
            name: policy.for_tensor(math.prod(shape), self._dtypes[name]) for name, shape in self._shapes.items()
        }
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
        """What one stream would take as float32 (the node's ``fp32_equivalent_bytes``)."""
        return sum(4 * math.prod(shape) for shape in self._shapes.values())

    @torch.no_grad()
    def encode(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The wire parts of ``tensors`` (any float dtype; each is read as float32, which is
        exact for 16-bit values)."""
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
        """Every tensor of a stream, as float32 on ``device`` (the caller rounds into its dtype)."""
        out: dict[str, torch.Tensor] = {}
        for name, shape in self._shapes.items():
            compressor = self._compressors[name]
            mine = {suffix: parts[f"{name}.{suffix}"] for suffix in compressor.wire_specs(shape)}
            out[name] = compressor.decode(name, mine, shape, device)
        return out

    def reset(self) -> None:
        for feedback in self._feedback.values():
            feedback.reset()
