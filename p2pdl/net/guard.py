"""Guards in front of the server: connection limits, a request-head deadline, a frame rate limit.

The connection limits act at the TCP level (a wrapper around aiohttp's protocol factory), before
any byte is parsed: a connection over a limit is aborted at once, and one that has not delivered
a complete request head within ``request_timeout`` seconds (a slowloris) is aborted by a timer;
aiohttp has no header-read timeout of its own. The rate limit is a token bucket per link,
checked before a frame is decoded, so a flood costs a counter increment, not a parse. A request
aiohttp cannot parse is counted and logged as one line at most once per interval
(:class:`ServerLog`), instead of a traceback per request.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from p2pdl.net.stats import LogThrottle, TransportStats

log = logging.getLogger(__name__)


@dataclass
class TokenBucket:
    """Rate limit of one link: ``rate`` frames per second, bursts of up to twice that."""

    tokens: float = 0.0  # frames the link may still send now
    time: float = 0.0  # time.monotonic() of the last refill; 0.0 before the first frame

    def take(self, rate: float) -> bool:
        now = time.monotonic()
        if self.time == 0.0:
            self.tokens, self.time = 2 * rate, now
        self.tokens = min(2 * rate, self.tokens + (now - self.time) * rate)
        self.time = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class ConnectionGuard:
    """Connection limits for the server: in total, per remote address, and a request deadline."""

    def __init__(self, *, max_connections: int, per_address: int, request_timeout: float, stats: TransportStats):
        self.max_connections = max_connections
        self.per_address = per_address
        self.request_timeout = request_timeout
        self.stats = stats
        self._by_address: Counter[str] = Counter()
        self._served: set[int] = set()  # id() of transports that delivered at least one request

    @property
    def open_connections(self) -> int:
        return sum(self._by_address.values())

    def admit(self, address: str) -> bool:
        if self.open_connections >= self.max_connections or self._by_address[address] >= self.per_address:
            self.stats.connections_refused += 1
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

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
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
            self._guard.stats.connections_timed_out += 1
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


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose protocol factory is wrapped by a :class:`ConnectionGuard`.

    Mirrors ``TCPSite.start`` (aiohttp 3.9+), which has no hook for wrapping the factory.
    """

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, guard: ConnectionGuard, **kwargs: Any):
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


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """The logger aiohttp's request handler reports to (``AppRunner(logger=...)``).

    aiohttp calls ``exception`` for every request it cannot parse (it answers 400) and for every
    handler that raised (500), and ``debug`` for some refusals; by default each is a traceback.
    Here a refused request (an ``HttpProcessingError``: bad request line, bad header, oversized
    line, bad body framing) is counted in ``bad_requests`` and logged as one line at most once per
    :data:`~p2pdl.net.stats.LOG_INTERVAL`; anything else is a bug in a handler and keeps its
    traceback, under the same rate limit.
    """

    def __init__(self, server_name: str, stats: TransportStats) -> None:
        super().__init__(log, {})
        self._server_name = server_name
        self._stats = stats
        self._throttle = LogThrottle()

    def exception(
        self,
        msg: object,
        *args: object,
        exc_info: Any = True,
        stack_info: bool = False,
        stacklevel: int = 1,
        extra: Mapping[str, object] | None = None,
        **kwargs: object,
    ) -> None:
        error = _exception_of(exc_info)
        if isinstance(error, HttpProcessingError):
            self._refused(error)
        elif self._throttle.allow("handler_error"):
            self.logger.error("%s: %s", self._server_name, _message(msg, args), exc_info=exc_info)

    def debug(
        self,
        msg: object,
        *args: object,
        exc_info: Any = None,
        stack_info: bool = False,
        stacklevel: int = 1,
        extra: Mapping[str, object] | None = None,
        **kwargs: object,
    ) -> None:
        error = _exception_of(exc_info)
        if isinstance(error, HttpProcessingError):
            self._refused(error)  # e.g. a first request line that is not HTTP at all
        else:
            self.logger.debug("%s: %s", self._server_name, _message(msg, args))

    def _refused(self, error: HttpProcessingError) -> None:
        self._stats.bad_requests += 1
        if self._throttle.allow("bad_request"):
            detail = " ".join(str(error.message).split())[:160]
            self.logger.warning(
                "%s: refused a malformed HTTP request (%s %s); %d so far",
                self._server_name,
                error.code,
                detail,
                self._stats.bad_requests,
            )


def _exception_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        error = exc_info[1]
        return error if isinstance(error, BaseException) else None
    return sys.exc_info()[1] if exc_info else None


def _message(msg: object, args: tuple[object, ...]) -> str:
    try:
        return str(msg) % args if args else str(msg)
    except (TypeError, ValueError):
        return f"{msg} {args}"
