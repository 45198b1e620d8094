"""Tests for p2pdl.wire: round trips, every rejection path, and fuzzing of hostile input.

Every test runs on both receive paths (the module-scoped ``receive_path`` fixture): the bytes a
WebSocket message or ``POST /frames`` body arrives as, and a frame stream's writable receive
buffer decoded in place (``decode_frame(owned=True)``, :mod:`p2pdl.net.stream`). The in-place
path must give the same values and refuse every frame the bytes path refuses, for the same reason.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import lz4.block
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pdl.errors import (
    DtypeNotAllowedError,
    FrameError,
    FrameFormatError,
    FrameSchemaError,
    FrameTooLargeError,
    FrameVersionError,
    NonFiniteError,
    ShapeMismatchError,
    UnknownSenderError,
)
from p2pdl.wire import ALLOWED_DTYPES, HEADER_SIZE, Frame, Limits, TensorSpec, decode_frame, encode_frame
from p2pdl.wire.frame import FLAG_LZ4, PROTOCOL_VERSION, swap_bytes
from p2pdl.wire.unpack import MAX_NESTING, _Extension, _extension, _unpack_in_place, unpack_body

LIMITS = Limits(max_frame_bytes=64 * 2**20, max_decompressed_bytes=64 * 2**20)
FLAGS_OFFSET = 3

_decode_bytes = decode_frame
# Tests about how the bytes path treats the caller's buffer (aliasing, copies): not the stream's path.
_BYTES_PATH_ONLY = {
    "test_decoded_tensors_do_not_alias_the_input_buffer",
    "test_decoded_tensors_view_immutable_input_without_a_copy",
}


def _decode_owned(data: bytes | bytearray | memoryview, **kwargs: Any) -> Frame:
    """The frame stream's receive path: the bytes in a writable receive buffer, decoded in place."""
    source = memoryview(data).cast("B")
    buffer = np.empty(source.nbytes, dtype=np.uint8)
    buffer[:] = np.frombuffer(source, dtype=np.uint8)
    return _decode_bytes(memoryview(buffer.data), owned=True, **kwargs)


@pytest.fixture(scope="module", params=["bytes", "owned_buffer"], autouse=True)
def receive_path(request: pytest.FixtureRequest) -> Any:
    """Rebinds this module's ``decode_frame`` to the in-place path for the second run of every test."""
    if request.param == "bytes":
        yield request.param
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(globals(), "decode_frame", _decode_owned)
        yield request.param


@pytest.fixture(autouse=True)
def _skip_bytes_path_only(receive_path: str, request: pytest.FixtureRequest) -> None:
    if receive_path == "owned_buffer" and request.function.__name__ in _BYTES_PATH_ONLY:
        pytest.skip("about the bytes path's copy of a caller's mutable buffer")


def _frame(**tensors: torch.Tensor) -> Frame:
    return Frame(kind="grad", sender="peer-a", round=3, step=7, tensors=tensors)


def _wrap(
    body: bytes,
    *,
    magic: bytes = b"P2",
    version: int = PROTOCOL_VERSION,
    flags: int = 0,
    declared: int | None = None,
) -> bytes:
    length = len(body) if declared is None else declared
    return struct.pack("<2sBBI", magic, version, flags, length) + body


def _body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": "grad",
        "sender": "peer-a",
        "round": 1,
        "step": 2,
        "meta": {},
        "tensors": [["w", "float32", [2], struct.pack("<2f", 1.0, 2.0)]],
    }
    body.update(overrides)
    return body


