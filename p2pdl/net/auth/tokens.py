"""HMAC handshake tokens: the header format, minting, strict parsing, and the verifier.

A token says "``name`` asks ``target`` for ``purpose`` at ``ts``" with a fresh 128-bit nonce,
signed with HMAC-SHA256 under the swarm secret. :class:`TokenVerifier` accepts a token once, only
at the named target, only for the named purpose and only within ``max_skew`` seconds of its
timestamp. The acceptor of a WebSocket proves itself back with a reply token bound to the
request's nonce (:func:`make_reply`, :func:`verify_reply`), so both ends of a link are
authenticated.

Trade-offs:

* **Replay protection covers the handshake, not the session.** A token is good for one use, at
  one target, for one purpose, inside the skew window; what flows over the connection afterwards
  is not authenticated by it. HMAC tokens stop strangers; TLS stops eavesdroppers and hijackers.
* **The replay cache is bounded and fails closed.** Nonces are remembered until their token
  could no longer be accepted (timestamp + ``max_skew``). When the cache is still full after
  dropping those, new tokens are refused (:class:`~p2pdl.errors.ReplayCacheFullError`) instead
  of growing memory or forgetting live nonces (which would reopen replays). Only tokens with a
  valid MAC reach the cache, so only a secret holder can fill it; the default 100 000 entries
  over a 60 s window is ~1 600 handshakes per second, far above what a swarm needs.
* **Clocks must roughly agree** (within ``max_skew``, 30 s by default; NTP is plenty). A
  backwards wall-clock step larger than the window can reopen replays of tokens seen just
  before it.
* **Parsing is strict and canonical**: one spelling per token, so two parsers can never
  disagree on which fields were signed.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import re
import secrets
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

from p2pdl.errors import (
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
from p2pdl.net.auth.secret import Secret

AUTH_SCHEME: Final = "p2pdl-hmac"
AUTH_VERSION: Final = "v1"
HEADER: Final = "Authorization"
# RFC 7615's header for a server's authentication info; carries the acceptor's reply token.
REPLY_HEADER: Final = "Authentication-Info"
MAX_HEADER_CHARS: Final = 1024
MAX_NAME_CHARS: Final = 64  # as for [[peers]] names in the config
MAX_PURPOSE_CHARS: Final = 256

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
