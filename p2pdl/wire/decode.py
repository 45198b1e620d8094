"""Frame decoding: the receiver's checks, in order, on bytes that arrive from the network.

Decoding treats its input as hostile and raises only subclasses of
:class:`~p2pdl.errors.FrameError`. There is no pickle anywhere.

Trade-offs:

* Checks run cheapest-first, so a bad frame costs as little as possible: the size and the
  8-byte header are checked before anything is allocated. Because lz4 is asked for exactly the
  declared body size, the cap on that size also caps what decompression can allocate, so an lz4
  bomb is impossible.
* Tensors are not copied when the input is ``bytes``: they are read-only views of it
  (``bytes`` are immutable, so the views are safe). A mutable input (``bytearray``,
  ``memoryview``) is copied once first, since its owner may reuse it, unless the caller hands it
  over with ``owned=True`` (a receive buffer that is reused only once nothing views it, see
  :mod:`~p2pdl.net.stream`): then its tensors view it in place, and every check is the same.
* Every floating-point tensor is checked to be finite on every frame, with one reduction
  pass and no temporaries.

Pure (no I/O, no asyncio). Decoding a large frame is slow enough to stall an event loop, so
callers on one run it in a thread executor.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping

import lz4.block
import torch

from p2pdl.errors import (
    DtypeNotAllowedError,
    FrameFormatError,
    FrameSchemaError,
    FrameTooLargeError,
    FrameVersionError,
    NonFiniteError,
    UnknownSenderError,
)
from p2pdl.wire.frame import (
    ALLOWED_DTYPES,
    FLAG_LZ4,
    HEADER,
    HEADER_SIZE,
    LITTLE_ENDIAN_HOST,
    MAGIC,
    PROTOCOL_VERSION,
    Frame,
    Limits,
    TensorSpec,
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
    check_tensors,
)
from p2pdl.wire.unpack import unpack_body

__all__ = ["decode_frame"]


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    limits: Limits,
    known_senders: Container[str] | None = None,
    expected: Mapping[str, TensorSpec] | None = None,
    owned: bool = False,
) -> Frame:
    """Parse and validate one frame received from the network.

    Checks run cheapest-first: frame size, header, declared body size, decompression,
    msgpack, nesting depth, the body's ``v``, the rest of the schema, dtype allow-list, byte
    counts, ``known_senders``, that floating-point tensors are finite, and finally
    ``expected`` names/dtypes/shapes (docs/PROTOCOL.md section 1.3 numbers them).

    Raises only :class:`~p2pdl.errors.FrameError` subclasses. The returned tensors are
    read-only views of ``data`` when it is ``bytes`` (immutable, so nothing can change them),
    and of a private copy otherwise, never of a buffer the caller may reuse. ``owned=True``: the
    caller gives ``data`` (mutable) to the frame and will not write to it while any view of it
    lives, so the tensors view it without the copy.
    """
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if view.nbytes > limits.max_frame_bytes:
        raise FrameTooLargeError(f"frame is {view.nbytes} bytes; max_frame_bytes is {limits.max_frame_bytes}")
    if not isinstance(data, bytes) and not owned:
        view = memoryview(view.tobytes())  # the tensors will view this private copy
    body = _read_body(view, limits)
    obj = unpack_body(body, limits)
    frame = _check_body(obj, limits)

    if known_senders is not None and frame.sender not in known_senders:
        raise UnknownSenderError(f"sender {frame.sender!r} is not a known peer")
    for name, tensor in frame.tensors.items():
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise NonFiniteError(f"tensor {name!r} contains NaN or Inf")
    if expected is not None:
        check_tensors(frame, expected)
    return frame


def _all_finite(tensor: torch.Tensor) -> bool:
    # One reduction pass, no temporaries: NaN propagates into both extremes and an Inf
    # is an extreme. torch.isfinite(t).all() would materialise a bool tensor the size of
    # the input, and this runs on every received frame.
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _read_body(view: memoryview, limits: Limits) -> bytes | memoryview:
    """Check the header and return the uncompressed body."""
    if view.nbytes < HEADER_SIZE:
        raise FrameFormatError(f"truncated frame: {view.nbytes} bytes, header needs 8")
    magic, version, flags, declared = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise FrameFormatError(f"bad magic {magic!r}; not a p2pdl frame")
    if version != PROTOCOL_VERSION:
        raise FrameVersionError(f"protocol version {version}; this peer speaks {PROTOCOL_VERSION}")
    if flags & ~FLAG_LZ4:
        raise FrameFormatError(f"unknown flag bits 0x{flags & ~FLAG_LZ4:02x}")
    if declared > limits.max_decompressed_bytes:
        raise FrameTooLargeError(
            f"declared body size {declared} bytes; max_decompressed_bytes is {limits.max_decompressed_bytes}"
        )
    payload = view[HEADER_SIZE:]
    if not flags & FLAG_LZ4:
        if payload.nbytes != declared:
            raise FrameFormatError(f"body is {payload.nbytes} bytes; header declares {declared}")
        return payload
    try:
        # Asking for exactly the declared size bounds the allocation by the cap above.
        body: bytes = lz4.block.decompress(payload, uncompressed_size=declared)
    except Exception as exc:  # lz4 raises LZ4BlockError, ValueError, MemoryError
        raise FrameFormatError(f"corrupt lz4 body: {exc}") from exc
    if len(body) != declared:
        raise FrameFormatError(f"lz4 body decompressed to {len(body)} bytes, not {declared}")
    return body


def _check_body(obj: object, limits: Limits) -> Frame:
    if type(obj) is not dict:
        raise FrameSchemaError(f"body is a {type(obj).__name__}, not a map")
    version = obj.get("v")
    # First, so that a body of another version is reported as such whatever its other keys.
    if type(version) is int and version != PROTOCOL_VERSION:
        raise FrameVersionError(f"body version {version}; this peer speaks {PROTOCOL_VERSION}")
    keys = set(obj)
    if keys != BODY_KEYS:
        missing = sorted(map(str, BODY_KEYS - keys))
        extra = sorted(map(repr, keys - BODY_KEYS))
        raise FrameSchemaError(f"body keys wrong: missing {missing}, extra {extra}")
    if type(version) is not int:
        raise FrameSchemaError(f"v is a {type(version).__name__}, not an int")
    kind, sender, round_, step = obj["kind"], obj["sender"], obj["round"], obj["step"]
    check_kind(kind)
    check_sender(sender)
    check_counter("round", round_)
    check_counter("step", step)
    meta = obj["meta"]
    if type(meta) is not dict:
        raise FrameSchemaError(f"meta is a {type(meta).__name__}, not a map")
    check_meta(meta)

    entries = obj["tensors"]
    if type(entries) is not list:
        raise FrameSchemaError(f"tensors is a {type(entries).__name__}, not an array")
    if len(entries) > limits.max_tensors:
        raise FrameSchemaError(f"{len(entries)} tensors; max_tensors is {limits.max_tensors}")
    # Passes over all tensors, so the error reported does not depend on tensor order.
    parsed: list[tuple[str, str, tuple[int, ...], bytes | memoryview]] = []
    names: set[str] = set()
    for entry in entries:
        if type(entry) is not list or len(entry) != 4:
            raise FrameSchemaError("each tensor must be an array [name, dtype, shape, data]")
        name, dtype_name, shape, data = entry
        check_tensor_name(name)
        if name in names:
            raise FrameSchemaError(f"tensor name {name!r} repeated")
        names.add(name)
        if type(dtype_name) is not str:
            raise FrameSchemaError(f"tensor {name!r}: dtype is not a str")
        if type(shape) is not list or not all(type(d) is int for d in shape):
            raise FrameSchemaError(f"tensor {name!r}: shape is not an array of ints")
        check_shape(name, tuple(shape))
        if type(data) is not bytes and type(data) is not memoryview:  # memoryview: see wire.unpack
            raise FrameSchemaError(f"tensor {name!r}: data is a {type(data).__name__}, not bin")
        parsed.append((name, dtype_name, tuple(shape), data))
    for name, dtype_name, _, _ in parsed:
        if dtype_name not in ALLOWED_DTYPES:
            raise DtypeNotAllowedError(f"tensor {name!r}: dtype {dtype_name!r} not allowed")
    for name, dtype_name, shape, data in parsed:
        nbytes = math.prod(shape) * ALLOWED_DTYPES[dtype_name].itemsize
        if len(data) != nbytes:
            raise FrameSchemaError(f"tensor {name!r}: {len(data)} data bytes, {dtype_name}{list(shape)} needs {nbytes}")

    tensors = {name: _tensor_from_bytes(data, dtype, shape) for name, dtype, shape, data in parsed}
    return Frame(kind=kind, sender=sender, round=round_, step=step, meta=meta, tensors=tensors)


def _tensor_from_bytes(data: bytes | memoryview, dtype_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = ALLOWED_DTYPES[dtype_name]
    if not data:  # frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(data, dtype=dtype)
    if not LITTLE_ENDIAN_HOST:
        flat = swap_bytes(flat)
    return flat.reshape(shape)
