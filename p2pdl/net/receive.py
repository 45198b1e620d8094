"""The receive half of :class:`~p2pdl.net.transport.Transport`: every way a frame comes in.

Frames arrive on a link's WebSocket (``GET /ws``: the acceptor's handshake, then the read loop,
the same loop the dialer runs on its side), from a link's dialer as a ``POST /frames`` body
(:mod:`~p2pdl.net.http`), or, both ways, on the link's frame stream (``GET /stream``, opened by the
dialer once the WebSocket is up; :mod:`~p2pdl.net.stream`). All end in
:meth:`LinkReceiver._on_bytes`: the rate limit, then the decoder with the link's peer as the only
known sender, then the expected tensors, then the mailbox. Large frames are decoded in the codec
thread pool, never on the event loop.

Trade-offs:

* A refused frame is counted by reason and logged at most once per sender per
  :data:`~p2pdl.net.stats.LOG_INTERVAL` seconds; it never closes the link and never reaches the
  model. A frame the code fails on unexpectedly (a bug, not a refusal) is counted as
  ``internal_error`` and logged, and the link stays up.
* This is a base class rather than a separate object so that the transport's state (links,
  stats, mailbox, limits) has one owner; it only declares the attributes it reads, and
  :class:`~p2pdl.net.transport.Transport` sets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web

from p2pdl.config import TransportConfig
from p2pdl.errors import (
    AuthError,
    FrameError,
    FrameFormatError,
    FrameSchemaError,
    FrameTooLargeError,
    RateLimitedError,
    TransportError,
    UnknownSenderError,
)
from p2pdl.net.auth import PEER_KEY, PeerSecurity
from p2pdl.net.http import SENDER_HEADER, TOKEN_HEADER, read_exactly
from p2pdl.net.links import (
    BYE,
    CLOSE_NOT_A_NEIGHBOR,
    CONTROL_KINDS,
    HELLO,
    HandshakeRefused,
    Link,
    WebSocket,
    close_quietly,
    hello_reply,
    read_hello,
    send_frame,
    ws_message_cap,
)
from p2pdl.net.mailbox import Mailbox
from p2pdl.net.stats import LogThrottle, TransportStats
from p2pdl.net.stream import STREAM_PATH, UPGRADE, FrameStream, open_stream
from p2pdl.tasks import TaskOwner
from p2pdl.wire import Frame, Limits, TensorSpec, check_tensors, decode_frame

__all__ = ["ExpectedTensors", "LinkReceiver"]

log = logging.getLogger(__name__)

ExpectedTensors = Callable[[str, str], Mapping[str, TensorSpec]]

# Frames under this many bytes are coded inline; larger ones go to the codec pool.
INLINE_CODEC_BYTES = 256 * 1024


class LinkReceiver:
    """Accepts links and receives frames; the state it reads is set by the Transport."""

    name: str
    security: PeerSecurity
    stats: TransportStats
    mailbox: Mailbox
    _addresses: dict[str, str]
    _config: TransportConfig
    _limits: Limits
    _links: dict[str, Link]
    _expected: ExpectedTensors
    _admit: Callable[[str], bool]
    _on_peer_left: Callable[[str], None]
    _on_heard: Callable[[str], None]
    _codec: ThreadPoolExecutor
    _warnings: LogThrottle
    _tasks: TaskOwner
    _frame_streams: bool

    def _add_link(self, neighbor: str) -> Link:
        if neighbor == self.name:
            raise ValueError("a peer is not its own neighbour")
        link = Link(
            name=neighbor,
            address=self._addresses.get(neighbor, ""),
            dials=self.name < neighbor,
        )
        self._links[neighbor] = link
        return link

    async def _accept(self, request: web.Request) -> web.StreamResponse:
        """GET /ws: the acceptor's side of a link, from the upgrade until the link ends."""
        ws = web.WebSocketResponse(
            max_msg_size=ws_message_cap(self._limits),
            heartbeat=self._config.heartbeat_interval,
            compress=False,
        )
        await ws.prepare(request)
        try:
            await self._handshake_and_serve(request, ws)
        except Exception:
            # A bug, not a refusal: count it, close this one connection, keep the server up.
            self.stats.frames_rejected["internal_error"] += 1
            if self._warnings.allow("internal_error"):
                log.exception("%s: unexpected error on an accepted WebSocket", self.name)
            await close_quietly(ws, self._config.shutdown_timeout, code=aiohttp.WSCloseCode.INTERNAL_ERROR)
        return ws

    async def _handshake_and_serve(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        try:
            hello = await read_hello(
                ws, request, security=self.security, limits=self._limits, timeout=self._config.handshake_timeout
            )
        except HandshakeRefused as refused:
            if refused.refusal is not None:
                self._reject(refused.refusal, refused.source)
            await ws.close(code=refused.code, message=refused.reason)
            return
        link = self._links.get(hello.sender)
        if link is None and hello.kind == HELLO and hello.sender != self.name and self._admit(hello.sender):
            # A member this peer does not link to yet (its view may lag a rewiring): accept, so
            # both ends converge without a refused-and-retried dial.
            link = self._add_link(hello.sender)
        if hello.kind != HELLO or link is None or link.dials:
            # Also a hello in this peer's own name: no link to itself exists or is ever added.
            self._reject(
                UnknownSenderError(f"{hello.sender!r} is not a neighbour that dials here"),
                hello.sender,
            )
            await ws.close(code=CLOSE_NOT_A_NEIGHBOR, message=b"not a neighbour")
            return
        if link.state == "left":
            link.state = "connecting"
            self.mailbox.mark_back(link.name)
        token = secrets.token_hex(16)
        reply = hello_reply(self.security, request, self_name=self.name, frames_token=token)
        # Valid before the reply leaves: the dialer may POST the moment it reads the token.
        link.frames_token = token
        try:
            try:
                async with asyncio.timeout(self._config.handshake_timeout):
                    await send_frame(ws, reply, self.stats)
            except (TimeoutError, ConnectionError, aiohttp.ClientError):
                return
            old = link.ws
            if old is not None and not old.closed:
                await old.close()
            await self._serve_link(link, ws)
        finally:
            if link.frames_token == token:  # a newer connection may already hold its own
                link.frames_token = ""

    def _token_link(self, request: web.Request) -> Link | None:
        """The live accepted link whose dialer made ``request`` (its sender and frames token), if any."""
        sender = request.headers.get(SENDER_HEADER, "")
        token = request.headers.get(TOKEN_HEADER, "").encode("utf-8", "surrogateescape")
        link = self._links.get(sender)
        if (
            (self.security.verifier is not None and request.get(PEER_KEY) != sender)
            or link is None
            or link.dials
            or not link.frames_token
            or not hmac.compare_digest(token, link.frames_token.encode())
        ):
            return None
        return link

    async def _accept_frame(self, request: web.Request) -> web.StreamResponse:
        """POST /frames: one frame from the dialer of a live link, as a plain HTTP body."""
        link = self._token_link(request)
        if link is None:
            self._reject(UnknownSenderError("POST /frames without a live link's token"), request.remote or "?")
            raise web.HTTPForbidden()
        length = request.content_length
        if length is None:
            raise web.HTTPLengthRequired()
        if length > self._limits.max_frame_bytes:
            self._reject(
                FrameTooLargeError(f"frame is {length} bytes; max_frame_bytes is {self._limits.max_frame_bytes}"),
                link.name,
            )
            raise web.HTTPRequestEntityTooLarge(max_size=self._limits.max_frame_bytes, actual_size=length)
        try:
            async with asyncio.timeout(self._config.send_timeout):
                data = await read_exactly(request.content, length)
        except TimeoutError:
            raise web.HTTPRequestTimeout() from None
        if data is None:
            # The client closed its side first, so this 400 seldom reaches it; the count does.
            self._reject(FrameFormatError(f"POST /frames body ended before its {length} bytes"), link.name)
            raise web.HTTPBadRequest(text="body shorter than Content-Length")
        await self._on_bytes(link, data)
        return web.Response(status=204)

    async def _accept_stream(self, request: web.Request) -> web.StreamResponse:
        """GET /stream: the dialer of a live link upgrades this connection to the link's frame stream."""
        link = self._token_link(request)
        if link is None:
            self._reject(UnknownSenderError(f"GET {STREAM_PATH} without a live link's token"), request.remote or "?")
            raise web.HTTPForbidden()
        if request.headers.get("Upgrade", "").strip().lower() != UPGRADE:
            raise web.HTTPBadRequest(text=f"GET {STREAM_PATH} needs Upgrade: {UPGRADE}")
        transport = request.transport
        if transport is None or transport.is_closing():
            raise web.HTTPBadRequest(text="no transport to upgrade")
        response = web.StreamResponse(status=101, headers={"Connection": "Upgrade", "Upgrade": UPGRADE})
        await response.prepare(request)
        request.protocol.keep_alive(False)
        stream = FrameStream(
            max_record=self._limits.max_frame_bytes, on_refused=lambda exc: self._reject(exc, link.name)
        )
        # aiohttp's protocol (and the connection guard around it) hears of the end of the connection.
        stream.attach(transport, previous=transport.get_protocol())
        await self._serve_stream(link, stream)
        return response

    def _open_stream_task(self, link: Link, ws: WebSocket) -> None:
        if link.dials and link.frames_token and self._frame_streams:
            self._tasks.spawn(self._dial_stream(link, ws, link.frames_token), f"stream-{link.name}")

    async def _dial_stream(self, link: Link, ws: WebSocket, token: str) -> None:
        """The dialer's side: open the link's frame stream and read it until it or the link ends."""
        headers = {
            SENDER_HEADER: self.name,
            TOKEN_HEADER: token,
            **self.security.headers(target=link.name, method="GET", path=STREAM_PATH),
        }
        try:
            stream = await open_stream(
                link.address,
                headers,
                ssl=self.security.client_ssl,
                max_record=self._limits.max_frame_bytes,
                on_refused=lambda exc: self._reject(exc, link.name),
                timeout=self._config.handshake_timeout,
            )
        except (OSError, TimeoutError, TransportError, ValueError) as exc:
            # Large frames keep going over POST /frames and the WebSocket.
            log.info("%s: no frame stream to %s: %s", self.name, link.name, exc)
            return
        if link.ws is not ws:
            stream.close()
            return
        await self._serve_stream(link, stream)

    async def _serve_stream(self, link: Link, stream: FrameStream) -> None:
        """Read ``stream``'s records into the receive path until it closes; it is the link's meanwhile."""
        old, link.stream = link.stream, stream
        if old is not None:
            old.close()
        try:
            while (record := await stream.next_record()) is not None:
                await self._on_bytes(link, record, owned=True)
                del record  # the buffer is reusable once the frame's consumer drops it too
        finally:
            if link.stream is stream:
                link.stream = None
            stream.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.shutdown_timeout):
                    await stream.closed.wait()

    async def _serve_link(self, link: Link, ws: WebSocket) -> None:
        link.ws = ws
        link.state = "connected"
        link.connects += 1
        link.connected.set()
        log.info("%s: link to %s up (%s)", self.name, link.name, "dialled" if link.dials else "accepted")
        self._open_stream_task(link, ws)
        try:
            await self._read_loop(link, ws)
        finally:
            if link.ws is ws:
                link.ws = None
                link.connected.clear()
                if link.stream is not None:
                    link.stream.close()
                if not link.has_left():
                    link.state = "disconnected"
                log.info("%s: link to %s down", self.name, link.name)

    async def _read_loop(self, link: Link, ws: WebSocket) -> None:
        # Bounded by the heartbeat: aiohttp closes the socket when a ping gets no pong.
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                await self._on_bytes(link, message.data)
            elif message.type == aiohttp.WSMsgType.TEXT:
                self.stats.frames_rejected["format"] += 1
            else:
                if message.type == aiohttp.WSMsgType.ERROR and _is_too_big(message.data):
                    # Over aiohttp's buffer cap (twice max_frame_bytes): it closes the link (1009).
                    self._reject(
                        FrameTooLargeError(f"{message.data}; max_frame_bytes is {self._limits.max_frame_bytes}"),
                        link.name,
                    )
                break
            if link.has_left():
                await ws.close()
                break

    async def _on_bytes(self, link: Link, data: bytes | memoryview, *, owned: bool = False) -> None:
        """One received frame's bytes; ``owned``: a frame stream's buffer, decoded in place."""
        self.stats.bytes_received += len(data)
        link.bytes_received += len(data)
        if not link.bucket.take(self._config.max_frames_per_second):
            # Refused before decoding: a flood costs the receiver a counter increment, no parsing.
            self._reject(RateLimitedError(f"{link.name} is over max_frames_per_second"), link.name)
            return
        try:
            if len(data) > INLINE_CODEC_BYTES:
                frame = await asyncio.get_running_loop().run_in_executor(
                    self._codec, self._decode_data, data, link.name, owned
                )
            else:
                frame = self._decode_data(data, link.name, owned)
            if frame.kind == BYE:
                stream = link.stream
                if stream is not None and not owned:
                    # The bye came on the WebSocket; the leaver closes its frame stream right after,
                    # and records it sent before the bye may still be in flight there.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._config.shutdown_timeout):
                            await stream.drained.wait()
                link.state = "left"
                self.mailbox.mark_gone(link.name)
                log.info("%s: %s announced its leave", self.name, link.name)
                self._on_peer_left(link.name)
                return
            self._on_heard(link.name)
            self.mailbox.put(frame)
            self.stats.frames_received += 1
            self.stats.stream_frames_received += owned
        except FrameError as exc:
            self._reject(exc, link.name)
        except Exception:
            # A bug, not a typed refusal: keep the link and the peer alive, count it, log it loudly.
            self.stats.frames_rejected["internal_error"] += 1
            log.exception("%s: unexpected error handling a frame from %s", self.name, link.name)

    def _count_auth_reject(self, request: web.Request, exc: AuthError) -> None:
        self.stats.auth_rejected[exc.reason] += 1

    def _decode_data(self, data: bytes | memoryview, sender: str, owned: bool = False) -> Frame:
        """Decode and validate a frame from ``sender`` (runs in the codec pool when large)."""
        frame = decode_frame(data, limits=self._limits, known_senders=(sender,), owned=owned)
        if frame.kind in CONTROL_KINDS:
            if frame.tensors:
                raise FrameSchemaError(f"{frame.kind!r} control frame must not carry tensors")
            return frame
        check_tensors(frame, self._expected(frame.kind, sender))
        return frame

    def _reject(self, exc: FrameError, sender: str) -> None:
        self.stats.frames_rejected[exc.reason] += 1
        if self._warnings.allow(sender):
            log.warning("%s: refused a frame from %s (%s): %s", self.name, sender, exc.reason, exc)


def _is_too_big(error: object) -> bool:
    """Whether a WebSocket ERROR message is aiohttp's "message too big" (close code 1009)."""
    return isinstance(error, aiohttp.WebSocketError) and error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
