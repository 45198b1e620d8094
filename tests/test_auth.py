"""Auth: shared secret, HMAC tokens, replay protection, the aiohttp middleware and mutual TLS.

Unit tests are hermetic; the TLS and middleware tests run real aiohttp servers on 127.0.0.1:0.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import pickle
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from tls_util import CertPair, encrypt_key, make_ca, make_peer_cert

from p2pdl.errors import (
    AuthConfigError,
    AuthError,
    BadMacError,
    ConfigError,
    MissingTokenError,
    P2PDLError,
    ReplayCacheFullError,
    TokenExpiredError,
    TokenFormatError,
    TokenReplayedError,
    UnknownPeerError,
    WrongPurposeError,
    WrongTargetError,
)
from p2pdl.net.auth import (
    HEADER,
    MAX_HEADER_CHARS,
    PEER_KEY,
    REPLY_HEADER,
    AuthToken,
    Secret,
    TokenVerifier,
    auth_middleware,
    cert_names,
    client_ssl_context,
    load_secret,
    make_reply,
    make_token,
    reply_from_meta,
    reply_signer,
    reply_to_meta,
    server_ssl_context,
    token_from_header,
    token_to_header,
    verify_reply,
)

# Distinctive, so a leak shows up in any repr, message or log line.
SECRET_TEXT = "ZEBRA-leak-canary-7f3a9c41d2"
SECRET = Secret(SECRET_TEXT.encode())
OTHER_SECRET = Secret(b"another-swarm-secret-0123456789")
NOW = 1_700_000_000.0


def token(
    name: str = "a", target: str = "b", purpose: str = "GET /ws", now: float = NOW, secret: Secret = SECRET
) -> AuthToken:
    return make_token(secret, name=name, target=target, purpose=purpose, now=now)


def verifier(self_name: str = "b", **kwargs: Any) -> TokenVerifier:
    return TokenVerifier(SECRET, self_name=self_name, **kwargs)


def assert_no_leak(text: str) -> None:
    assert SECRET_TEXT not in text
    assert SECRET_TEXT.encode().hex() not in text


# --------------------------------------------------------------------------- tokens


def test_token_verifies_and_round_trips_through_the_header() -> None:
    sent = token()
    header = token_to_header(sent)
    assert header.startswith("p2pdl-hmac v1 name=a;target=b;purpose=GET%20/ws;ts=1700000000.000;nonce=")
    assert token_from_header(header) == sent
    assert verifier().verify(token_from_header(header), purpose="GET /ws", now=NOW + 1) == "a"


def test_fresh_tokens_have_fresh_nonces() -> None:
    assert len({token().nonce for _ in range(100)}) == 100


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "c"),
        ("target", "c"),
        ("purpose", "GET /status"),
        ("timestamp", NOW + 1),
        ("nonce", "0" * 32),
        ("mac", "0" * 64),
    ],
)
def test_any_tampered_field_breaks_the_mac(field: str, value: Any) -> None:
    tampered = dataclasses.replace(token(), **{field: value})
    check = verifier(self_name=tampered.target)
    with pytest.raises(BadMacError):
        check.verify(tampered, purpose=tampered.purpose, now=NOW)


def test_tampering_with_the_header_text_breaks_the_mac() -> None:
    header = token_to_header(token())
    tampered = header.replace("name=a;", "name=x;")
    with pytest.raises(BadMacError):
        verifier().verify(token_from_header(tampered), purpose="GET /ws", now=NOW)


def test_wrong_secret_is_refused() -> None:
    with pytest.raises(BadMacError):
        verifier().verify(token(secret=OTHER_SECRET), purpose="GET /ws", now=NOW)


@pytest.mark.parametrize("offset", [-30.0, 0.0, 30.0])
def test_timestamps_within_the_skew_pass(offset: float) -> None:
    assert verifier().verify(token(now=NOW + offset), purpose="GET /ws", now=NOW) == "a"


@pytest.mark.parametrize("offset", [-30.002, 30.002, -3600.0, 3600.0])
def test_expired_and_future_tokens_are_refused(offset: float) -> None:
    with pytest.raises(TokenExpiredError):
        verifier().verify(token(now=NOW + offset), purpose="GET /ws", now=NOW)


def test_replay_is_refused() -> None:
    check, sent = verifier(), token()
    check.verify(sent, purpose="GET /ws", now=NOW)
    with pytest.raises(TokenReplayedError):
        check.verify(sent, purpose="GET /ws", now=NOW + 5)
    # Once the nonce is forgotten the token is too old to be accepted anyway.
    with pytest.raises(TokenExpiredError):
        check.verify(sent, purpose="GET /ws", now=NOW + 31)


def test_token_for_another_peer_is_refused() -> None:
    for_a = token(name="c", target="a")
    assert verifier("a").verify(for_a, purpose="GET /ws", now=NOW) == "c"
    with pytest.raises(WrongTargetError):
        verifier("b").verify(for_a, purpose="GET /ws", now=NOW)


def test_token_for_another_purpose_is_refused() -> None:
    with pytest.raises(WrongPurposeError):
        verifier().verify(token(purpose="GET /status"), purpose="GET /ws", now=NOW)


def test_known_peers_and_expected_name() -> None:
    check = verifier(known_peers={"a", "c"})
    with pytest.raises(UnknownPeerError):
        check.verify(token(name="z"), purpose="GET /ws", now=NOW)
    with pytest.raises(UnknownPeerError):
        check.verify(token(name="a"), purpose="GET /ws", expected_name="c", now=NOW)
    assert check.verify(token(name="c"), purpose="GET /ws", expected_name="c", now=NOW) == "c"


def test_replay_cache_is_bounded_and_fails_closed() -> None:
    check = verifier(replay_cache_size=2, max_skew=10.0)
    check.verify(token(now=NOW), purpose="GET /ws", now=NOW)
    check.verify(token(now=NOW + 1), purpose="GET /ws", now=NOW + 1)
    with pytest.raises(ReplayCacheFullError):
        check.verify(token(now=NOW + 2), purpose="GET /ws", now=NOW + 2)
    assert len(check) == 2
    # The first nonce can no longer be replayed after NOW + 10, so it is dropped to make room.
    check.verify(token(now=NOW + 10.5), purpose="GET /ws", now=NOW + 10.5)
    assert len(check) == 2


def test_failed_tokens_do_not_fill_the_replay_cache() -> None:
    check = verifier(replay_cache_size=1)
    for _ in range(5):
        with pytest.raises(BadMacError):
            check.verify(token(secret=OTHER_SECRET), purpose="GET /ws", now=NOW)
    assert len(check) == 0


def test_verifier_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_skew"):
        verifier(max_skew=0.0)
    with pytest.raises(ValueError, match="replay_cache_size"):
        verifier(replay_cache_size=0)
    with pytest.raises(ValueError, match="self_name"):
        verifier(self_name="no spaces")


def test_make_token_refuses_bad_fields() -> None:
    with pytest.raises(TokenFormatError, match="name"):
        token(name="a;b")
    with pytest.raises(TokenFormatError, match="purpose"):
        token(purpose="")
    with pytest.raises(TokenFormatError, match="timestamp"):
        token(now=-1.0)
    with pytest.raises(TokenFormatError, match="timestamp"):
        AuthToken(name="a", target="b", purpose="p", timestamp=float("nan"), nonce="0" * 32, mac="0" * 64)


def test_unusual_but_valid_purposes_round_trip() -> None:
    for purpose in ("GET /a;b=c", "POST /x%20y?q=1&r=/", "GET /ümlaut", "re:" + "f" * 32):
        sent = token(purpose=purpose)
        assert token_from_header(token_to_header(sent)) == sent


# --------------------------------------------------------------------------- header parsing


def _valid_header() -> str:
    return token_to_header(token())


def _with(header: str, old: str, new: str) -> str:
    assert old in header
    return header.replace(old, new, 1)


HEADER_TEXT = _valid_header()
_, _, PARAMS = HEADER_TEXT.partition("v1 ")
NONCE = token_from_header(HEADER_TEXT).nonce
MAC = token_from_header(HEADER_TEXT).mac


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "Bearer abc",
        "p2pdl-hmac",
        "p2pdl-hmac v1",
        "p2pdl-hmac v1 ",
        "P2PDL-HMAC v1 " + PARAMS,
        "p2pdl-hmac v2 " + PARAMS,
        "p2pdl-hmac  v1 " + PARAMS,
        HEADER_TEXT + ";",
        HEADER_TEXT + ";name=a",  # duplicate
        HEADER_TEXT + ";extra=1",  # unknown
        _with(HEADER_TEXT, ";mac=" + MAC, ""),  # missing
        _with(HEADER_TEXT, "name=a;", ""),  # missing
        _with(HEADER_TEXT, "name=a;", "name=;"),  # empty
        _with(HEADER_TEXT, "name=a;", "name;"),
        _with(HEADER_TEXT, "name=a;", ";"),
        _with(HEADER_TEXT, "name=a;", "name=a=b;"),
        _with(HEADER_TEXT, "name=a;", "name=a%3Bb;"),  # decodes to an invalid name
        _with(HEADER_TEXT, "name=a;", "name=%61;"),  # needless escape: not canonical
        _with(HEADER_TEXT, "GET%20/ws", "GET%2f/ws"),  # lowercase escape
        _with(HEADER_TEXT, "GET%20/ws", "GET /ws"),  # raw space
        _with(HEADER_TEXT, "GET%20/ws", "GET%ZZ/ws"),
        _with(HEADER_TEXT, "GET%20/ws", "GET%FF/ws"),  # not UTF-8
        _with(HEADER_TEXT, "GET%20/ws", "%0A"),  # control character
        _with(HEADER_TEXT, "ts=1700000000.000", "ts=1700000000"),
        _with(HEADER_TEXT, "ts=1700000000.000", "ts=-1.000"),
        _with(HEADER_TEXT, "ts=1700000000.000", "ts=1e9"),
        _with(HEADER_TEXT, "ts=1700000000.000", "ts=nan"),
        _with(HEADER_TEXT, "ts=1700000000.000", "ts=1700000000.0000"),
        _with(HEADER_TEXT, "ts=1700000000.000", "ts=\u0661700000000.000"),  # Arabic-Indic digit
        _with(HEADER_TEXT, NONCE, NONCE[:-1]),
        _with(HEADER_TEXT, NONCE, NONCE.upper() if NONCE.upper() != NONCE else "G" * 32),
        _with(HEADER_TEXT, MAC, MAC + "0"),
        _with(HEADER_TEXT, MAC, "x" * 64),
        HEADER_TEXT + " " * (MAX_HEADER_CHARS - len(HEADER_TEXT) + 1),  # oversize
        "p2pdl-hmac v1 " + "name=a;" * 200,
        HEADER_TEXT.replace("a", "\u00e4", 1),
    ],
)
def test_header_parser_refuses_malformed_values(text: str) -> None:
    with pytest.raises(TokenFormatError):
        token_from_header(text)


def test_header_parser_accepts_any_field_order() -> None:
    fields = PARAMS.split(";")
    reordered = "p2pdl-hmac v1 " + ";".join(reversed(fields))
    assert token_from_header(reordered) == token_from_header(HEADER_TEXT)


def test_header_parser_refuses_non_strings() -> None:
    with pytest.raises(TokenFormatError):
        token_from_header(b"p2pdl-hmac v1 x")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=MAX_HEADER_CHARS + 50))
def test_fuzz_arbitrary_text_only_raises_auth_errors(text: str) -> None:
    with contextlib.suppress(AuthError):
        token_from_header(text)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fuzz_mutated_headers_never_verify(data: st.DataObject) -> None:
    original = HEADER_TEXT
    alphabet = "abcdef0123456789=;%/. -xzA"
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(original)), st.sampled_from(alphabet)), max_size=4))
    mutated = original
    for position, char in edits:
        position = min(position, len(mutated))
        mutated = mutated[:position] + char + mutated[position + 1 :]
    try:
        parsed = token_from_header(mutated)
        verifier().verify(parsed, purpose="GET /ws", now=NOW)
    except AuthError:
        return
    assert mutated == original


_NAME = st.text(st.sampled_from("abcXYZ019-_.é"), min_size=1, max_size=64)


@settings(max_examples=100, deadline=None)
@given(_NAME, _NAME, st.text(min_size=1, max_size=40).filter(str.isprintable))
def test_fuzz_header_round_trip(name: str, target: str, purpose: str) -> None:
    sent = token(name=name, target=target, purpose=purpose)
    try:
        header = token_to_header(sent)
    except TokenFormatError:
        return  # percent-encoding made it longer than MAX_HEADER_CHARS
    assert token_from_header(header) == sent
    assert verifier(target).verify(token_from_header(header), purpose=purpose, now=NOW) == name


def test_token_to_header_refuses_to_exceed_the_limit() -> None:
    long_name = "ü" * 64
    with pytest.raises(TokenFormatError, match="at most"):
        token_to_header(token(name=long_name, target=long_name, purpose="GET /" + "ü" * 100))


# --------------------------------------------------------------------------- mutual auth


def test_reply_in_hello_meta_proves_the_acceptor() -> None:
    dialer_check, acceptor_check = verifier("a"), verifier("b")
    sent = token()
    acceptor_check.verify(sent, purpose="GET /ws", now=NOW)
    meta = reply_to_meta(make_reply(SECRET, sent, self_name="b", now=NOW))
    assert all(len(v) <= 256 for v in meta.values())  # the wire's meta string limit
    verify_reply(dialer_check, reply_from_meta(meta, sent=sent, sender="b"), sent, now=NOW)
    with pytest.raises(TokenReplayedError):
        verify_reply(dialer_check, reply_from_meta(meta, sent=sent, sender="b"), sent, now=NOW)


def test_reply_is_bound_to_its_request_sender_and_secret() -> None:
    sent, other = token(), token()
    meta = reply_to_meta(make_reply(SECRET, sent, self_name="b", now=NOW))
    with pytest.raises(BadMacError):  # answers another request
        verify_reply(verifier("a"), reply_from_meta(meta, sent=other, sender="b"), other, now=NOW)
    with pytest.raises(BadMacError):  # claims another sender
        verify_reply(verifier("a"), reply_from_meta(meta, sent=sent, sender="c"), sent, now=NOW)
    forged = reply_to_meta(make_reply(OTHER_SECRET, sent, self_name="b", now=NOW))
    with pytest.raises(BadMacError):
        verify_reply(verifier("a"), reply_from_meta(forged, sent=sent, sender="b"), sent, now=NOW)
    with pytest.raises(AuthError):  # a reflected request is no reply
        verify_reply(verifier("a"), sent, sent, now=NOW)
    with pytest.raises(UnknownPeerError):  # a valid reply, but from the wrong peer
        verify_reply(verifier("a"), make_reply(SECRET, sent, self_name="c", now=NOW), sent, now=NOW)


@pytest.mark.parametrize(
    ("meta", "error"),
    [
        ({}, MissingTokenError),
        ({"auth_ts": "1.000", "auth_nonce": "0" * 32}, MissingTokenError),
        ({"auth_ts": 1.0, "auth_nonce": "0" * 32, "auth_mac": "0" * 64}, TokenFormatError),
        ({"auth_ts": "1.000", "auth_nonce": 7, "auth_mac": "0" * 64}, TokenFormatError),
        ({"auth_ts": "1.000", "auth_nonce": "0" * 31, "auth_mac": "0" * 64}, TokenFormatError),
    ],
)
def test_reply_from_meta_refuses_bad_meta(meta: dict[str, object], error: type[AuthError]) -> None:
    with pytest.raises(error):
        reply_from_meta(meta, sent=token(), sender="b")


# --------------------------------------------------------------------------- the secret


def test_secret_never_shows_itself() -> None:
    for text in (repr(SECRET), str(SECRET), f"{SECRET}", f"{SECRET!r}", f"{SECRET:>80}", repr([SECRET])):
        assert_no_leak(text)
    assert repr(SECRET) == f"Secret(<redacted>, {len(SECRET_TEXT)} bytes)"
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(SECRET)
    assert copy.copy(SECRET) is SECRET and copy.deepcopy(SECRET) is SECRET
    with pytest.raises(AttributeError):
        SECRET._key = b"x" * 32
    with pytest.raises(TypeError):
        hash(SECRET)
    assert Secret(SECRET_TEXT.encode()) == SECRET and SECRET != OTHER_SECRET
    assert not hasattr(SECRET, "__dict__")


def test_errors_and_verifier_never_show_the_secret() -> None:
    check = verifier()
    assert_no_leak(repr(check))
    messages = []
    for bad in (token(secret=OTHER_SECRET), token(target="c"), token(now=NOW - 99)):
        with pytest.raises(AuthError) as info:
            check.verify(bad, purpose="GET /ws", now=NOW)
        messages += [str(info.value), repr(info.value)]
    with pytest.raises(AuthConfigError) as short:
        Secret(SECRET_TEXT.encode()[:10])
    messages.append(str(short.value))
    for message in messages:
        assert_no_leak(message)
        assert SECRET_TEXT[:10] not in message


def test_auth_errors_join_the_exception_tree() -> None:
    assert issubclass(AuthError, P2PDLError) and issubclass(AuthConfigError, ConfigError)
    reasons = {cls.reason for cls in AuthError.__subclasses__()}
    assert len(reasons) == len(AuthError.__subclasses__())


def test_load_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PDL_TEST_SECRET", SECRET_TEXT + "\n")
    assert load_secret(env="P2PDL_TEST_SECRET", file=None) == SECRET
    monkeypatch.setenv("P2PDL_TEST_SECRET", SECRET_TEXT[:15])
    with pytest.raises(AuthConfigError, match="P2PDL_TEST_SECRET is 15 bytes") as info:
        load_secret(env="P2PDL_TEST_SECRET", file=None)
    assert SECRET_TEXT[:15] not in str(info.value)
    monkeypatch.setenv("P2PDL_TEST_SECRET", "\n")
    with pytest.raises(AuthConfigError, match="empty"):
        load_secret(env="P2PDL_TEST_SECRET", file=None)
    monkeypatch.delenv("P2PDL_TEST_SECRET")
    with pytest.raises(AuthConfigError, match="P2PDL_TEST_SECRET is not set"):
        load_secret(env="P2PDL_TEST_SECRET", file=None)


def test_load_secret_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="exactly one"):
        load_secret(env=None, file=None)
    with pytest.raises(AuthConfigError, match="exactly one"):
        load_secret(env="X", file=tmp_path / "s")


def test_load_secret_from_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET_TEXT.encode() + b"\r\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="p2pdl.net.auth"):
        assert load_secret(env=None, file=path) == SECRET
    assert not caplog.records
    path.write_bytes(SECRET_TEXT.encode() + b"\n\n")  # only one newline is stripped
    assert load_secret(env=None, file=path) == Secret(SECRET_TEXT.encode() + b"\n")
    if os.name == "posix":
        path.chmod(0o644)
        with caplog.at_level(logging.WARNING, logger="p2pdl.net.auth"):
            load_secret(env=None, file=path)
        assert "chmod 600" in caplog.text
        assert_no_leak(caplog.text)


def test_load_secret_file_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(AuthConfigError, match=r"cannot read secret file .*nope.*No such file"):
        load_secret(env=None, file=missing)
    with pytest.raises(AuthConfigError, match=rf"{tmp_path.name}.*(not a regular file|Is a directory)"):
        load_secret(env=None, file=tmp_path)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    with pytest.raises(AuthConfigError, match="right file"):
        load_secret(env=None, file=big)
    short = tmp_path / "short"
    short.write_bytes(SECRET_TEXT.encode()[:8] + b"\n")
    with pytest.raises(AuthConfigError, match=r"short.* is 8 bytes") as info:
        load_secret(env=None, file=short)
    assert SECRET_TEXT[:8] not in str(info.value)


# --------------------------------------------------------------------------- aiohttp servers


@contextlib.asynccontextmanager
async def serve(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """Run ``app`` on 127.0.0.1:0 and yield the port the OS picked."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def _whoami(request: web.Request) -> web.Response:
    peercert = request.transport.get_extra_info("peercert") if request.transport else None
    return web.json_response({"cert_names": sorted(cert_names(peercert))})


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: CertPair
    server: CertPair  # "b" at 127.0.0.1
    client: CertPair  # "a"
    stranger: CertPair  # "a", signed by another CA
    other_ca: CertPair
    wrong_ip_server: CertPair  # "b" at 127.0.0.2


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca(root / "swarm"), make_ca(root / "other", name="other-ca")
    return Pki(
        ca=ca,
        server=make_peer_cert(root / "swarm", ca, "b"),
        client=make_peer_cert(root / "swarm", ca, "a"),
        stranger=make_peer_cert(root / "other", other_ca, "a"),
        other_ca=other_ca,
        wrong_ip_server=make_peer_cert(root / "wrong-ip", ca, "b", ip="127.0.0.2"),
    )


