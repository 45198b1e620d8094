"""One link per neighbour pair: its state, and the two sides of the HELLO handshake.

For each pair of neighbours exactly one side dials: the peer whose name sorts first. The dialer
opens ``GET /ws`` (with a token when the swarm has a secret) and sends a ``hello``; the acceptor
checks it against the credentials and answers with its own ``hello``, whose meta carries a fresh
``frames_token`` (the dialer's credential for ``POST /frames``) and, with a secret, the acceptor's
proof that it holds the secret too. The dialer checks that proof before it sends a data frame, so
both ends of a link are authenticated.

The handshake is plain functions over a WebSocket; which links exist, who may dial in and what
happens to the link afterwards is the :class:`~p2pdl.net.transport.Transport`'s business. The
trade-off is one round trip per connection: no data frame rides along with the ``hello``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import aiohttp
from aiohttp import web

from p2pdl.config import TransportConfig
from p2pdl.errors import FrameError, FrameSchemaError, TransportError, UnknownSenderError
from p2pdl.net.auth import (
    PEER_KEY,
    TOKEN_KEY,
    PeerSecurity,
    make_reply,
    reply_from_meta,
    reply_to_meta,
    token_from_header,
    verify_reply,
)
from p2pdl.net.guard import TokenBucket
from p2pdl.net.stats import TransportStats
from p2pdl.net.stream import FrameStream
from p2pdl.wire import Frame, Limits, decode_frame, encode_frame

LinkState = Literal["connecting", "connected", "disconnected", "left"]
WebSocket = aiohttp.ClientWebSocketResponse | web.WebSocketResponse

HELLO: Final = "hello"
BYE: Final = "bye"
CONTROL_KINDS: Final = frozenset({HELLO, BYE})
FRAMES_TOKEN_META: Final = "frames_token"

# WebSocket close codes (4000-4999 are for applications, RFC 6455 section 7.4.2).
CLOSE_PROTOCOL_ERROR: Final = 4000
CLOSE_NOT_A_NEIGHBOR: Final = 4003


@dataclass
class Link:
    """The one connection to one neighbour, whichever side dialled."""

    name: str
    address: str
    dials: bool
    state: LinkState = "connecting"
    ws: WebSocket | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    connects: int = 0
    last_error: str = ""
    dialer: asyncio.Task[None] | None = None
    # The POST /frames credential of the current connection: issued by the acceptor in its HELLO
    # reply, presented by the dialer; "" while down or when the acceptor offers none.
    frames_token: str = ""
    # The link's frame stream for large frames, both ways (net.stream); None while there is none.
    stream: FrameStream | None = None
    bucket: TokenBucket = field(default_factory=TokenBucket)  # rate limit of received frames
    # Data-frame bytes on this link (handshake frames are counted only in the transport's totals).
    bytes_sent: int = 0
    bytes_received: int = 0

    def has_left(self) -> bool:
        # A method, not a comparison at the call site: the state changes across awaits.
        return self.state == "left"


def decode_control(data: bytes, limits: Limits, sender: str | None) -> Frame:
    """Decode a handshake frame: every check of the codec, and no tensors (``sender``: None = anyone)."""
    frame = decode_frame(data, limits=limits, known_senders=None if sender is None else (sender,))
    if frame.tensors:
        raise FrameSchemaError(f"{frame.kind!r} control frame must not carry tensors")
    return frame


async def send_frame(ws: WebSocket, frame: Frame, stats: TransportStats) -> None:
    """Send a small frame as it is (never compressed), counting it."""
    data = encode_frame(frame, compression="never")
    await ws.send_bytes(data)
    stats.bytes_sent += len(data)
    stats.frames_sent += 1


async def close_quietly(ws: WebSocket, timeout: float, *, code: int = aiohttp.WSCloseCode.OK) -> None:
    """Close ``ws`` with ``code`` within ``timeout`` seconds, ignoring a connection already gone."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await ws.close(code=code)


# --------------------------------------------------------------------------- the dialer's side