def _packed(obj: object) -> bytes:
    return _wrap(msgpack.packb(obj, use_bin_type=True))


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype_name", sorted(ALLOWED_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4)])
def test_round_trip_every_dtype_and_shape(dtype_name: str, shape: tuple[int, ...]) -> None:
    tensor = _sample(ALLOWED_DTYPES[dtype_name], shape)
    decoded = decode_frame(encode_frame(_frame(t=tensor)), limits=LIMITS)
    out = decoded.tensors["t"]
    assert out.dtype == tensor.dtype
    assert out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_round_trip_fields_meta_and_order() -> None:
    meta = {"lr": 0.25, "n": -(2**63), "big": 2**64 - 1, "tag": "ü" * 256, "ok": True, "x": None}
    tensors = {name: torch.full((2,), float(i)) for i, name in enumerate(["z", "a", "m"])}
    frame = Frame(kind="all_reduce_1", sender="p" * 64, round=2**63 - 1, step=0, meta=meta)
    frame = Frame(kind=frame.kind, sender=frame.sender, round=frame.round, step=0, meta=meta, tensors=tensors)
    decoded = decode_frame(encode_frame(frame), limits=LIMITS, known_senders={"p" * 64})
    assert (decoded.kind, decoded.sender, decoded.round, decoded.step) == (
        "all_reduce_1",
        "p" * 64,
        2**63 - 1,
        0,
    )
    assert dict(decoded.meta) == meta
    assert type(decoded.meta["ok"]) is bool
    assert list(decoded.tensors) == ["z", "a", "m"]


def test_round_trip_no_tensors_and_non_contiguous_input() -> None:
    assert decode_frame(encode_frame(_frame()), limits=LIMITS).tensors == {}
    transposed = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    sliced = torch.arange(20, dtype=torch.int64)[::3]
    decoded = decode_frame(encode_frame(_frame(a=transposed, b=sliced)), limits=LIMITS)
    assert torch.equal(decoded.tensors["a"], transposed)
    assert torch.equal(decoded.tensors["b"], sliced)


def test_decoded_tensors_do_not_alias_the_input_buffer() -> None:
    buffer = bytearray(encode_frame(_frame(t=torch.ones(4)), compression="never"))
    decoded = decode_frame(memoryview(buffer), limits=LIMITS)
    buffer[:] = bytes(len(buffer))
    assert torch.equal(decoded.tensors["t"], torch.ones(4))


def test_decoded_tensors_view_immutable_input_without_a_copy() -> None:
    encoded = encode_frame(_frame(t=torch.arange(1000, dtype=torch.float32)), compression="never")
    decoded = decode_frame(encoded, limits=LIMITS)
    address = memoryview(encoded).cast("B")  # where the bytes object's data lives
    start = torch.frombuffer(address, dtype=torch.uint8).data_ptr()
    assert start < decoded.tensors["t"].data_ptr() < start + len(encoded)
    assert torch.equal(decoded.tensors["t"], torch.arange(1000, dtype=torch.float32))


def test_an_owned_buffer_is_viewed_in_place_with_identical_values() -> None:
    values = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    encoded = encode_frame(_frame(t=values, i=torch.arange(7)), compression="never")
    buffer = np.frombuffer(bytearray(encoded), dtype=np.uint8)
    decoded = _decode_bytes(memoryview(buffer.data), limits=LIMITS, owned=True)
    start = buffer.ctypes.data
    assert start < decoded.tensors["t"].data_ptr() < start + len(encoded)  # no copy
    assert torch.equal(decoded.tensors["t"], values) and torch.equal(decoded.tensors["i"], torch.arange(7))
    assert torch.equal(decoded.tensors["t"], _decode_bytes(encoded, limits=LIMITS).tensors["t"])


