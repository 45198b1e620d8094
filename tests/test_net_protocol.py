"""Protocol edge cases against a real Transport on 127.0.0.1:0, driven by a hand-written client.

The client side is written from docs/PROTOCOL.md with plain aiohttp and raw sockets, as an
independent implementation would be: each test holds the acceptor ``b`` to what the document says
about one edge (a hello in the acceptor's own name, a POST body cut short, an oversized WebSocket
message, unparsable HTTP, and the order of the receiver checks), and checks that the refusal is
counted under the documented reason, that the server stays up and that no traceback is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
import pytest
import torch

from p2pdl.config import TransportConfig
from p2pdl.errors import FrameSchemaError
from p2pdl.net.auth import HEADER, PeerSecurity, Secret, TokenVerifier, make_token, token_to_header
from p2pdl.net.http import SENDER_HEADER, TOKEN_HEADER
from p2pdl.net.links import CLOSE_NOT_A_NEIGHBOR, CLOSE_PROTOCOL_ERROR
from p2pdl.net.transport import Transport
from p2pdl.wire import Frame, Limits, TensorSpec, decode_frame, encode_frame

MIB = 1024 * 1024
SECRET = Secret(b"protocol edge tests: a secret of 32+ bytes")
EXPECTED = {"params": {"w": TensorSpec(dtype="float32", shape=(2,))}, "ping": {}}


def expected_tensors(kind: str, sender: str) -> Mapping[str, TensorSpec]:
    if kind not in EXPECTED:
        raise FrameSchemaError(f"no frames of kind {kind!r} here")
    return EXPECTED[kind]


def acceptor(*, secret: bool = False, **transport: Any) -> Transport:
    """Peer ``b``, neighbour of ``a`` (which sorts first, so ``a`` dials); ``a`` and ``b`` are members."""
    security = PeerSecurity(name="b")
    if secret:
        security = PeerSecurity(name="b", secret=SECRET, verifier=TokenVerifier(SECRET, self_name="b"))
    b = Transport(
        name="b",
        listen_host="127.0.0.1",
        listen_port=0,
        addresses={"a": "127.0.0.1:9"},
        config=TransportConfig(handshake_timeout=2.0, max_frame_mib=1.0, **transport),
        expected_tensors=expected_tensors,
        status=dict,
        admit=lambda name: name in {"a", "b"},
        security=security,
    )
    b.set_neighbors(["a"])
    return b


def hello(sender: str, **tensors: torch.Tensor) -> bytes:
    return encode_frame(Frame(kind="hello", sender=sender, round=0, step=0, tensors=tensors))


def rejected(transport: Transport) -> dict[str, int]:
    return dict(transport.stats.frames_rejected)


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Poll ``predicate`` (a counter or link state of the transport: nothing to wait on) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]


@dataclass
class Dialer:
    """Peer ``a`` by hand: a WebSocket to ``b`` after the HELLO exchange, and b's frames token."""

    session: aiohttp.ClientSession
    port: int
    ws: aiohttp.ClientWebSocketResponse
    frames_token: str

    async def post(self, body: bytes) -> int:
        headers = {SENDER_HEADER: "a", TOKEN_HEADER: self.frames_token}
        url = f"http://127.0.0.1:{self.port}/frames"
        async with self.session.post(url, data=body, headers=headers) as response:
            return response.status


@contextlib.asynccontextmanager
async def linked(**transport: Any) -> AsyncIterator[tuple[Transport, Dialer]]:
    async with acceptor(**transport) as b, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"http://127.0.0.1:{b.port}/ws", max_msg_size=4 * MIB)
        await ws.send_bytes(hello("a"))
        reply = await ws.receive(timeout=5)
        assert reply.type == aiohttp.WSMsgType.BINARY
        answer = decode_frame(reply.data, limits=Limits(max_frame_bytes=MIB, max_decompressed_bytes=MIB))
        token = answer.meta["frames_token"]
        assert answer.kind == "hello" and answer.sender == "b" and isinstance(token, str)
        await wait_for(lambda: b.is_connected("a"))
        yield b, Dialer(session=session, port=b.port, ws=ws, frames_token=token)
        await ws.close()