async def _get_tls(port: int, context: ssl.SSLContext) -> tuple[int, Any]:
    connector = aiohttp.TCPConnector(ssl=context)
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.get(f"https://127.0.0.1:{port}/whoami") as response,
    ):
        return response.status, await response.json()


def _mtls_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/whoami", _whoami)
    return app


async def test_tls_mutual_round_trip(pki: Pki) -> None:
    server = server_ssl_context(*pki.server, pki.ca[0], require_client_cert=True)
    async with serve(_mtls_app(), server) as port:
        status, body = await _get_tls(port, client_ssl_context(pki.ca[0], *pki.client))
    assert status == 200
    assert body == {"cert_names": ["a"]}


async def test_tls_client_without_a_certificate_is_refused(pki: Pki) -> None:
    server = server_ssl_context(*pki.server, pki.ca[0], require_client_cert=True)
    async with serve(_mtls_app(), server) as port:
        with pytest.raises(aiohttp.ClientError):
            await _get_tls(port, client_ssl_context(pki.ca[0], None, None))


async def test_tls_client_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    server = server_ssl_context(*pki.server, pki.ca[0], require_client_cert=True)
    async with serve(_mtls_app(), server) as port:
        with pytest.raises(aiohttp.ClientError):
            await _get_tls(port, client_ssl_context(pki.ca[0], *pki.stranger))