def test_tensor_spec_of_tensor() -> None:
    spec = TensorSpec.of_tensor(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert spec == TensorSpec(dtype="bfloat16", shape=(2, 3))
    with pytest.raises(DtypeNotAllowedError):
        TensorSpec.of_tensor(torch.zeros(2, dtype=torch.complex64))


def test_swap_bytes_reverses_each_element() -> None:
    ints = torch.tensor([1, 2], dtype=torch.int32)
    assert swap_bytes(ints).tolist() == [2**24, 2**25]
    halves = torch.randn(7).to(torch.bfloat16)
    assert torch.equal(swap_bytes(swap_bytes(halves)), halves)


# --------------------------------------------------------------------------- compression


def _flags(encoded: bytes) -> int:
    return encoded[FLAGS_OFFSET]


def test_auto_leaves_random_fp32_uncompressed() -> None:
    weights = torch.randn(64 * 1024)
    encoded = encode_frame(_frame(w=weights))
    assert _flags(encoded) == 0
    assert torch.equal(decode_frame(encoded, limits=LIMITS).tensors["w"], weights)


def test_auto_compresses_low_entropy_int8() -> None:
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-3, 4, (64 * 1024,), generator=gen, dtype=torch.int8)
    encoded = encode_frame(_frame(q=codes))
    assert _flags(encoded) == FLAG_LZ4
    assert len(encoded) < codes.numel()
    assert torch.equal(decode_frame(encoded, limits=LIMITS).tensors["q"], codes)


def test_auto_never_compresses_small_bodies() -> None:
    assert _flags(encode_frame(_frame(z=torch.zeros(512, dtype=torch.int8)))) == 0


def test_always_and_never() -> None:
    zeros = torch.zeros(1000)
    always = encode_frame(_frame(z=zeros), compression="always")
    never = encode_frame(_frame(z=zeros), compression="never")
    assert _flags(always) == FLAG_LZ4
    assert _flags(never) == 0
    assert len(always) < len(never)
    for encoded in (always, never):
        assert torch.equal(decode_frame(encoded, limits=LIMITS).tensors["z"], zeros)
    # "always" still sends a body raw when lz4 would not shrink it.
    assert _flags(encode_frame(_frame(), compression="always")) == 0


# --------------------------------------------------------------------------- encode refusals


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"kind": "Grad"}, FrameSchemaError),
        ({"kind": "grad\n"}, FrameSchemaError),
        ({"kind": "g" * 33}, FrameSchemaError),
        ({"sender": ""}, FrameSchemaError),
        ({"sender": "s" * 65}, FrameSchemaError),
        ({"round": -1}, FrameSchemaError),
        ({"step": True}, FrameSchemaError),
        ({"round": 2**63}, FrameSchemaError),
        ({"meta": {"k": [1]}}, FrameSchemaError),
        ({"meta": {"k": 2**64}}, FrameSchemaError),
        ({"meta": {"k" * 65: 1}}, FrameSchemaError),
        ({"meta": {str(i): i for i in range(65)}}, FrameSchemaError),
        ({"tensors": {"": torch.zeros(1)}}, FrameSchemaError),
        ({"tensors": {"c": torch.zeros(1, dtype=torch.complex64)}}, DtypeNotAllowedError),
        ({"tensors": {"b": torch.zeros(1, dtype=torch.bool)}}, DtypeNotAllowedError),
        ({"tensors": {"d": torch.zeros([1] * 9)}}, FrameSchemaError),
        ({"tensors": {"s": torch.zeros(2, 2).to_sparse()}}, FrameSchemaError),
    ],
)
def test_encode_refuses_what_decode_would(fields: dict[str, Any], error: type[Exception]) -> None:
    base: dict[str, Any] = {"kind": "grad", "sender": "a", "round": 0, "step": 0}
    with pytest.raises(error):
        encode_frame(Frame(**(base | fields)))


# --------------------------------------------------------------------------- decode refusals


def test_frame_over_max_frame_bytes_is_refused_first() -> None:
    encoded = encode_frame(_frame(t=torch.zeros(100)))
    tight = Limits(max_frame_bytes=len(encoded) - 1, max_decompressed_bytes=2**30)
    with pytest.raises(FrameTooLargeError):
        decode_frame(encoded, limits=tight)
    # Checked before the header: even garbage of that size gets the size error.
    with pytest.raises(FrameTooLargeError):
        decode_frame(b"\xff" * len(encoded), limits=tight)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", FrameFormatError),
        (b"P2\x01\x00\x00\x00\x00", FrameFormatError),  # 7-byte header
        (_wrap(b"\x80", magic=b"XX"), FrameFormatError),
        (_wrap(b"\x80", flags=0x02), FrameFormatError),
        (_wrap(b"\x80", flags=0x80 | FLAG_LZ4), FrameFormatError),
        (_wrap(b"\x80", version=2), FrameVersionError),
        (_wrap(b"\x80", version=0), FrameVersionError),
        (_wrap(b"\x80\x00"), FrameFormatError),  # trailing byte after the map
        (_wrap(b"\x80", declared=2), FrameFormatError),  # body shorter than declared
        (_wrap(b"\x80\x80", declared=1), FrameFormatError),  # body longer than declared
    ],
)
def test_bad_header(data: bytes, error: type[FrameError]) -> None:
    with pytest.raises(error):
        decode_frame(data, limits=LIMITS)


