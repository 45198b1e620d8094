"""Frame streams (p2pdl.net.stream) between real Transports on 127.0.0.1: the fast receive path.

Large frames go over each link's frame stream both ways and arrive with the values that were
sent, in receive buffers reused across rounds; a frame of the wrong shape is refused and counted
as on every other path; a record the stream cannot read (length 0 or over ``max_frame_bytes``)
is counted and closes the stream only, after which large frames go over ``POST /frames`` and
the WebSocket again; ``GET /stream`` without the link's token is refused. ``broadcast`` encodes a
frame once however many neighbours it goes to.

Large tensors are sent from their own memory (no copy): the record on the wire is byte for byte
the copied frame's; a send returns only once the kernel has every byte, so a buffer rewritten right
after a send is never sent changed; a send cancelled while some of its bytes still wait in the
transport aborts the stream, so the receiver never gets a record with changed bytes. These run on
both asyncio's loop and uvloop, whose gathered write is the one that really sends in place. The
hostile payload suite over a stream is in tests/test_hostile.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from helpers import free_ports
from tls_util import make_ca, make_peer_cert

import p2pdl.net.transport as transport_module
from p2pdl.config import TransportConfig
from p2pdl.errors import FrameSchemaError
from p2pdl.net.auth import PeerSecurity, client_ssl_context, server_ssl_context
from p2pdl.net.http import SENDER_HEADER, TOKEN_HEADER
from p2pdl.net.stream import RECORD_PREFIX, STREAM_PATH, UPGRADE, BufferPool, upgrade_request
from p2pdl.net.transport import Transport
from p2pdl.wire import EncodedFrame, Frame, TensorSpec, encode_frame

CHUNK = 300_000  # float32 values per frame: 1.2 MB, far above the 64 KiB stream threshold
# float32 values of a frame larger than what loopback TCP buffers while its receiver does not read
# (net.ipv4.tcp_wmem's 4 MiB cap on the sender, the receiver's unread window), so part of it waits
# in the sender's transport until the receiver reads again.
LARGE = 4 * 2**20
MIB = 1024 * 1024
LOOPS = ["asyncio", "uvloop"]


def expected_tensors(kind: str, sender: str) -> Mapping[str, TensorSpec]:
    if kind == "big":
        return {"chunk": TensorSpec(dtype="float32", shape=(LARGE,))}
    if kind not in ("rs2", "ag2"):
        raise FrameSchemaError(f"no frames of kind {kind!r} here")
    return {"chunk": TensorSpec(dtype="float32", shape=(CHUNK,))}


def run_on(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` on asyncio's own loop or on uvloop (the CLI's)."""
    factory = pytest.importorskip("uvloop").new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (a counter or link state: nothing to wait on) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def swarm(
    names: tuple[str, ...] = ("a", "b"), *, tls: tuple[Path, Path, Path] | None = None, max_frame_mib: float = 4.0
) -> AsyncIterator[dict[str, Transport]]:
    """Fully linked Transports (TLS with ``tls`` = (ca, cert, key)); every link's frame stream is up on both ends."""
    ports = free_ports(len(names))
    addresses = {n: f"127.0.0.1:{p}" for n, p in zip(names, ports, strict=True)}
    config = TransportConfig(max_frame_mib=max_frame_mib, handshake_timeout=5.0)
    transports = {
        n: Transport(
            name=n,
            listen_host="127.0.0.1",
            listen_port=p,
            addresses=addresses,
            config=config,
            expected_tensors=expected_tensors,
            status=dict,
            security=security(n, tls),
        )
        for n, p in zip(names, ports, strict=True)
    }
    async with contextlib.AsyncExitStack() as stack:
        for name, transport in transports.items():
            transport.set_neighbors([n for n in names if n != name])
            await stack.enter_async_context(transport)
        for transport in transports.values():
            assert await transport.wait_connected(10.0) == ()
        await wait_for(lambda: all(lk.stream is not None for t in transports.values() for lk in t._links.values()))
        yield transports


