"""Binary frame codec: the only bytes p2pdl peers exchange.

A frame is an 8-byte fixed header followed by a body::

    offset  size  field
    0       2     magic   b"P2"
    2       1     version u8, PROTOCOL_VERSION
    3       1     flags   u8, bit 0 = FLAG_LZ4 (body is one lz4 block), other bits 0
    4       4     length  u32 little-endian, size of the *uncompressed* body in bytes
    8       ...   body    msgpack map, lz4-block compressed (no size prefix) if FLAG_LZ4

The body map has exactly the keys ``v kind sender round step meta tensors``; each tensor
is ``[name, dtype, shape, data]`` with ``data`` the raw little-endian C-contiguous bytes as
a msgpack ``bin``. docs/PROTOCOL.md describes the format byte by byte.

Trade-offs:

* The header lives outside msgpack so that a receiver can refuse a frame from 8 bytes:
  wrong magic, a version it does not speak, or a declared body size over its cap, all
  before it spends a byte of memory on decompression or unpacking. Because lz4 is asked
  for exactly the declared size, the cap on that size also caps what decompression can
  allocate, so an lz4 bomb is impossible.
* lz4 is used only when it pays. Trained fp32 weights are close to incompressible, so
  compressing them costs CPU time for nothing, while int8 or sparse payloads do shrink.
  ``"auto"`` decides from a 64 KiB sample, which is cheap, and the body is sent raw
  whenever compression would not shrink it.
* Tensor bytes are copied once when encoding and not at all when decoding ``bytes``.
  Encoding gathers the msgpack pieces and the tensors' own memory into the output with a
  single ``bytes.join``. Decoding walks the msgpack structure by hand just far enough to find
  each tensor's ``bin`` and wraps it in place with ``torch.frombuffer`` (``bytes`` are
  immutable, so the views are safe); everything else is still decoded by msgpack, and any
  body the walk does not recognise goes through the plain ``msgpack.unpackb`` path instead,
  so hostile input meets exactly the same checks. A mutable input (``bytearray``,
  ``memoryview``) is copied once first, since its owner may reuse it.
* Everything here is pure (no I/O, no asyncio). Encoding and decoding a large frame is
  slow enough to stall an event loop, so callers on one run them in a thread executor.

Decoding treats its input as hostile and raises only subclasses of
:class:`~p2pdl.errors.FrameError`. There is no pickle anywhere.
"""

from __future__ import annotations

import math
import re
import struct
import sys
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import lz4.block
import msgpack
import torch

from p2pdl.errors import (
    DtypeNotAllowedError,
    FrameFormatError,
    FrameSchemaError,
    FrameTooLargeError,
    FrameVersionError,
    NonFiniteError,
    ShapeMismatchError,
    UnknownSenderError,
)

__all__ = [
    "ALLOWED_DTYPES",
    "FLAG_LZ4",
    "HEADER_SIZE",
    "PROTOCOL_VERSION",
    "Compression",
    "Frame",
    "Limits",
    "MetaValue",
    "TensorSpec",
    "check_tensors",
    "decode_frame",
    "encode_frame",
]

PROTOCOL_VERSION: Final[int] = 1
MAGIC: Final[bytes] = b"P2"
FLAG_LZ4: Final[int] = 0x01
_HEADER: Final[struct.Struct] = struct.Struct("<2sBBI")
HEADER_SIZE: Final[int] = _HEADER.size
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
_DTYPE_NAMES: Final[Mapping[torch.dtype, str]] = {v: k for k, v in ALLOWED_DTYPES.items()}