def test_lz4_bomb_is_refused_before_decompressing() -> None:
    bomb = lz4.block.compress(bytes(2**20), store_size=False)  # ~4 KiB of "1 MiB of zeros"
    with pytest.raises(FrameTooLargeError):
        decode_frame(_wrap(bomb, flags=FLAG_LZ4, declared=2**32 - 1), limits=LIMITS)
    small = Limits(max_frame_bytes=2**20, max_decompressed_bytes=2**19)
    with pytest.raises(FrameTooLargeError):
        decode_frame(_wrap(bomb, flags=FLAG_LZ4, declared=2**20), limits=small)


def test_lz4_declared_size_must_be_exact() -> None:
    encoded = encode_frame(_frame(z=torch.zeros(1000)), compression="always")
    payload = encoded[HEADER_SIZE:]
    (declared,) = struct.unpack_from("<I", encoded, 4)
    for wrong in (declared - 1, declared + 1):
        with pytest.raises(FrameFormatError):
            decode_frame(_wrap(payload, flags=FLAG_LZ4, declared=wrong), limits=LIMITS)


@pytest.mark.parametrize("payload", [b"", b"\xff" * 64, b"\xf0" + b"\x00" * 20])
def test_corrupt_lz4(payload: bytes) -> None:
    with pytest.raises(FrameFormatError):
        decode_frame(_wrap(payload, flags=FLAG_LZ4, declared=1000), limits=LIMITS)


def test_corrupted_lz4_frame() -> None:
    encoded = bytearray(encode_frame(_frame(z=torch.zeros(1000)), compression="always"))
    encoded[HEADER_SIZE:] = b"\xff" * (len(encoded) - HEADER_SIZE)
    with pytest.raises(FrameFormatError):
        decode_frame(bytes(encoded), limits=LIMITS)


def test_random_bytes() -> None:
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(2))
    with pytest.raises(FrameFormatError):
        decode_frame(noise.to(torch.uint8).numpy().tobytes(), limits=LIMITS)
    with pytest.raises(FrameFormatError):
        decode_frame(_wrap(b"\xc1"), limits=LIMITS)  # 0xc1 is never valid msgpack


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2, 3],
        "grad",
        {k: v for k, v in _body().items() if k != "meta"},
        _body(extra=1),
        _body(round=True),
        _body(step=1.0),
        _body(round=-1),
        _body(round=2**63),
        _body(v="1"),
        _body(kind="BAD"),
        _body(kind=""),
        _body(sender=""),
        _body(sender=b"peer-a"),
        _body(meta=[]),
        _body(meta={"k": [1]}),
        _body(meta={"k": {"a": 1}}),
        _body(meta={"k": b"bin"}),
        _body(meta={b"k": 1}),
        _body(meta={"k": "x" * 257}),
        _body(meta={str(i): i for i in range(65)}),
        _body(tensors={}),
        _body(tensors=[["w", "float32", [2]]]),
        _body(tensors=[("w", "float32", [2], "not-bin")]),
        _body(tensors=[["w", "float32", [True], b"\x00" * 4]]),
        _body(tensors=[["w", "float32", [-1], b""]]),
        _body(tensors=[["w", "float32", [2**31], b""]]),
        _body(tensors=[["w", "float32", [1] * 9, b"\x00" * 4]]),
        _body(tensors=[["", "float32", [0], b""]]),
        _body(tensors=[["w", 5, [0], b""]]),
        _body(tensors=[["w", "float32", [0], b""], ["w", "float32", [0], b""]]),
        _body(tensors=[["w", "float32", [2], b"\x00" * 7]]),
        _body(tensors=[["w", "float32", [3, 0], b"\x00" * 4]]),
    ],
)
def test_schema_violations(obj: object) -> None:
    with pytest.raises(FrameSchemaError):
        decode_frame(_packed(obj), limits=LIMITS)