def security(name: str, tls: tuple[Path, Path, Path] | None) -> PeerSecurity:
    if tls is None:
        return PeerSecurity(name=name)
    ca, cert, key = tls
    return PeerSecurity(
        name=name,
        server_ssl=server_ssl_context(cert, key, ca, require_client_cert=True),
        client_ssl=client_ssl_context(ca, cert, key),
    )


def chunk_frame(sender: str, round_index: int, values: torch.Tensor) -> Frame:
    return Frame(kind="rs2", sender=sender, round=round_index, step=round_index, tensors={"chunk": values})


def test_a_buffer_is_reused_only_once_nothing_views_it() -> None:
    pool = BufferPool(keep=2)
    first = pool.take(1000)
    address = torch.frombuffer(first, dtype=torch.uint8).data_ptr()
    held = torch.frombuffer(first[10:20], dtype=torch.uint8)  # a frame's tensor viewing the buffer
    del first
    second = pool.take(1000)
    assert pool.allocations == 2  # the first is still viewed: never overwritten
    del held, second
    third = pool.take(1000)
    assert pool.allocations == 2 and torch.frombuffer(third, dtype=torch.uint8).data_ptr() == address
    del third
    pool.take(10)  # another size: a new buffer, and the pool keeps at most 2
    assert pool.allocations == 3


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_large_frames_go_over_the_stream_both_ways_with_identical_values_into_reused_buffers(
    tls: bool, tmp_path: Path
) -> None:
    certificates = None
    if tls:
        ca = make_ca(tmp_path)
        certificates = (ca[0], *make_peer_cert(tmp_path, ca, "swarm"))
    async with swarm(tls=certificates) as peers:
        a, b = peers["a"], peers["b"]
        generator = torch.Generator().manual_seed(13)
        rounds = 4
        for round_index in range(rounds):
            sent = {n: torch.randn(CHUNK, generator=generator) for n in ("a", "b")}
            await asyncio.gather(
                a.send("b", chunk_frame("a", round_index, sent["a"])),
                b.send("a", chunk_frame("b", round_index, sent["b"])),
            )
            got_b = await b.collect("rs2", round_index, ["a"], 10.0)
            got_a = await a.collect("rs2", round_index, ["b"], 10.0)
            assert torch.equal(got_b["a"].tensors["chunk"], sent["a"])
            assert torch.equal(got_a["b"].tensors["chunk"], sent["b"])
            del got_a, got_b  # the strategy is done with the round: the buffers are free again
        for me, other in ((a, "b"), (b, "a")):
            assert me.stats.stream_frames_sent == rounds and me.stats.stream_frames_received == rounds
            stream = me._links[other].stream
            assert stream is not None and stream.records_received == rounds
            assert stream.pool.allocations == 1, "one receive buffer, reused every round"
            assert sum(me.stats.frames_rejected.values()) == 0


async def test_a_frame_of_the_wrong_shape_over_the_stream_is_refused_and_counted() -> None:
    async with swarm() as peers:
        a, b = peers["a"], peers["b"]
        # Random values: lz4 leaves them as they are, so every frame is over the stream threshold.
        await a.send("b", chunk_frame("a", 0, torch.randn(CHUNK + 1)))  # a wrong size
        await b.send("a", chunk_frame("b", 0, torch.randn(CHUNK, dtype=torch.float64)))  # a wrong dtype
        await wait_for(lambda: b.stats.frames_rejected["shape"] == 1 and a.stats.frames_rejected["shape"] == 1)
        assert b.stats.stream_frames_received == 0 and a.stats.stream_frames_received == 0
        # Both links and streams stay up, and the next good frame arrives.
        good = torch.randn(CHUNK)
        await a.send("b", chunk_frame("a", 1, good))
        got = await b.collect("rs2", 1, ["a"], 10.0)
        assert torch.equal(got["a"].tensors["chunk"], good)
        assert b.stats.stream_frames_received == 1


