"""The dashboard and ``/metrics`` over HTTP: routes, static files and the metrics server.

Routes, served by every peer: ``GET /`` and ``GET /dashboard`` (the page), ``GET /dashboard.js``
and ``GET /dashboard.css`` (its only assets, shipped as package data: the page loads nothing from
anywhere else, so it works offline), ``GET /api/swarm`` (the JSON the page polls) and
``GET /metrics`` (Prometheus).

Authentication follows one rule: on the peer's own port these routes sit behind the transport's
middleware like every other route, so with a swarm secret they need an HMAC token, which a
browser or a Prometheus scraper cannot mint. For them, :class:`MetricsServer` serves the same
routes on a second address (``[observe] listen``), guarded by a static *metrics token* that the
client sends as ``Authorization: Bearer TOKEN`` (Prometheus ``authorization``) or as the password
of HTTP Basic auth (a browser asks for it; the user name is ignored). Trade-off: a static token
can be replayed by whoever sees it, unlike the swarm's single-use HMAC tokens, so it only grants
reading telemetry, never a route that changes a peer; use TLS or a loopback bind plus an SSH
tunnel where the network is not trusted. A refused metrics credential is a bare 401, counted.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from p2pdl.config import parse_address
from p2pdl.net.auth import Secret
from p2pdl.obs.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]
_STATIC = {
    "/dashboard.js": ("dashboard.js", "application/javascript"),
    "/dashboard.css": ("dashboard.css", "text/css"),
}
# The page's own assets only: no script, style, image or connection from anywhere else.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def _asset(name: str) -> bytes:
    return resources.files("p2pdl.obs").joinpath("static", name).read_bytes()


def routes(*, swarm: Callable[[], Mapping[str, Any]], metrics: Callable[[], bytes]) -> list[Route]:
    """The observability routes, to add to the peer's server and to the metrics server."""
    page = _asset("dashboard.html")
    assets = {path: (_asset(name), content_type) for path, (name, content_type) in _STATIC.items()}

    async def serve_page(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers=_SECURITY_HEADERS)

    async def serve_asset(request: web.Request) -> web.Response:
        body, content_type = assets[request.path]
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_SECURITY_HEADERS)

    async def serve_swarm(request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(swarm(), allow_nan=False), content_type="application/json", headers=_SECURITY_HEADERS
        )

    async def serve_metrics(request: web.Request) -> web.Response:
        return web.Response(body=metrics(), headers={"Content-Type": CONTENT_TYPE})

    return [
        ("GET", "/", serve_page),
        ("GET", "/dashboard", serve_page),
        *[("GET", path, serve_asset) for path in assets],
        ("GET", "/api/swarm", serve_swarm),
        ("GET", "/metrics", serve_metrics),
    ]


def token_matches(header: str, token: Secret) -> bool:
    """Does an ``Authorization`` header carry ``token`` (Bearer, or Basic with any user name)?"""
    scheme, _, value = header.strip().partition(" ")
    presented: bytes | None = None
    if scheme.lower() == "bearer":
        presented = value.strip().encode()
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        presented = decoded.partition(b":")[2]
    return presented is not None and hmac.compare_digest(presented, token.reveal())


def token_middleware(token: Secret, on_reject: Callable[[str], None]) -> Any:
    """Demand the metrics token on every route; a refusal is a bare 401 that asks for Basic auth."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers.getall("Authorization", [])
        if len(headers) != 1 or not token_matches(headers[0], token):
            on_reject("metrics_token_missing" if not headers else "metrics_token_bad")
            return web.json_response(
                {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": 'Basic realm="p2pdl metrics"'}
            )
        return await handler(request)

    return middleware


class MetricsServer:
    """The second server of ``[observe] listen``: the observability routes, optionally token-guarded."""

    def __init__(
        self,
        listen: str,
        route_table: list[Route],
        *,
        token: Secret | None,
        on_reject: Callable[[str], None],
        max_body_bytes: int = 1024,
    ) -> None:
        self._host, self._port = parse_address(listen)
        middlewares = [token_middleware(token, on_reject)] if token is not None else []
        self._app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
        for method, path, handler in route_table:
            self._app.router.add_route(method, path, handler)
        self._runner: web.AppRunner | None = None
        self.port = self._port

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("metrics and dashboard on http://%s:%d/", self._host, self.port)
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
