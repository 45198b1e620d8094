"""The zero-copy encoding of large frames (p2pdl.wire.encode.encode_frame_parts) and the exact round on it.

A frame encoded as pieces concatenates to exactly the bytes of the copying encoder and of the
layout docs/PROTOCOL.md §1 specifies (so any peer decodes it); large contiguous tensors are pieces
that view their own memory, everything else (small tensors, non-contiguous ones, a body lz4
compresses) is copied. Real Peers on 127.0.0.1 running exact all-reduce rounds over frame streams
with these pieces end bit-identical to the rank-order mean, round after round, while every round
rewrites the same wire buffers. The stream-level checks (a send returns only once the kernel has
its bytes; a cancelled send never delivers changed bytes) are in tests/test_wire_stream.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from helpers import free_ports

from p2pdl import Peer
from p2pdl.config import config_from_mapping
from p2pdl.errors import FrameSchemaError
from p2pdl.wire import EncodedFrame, Frame, Limits, decode_frame, encode_frame, encode_frame_parts
from p2pdl.wire.encode import BORROW_MIN_BYTES, encode_frame_parts_inline
from p2pdl.wire.frame import FLAG_LZ4, HEADER, MAGIC, PROTOCOL_VERSION, dtype_name

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
LIMITS = Limits(max_frame_bytes=64 * 2**20, max_decompressed_bytes=64 * 2**20)
BIG = BORROW_MIN_BYTES // 4 * 3  # float32 values: three times the size that is sent in place


def reference_bytes(frame: Frame) -> bytes:
    """The uncompressed frame exactly as PROTOCOL.md §1 lays it out, built with plain msgpack."""
    body = {
        "v": PROTOCOL_VERSION,
        "kind": frame.kind,
        "sender": frame.sender,
        "round": frame.round,
        "step": frame.step,
        "meta": dict(frame.meta),
        "tensors": [
            [name, dtype_name(t.dtype), list(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()]
            for name, t in frame.tensors.items()
        ],
    }
    packed = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, len(packed)) + packed


def frame_of(**tensors: torch.Tensor) -> Frame:
    return Frame(kind="rs4", sender="p0", round=7, step=3, meta={"group": "e1:p0,p1", "x": 0.5}, tensors=tensors)


def random(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)


FRAMES: dict[str, Callable[[], Frame]] = {
    "one_large_chunk": lambda: frame_of(chunk=random(BIG)),
    "a_view_into_a_flat_buffer": lambda: frame_of(chunk=random(4 * BIG)[BIG : 2 * BIG]),
    "large_and_small_mixed": lambda: frame_of(
        a=random(BIG), b=random(3), c=random(2, BIG, dtype=torch.bfloat16), d=torch.tensor(2.5), e=torch.zeros(0)
    ),
    "only_small_tensors": lambda: frame_of(w=random(16, 16), b=random(16), i=torch.arange(5)),
    "non_contiguous_large": lambda: frame_of(t=random(BIG // 64, 128).t()),
    "no_tensors": lambda: frame_of(),
}


@pytest.mark.parametrize("make", FRAMES.values(), ids=FRAMES.keys())
def test_the_pieces_concatenate_to_the_copied_frame_and_the_documented_layout(make: Callable[[], Frame]) -> None:
    frame = make()
    parts = encode_frame_parts(frame, compression="never")
    joined = b"".join(parts.pieces)
    assert joined == encode_frame(frame, compression="never") == reference_bytes(frame)
    assert len(parts) == len(joined) and parts.join() == joined
    # "auto" finds random values incompressible: the same bytes as "never".
    assert b"".join(encode_frame_parts(frame, compression="auto").pieces) == joined
    decoded = decode_frame(joined, limits=LIMITS)
    assert decoded.tensors.keys() == frame.tensors.keys()
    for name, tensor in frame.tensors.items():
        assert torch.equal(decoded.tensors[name], tensor)


def test_a_large_contiguous_tensor_is_a_piece_of_its_own_memory() -> None:
    flat = random(4 * BIG)
    chunk = flat[BIG : 2 * BIG]  # as the all-reduce sends chunk r of its flat wire buffer
    parts = encode_frame_parts(frame_of(chunk=chunk), compression="never")
    assert parts.borrowed
    assert len(parts.pieces) == 2, "the header and msgpack framing, then the chunk itself"
    head, data = parts.pieces
    assert isinstance(head, bytes) and isinstance(data, memoryview)
    assert data.nbytes == chunk.numel() * 4
    assert np.frombuffer(data, dtype=np.uint8).ctypes.data == chunk.data_ptr(), "a view, not a copy"
    chunk.fill_(3.0)  # so the pieces change with the tensor, until joined
    joined = parts.join()
    chunk.fill_(-1.0)
    assert torch.equal(decode_frame(joined, limits=LIMITS).tensors["chunk"], torch.full((BIG,), 3.0))
    assert parts.join() is joined


@pytest.mark.parametrize(
    "tensors",
    [
        {"small": random(16, 16)},  # below BORROW_MIN_BYTES: copied into the framing
        {"transposed": random(BIG // 64, 128).t()},  # made contiguous: a private copy
        {"double_view": random(BIG).to(torch.float64)[::2]},
    ],
    ids=["small", "non_contiguous", "strided"],
)
def test_tensors_that_need_a_copy_anyway_are_not_borrowed(tensors: dict[str, torch.Tensor]) -> None:
    parts = encode_frame_parts(frame_of(**tensors), compression="never")
    assert not parts.borrowed
    before = parts.join()
    for tensor in tensors.values():
        tensor.fill_(0.0)
    assert b"".join(parts.pieces) == before


def test_a_body_lz4_compresses_keeps_the_copying_path() -> None:
    zeros = torch.zeros(BIG)
    for compression in ("auto", "always"):
        parts = encode_frame_parts(frame_of(z=zeros), compression=compression)  # type: ignore[arg-type]
        assert len(parts.pieces) == 1 and not parts.borrowed
        (only,) = parts.pieces
        assert isinstance(only, bytes) and only[3] == FLAG_LZ4 and len(only) < zeros.numel() * 4
        assert only == encode_frame(frame_of(z=zeros), compression=compression)  # type: ignore[arg-type]
        zeros.fill_(1.0)  # compressed: the bytes are a copy
        assert torch.equal(decode_frame(only, limits=LIMITS).tensors["z"], torch.zeros(BIG))
        zeros.zero_()


def test_the_event_loop_encodes_only_what_is_cheap_and_gets_the_same_bytes() -> None:
    in_place = frame_of(chunk=random(4 * BIG)[BIG : 2 * BIG], small=random(8, 8).t())
    cheap = encode_frame_parts_inline(in_place, compression="auto", max_copy_bytes=1024)
    assert cheap is not None and cheap.borrowed
    assert cheap.join() == encode_frame(in_place)
    never = encode_frame_parts_inline(in_place, compression="never", max_copy_bytes=0)
    assert never is None, "the small transposed tensor needs a copy, over a limit of 0 bytes"
    # lz4 (a compressible body, or "always") and large copies go to a thread instead.
    assert encode_frame_parts_inline(frame_of(z=torch.zeros(BIG)), compression="auto", max_copy_bytes=2**30) is None
    assert encode_frame_parts_inline(in_place, compression="always", max_copy_bytes=2**30) is None
    transposed = frame_of(t=random(BIG // 64, 128).t())
    size = transposed.tensors["t"].numel() * 4
    assert encode_frame_parts_inline(transposed, compression="never", max_copy_bytes=size - 1) is None
    copied = encode_frame_parts_inline(transposed, compression="never", max_copy_bytes=size)
    assert copied is not None and not copied.borrowed and copied.join() == reference_bytes(transposed)
    with pytest.raises(FrameSchemaError):
        encode_frame_parts_inline(frame_of(**{"": random(3)}), compression="never", max_copy_bytes=0)


# --------------------------------------------------------------------------- exact rounds, real peers

WORLD = 3
ROUNDS = 4


def run_on(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` on asyncio's own loop or on uvloop (the CLI's, whose writev sends in place)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(scenario())
    else:
        with asyncio.Runner() as runner:
            runner.run(scenario())


def seeded_grads(model: torch.nn.Module, rank: int, round_index: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * round_index + rank)
    return [torch.randn(p.shape, generator=generator) for p in model.parameters()]


def rank_order_mean(model: torch.nn.Module, round_index: int) -> list[torch.Tensor]:
    per_rank = [seeded_grads(model, r, round_index) for r in range(WORLD)]
    means = []
    for position in range(len(per_rank[0])):
        out = per_rank[0][position].clone()
        for rank in range(1, WORLD):
            out.add_(per_rank[rank][position])
        means.append(out.div_(WORLD))
    return means


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_exact_rounds_over_zero_copy_frames_are_bit_identical_to_the_rank_order_mean(loop: str) -> None:
    # nn.Linear(346, 346), 120,062 values: each of 3 chunks is 40,021 float32 (160 KB), above BORROW_MIN_BYTES.
    features = 346
    names = [f"p{r}" for r in range(WORLD)]
    ports = free_ports(WORLD)
    config = config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py"), "eval_every": 0},
            "strategy": {"kind": "allreduce", "round_timeout": 10.0},
            "transport": {"startup_timeout": 20.0},
            "topology": {"kind": "full"},
            "peers": [{"name": n, "address": f"127.0.0.1:{p}"} for n, p in zip(names, ports, strict=True)],
        }
    )

    async def scenario() -> None:
        models = []
        for _ in names:
            torch.manual_seed(0)
            models.append(torch.nn.Linear(features, features))
        peers = [
            Peer(config, n, m, torch.optim.SGD(m.parameters(), lr=0.1))  # type: ignore[arg-type]
            for n, m in zip(names, models, strict=True)
        ]
        encoded: list[EncodedFrame] = []
        for peer in peers:
            original = peer.transport.encode_parts

            async def recording(frame: Frame, original: Any = original) -> EncodedFrame:
                result: EncodedFrame = await original(frame)
                if frame.tensors:
                    encoded.append(result)
                return result

            peer.transport.encode_parts = recording  # type: ignore[method-assign]
        try:
            await asyncio.gather(*(p.start() for p in peers))
            deadline = time.monotonic() + 20.0
            while not all(lk.stream is not None for p in peers for lk in p.transport._links.values()):
                assert time.monotonic() < deadline, "frame streams did not come up"
                await asyncio.sleep(0.02)
            for round_index in range(ROUNDS):
                for rank, model in enumerate(models):
                    for p, g in zip(model.parameters(), seeded_grads(model, rank, round_index), strict=True):
                        p.grad = g
                outcomes = await asyncio.gather(*(p.strategy.reduce_gradients(round_index) for p in peers))
                assert all(o is not None and o.complete for o in outcomes), outcomes
                expected = rank_order_mean(models[0], round_index)
                for model in models:
                    for p, e in zip(model.parameters(), expected, strict=True):
                        assert p.grad is not None and torch.equal(p.grad, e), f"round {round_index}"
            # Every chunk went over a frame stream as a view of the wire buffer, never a copy.
            # Per round and peer: one frame per other member's chunk, then its average once for all.
            assert len(encoded) == ROUNDS * WORLD * WORLD
            assert all(e.borrowed for e in encoded)
            sent = sum(p.transport.stats.stream_frames_sent for p in peers)
            assert sent == ROUNDS * WORLD * 2 * (WORLD - 1)
            assert all(sum(p.transport.stats.frames_rejected.values()) == 0 for p in peers)
        finally:
            await asyncio.gather(*(p.close() for p in peers))

    run_on(loop, scenario)
