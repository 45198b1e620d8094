"""The dialling side of a link's life: connect, serve until it drops, back off, connect again.

For each pair of neighbours exactly one side dials (the name that sorts first, see
:mod:`~p2pdl.net.links`), so a pair costs one handshake. A dropped link is redialled by the same
side with exponential back-off, ``reconnect_initial`` doubling to ``reconnect_max`` seconds and
reset by each successful handshake. The trade-off: a neighbour that restarts waits up to
``reconnect_max`` seconds for the next attempt, in exchange for a dead address costing a
handful of connection attempts a minute rather than a busy loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from p2pdl.config import TransportConfig
from p2pdl.errors import AuthError, FrameError, TransportError
from p2pdl.net.auth import PeerSecurity
from p2pdl.net.links import Link, WebSocket, dial
from p2pdl.net.stats import TransportStats
from p2pdl.wire import Limits

__all__ = ["dial_forever"]

log = logging.getLogger(__name__)


async def dial_forever(
    link: Link,
    *,
    session: aiohttp.ClientSession,
    self_name: str,
    security: PeerSecurity,
    limits: Limits,
    config: TransportConfig,
    stats: TransportStats,
    serve: Callable[[Link, WebSocket], Awaitable[None]],
    stopping: Callable[[], bool],
) -> None:
    """Keep ``link`` dialled until ``stopping()`` or the neighbour leaves; ``serve`` runs each connection.

    A failed attempt is recorded in ``link.last_error``; only cancellation ends the loop early.
    """
    backoff = config.reconnect_initial
    while not stopping() and not link.has_left():
        try:
            ws, link.frames_token = await dial(
                session,
                link,
                self_name=self_name,
                security=security,
                limits=limits,
                config=config,
                stats=stats,
            )
            backoff = config.reconnect_initial
            try:
                await serve(link, ws)
            finally:
                link.frames_token = ""
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, OSError, TimeoutError, FrameError, TransportError, AuthError) as exc:
            if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status == 401:
                exc = TransportError(f"{link.name} refused our credentials (HTTP 401): is the secret the same?")
            link.last_error = f"{type(exc).__name__}: {exc}"
            log.debug("%s: dial %s failed: %s", self_name, link.name, link.last_error)
        if stopping() or link.has_left():
            return
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, config.reconnect_max)
