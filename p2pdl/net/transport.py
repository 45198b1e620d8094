"""The network layer's front: one aiohttp server per peer and one persistent WebSocket per neighbour pair.

:class:`Transport` owns the server, the link table, the tasks that dial and the send path; the
parts it uses live beside it: :mod:`~p2pdl.net.receive` (accepting links and every way a frame
comes in), :mod:`~p2pdl.net.dialer` (dialling with back-off), :mod:`~p2pdl.net.links` (link state
and the HELLO handshake), :mod:`~p2pdl.net.http` (``POST /frames``, JSON requests, ``/healthz``
and ``/status``), :mod:`~p2pdl.net.mailbox` (where received frames wait for a strategy),
:mod:`~p2pdl.net.stream` (frame streams), :mod:`~p2pdl.net.guard` (connection limits, the
request-head deadline, the frame rate limit), :mod:`~p2pdl.net.stats` (counters) and
:mod:`~p2pdl.net.auth` (credentials and TLS).

For each pair of neighbours exactly one side dials, and the link carries frames both ways, so a
pair costs one handshake. Frames of ``_POST_FRAME_BYTES`` or more go, both ways, over the link's
frame stream (:mod:`~p2pdl.net.stream`), received straight into reused buffers; while a link has
none, the dialer sends them as ``POST /frames`` bodies instead of masked WebSocket messages (see
:mod:`~p2pdl.net.http`) and the acceptor on the WebSocket.

Trade-offs:

* Decoding of large frames, and encoding of those that need a copy or lz4, run in a small codec
  thread pool, never on the event loop, so heartbeats and other neighbours' frames keep flowing
  meanwhile. A frame sent from its tensors' own memory is encoded on the loop: it is only its
  msgpack framing, and the trip to a thread (and back through the GIL) would cost more.
* :meth:`Transport.broadcast` and :meth:`Transport.send` send a frame's large tensors over frame
  streams from the tensors' own memory (:func:`~p2pdl.wire.encode.encode_frame_parts`), with no
  copy of the tensor in user space; the bytes are the same as a copied frame's. The price is a
  contract: the frame's tensors must not change until the call returns (each send then has all
  of its bytes in the kernel, or its stream was aborted). :meth:`Transport.encode` still returns
  a copy, for callers that keep or resend an encoded frame after its tensors have changed.
* Every network await is bounded by a named timeout from :class:`~p2pdl.config.TransportConfig`
  (``connect_timeout``, ``handshake_timeout``, ``send_timeout``; a silent link is dropped by the
  WebSocket heartbeat, ``heartbeat_interval``). Every buffer is bounded (``inbox_frames``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from p2pdl.config import TransportConfig
from p2pdl.errors import PeerTimeoutError, TransportError
from p2pdl.net import http
from p2pdl.net.auth import PeerSecurity, auth_middleware
from p2pdl.net.dialer import dial_forever
from p2pdl.net.guard import ConnectionGuard, GuardedSite, ServerLog
from p2pdl.net.http import FRAMES_PATH, StatusProvider
from p2pdl.net.links import BYE, Link, close_quietly
from p2pdl.net.mailbox import Mailbox
from p2pdl.net.receive import INLINE_CODEC_BYTES, ExpectedTensors, LinkReceiver
from p2pdl.net.stats import LogThrottle, TransportStats
from p2pdl.net.stream import STREAM_PATH
from p2pdl.tasks import TaskOwner
from p2pdl.wire import EncodedFrame, Frame, Limits, encode_frame, encode_frame_parts
from p2pdl.wire.encode import encode_frame_parts_inline

log = logging.getLogger(__name__)

# The dialer sends frames of at least this many bytes as POST /frames bodies, not masked WS frames.
_POST_FRAME_BYTES = 64 * 1024


def _frame_bytes(frame: Frame) -> int:
    """The bytes of ``frame``'s tensor data."""
    return sum(t.numel() * t.element_size() for t in frame.tensors.values())