@pytest.mark.parametrize(("declared", "reason"), [(0, "format"), (4 * MIB + 1, "too_large"), (2**32 - 1, "too_large")])
async def test_an_unreadable_record_closes_only_the_stream_and_frames_fall_back(declared: int, reason: str) -> None:
    async with swarm() as peers:
        a, b = peers["a"], peers["b"]
        stream = a._links["b"].stream
        assert stream is not None and stream._transport is not None
        stream._transport.write(RECORD_PREFIX.pack(declared))  # a broken sender, by hand
        await wait_for(lambda: b.stats.frames_rejected[reason] == 1)
        await wait_for(lambda: a._links["b"].stream is None and b._links["a"].stream is None)
        assert a.is_connected("b") and b.is_connected("a")
        await a.send("b", chunk_frame("a", 0, torch.randn(CHUNK)))  # now over POST /frames
        await b.send("a", chunk_frame("b", 0, torch.randn(CHUNK)))  # now over the WebSocket
        assert (await b.collect("rs2", 0, ["a"], 10.0)).keys() == {"a"}
        assert (await a.collect("rs2", 0, ["b"], 10.0)).keys() == {"b"}
        assert a.stats.stream_frames_sent == 0 and b.stats.stream_frames_sent == 0


async def test_get_stream_without_the_links_token_is_refused_403_and_counted() -> None:
    async with swarm() as peers, aiohttp.ClientSession() as session:
        b = peers["b"]
        url = f"http://127.0.0.1:{b.port}{STREAM_PATH}"
        headers = {"Connection": "Upgrade", "Upgrade": UPGRADE, SENDER_HEADER: "a", TOKEN_HEADER: "0" * 32}
        async with session.get(url, headers=headers) as response:
            assert response.status == 403
        assert b.stats.frames_rejected["unknown_sender"] == 1
        # The upgrade request the dialer writes carries no line break from a header value.
        with pytest.raises(ValueError, match="line break"):
            upgrade_request("b", {SENDER_HEADER: "a\r\nX-Evil: 1"})


async def test_broadcast_encodes_a_frame_once_for_every_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Frame] = []
    on_thread, on_loop = transport_module.encode_frame_parts, transport_module.encode_frame_parts_inline

    def counting(frame: Frame, **kwargs: Any) -> EncodedFrame:
        calls.append(frame)
        return on_thread(frame, **kwargs)

    def counting_inline(frame: Frame, **kwargs: Any) -> EncodedFrame | None:
        calls.append(frame)
        return on_loop(frame, **kwargs)

    monkeypatch.setattr(transport_module, "encode_frame_parts", counting)
    monkeypatch.setattr(transport_module, "encode_frame_parts_inline", counting_inline)
    async with swarm(("a", "b", "c")) as peers:
        values = torch.randn(CHUNK, generator=torch.Generator().manual_seed(3))
        frame = Frame(kind="ag2", sender="a", round=0, step=0, tensors={"chunk": values})
        calls.clear()  # the handshakes encode their hellos elsewhere; count from here
        assert await peers["a"].broadcast(frame, ["b", "c"]) == {}
        assert calls == [frame], "one encode for two destinations"
        for name in ("b", "c"):
            got = await peers[name].collect("ag2", 0, ["a"], 10.0)
            assert torch.equal(got["a"].tensors["chunk"], values)


def stream_transport(peer: Transport, other: str) -> asyncio.Transport:
    stream = peer._links[other].stream
    assert stream is not None and stream._transport is not None
    return stream._transport