# Schema bounds, shared by the encoder and the decoder so they can never disagree.
_KIND_RE: Final[re.Pattern[str]] = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MAX_SENDER_CHARS: Final[int] = 64
_MAX_META_ENTRIES: Final[int] = 64
_MAX_META_KEY_CHARS: Final[int] = 64
_MAX_META_STR_CHARS: Final[int] = 256
_MAX_TENSOR_NAME_CHARS: Final[int] = 256
_MAX_NDIM: Final[int] = 8
_MAX_DIM: Final[int] = 2**31  # exclusive
_MAX_COUNTER: Final[int] = 2**63  # exclusive, so round/step fit an int64 anywhere
_MAX_U32: Final[int] = 2**32 - 1
# msgpack limits str length in bytes; the longest schema string is 256 chars of up to
# 4 UTF-8 bytes each. Anything longer is refused by the unpacker before it is allocated.
_MAX_STR_BYTES: Final[int] = 4 * _MAX_TENSOR_NAME_CHARS
_BODY_KEYS: Final[frozenset[str]] = frozenset({"v", "kind", "sender", "round", "step", "meta", "tensors"})
# Containers may nest this deep, the body map being level 1. The schema needs 4 (body, tensors,
# one tensor entry, its shape); anything deeper is refused as malformed before the schema checks.
MAX_NESTING: Final[int] = 8

# "auto" compression: small frames are not worth the lz4 call; larger ones are judged
# on a sample from the middle of the body (the start is msgpack keys and names).
_AUTO_MIN_BODY: Final[int] = 4 * 1024
_AUTO_SAMPLE: Final[int] = 64 * 1024
_AUTO_MAX_RATIO: Final[float] = 0.9

_LITTLE_ENDIAN_HOST: Final[bool] = sys.byteorder == "little"

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
        return cls(dtype=_dtype_name(tensor.dtype), shape=tuple(tensor.shape))


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

    Tensors of a decoded frame are read-only views of the received bytes (no copy); torch
    warns once ("The given buffer is not writable") when it creates them. Clone a tensor
    before writing to it in place.
    """

    kind: str
    sender: str
    round: int
    step: int
    meta: Mapping[str, MetaValue] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- encoding


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
    _check_kind(frame.kind)
    _check_sender(frame.sender)
    _check_counter("round", frame.round)
    _check_counter("step", frame.step)
    _check_meta(frame.meta)
    if not isinstance(frame.tensors, Mapping):
        raise FrameSchemaError("tensors must be a mapping of name to tensor")

    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    # The body is built as a list of pieces so that tensor memory is copied exactly once,
    # by the final join. Small pieces are packed by msgpack itself.
    parts: list[bytes | memoryview] = [
        packer.pack_map_header(len(_BODY_KEYS)),
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
        _check_tensor_name(name)
        if not isinstance(tensor, torch.Tensor):
            raise FrameSchemaError(f"tensor {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided:
            raise FrameSchemaError(f"tensor {name!r} has layout {tensor.layout}; only dense")
        dtype_name = _dtype_name(tensor.dtype)
        shape = tuple(tensor.shape)
        _check_shape(name, shape)
        data = _tensor_bytes(tensor)
        parts += [
            packer.pack_array_header(4),
            packer.pack(name),
            packer.pack(dtype_name),
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
            return _HEADER.pack(MAGIC, PROTOCOL_VERSION, FLAG_LZ4, body_len) + compressed
    return b"".join([_HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, body_len), *parts])


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's little-endian C-contiguous bytes, without a copy when already so."""
    flat = tensor.detach().to("cpu", copy=False).contiguous().reshape(-1)
    if not _LITTLE_ENDIAN_HOST:
        flat = _swap_bytes(flat)
    # Viewing as uint8 also covers bfloat16, which numpy cannot represent.
    return flat.view(torch.uint8).numpy().data


def _swap_bytes(flat: torch.Tensor) -> torch.Tensor:
    """Reverse the byte order of every element of a 1-d contiguous tensor (copies)."""
    itemsize = flat.element_size()
    if itemsize == 1:
        return flat
    as_bytes = flat.view(torch.uint8).reshape(-1, itemsize)  # (numel, itemsize)
    return as_bytes.flip(1).contiguous().reshape(-1).view(flat.dtype)


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


# --------------------------------------------------------------------------- decoding


class _DuplicateKeyError(Exception):
    """A msgpack map repeated a key; raised from inside the unpacker."""


@dataclass(frozen=True, slots=True)
class _Extension:
    """A msgpack extension value (any type code): never valid in a frame, refused by the schema."""

    code: int