async def dial(
    session: aiohttp.ClientSession,
    link: Link,
    *,
    self_name: str,
    security: PeerSecurity,
    limits: Limits,
    config: TransportConfig,
    stats: TransportStats,
) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    """Open the link's WebSocket and run the dialer's side of the handshake.

    Returns the WebSocket and the acceptor's ``frames_token`` ("" when it offers none). Raises
    what the connection raises (``aiohttp.ClientError``, ``OSError``, ``TimeoutError``) or
    ``FrameError``, ``TransportError``, ``AuthError`` for a bad answer; the socket is closed then.
    """
    headers = security.headers(target=link.name, method="GET", path="/ws")
    async with asyncio.timeout(config.connect_timeout):
        ws = await session.ws_connect(
            f"{security.scheme}://{link.address}/ws",
            max_msg_size=ws_message_cap(limits),
            heartbeat=config.heartbeat_interval,
            compress=0,
            headers=headers,
        )
    try:
        async with asyncio.timeout(config.handshake_timeout):
            await send_frame(ws, Frame(kind=HELLO, sender=self_name, round=0, step=0), stats)
            reply = await ws.receive()
        if reply.type != aiohttp.WSMsgType.BINARY:
            raise TransportError(f"{link.name} refused the handshake (close code {ws.close_code})")
        hello = decode_control(reply.data, limits, link.name)
        if hello.kind != HELLO:
            raise TransportError(f"{link.name} answered the handshake with {hello.kind!r}")
        _verify_acceptor(security, link.name, headers, hello)
    except BaseException:
        # Cancellation too (the peer closing mid-handshake): a socket left open leaks its connection.
        await close_quietly(ws, config.handshake_timeout)
        raise
    token = hello.meta.get(FRAMES_TOKEN_META)
    return ws, token if isinstance(token, str) else ""


def _verify_acceptor(security: PeerSecurity, name: str, sent_headers: Mapping[str, str], hello: Frame) -> None:
    """With a secret, the acceptor must prove it holds it too (no impostor answers a dial)."""
    if security.verifier is None:
        return
    sent = token_from_header(next(iter(sent_headers.values())))
    reply = reply_from_meta(hello.meta, sent=sent, sender=name)
    verify_reply(security.verifier, reply, sent)


# --------------------------------------------------------------------------- the acceptor's side


class HandshakeRefused(Exception):
    """The acceptor refuses an upgraded WebSocket: close it with ``code`` and ``reason``.

    ``refusal`` is the typed error to count (None for a refusal that is not about a frame);
    ``source`` names whom the refusal is logged against.
    """

    def __init__(self, code: int, reason: bytes, refusal: FrameError | None = None, source: str = "?") -> None:
        super().__init__(reason.decode())
        self.code = code
        self.reason = reason
        self.refusal = refusal
        self.source = source


async def read_hello(
    ws: web.WebSocketResponse, request: web.Request, *, security: PeerSecurity, limits: Limits, timeout: float
) -> Frame:
    """The first message of an accepted WebSocket, decoded: a control frame without tensors.

    With a secret, its sender must be the peer named by the upgrade's credential. Raises
    :class:`HandshakeRefused`.
    """
    try:
        async with asyncio.timeout(timeout):
            first = await ws.receive()
    except TimeoutError:
        raise HandshakeRefused(CLOSE_PROTOCOL_ERROR, b"handshake timeout") from None
    if first.type != aiohttp.WSMsgType.BINARY:
        raise HandshakeRefused(CLOSE_PROTOCOL_ERROR, b"expected a binary hello frame")
    try:
        hello = decode_control(first.data, limits, None)
    except FrameError as exc:
        raise HandshakeRefused(CLOSE_PROTOCOL_ERROR, b"bad hello frame", exc, request.remote or "?") from None
    authenticated = request.get(PEER_KEY)
    if security.verifier is not None and authenticated != hello.sender:
        raise HandshakeRefused(
            CLOSE_NOT_A_NEIGHBOR,
            b"hello does not match the credentials",
            UnknownSenderError(f"token of {authenticated!r} but hello from {hello.sender!r}"),
        )
    return hello


def hello_reply(security: PeerSecurity, request: web.Request, *, self_name: str, frames_token: str) -> Frame:
    """The acceptor's ``hello``: the link's ``frames_token`` and, with a secret, its proof."""
    meta: dict[str, str | int | float | bool | None] = {FRAMES_TOKEN_META: frames_token}
    if security.secret is not None:
        # Bound to the dialer's own token, so it answers this one request only.
        meta.update(reply_to_meta(make_reply(security.secret, request[TOKEN_KEY], self_name=self_name)))
    return Frame(kind=HELLO, sender=self_name, round=0, step=0, meta=meta)


def ws_message_cap(limits: Limits) -> int:
    """aiohttp's ``max_msg_size`` for a link: twice ``max_frame_bytes``.

    aiohttp closes a link (code 1009) on a message over its cap, before the receiver sees it.
    With the cap above the frame limit, a message a little over ``max_frame_bytes`` (a peer
    configured for a bigger model, say) reaches the decoder and is refused there like any frame,
    counted as ``too_large`` with the link kept up. The price is that one link can make aiohttp
    buffer up to twice ``max_frame_bytes``; only a message beyond that still closes the link.
    """
    return 2 * limits.max_frame_bytes