def test_too_many_tensors() -> None:
    entries = [[f"t{i}", "uint8", [0], b""] for i in range(5)]
    limits = Limits(max_frame_bytes=2**20, max_decompressed_bytes=2**20, max_tensors=4)
    with pytest.raises(FrameSchemaError):
        decode_frame(_packed(_body(tensors=entries)), limits=limits)
    decode_frame(_packed(_body(tensors=entries[:4])), limits=limits)


def test_body_version_mismatch() -> None:
    with pytest.raises(FrameVersionError):
        decode_frame(_packed(_body(v=2)), limits=LIMITS)


@pytest.mark.parametrize(
    "obj",
    [{"v": 2}, _body(v=2, kind="NOT A KIND"), _body(v=0, tensors="x"), {"v": 7, "extra": 1}],
    ids=["only-v", "bad-kind", "bad-tensors", "extra-key"],
)
def test_body_version_is_checked_before_the_rest_of_the_schema(obj: dict[str, Any]) -> None:
    # A body of another version may have another shape: it is reported as a version mismatch.
    with pytest.raises(FrameVersionError):
        decode_frame(_packed(obj), limits=LIMITS)


@pytest.mark.parametrize("v", [True, 1.0, "1", None])
def test_a_body_version_that_is_not_an_int_is_a_schema_error(v: object) -> None:
    with pytest.raises(FrameSchemaError):
        decode_frame(_packed(_body(v=v)), limits=LIMITS)


def test_ext_types_are_refused() -> None:
    with pytest.raises(FrameSchemaError):
        decode_frame(_packed(_body(meta={"k": msgpack.ExtType(5, b"xyz")})), limits=LIMITS)
    with pytest.raises(FrameSchemaError):
        decode_frame(_packed(msgpack.ExtType(1, b"")), limits=LIMITS)
    timestamp = msgpack.Timestamp(seconds=1)
    with pytest.raises(FrameSchemaError):
        decode_frame(_packed(_body(round=timestamp)), limits=LIMITS)


def _ext(code: int, data: bytes) -> bytes:
    """A msgpack ext8 value with any type code, negative ones included (ExtType allows 0..127)."""
    return bytes([0xC7, len(data), code & 0xFF]) + data


@pytest.mark.parametrize(
    ("code", "data"),
    [(-128, b"x"), (-2, b""), (-1, bytes(4)), (-1, bytes(8)), (-1, bytes(12)), (0, b"x"), (127, bytes(200))],
)
def test_every_extension_type_is_a_schema_error(code: int, data: bytes) -> None:
    with pytest.raises(FrameSchemaError):
        decode_frame(_wrap(_body_with_meta_bytes(b"\x81\xa1k" + _ext(code, data))), limits=LIMITS)
    assert _extension(code, data) == _Extension(code)


@pytest.mark.parametrize("length", [0, 3, 5, 16])
def test_a_malformed_timestamp_extension_is_a_format_error(length: int) -> None:
    # Type -1 is msgpack's own timestamp: 4, 8 or 12 data bytes, anything else is not msgpack.
    with pytest.raises(FrameFormatError):
        decode_frame(_wrap(_body_with_meta_bytes(b"\x81\xa1k" + _ext(-1, bytes(length)))), limits=LIMITS)


