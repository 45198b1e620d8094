"""Observability: the gossip digest's bounds, ``/metrics``, ``/api/swarm``, the metrics token, the timeline."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from p2pdl import Peer
from p2pdl.config import config_from_mapping
from p2pdl.errors import ConfigError, MembershipError
from p2pdl.membership.gossip import merge_digest
from p2pdl.membership.view import MembershipView, Timing
from p2pdl.net.auth import Secret
from p2pdl.obs.dashboard import token_matches
from p2pdl.obs.digest import (
    LINK_CONNECTING,
    LINK_DOWN,
    LINK_UP,
    MAX_ENTRIES,
    MAX_ENTRY_BYTES,
    MAX_LINKS,
    FigureBook,
    Link,
    build_entry,
    encoded_size,
    parse_figures,
)
from p2pdl.obs.swarm import SwarmWatch

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
TIMING = Timing(gossip_interval=1.0, suspect_after=5.0, dead_after=10.0)


def entry_for(index: int, *, links: int = 2, name_length: int = 3) -> dict[str, Any]:
    return build_entry(
        version=(1_700_000_000_000 + index, 1000 + index),
        step=123_456 + index,
        loss=0.123456789,
        headline=("test_accuracy", 0.87654321),
        steps_per_second=12.3456,
        complete=100_000,
        partial=17,
        refused=3,
        links=[Link(f"p{(index + k) % 1000:0{name_length}d}", LINK_UP, 1234.5) for k in range(1, links + 1)],
    )


def swarm_figures(members: int) -> dict[str, dict[str, Any]]:
    """A book's outgoing body for a swarm of ``members`` peers on a ring (two links each)."""
    book = FigureBook("p000")
    names = [f"p{i:03d}" for i in range(members)]
    book.set_own(entry_for(0))
    book.merge({name: entry_for(i) for i, name in enumerate(names) if i}, names)
    return book.outgoing()


@pytest.mark.parametrize("members", [8, 64])
def test_digest_size_with_8_and_64_members_stays_in_its_bound(members: int) -> None:
    body = swarm_figures(members)
    assert len(body) == members
    total = encoded_size(body)
    per_member = max(encoded_size(e) for e in body.values())
    assert per_member <= MAX_ENTRY_BYTES
    assert total <= members * MAX_ENTRY_BYTES
    # A realistic entry (ring: 2 links, short names) is a small fraction of the bound.
    assert per_member < 250, per_member
    print(f"figures for {members} members: {total} bytes, at most {per_member} per member")
    assert parse_figures(json.loads(json.dumps(body))) == body


def test_the_largest_valid_entry_fits_its_bound_and_the_book_caps_a_body() -> None:
    built = build_entry(
        version=(2**53, 2**53),
        step=2**60,
        loss=-1.2345678901234567e300,
        headline=("m" * 32, -9.87654321e-300),
        steps_per_second=1e300,
        complete=2**60,
        partial=2**60,
        refused=2**60,
        links=[Link(f"{'x' * 62}{k:02d}", LINK_DOWN, 1.23456789e300) for k in range(MAX_LINKS + 5)],
    )
    assert len(built["k"]) == MAX_LINKS
    parse_figures({"a": built})
    # What a hostile sender can pack into one valid entry: every field at its longest encoding.
    count, small, huge = 2**53, -1.2345678901234567e-300, 1.2345678901234567e300
    worst = {
        "v": [count, count], "s": count, "l": small, "h": small, "hn": "m" * 32, "r": huge,
        "c": count, "p": count, "f": count, "k": [[f"{'x' * 62}{i:02d}", LINK_DOWN, huge] for i in range(MAX_LINKS)],
    }  # fmt: skip
    parse_figures({"a": worst})
    assert max(encoded_size(built), encoded_size(worst)) <= MAX_ENTRY_BYTES
    names = [f"n{i}" for i in range(MAX_ENTRIES + 40)]
    book = FigureBook("n0")
    book.set_own(entry_for(0))
    book.merge({n: entry_for(i) for i, n in enumerate(names)}, names)
    outgoing = book.outgoing()
    assert len(outgoing) == MAX_ENTRIES and next(iter(outgoing)) == "n0"


def test_build_entry_drops_non_finite_numbers_and_orders_links_by_health() -> None:
    entry = build_entry(
        version=(1, 2),
        step=5,
        loss=math.nan,
        headline=("bad name with spaces", math.inf),
        steps_per_second=math.nan,
        complete=1,
        partial=0,
        refused=0,
        links=[Link("b", LINK_UP, None), Link("a", LINK_DOWN, None), Link("c", LINK_CONNECTING, 2.0)],
    )
    assert entry["l"] is None and entry["h"] is None and entry["r"] == 0.0 and entry["hn"] == ""
    assert [link[0] for link in entry["k"]] == ["a", "c", "b"]