class Transport(LinkReceiver):
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
        frame_streams: bool = True,
    ) -> None:
        """``frame_streams``: the dialer of each link opens a frame stream for large frames (both ways)."""
        self.name = name
        self._frame_streams = frame_streams
        self.security = security or PeerSecurity(name=name)
        self._listen = (listen_host, listen_port)
        self._addresses = dict(addresses)
        self._config = config
        self._expected = expected_tensors
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
        http.add_info_routes(self._app, status)
        self._app.router.add_get("/ws", self._accept)
        self._app.router.add_post(FRAMES_PATH, self._accept_frame)
        self._app.router.add_get(STREAM_PATH, self._accept_stream)
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
        # A copy: a neighbour's bye, handled during the awaits below, removes its link.
        for link in list(self._links.values()):
            if link.stream is not None:
                link.stream.close()
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
            if link.stream is not None:
                link.stream.close()
            if link.ws is not None and not link.ws.closed:
                self._tasks.spawn(close_quietly(link.ws, self._config.shutdown_timeout), f"unlink-{name}")
            self.mailbox.mark_gone(name)
        for name in wanted:
            self.mailbox.mark_back(name)

    def _start_dialing(self, link: Link) -> None:
        if link.dials and not self._closing and (link.dialer is None or link.dialer.done()):
            link.dialer = self._tasks.spawn(self._dial_forever(link), f"dial-{link.name}")

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
                "bytes_sent": lk.bytes_sent,
                "bytes_received": lk.bytes_received,
            }
            for lk in self._links.values()
        ]

    async def wait_connected(self, timeout: float) -> tuple[str, ...]:
        """Wait until every neighbour is connected or left; return those still missing."""
        waits = [asyncio.ensure_future(lk.connected.wait()) for lk in self._links.values() if lk.state != "left"]
        try:
            if waits:
                await asyncio.wait(waits, timeout=timeout)
        finally:
            # Also when the caller is cancelled: no waiter outlives this call.
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        return tuple(n for n, lk in self._links.items() if lk.state not in ("connected", "left"))

    # ------------------------------------------------------------------ dialling

    async def _dial_forever(self, link: Link) -> None:
        assert self._session is not None
        await dial_forever(
            link,
            session=self._session,
            self_name=self.name,
            security=self.security,
            limits=self._limits,
            config=self._config,
            stats=self.stats,
            serve=self._serve_link,
            stopping=lambda: self._closing,
        )

    # ------------------------------------------------------------------ sending

    async def encode(self, frame: Frame) -> bytes:
        """Encode into one ``bytes`` (a copy the caller may keep), off the event loop when large."""
        if _frame_bytes(frame) > INLINE_CODEC_BYTES:
            return await asyncio.get_running_loop().run_in_executor(
                self._codec,
                functools.partial(encode_frame, frame, compression=self._config.compression),
            )
        return encode_frame(frame, compression=self._config.compression)

    async def encode_parts(self, frame: Frame) -> EncodedFrame:
        """Encode without copying large tensors (valid while they do not change).

        On the event loop when that is cheap (no more than ``INLINE_CODEC_BYTES`` to copy, nothing
        to compress): a trip through the codec thread would cost more than the encoding itself.
        """
        compression = self._config.compression
        inline = encode_frame_parts_inline(frame, compression=compression, max_copy_bytes=INLINE_CODEC_BYTES)
        if inline is not None:
            return inline
        return await asyncio.get_running_loop().run_in_executor(
            self._codec, functools.partial(encode_frame_parts, frame, compression=compression)
        )

    async def send_encoded(self, neighbor: str, data: bytes | EncodedFrame) -> None:
        """Send one encoded frame; raises TransportError if the link is down or too slow.

        An :class:`EncodedFrame` goes over the link's frame stream as its pieces (no copy); on
        any other path it is joined into one ``bytes`` first. Its tensors must not change until
        this returns.
        """
        link = self._links.get(neighbor)
        if link is None:
            raise TransportError(f"{neighbor!r} is not a neighbour of {self.name!r}")
        ws = link.ws
        if ws is None or ws.closed:
            raise TransportError(f"link to {neighbor!r} is {link.state}")
        stream = link.stream
        nbytes = len(data)
        if stream is not None and stream.usable and nbytes >= _POST_FRAME_BYTES:
            try:
                async with asyncio.timeout(self._config.send_timeout):
                    if isinstance(data, EncodedFrame):
                        await stream.send(data.pieces, borrowed=data.borrowed)
                    else:
                        await stream.send(data)
            except TimeoutError as exc:
                stream.abort()  # nothing of this record may go out later
                raise PeerTimeoutError(
                    f"send to {neighbor!r} took longer than send_timeout={self._config.send_timeout}s"
                ) from exc
            except ConnectionError:
                pass  # the stream closed under this send: the frame goes the other way below
            else:
                self._count_sent(link, nbytes)
                self.stats.stream_frames_sent += 1
                return
        # Joined here only when broadcast did not join it already (a stream closed under a send).
        payload = data.join() if isinstance(data, EncodedFrame) else data
        try:
            if link.dials and link.frames_token and nbytes >= _POST_FRAME_BYTES:
                async with asyncio.timeout(self._config.send_timeout):
                    await self._post_frame(link, payload)
            else:
                async with asyncio.timeout(self._config.send_timeout), link.send_lock:
                    await ws.send_bytes(payload)
        except TimeoutError as exc:
            raise PeerTimeoutError(
                f"send to {neighbor!r} took longer than send_timeout={self._config.send_timeout}s"
            ) from exc
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            raise TransportError(f"send to {neighbor!r} failed: {exc}") from exc
        self._count_sent(link, nbytes)

    def _count_sent(self, link: Link, nbytes: int) -> None:
        self.stats.bytes_sent += nbytes
        self.stats.frames_sent += 1
        link.bytes_sent += nbytes

    async def _post_frame(self, link: Link, data: bytes) -> None:
        assert self._session is not None
        await http.post_frame(self._session, link, data, self_name=self.name, security=self.security)

    async def send(self, neighbor: str, frame: Frame) -> None:
        """Send ``frame`` to one neighbour; its tensors must not change until this returns."""
        failures = await self.broadcast(frame, [neighbor])
        if neighbor in failures:
            raise failures[neighbor]

    async def broadcast(self, frame: Frame, neighbors: Collection[str]) -> dict[str, TransportError]:
        """Encode once, send to each neighbour concurrently; return the failures by neighbour.

        Large tensors go over frame streams from their own memory (see the module docstring):
        ``frame``'s tensors must not change until this returns.
        """
        if not neighbors:
            return {}
        encoded = await self.encode_parts(frame)
        if encoded.borrowed and not all(self._has_stream(n) for n in neighbors):
            # Some frame goes through aiohttp, which needs one bytes: join it once, off the loop.
            await asyncio.get_running_loop().run_in_executor(self._codec, encoded.join)
        results = await asyncio.gather(*(self.send_encoded(n, encoded) for n in neighbors), return_exceptions=True)
        failures: dict[str, TransportError] = {}
        for neighbor, result in zip(neighbors, results, strict=True):
            if isinstance(result, TransportError):
                failures[neighbor] = result
            elif isinstance(result, BaseException):
                raise result
        return failures

    def _has_stream(self, neighbor: str) -> bool:
        link = self._links.get(neighbor)
        return link is not None and link.stream is not None and link.stream.usable

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
        return await http.request_json(
            self._session, self.security, address, method, path, payload, timeout, max_bytes, target=target
        )

    def open_stream(
        self,
        address: str,
        path: str,
        timeout: float,
        *,
        target: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """A streamed GET (an aiohttp response context manager); the caller bounds its reads."""
        if self._session is None:
            raise TransportError("transport is not started")
        return http.open_stream(self._session, self.security, address, path, timeout, target=target, params=params)
