"""Transport shutdown is best effort against a dropped connection, but never swallows its own cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from p2pdl.config import TransportConfig
from p2pdl.errors import FrameSchemaError
from p2pdl.net.links import Link
from p2pdl.net.transport import Transport


def refuse(kind: str, sender: str) -> Any:
    raise FrameSchemaError("no frames in this test")


class DroppedSocket:
    """What aiohttp does when the other side drops first: the pending drain is cancelled."""

    closed = False

    async def send_bytes(self, data: bytes) -> None:
        raise asyncio.CancelledError

    async def close(self) -> None:
        raise asyncio.CancelledError


class HangingSocket:
    closed = False

    async def send_bytes(self, data: bytes) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        await asyncio.Event().wait()


def transport_with(socket: object, shutdown_timeout: float) -> Transport:
    transport = Transport(
        name="a",
        listen_host="127.0.0.1",
        listen_port=0,
        addresses={"b": "127.0.0.1:9"},
        config=TransportConfig(shutdown_timeout=shutdown_timeout),
        expected_tensors=refuse,
        status=dict,
    )
    transport._links["b"] = Link(name="b", address="127.0.0.1:9", dials=False, state="connected", ws=socket)  # type: ignore[arg-type]
    return transport


async def test_close_completes_when_aiohttp_cancels_the_socket_writes() -> None:
    transport = transport_with(DroppedSocket(), shutdown_timeout=1.0)
    await transport.close(announce=True)  # the bye and the close both meet a CancelledError: no raise


async def test_close_is_bounded_by_the_shutdown_timeout() -> None:
    transport = transport_with(HangingSocket(), shutdown_timeout=0.2)
    async with asyncio.timeout(5):
        await transport.close(announce=True)


async def test_cancelling_close_still_cancels() -> None:
    transport = transport_with(HangingSocket(), shutdown_timeout=30.0)
    task = asyncio.ensure_future(transport.close(announce=True))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_closing_mid_handshake_closes_the_dialled_socket() -> None:
    """A peer that closes while its dial waits for the HELLO reply closes that WebSocket (no leaked connection).

    Dropped rather than closed, the socket still ends when the session closes, but aiohttp's
    connection object is left unreleased and warns when collected: the acceptor sees no close frame.
    """
    from aiohttp import web

    opened = asyncio.Event()
    closed = asyncio.Event()
    codes: list[int | None] = []

    async def silent_acceptor(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the HELLO: the dialer now waits for a reply that never comes
        opened.set()
        async for _ in ws:  # ends when the dialer closes
            pass
        codes.append(ws.close_code)
        closed.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", silent_acceptor)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        transport = Transport(
            name="a",  # sorts first: a dials b
            listen_host="127.0.0.1",
            listen_port=0,
            addresses={"b": f"127.0.0.1:{port}"},
            config=TransportConfig(handshake_timeout=30.0, shutdown_timeout=5.0),
            expected_tensors=refuse,
            status=dict,
        )
        await transport.start()
        transport.set_neighbors(["b"])
        try:
            async with asyncio.timeout(10):
                await opened.wait()
        finally:
            await transport.close(announce=False)
        async with asyncio.timeout(10):
            await closed.wait()
        assert codes == [1000]  # a close frame: the dial closed its socket, not the session under it
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("attempt", range(3))
async def test_a_frame_on_the_stream_just_before_the_bye_still_reaches_the_round(attempt: int) -> None:
    """The bye travels on the WebSocket and may overtake the last large frame on the frame stream.

    The receiver reads the stream to its end before it treats the sender as gone, so a collect
    already waiting for that frame gets it (the finishing peer's last round).
    """
    import torch
    from test_wire_stream import CHUNK, chunk_frame, swarm

    async with swarm() as peers:
        a, b = peers["a"], peers["b"]
        collecting = asyncio.create_task(b.collect("rs2", attempt, ["a"], 30.0))
        await asyncio.sleep(0)
        values = torch.randn(CHUNK, generator=torch.Generator().manual_seed(attempt))
        await a.send("b", chunk_frame("a", attempt, values))
        await a.close(announce=True)
        async with asyncio.timeout(30.0):
            got = await collecting
        assert set(got) == {"a"}
        assert torch.equal(got["a"].tensors["chunk"], values)
        assert b._links["a"].state == "left"  # the bye was heard, after the frame
