"""The network layer: one aiohttp server per peer and one persistent WebSocket per neighbour pair.

For each pair of neighbours exactly one side dials: the peer whose name sorts first. The link
carries frames both ways, so a pair costs one handshake, and a dropped link is redialled by the
same side with exponential back-off (``reconnect_initial`` doubling to ``reconnect_max``).
Received data frames land in a bounded :class:`Mailbox` keyed by (kind, round, sender);
strategies ``collect`` from it with a deadline.

Large frames from the dialer do not go over the WebSocket: RFC 6455 makes a client mask every
frame it sends, and aiohttp does that by copying the message, XOR-ing it and concatenating it on
the event loop (~50 ms per 22 MB here, 3x the unmasked direction), and the acceptor unmasks it
again. Instead, the acceptor's HELLO reply carries a random per-connection token
(``meta["frames_token"]``), and the dialer POSTs each frame of ``_POST_FRAME_BYTES`` or more to
the acceptor's ``/frames`` as a plain HTTP body on a keep-alive connection, with the
``X-P2PDL-Sender`` and ``X-P2PDL-Frames-Token`` headers. The acceptor accepts a POST only from the
peer whose live, accepted link holds that token, so the known sender is still the authenticated
link's peer; the body then goes through the same ``_on_bytes`` path (same caps, same decoder, same
counters) as a WebSocket message. Control frames and everything the acceptor sends stay on the
WebSocket. A peer that gets no token in the HELLO reply sends everything over the WebSocket.

Trade-offs:

* Encoding and decoding of large frames run in a small codec thread pool, never on the event
  loop, so heartbeats and other neighbours' frames keep flowing while a 45 MB frame is packed.
* Every network await is bounded by a named timeout from :class:`~p2pdl.config.TransportConfig`
  (``connect_timeout``, ``handshake_timeout``, ``send_timeout``; a silent link is dropped by the
  WebSocket heartbeat, ``heartbeat_interval``). Every buffer is bounded (``inbox_frames``).
* A refused frame is counted by reason and logged at most once per sender per
  ``_LOG_INTERVAL`` seconds; it never closes the link and never reaches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from p2pdl.config import TransportConfig
from p2pdl.errors import (
    AuthError,
    FrameError,
    FrameSchemaError,
    FrameTooLargeError,
    InboxFullError,
    PeerTimeoutError,
    RateLimitedError,
    StaleFrameError,
    TransportError,
    UnknownSenderError,
)
from p2pdl.net.auth import (
    PEER_KEY,
    TOKEN_KEY,
    PeerSecurity,
    auth_middleware,
    make_reply,
    reply_from_meta,
    reply_to_meta,
    token_from_header,
    verify_reply,
)
from p2pdl.tasks import TaskOwner
from p2pdl.wire.codec import Frame, Limits, TensorSpec, check_tensors, decode_frame, encode_frame

log = logging.getLogger(__name__)

LinkState = Literal["connecting", "connected", "disconnected", "left"]
ExpectedTensors = Callable[[str, str], Mapping[str, TensorSpec]]
StatusProvider = Callable[[], dict[str, Any]]

HELLO = "hello"
BYE = "bye"
CONTROL_KINDS = frozenset({HELLO, BYE})

# WebSocket close codes (4000-4999 are for applications, RFC 6455 section 7.4.2).
CLOSE_PROTOCOL_ERROR = 4000
CLOSE_NOT_A_NEIGHBOR = 4003

# Frames under this many bytes are coded inline; larger ones go to the codec pool.
_INLINE_CODEC_BYTES = 256 * 1024
# The dialer sends frames of at least this many bytes as POST /frames bodies, not masked WS frames.
_POST_FRAME_BYTES = 64 * 1024
FRAMES_PATH = "/frames"
FRAMES_TOKEN_META = "frames_token"
SENDER_HEADER = "X-P2PDL-Sender"
TOKEN_HEADER = "X-P2PDL-Frames-Token"
_LOG_INTERVAL = 10.0  # seconds between repeated "frame refused" warnings per sender


@dataclass
class TransportStats:
    """Counters served by ``/status`` and written to the metrics. Bytes are wire bytes."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    frames_rejected: Counter[str] = field(default_factory=Counter)
    auth_rejected: Counter[str] = field(default_factory=Counter)
    connections_refused: int = 0
    connections_timed_out: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
            "frames_rejected": {
                "total": sum(self.frames_rejected.values()),
                "by_reason": dict(self.frames_rejected),
            },
            "auth_rejected": {"total": sum(self.auth_rejected.values()), "by_reason": dict(self.auth_rejected)},
            "connections_refused": self.connections_refused,
            "connections_timed_out": self.connections_timed_out,
        }


