"""Who may talk to a peer: a swarm-wide shared secret, HMAC handshake tokens, and TLS contexts.

The layers, each importing only those above it: :mod:`.secret` (the key), :mod:`.tokens`
(header format, minting, verifier, the acceptor's reply), :mod:`.middleware` (aiohttp glue),
:mod:`.tls` (SSL contexts) and :mod:`.security` (one peer's setup from the config).

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
* **Tokens authenticate the handshake, not the session**: after the upgrade nothing is signed,
  so without TLS an on-path attacker can hijack an accepted connection. HMAC tokens stop
  strangers; TLS stops eavesdroppers and hijackers. The replay cache and clock-skew trade-offs
  are in :mod:`.tokens`.

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

from p2pdl.net.auth.middleware import PEER_KEY, TOKEN_KEY, auth_middleware, default_purpose, reply_signer
from p2pdl.net.auth.secret import MAX_SECRET_BYTES, MIN_SECRET_BYTES, Secret, load_secret
from p2pdl.net.auth.security import ANY_TARGET_PURPOSES, PeerSecurity, build_peer_security, security_from_config
from p2pdl.net.auth.tls import cert_names, client_ssl_context, server_ssl_context
from p2pdl.net.auth.tokens import (
    ANY_TARGET,
    AUTH_SCHEME,
    AUTH_VERSION,
    HEADER,
    MAX_HEADER_CHARS,
    MAX_NAME_CHARS,
    MAX_PURPOSE_CHARS,
    REPLY_HEADER,
    AuthToken,
    TokenVerifier,
    make_reply,
    make_token,
    reply_from_meta,
    reply_purpose,
    reply_to_meta,
    token_from_header,
    token_to_header,
    verify_reply,
)

__all__ = [
    "ANY_TARGET",
    "ANY_TARGET_PURPOSES",
    "AUTH_SCHEME",
    "AUTH_VERSION",
    "HEADER",
    "MAX_HEADER_CHARS",
    "MAX_NAME_CHARS",
    "MAX_PURPOSE_CHARS",
    "MAX_SECRET_BYTES",
    "MIN_SECRET_BYTES",
    "PEER_KEY",
    "REPLY_HEADER",
    "TOKEN_KEY",
    "AuthToken",
    "PeerSecurity",
    "Secret",
    "TokenVerifier",
    "auth_middleware",
    "build_peer_security",
    "cert_names",
    "client_ssl_context",
    "default_purpose",
    "load_secret",
    "make_reply",
    "make_token",
    "reply_from_meta",
    "reply_purpose",
    "reply_signer",
    "reply_to_meta",
    "security_from_config",
    "server_ssl_context",
    "token_from_header",
    "token_to_header",
    "verify_reply",
]
