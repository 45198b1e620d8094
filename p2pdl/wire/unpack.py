"""The msgpack step of decoding: a frame body to Python objects, with tensor data left in place.

The unpacker's limits are derived from the body's size (every element takes at least a byte of
input, so a short buffer cannot declare a huge length), maps may not repeat a key, extensions
become a marker the schema refuses, and containers may nest at most :data:`MAX_NESTING` deep.

The trade-off is a second, hand-written decoder. Decoding the usual body shape walks the
msgpack structure by hand just far enough to find each tensor's ``bin`` and returns it as a
slice of the body instead of a copy (everything else is still decoded by msgpack). Any body the
walk does not recognise, or that would make the pure-Python walk slow, goes through the plain
``msgpack.unpackb`` path instead, so hostile input meets exactly the same checks and errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from p2pdl.errors import FrameFormatError, FrameSchemaError
from p2pdl.wire.frame import Limits
from p2pdl.wire.schema import MAX_META_ENTRIES, MAX_STR_BYTES

__all__ = ["MAX_NESTING", "unpack_body"]

# Containers may nest this deep, the body map being level 1. The schema needs 4 (body, tensors,
# one tensor entry, its shape); anything deeper is refused as malformed before the schema checks.
MAX_NESTING: Final[int] = 8


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


def unpack_body(body: bytes | memoryview, limits: Limits) -> object:
    """The body as msgpack objects (tensor data as slices of ``body`` when it can); FrameFormatError or
    FrameSchemaError when it is not valid msgpack, repeats a map key or nests too deep."""
    size = len(body) if isinstance(body, bytes) else body.nbytes
    # Every container element or byte takes at least one byte of input, so bounds derived
    # from the body size stop a short buffer from declaring a huge length. Schema limits
    # (tensor count, meta size) are checked afterwards with typed errors.
    options: dict[str, Any] = {
        "raw": False,
        "strict_map_key": True,
        "use_list": True,
        "object_pairs_hook": _unique_map,
        "max_str_len": min(size, MAX_STR_BYTES),
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
    budget = [64 + 2 * MAX_META_ENTRIES + 16 * limits.max_tensors]

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