# --------------------------------------------------------------------------- the handshake


@pytest.mark.parametrize("secret", [False, True], ids=["open", "with-secret"])
async def test_a_hello_in_the_acceptors_own_name_is_refused_4003_and_counted(
    secret: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async with acceptor(secret=secret) as b, aiohttp.ClientSession() as session:
        # With a secret the credential names b too, so only the "not a neighbour" rule can refuse it.
        headers = {HEADER: token_to_header(make_token(SECRET, name="b", target="b", purpose="GET /ws"))}
        ws = await session.ws_connect(f"http://127.0.0.1:{b.port}/ws", headers=headers if secret else {})
        await ws.send_bytes(hello("b"))
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CLOSE_NOT_A_NEIGHBOR
        assert message.extra == "not a neighbour"
        assert rejected(b) == {"unknown_sender": 1}
        assert b.neighbors == ("a",)  # no link to itself was added
        async with session.get(f"http://127.0.0.1:{b.port}/healthz") as response:
            assert response.status == 200
    assert not tracebacks(caplog)


@pytest.mark.parametrize(
    ("tensor", "reason"),
    [(torch.tensor([float("nan"), 1.0]), "non_finite"), (torch.tensor([0.5, 1.0]), "schema")],
    ids=["nan", "finite"],
)
async def test_a_hello_with_a_tensor_is_closed_4000_and_counted_by_the_first_failing_check(
    tensor: torch.Tensor, reason: str
) -> None:
    # The decoder's finite check (15) runs before the transport's "control frames carry no tensors" (16).
    async with acceptor() as b, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"http://127.0.0.1:{b.port}/ws")
        await ws.send_bytes(hello("a", w=tensor))
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CLOSE_PROTOCOL_ERROR
        assert rejected(b) == {reason: 1}


# --------------------------------------------------------------------------- POST /frames


@pytest.mark.parametrize("how", ["half-close", "close"])
async def test_a_post_body_that_ends_before_its_content_length_is_counted_without_a_traceback(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with linked() as (b, a):
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        head = (
            f"POST /frames HTTP/1.1\r\nHost: b\r\nContent-Length: 1000\r\n"
            f"{SENDER_HEADER}: a\r\n{TOKEN_HEADER}: {a.frames_token}\r\n\r\n"
        )
        writer.write(head.encode() + b"P2" + bytes(8))
        await writer.drain()
        await asyncio.sleep(0.05)  # the handler is now waiting for the rest of the body
        if how == "half-close":
            writer.write_eof()
        else:
            writer.close()
        answer = b""
        with contextlib.suppress(ConnectionError):
            answer = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        # The client's side ended, so no answer can reach it; if one did, it must be the 400.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400")
        await wait_for(lambda: rejected(b).get("format") == 1)
        assert rejected(b) == {"format": 1}
        # The link and the server are unaffected: a whole frame still goes through.
        assert b.is_connected("a")
        assert await a.post(encode_frame(Frame(kind="ping", sender="a", round=0, step=0))) == 204
        assert b.stats.frames_received == 1
    assert not tracebacks(caplog)


# --------------------------------------------------------------------------- WebSocket message size


async def test_a_websocket_message_over_max_frame_bytes_is_counted_too_large_and_the_link_stays_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with linked() as (b, a):
        await a.ws.send_bytes(b"P2" + bytes(MIB))  # max_frame_bytes + 2: refused by check 2 (size)
        await wait_for(lambda: rejected(b).get("too_large") == 1)
        await a.ws.send_bytes(encode_frame(Frame(kind="ping", sender="a", round=0, step=0)))
        await wait_for(lambda: b.stats.frames_received == 1)
        assert b.is_connected("a") and not a.ws.closed
        assert rejected(b) == {"too_large": 1}
    assert not tracebacks(caplog)


async def test_a_websocket_message_beyond_twice_max_frame_bytes_closes_the_link_1009_and_is_counted() -> None:
    async with linked() as (b, a):
        await a.ws.send_bytes(bytes(2 * MIB + 1))  # more than aiohttp will buffer for this link
        message = await a.ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert a.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        await wait_for(lambda: not b.is_connected("a"))
        assert rejected(b) == {"too_large": 1}


# --------------------------------------------------------------------------- unparsable HTTP

GARBAGE = [
    b"GARBAGE\r\n\r\n",  # not HTTP at all (first request line)
    b"GET / HTTP/1.1\r\nHost: b\r\nno colon in this header\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: b\r\n\r\n",  # request line over aiohttp's limit
    b"POST /frames HTTP/1.1\r\nHost: b\r\nContent-Length: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",  # a TLS hello on a plain port
]


async def test_unparsable_http_requests_are_counted_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds = 8
    caplog.set_level(logging.DEBUG)
    async with acceptor() as b:
        for _ in range(rounds):
            for request in GARBAGE:
                reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
                writer.write(request)
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(), timeout=5)
                writer.close()
                assert answer.split(b"\r\n")[0].split(b" ")[1] == b"400", answer[:80]
        assert b.stats.bad_requests == rounds * len(GARBAGE)
        assert b.stats.as_dict()["bad_requests"] == rounds * len(GARBAGE)
    refusals = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]  # all sent well inside LOG_INTERVAL
    assert "\n" not in refusals[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info is not None]


