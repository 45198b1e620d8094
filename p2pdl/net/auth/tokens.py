"""Who may talk to a peer: a swarm-wide shared secret, HMAC handshake tokens, and TLS contexts.

What it protects. Without auth anyone who can reach a peer's port can join the gossip, push
tensors into its model, or read ``/status``. With a shared secret every HTTP request and every
WebSocket upgrade (``GET /ws``) carries ``Authorization: p2pdl-hmac v1 ...``: an HMAC-SHA256,
keyed by the secret, over the sender's name, the target peer's name, the purpose (``"GET /ws"``),
a timestamp and a fresh 128-bit nonce. :class:`TokenVerifier` accepts a token once, only at the
named target, only for the named purpose and only within ``max_skew`` seconds of its timestamp.
The acceptor proves itself back with a reply token bound to the request's nonce
(:func:`make_reply`, :func:`verify_reply`), so both ends of a link are authenticated.

Trade-offs:

* **One shared secret, not per-peer keys.** Every member can mint a token under any member's
  name, so the secret authenticates *the swarm*, not the individual peer. In exchange there is
  one file to distribute and no key directory to keep in sync as peers come and go; a swarm is
  one trust domain (every member already averages everyone's weights into its own), so an
  insider impersonating another insider buys little. Use TLS client certificates (one per peer,
  CN = peer name; see :func:`cert_names`) when individual identity matters.
* **Replay protection covers the handshake, not the session.** A token is good for one use, at
  one target, for one purpose, inside the skew window. What flows over the connection after the
  handshake is not authenticated by the token: without TLS an active man-in-the-middle can still
  hijack an accepted connection. HMAC tokens stop strangers; TLS stops eavesdroppers and hijackers.
* **The replay cache is bounded and fails closed.** Nonces are remembered until their token
  could no longer be accepted (timestamp + ``max_skew``). When the cache is still full after
  dropping those, new tokens are refused (:class:`ReplayCacheFullError`) instead of growing
  memory or forgetting live nonces (which would reopen replays). Only tokens with a valid MAC
  reach the cache, so only a secret holder can fill it; the default 100 000 entries over a 60 s
  window is ~1 600 handshakes per second, far above what a swarm needs.
* **Clocks must roughly agree** (within ``max_skew``, 30 s by default; NTP is plenty). A backwards
  wall-clock step larger than the window can reopen replays of tokens seen just before it.

Nothing here ever puts the secret in a message, a repr or a log line; :class:`Secret` refuses
to be printed or pickled.

The auth errors derive from :class:`~p2pdl.errors.P2PDLError` and have a short ``reason`` (the
key of rejection counters), like :class:`~p2pdl.errors.FrameError`::

    AuthConfigError (ConfigError)   missing/short secret, unreadable TLS file, bad TLS combination
    AuthError                       a credential was refused; the client only ever sees a bare 401
    ├── TokenFormatError            header is not a well-formed p2pdl-hmac v1 credential
    ├── MissingTokenError           no credential where one is required
    ├── BadMacError                 MAC mismatch: wrong secret or a tampered field
    ├── UnknownPeerError            authentic token from a name this peer does not accept
    ├── WrongTargetError            token minted for another peer
    ├── WrongPurposeError           token minted for another request (method and path)
    ├── TokenExpiredError           timestamp more than max_skew from now (past or future)
    ├── TokenReplayedError          nonce already used within the window
    └── ReplayCacheFullError        replay cache full of live nonces; refusing, not growing
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
import math
import os
import re
import secrets
import ssl
import stat
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import quote, unquote

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from p2pdl.config import SecurityConfig
from p2pdl.errors import (
    AuthConfigError,
    AuthError,
    BadMacError,
    MissingTokenError,
    ReplayCacheFullError,
    TokenExpiredError,
    TokenFormatError,
    TokenReplayedError,
    UnknownPeerError,
    WrongPurposeError,
    WrongTargetError,
)

log = logging.getLogger(__name__)

AUTH_SCHEME: Final = "p2pdl-hmac"
AUTH_VERSION: Final = "v1"
HEADER: Final = "Authorization"
# RFC 7615's header for a server's authentication info; carries the acceptor's reply token.
REPLY_HEADER: Final = "Authentication-Info"
MAX_HEADER_CHARS: Final = 1024
MIN_SECRET_BYTES: Final = 16
MAX_SECRET_BYTES: Final = 64 * 1024  # a bigger "secret file" is almost surely the wrong file
MAX_NAME_CHARS: Final = 64  # as for [[peers]] names in the config
MAX_PURPOSE_CHARS: Final = 256

# Set by auth_middleware on every authenticated request.
PEER_KEY: Final = web.RequestKey("p2pdl_auth_peer", str)


# --------------------------------------------------------------------------- the secret


class Secret:
    """The swarm's shared key. Its repr and str are redacted; it cannot be pickled."""

    __slots__ = ("_key",)
    _key: bytes

    def __init__(self, key: bytes, *, source: str = "the secret") -> None:
        if not isinstance(key, bytes):
            raise TypeError(f"Secret wants bytes, got {type(key).__name__}")
        if len(key) < MIN_SECRET_BYTES:
            raise AuthConfigError(
                [
                    f"{source} is {len(key)} bytes; at least {MIN_SECRET_BYTES} are required "
                    "(make one with `openssl rand -hex 32`)"
                ]
            )
        object.__setattr__(self, "_key", key)

    def reveal(self) -> bytes:
        """The key bytes, for HMAC only. Never log or send them."""
        return self._key

    @property
    def size(self) -> int:
        return len(self._key)

    def __repr__(self) -> str:
        return f"Secret(<redacted>, {len(self._key)} bytes)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    __hash__ = None  # type: ignore[assignment]  # a hash of the key would leak a fingerprint

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a Secret cannot be pickled or serialised; pass it in memory only")

    def __copy__(self) -> Secret:
        return self  # immutable

    def __deepcopy__(self, memo: object) -> Secret:
        return self