def _nested_tensors(depth: int) -> bytes:
    """A body whose containers nest ``depth`` deep: body map, then ``tensors`` as nested arrays."""
    body = msgpack.packb(_body(tensors=[]))
    assert body.endswith(b"\xa7tensors\x90")
    return body[:-1] + b"\x91" * (depth - 2) + b"\x90"


def test_nesting_up_to_the_limit_reaches_the_schema_checks_and_deeper_is_a_format_error() -> None:
    assert MAX_NESTING == 8
    with pytest.raises(FrameSchemaError):
        decode_frame(_wrap(_nested_tensors(MAX_NESTING)), limits=LIMITS)
    for depth in (MAX_NESTING + 1, 1024, 1025, 5000):
        with pytest.raises(FrameFormatError, match=r"nested|StackError"):
            decode_frame(_wrap(_nested_tensors(depth)), limits=LIMITS)
    # Wide is fine, only deep is refused: the legitimate maximum is 4 (body, tensors, entry, shape).
    frame = _frame(**{f"t{i}": torch.ones(1, 1, 1, 1, 1, 1, 1, 1) for i in range(64)})
    assert len(decode_frame(encode_frame(frame), limits=LIMITS).tensors) == 64


def test_duplicate_keys_are_refused() -> None:
    body = msgpack.packb(_body(), use_bin_type=True)
    # Bump the fixmap count by one and repeat "step" at the end.
    duplicated = bytes([body[0] + 1]) + body[1:] + msgpack.packb("step") + msgpack.packb(9)
    with pytest.raises(FrameSchemaError):
        decode_frame(_wrap(duplicated), limits=LIMITS)


def _body_with_meta_bytes(meta: bytes) -> bytes:
    body = _body(tensors=[])
    pieces = [b"\x87"]
    for key, value in body.items():
        pieces.append(msgpack.packb(key))
        pieces.append(meta if key == "meta" else msgpack.packb(value))
    return b"".join(pieces)


def test_deeply_nested_msgpack() -> None:
    nested = b"\x81" + msgpack.packb("x") + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(FrameFormatError):
        decode_frame(_wrap(_body_with_meta_bytes(nested)), limits=LIMITS)


@pytest.mark.parametrize(
    "declaration",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 of 2**32-1 elements
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xdb\xff\xff\xff\xff",  # str32
        b"\xc9\xff\xff\xff\xff\x05",  # ext32
    ],
)
def test_huge_declared_lengths_in_a_short_buffer(declaration: bytes) -> None:
    with pytest.raises(FrameFormatError):
        decode_frame(_wrap(declaration + b"\x00" * 16), limits=LIMITS)
    with pytest.raises(FrameFormatError):
        decode_frame(_wrap(_body_with_meta_bytes(declaration)), limits=LIMITS)


def test_huge_tensor_data_length_in_a_short_buffer() -> None:
    body = msgpack.packb(_body(tensors=[["w", "uint8", [4], b"\x00" * 4]]), use_bin_type=True)
    lied = body.replace(b"\xc4\x04", b"\xc6\xff\xff\xff\xff", 1)
    with pytest.raises(FrameFormatError):
        decode_frame(_wrap(lied), limits=LIMITS)


@pytest.mark.parametrize("dtype_name", ["complex64", "object", "bool", "float8_e4m3fn", ""])
def test_dtype_not_allowed(dtype_name: str) -> None:
    obj = _body(tensors=[["w", dtype_name, [1], b"\x00" * 8]])
    with pytest.raises(DtypeNotAllowedError):
        decode_frame(_packed(obj), limits=LIMITS)


