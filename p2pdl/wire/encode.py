"""Frame encoding: a :class:`~p2pdl.wire.frame.Frame` to the bytes that go on the wire.

Trade-offs:

* Tensor bytes are copied exactly once. The msgpack pieces are packed separately and the
  tensors' own memory is gathered with them into the output by a single ``bytes.join``.
* lz4 is used only when it pays. Trained fp32 weights are close to incompressible, so
  compressing them costs CPU time for nothing, while int8 or sparse payloads do shrink.
  ``"auto"`` decides from a 64 KiB sample, which is cheap, and the body is sent raw
  whenever compression would not shrink it.
* The encoder enforces the same schema as the receiver (:mod:`~p2pdl.wire.schema`), so a bad
  frame fails here, with a traceback at the sender, instead of as a refusal at every peer.

Pure (no I/O, no asyncio). Encoding a large frame is slow enough to stall an event loop, so
callers on one run it in a thread executor.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

import lz4.block
import msgpack
import torch

from p2pdl.errors import FrameSchemaError, FrameTooLargeError
from p2pdl.wire.frame import (
    FLAG_LZ4,
    HEADER,
    LITTLE_ENDIAN_HOST,
    MAGIC,
    PROTOCOL_VERSION,
    Compression,
    Frame,
    dtype_name,
    swap_bytes,
)
from p2pdl.wire.schema import (
    BODY_KEYS,
    check_counter,
    check_kind,
    check_meta,
    check_sender,
    check_shape,
    check_tensor_name,
)

__all__ = ["encode_frame"]

_MAX_U32: Final[int] = 2**32 - 1

# "auto" compression: small frames are not worth the lz4 call; larger ones are judged
# on a sample from the middle of the body (the start is msgpack keys and names).
_AUTO_MIN_BODY: Final[int] = 4 * 1024
_AUTO_SAMPLE: Final[int] = 64 * 1024
_AUTO_MAX_RATIO: Final[float] = 0.9


def encode_frame(frame: Frame, *, compression: Compression = "auto") -> bytes:
    """Serialise ``frame``; tensors may live on any device and are copied once.

    ``compression``: ``"never"``; ``"always"`` tries lz4 on every body; ``"auto"`` tries it
    only on bodies of 4 KiB or more whose middle 64 KiB sample shrinks below 0.9. With
    ``"always"`` and ``"auto"``, a body that lz4 does not shrink is sent uncompressed.

    Raises FrameSchemaError, DtypeNotAllowedError or FrameTooLargeError when the frame
    breaks the schema that the receiver would enforce.
    """
    if compression not in ("auto", "always", "never"):
        raise ValueError(f"compression must be 'auto', 'always' or 'never', not {compression!r}")
    check_kind(frame.kind)
    check_sender(frame.sender)
    check_counter("round", frame.round)
    check_counter("step", frame.step)
    check_meta(frame.meta)
    if not isinstance(frame.tensors, Mapping):
        raise FrameSchemaError("tensors must be a mapping of name to tensor")

    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    # The body is built as a list of pieces so that tensor memory is copied exactly once,
    # by the final join. Small pieces are packed by msgpack itself.
    parts: list[bytes | memoryview] = [
        packer.pack_map_header(len(BODY_KEYS)),
        packer.pack("v"),
        packer.pack(PROTOCOL_VERSION),
        packer.pack("kind"),
        packer.pack(frame.kind),
        packer.pack("sender"),
        packer.pack(frame.sender),
        packer.pack("round"),
        packer.pack(frame.round),
        packer.pack("step"),
        packer.pack(frame.step),
        packer.pack("meta"),
        packer.pack(dict(frame.meta)),
        packer.pack("tensors"),
        packer.pack_array_header(len(frame.tensors)),
    ]
    for name, tensor in frame.tensors.items():
        check_tensor_name(name)
        if not isinstance(tensor, torch.Tensor):
            raise FrameSchemaError(f"tensor {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided:
            raise FrameSchemaError(f"tensor {name!r} has layout {tensor.layout}; only dense")
        wire_dtype = dtype_name(tensor.dtype)
        shape = tuple(tensor.shape)
        check_shape(name, shape)
        data = _tensor_bytes(tensor)
        parts += [
            packer.pack_array_header(4),
            packer.pack(name),
            packer.pack(wire_dtype),
            packer.pack(list(shape)),
            _bin_header(name, data.nbytes),
            data,
        ]

    body_len = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    if body_len > _MAX_U32:
        raise FrameTooLargeError(f"frame body is {body_len} bytes; the header allows 2**32-1")

    if compression == "always" or (compression == "auto" and _worth_compressing(parts, body_len)):
        body = b"".join(parts)
        compressed: bytes = lz4.block.compress(body, store_size=False)
        if len(compressed) < body_len:
            return HEADER.pack(MAGIC, PROTOCOL_VERSION, FLAG_LZ4, body_len) + compressed
    return b"".join([HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, body_len), *parts])


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's little-endian C-contiguous bytes, without a copy when already so."""
    flat = tensor.detach().to("cpu", copy=False).contiguous().reshape(-1)
    if not LITTLE_ENDIAN_HOST:
        flat = swap_bytes(flat)
    # Viewing as uint8 also covers bfloat16, which numpy cannot represent.
    return flat.view(torch.uint8).numpy().data


def _bin_header(name: str, nbytes: int) -> bytes:
    # Written by hand (msgpack's bin8/16/32 forms) so the data itself can stay a view.
    if nbytes < 2**8:
        return struct.pack(">BB", 0xC4, nbytes)
    if nbytes < 2**16:
        return struct.pack(">BH", 0xC5, nbytes)
    if nbytes <= _MAX_U32:
        return struct.pack(">BI", 0xC6, nbytes)
    raise FrameTooLargeError(f"tensor {name!r} is {nbytes} bytes; msgpack bin allows 2**32-1")


def _worth_compressing(parts: list[bytes | memoryview], body_len: int) -> bool:
    if body_len < _AUTO_MIN_BODY:
        return False
    sample_len = min(_AUTO_SAMPLE, body_len)
    sample = _slice_parts(parts, (body_len - sample_len) // 2, sample_len)
    compressed = lz4.block.compress(sample, store_size=False)
    return len(compressed) < _AUTO_MAX_RATIO * sample_len


def _slice_parts(parts: list[bytes | memoryview], start: int, length: int) -> bytes:
    """Bytes ``[start, start + length)`` of the concatenation of ``parts``."""
    chunks: list[bytes | memoryview] = []
    offset = 0
    end = start + length
    for part in parts:
        size = len(part) if isinstance(part, bytes) else part.nbytes
        lo, hi = max(start, offset), min(end, offset + size)
        if lo < hi:
            chunks.append(part[lo - offset : hi - offset])
        offset += size
        if offset >= end:
            break
    return b"".join(chunks)
