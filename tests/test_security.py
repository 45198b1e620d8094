"""A swarm with a secret (and optionally TLS) refuses outsiders; members train as usual."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from tls_util import make_ca, make_peer_cert

from p2pdl import Peer
from p2pdl.config import config_from_mapping
from p2pdl.errors import AuthConfigError
from p2pdl.net.auth import HEADER, make_token, token_to_header

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
SECRET = "correct horse battery staple, swarm 42"


def config(security: dict[str, Any], **transport: Any) -> Any:
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py")},
            "strategy": {"kind": "gossip", "round_timeout": 5.0},
            "transport": {"startup_timeout": 10.0, **transport},
            "security": security,
            "peers": [{"name": "a", "address": "127.0.0.1:0"}, {"name": "b", "address": "127.0.0.1:0"}],
        }
    )


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def zero() -> torch.Tensor:
    return torch.zeros(())


@contextlib.asynccontextmanager
async def swarm(cfg: Any) -> AsyncIterator[tuple[Peer, Peer]]:
    model_a, model_b = model(1), model(2)
    b = Peer(cfg, "b", model_b, torch.optim.SGD(model_b.parameters(), lr=0.0))
    port = await b.transport.start()
    a = Peer(cfg, "a", model_a, torch.optim.SGD(model_a.parameters(), lr=0.0), bootstrap=(f"127.0.0.1:{port}",))
    try:
        await asyncio.gather(a.start(), b.start())
        yield a, b
    finally:
        await asyncio.gather(a.close(), b.close())


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("P2PDL_TEST_SWARM_SECRET", SECRET)
    return "P2PDL_TEST_SWARM_SECRET"


async def test_members_with_the_secret_train_and_outsiders_get_401(secret_env: str) -> None:
    async with swarm(config({"secret_env": secret_env})) as (a, b):
        results = await asyncio.gather(a.step(zero), b.step(zero))
        assert all(r.parameter_round is not None and r.parameter_round.complete for r in results)
        base = f"http://127.0.0.1:{b.transport.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
                assert await response.json() == {"ok": True}  # names nothing
            for path in ("/status", "/members", "/state", "/nonexistent"):
                async with session.get(base + path) as response:
                    assert response.status == 401, path
                    assert await response.json() == {"error": "unauthorized"}
            from p2pdl.net.auth import Secret

            wrong = make_token(Secret(b"x" * 32), name="a", target="b", purpose="GET /status")
            async with session.get(f"{base}/status", headers={HEADER: token_to_header(wrong)}) as response:
                assert response.status == 401
            good = token_to_header(make_token(Secret(SECRET.encode()), name="a", target="b", purpose="GET /status"))
            async with session.get(f"{base}/status", headers={HEADER: good}) as response:
                assert response.status == 200
                assert (await response.json())["name"] == "b"
            async with session.get(f"{base}/status", headers={HEADER: good}) as response:
                assert response.status == 401, "a replayed token must be refused"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{base}/ws")
            assert refused.value.status == 401
        rejected = b.status()["auth_rejected"]["by_reason"]
        assert rejected["missing"] >= 4 and rejected["bad_mac"] >= 1 and rejected["replayed"] == 1
        # Training went on through all of it.
        results = await asyncio.gather(a.step(zero), b.step(zero))
        assert all(r.parameter_round is not None and r.parameter_round.complete for r in results)


async def test_a_peer_with_a_different_secret_cannot_join(secret_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    good = config({"secret_env": secret_env}, startup_timeout=2.0, handshake_timeout=1.0)
    model_b = model(2)
    b = Peer(good, "b", model_b, torch.optim.SGD(model_b.parameters(), lr=0.0))
    port = await b.transport.start()
    monkeypatch.setenv("P2PDL_TEST_OTHER_SECRET", "a different secret of enough length")
    bad = config({"secret_env": "P2PDL_TEST_OTHER_SECRET"}, startup_timeout=2.0, handshake_timeout=1.0)
    model_a = model(1)
    a = Peer(bad, "a", model_a, torch.optim.SGD(model_a.parameters(), lr=0.0), bootstrap=(f"127.0.0.1:{port}",))
    try:
        await asyncio.gather(a.start(), b.start())
        assert a.transport.connected_neighbors() == ()
        assert b.transport.connected_neighbors() == ()
        assert b.status()["auth_rejected"]["total"] >= 1
        assert not b.membership.heard_from("a")
    finally:
        await asyncio.gather(a.close(), b.close())


def test_secret_problems_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PDL_TEST_SHORT", "short")
    cfg = config({"secret_env": "P2PDL_TEST_SHORT"})
    with pytest.raises(AuthConfigError) as info:
        Peer(cfg, "a", model(0), torch.optim.SGD(model(0).parameters(), lr=0.0))
    assert "short" not in str(info.value).replace("P2PDL_TEST_SHORT", "")


async def test_tls_swarm_with_generated_certificates(tmp_path: Path, secret_env: str) -> None:
    pytest.importorskip("ssl")
    ca = make_ca(tmp_path)
    cert, key = make_peer_cert(tmp_path, ca, "swarm")
    cfg = config(
        {"secret_env": secret_env, "tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(ca[0])},
    )
    async with swarm(cfg) as (a, b):
        assert a.transport.security.scheme == "https"
        results = await asyncio.gather(a.step(zero), b.step(zero))
        assert all(r.parameter_round is not None and r.parameter_round.complete for r in results)
        # A plain-HTTP client, or TLS without a client certificate, gets nowhere.
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                await session.get(f"http://127.0.0.1:{b.transport.port}/healthz")
            no_cert = ssl.create_default_context(cafile=str(ca[0]))
            with pytest.raises(aiohttp.ClientError):
                await session.get(f"https://127.0.0.1:{b.transport.port}/healthz", ssl=no_cert)


async def test_connection_limits_and_slow_clients(secret_env: str) -> None:
    cfg = config({"secret_env": secret_env}, max_connections_per_address=8, request_timeout=0.5)
    async with swarm(cfg) as (_, b):
        port = b.transport.port
        # A slowloris: opens connections and trickles a request head that never ends.
        slow = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n")
            slow.append((reader, writer))
        await asyncio.sleep(1.2)
        assert b.status()["connections_timed_out"] >= 3
        for reader, writer in slow:
            assert await asyncio.wait_for(reader.read(), timeout=2) == b""  # the server hung up
            writer.close()
        # Too many connections from one address: the extra ones are refused at accept.
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(12)]
        await asyncio.sleep(0.2)
        assert b.status()["connections_refused"] >= 1
        for _, writer in held:
            writer.close()


async def test_state_download_works_with_a_secret(secret_env: str) -> None:
    async with swarm(config({"secret_env": secret_env})) as (a, b):
        with torch.no_grad():
            for p in b.model.parameters():
                p.add_(1.0)
        b.step_index = 7
        step = await a.fetch_state("b")
        assert step == 7
        for mine, theirs in zip(a.model.parameters(), b.model.parameters(), strict=True):
            assert torch.equal(mine, theirs)


async def test_a_fresh_state_download_is_signed_without_its_query(secret_env: str) -> None:
    """``GET /state?fresh=1`` carries a token for ``GET /state`` (PROTOCOL.md §8.1): with a secret
    the held download is accepted and served at the end of the donor's step."""
    async with swarm(config({"secret_env": secret_env})) as (a, b):
        download = asyncio.create_task(b.fetch_state("a", fresh=True))
        for _ in range(1000):  # until a holds it (10 s at most)
            if a.state_service._fresh_waiters:
                break
            await asyncio.sleep(0.01)
        assert a.state_service._fresh_waiters, "the fresh download was not held"
        await asyncio.gather(a.step(zero), b.step(zero))
        assert await asyncio.wait_for(download, 10) == 1
        assert "missing" not in a.status()["auth_rejected"]["by_reason"]