class _PeerGone(Exception):
    """Resolves a pending mailbox slot whose sender left the swarm."""


class Mailbox:
    """Received data frames, keyed by (kind, round, sender), with bounded buffering.

    A strategy ``collect``s the frames of one round; ``advance`` then marks earlier rounds of
    that kind as finished, so late frames for them are refused as stale instead of piling up.
    """

    def __init__(self, per_sender_limit: int) -> None:
        self._limit = per_sender_limit
        self._slots: dict[tuple[str, int, str], asyncio.Future[Frame]] = {}
        self._floor: dict[str, int] = {}
        self._gone: set[str] = set()
        self._arrival = asyncio.Event()  # set on every accepted frame; waiters clear and re-check
        self.superseded = 0  # frames replaced by a newer one from the same sender before use

    def _slot(self, kind: str, round_index: int, sender: str) -> asyncio.Future[Frame]:
        key = (kind, round_index, sender)
        slot = self._slots.get(key)
        if slot is None:
            slot = asyncio.get_running_loop().create_future()
            self._slots[key] = slot
        return slot

    def put(self, frame: Frame) -> None:
        """File a decoded frame; raises StaleFrameError or InboxFullError when refused."""
        floor = self._floor.get(frame.kind, 0)
        if frame.round < floor:
            raise StaleFrameError(
                f"{frame.kind} frame for round {frame.round} from {frame.sender!r} arrived after "
                f"the round closed (now at {floor})"
            )
        slot = self._slot(frame.kind, frame.round, frame.sender)
        if slot.done():
            raise StaleFrameError(f"duplicate {frame.kind} frame for round {frame.round} from {frame.sender!r}")
        unclaimed = [key for key, f in self._slots.items() if key[2] == frame.sender and f.done()]
        if len(unclaimed) >= self._limit:
            # A sender that outpaces this peer (it started later, or runs without a round barrier)
            # supersedes its own oldest frame of the same kind; anything else is refused.
            older = [key for key in unclaimed if key[0] == frame.kind and key[1] < frame.round]
            if not older:
                del self._slots[(frame.kind, frame.round, frame.sender)]
                raise InboxFullError(
                    f"{frame.sender!r} has {len(unclaimed)} unclaimed frames buffered (limit {self._limit})"
                )
            del self._slots[min(older, key=lambda key: key[1])]
            self.superseded += 1
        slot.set_result(frame)
        self._arrival.set()

    def _done_keys(self, kind: str, sender: str) -> list[tuple[str, int, str]]:
        return [
            key
            for key, slot in self._slots.items()
            if key[0] == kind and key[2] == sender and slot.done() and slot.exception() is None
        ]

    def take_latest(self, kind: str, sender: str) -> Frame | None:
        """The newest buffered frame of ``kind`` from ``sender``; older ones are dropped."""
        keys = self._done_keys(kind, sender)
        if not keys:
            return None
        newest = max(keys, key=lambda key: key[1])
        frame = self._slots[newest].result()
        for key in keys:
            del self._slots[key]
        return frame

    async def wait_for_senders(self, kind: str, senders: Collection[str], count: int, timeout: float) -> set[str]:
        """Wait up to ``timeout`` seconds until ``count`` of ``senders`` have a frame of ``kind`` buffered.

        Returns the senders that have one (possibly fewer than ``count`` on timeout). Rounds do not
        matter here: used by strategies without a round barrier (async gossip, parameter server).
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            self._arrival.clear()  # before checking, so an arrival after the check is not missed
            ready = {s for s in senders if self._done_keys(kind, s)}
            remaining = deadline - asyncio.get_running_loop().time()
            if len(ready) >= count or remaining <= 0:
                return ready
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrival.wait()

    async def collect(self, kind: str, round_index: int, senders: Collection[str], timeout: float) -> dict[str, Frame]:
        """Wait up to ``timeout`` seconds for each sender's frame; return those that arrived."""
        waiting = {s: self._slot(kind, round_index, s) for s in senders if s not in self._gone}
        pending = [f for f in waiting.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        arrived: dict[str, Frame] = {}
        for sender, slot in waiting.items():
            if slot.done() and slot.exception() is None:
                arrived[sender] = slot.result()
                del self._slots[(kind, round_index, sender)]
        return arrived

    def advance(self, kind: str, floor: int) -> None:
        """Rounds of ``kind`` below ``floor`` are finished: drop their slots, refuse late frames."""
        self._floor[kind] = max(floor, self._floor.get(kind, 0))
        for key in [k for k in self._slots if k[0] == kind and k[1] < floor]:
            slot = self._slots.pop(key)
            if not slot.done():
                slot.cancel()

    def mark_gone(self, sender: str) -> None:
        """``sender`` left: wake every collect waiting on it instead of letting it time out."""
        self._gone.add(sender)
        for key, slot in list(self._slots.items()):
            if key[2] == sender and not slot.done():
                slot.set_exception(_PeerGone(sender))
                slot.exception()  # mark retrieved: nobody else will look at it
                del self._slots[key]

    def highest_round(self, kind: str, senders: Collection[str]) -> int | None:
        """The latest round of ``kind`` already buffered from any of ``senders``."""
        rounds = [r for (k, r, s), f in self._slots.items() if k == kind and s in senders and f.done()]
        return max(rounds, default=None)

    def mark_back(self, sender: str) -> None:
        self._gone.discard(sender)

    def pending_count(self) -> int:
        return len(self._slots)


WebSocket = aiohttp.ClientWebSocketResponse | web.WebSocketResponse


@dataclass
class _Link:
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
    bucket_tokens: float = 0.0  # rate limit: frames this link may still send now (token bucket)
    bucket_time: float = 0.0

    def has_left(self) -> bool:
        # A method, not a comparison at the call site: the state changes across awaits.
        return self.state == "left"


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
        self._links: dict[str, _Link] = {}
        self._codec = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"p2pdl-codec-{name}")
        self._tasks = TaskOwner(name)
        self._guard = _ConnectionGuard(
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
        self._last_warning: dict[str, float] = {}
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
            shutdown_timeout=self._config.shutdown_timeout,
        )
        await self._runner.setup()
        site = _GuardedSite(
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

        aiohttp cancels a pending write drain when the other side drops the connection first
        (seen when a whole swarm stops at once): the link is gone either way, so that
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
                self._tasks.spawn(self._close_quietly(link.ws), f"unlink-{name}")
            self.mailbox.mark_gone(name)
        for name in wanted:
            self.mailbox.mark_back(name)

    def _start_dialing(self, link: _Link) -> None:
        if link.dials and not self._closing and (link.dialer is None or link.dialer.done()):
            link.dialer = self._tasks.spawn(self._dial_forever(link), f"dial-{link.name}")

    async def _close_quietly(self, ws: WebSocket) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._config.shutdown_timeout):
                await ws.close()

    def _add_link(self, neighbor: str) -> _Link:
        if neighbor == self.name:
            raise ValueError("a peer is not its own neighbour")
        link = _Link(
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
                self._tasks.spawn(self._close_quietly(link.ws), f"readdress-{neighbor}")
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

    async def _dial_forever(self, link: _Link) -> None:
        backoff = self._config.reconnect_initial
        assert self._session is not None
        while not self._closing and not link.has_left():
            try:
                url = f"{self.security.scheme}://{link.address}/ws"
                headers = self.security.headers(target=link.name, method="GET", path="/ws")
                async with asyncio.timeout(self._config.connect_timeout):
                    ws = await self._session.ws_connect(
                        url,
                        max_msg_size=self._limits.max_frame_bytes,
                        heartbeat=self._config.heartbeat_interval,
                        compress=0,
                        headers=headers,
                    )
                async with asyncio.timeout(self._config.handshake_timeout):
                    await self._send_on(ws, Frame(kind=HELLO, sender=self.name, round=0, step=0))
                    reply = await ws.receive()
                if reply.type != aiohttp.WSMsgType.BINARY:
                    code = ws.close_code
                    raise TransportError(f"{link.name} refused the handshake (close code {code})")
                frame = self._decode_small(reply.data, link.name)
                if frame.kind != HELLO:
                    raise TransportError(f"{link.name} answered the handshake with {frame.kind!r}")
                self._verify_acceptor(link.name, headers, frame)
                token = frame.meta.get(FRAMES_TOKEN_META)
                link.frames_token = token if isinstance(token, str) else ""
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
        ws = web.WebSocketResponse(
            max_msg_size=self._limits.max_frame_bytes,
            heartbeat=self._config.heartbeat_interval,
            compress=False,
        )
        await ws.prepare(request)
        try:
            async with asyncio.timeout(self._config.handshake_timeout):
                first = await ws.receive()
        except TimeoutError:
            await ws.close(code=CLOSE_PROTOCOL_ERROR, message=b"handshake timeout")
            return ws
        if first.type != aiohttp.WSMsgType.BINARY:
            await ws.close(code=CLOSE_PROTOCOL_ERROR, message=b"expected a binary hello frame")
            return ws
        try:
            hello = self._decode_small(first.data, None)
        except FrameError as exc:
            self._reject(exc, request.remote or "?")
            await ws.close(code=CLOSE_PROTOCOL_ERROR, message=b"bad hello frame")
            return ws
        authenticated = request.get(PEER_KEY)
        if self.security.verifier is not None and authenticated != hello.sender:
            self._reject(UnknownSenderError(f"token of {authenticated!r} but hello from {hello.sender!r}"), "?")
            await ws.close(code=CLOSE_NOT_A_NEIGHBOR, message=b"hello does not match the credentials")
            return ws
        link = self._links.get(hello.sender)
        if link is None and hello.kind == HELLO and self._admit(hello.sender):
            # A member this peer does not link to yet (its view may lag a rewiring): accept, so
            # both ends converge without a refused-and-retried dial.
            link = self._add_link(hello.sender)
        if hello.kind != HELLO or link is None or link.dials:
            self._reject(
                UnknownSenderError(f"{hello.sender!r} is not a neighbour that dials here"),
                hello.sender,
            )
            await ws.close(code=CLOSE_NOT_A_NEIGHBOR, message=b"not a neighbour")
            return ws
        if link.state == "left":
            link.state = "connecting"
            self.mailbox.mark_back(link.name)
        token = secrets.token_hex(16)
        meta: dict[str, str | int | float | bool | None] = {FRAMES_TOKEN_META: token}
        if self.security.secret is not None:
            # Prove to the dialer that it reached a swarm member, bound to the dialer's own token.
            meta.update(reply_to_meta(make_reply(self.security.secret, request[TOKEN_KEY], self_name=self.name)))
        reply = Frame(kind=HELLO, sender=self.name, round=0, step=0, meta=meta)
        # Valid before the reply leaves: the dialer may POST the moment it reads the token.
        link.frames_token = token
        try:
            try:
                async with asyncio.timeout(self._config.handshake_timeout):
                    await self._send_on(ws, reply)
            except (TimeoutError, ConnectionError, aiohttp.ClientError):
                return ws
            old = link.ws
            if old is not None and not old.closed:
                await old.close()
            await self._serve_link(link, ws)
            return ws
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
            raise web.HTTPBadRequest(text="body shorter than Content-Length")
        await self._on_bytes(link, data)
        return web.Response(status=204)

    async def _serve_link(self, link: _Link, ws: WebSocket) -> None:
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

    async def _read_loop(self, link: _Link, ws: WebSocket) -> None:
        # Bounded by the heartbeat: aiohttp closes the socket when a ping gets no pong.
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                await self._on_bytes(link, message.data)
            elif message.type == aiohttp.WSMsgType.TEXT:
                self.stats.frames_rejected["format"] += 1
            else:
                break
            if link.has_left():
                await ws.close()
                break

    def _within_rate(self, link: _Link) -> bool:
        """Token bucket per link: ``max_frames_per_second``, bursts of up to twice that."""
        rate = self._config.max_frames_per_second
        now = time.monotonic()
        if link.bucket_time == 0.0:
            link.bucket_tokens, link.bucket_time = 2 * rate, now
        link.bucket_tokens = min(2 * rate, link.bucket_tokens + (now - link.bucket_time) * rate)
        link.bucket_time = now
        if link.bucket_tokens < 1.0:
            return False
        link.bucket_tokens -= 1.0
        return True

    async def _on_bytes(self, link: _Link, data: bytes) -> None:
        self.stats.bytes_received += len(data)
        if not self._within_rate(link):
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

    def _verify_acceptor(self, name: str, sent_headers: Mapping[str, str], hello: Frame) -> None:
        """With a secret, the acceptor must prove it holds it too (no impostor answers a dial)."""
        if self.security.verifier is None:
            return
        sent = token_from_header(next(iter(sent_headers.values())))
        reply = reply_from_meta(hello.meta, sent=sent, sender=name)
        verify_reply(self.security.verifier, reply, sent)

    def _count_auth_reject(self, request: web.Request, exc: AuthError) -> None:
        self.stats.auth_rejected[exc.reason] += 1

    def _decode_small(self, data: bytes, sender: str | None) -> Frame:
        known = None if sender is None else (sender,)
        frame = decode_frame(data, limits=self._limits, known_senders=known)
        if frame.tensors:
            raise FrameSchemaError(f"{frame.kind!r} control frame must not carry tensors")
        return frame

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
        now = time.monotonic()
        if now - self._last_warning.get(sender, -_LOG_INTERVAL) >= _LOG_INTERVAL:
            self._last_warning[sender] = now
            log.warning("%s: refused a frame from %s (%s): %s", self.name, sender, exc.reason, exc)

    # ------------------------------------------------------------------ sending

    async def _send_on(self, ws: WebSocket, frame: Frame) -> None:
        data = encode_frame(frame, compression="never")
        await ws.send_bytes(data)
        self.stats.bytes_sent += len(data)
        self.stats.frames_sent += 1

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

    async def _post_frame(self, link: _Link, data: bytes) -> None:
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
        chunk = await content.readany()
        if not chunk:
            return None
        chunks.append(chunk[:remaining] if len(chunk) > remaining else chunk)
        remaining -= len(chunks[-1])
    return b"".join(chunks)


async def read_bounded(stream: aiohttp.StreamReader, max_bytes: int) -> bytes:
    """Read a whole body, refusing it (TransportError) as soon as it passes ``max_bytes``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise TransportError(f"body over {max_bytes} bytes")
        chunks.append(chunk)


class _ConnectionGuard:
    """Connection limits for the server: in total, per remote address, and a request deadline.

    Enforced at the TCP level (a wrapper around aiohttp's protocol factory), before any byte is
    parsed: a connection over a limit is aborted at once, and one that has not delivered a complete
    request head within ``request_timeout`` seconds (a slowloris) is aborted by a timer. aiohttp has
    no header-read timeout of its own.
    """

    def __init__(self, *, max_connections: int, per_address: int, request_timeout: float, stats: TransportStats):
        self.max_connections = max_connections
        self.per_address = per_address
        self.request_timeout = request_timeout
        self._stats = stats
        self._by_address: Counter[str] = Counter()
        self._served: set[int] = set()  # id() of transports that delivered at least one request

    @property
    def open_connections(self) -> int:
        return sum(self._by_address.values())

    def admit(self, address: str) -> bool:
        if self.open_connections >= self.max_connections or self._by_address[address] >= self.per_address:
            self._stats.connections_refused += 1
            return False
        self._by_address[address] += 1
        return True

    def release(self, address: str, transport: asyncio.BaseTransport) -> None:
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]
        self._served.discard(id(transport))

    def served(self, transport: asyncio.BaseTransport) -> bool:
        return id(transport) in self._served

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.transport is not None:
            self._served.add(id(request.transport))
        response: web.StreamResponse = await handler(request)
        return response


class _GuardedProtocol(asyncio.Protocol):
    """Wraps one aiohttp RequestHandler; counts the connection and enforces the request deadline."""

    def __init__(self, inner: asyncio.Protocol, guard: _ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._address: str | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self._guard.admit(address):
            transport.abort()  # type: ignore[attr-defined]
            return
        self._address, self._transport = address, transport
        self._inner.connection_made(transport)
        self._timer = asyncio.get_running_loop().call_later(self._guard.request_timeout, self._deadline)

    def _deadline(self) -> None:
        if self._transport is not None and not self._guard.served(self._transport):
            self._guard._stats.connections_timed_out += 1
            self._transport.abort()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._address is None or self._transport is None:
            return  # refused in connection_made: aiohttp's handler never saw this connection
        self._guard.release(self._address, self._transport)
        self._inner.connection_lost(exc)


class _GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose protocol factory is wrapped by a :class:`_ConnectionGuard`.

    Mirrors ``TCPSite.start`` (aiohttp 3.9+), which has no hook for wrapping the factory.
    """

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, guard: _ConnectionGuard, **kwargs: Any):
        super().__init__(runner, host, port, **kwargs)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        guard = self._guard
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _GuardedProtocol(server(), guard),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
