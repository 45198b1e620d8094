"""TLS contexts for a peer's server and its dialler, and the names in a verified certificate.

TLS >= 1.2 only, trusting only the swarm's CA bundle (never the system store), and refusing an
encrypted private key rather than prompting on the terminal. Configuration mistakes surface as
:class:`~p2pdl.errors.AuthConfigError` naming the file, at start-up, not at the first handshake.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from p2pdl.errors import AuthConfigError


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
