"""The wire format: frames, their encoding and every receiver check. Pure: no I/O, no asyncio.

:mod:`~p2pdl.wire.frame` (the frame and its byte layout), :mod:`~p2pdl.wire.schema` (rules
both ends enforce), :mod:`~p2pdl.wire.encode`, :mod:`~p2pdl.wire.decode` and
:mod:`~p2pdl.wire.unpack` (the msgpack step of decoding).
"""

from p2pdl.wire.decode import decode_frame
from p2pdl.wire.encode import EncodedFrame, encode_frame, encode_frame_parts
from p2pdl.wire.frame import ALLOWED_DTYPES, HEADER_SIZE, Frame, Limits, TensorSpec
from p2pdl.wire.schema import check_tensors

__all__ = [
    "ALLOWED_DTYPES",
    "HEADER_SIZE",
    "EncodedFrame",
    "Frame",
    "Limits",
    "TensorSpec",
    "check_tensors",
    "decode_frame",
    "encode_frame",
    "encode_frame_parts",
]
