"""Plain HTTP between peers, beside the WebSocket links: ``POST /frames``, JSON requests, bounded bodies.

Large frames from the dialer do not go over the WebSocket: RFC 6455 makes a client mask every
frame it sends, and aiohttp does that by copying and XOR-ing the whole message on the event loop,
several times slower than the unmasked direction, and the acceptor unmasks it again. Instead the
acceptor's HELLO reply carries a random per-connection token (``meta["frames_token"]``), and the
dialer POSTs each large frame to the acceptor's ``/frames`` as a plain HTTP body on a keep-alive
connection, with the :data:`SENDER_HEADER` and :data:`TOKEN_HEADER` headers (:func:`post_frame`).
The acceptor takes a POST only from the peer whose live, accepted link holds that token
(:mod:`~p2pdl.net.receive`), so the known sender is still the authenticated link's peer. Control
frames and everything the acceptor sends stay on the WebSocket.

Every body read here is bounded: :func:`read_exactly` by the ``Content-Length`` the receiver has
already checked against its cap, :func:`read_bounded` by an explicit ``max_bytes``. The trade-off
of ``/frames`` is a second connection per dialling link, and a second way in that must carry the
same checks as the WebSocket; it does, as both end in the same receive path.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Final

import aiohttp
from aiohttp import web

from p2pdl.errors import PeerTimeoutError, TransportError
from p2pdl.net.auth import PeerSecurity
from p2pdl.net.links import Link

__all__ = [
    "FRAMES_PATH",
    "SENDER_HEADER",
    "TOKEN_HEADER",
    "StatusProvider",
    "add_info_routes",
    "open_stream",
    "post_frame",
    "read_bounded",
    "read_exactly",
    "request_json",
]

StatusProvider = Callable[[], dict[str, Any]]

FRAMES_PATH: Final = "/frames"
SENDER_HEADER: Final = "X-P2PDL-Sender"
TOKEN_HEADER: Final = "X-P2PDL-Frames-Token"


def add_info_routes(app: web.Application, status: StatusProvider) -> None:
    """Serve ``GET /healthz`` (always ``{"ok": true}``) and ``GET /status`` (``status()`` as JSON)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def status_handler(request: web.Request) -> web.Response:
        return web.json_response(status())

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status_handler)


async def post_frame(
    session: aiohttp.ClientSession, link: Link, data: bytes, *, self_name: str, security: PeerSecurity
) -> None:
    """Send one encoded frame to ``link``'s acceptor as a ``POST /frames`` body (the caller bounds the time)."""
    headers = {
        SENDER_HEADER: self_name,
        TOKEN_HEADER: link.frames_token,
        **security.headers(target=link.name, method="POST", path=FRAMES_PATH),
    }
    url = f"{security.scheme}://{link.address}{FRAMES_PATH}"
    # aiohttp warns about any raw body over 1 MiB (a large write "might lock the event loop"). The
    # body is one frame, already encoded: the transport buffers it and the caller bounds the send
    # by send_timeout, exactly as for a WebSocket send of the same bytes, and a BytesIO body would
    # cost an executor hop per 64 KiB instead. Built outside any await, so no other task's
    # warnings are touched.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sending a large body directly with raw bytes", ResourceWarning)
        body = aiohttp.BytesPayload(data)
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 204:
            raise TransportError(f"{link.name} refused a frame: HTTP {response.status}")


async def request_json(
    session: aiohttp.ClientSession,
    security: PeerSecurity,
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
    headers = security.headers(target=target, method=method, path=path)
    url = f"{security.scheme}://{address}{path}"
    try:
        async with asyncio.timeout(timeout):
            async with session.request(method, url, json=payload, headers=headers) as response:
                if response.status != 200:
                    raise TransportError(f"{method} {address}{path}: HTTP {response.status}")
                body = await read_bounded(response.content, max_bytes)
        return json.loads(body)
    except TimeoutError as exc:
        raise PeerTimeoutError(f"{method} {address}{path} took longer than {timeout}s") from exc
    except (aiohttp.ClientError, OSError, ValueError, RecursionError) as exc:
        # RecursionError: a reply nested deeper than the JSON parser's stack (hostile or broken).
        raise TransportError(f"{method} {address}{path} failed: {exc}") from exc


def open_stream(
    session: aiohttp.ClientSession,
    security: PeerSecurity,
    address: str,
    path: str,
    timeout: float,
    *,
    target: str | None = None,
    params: Mapping[str, str] | None = None,
) -> Any:
    """A streamed GET (an aiohttp response context manager); the caller bounds its reads.

    ``params`` go in the query string; the token's purpose names the path without it.
    """
    return session.get(
        f"{security.scheme}://{address}{path}",
        params=params,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_read=timeout),
        headers=security.headers(target=target, method="GET", path=path),
    )


async def read_exactly(content: aiohttp.StreamReader, length: int) -> bytes | None:
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