def test_expected_specs() -> None:
    encoded = encode_frame(_frame(w=torch.zeros(2, 3), b=torch.zeros(3)))
    good = {
        "w": TensorSpec(dtype="float32", shape=(2, 3)),
        "b": TensorSpec.of_tensor(torch.ones(3)),
    }
    decode_frame(encoded, limits=LIMITS, expected=good)
    wrong = [
        {"w": good["w"]},  # unexpected "b"
        good | {"c": good["b"]},  # missing "c"
        good | {"w": TensorSpec(dtype="float32", shape=(3, 2))},
        good | {"w": TensorSpec(dtype="float32", shape=(6,))},
        good | {"b": TensorSpec(dtype="float16", shape=(3,))},
    ]
    for expected in wrong:
        with pytest.raises(ShapeMismatchError):
            decode_frame(encoded, limits=LIMITS, expected=expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(dtype: torch.dtype, bad: float) -> None:
    tensor = torch.tensor([1.0, bad, 3.0], dtype=dtype)
    encoded = encode_frame(_frame(ok=torch.ones(2), t=tensor))
    with pytest.raises(NonFiniteError):
        decode_frame(encoded, limits=LIMITS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_at_every_position(dtype: torch.dtype) -> None:
    # Vectorised reductions handle the tail separately; a NaN must be seen anywhere.
    for position in range(67):
        for bad in (float("nan"), float("inf"), float("-inf")):
            tensor = torch.zeros(67, dtype=dtype)
            tensor[position] = bad
            with pytest.raises(NonFiniteError):
                decode_frame(encode_frame(_frame(t=tensor)), limits=LIMITS)


def test_unknown_sender() -> None:
    encoded = encode_frame(_frame(t=torch.ones(2)))
    decode_frame(encoded, limits=LIMITS, known_senders={"peer-a"})
    with pytest.raises(UnknownSenderError):
        decode_frame(encoded, limits=LIMITS, known_senders={"peer-b"})


def test_checks_run_in_documented_order() -> None:
    # Wrong shape, unknown sender and NaN at once: the sender comes first, then finiteness, and
    # the expected names and shapes last (PROTOCOL §1.3, the order a peer's receive path applies).
    encoded = encode_frame(_frame(t=torch.tensor([float("nan")])))
    expected = {"t": TensorSpec(dtype="float32", shape=(2,))}
    with pytest.raises(UnknownSenderError):
        decode_frame(encoded, limits=LIMITS, known_senders=set(), expected=expected)
    with pytest.raises(NonFiniteError):
        decode_frame(encoded, limits=LIMITS, known_senders={"peer-a"}, expected=expected)
    with pytest.raises(ShapeMismatchError):
        decode_frame(encode_frame(_frame(t=torch.ones(1))), limits=LIMITS, expected=expected)
    # A disallowed dtype is reported before a byte-count mismatch in an earlier tensor.
    obj = _body(tensors=[["a", "float32", [2], b""], ["b", "complex64", [1], b""]])
    with pytest.raises(DtypeNotAllowedError):
        decode_frame(_packed(obj), limits=LIMITS)


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
_VALID = [
    encode_frame(
        Frame(
            kind="grad",
            sender="peer-a",
            round=1,
            step=2,
            meta={"lr": 0.1, "tag": "x"},
            tensors={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "q": torch.ones(3)},
        ),
        compression="never",
    ),
    encode_frame(_frame(z=torch.zeros(2048, dtype=torch.int8)), compression="always"),
]


def _decode_or_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode_frame(data, limits=LIMITS, known_senders={"peer-a"})


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=256),
        st.binary(max_size=256).map(lambda tail: b"P2\x01" + tail),
        st.binary(max_size=256).map(lambda tail: b"P2\x01\x00" + struct.pack("<I", len(tail)) + tail),
    )
)
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _decode_or_frame_error(data)