def shrink_kernel_buffers(sender: asyncio.Transport, receiver: asyncio.Transport) -> None:
    """Cap both sockets' kernel buffers (which also stops their autotuning) far below LARGE's
    bytes, so a paused receiver holds a large record in the sender's transport on any kernel."""
    sender.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    receiver.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_zero_copy_record_is_byte_for_byte_the_copied_frame(loop: str) -> None:
    async def scenario() -> None:
        async with swarm() as peers:
            a, b = peers["a"], peers["b"]
            records: list[bytes] = []
            original = b._on_bytes

            async def capture(link: Any, data: Any, **kwargs: Any) -> None:
                records.append(bytes(data))
                await original(link, data, **kwargs)

            b._on_bytes = capture  # type: ignore[method-assign]
            values = torch.randn(CHUNK, generator=torch.Generator().manual_seed(5))
            zero_copy, copied = chunk_frame("a", 0, values), chunk_frame("a", 1, values)
            await a.send("b", zero_copy)  # the chunk's own memory
            await a.send_encoded("b", encode_frame(copied))  # a copy, as before zero-copy sends
            await wait_for(lambda: b.stats.stream_frames_received == 2)
            assert records == [encode_frame(zero_copy), encode_frame(copied)]
            assert a.stats.stream_frames_sent == 2
            assert sum(b.stats.frames_rejected.values()) == 0

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_buffer_rewritten_as_soon_as_its_send_returns_arrives_unchanged(loop: str) -> None:
    async def scenario() -> None:
        async with swarm(max_frame_mib=32.0) as peers:
            a, b = peers["a"], peers["b"]
            sender, receiver = stream_transport(a, "b"), stream_transport(b, "a")
            shrink_kernel_buffers(sender, receiver)
            buffer = torch.empty(LARGE)  # reused every round, as the all-reduce's wire buffers are
            generator = torch.Generator().manual_seed(11)
            for round_index in range(2):
                values = torch.randn(LARGE, generator=generator)
                buffer.copy_(values)
                receiver.pause_reading()
                send = asyncio.create_task(
                    a.send("b", Frame(kind="big", sender="a", round=round_index, step=0, tensors={"chunk": buffer}))
                )
                # Part of the record waits in the sender's transport: the send must not be over.
                await wait_for(lambda: sender.get_write_buffer_size() > 0)
                await asyncio.sleep(0.05)
                assert not send.done()
                receiver.resume_reading()
                await send
                buffer.fill_(-1.0)  # the next round's values, written the moment the send returns
                got = await b.collect("big", round_index, ["a"], 10.0)
                assert torch.equal(got["a"].tensors["chunk"], values), f"round {round_index} arrived changed"
                del got
            assert a.stats.stream_frames_sent == 2 and sum(b.stats.frames_rejected.values()) == 0

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_send_cancelled_before_its_bytes_left_aborts_the_stream_and_never_delivers_changed_bytes(loop: str) -> None:
    async def scenario() -> None:
        async with swarm(max_frame_mib=32.0) as peers:
            a, b = peers["a"], peers["b"]
            sender, receiver = stream_transport(a, "b"), stream_transport(b, "a")
            shrink_kernel_buffers(sender, receiver)
            buffer = torch.randn(LARGE, generator=torch.Generator().manual_seed(12))
            receiver.pause_reading()
            send = asyncio.create_task(
                a.send("b", Frame(kind="big", sender="a", round=0, step=0, tensors={"chunk": buffer}))
            )
            await wait_for(lambda: sender.get_write_buffer_size() > 0)
            send.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await send
            buffer.fill_(-1.0)  # the caller owns its memory again once the send is over, cancelled or not
            receiver.resume_reading()
            await wait_for(lambda: a._links["b"].stream is None and b._links["a"].stream is None)
            assert await b.collect("big", 0, ["a"], 0.3) == {}, "no record with changed bytes, nor any"
            assert sum(b.stats.frames_rejected.values()) == 0 and b.stats.stream_frames_received == 0
            # The link stays up, and the next frame goes over POST /frames, intact.
            values = torch.randn(LARGE, generator=torch.Generator().manual_seed(13))
            buffer.copy_(values)
            await a.send("b", Frame(kind="big", sender="a", round=1, step=0, tensors={"chunk": buffer}))
            got = await b.collect("big", 1, ["a"], 10.0)
            assert torch.equal(got["a"].tensors["chunk"], values)
            assert a.is_connected("b") and a.stats.stream_frames_sent == 0

    run_on(loop, scenario)