def _extension(code: int, data: bytes) -> _Extension:
    # msgpack's default hook (ExtType) raises for codes outside 0..127, which would make some
    # extensions a format error and others a schema error; one marker type keeps them all schema.
    return _Extension(code)


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # A repeated key would let two decoders disagree on a frame's meaning; refuse it.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKeyError
    return result


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    limits: Limits,
    known_senders: Container[str] | None = None,
    expected: Mapping[str, TensorSpec] | None = None,
) -> Frame:
    """Parse and validate one frame received from the network.

    Checks run cheapest-first: frame size, header, declared body size, decompression,
    msgpack, nesting depth, the body's ``v``, the rest of the schema, dtype allow-list, byte
    counts, ``expected`` names/dtypes/shapes, ``known_senders``, and finally that
    floating-point tensors are finite (docs/PROTOCOL.md section 1.3 numbers them).

    Raises only :class:`~p2pdl.errors.FrameError` subclasses. The returned tensors are
    read-only views of ``data`` when it is ``bytes`` (immutable, so nothing can change them),
    and of a private copy otherwise, never of a buffer the caller may reuse.
    """
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if view.nbytes > limits.max_frame_bytes:
        raise FrameTooLargeError(f"frame is {view.nbytes} bytes; max_frame_bytes is {limits.max_frame_bytes}")
    if not isinstance(data, bytes):
        view = memoryview(view.tobytes())  # the tensors will view this private copy
    body = _read_body(view, limits)
    obj = _unpack(body, limits)
    frame = _check_body(obj, limits)

    if expected is not None:
        _check_expected(frame.tensors, expected)
    if known_senders is not None and frame.sender not in known_senders:
        raise UnknownSenderError(f"sender {frame.sender!r} is not a known peer")
    for name, tensor in frame.tensors.items():
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise NonFiniteError(f"tensor {name!r} contains NaN or Inf")
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
    magic, version, flags, declared = _HEADER.unpack_from(view)
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


def _unpack(body: bytes | memoryview, limits: Limits) -> object:
    size = len(body) if isinstance(body, bytes) else body.nbytes
    # Every container element or byte takes at least one byte of input, so bounds derived
    # from the body size stop a short buffer from declaring a huge length. Schema limits
    # (tensor count, meta size) are checked afterwards with typed errors.
    options: dict[str, Any] = {
        "raw": False,
        "strict_map_key": True,
        "use_list": True,
        "object_pairs_hook": _unique_map,
        "max_str_len": min(size, _MAX_STR_BYTES),
        "max_bin_len": size,
        "max_array_len": size,
        "max_map_len": size // 2,
        "max_ext_len": size,
        "ext_hook": _extension,
    }
    obj = _unpack_in_place(memoryview(body), limits, options)
    if obj is None:
        try:
            obj = msgpack.unpackb(body, **options)
        except _DuplicateKeyError as exc:
            raise FrameSchemaError("a msgpack map repeats a key") from exc
        except Exception as exc:  # ValueError, StackError, UnicodeDecodeError, TypeError, ...
            raise FrameFormatError(f"bad msgpack body: {type(exc).__name__}: {exc}") from exc
    _check_nesting(obj)
    return obj


def _check_nesting(obj: object) -> None:
    """Refuse containers nested deeper than MAX_NESTING (FrameFormatError); no recursion."""
    if not isinstance(obj, dict | list):
        return
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                if depth >= MAX_NESTING:
                    raise FrameFormatError(f"msgpack containers nested more than {MAX_NESTING} deep")
                stack.append((child, depth + 1))


class _NotCanonical(Exception):
    """The in-place walk met something it leaves to the plain msgpack path."""


# msgpack lead bytes whose object has a fixed size, and the size-prefixed ones:
# lead byte -> (bytes in the length field, bytes after the length that are not counted by it).
_FIXED_SIZE: Final[Mapping[int, int]] = {
    0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,
    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18,
}  # fmt: skip
_SIZED: Final[Mapping[int, tuple[int, int]]] = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext: the type byte follows the length
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str
}  # fmt: skip
_CONTAINERS: Final[Mapping[int, tuple[int, int]]] = {
    0xDC: (2, 1), 0xDD: (4, 1),  # array: length field bytes, objects per element
    0xDE: (2, 2), 0xDF: (4, 2),  # map
}  # fmt: skip