def _mutated(**changes: Any) -> dict[str, Any]:
    entry = entry_for(1)
    entry.update(changes)
    return entry


@pytest.mark.parametrize(
    "figures",
    [
        [],
        "figures",
        {"bad name!": entry_for(1)},
        {"a": "not an object"},
        {"a": {**entry_for(1), "extra": 1}},
        {"a": {k: v for k, v in entry_for(1).items() if k != "s"}},
        {"a": _mutated(s=-1)},
        {"a": _mutated(s=True)},
        {"a": _mutated(s=2**64)},
        {"a": _mutated(l="0.5")},
        {"a": _mutated(l=float("nan"))},
        {"a": _mutated(h=float("inf"))},
        {"a": _mutated(r=-1.0)},
        {"a": _mutated(hn="x" * 33)},
        {"a": _mutated(hn="<script>")},
        {"a": _mutated(v=[1])},
        {"a": _mutated(v=[1, -2])},
        {"a": _mutated(k=[["b", 7, None]])},
        {"a": _mutated(k=[["b", 0, -5.0]])},
        {"a": _mutated(k=[["b", 0]])},
        {"a": _mutated(k=[["b/../", 0, None]])},
        {"a": _mutated(k=[[f"n{i}", 0, None] for i in range(MAX_LINKS + 1)])},
        {"a": _mutated(k=[["b", 0, [[[[1]]]]]])},
        {"a": _mutated(l=10**400)},  # valid JSON, beyond any float: neither a number nor within the bound
        {"a": _mutated(h=-(2**60))},
        {"a": _mutated(k=[["b", 1.0, None]])},  # health is an integer code
        {"a": _mutated(k={"b": 0})},
        {f"n{i}": entry_for(i) for i in range(MAX_ENTRIES + 1)},
    ],
)
def test_hostile_figures_are_refused_whole_before_the_view_changes(figures: Any) -> None:
    view = MembershipView(name="a", address="127.0.0.1:1", configured=[], timing=TIMING, now=0.0)
    book = FigureBook("a")
    newcomer = {"name": "z", "address": "127.0.0.1:9", "incarnation": 5, "heartbeat": 1, "left": False}
    with pytest.raises(MembershipError):
        merge_digest(view, {"members": [newcomer], "figures": figures}, book)
    assert view.member("z") is None and book.entries() == {}


def test_figures_keep_the_newest_version_of_known_members_only() -> None:
    view = MembershipView(name="a", address="127.0.0.1:1", configured=[], timing=TIMING, now=0.0)
    book = FigureBook("a")
    members = [{"name": "b", "address": "127.0.0.1:2", "incarnation": 5, "heartbeat": 1, "left": False}]
    newer, older = entry_for(1), entry_for(0)
    merge_digest(view, {"members": members, "figures": {"b": newer, "stranger": older, "a": older}}, book)
    assert set(book.entries()) == {"b"}  # no stranger, and nobody writes this peer's own figures
    merge_digest(view, {"members": members, "figures": {"b": older}}, book)
    assert book.get("b") == newer
    merge_digest(view, {"members": members}, book)  # a body without figures is still a digest
    assert book.get("b") == newer


def test_timeline_tells_deaths_partitions_leaves_and_rejoins() -> None:
    watch = SwarmWatch("a", history=20)

    def members(**states: str) -> list[dict[str, str]]:
        return [{"name": n, "state": s} for n, s in {"a": "alive", **states}.items()]

    assert watch.sample(members(b="alive", c="alive", d="alive", e="alive"), {}, 1.0) == []
    kinds = [e.kind for e in watch.sample(members(b="dead", c="alive", d="alive", e="alive"), {}, 2.0)]
    assert kinds == ["death"]
    kinds = [e.kind for e in watch.sample(members(b="dead", c="dead", d="dead", e="left"), {}, 3.0)]
    assert kinds == ["partition", "leave"]
    events = watch.sample(members(b="alive", c="alive", d="dead", e="left", f="alive"), {}, 4.0)
    assert [(e.kind, e.members) for e in events] == [("join", ("f",)), ("heal", ("b", "c"))]
    assert watch.event_counts == {"death": 1, "partition": 1, "leave": 1, "join": 1, "heal": 1}


def test_history_is_bounded_and_follows_the_view() -> None:
    watch = SwarmWatch("a", history=10)
    for step in range(25):
        entry = entry_for(step)
        watch.sample([{"name": "a", "state": "alive"}, {"name": "b", "state": "alive"}], {"b": entry}, float(step))
    assert len(watch.history()["b"]) == 10
    watch.sample([{"name": "a", "state": "alive"}], {}, 30.0)
    assert "b" not in watch.history()