def load_secret(*, env: str | None, file: Path | None) -> Secret:
    """Read the swarm secret from exactly one of an environment variable or a file.

    One trailing newline (``\\n`` or ``\\r\\n``) is stripped, so ``openssl rand -hex 32 > f``
    works. The bytes are used as they are (hex text is a fine key). A file readable by group or
    others gets a warning. Raises AuthConfigError, whose message never contains the secret.
    """
    if (env is None) == (file is None):
        raise AuthConfigError(["give exactly one of a secret environment variable or a secret file"])
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise AuthConfigError([f"secret: environment variable {env} is not set"])
        # os.fsencode undoes the surrogateescape decoding of os.environ: the exact bytes.
        raw = os.fsencode(value)
        source = f"secret from environment variable {env}"
    else:
        assert file is not None
        raw = _read_secret_file(file)
        source = f"secret file {str(file)!r}"
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    if not raw:
        raise AuthConfigError([f"{source} is empty"])
    return Secret(raw, source=source)


def _read_secret_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise AuthConfigError([f"secret file {str(path)!r} is not a regular file"])
            raw = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise AuthConfigError([f"cannot read secret file {str(path)!r}: {exc.strerror}"]) from exc
    if len(raw) > MAX_SECRET_BYTES:
        raise AuthConfigError([f"secret file {str(path)!r} is over {MAX_SECRET_BYTES} bytes; is it the right file?"])
    if os.name == "posix" and mode & 0o077:
        log.warning(
            "secret file %s is readable by group or others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return raw


# --------------------------------------------------------------------------- tokens

_FIELDS: Final = ("name", "target", "purpose", "ts", "nonce", "mac")
_NONCE_BYTES: Final = 16
# Percent-encoded values only: RFC 3986 unreserved characters, '/', and %XX escapes.
_VALUE_RE: Final = re.compile(r"[A-Za-z0-9._~/%-]+")
_TS_RE: Final = re.compile(r"[0-9]{1,12}\.[0-9]{3}")
_NONCE_RE: Final = re.compile(r"[0-9a-f]{32}")
_MAC_RE: Final = re.compile(r"[0-9a-f]{64}")


def _format_ts(timestamp: float) -> str:
    # The MAC covers this text, so a float that went through a header signs the same bytes.
    return f"{timestamp:.3f}"


def _name_problem(what: str, value: object) -> str | None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
        return f"{what} must be a str of 1-{MAX_NAME_CHARS} characters"
    if not all(c.isalnum() or c in "-_." for c in value):
        return f"{what} {value!r} may only hold letters, digits, '-', '_', '.'"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthToken:
    """One single-use credential: ``name`` asks ``target`` for ``purpose`` at ``timestamp``.

    ``timestamp`` is Unix time in seconds (millisecond resolution is signed); ``nonce`` is 16
    random bytes and ``mac`` the HMAC-SHA256, both lowercase hex. Construction checks the shape
    of every field (TokenFormatError), not the MAC: that is :meth:`TokenVerifier.verify`'s job.
    """

    name: str
    target: str
    purpose: str
    timestamp: float
    nonce: str
    mac: str

    def __post_init__(self) -> None:
        target_problem = None if self.target == ANY_TARGET else _name_problem("target", self.target)
        problems = [p for p in (_name_problem("name", self.name), target_problem) if p is not None]
        if not isinstance(self.purpose, str) or not 1 <= len(self.purpose) <= MAX_PURPOSE_CHARS:
            problems.append(f"purpose must be a str of 1-{MAX_PURPOSE_CHARS} characters")
        elif not self.purpose.isprintable():
            problems.append("purpose must be printable")
        ts = self.timestamp
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            problems.append("timestamp must be a finite number of seconds")
        elif not 0 <= ts < 1e12:
            problems.append(f"timestamp {ts} is out of range")
        if not isinstance(self.nonce, str) or not _NONCE_RE.fullmatch(self.nonce):
            problems.append("nonce must be 32 lowercase hex digits")
        if not isinstance(self.mac, str) or not _MAC_RE.fullmatch(self.mac):
            problems.append("mac must be 64 lowercase hex digits")
        if problems:
            raise TokenFormatError("; ".join(problems))


def _mac(secret: Secret, *, name: str, target: str, purpose: str, timestamp: float, nonce: str) -> str:
    # Length-prefixed fields: no two different field tuples sign the same bytes.
    parts = (f"{AUTH_SCHEME} {AUTH_VERSION}", name, target, purpose, _format_ts(timestamp), nonce)
    message = b"".join(len(b).to_bytes(4, "big") + b for b in (p.encode("utf-8") for p in parts))
    return hmac.new(secret.reveal(), message, hashlib.sha256).hexdigest()


def make_token(secret: Secret, *, name: str, target: str, purpose: str, now: float | None = None) -> AuthToken:
    """Mint a fresh single-use token from ``name`` to ``target`` for ``purpose``."""
    timestamp = float(_format_ts(time.time() if now is None else now))
    nonce = secrets.token_hex(_NONCE_BYTES)
    # Checks the fields before they are signed; the placeholder MAC is replaced below.
    AuthToken(name=name, target=target, purpose=purpose, timestamp=timestamp, nonce=nonce, mac="0" * 64)
    mac = _mac(secret, name=name, target=target, purpose=purpose, timestamp=timestamp, nonce=nonce)
    return AuthToken(name=name, target=target, purpose=purpose, timestamp=timestamp, nonce=nonce, mac=mac)


def token_to_header(token: AuthToken) -> str:
    """``p2pdl-hmac v1 name=..;target=..;purpose=..;ts=..;nonce=..;mac=..`` (percent-encoded)."""
    values = {
        "name": quote(token.name, safe=""),
        "target": quote(token.target, safe=""),
        "purpose": quote(token.purpose, safe="/"),
        "ts": _format_ts(token.timestamp),
        "nonce": token.nonce,
        "mac": token.mac,
    }
    header = f"{AUTH_SCHEME} {AUTH_VERSION} " + ";".join(f"{k}={values[k]}" for k in _FIELDS)
    if len(header) > MAX_HEADER_CHARS:
        # Only long non-ASCII names or purposes get here: percent-encoding triples their bytes.
        raise TokenFormatError(f"credential would be {len(header)} characters; at most {MAX_HEADER_CHARS}")
    return header


def _decode_value(key: str, raw: str) -> str:
    safe = "/" if key == "purpose" else ""
    try:
        value = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise TokenFormatError(f"field {key!r} is not valid percent-encoded UTF-8") from None
    # One spelling per value: no lowercase or needless escapes, no '%' left undecoded.
    if quote(value, safe=safe) != raw:
        raise TokenFormatError(f"field {key!r} is not canonically percent-encoded")
    return value


def token_from_header(text: str) -> AuthToken:
    """Parse a header value strictly; raises TokenFormatError (only) on any malformation."""
    if not isinstance(text, str):
        raise TokenFormatError(f"credential must be a str, got {type(text).__name__}")
    if len(text) > MAX_HEADER_CHARS:
        raise TokenFormatError(f"credential is {len(text)} characters; at most {MAX_HEADER_CHARS}")
    if not text.isascii():
        raise TokenFormatError("credential is not ASCII")
    scheme, _, rest = text.partition(" ")
    if scheme != AUTH_SCHEME:
        raise TokenFormatError(f"scheme is {scheme[:32]!r}, not {AUTH_SCHEME!r}")
    version, _, params = rest.partition(" ")
    if version != AUTH_VERSION:
        raise TokenFormatError(f"version {version[:16]!r} is not supported (only {AUTH_VERSION!r})")
    raw: dict[str, str] = {}
    for item in params.split(";"):
        key, sep, value = item.partition("=")
        if not sep:
            raise TokenFormatError(f"parameter {item[:32]!r} is not key=value")
        if key not in _FIELDS:
            raise TokenFormatError(f"unknown parameter {key[:32]!r}")
        if key in raw:
            raise TokenFormatError(f"parameter {key!r} appears twice")
        if not _VALUE_RE.fullmatch(value):
            raise TokenFormatError(f"parameter {key!r} has an empty or ill-formed value")
        raw[key] = value
    missing = [k for k in _FIELDS if k not in raw]
    if missing:
        raise TokenFormatError(f"missing parameters: {', '.join(missing)}")
    if not _TS_RE.fullmatch(raw["ts"]):
        raise TokenFormatError("ts must be seconds with exactly three decimals")
    return AuthToken(
        name=_decode_value("name", raw["name"]),
        target=_decode_value("target", raw["target"]),
        purpose=_decode_value("purpose", raw["purpose"]),
        timestamp=float(raw["ts"]),
        nonce=raw["nonce"],
        mac=raw["mac"],
    )


ANY_TARGET = "*"  # a token for whichever peer answers: only for the purposes a verifier allows it


class TokenVerifier:
    """The accepting side: checks MAC, peer, target, purpose, age and single use, in that order.

    The MAC comes first so that nothing about an unauthenticated token is trusted. Not
    thread-safe: call it from the event loop only (it never blocks).
    """

    def __init__(
        self,
        secret: Secret,
        *,
        self_name: str,
        max_skew: float = 30.0,
        replay_cache_size: int = 100_000,
        known_peers: Collection[str] | None = None,
        any_target_purposes: Collection[str] = (),
    ) -> None:
        problem = _name_problem("self_name", self_name)
        if problem is not None:
            raise ValueError(problem)
        if not (math.isfinite(max_skew) and max_skew > 0):
            raise ValueError(f"max_skew must be > 0 seconds, got {max_skew}")
        if replay_cache_size < 1:
            raise ValueError(f"replay_cache_size must be >= 1, got {replay_cache_size}")
        self._secret = secret
        self.self_name = self_name
        self.max_skew = max_skew  # seconds
        self._capacity = replay_cache_size
        self._known = None if known_peers is None else frozenset(known_peers)
        # Requests to an address whose peer name is not known yet (a bootstrap address, the CLI's
        # `status`) may carry target "*" for these purposes; the nonce is still single-use here.
        self._any_target_purposes = frozenset(any_target_purposes)
        # nonce -> the last moment (Unix seconds) its token could still be accepted, plus a
        # min-heap of the same pairs to drop expired nonces in order.
        self._seen: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []

    def __repr__(self) -> str:
        return f"TokenVerifier(self_name={self.self_name!r}, max_skew={self.max_skew}, remembered={len(self)})"

    def __len__(self) -> int:
        return len(self._seen)

    def verify(
        self, token: AuthToken, *, purpose: str, expected_name: str | None = None, now: float | None = None
    ) -> str:
        """Accept ``token`` once and return the authenticated peer name, or raise AuthError."""
        now = time.time() if now is None else now
        expected_mac = _mac(
            self._secret,
            name=token.name,
            target=token.target,
            purpose=token.purpose,
            timestamp=token.timestamp,
            nonce=token.nonce,
        )
        if not hmac.compare_digest(expected_mac, token.mac):
            raise BadMacError("token MAC does not match: a different secret or a tampered field")
        if self._known is not None and token.name not in self._known:
            raise UnknownPeerError(f"{token.name!r} is not a known peer")
        if expected_name is not None and token.name != expected_name:
            raise UnknownPeerError(f"token is from {token.name!r}, expected {expected_name!r}")
        if token.target != self.self_name and not (token.target == ANY_TARGET and purpose in self._any_target_purposes):
            raise WrongTargetError(f"token is for {token.target!r}, this is {self.self_name!r}")
        if token.purpose != purpose:
            raise WrongPurposeError(f"token is for {token.purpose!r}, not {purpose!r}")
        age = now - token.timestamp
        if not abs(age) <= self.max_skew:  # 'not <=' also refuses NaN
            raise TokenExpiredError(f"token timestamp is {-age:+.1f} s from now; at most {self.max_skew} s either way")
        self._evict(now)
        if token.nonce in self._seen:
            raise TokenReplayedError(f"nonce of {token.name!r}'s token was already used")
        if len(self._seen) >= self._capacity:
            raise ReplayCacheFullError(
                f"{len(self._seen)} live nonces remembered (replay_cache_size); refusing new tokens"
            )
        expiry = token.timestamp + self.max_skew
        self._seen[token.nonce] = expiry
        heapq.heappush(self._expiries, (expiry, token.nonce))
        return token.name

    def _evict(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] < now:
            _, nonce = heapq.heappop(self._expiries)
            self._seen.pop(nonce, None)


# --------------------------------------------------------------------------- mutual auth


def reply_purpose(sent: AuthToken) -> str:
    """The purpose of the acceptor's reply to ``sent``: bound to its nonce, so never reusable."""
    return f"re:{sent.nonce}"


def make_reply(secret: Secret, sent: AuthToken, *, self_name: str, now: float | None = None) -> AuthToken:
    """The acceptor's proof that it holds the secret, for the dialer that sent ``sent``."""
    return make_token(secret, name=self_name, target=sent.name, purpose=reply_purpose(sent), now=now)


def verify_reply(verifier: TokenVerifier, reply: AuthToken, sent: AuthToken, *, now: float | None = None) -> None:
    """Dialer side: ``reply`` must come from ``sent.target`` and answer exactly ``sent``."""
    verifier.verify(reply, purpose=reply_purpose(sent), expected_name=sent.target, now=now)


_META_KEYS: Final = ("auth_ts", "auth_nonce", "auth_mac")


def reply_to_meta(reply: AuthToken) -> dict[str, str]:
    """The parts of a reply that the hello frame must carry (the rest is implied by the link)."""
    return {"auth_ts": _format_ts(reply.timestamp), "auth_nonce": reply.nonce, "auth_mac": reply.mac}


def reply_from_meta(meta: Mapping[str, object], *, sent: AuthToken, sender: str) -> AuthToken:
    """Rebuild the reply to ``sent`` from a hello frame's meta; raises AuthError subclasses."""
    values = [meta.get(key) for key in _META_KEYS]
    if any(v is None for v in values):
        raise MissingTokenError(f"{sender!r}'s hello carries no reply token")
    ts, nonce, mac = values
    if not isinstance(ts, str) or not _TS_RE.fullmatch(ts):
        raise TokenFormatError("auth_ts must be seconds with exactly three decimals")
    if not isinstance(nonce, str) or not isinstance(mac, str):
        raise TokenFormatError("auth_nonce and auth_mac must be strings")
    return AuthToken(
        name=sender, target=sent.name, purpose=reply_purpose(sent), timestamp=float(ts), nonce=nonce, mac=mac
    )


# --------------------------------------------------------------------------- aiohttp glue

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


# --------------------------------------------------------------------------- TLS


def _require_readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise AuthConfigError([f"tls: cannot read {what} {str(path)!r}: {exc.strerror}"]) from exc


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise _EncryptedKey


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    _require_readable(cert, "certificate")
    _require_readable(key, "private key")
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise AuthConfigError(
            [f"tls: private key {str(key)!r} is encrypted; p2pdl needs an unencrypted key file"]
        ) from None
    except ssl.SSLError as exc:
        raise AuthConfigError(
            [
                f"tls: cannot use certificate {str(cert)!r} with key {str(key)!r}: "
                f"{exc.reason or exc} (not PEM, or the key does not match the certificate)"
            ]
        ) from exc


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    _require_readable(ca, "CA bundle")
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise AuthConfigError(
            [f"tls: CA bundle {str(ca)!r} holds no usable PEM certificate: {exc.reason or exc}"]
        ) from exc


def server_ssl_context(cert: Path, key: Path, ca: Path | None, *, require_client_cert: bool) -> ssl.SSLContext:
    """TLS >= 1.2 for a peer's server. With ``require_client_cert``, only clients holding a
    certificate signed by ``ca`` complete the handshake (mutual TLS).
    """
    if require_client_cert and ca is None:
        raise AuthConfigError(["tls: require_client_cert needs a CA bundle to check client certificates"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    if ca is not None:
        _load_ca(context, ca)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_ssl_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """TLS >= 1.2 for dialling peers: trusts only ``ca`` (not the system store) and checks the
    host name, so a server certificate for ``127.0.0.1`` needs that IP in its subjectAltName.
    ``cert`` and ``key`` (both or neither) are this peer's client certificate for mutual TLS.
    """
    if (cert is None) != (key is None):
        raise AuthConfigError(["tls: a client certificate needs both a cert file and a key file"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED are on
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(context, ca)
    if cert is not None and key is not None:
        _load_chain(context, cert, key)
    return context


def cert_names(peercert: Mapping[str, Any] | None) -> frozenset[str]:
    """The subject common names and DNS subjectAltNames of a verified peer certificate.

    ``peercert`` is ``ssl_object.getpeercert()``, e.g. ``request.transport.get_extra_info("peercert")``;
    with one certificate per peer (CN = peer name) this ties a TLS client to a ``hello`` sender.
    """
    if not peercert:
        return frozenset()
    names: set[str] = set()
    for rdn in peercert.get("subject", ()):
        for attribute, value in rdn:
            if attribute == "commonName":
                names.add(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "DNS":
            names.add(value)
    return frozenset(names)


# --------------------------------------------------------------------------- one peer's setup

# Requests that may be addressed to "whoever answers": membership gossip to a bootstrap address,
# and the read-only views an operator's CLI asks for.
ANY_TARGET_PURPOSES = frozenset({"POST /gossip", "GET /status", "GET /members"})


@dataclass(frozen=True, kw_only=True)
class PeerSecurity:
    """Everything one peer needs to authenticate and encrypt: built once from the config."""

    name: str
    secret: Secret | None = None
    verifier: TokenVerifier | None = None
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.client_ssl is not None else "http"

    def headers(self, *, target: str | None, method: str, path: str) -> dict[str, str]:
        """A fresh single-use token for one request (no header when the swarm has no secret)."""
        if self.secret is None:
            return {}
        token = make_token(self.secret, name=self.name, target=target or ANY_TARGET, purpose=f"{method} {path}")
        return {HEADER: token_to_header(token)}


def security_from_config(config: SecurityConfig, name: str) -> PeerSecurity:
    """:func:`build_peer_security` from a ``[security]`` section."""
    return build_peer_security(
        name,
        secret_env=config.secret_env,
        secret_file=config.secret_file,
        max_clock_skew=config.max_clock_skew,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        tls_ca=config.tls_ca,
        require_client_cert=config.require_client_cert,
    )


def build_peer_security(
    name: str,
    *,
    secret_env: str | None,
    secret_file: Path | None,
    max_clock_skew: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    require_client_cert: bool,
) -> PeerSecurity:
    """Load the secret and TLS material named by the config (errors name the file or variable)."""
    secret = load_secret(env=secret_env, file=secret_file) if (secret_env or secret_file) else None
    verifier = (
        TokenVerifier(secret, self_name=name, max_skew=max_clock_skew, any_target_purposes=ANY_TARGET_PURPOSES)
        if secret is not None
        else None
    )
    server_ssl = client_ssl = None
    if tls_cert is not None and tls_key is not None and tls_ca is not None:
        server_ssl = server_ssl_context(tls_cert, tls_key, tls_ca, require_client_cert=require_client_cert)
        client_ssl = client_ssl_context(tls_ca, tls_cert, tls_key)
    return PeerSecurity(name=name, secret=secret, verifier=verifier, server_ssl=server_ssl, client_ssl=client_ssl)