def _unpack_in_place(body: memoryview, limits: Limits, options: Mapping[str, Any]) -> object | None:
    """Decode a body of the usual shape with each tensor's data as a view of ``body``.

    Returns what ``msgpack.unpackb(body, **options)`` would, except that each tensor entry's
    ``bin`` is a memoryview slice instead of a copy; or None whenever the body strays from
    ``{..., "tensors": [[name, dtype, shape, bin], ...], ...}`` in any way (bad msgpack
    included), so the caller decodes it the plain way and raises the usual error.
    """
    size = body.nbytes
    # Legitimate bodies need a few objects per tensor; a bound keeps hostile ones from making
    # this pure-Python walk slow (they go to msgpack's C decoder instead).
    budget = [64 + 2 * _MAX_META_ENTRIES + 16 * limits.max_tensors]

    def skip(start: int) -> int:
        """The end offset of the object that starts at ``start``."""
        position, pending = start, 1
        while pending:
            budget[0] -= 1
            if budget[0] < 0 or position >= size:
                raise _NotCanonical
            lead = body[position]
            pending -= 1
            if lead <= 0x7F or lead >= 0xE0:  # fixint
                position += 1
            elif lead <= 0x8F:  # fixmap
                pending += 2 * (lead & 0x0F)
                position += 1
            elif lead <= 0x9F:  # fixarray
                pending += lead & 0x0F
                position += 1
            elif lead <= 0xBF:  # fixstr
                position += 1 + (lead & 0x1F)
            elif lead in _FIXED_SIZE:
                position += _FIXED_SIZE[lead]
            elif lead in _SIZED:
                width, extra = _SIZED[lead]
                position += 1 + width + extra + _read_length(position + 1, width)
            elif lead in _CONTAINERS:
                width, per_element = _CONTAINERS[lead]
                pending += per_element * _read_length(position + 1, width)
                position += 1 + width
            else:  # 0xC1, never used
                raise _NotCanonical
        if position > size:
            raise _NotCanonical
        return position

    def _read_length(start: int, width: int) -> int:
        if start + width > size:
            raise _NotCanonical
        return int.from_bytes(body[start : start + width], "big")

    def header(start: int, fixed_base: int, wide: tuple[int, int]) -> tuple[int, int]:
        """(count, offset after the header) of a map (0x80) or array (0x90) header."""
        if start >= size:
            raise _NotCanonical
        lead = body[start]
        if fixed_base <= lead <= fixed_base + 0x0F:
            return lead & 0x0F, start + 1
        for lead_byte, width in zip(wide, (2, 4), strict=True):
            if lead == lead_byte:
                return _read_length(start + 1, width), start + 1 + width
        raise _NotCanonical

    def plain(start: int, end: int) -> Any:
        return msgpack.unpackb(body[start:end], **options)

    def tensor_entries(start: int) -> tuple[list[list[Any]], int]:
        count, position = header(start, 0x90, (0xDC, 0xDD))
        if count > limits.max_tensors:
            raise _NotCanonical
        entries: list[list[Any]] = []
        for _ in range(count):
            fields, position = header(position, 0x90, (0xDC, 0xDD))
            if fields != 4:
                raise _NotCanonical
            entry: list[Any] = []
            for _ in range(3):  # name, dtype, shape
                end = skip(position)
                entry.append(plain(position, end))
                position = end
            if position >= size or body[position] not in (0xC4, 0xC5, 0xC6):
                raise _NotCanonical
            width = _SIZED[body[position]][0]
            length = _read_length(position + 1, width)
            position += 1 + width
            if position + length > size:
                raise _NotCanonical
            entry.append(body[position : position + length])
            position += length
            entries.append(entry)
        return entries, position

    try:
        count, position = header(0, 0x80, (0xDE, 0xDF))
        pairs: list[tuple[Any, Any]] = []
        for _ in range(count):
            end = skip(position)
            key = plain(position, end)
            if type(key) is not str:
                raise _NotCanonical
            if key == "tensors":
                value, position = tensor_entries(end)
            else:
                position = skip(end)
                value = plain(end, position)
            pairs.append((key, value))
        if position != size:
            raise _NotCanonical
        return _unique_map(pairs)
    except (_NotCanonical, _DuplicateKeyError):
        return None
    except Exception:  # msgpack's own errors on a piece: the plain path reports them
        return None


