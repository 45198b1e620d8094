"""One peer's security setup, built once from the ``[security]`` config: secret, verifier, TLS."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from p2pdl.config import SecurityConfig
from p2pdl.net.auth.secret import Secret, load_secret
from p2pdl.net.auth.tls import client_ssl_context, server_ssl_context
from p2pdl.net.auth.tokens import ANY_TARGET, HEADER, TokenVerifier, make_token, token_to_header

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
