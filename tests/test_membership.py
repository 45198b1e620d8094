"""Membership: the pure view (versions, precedence, merge, hostile digests, agreed order) and link liveness.

The unit tests drive :class:`MembershipView` with explicit clock values, so no test sleeps. The
last tests run a real :class:`~p2pdl.Peer` against a raw WebSocket neighbour that never gossips:
its frames alone must keep it alive in the peer's view and graph.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from p2pdl import Peer
from p2pdl.config import config_from_mapping
from p2pdl.errors import MembershipError, P2PDLError
from p2pdl.membership.gossip import merge_digest
from p2pdl.membership.view import MAX_MEMBERS, Member, MembershipView, Timing, natural_key, parse_members
from p2pdl.wire import Frame, encode_frame

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
TIMING = Timing(gossip_interval=1.0, suspect_after=5.0, dead_after=10.0, tombstone_after=600.0)
T0 = 1000.0  # the views' clock starts here; tests pass explicit times


def make_view(name: str = "a", configured: tuple[str, ...] = ("a", "b", "c")) -> MembershipView:
    return MembershipView(
        name=name,
        address=f"127.0.0.1:{9000 + ord(name[0])}",
        configured=[(n, f"127.0.0.1:{9000 + ord(n[0])}") for n in configured],
        timing=TIMING,
        incarnation=100,
        now=T0,
    )


def entry(name: str, incarnation: int, heartbeat: int, *, left: bool = False, address: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "address": address or f"127.0.0.1:{9000 + ord(name[0])}",
        "incarnation": incarnation,
        "heartbeat": heartbeat,
        "left": left,
    }


def versions(view: MembershipView) -> dict[str, tuple[int, int, bool]]:
    return {m["name"]: (m["incarnation"], m["heartbeat"], m["left"]) for m in view.snapshot(now=T0)}


# --------------------------------------------------------------------------- versions and precedence


def test_higher_incarnation_wins_over_any_heartbeat() -> None:
    view = make_view()
    view.merge(parse_members([entry("b", 200, 50)]), now=T0)
    # An older life of b with a huge counter is not newer than its current life.
    view.merge(parse_members([entry("b", 199, 10**9)]), now=T0 + 1)
    assert versions(view)["b"] == (200, 50, False)
    # A restart (new incarnation) wins even with heartbeat 0.
    view.merge(parse_members([entry("b", 201, 0)]), now=T0 + 2)
    assert versions(view)["b"] == (201, 0, False)


def test_fresh_counter_refutes_suspicion_and_a_repeated_one_does_not() -> None:
    view = make_view()
    view.merge(parse_members([entry("b", 200, 5)]), now=T0)
    assert view.state_of("b", now=T0 + 6) == "suspect"
    # The same version again is no news: b stays suspect, then dead.
    view.merge(parse_members([entry("b", 200, 5)]), now=T0 + 6)
    assert view.state_of("b", now=T0 + 6) == "suspect"
    assert view.state_of("b", now=T0 + 10) == "dead"
    # b refutes by bumping its incarnation (a restart): alive again at once.
    view.merge(parse_members([entry("b", 201, 0)]), now=T0 + 10)
    assert view.state_of("b", now=T0 + 10) == "alive"
    # ... or, within one life, with a higher heartbeat.
    assert view.state_of("b", now=T0 + 16) == "suspect"
    view.merge(parse_members([entry("b", 201, 1)]), now=T0 + 16)
    assert view.state_of("b", now=T0 + 16) == "alive"


def test_suspect_then_dead_thresholds_are_local_and_inclusive() -> None:
    view = make_view()
    view.merge(parse_members([entry("b", 200, 1)]), now=T0)
    assert view.state_of("b", now=T0 + TIMING.suspect_after - 0.001) == "alive"
    assert view.state_of("b", now=T0 + TIMING.suspect_after) == "suspect"
    assert view.state_of("b", now=T0 + TIMING.dead_after) == "dead"
    assert "b" in view.live_names(now=T0 + TIMING.suspect_after)  # suspect is still a neighbour
    assert "b" not in view.live_names(now=T0 + TIMING.dead_after)
    # Death is never gossiped: b's digest entry is the same live version.
    assert entry("b", 200, 1) in view.digest()
    assert view.state_of("a", now=T0 + 10**6) == "alive"  # a peer never suspects itself


def test_left_outranks_any_heartbeat_of_the_same_incarnation_only() -> None:
    view = make_view()
    view.merge(parse_members([entry("b", 200, 7, left=True)]), now=T0)
    assert view.state_of("b", now=T0) == "left"
    view.merge(parse_members([entry("b", 200, 2**62 - 1)]), now=T0 + 1)
    assert view.state_of("b", now=T0 + 1) == "left"
    assert versions(view)["b"] == (200, 7, True)
    # A new life of b (restart under the same name) is alive again.
    view.merge(parse_members([entry("b", 201, 0)]), now=T0 + 2)
    assert view.state_of("b", now=T0 + 2) == "alive"
    # A leave of the *older* life arriving late changes nothing.
    view.merge(parse_members([entry("b", 200, 9, left=True)]), now=T0 + 3)
    assert view.state_of("b", now=T0 + 3) == "alive"


def test_left_outranks_dead_and_suspect() -> None:
    view = make_view()
    view.merge(parse_members([entry("b", 200, 1), entry("c", 300, 1)]), now=T0)
    assert view.state_of("b", now=T0 + 20) == "dead"
    assert view.state_of("c", now=T0 + 6) == "suspect"
    view.merge(parse_members([entry("b", 200, 1, left=True), entry("c", 300, 1, left=True)]), now=T0 + 20)
    assert view.state_of("b", now=T0 + 20) == "left" and view.state_of("c", now=T0 + 20) == "left"


def test_mark_left_from_a_link_goodbye_is_gossiped_and_final_within_the_life() -> None:
    view = make_view()
    view.merge(parse_members([entry("b", 200, 3)]), now=T0)
    changes = view.changes
    assert view.mark_left("b") is True
    assert view.mark_left("b") is False  # already left: no second change
    assert view.mark_left("a") is False  # nobody says goodbye for this peer
    assert view.changes == changes + 1
    assert entry("b", 200, 3, left=True) in view.digest()
    view.merge(parse_members([entry("b", 200, 4)]), now=T0 + 1)
    assert view.state_of("b", now=T0 + 1) == "left"


def test_entries_about_the_receiver_itself_are_ignored() -> None:
    view = make_view()
    own = versions(view)["a"]
    view.merge(parse_members([entry("a", 10**12, 10**6, left=True)]), now=T0)
    assert versions(view)["a"] == own
    assert view.state_of("a") == "alive"


# --------------------------------------------------------------------------- digest merge


DIGEST_B = [entry("b", 200, 4), entry("c", 300, 9), entry("j1", 500, 1)]
DIGEST_C = [entry("b", 200, 6), entry("c", 300, 2, left=True), entry("j2", 600, 3)]


def test_merge_is_idempotent() -> None:
    view = make_view()
    assert view.merge(parse_members(DIGEST_B), now=T0) is True
    before, changes = versions(view), view.changes
    assert view.merge(parse_members(DIGEST_B), now=T0) is False
    assert versions(view) == before and view.changes == changes


def test_merge_order_does_not_matter() -> None:
    one, two = make_view(), make_view()
    one.merge(parse_members(DIGEST_B), now=T0)
    one.merge(parse_members(DIGEST_C), now=T0)
    two.merge(parse_members(DIGEST_C), now=T0)
    two.merge(parse_members(DIGEST_B), now=T0)
    assert versions(one) == versions(two)
    assert versions(one)["b"] == (200, 6, False)  # the higher heartbeat
    assert versions(one)["c"] == (300, 2, True)  # the leave, over a higher heartbeat
    assert one.live_names(now=T0) == two.live_names(now=T0) == ("a", "b", "j1", "j2")


def test_two_views_converge_by_exchanging_digests() -> None:
    a, b = make_view("a"), make_view("b")
    a.merge(parse_members([entry("j1", 500, 1)]), now=T0)
    b.merge(parse_members([entry("j2", 600, 1)]), now=T0)
    a.merge(parse_members(b.digest()), now=T0)
    b.merge(parse_members(a.digest()), now=T0)
    assert a.live_names(now=T0) == b.live_names(now=T0) == ("a", "b", "c", "j1", "j2")


HOSTILE_DIGESTS: list[tuple[Any, str]] = [
    ({"name": "b"}, "must be a list"),
    ("members", "must be a list"),
    ([["b", "127.0.0.1:1", 1, 1, False]], "exactly name"),
    ([{**entry("b", 1, 1), "extra": 1}], "exactly name"),
    ([{k: v for k, v in entry("b", 1, 1).items() if k != "left"}], "exactly name"),
    ([entry("b", 1, 1) | {"name": ""}], "bad member name"),
    ([entry("b", 1, 1) | {"name": "x" * 65}], "bad member name"),
    ([entry("b", 1, 1) | {"name": "b/../c"}], "bad member name"),
    ([entry("b", 1, 1) | {"name": "b\n"}], "bad member name"),
    ([entry("b", 1, 1) | {"name": 7}], "bad member name"),
    ([entry("b", 1, 1) | {"address": "nocolon"}], "bad address"),
    ([entry("b", 1, 1) | {"address": "h:" + "1" * 300}], "bad address"),
    ([entry("b", 1, 1) | {"address": None}], "bad address"),
    ([entry("b", 2**62, 1)], "bad incarnation"),
    ([entry("b", 10**30, 1)], "bad incarnation"),
    ([entry("b", -1, 1)], "bad incarnation"),
    ([entry("b", 1, 1) | {"incarnation": True}], "bad incarnation"),
    ([entry("b", 1, 1) | {"incarnation": 1.5}], "bad incarnation"),
    ([entry("b", 1, 1) | {"incarnation": "1"}], "bad incarnation"),
    ([entry("b", 1, 2**62)], "bad heartbeat"),
    ([entry("b", 1, 1) | {"left": 0}], "bad left flag"),
    ([entry(f"m{i}", 1, 1) for i in range(MAX_MEMBERS + 1)], "at most"),
]


@pytest.mark.parametrize(
    ("payload", "message"),
    [pytest.param(p, m, id=f"{i}-{m.replace(' ', '_')}") for i, (p, m) in enumerate(HOSTILE_DIGESTS)],
)
def test_hostile_digests_are_refused_whole(payload: Any, message: str) -> None:
    view = make_view()
    view.merge(parse_members([entry("b", 200, 4)]), now=T0)
    before, changes = versions(view), view.changes
    # A valid entry first: a refusal must not have merged anything before the bad one.
    body = {"members": [entry("c", 300, 1), *payload]} if isinstance(payload, list) else {"members": payload}
    with pytest.raises(MembershipError, match=message) as caught:
        merge_digest(view, body)
    assert isinstance(caught.value, P2PDLError) and caught.value.reason == "membership"
    assert versions(view) == before and view.changes == changes


@pytest.mark.parametrize("body", [[entry("b", 1, 1)], {"member": []}, None, "x", 3])
def test_a_body_that_is_not_a_digest_object_is_refused(body: Any) -> None:
    view = make_view()
    with pytest.raises(MembershipError, match="object with 'members'"):
        merge_digest(view, body)


def test_the_view_never_holds_more_than_max_members() -> None:
    view = make_view()
    flood = [Member(f"m{i}", "127.0.0.1:1", 1, 1) for i in range(MAX_MEMBERS + 50)]
    view.merge(flood, now=T0)
    assert len(view.snapshot(now=T0)) == MAX_MEMBERS


def test_forgotten_tombstones_are_only_unconfigured_members() -> None:
    view = make_view()
    view.merge(parse_members([entry("b", 200, 1), entry("j1", 500, 1)]), now=T0)
    view.merge([], now=T0 + TIMING.tombstone_after + 1)
    names = {m["name"] for m in view.snapshot(now=T0)}
    assert "j1" not in names and {"a", "b", "c"} <= names


# --------------------------------------------------------------------------- agreed order


def test_agreed_order_is_config_order_then_joiners_by_natural_name() -> None:
    configured = ("z", "b", "a")
    joiners = [entry("p10", 1, 1), entry("p2", 1, 1), entry("m", 1, 1), entry("c", 1, 1)]
    views = []
    for own, order in (("z", joiners), ("a", list(reversed(joiners)))):
        view = make_view(own, configured)
        view.merge(parse_members([entry(n, 1, 1) for n in configured if n != own]), now=T0)
        for one in order:  # joiners learnt one by one, in different orders
            view.merge(parse_members([one]), now=T0)
        views.append(view.live_names(now=T0))
    assert views[0] == views[1] == ("z", "b", "a", "c", "m", "p2", "p10")
    assert natural_key("p2") < natural_key("p10")


# --------------------------------------------------------------------------- link liveness (touch)


def test_a_link_frame_counts_for_a_configured_peer_never_heard_by_gossip() -> None:
    view = make_view()
    assert not view.heard_from("b")
    assert view.state_of("b", now=T0 + TIMING.dead_after) == "dead"
    view.touch("b", now=T0 + TIMING.dead_after)
    assert view.heard_from("b")
    assert view.state_of("b", now=T0 + TIMING.dead_after) == "alive"
    # Local evidence only: the placeholder (incarnation 0) is not gossiped on ...
    assert all(m["name"] != "b" for m in view.digest())
    # ... and b's own first digest entry replaces it.
    view.merge(parse_members([entry("b", 200, 0, address="10.0.0.2:29500")]), now=T0 + 11)
    assert versions(view)["b"] == (200, 0, False)
    assert view.addresses()["b"] == "10.0.0.2:29500"
    assert entry("b", 200, 0, address="10.0.0.2:29500") in view.digest()


def test_touch_creates_no_member_and_does_not_revive_a_leave() -> None:
    view = make_view()
    before = versions(view)
    view.touch("mallory", now=T0)
    assert view.member("mallory") is None and versions(view) == before
    view.merge(parse_members([entry("b", 200, 1, left=True)]), now=T0)
    view.touch("b", now=T0 + 1)
    assert view.state_of("b", now=T0 + 1) == "left"


def test_touch_refreshes_a_gossiped_member() -> None:
    view = make_view()
    view.merge(parse_members([entry("b", 200, 1)]), now=T0)
    view.touch("b", now=T0 + 9)
    assert view.state_of("b", now=T0 + 9 + TIMING.suspect_after - 0.5) == "alive"
    assert versions(view)["b"] == (200, 1, False)  # a link frame moves no counter


# --------------------------------------------------------------------------- a real peer, a silent neighbour

FAST = {"gossip_interval": 0.1, "gossip_timeout": 0.5, "suspect_after": 0.5, "dead_after": 1.0}


def link_config() -> Any:
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py")},
            "strategy": {"kind": "gossip", "round_timeout": 0.3},
            "topology": {"kind": "ring"},
            "transport": {"startup_timeout": 5.0, "handshake_timeout": 1.0},
            "membership": FAST,
            # a's address is never dialled (a sorts first, so a dials b) and serves no /gossip.
            "peers": [{"name": "a", "address": "127.0.0.1:9"}, {"name": "b", "address": "127.0.0.1:0"}],
        }
    )


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


@contextlib.asynccontextmanager
async def peer_and_silent_neighbour() -> AsyncIterator[tuple[Peer, aiohttp.ClientWebSocketResponse]]:
    """Peer ``b``, and ``a`` as a raw WebSocket dialer that sends frames but never gossips."""
    model = tiny_model()
    b = Peer(link_config(), "b", model, torch.optim.SGD(model.parameters(), lr=0.0))
    port = await b.transport.start()
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"http://127.0.0.1:{port}/ws")
        reader: asyncio.Task[None] | None = None
        try:
            await ws.send_bytes(encode_frame(Frame(kind="hello", sender="a", round=0, step=0)))
            reply = await ws.receive(timeout=5)
            assert reply.type == aiohttp.WSMsgType.BINARY

            async def drain() -> None:  # reading answers b's WebSocket pings
                async for _ in ws:
                    pass

            reader = asyncio.ensure_future(drain())
            yield b, ws
        finally:
            await ws.close()
            if reader is not None:
                await asyncio.wait_for(reader, timeout=5)
            await b.close()


async def send_params(ws: aiohttp.ClientWebSocketResponse, model: torch.nn.Module, round_index: int) -> None:
    tensors = {name: p.detach().clone() for name, p in model.named_parameters()}
    await ws.send_bytes(
        encode_frame(Frame(kind="params", sender="a", round=round_index, step=round_index, tensors=tensors))
    )


async def test_a_neighbour_heard_only_on_its_link_stays_live_and_a_silent_one_is_dropped() -> None:
    async with peer_and_silent_neighbour() as (b, ws):
        model = tiny_model()
        round_index = 0
        await send_params(ws, model, round_index)
        started = time.monotonic()
        await asyncio.wait_for(b.start(), timeout=5)
        # Heard on the link: b did not sit out its startup_timeout waiting for gossip from a.
        assert time.monotonic() - started < 2.0
        assert b.live_members() == ("a", "b")
        # Frames only, for three dead_after periods: a stays live and is never rewired away.
        deadline = time.monotonic() + 3 * FAST["dead_after"]
        while time.monotonic() < deadline:
            round_index += 1
            await send_params(ws, model, round_index)
            await asyncio.sleep(FAST["gossip_interval"])
            assert b.live_members() == ("a", "b")
        assert all("a" not in record["removed"] for record in b.rewires)
        assert b.status()["frames_rejected"]["by_reason"].get("membership", 0) == 0
        # The link stays up but goes quiet: the detector still works, a is dropped after dead_after.
        quiet = time.monotonic()
        while b.live_members() != ("b",):
            assert time.monotonic() - quiet < 5 * FAST["dead_after"], "a silent neighbour was never dropped"
            await asyncio.sleep(0.05)
        assert time.monotonic() - quiet >= FAST["dead_after"] - FAST["gossip_interval"]
        assert any(record["removed"] == ["a"] for record in b.rewires)


async def test_gossip_route_refuses_a_bad_body_and_counts_it() -> None:
    async with peer_and_silent_neighbour() as (b, _):
        before = b.membership.digest()
        url = f"http://127.0.0.1:{b.transport.port}/gossip"
        async with aiohttp.ClientSession() as session:
            for body in (b"not json", b"[[[[", b'{"members": [{"name": "x"}]}', b'{"nope": 1}'):
                headers = {"Content-Type": "application/json"}
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 400
                    assert (await response.json())["error"].startswith("bad gossip")
        assert b.status()["frames_rejected"]["by_reason"]["membership"] == 4
        assert b.membership.digest() == before
