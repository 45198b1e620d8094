"""aiohttp glue for the tokens: a middleware that demands one on every route, and a reply signer.

A refusal is a bare 401 whatever the reason, so a client learns nothing about why; the reason
goes to a counter callback and to a warning logged at most once per interval, so a flood of bad
credentials costs a counter increment, not a log line each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from p2pdl.errors import AuthError, MissingTokenError, TokenFormatError
from p2pdl.net.auth.secret import Secret
from p2pdl.net.auth.tokens import (
    AUTH_SCHEME,
    AUTH_VERSION,
    HEADER,
    REPLY_HEADER,
    AuthToken,
    TokenVerifier,
    make_reply,
    token_from_header,
    token_to_header,
)

log = logging.getLogger(__name__)

# Set by auth_middleware on every authenticated request.
PEER_KEY: Final = web.RequestKey("p2pdl_auth_peer", str)
TOKEN_KEY: Final = web.RequestKey("p2pdl_auth_token", AuthToken)
_UNAUTHORIZED: Final = {"error": "unauthorized"}
_REJECT_LOG_INTERVAL: Final = 10.0  # seconds between "refused a request" warnings


def default_purpose(request: web.Request) -> str:
    return f"{request.method} {request.path}"


def auth_middleware(
    verifier: TokenVerifier,
    *,
    open_paths: frozenset[str] = frozenset({"/healthz"}),
    purpose_for: Callable[[web.Request], str] = default_purpose,
    on_reject: Callable[[web.Request, AuthError], None] | None = None,
) -> Middleware:
    """An aiohttp middleware that demands a fresh token on every route outside ``open_paths``.

    ``open_paths`` are matched against the *routed* resource, so an encoded or unrouted path
    never slips through, and an unknown path answers 401 (not 404) to an unauthenticated client.
    A refusal is a 401 whose body is ``{"error": "unauthorized"}`` whatever the reason; the
    reason goes to ``on_reject`` (e.g. to count it) and to a rate-limited log warning. On success
    the peer name is in ``request[PEER_KEY]`` and the token in ``request[TOKEN_KEY]``.
    """
    last_warning = [-_REJECT_LOG_INTERVAL]

    def refuse(request: web.Request, exc: AuthError) -> web.Response:
        if on_reject is not None:
            on_reject(request, exc)
        now = time.monotonic()
        if now - last_warning[0] >= _REJECT_LOG_INTERVAL:
            last_warning[0] = now
            log.warning(
                "%s: refused %s %s from %s (%s): %s",
                verifier.self_name,
                request.method,
                request.path[:100],
                request.remote or "?",
                exc.reason,
                exc,
            )
        return web.json_response(
            _UNAUTHORIZED, status=401, headers={"WWW-Authenticate": f"{AUTH_SCHEME} {AUTH_VERSION}"}
        )

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical in open_paths:
            return await handler(request)
        credentials = request.headers.getall(HEADER, [])
        try:
            if not credentials:
                raise MissingTokenError(f"no {HEADER} header")
            if len(credentials) > 1:
                raise TokenFormatError(f"{len(credentials)} {HEADER} headers; exactly one is allowed")
            token = token_from_header(credentials[0])
            peer = verifier.verify(token, purpose=purpose_for(request))
        except AuthError as exc:
            return refuse(request, exc)
        request[PEER_KEY] = peer
        request[TOKEN_KEY] = token
        return await handler(request)

    return middleware


def reply_signer(secret: Secret, *, self_name: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An ``app.on_response_prepare`` hook: answer every authenticated request with a reply
    token in ``REPLY_HEADER`` so the client can check it reached the right, secret-holding peer.
    """

    async def sign(request: web.Request, response: web.StreamResponse) -> None:
        if TOKEN_KEY in request:
            reply = make_reply(secret, request[TOKEN_KEY], self_name=self_name)
            response.headers[REPLY_HEADER] = token_to_header(reply)

    return sign