async def test_tls_client_refuses_a_server_from_another_ca(pki: Pki) -> None:
    server = server_ssl_context(*pki.server, None, require_client_cert=False)
    async with serve(_mtls_app(), server) as port:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _get_tls(port, client_ssl_context(pki.other_ca[0], None, None))
        status, body = await _get_tls(port, client_ssl_context(pki.ca[0], None, None))
    assert status == 200 and body == {"cert_names": []}


async def test_tls_client_checks_the_ip_address(pki: Pki) -> None:
    server = server_ssl_context(*pki.wrong_ip_server, None, require_client_cert=False)
    async with serve(_mtls_app(), server) as port:
        with pytest.raises(aiohttp.ClientConnectorCertificateError, match=r"127\.0\.0\.1"):
            await _get_tls(port, client_ssl_context(pki.ca[0], None, None))


def test_tls_contexts_are_strict(pki: Pki) -> None:
    client = client_ssl_context(pki.ca[0], *pki.client)
    server = server_ssl_context(*pki.server, pki.ca[0], require_client_cert=True)
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    assert server.verify_mode == ssl.CERT_REQUIRED
    for context in (client, server):
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    optional = server_ssl_context(*pki.server, pki.ca[0], require_client_cert=False)
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    # Only the swarm CA is trusted, not the system store.
    assert len(client.get_ca_certs()) == 1