def _check_body(obj: object, limits: Limits) -> Frame:
    if type(obj) is not dict:
        raise FrameSchemaError(f"body is a {type(obj).__name__}, not a map")
    version = obj.get("v")
    # First, so that a body of another version is reported as such whatever its other keys.
    if type(version) is int and version != PROTOCOL_VERSION:
        raise FrameVersionError(f"body version {version}; this peer speaks {PROTOCOL_VERSION}")
    keys = set(obj)
    if keys != _BODY_KEYS:
        missing = sorted(map(str, _BODY_KEYS - keys))
        extra = sorted(map(repr, keys - _BODY_KEYS))
        raise FrameSchemaError(f"body keys wrong: missing {missing}, extra {extra}")
    if type(version) is not int:
        raise FrameSchemaError(f"v is a {type(version).__name__}, not an int")
    kind, sender, round_, step = obj["kind"], obj["sender"], obj["round"], obj["step"]
    _check_kind(kind)
    _check_sender(sender)
    _check_counter("round", round_)
    _check_counter("step", step)
    meta = obj["meta"]
    if type(meta) is not dict:
        raise FrameSchemaError(f"meta is a {type(meta).__name__}, not a map")
    _check_meta(meta)

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
        _check_tensor_name(name)
        if name in names:
            raise FrameSchemaError(f"tensor name {name!r} repeated")
        names.add(name)
        if type(dtype_name) is not str:
            raise FrameSchemaError(f"tensor {name!r}: dtype is not a str")
        if type(shape) is not list or not all(type(d) is int for d in shape):
            raise FrameSchemaError(f"tensor {name!r}: shape is not an array of ints")
        _check_shape(name, tuple(shape))
        if type(data) is not bytes and type(data) is not memoryview:  # memoryview: see _unpack_in_place
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
    if not _LITTLE_ENDIAN_HOST:
        flat = _swap_bytes(flat)
    return flat.reshape(shape)


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
        dtype_name = _DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
        got = TensorSpec(dtype=dtype_name, shape=tuple(tensor.shape))
        if got != spec:
            raise ShapeMismatchError(
                f"tensor {name!r}: got {got.dtype}{list(got.shape)}, expected {spec.dtype}{list(spec.shape)}"
            )


# --------------------------------------------------------------------------- schema checks
# Used by both sides: the encoder refuses what the decoder would refuse.


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise DtypeNotAllowedError(f"dtype {dtype} is not in the wire allow-list") from None


def _check_kind(kind: object) -> None:
    if type(kind) is not str or _KIND_RE.fullmatch(kind) is None:
        raise FrameSchemaError(f"kind {kind!r} must match [a-z][a-z0-9_]{{0,31}}")


def _check_sender(sender: object) -> None:
    if type(sender) is not str or not 1 <= len(sender) <= _MAX_SENDER_CHARS:
        raise FrameSchemaError(f"sender {sender!r:.80} must be a str of 1..64 chars")


def _check_counter(field_name: str, value: object) -> None:
    # type() rather than isinstance(): bool is an int subclass and must not pass.
    if type(value) is not int or not 0 <= value < _MAX_COUNTER:
        raise FrameSchemaError(f"{field_name} {value!r:.40} must be an int in [0, 2**63)")


def _check_meta(meta: object) -> None:
    if not isinstance(meta, Mapping):
        raise FrameSchemaError("meta must be a map")
    if len(meta) > _MAX_META_ENTRIES:
        raise FrameSchemaError(f"meta has {len(meta)} entries; at most {_MAX_META_ENTRIES}")
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


def _check_tensor_name(name: object) -> None:
    if type(name) is not str or not 1 <= len(name) <= _MAX_TENSOR_NAME_CHARS:
        raise FrameSchemaError(f"tensor name {name!r:.80} must be a str of 1..256 chars")


_MAX_EXTENT = 2**40


def _check_shape(name: str, shape: tuple[int, ...]) -> None:
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
