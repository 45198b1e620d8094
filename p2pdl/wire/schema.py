"""The body schema: every rule a frame's fields must satisfy, shared by both ends of a link.

The encoder runs these checks before it sends and the decoder runs them on what it receives,
from the same bounds, so the two can never disagree: a frame this peer encodes is one every peer
accepts, and a refused frame is always another peer's bug or an attack, never a drift between
sender and receiver. The trade-off is that a sender pays for checks its own code already meets.
:func:`check_tensors` compares a frame's tensors with the names, dtypes and shapes a receiver
expects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

import torch

from p2pdl.errors import FrameSchemaError, ShapeMismatchError
from p2pdl.wire.frame import DTYPE_NAMES, Frame, TensorSpec

__all__ = [
    "BODY_KEYS",
    "MAX_META_ENTRIES",
    "MAX_STR_BYTES",
    "check_counter",
    "check_kind",
    "check_meta",
    "check_sender",
    "check_shape",
    "check_tensor_name",
    "check_tensors",
]

# Schema bounds, shared by the encoder and the decoder so they can never disagree.
_KIND_RE: Final[re.Pattern[str]] = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MAX_SENDER_CHARS: Final[int] = 64
MAX_META_ENTRIES: Final[int] = 64
_MAX_META_KEY_CHARS: Final[int] = 64
_MAX_META_STR_CHARS: Final[int] = 256
_MAX_TENSOR_NAME_CHARS: Final[int] = 256
_MAX_NDIM: Final[int] = 8
_MAX_DIM: Final[int] = 2**31  # exclusive
_MAX_COUNTER: Final[int] = 2**63  # exclusive, so round/step fit an int64 anywhere
# msgpack limits str length in bytes; the longest schema string is 256 chars of up to
# 4 UTF-8 bytes each. Anything longer is refused by the unpacker before it is allocated.
MAX_STR_BYTES: Final[int] = 4 * _MAX_TENSOR_NAME_CHARS
BODY_KEYS: Final[frozenset[str]] = frozenset({"v", "kind", "sender", "round", "step", "meta", "tensors"})


def check_tensors(frame: Frame, expected: Mapping[str, TensorSpec]) -> None:
    """Raise ShapeMismatchError unless ``frame`` carries exactly the ``expected`` tensors.

    The same check as ``decode_frame(..., expected=...)``, for callers that only know what
    to expect once they have read the frame's ``kind``.
    """
    _check_expected(frame.tensors, expected)


def _check_expected(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec]) -> None:
    if tensors.keys() != expected.keys():
        missing = sorted(expected.keys() - tensors.keys())
        extra = sorted(tensors.keys() - expected.keys())
        raise ShapeMismatchError(f"tensor names differ: missing {missing}, unexpected {extra}")
    for name, tensor in tensors.items():
        spec = expected[name]
        dtype_name = DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
        got = TensorSpec(dtype=dtype_name, shape=tuple(tensor.shape))
        if got != spec:
            raise ShapeMismatchError(
                f"tensor {name!r}: got {got.dtype}{list(got.shape)}, expected {spec.dtype}{list(spec.shape)}"
            )


def check_kind(kind: object) -> None:
    if type(kind) is not str or _KIND_RE.fullmatch(kind) is None:
        raise FrameSchemaError(f"kind {kind!r} must match [a-z][a-z0-9_]{{0,31}}")


def check_sender(sender: object) -> None:
    if type(sender) is not str or not 1 <= len(sender) <= _MAX_SENDER_CHARS:
        raise FrameSchemaError(f"sender {sender!r:.80} must be a str of 1..64 chars")


def check_counter(field_name: str, value: object) -> None:
    # type() rather than isinstance(): bool is an int subclass and must not pass.
    if type(value) is not int or not 0 <= value < _MAX_COUNTER:
        raise FrameSchemaError(f"{field_name} {value!r:.40} must be an int in [0, 2**63)")


def check_meta(meta: object) -> None:
    if not isinstance(meta, Mapping):
        raise FrameSchemaError("meta must be a map")
    if len(meta) > MAX_META_ENTRIES:
        raise FrameSchemaError(f"meta has {len(meta)} entries; at most {MAX_META_ENTRIES}")
    for key, value in meta.items():
        if type(key) is not str or len(key) > _MAX_META_KEY_CHARS:
            raise FrameSchemaError(f"meta key {key!r:.80} must be a str of at most 64 chars")
        kind = type(value)
        if kind is str:
            if len(value) > _MAX_META_STR_CHARS:
                raise FrameSchemaError(f"meta[{key!r}] is longer than 256 chars")
        elif kind is int:
            # msgpack's integer range; anything outside would fail to pack.
            if not -(2**63) <= value < 2**64:
                raise FrameSchemaError(f"meta[{key!r}] does not fit a 64-bit integer")
        elif value is not None and kind not in (float, bool):
            raise FrameSchemaError(f"meta[{key!r}] is a {kind.__name__}; allowed: int, float, str, bool, None")


def check_tensor_name(name: object) -> None:
    if type(name) is not str or not 1 <= len(name) <= _MAX_TENSOR_NAME_CHARS:
        raise FrameSchemaError(f"tensor name {name!r:.80} must be a str of 1..256 chars")


_MAX_EXTENT = 2**40


def check_shape(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) > _MAX_NDIM:
        raise FrameSchemaError(f"tensor {name!r} has {len(shape)} dims; at most {_MAX_NDIM}")
    if not all(0 <= d < _MAX_DIM for d in shape):
        raise FrameSchemaError(f"tensor {name!r}: every dim must be in [0, 2**31)")
    # An empty tensor's byte count is 0 whatever its other dims, but torch still computes strides
    # from them: [0, 2**31-1, 2**31-1, 2**31-1] would overflow int64 inside torch.empty.
    extent = 1
    for d in shape:
        extent *= max(d, 1)
    if extent >= _MAX_EXTENT:
        raise FrameSchemaError(f"tensor {name!r}: shape {list(shape)} spans more than 2**40 elements")
