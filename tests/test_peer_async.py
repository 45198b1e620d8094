"""In-process tier: real Peers with real aiohttp servers on 127.0.0.1:0 in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import torch

from p2pdl import Peer
from p2pdl.config import config_from_mapping
from p2pdl.net.links import CLOSE_NOT_A_NEIGHBOR
from p2pdl.wire import Frame, encode_frame

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"


def two_peer_config(**strategy: object) -> object:
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py"), "lr": 0.1, "momentum": 0.0},
            "strategy": {"kind": "gossip", "round_timeout": 5.0, **strategy},
            "topology": {"kind": "ring"},
            "transport": {"startup_timeout": 10.0, "heartbeat_interval": 1.0},
            "peers": [{"name": "a", "address": "127.0.0.1:0"}, {"name": "b", "address": "127.0.0.1:0"}],
        }
    )


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def zero_closure() -> torch.Tensor:
    """No gradients: the optimizer leaves parameters alone, so only mixing moves them."""
    return torch.zeros(())


@contextlib.asynccontextmanager
async def two_peers(seed_a: int = 1, seed_b: int = 2) -> AsyncIterator[tuple[Peer, Peer]]:
    config = two_peer_config()
    model_a, model_b = make_model(seed_a), make_model(seed_b)
    b = Peer(config, "b", model_b, torch.optim.SGD(model_b.parameters(), lr=0.1))  # type: ignore[arg-type]
    # Both bind port 0: b binds first and a learns where it landed as a bootstrap address.
    port_b = await b.transport.start()
    a = Peer(  # type: ignore[arg-type]
        config, "a", model_a, torch.optim.SGD(model_a.parameters(), lr=0.1), bootstrap=(f"127.0.0.1:{port_b}",)
    )
    try:
        await asyncio.gather(a.start(), b.start())
        yield a, b
    finally:
        await asyncio.gather(a.close(), b.close())


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


async def test_two_peers_exchange_a_round() -> None:
    async with two_peers() as (a, b):
        before_a, before_b = flat(a.model).clone(), flat(b.model).clone()
        ra, rb = await asyncio.gather(a.step(zero_closure), b.step(zero_closure))
        assert ra.parameter_round is not None and ra.parameter_round.complete
        assert rb.parameter_round is not None and rb.parameter_round.complete
        # Two peers on a ring: w_ab = 1/(1+1) = 0.5, so both land exactly on the average.
        expected = (before_a + before_b) / 2
        torch.testing.assert_close(flat(a.model), expected)
        torch.testing.assert_close(flat(b.model), expected)
        status = a.status()
        assert status["bytes_sent"] > 0 and status["bytes_received"] > 0
        assert status["rounds"]["complete"] == 1 and status["rounds"]["partial"] == 0
        assert {n["name"]: n["state"] for n in status["neighbors"]} == {"b": "connected"}


async def test_a_goodbye_that_arrives_after_our_own_leaves_the_graph_alone() -> None:
    """Peers that close together: the neighbour's goodbye is handled after this peer marked
    itself left, with no live member at all; the graph stays (it used to raise ConfigError
    "need at least 1 peer" from the frame handler)."""
    async with two_peers() as (a, _b):
        graph = a._graph
        a.membership.leave()
        a._on_peer_left("b")
        assert a._graph is graph
        assert a.membership.live_names() == ()


async def test_malformed_and_poisoned_frames_are_rejected_and_peer_keeps_working() -> None:
    async with two_peers() as (a, b):
        await asyncio.gather(a.step(zero_closure), b.step(zero_closure))
        before_b = flat(b.model).clone()
        # Garbage, then a well-formed frame for the next round full of NaN, over the real link.
        await a.transport.send_encoded("b", b"definitely not a frame")
        poisoned = {name: torch.full_like(p, float("nan")) for name, p in a.model.named_parameters()}
        await a.transport.send_encoded(
            "b", encode_frame(Frame(kind="params", sender="a", round=1, step=1, tensors=poisoned))
        )
        wrong_shape = {name: torch.zeros(7) for name, _ in a.model.named_parameters()}
        await a.transport.send_encoded(
            "b", encode_frame(Frame(kind="params", sender="a", round=1, step=1, tensors=wrong_shape))
        )
        for _ in range(100):
            rejected = b.status()["frames_rejected"]
            if rejected["total"] >= 3:
                break
            await asyncio.sleep(0.02)
        assert rejected["by_reason"] == {"format": 1, "non_finite": 1, "shape": 1}
        torch.testing.assert_close(flat(b.model), before_b, rtol=0, atol=0)
        # The link survived and the next real round still completes with a's honest frame.
        _, rb = await asyncio.gather(a.step(zero_closure), b.step(zero_closure))
        assert rb.parameter_round is not None and rb.parameter_round.complete
        assert torch.isfinite(flat(b.model)).all()


async def test_outsider_is_refused_with_a_close_code() -> None:
    async with two_peers() as (_, b):
        url = f"http://127.0.0.1:{b.transport.port}/ws"
        hello = encode_frame(Frame(kind="hello", sender="mallory", round=0, step=0))
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            await ws.send_bytes(hello)
            message = await ws.receive(timeout=5)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == CLOSE_NOT_A_NEIGHBOR
        assert b.status()["frames_rejected"]["by_reason"].get("unknown_sender") == 1
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{b.transport.port}/healthz") as response:
                assert response.status == 200
            async with session.get(f"http://127.0.0.1:{b.transport.port}/status") as response:
                body = await response.json()
        for key in ("name", "step", "round", "neighbors", "loss", "test_accuracy"):
            assert key in body
        for key in ("bytes_sent", "bytes_received", "frames_rejected"):
            assert key in body


async def test_missing_neighbour_makes_a_partial_round_not_a_complete_one() -> None:
    config = config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py")},
            "strategy": {"kind": "gossip", "round_timeout": 0.3},
            "transport": {"startup_timeout": 0.5, "handshake_timeout": 0.2},
            # b stays a member (unreachable, not yet dead) for the whole round: the round is partial,
            # not a round of a swarm that has already dropped b
            "membership": {"gossip_interval": 0.1, "gossip_timeout": 0.2, "suspect_after": 5.0, "dead_after": 10.0},
            "peers": [{"name": "a", "address": "127.0.0.1:0"}, {"name": "b", "address": "127.0.0.1:9"}],
        }
    )
    model = make_model(1)
    before = flat(model).clone()
    async with Peer(config, "a", model, torch.optim.SGD(model.parameters(), lr=0.1)) as a:  # type: ignore[arg-type]
        result = await a.step(zero_closure)
    outcome = result.parameter_round
    assert outcome is not None
    assert not outcome.complete and outcome.missing == ("b",)
    assert a.ledger.partial == 1 and a.ledger.complete == 0
    assert a.ledger.as_dict()["recent_partial"] == [{"round": 0, "missing": ["b"]}]
    # Its weight moved to itself: the parameters are unchanged, not scaled down.
    torch.testing.assert_close(flat(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gossip", "allreduce"])
async def test_step_requires_a_started_peer(kind: str) -> None:
    config = two_peer_config(kind=kind)
    model = make_model(0)
    peer = Peer(config, "a", model, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="async with"):
        await peer.step(zero_closure)
    await peer.close()


async def test_large_frames_from_the_dialer_go_as_post_bodies_through_the_same_checks() -> None:
    async with two_peers() as (a, b):
        assert a.transport._links["b"].dials and a.transport._links["b"].frames_token
        posted: list[int] = []
        original = a.transport._post_frame

        async def counting_post(link: object, data: bytes) -> None:
            posted.append(len(data))
            await original(link, data)  # type: ignore[arg-type]

        a.transport._post_frame = counting_post  # type: ignore[method-assign]
        received_before = b.status()["bytes_received"]
        # 256 KiB of the wrong shape: big enough for POST, refused by b's schema check as usual.
        frame = Frame(kind="params", sender="a", round=5, step=5, tensors={"x": torch.zeros(65536)})
        big = encode_frame(frame, compression="never")
        await a.transport.send_encoded("b", big)
        assert posted == [len(big)]
        assert b.status()["bytes_received"] - received_before == len(big)
        assert b.status()["frames_rejected"]["by_reason"] == {"shape": 1}
        # The link is intact and rounds still complete in both directions.
        ra, rb = await asyncio.gather(a.step(zero_closure), b.step(zero_closure))
        assert ra.parameter_round is not None and ra.parameter_round.complete
        assert rb.parameter_round is not None and rb.parameter_round.complete


async def test_frames_post_needs_the_live_links_token() -> None:
    async with two_peers() as (a, b):
        url = f"http://127.0.0.1:{b.transport.port}/frames"
        body = encode_frame(Frame(kind="params", sender="a", round=9, step=9))
        token = a.transport._links["b"].frames_token
        async with aiohttp.ClientSession() as session:
            for headers in (
                {},
                {"X-P2PDL-Sender": "a", "X-P2PDL-Frames-Token": "0" * 32},
                {"X-P2PDL-Sender": "mallory", "X-P2PDL-Frames-Token": token},
                {"X-P2PDL-Sender": "a", "X-P2PDL-Frames-Token": "é"},
            ):
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 403
            # b dials nobody; a, as the acceptor of nothing, hands out no token for b to use.
            async with session.post(
                f"http://127.0.0.1:{a.transport.port}/frames",
                data=body,
                headers={"X-P2PDL-Sender": "b", "X-P2PDL-Frames-Token": token},
            ) as response:
                assert response.status == 403
        assert b.status()["frames_rejected"]["by_reason"] == {"unknown_sender": 4}
        assert b.status()["frames_received"] == 0


async def test_a_fresh_state_download_is_served_at_the_end_of_the_donors_next_step() -> None:
    """``GET /state?fresh=1`` (PROTOCOL.md §3.5): the donor holds the download until its next
    step has ended and serves that step's result, not the state it held when asked."""
    async with two_peers() as (a, b):
        download = asyncio.create_task(b.fetch_state("a", fresh=True))
        await wait_until(lambda: len(a.state_service._fresh_waiters) == 1)  # held, not served at step 0
        assert not download.done()
        await asyncio.gather(a.step(zero_closure), b.step(zero_closure))
        assert await asyncio.wait_for(download, 10) == 1  # the state after a's step 0
        assert a.state_service._fresh_waiters == []


