"""The network layer's front: one aiohttp server per peer and one persistent WebSocket per neighbour pair.

:class:`Transport` owns the server, the link table and the tasks that dial; the parts it uses
live beside it: :mod:`~p2pdl.net.links` (link state and the HELLO handshake),
:mod:`~p2pdl.net.mailbox` (where received frames wait for a strategy),
:mod:`~p2pdl.net.guard` (connection limits, the request-head deadline, the frame rate limit),
:mod:`~p2pdl.net.stats` (counters) and :mod:`~p2pdl.net.auth` (credentials and TLS).

For each pair of neighbours exactly one side dials, and the link carries frames both ways, so a
pair costs one handshake; a dropped link is redialled by the same side with exponential back-off
(``reconnect_initial`` doubling to ``reconnect_max``).

Large frames from the dialer do not go over the WebSocket: RFC 6455 makes a client mask every
frame it sends, and aiohttp does that by copying and XOR-ing the whole message on the event loop,
several times slower than the unmasked direction, and the acceptor unmasks it again. Instead the
acceptor's HELLO reply carries a random per-connection token (``meta["frames_token"]``), and the
dialer POSTs each frame of ``_POST_FRAME_BYTES`` or more to the acceptor's ``/frames`` as a plain
HTTP body on a keep-alive connection, with the ``X-P2PDL-Sender`` and ``X-P2PDL-Frames-Token``
headers. The acceptor takes a POST only from the peer whose live, accepted link holds that token,
so the known sender is still the authenticated link's peer; the body then goes through the same
``_on_bytes`` path (same caps, same decoder, same counters) as a WebSocket message. Control frames
and everything the acceptor sends stay on the WebSocket.

Trade-offs:

* Encoding and decoding of large frames run in a small codec thread pool, never on the event
  loop, so heartbeats and other neighbours' frames keep flowing while a large frame is packed.
* Every network await is bounded by a named timeout from :class:`~p2pdl.config.TransportConfig`
  (``connect_timeout``, ``handshake_timeout``, ``send_timeout``; a silent link is dropped by the
  WebSocket heartbeat, ``heartbeat_interval``). Every buffer is bounded (``inbox_frames``).
* A refused frame is counted by reason and logged at most once per sender per
  :data:`~p2pdl.net.stats.LOG_INTERVAL` seconds; it never closes the link and never reaches the
  model.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from p2pdl.config import TransportConfig
from p2pdl.errors import (
    AuthError,
    FrameError,
    FrameFormatError,
    FrameSchemaError,
    FrameTooLargeError,
    PeerTimeoutError,
    RateLimitedError,
    TransportError,
    UnknownSenderError,
)
from p2pdl.net.auth import PEER_KEY, PeerSecurity, auth_middleware
from p2pdl.net.guard import ConnectionGuard, GuardedSite, ServerLog
from p2pdl.net.links import (
    BYE,
    CLOSE_NOT_A_NEIGHBOR,
    CONTROL_KINDS,
    HELLO,
    HandshakeRefused,
    Link,
    WebSocket,
    close_quietly,
    dial,
    hello_reply,
    read_hello,
    send_frame,
    ws_message_cap,
)
from p2pdl.net.mailbox import Mailbox
from p2pdl.net.stats import LogThrottle, TransportStats
from p2pdl.tasks import TaskOwner
from p2pdl.wire import Frame, Limits, TensorSpec, check_tensors, decode_frame, encode_frame

log = logging.getLogger(__name__)

ExpectedTensors = Callable[[str, str], Mapping[str, TensorSpec]]
StatusProvider = Callable[[], dict[str, Any]]

# Frames under this many bytes are coded inline; larger ones go to the codec pool.
_INLINE_CODEC_BYTES = 256 * 1024
# The dialer sends frames of at least this many bytes as POST /frames bodies, not masked WS frames.
_POST_FRAME_BYTES = 64 * 1024
FRAMES_PATH = "/frames"
SENDER_HEADER = "X-P2PDL-Sender"
TOKEN_HEADER = "X-P2PDL-Frames-Token"


class Transport:
    """aiohttp server plus one WebSocket link per neighbour; sends and collects frames."""

    def __init__(
        self,
        *,
        name: str,
        listen_host: str,
        listen_port: int,
        addresses: Mapping[str, str],
        config: TransportConfig,
        expected_tensors: ExpectedTensors,
        status: StatusProvider,
        admit: Callable[[str], bool] | None = None,
        on_peer_left: Callable[[str], None] | None = None,
        on_heard: Callable[[str], None] | None = None,
        security: PeerSecurity | None = None,
    ) -> None:
        self.name = name
        self.security = security or PeerSecurity(name=name)
        self._listen = (listen_host, listen_port)
        self._addresses = dict(addresses)
        self._config = config
        self._expected = expected_tensors
        self._status = status
        self._admit = admit or (lambda name: False)
        self._on_peer_left = on_peer_left or (lambda name: None)
        self._on_heard = on_heard or (lambda name: None)
        self._limits = Limits(
            max_frame_bytes=config.max_frame_bytes,
            max_decompressed_bytes=config.max_decompressed_bytes,
            max_tensors=config.max_tensors,
        )
        self.stats = TransportStats()
        self.mailbox = Mailbox(config.inbox_frames)
        self._links: dict[str, Link] = {}
        self._codec = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"p2pdl-codec-{name}")
        self._tasks = TaskOwner(name)
        self._guard = ConnectionGuard(
            max_connections=config.max_connections,
            per_address=config.max_connections_per_address,
            request_timeout=config.request_timeout,
            stats=self.stats,
        )
        middlewares: list[Middleware] = [self._guard.middleware]
        if self.security.verifier is not None:
            middlewares.append(auth_middleware(self.security.verifier, on_reject=self._count_auth_reject))
        self._app = web.Application(client_max_size=config.max_frame_bytes, middlewares=middlewares)
        self._app.router.add_get("/healthz", self._healthz)
        self._app.router.add_get("/status", self._status_handler)
        self._app.router.add_get("/ws", self._accept)
        self._app.router.add_post(FRAMES_PATH, self._accept_frame)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self._warnings = LogThrottle()
        self.port = listen_port

    # ------------------------------------------------------------------ lifecycle

    def add_route(
        self,
        method: str,
        path: str,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> None:
        """Let the node serve more endpoints on the same server (call before ``start``)."""
        self._app.router.add_route(method, path, handler)

    async def start(self) -> int:
        """Bind the server, start dialling neighbours; returns the bound port. Idempotent."""
        if self._runner is not None:
            return self.port
        self._runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            logger=ServerLog(self.name, self.stats),
            shutdown_timeout=self._config.shutdown_timeout,
        )
        await self._runner.setup()
        site = GuardedSite(
            self._runner,
            self._listen[0],
            self._listen[1],
            guard=self._guard,
            ssl_context=self.security.server_ssl,
            reuse_address=True,
        )
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.security.client_ssl or True, limit_per_host=8),
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self._config.connect_timeout,
                sock_connect=self._config.connect_timeout,
            ),
        )
        for link in self._links.values():
            self._start_dialing(link)
        log.info("%s listening on %s:%d", self.name, self._listen[0], self.port)
        return self.port

    async def close(self, *, announce: bool = True) -> None:
        """Say goodbye to neighbours (bounded), close every link, stop the server."""
        if self._closing:
            return
        self._closing = True
        if announce:
            bye = Frame(kind=BYE, sender=self.name, round=0, step=0)
            await self._best_effort(self.broadcast(bye, [n for n, lk in self._links.items() if lk.ws is not None]))
        cancelled = self._tasks.cancel()
        for link in self._links.values():
            if link.ws is not None and not link.ws.closed:
                await self._best_effort(link.ws.close())
        await self._tasks.wait(cancelled, self._config.shutdown_timeout)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self._codec.shutdown(wait=False, cancel_futures=True)

    async def _best_effort(self, work: Awaitable[object]) -> None:
        """A shutdown step that may fail, bounded by ``shutdown_timeout``; only our own cancellation escapes.

        aiohttp cancels a pending write drain when the other side drops the connection first (as
        when a whole swarm stops at the same moment): the link is gone either way, so that
        CancelledError, which is not this task being cancelled, must not abort the shutdown.
        """
        try:
            async with asyncio.timeout(self._config.shutdown_timeout):
                await work
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:  # best effort: the peer is leaving whatever went wrong
            log.debug("%s: shutdown step failed", self.name, exc_info=True)

    async def __aenter__(self) -> Transport:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ membership of links

    def set_neighbors(self, neighbors: Collection[str]) -> None:
        """Keep links with exactly ``neighbors``: dial new ones, close links no longer wanted.

        Safe to call at any time; membership changes call it to rewire only the changed edges.
        """
        wanted = set(neighbors) - {self.name}
        for name in wanted - set(self._links):
            link = self._add_link(name)
            if self._runner is not None:
                self._start_dialing(link)
        for name in set(self._links) - wanted:
            link = self._links.pop(name)
            if link.dialer is not None:
                link.dialer.cancel()
            if link.ws is not None and not link.ws.closed:
                self._tasks.spawn(close_quietly(link.ws, self._config.shutdown_timeout), f"unlink-{name}")
            self.mailbox.mark_gone(name)
        for name in wanted:
            self.mailbox.mark_back(name)

    def _start_dialing(self, link: Link) -> None:
        if link.dials and not self._closing and (link.dialer is None or link.dialer.done()):
            link.dialer = self._tasks.spawn(self._dial_forever(link), f"dial-{link.name}")

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

    def update_address(self, neighbor: str, address: str) -> None:
        """Point future dials at a new address (a peer restarted elsewhere, or bound port 0)."""
        self._addresses[neighbor] = address
        link = self._links.get(neighbor)
        if link is not None and link.address != address:
            link.address = address
            if not link.dials:
                return  # the neighbour dials this peer: its address matters only to its own dialer
            if link.ws is not None and not link.ws.closed:
                self._tasks.spawn(close_quietly(link.ws, self._config.shutdown_timeout), f"readdress-{neighbor}")
            elif link.dialer is not None and self._runner is not None:
                # Redial now instead of after the back-off accumulated against the old address.
                link.dialer.cancel()
                link.dialer = None
                self._start_dialing(link)

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def neighbors(self) -> tuple[str, ...]:
        return tuple(self._links)

    def connected_neighbors(self) -> tuple[str, ...]:
        return tuple(n for n, lk in self._links.items() if lk.state == "connected")

    def left_neighbors(self) -> tuple[str, ...]:
        return tuple(n for n, lk in self._links.items() if lk.state == "left")

    def neighbor_states(self) -> list[dict[str, Any]]:
        return [
            {
                "name": lk.name,
                "address": lk.address,
                "state": lk.state,
                "dials": lk.dials,
                "connects": lk.connects,
                "last_error": lk.last_error,
            }
            for lk in self._links.values()
        ]

    async def wait_connected(self, timeout: float) -> tuple[str, ...]:
        """Wait until every neighbour is connected or left; return those still missing."""
        waits = [asyncio.ensure_future(lk.connected.wait()) for lk in self._links.values() if lk.state != "left"]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return tuple(n for n, lk in self._links.items() if lk.state not in ("connected", "left"))

    # ------------------------------------------------------------------ dialling and accepting

    async def _dial_forever(self, link: Link) -> None:
        backoff = self._config.reconnect_initial
        assert self._session is not None
        while not self._closing and not link.has_left():
            try:
                ws, link.frames_token = await dial(
                    self._session,
                    link,
                    self_name=self.name,
                    security=self.security,
                    limits=self._limits,
                    config=self._config,
                    stats=self.stats,
                )
                backoff = self._config.reconnect_initial
                try:
                    await self._serve_link(link, ws)
                finally:
                    link.frames_token = ""
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, TimeoutError, FrameError, TransportError, AuthError) as exc:
                if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status == 401:
                    exc = TransportError(f"{link.name} refused our credentials (HTTP 401): is the secret the same?")
                link.last_error = f"{type(exc).__name__}: {exc}"
                log.debug("%s: dial %s failed: %s", self.name, link.name, link.last_error)
            if self._closing or link.has_left():
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._config.reconnect_max)

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

    async def _accept_frame(self, request: web.Request) -> web.StreamResponse:
        """POST /frames: one frame from the dialer of a live link, as a plain HTTP body."""
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
                data = await _read_exactly(request.content, length)
        except TimeoutError:
            raise web.HTTPRequestTimeout() from None
        if data is None:
            # The client closed its side first, so this 400 seldom reaches it; the count does.
            self._reject(FrameFormatError(f"POST /frames body ended before its {length} bytes"), link.name)
            raise web.HTTPBadRequest(text="body shorter than Content-Length")
        await self._on_bytes(link, data)
        return web.Response(status=204)

    async def _serve_link(self, link: Link, ws: WebSocket) -> None:
        link.ws = ws
        link.state = "connected"
        link.connects += 1
        link.connected.set()
        log.info("%s: link to %s up (%s)", self.name, link.name, "dialled" if link.dials else "accepted")
        try:
            await self._read_loop(link, ws)
        finally:
            if link.ws is ws:
                link.ws = None
                link.connected.clear()
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

    async def _on_bytes(self, link: Link, data: bytes) -> None:
        self.stats.bytes_received += len(data)
        if not link.bucket.take(self._config.max_frames_per_second):
            # Refused before decoding: a flood costs the receiver a counter increment, no parsing.
            self._reject(RateLimitedError(f"{link.name} is over max_frames_per_second"), link.name)
            return
        try:
            if len(data) > _INLINE_CODEC_BYTES:
                frame = await asyncio.get_running_loop().run_in_executor(
                    self._codec, self._decode_data, data, link.name
                )
            else:
                frame = self._decode_data(data, link.name)
            if frame.kind == BYE:
                link.state = "left"
                self.mailbox.mark_gone(link.name)
                log.info("%s: %s announced its leave", self.name, link.name)
                self._on_peer_left(link.name)
                return
            self._on_heard(link.name)
            self.mailbox.put(frame)
            self.stats.frames_received += 1
        except FrameError as exc:
            self._reject(exc, link.name)
        except Exception:
            # A bug, not a typed refusal: keep the link and the peer alive, count it, log it loudly.
            self.stats.frames_rejected["internal_error"] += 1
            log.exception("%s: unexpected error handling a frame from %s", self.name, link.name)

    def _count_auth_reject(self, request: web.Request, exc: AuthError) -> None:
        self.stats.auth_rejected[exc.reason] += 1

    def _decode_data(self, data: bytes, sender: str) -> Frame:
        """Decode and validate a frame from ``sender`` (runs in the codec pool when large)."""
        frame = decode_frame(data, limits=self._limits, known_senders=(sender,))
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

    # ------------------------------------------------------------------ sending

    async def encode(self, frame: Frame) -> bytes:
        """Encode off the event loop when the frame is large."""
        size = sum(t.numel() * t.element_size() for t in frame.tensors.values())
        if size > _INLINE_CODEC_BYTES:
            return await asyncio.get_running_loop().run_in_executor(
                self._codec,
                functools.partial(encode_frame, frame, compression=self._config.compression),
            )
        return encode_frame(frame, compression=self._config.compression)

    async def send_encoded(self, neighbor: str, data: bytes) -> None:
        """Send one encoded frame; raises TransportError if the link is down or too slow."""
        link = self._links.get(neighbor)
        if link is None:
            raise TransportError(f"{neighbor!r} is not a neighbour of {self.name!r}")
        ws = link.ws
        if ws is None or ws.closed:
            raise TransportError(f"link to {neighbor!r} is {link.state}")
        try:
            if link.dials and link.frames_token and len(data) >= _POST_FRAME_BYTES:
                async with asyncio.timeout(self._config.send_timeout):
                    await self._post_frame(link, data)
            else:
                async with asyncio.timeout(self._config.send_timeout), link.send_lock:
                    await ws.send_bytes(data)
        except TimeoutError as exc:
            raise PeerTimeoutError(
                f"send to {neighbor!r} took longer than send_timeout={self._config.send_timeout}s"
            ) from exc
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            raise TransportError(f"send to {neighbor!r} failed: {exc}") from exc
        self.stats.bytes_sent += len(data)
        self.stats.frames_sent += 1

    async def _post_frame(self, link: Link, data: bytes) -> None:
        assert self._session is not None
        headers = {
            SENDER_HEADER: self.name,
            TOKEN_HEADER: link.frames_token,
            **self.security.headers(target=link.name, method="POST", path=FRAMES_PATH),
        }
        url = f"{self.security.scheme}://{link.address}{FRAMES_PATH}"
        async with self._session.post(url, data=data, headers=headers) as response:
            if response.status != 204:
                raise TransportError(f"{link.name} refused a frame: HTTP {response.status}")

    async def send(self, neighbor: str, frame: Frame) -> None:
        await self.send_encoded(neighbor, await self.encode(frame))

    async def broadcast(self, frame: Frame, neighbors: Collection[str]) -> dict[str, TransportError]:
        """Encode once, send to each neighbour concurrently; return the failures by neighbour."""
        if not neighbors:
            return {}
        data = await self.encode(frame)
        results = await asyncio.gather(*(self.send_encoded(n, data) for n in neighbors), return_exceptions=True)
        failures: dict[str, TransportError] = {}
        for neighbor, result in zip(neighbors, results, strict=True):
            if isinstance(result, TransportError):
                failures[neighbor] = result
            elif isinstance(result, BaseException):
                raise result
        return failures

    async def collect(self, kind: str, round_index: int, senders: Collection[str], timeout: float) -> dict[str, Frame]:
        return await self.mailbox.collect(kind, round_index, senders, timeout)

    def advance(self, kind: str, floor: int) -> None:
        self.mailbox.advance(kind, floor)

    def highest_round(self, kind: str, senders: Collection[str]) -> int | None:
        return self.mailbox.highest_round(kind, senders)

    def take_latest(self, kind: str, sender: str) -> Frame | None:
        return self.mailbox.take_latest(kind, sender)

    async def wait_for_senders(self, kind: str, senders: Collection[str], count: int, timeout: float) -> set[str]:
        return await self.mailbox.wait_for_senders(kind, senders, count, timeout)

    def is_connected(self, neighbor: str) -> bool:
        link = self._links.get(neighbor)
        return link is not None and link.ws is not None and not link.ws.closed

    async def request_json(
        self,
        address: str,
        method: str,
        path: str,
        payload: Any | None,
        timeout: float,
        max_bytes: int,
        *,
        target: str | None = None,
    ) -> Any:
        """One small JSON request to a peer, bounded by ``timeout`` seconds and ``max_bytes``.

        ``target`` is the peer's name when known (its token then works for that peer only).
        """
        if self._session is None:
            raise TransportError("transport is not started")
        headers = self.security.headers(target=target, method=method, path=path)
        url = f"{self.security.scheme}://{address}{path}"
        try:
            async with asyncio.timeout(timeout):
                async with self._session.request(method, url, json=payload, headers=headers) as response:
                    if response.status != 200:
                        raise TransportError(f"{method} {address}{path}: HTTP {response.status}")
                    body = await read_bounded(response.content, max_bytes)
            return json.loads(body)
        except TimeoutError as exc:
            raise PeerTimeoutError(f"{method} {address}{path} took longer than {timeout}s") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise TransportError(f"{method} {address}{path} failed: {exc}") from exc

    def open_stream(self, address: str, path: str, timeout: float, *, target: str | None = None) -> Any:
        """A streamed GET (an aiohttp response context manager); the caller bounds its reads."""
        if self._session is None:
            raise TransportError("transport is not started")
        return self._session.get(
            f"{self.security.scheme}://{address}{path}",
            timeout=aiohttp.ClientTimeout(total=timeout, sock_read=timeout),
            headers=self.security.headers(target=target, method="GET", path=path),
        )

    # ------------------------------------------------------------------ HTTP endpoints

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _status_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())


async def _read_exactly(content: aiohttp.StreamReader, length: int) -> bytes | None:
    """The next ``length`` body bytes as one ``bytes`` (one copy), or None if the body ends early.

    ``bytes``, not a reused or mutable buffer: the decoder wraps tensors around it in place.
    """
    chunks: list[bytes] = []
    remaining = length
    while remaining > 0:
        try:
            chunk = await content.readany()
        except (ConnectionError, web.RequestPayloadError):  # the client closed or reset mid-body
            return None
        if not chunk:
            return None
        chunks.append(chunk[:remaining] if len(chunk) > remaining else chunk)
        remaining -= len(chunks[-1])
    return b"".join(chunks)


async def read_bounded(stream: aiohttp.StreamReader, max_bytes: int) -> bytes:
    """Read a whole body, refusing it (TransportError) past ``max_bytes`` or when it ends early."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await stream.read(65536)
        except (ConnectionError, web.RequestPayloadError, aiohttp.ClientPayloadError) as exc:
            raise TransportError(f"body ended early: {exc}") from exc
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise TransportError(f"body over {max_bytes} bytes")
        chunks.append(chunk)


def _is_too_big(error: object) -> bool:
    """Whether a WebSocket ERROR message is aiohttp's "message too big" (close code 1009)."""
    return isinstance(error, aiohttp.WebSocketError) and error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