def test_metrics_token_accepts_bearer_and_basic_only_with_the_token() -> None:
    token = Secret(b"a-metrics-token-of-32-bytes-long", source="test")
    basic = base64.b64encode(b"anyone:a-metrics-token-of-32-bytes-long").decode()
    assert token_matches("Bearer a-metrics-token-of-32-bytes-long", token)
    assert token_matches(f"Basic {basic}", token)
    assert not token_matches("Bearer a-metrics-token-of-32-bytes-lonG", token)
    assert not token_matches(f"Basic {base64.b64encode(b'anyone:wrong').decode()}", token)
    assert not token_matches("Basic !!!not-base64", token)
    assert not token_matches("Digest a-metrics-token-of-32-bytes-long", token)


def test_a_metrics_server_beside_a_secret_needs_a_token_or_loopback(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    base = {"run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py")}, "peers": [{"name": "a", "address": "127.0.0.1:0"}]}
    with pytest.raises(ConfigError, match=r"observe\.listen"):
        config_from_mapping({**base, "security": {"secret_file": str(secret)}, "observe": {"listen": "0.0.0.0:9464"}})
    config_from_mapping({**base, "security": {"secret_file": str(secret)}, "observe": {"listen": "127.0.0.1:9464"}})
    config_from_mapping(
        {
            **base,
            "security": {"secret_file": str(secret)},
            "observe": {"listen": "0.0.0.0:9464", "token_file": str(secret)},
        }
    )


# ---------------------------------------------------------------------- in-process peers


def three_peer_config(observe: dict[str, Any] | None = None) -> Any:
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py"), "lr": 0.1, "momentum": 0.0},
            "strategy": {"kind": "gossip", "round_timeout": 1.5},
            "topology": {"kind": "ring"},
            "transport": {"startup_timeout": 10.0},
            "membership": {"gossip_interval": 0.2, "suspect_after": 1.0, "dead_after": 2.0, "gossip_timeout": 0.5},
            "observe": observe or {},
            "peers": [{"name": n, "address": "127.0.0.1:0"} for n in ("a", "b", "c")],
        }
    )


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def closure_for(model: torch.nn.Module) -> Any:
    def closure() -> torch.Tensor:
        loss = model(torch.ones(2, 4)).pow(2).mean()
        loss.backward()
        return loss

    return closure


@contextlib.asynccontextmanager
async def three_peers(observe: dict[str, Any] | None = None) -> AsyncIterator[list[Peer]]:
    config = three_peer_config(observe)
    peers: list[Peer] = []
    for index, name in enumerate(("a", "b", "c")):
        model = make_model(index)
        bootstrap = (f"127.0.0.1:{peers[0].transport.port}",) if peers else ()
        peer = Peer(config, name, model, torch.optim.SGD(model.parameters(), lr=0.1), bootstrap=bootstrap)
        await peer.transport.start()
        peers.append(peer)
    try:
        await asyncio.gather(*(p.start() for p in peers))
        yield peers
    finally:
        await asyncio.gather(*(p.close() for p in peers))


