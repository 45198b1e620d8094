"""The frame: what one message between peers holds, and the fixed layout of its bytes.

A frame is an 8-byte fixed header followed by a body::

    offset  size  field
    0       2     magic   b"P2"
    2       1     version u8, PROTOCOL_VERSION
    3       1     flags   u8, bit 0 = FLAG_LZ4 (body is one lz4 block), other bits 0
    4       4     length  u32 little-endian, size of the *uncompressed* body in bytes
    8       ...   body    msgpack map, lz4-block compressed (no size prefix) if FLAG_LZ4

The body map has exactly the keys ``v kind sender round step meta tensors``; each tensor
is ``[name, dtype, shape, data]`` with ``data`` the raw little-endian C-contiguous bytes as
a msgpack ``bin``. docs/PROTOCOL.md describes the format byte by byte; :mod:`~p2pdl.wire.encode`
writes it and :mod:`~p2pdl.wire.decode` reads it.

The trade-off: the header lives outside msgpack so that a receiver can refuse a frame from
8 bytes (wrong magic, a version it does not speak, or a declared body size over its cap)
before it spends a byte of memory on decompression or unpacking. The dtype allow-list is
closed: a peer can only ever receive the dense numeric dtypes listed here.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import torch

from p2pdl.errors import DtypeNotAllowedError

__all__ = [
    "ALLOWED_DTYPES",
    "DTYPE_NAMES",
    "FLAG_LZ4",
    "HEADER",
    "HEADER_SIZE",
    "LITTLE_ENDIAN_HOST",
    "MAGIC",
    "PROTOCOL_VERSION",
    "Compression",
    "Frame",
    "Limits",
    "MetaValue",
    "TensorSpec",
    "dtype_name",
    "swap_bytes",
]

PROTOCOL_VERSION: Final[int] = 1
MAGIC: Final[bytes] = b"P2"
FLAG_LZ4: Final[int] = 0x01
HEADER: Final[struct.Struct] = struct.Struct("<2sBBI")
HEADER_SIZE: Final[int] = HEADER.size
assert HEADER_SIZE == 8

ALLOWED_DTYPES: Final[Mapping[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_NAMES: Final[Mapping[torch.dtype, str]] = {v: k for k, v in ALLOWED_DTYPES.items()}

LITTLE_ENDIAN_HOST: Final[bool] = sys.byteorder == "little"

MetaValue = int | float | str | bool | None
Compression = Literal["auto", "always", "never"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """The dtype name and shape a received tensor must have."""

    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of_tensor(cls, tensor: torch.Tensor) -> TensorSpec:
        """The spec of a local tensor, e.g. a model parameter, to check peers against."""
        return cls(dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape))


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Caps on a received frame, in bytes (from the node config)."""

    max_frame_bytes: int  # bytes on the wire, header included; checked first
    max_decompressed_bytes: int  # declared body size, checked before decompressing
    max_tensors: int = 4096


# eq=False: dataclass equality would compare tensors with ``==`` and fail on bool().
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Frame:
    """One message between peers.

    Tensors of a decoded frame are views of the received bytes (no copy): read-only ``bytes``
    (torch warns once, "The given buffer is not writable", when it creates them), or a frame
    stream's receive buffer, which is reused only once nothing views it. Clone a tensor before
    writing to it in place.
    """

    kind: str
    sender: str
    round: int
    step: int
    meta: Mapping[str, MetaValue] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; DtypeNotAllowedError unless it is in the allow-list."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise DtypeNotAllowedError(f"dtype {dtype} is not in the wire allow-list") from None


def swap_bytes(flat: torch.Tensor) -> torch.Tensor:
    """Reverse the byte order of every element of a 1-d contiguous tensor (copies)."""
    itemsize = flat.element_size()
    if itemsize == 1:
        return flat
    as_bytes = flat.view(torch.uint8).reshape(-1, itemsize)  # (numel, itemsize)
    return as_bytes.flip(1).contiguous().reshape(-1).view(flat.dtype)