def test_tls_configuration_errors_name_the_file(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.server
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = encrypt_key(key, tmp_path / "encrypted.key")
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: server_ssl_context(missing, key, None, require_client_cert=False), "certificate .*missing.pem"),
        (lambda: server_ssl_context(cert, missing, None, require_client_cert=False), "private key .*missing.pem"),
        (lambda: server_ssl_context(cert, key, missing, require_client_cert=True), "CA bundle .*missing.pem"),
        (lambda: server_ssl_context(garbage, key, None, require_client_cert=False), "garbage.pem"),
        (lambda: server_ssl_context(cert, pki.client[1], None, require_client_cert=False), "does not match"),
        (lambda: server_ssl_context(cert, key, garbage, require_client_cert=True), "CA bundle .*garbage.pem"),
        (lambda: server_ssl_context(cert, key, None, require_client_cert=True), "needs a CA bundle"),
        (lambda: client_ssl_context(missing, None, None), "CA bundle .*missing.pem"),
        (lambda: client_ssl_context(pki.ca[0], cert, None), "both a cert file and a key file"),
    ]
    for make, pattern in cases:
        with pytest.raises(AuthConfigError, match=pattern):
            make()
    # An encrypted key never makes OpenSSL prompt on the terminal; the error says what is wrong.
    with pytest.raises(AuthConfigError, match=r"encrypted.key' is encrypted"):
        server_ssl_context(cert, encrypted, None, require_client_cert=False)