@FUZZ
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_fuzz_mutated_valid_frame(valid: bytes, mutations: list[tuple[int, int]], truncate_at: int | None) -> None:
    data = bytearray(valid)
    for position, value in mutations:
        data[position % len(data)] = value
    _decode_or_frame_error(bytes(data[:truncate_at]))


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_OBJECTS = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=8), children, max_size=5),
    ),
    max_leaves=20,
)
_TENSOR_ENTRIES = st.lists(
    st.one_of(
        _OBJECTS,
        st.tuples(
            st.text(max_size=4),
            st.sampled_from([*ALLOWED_DTYPES, "complex64"]),
            st.lists(st.integers(-2, 4), max_size=3),
            st.binary(max_size=64),
        ).map(list),
    ),
    max_size=4,
)
_NEAR_VALID_BODIES = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(PROTOCOL_VERSION), _SCALARS),
        "kind": st.one_of(st.just("grad"), _SCALARS),
        "sender": st.one_of(st.just("peer-a"), _SCALARS),
        "round": st.one_of(st.integers(0, 3), _SCALARS),
        "step": st.one_of(st.integers(0, 3), _SCALARS),
        "meta": st.one_of(st.dictionaries(st.text(max_size=4), _SCALARS, max_size=4), _OBJECTS),
        "tensors": st.one_of(_TENSOR_ENTRIES, _OBJECTS),
    }
)


@FUZZ
@given(st.one_of(_OBJECTS, _NEAR_VALID_BODIES), st.booleans())
def test_fuzz_msgpack_objects_in_valid_header(obj: object, compress: bool) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    if compress:
        data = _wrap(lz4.block.compress(body, store_size=False), flags=FLAG_LZ4, declared=len(body))
    else:
        data = _wrap(body)
    _decode_or_frame_error(data)


def _plain_or_error(body: bytes) -> object:
    try:
        return msgpack.unpackb(body, **_unpack_options(len(body)))
    except Exception as exc:
        return type(exc)


def _unpack_options(size: int) -> dict[str, Any]:  # mirrors wire.unpack.unpack_body's options
    return {
        "raw": False,
        "strict_map_key": True,
        "use_list": True,
        "max_str_len": min(size, 1024),
        "max_bin_len": size,
        "max_array_len": size,
        "max_map_len": size // 2,
        "max_ext_len": size,
        "ext_hook": _extension,
    }


def _ext_as_list(obj: object) -> object:
    if isinstance(obj, _Extension):
        return ["ext", obj.code]
    raise TypeError(f"cannot pack {type(obj).__name__}")


def _same(a: object, b: object) -> bool:
    """Equal as msgpack values (NaN included)."""
    if isinstance(b, type):
        return False
    pack = msgpack.Packer(use_bin_type=True, default=_ext_as_list)
    return bool(pack.pack(a) == pack.pack(b))


def _as_bytes(obj: object) -> object:
    if isinstance(obj, memoryview):
        return obj.tobytes()
    if isinstance(obj, list):
        return [_as_bytes(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _as_bytes(v) for k, v in obj.items()}
    return obj


@FUZZ
@given(
    st.one_of(st.sampled_from(_VALID).map(lambda f: f[HEADER_SIZE:]), _NEAR_VALID_BODIES.map(msgpack.packb)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_in_place_walk_agrees_with_msgpack(body: bytes, mutations: list[tuple[int, int]], cut: int | None) -> None:
    mutated = bytearray(body)
    for position, value in mutations:
        mutated[position % len(mutated)] = value
    data = bytes(mutated[:cut])
    walked = _unpack_in_place(memoryview(data), LIMITS, {**_unpack_options(len(data)), "object_pairs_hook": dict})
    if walked is not None:
        # Whatever the walk accepts, msgpack decodes to the same thing (bins as bytes).
        assert _same(_as_bytes(walked), _plain_or_error(data))
    # And the decoder's combined result is what the plain path alone would give.
    try:
        combined: object = _as_bytes(unpack_body(data, LIMITS))
    except FrameError as exc:
        combined = type(exc)
    if not isinstance(combined, type):
        assert _same(combined, _plain_or_error(data))


def test_in_place_walk_takes_every_valid_uncompressed_frame() -> None:
    for frame in _VALID:
        if not _flags(frame) & FLAG_LZ4:
            body = memoryview(frame)[HEADER_SIZE:]
            walked = _unpack_in_place(body, LIMITS, _unpack_options(body.nbytes))
            assert isinstance(walked, dict) and walked.keys() >= {"tensors"}
            assert all(isinstance(entry[3], memoryview) for entry in walked["tensors"])