async def test_a_fresh_download_from_a_donor_that_does_not_step_gets_its_current_state() -> None:
    """A donor that ends no step within its hold (below quorum, at the end of its run) serves
    the state it has; a download never waits on a step that does not come."""
    async with two_peers() as (a, b):
        a.step_index = 7
        assert await asyncio.wait_for(b.fetch_state("a", fresh=True), 10) == 7
        assert a.state_service._fresh_waiters == []


@pytest.mark.parametrize("value", ["2", "yes", ""])
async def test_a_bad_fresh_value_is_a_400_that_names_it(value: str) -> None:
    async with two_peers() as (a, _b), aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{a.transport.port}/state"
        async with session.get(url, params={"fresh": value}) as response:
            assert response.status == 400
            assert "fresh must be 0 or 1" in await response.text()
        assert a.state_service._fresh_waiters == []


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_donor_that_closes_serves_its_held_downloads_the_current_state() -> None:
    """A download held for the end of a step that will not come (the donor closes) gets the
    current state at once instead of a dropped connection."""
    async with two_peers() as (a, b):
        a.step_index = 5
        download = asyncio.create_task(b.fetch_state("a", fresh=True))
        await wait_until(lambda: len(a.state_service._fresh_waiters) == 1)
        await a.close()
        assert await asyncio.wait_for(download, 10) == 5