def test_cert_names() -> None:
    peercert = {
        "subject": ((("countryName", "XX"),), (("commonName", "a"),)),
        "subjectAltName": (("IP Address", "127.0.0.1"), ("DNS", "a-alias")),
    }
    assert cert_names(peercert) == {"a", "a-alias"}
    assert cert_names(None) == frozenset() and cert_names({}) == frozenset()


# --------------------------------------------------------------------------- header auth over HTTP


async def _status(request: web.Request) -> web.Response:
    return web.json_response({"peer": request[PEER_KEY]})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _ws(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str(f"hello {request[PEER_KEY]}")
    await ws.close()
    return ws


def _header_auth_app(rejected: list[str]) -> web.Application:
    check = TokenVerifier(SECRET, self_name="b", known_peers={"a", "c"})
    app = web.Application(
        middlewares=[auth_middleware(check, on_reject=lambda request, exc: rejected.append(exc.reason))]
    )
    app.on_response_prepare.append(reply_signer(SECRET, self_name="b"))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/status", _status)
    app.router.add_get("/ws", _ws)
    return app


def _auth(purpose: str, *, target: str = "b", secret: Secret = SECRET) -> tuple[AuthToken, dict[str, str]]:
    sent = make_token(secret, name="a", target=target, purpose=purpose)
    return sent, {HEADER: token_to_header(sent)}


async def test_header_auth_middleware(caplog: pytest.LogCaptureFixture) -> None:
    rejected: list[str] = []
    client_check = TokenVerifier(SECRET, self_name="a")
    async with serve(_header_auth_app(rejected)) as port, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{port}"

        async def get(path: str, headers: Any = None) -> tuple[int, Any, aiohttp.ClientResponse]:
            async with session.get(base + path, headers=headers) as response:
                json_body = response.content_type == "application/json"
                return response.status, await (response.json() if json_body else response.text()), response

        status, body, _ = await get("/healthz")
        assert (status, body) == (200, {"ok": True})

        status, body, response = await get("/status")
        assert (status, body) == (401, {"error": "unauthorized"})
        assert response.headers["WWW-Authenticate"] == "p2pdl-hmac v1"
        assert REPLY_HEADER not in response.headers

        assert (await get("/status", _auth("GET /status", secret=OTHER_SECRET)[1]))[:2] == (
            401,
            {"error": "unauthorized"},
        )

        sent, headers = _auth("GET /status")
        status, body, response = await get("/status", headers)
        assert (status, body) == (200, {"peer": "a"})
        # Mutual: the answer proves it came from "b", which holds the secret, for this request.
        verify_reply(client_check, token_from_header(response.headers[REPLY_HEADER]), sent)

        assert (await get("/status", headers))[:2] == (401, {"error": "unauthorized"})  # replay
        assert (await get("/nowhere"))[0] == 401  # no 404 for strangers
        assert (await get("/nowhere", _auth("GET /nowhere")[1]))[0] == 404
        assert (await get("/status", _auth("GET /status", target="c")[1]))[0] == 401
        assert (await get("/status", _auth("GET /healthz")[1]))[0] == 401
        two = CIMultiDict([(HEADER, _auth("GET /status")[1][HEADER]), (HEADER, _auth("GET /status")[1][HEADER])])
        assert (await get("/status", two))[0] == 401
        assert (await get("/status", {HEADER: "Bearer nope"}))[0] == 401

        # The WebSocket upgrade is a GET /ws: the same header guards it.
        sent, headers = _auth("GET /ws")
        async with session.ws_connect(base + "/ws", headers=headers) as ws:
            assert await ws.receive_str() == "hello a"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(base + "/ws")
        assert refused.value.status == 401

    assert rejected == [
        "missing",
        "bad_mac",
        "replayed",
        "missing",
        "wrong_target",
        "wrong_purpose",
        "malformed",
        "malformed",
        "missing",
    ]
    assert_no_leak(caplog.text)