# --------------------------------------------------------------------------- the order of the checks


def raw_frame(body: bytes) -> bytes:
    return struct.pack("<2sBBI", b"P2", 1, 0, len(body)) + body


def params_frame(sender: str, **tensors: torch.Tensor) -> bytes:
    return encode_frame(Frame(kind="params", sender=sender, round=0, step=0, tensors=tensors))


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        # sender (14) before finite (15) before the expected tensors (17)
        (params_frame("c", w=torch.tensor([float("nan")])), "unknown_sender"),
        (params_frame("a", w=torch.tensor([float("inf")])), "non_finite"),
        (params_frame("a", w=torch.tensor([1.0])), "shape"),
        # a kind the receiver does not take is refused with the expected tensors (17)
        (encode_frame(Frame(kind="other", sender="a", round=0, step=0)), "schema"),
        # control frames carry no tensors (16), after the decoder's checks
        (encode_frame(Frame(kind="bye", sender="a", round=0, step=0, tensors={"w": torch.ones(2)})), "schema"),
        # the body's v is checked before the rest of the schema (10)
        (raw_frame(msgpack.packb({"v": 2, "kind": "?"})), "version"),
    ],
    ids=["sender-first", "finite-before-shape", "shape", "unknown-kind", "bye-with-tensors", "body-version"],
)
async def test_a_frame_failing_several_checks_is_counted_by_the_first_in_the_documented_order(
    frame: bytes, reason: str
) -> None:
    async with linked() as (b, a):
        await a.ws.send_bytes(frame)
        await wait_for(lambda: sum(rejected(b).values()) == 1)
        assert rejected(b) == {reason: 1}
        assert b.is_connected("a")


async def test_a_json_reply_nested_past_the_parsers_stack_is_a_transport_error() -> None:
    """A hostile peer's gossip reply of 100,000 nested lists must not escape as a RecursionError."""
    from aiohttp import web

    from p2pdl.errors import TransportError
    from p2pdl.net.http import request_json

    async def nested(_: web.Request) -> web.Response:
        return web.Response(text="[" * 100_000, content_type="application/json")

    app = web.Application()
    app.router.add_post("/gossip", nested)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TransportError, match="failed"):
                await request_json(
                    session, PeerSecurity(name="a"), f"127.0.0.1:{port}", "POST", "/gossip", {}, 5.0, 1 << 20
                )
    finally:
        await runner.cleanup()