async def get_text(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {}) as response:
        return response.status, await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_parse_and_match_status_and_the_swarm_is_seen_from_one_peer() -> None:
    async with three_peers() as peers:
        for _ in range(6):
            await asyncio.gather(*(p.step(closure_for(p.model)) for p in peers))
        a = peers[0]
        a.record_eval({"test_accuracy": 0.5, "test_loss": 1.25})
        # The figures of every member reach a through the gossip within a few periods.
        for _ in range(100):
            a.telemetry.sample()
            swarm = a.telemetry.swarm()
            steps = {m["name"]: (m["figures"] or {}).get("step") for m in swarm["members"]}
            if steps == {"a": 6, "b": 6, "c": 6}:
                break
            await asyncio.sleep(0.1)
        assert steps == {"a": 6, "b": 6, "c": 6}
        assert {m["state"] for m in swarm["members"]} == {"alive"}
        assert {point[1] for point in swarm["history"]["b"]} <= set(range(7))

        base = f"http://127.0.0.1:{a.transport.port}"
        code, text = await get_text(f"{base}/metrics")
        status = a.status()
        assert code == 200
        found = samples(text)
        assert found[("p2pdl_step", ())] == status["step"] == 6
        assert found[("p2pdl_bytes_sent_total", ())] == status["bytes_sent"] > 0
        assert found[("p2pdl_bytes_received_total", ())] == status["bytes_received"] > 0
        assert found[("p2pdl_frames_received_total", ())] == status["frames_received"]
        rounds = status["rounds"]
        assert found[("p2pdl_rounds_total", (("outcome", "complete"), ("strategy", "gossip")))] == rounds["complete"]
        assert found[("p2pdl_rounds_total", (("outcome", "partial"), ("strategy", "gossip")))] == rounds["partial"]
        assert found[("p2pdl_round_seconds_count", (("strategy", "gossip"),))] == rounds["complete"] + rounds["partial"]
        assert found[("p2pdl_eval", (("metric", "test_accuracy"),))] == 0.5
        assert found[("p2pdl_members", (("state", "alive"),))] == 3
        assert found[("p2pdl_links", (("state", "connected"),))] == 2
        # Per-neighbour bytes: each of a's two links carried its six rounds of parameters both
        # ways, and the links together never exceed the transport's totals (handshakes are extra).
        for direction in ("sent", "received"):
            per_link = {
                link["name"]: found[(f"p2pdl_neighbor_bytes_{direction}_total", (("neighbor", link["name"]),))]
                for link in status["neighbors"]
            }
            assert per_link == {link["name"]: link[f"bytes_{direction}"] for link in status["neighbors"]}
            assert set(per_link) == {"b", "c"} and min(per_link.values()) > 0
            assert sum(per_link.values()) <= status[f"bytes_{direction}"]
        phases = [found[("p2pdl_step_seconds_total", (("phase", p),))] for p in ("compute", "communication", "waiting")]
        assert all(v >= 0 for v in phases) and phases[0] > 0
        assert sum(phases) == pytest.approx(sum(status["telemetry"]["seconds"].values()), abs=1e-5)

        code, page = await get_text(f"{base}/")
        assert code == 200 and "dashboard.js" in page and "http" not in page.split("<body>")[1]
        code, script = await get_text(f"{base}/dashboard.js")
        assert code == 200 and "api/swarm" in script
        code, body = await get_text(f"{base}/api/swarm")
        assert code == 200 and {m["name"] for m in json.loads(body)["members"]} == {"a", "b", "c"}


async def test_a_killed_peer_is_dead_in_the_swarm_view_and_counted_as_churn() -> None:
    async with three_peers() as peers:
        a, _, c = peers
        await c.gossip.close(1.0)  # c goes silent without a leave, as if killed
        await c.transport.close(announce=False)
        for _ in range(60):
            states = {m["name"]: m["state"] for m in a.telemetry.swarm()["members"]}
            if states.get("c") == "dead":
                break
            await asyncio.sleep(0.1)
        assert states == {"a": "alive", "b": "alive", "c": "dead"}
        assert a.telemetry.status()["events"].get("death") == 1
        code, text = await get_text(f"http://127.0.0.1:{a.transport.port}/metrics")
        assert code == 200
        found = samples(text)
        assert found[("p2pdl_membership_events_total", (("kind", "death"),))] == 1
        assert found[("p2pdl_members", (("state", "dead"),))] == 1


async def test_the_metrics_server_demands_its_token(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_bytes(b"t" * 24)
    async with three_peers({"listen": "127.0.0.1:0", "token_file": str(token_file)}) as peers:
        a = peers[0]
        assert a.telemetry.server is not None
        base = f"http://127.0.0.1:{a.telemetry.server.port}"
        code, _ = await get_text(f"{base}/metrics")
        assert code == 401
        code, _ = await get_text(f"{base}/", {"Authorization": "Bearer wrong-token-wrong-token"})
        assert code == 401
        code, text = await get_text(f"{base}/metrics", {"Authorization": f"Bearer {'t' * 24}"})
        assert code == 200 and samples(text)[("p2pdl_step", ())] == 0
        basic = base64.b64encode(b"me:" + b"t" * 24).decode()
        code, _ = await get_text(f"{base}/api/swarm", {"Authorization": f"Basic {basic}"})
        assert code == 200
        rejected = a.status()["auth_rejected"]["by_reason"]
        assert rejected == {"metrics_token_missing": 1, "metrics_token_bad": 1}


async def test_a_peer_whose_metrics_port_is_taken_fails_to_start_and_leaves_nothing_open() -> None:
    """Peer.start raising after the transport is up (here: the metrics server cannot bind) closes
    what it had started: the peer's own port is free again and its compute thread is gone."""
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    config = config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py")},
            "strategy": {"kind": "gossip", "round_timeout": 1.5},
            "transport": {"startup_timeout": 5.0},
            "observe": {"listen": f"127.0.0.1:{taken}"},
            "peers": [{"name": "a", "address": "127.0.0.1:0"}],
        }
    )
    model = make_model(0)
    peer = Peer(config, "a", model, torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        with pytest.raises(OSError):
            await peer.start()
        assert peer.state == "closed"
        port = peer.transport.port
        with pytest.raises(OSError):  # nothing listens on the peer's own port any more
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
    finally:
        blocker.close()
