"""Frame encoding: a :class:`~p2pdl.wire.frame.Frame` to the bytes that go on the wire.

Trade-offs:

* :func:`encode_frame_parts` copies no large tensor: the frame is returned as pieces (the
  header and msgpack framing as small ``bytes``, each tensor of 64 KiB or more as a
  ``memoryview`` of its own memory) whose concatenation is exactly the frame. A sender that can
  write a list of buffers (a frame stream's ``writelines``) sends the tensors from where they
  are; the price is that the caller must not change them until the send is over.
  :func:`encode_frame` joins the pieces into one ``bytes``: tensor bytes are copied exactly once,
  and the result is the caller's to keep. Both give the same bytes for the same frame.
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

__all__ = ["BORROW_MIN_BYTES", "EncodedFrame", "encode_frame", "encode_frame_parts", "encode_frame_parts_inline"]

_MAX_U32: Final[int] = 2**32 - 1
# Tensor data of at least this many bytes stays a view of the tensor's memory in an
# EncodedFrame; smaller pieces are copied into the framing around them (fewer buffers to write).
BORROW_MIN_BYTES: Final[int] = 64 * 1024

# "auto" compression: small frames are not worth the lz4 call; larger ones are judged
# on a sample from the middle of the body (the start is msgpack keys and names).
_AUTO_MIN_BODY: Final[int] = 4 * 1024
_AUTO_SAMPLE: Final[int] = 64 * 1024
_AUTO_MAX_RATIO: Final[float] = 0.9


class EncodedFrame:
    """One encoded frame as ``pieces`` whose concatenation is the frame's bytes (``nbytes`` long).

    ``borrowed``: some piece is a view of a tensor's own memory (not a copy), so the bytes change
    if the tensor does; :meth:`join` takes a copy that does not.
    """

    __slots__ = ("_joined", "borrowed", "nbytes", "pieces")

    def __init__(self, pieces: tuple[bytes | memoryview, ...], *, borrowed: bool) -> None:
        self.pieces = pieces
        self.nbytes = sum(_size(p) for p in pieces)
        self.borrowed = borrowed
        self._joined: bytes | None = None

    def __len__(self) -> int:
        return self.nbytes

    def join(self) -> bytes:
        """The frame as one ``bytes`` (copied once, then kept: later calls return the same object)."""
        if self._joined is None:
            if len(self.pieces) == 1 and isinstance(self.pieces[0], bytes):
                self._joined = self.pieces[0]
            else:
                self._joined = b"".join(self.pieces)
        return self._joined


def encode_frame(frame: Frame, *, compression: Compression = "auto") -> bytes:
    """Serialise ``frame`` into one ``bytes``; tensors may live on any device and are copied once.

    ``compression``: ``"never"``; ``"always"`` tries lz4 on every body; ``"auto"`` tries it
    only on bodies of 4 KiB or more whose middle 64 KiB sample shrinks below 0.9. With
    ``"always"`` and ``"auto"``, a body that lz4 does not shrink is sent uncompressed.

    Raises FrameSchemaError, DtypeNotAllowedError or FrameTooLargeError when the frame
    breaks the schema that the receiver would enforce.
    """
    return encode_frame_parts(frame, compression=compression).join()


def encode_frame_parts(frame: Frame, *, compression: Compression = "auto") -> EncodedFrame:
    """Serialise ``frame`` without copying its large tensors (see :class:`EncodedFrame`).

    The bytes are exactly :func:`encode_frame`'s. A body that lz4 compresses is one new ``bytes``
    (nothing borrowed); an uncompressed one keeps each CPU, C-contiguous, little-endian tensor
    of :data:`BORROW_MIN_BYTES` or more as a view of its memory. Same arguments and errors as
    :func:`encode_frame`.
    """
    encoded = _encode(frame, compression, max_copy_bytes=None)
    assert encoded is not None
    return encoded


def encode_frame_parts_inline(frame: Frame, *, compression: Compression, max_copy_bytes: int) -> EncodedFrame | None:
    """:func:`encode_frame_parts` where that is cheap enough for an event loop; None where it is not.

    Cheap: at most ``max_copy_bytes`` of tensor data needs a copy (a tensor off the CPU, not
    C-contiguous, or on a big-endian host) and there is no body to compress: ``"never"``, or
    ``"auto"`` whose 64 KiB sample (one small lz4 call) finds the body incompressible.
    ``"always"`` is never cheap. On None, run :func:`encode_frame_parts` on a thread.
    """
    return _encode(frame, compression, max_copy_bytes=max_copy_bytes)


def _encode(frame: Frame, compression: Compression, *, max_copy_bytes: int | None) -> EncodedFrame | None:
    """The encoder; with ``max_copy_bytes``, None instead of copying more or compressing."""
    if compression not in ("auto", "always", "never"):
        raise ValueError(f"compression must be 'auto', 'always' or 'never', not {compression!r}")
    check_kind(frame.kind)
    check_sender(frame.sender)
    check_counter("round", frame.round)
    check_counter("step", frame.step)
    check_meta(frame.meta)
    if not isinstance(frame.tensors, Mapping):
        raise FrameSchemaError("tensors must be a mapping of name to tensor")
    if max_copy_bytes is not None:
        if compression == "always":
            return None
        copies = sum(
            t.numel() * t.element_size()
            for t in frame.tensors.values()
            if isinstance(t, torch.Tensor) and not _in_place(t)
        )
        if copies > max_copy_bytes:
            return None

    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    # The body is built as a list of pieces so that no tensor is copied here. Small pieces are
    # packed by msgpack itself.
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
    shared: set[int] = set()  # ids of the data pieces that view a caller's tensor memory
    for name, tensor in frame.tensors.items():
        check_tensor_name(name)
        if not isinstance(tensor, torch.Tensor):
            raise FrameSchemaError(f"tensor {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided:
            raise FrameSchemaError(f"tensor {name!r} has layout {tensor.layout}; only dense")
        wire_dtype = dtype_name(tensor.dtype)
        shape = tuple(tensor.shape)
        check_shape(name, shape)
        data, is_view = _tensor_bytes(tensor)
        if is_view:
            shared.add(id(data))
        parts += [
            packer.pack_array_header(4),
            packer.pack(name),
            packer.pack(wire_dtype),
            packer.pack(list(shape)),
            _bin_header(name, data.nbytes),
            data,
        ]

    body_len = sum(_size(p) for p in parts)
    if body_len > _MAX_U32:
        raise FrameTooLargeError(f"frame body is {body_len} bytes; the header allows 2**32-1")

    if compression == "always" or (compression == "auto" and _worth_compressing(parts, body_len)):
        if max_copy_bytes is not None:
            return None
        body = b"".join(parts)
        compressed: bytes = lz4.block.compress(body, store_size=False)
        if len(compressed) < body_len:
            header = HEADER.pack(MAGIC, PROTOCOL_VERSION, FLAG_LZ4, body_len)
            return EncodedFrame((header + compressed,), borrowed=False)
    return _coalesce([HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, body_len), *parts], shared)


def _coalesce(parts: list[bytes | memoryview], shared: set[int]) -> EncodedFrame:
    """Join runs of small pieces into one ``bytes``; data of BORROW_MIN_BYTES or more stays a view."""
    pieces: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
    borrowed = False
    for part in parts:
        if isinstance(part, memoryview) and part.nbytes >= BORROW_MIN_BYTES:
            if run:
                pieces.append(b"".join(run))
                run = []
            pieces.append(part)
            borrowed = borrowed or id(part) in shared
        else:
            run.append(part)
    if run:
        pieces.append(b"".join(run))
    return EncodedFrame(tuple(pieces), borrowed=borrowed)


def _size(piece: bytes | memoryview) -> int:
    return len(piece) if isinstance(piece, bytes) else piece.nbytes


def _in_place(tensor: torch.Tensor) -> bool:
    """Whether the tensor's wire bytes are its own memory (no copy to encode it)."""
    return tensor.device.type == "cpu" and tensor.is_contiguous() and LITTLE_ENDIAN_HOST


def _tensor_bytes(tensor: torch.Tensor) -> tuple[memoryview, bool]:
    """The tensor's little-endian C-contiguous bytes, and whether they are its own memory.

    No copy when the tensor is already so (a CPU, C-contiguous tensor on a little-endian host):
    the view then shares the tensor's memory, and the second value is True.
    """
    source = tensor.detach()
    flat = source.to("cpu", copy=False).contiguous().reshape(-1)
    if not LITTLE_ENDIAN_HOST:
        flat = swap_bytes(flat)
    shares = flat.numel() > 0 and flat.data_ptr() == source.data_ptr() and source.device.type == "cpu"
    # Viewing as uint8 also covers bfloat16, which numpy cannot represent.
    return flat.view(torch.uint8).numpy().data, shares


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
        size = _size(part)
        lo, hi = max(start, offset), min(end, offset + size)
        if lo < hi:
            chunks.append(part[lo - offset : hi - offset])
        offset += size
        if offset >= end:
            break
    return b"".join(chunks)
