"""Hostile clients against a live peer over real sockets: outsiders, a rogue member, floods, slowloris.

The victim is a real :class:`~p2pdl.Peer` ``b`` of a two-peer swarm ``{a, b}`` with a shared secret.
Outsiders (no secret, a wrong secret, a replayed token) try every route and must learn nothing but
a bare 401. The attacker that matters is a *rogue member* ``a``: it holds the secret, dials ``b``
(``a`` sorts first, so ``a`` is the dialer), completes the mutual HELLO handshake and then sends
every hostile payload we could think of down that authenticated WebSocket and as ``POST /frames``
bodies: random bytes, truncations, lz4 bombs, msgpack with wrong types, deep nesting and huge
declared lengths, dtypes off the allow-list, wrong shapes, NaN and Inf, stale and duplicate rounds,
frames in another peer's name, a flood over the rate limit, and slow clients.

``b`` trains throughout with a real loss but a learning rate of 0, and no honest neighbour frame
ever arrives (its rounds are partial), so its parameters are held fixed by construction: any change
at all would have come from a hostile frame. Each attack is checked by the *reason* it is counted
under in ``/status``, so a payload rejected for the wrong reason (e.g. a bomb that reached msgpack)
fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import os
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import lz4.block
import msgpack
import pytest
import torch

from p2pdl import Peer
from p2pdl.config import config_from_mapping
from p2pdl.errors import FrameError, TransportError
from p2pdl.net.auth import (
    HEADER,
    Secret,
    TokenVerifier,
    make_token,
    reply_from_meta,
    token_from_header,
    token_to_header,
)
from p2pdl.net.auth import verify_reply as verify_acceptor_reply
from p2pdl.net.http import SENDER_HEADER, TOKEN_HEADER
from p2pdl.net.links import CLOSE_NOT_A_NEIGHBOR, CLOSE_PROTOCOL_ERROR
from p2pdl.net.stream import RECORD_PREFIX, STREAM_PATH, FrameStream, open_stream
from p2pdl.wire import Frame, Limits, TensorSpec, decode_frame, encode_frame

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
SECRET = "hostile-suite swarm secret, do not log me 7f3a"
SECRET_ENV = "P2PDL_TEST_HOSTILE_SECRET"
SECRET_KEY = Secret(SECRET.encode())
WRONG_SECRET = Secret(b"an entirely different secret of 32+ bytes")
MIB = 1024 * 1024
RATE = 100.0  # transport.max_frames_per_second of the victim; bursts of 2 * RATE pass
_HEADER = struct.Struct("<2sBBI")  # magic, version, flags, declared uncompressed body length


# --------------------------------------------------------------------------- the victim


def victim_config(**transport: Any) -> Any:
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py")},
            # Short rounds: with no honest neighbour frame each round times out as partial.
            "strategy": {"kind": "gossip", "round_timeout": 0.3},
            "topology": {"kind": "ring"},
            "transport": {
                "startup_timeout": 10.0,
                "handshake_timeout": 1.0,
                "send_timeout": 1.5,  # also bounds a slow POST /frames body
                "request_timeout": 0.5,  # a complete request head within this, or the connection is cut
                "max_frame_mib": 1.0,
                "max_decompressed_mib": 8.0,
                "max_frames_per_second": RATE,
                "max_connections_per_address": 24,
                **transport,
            },
            # The rogue is heard only through its own frames: keep it from being declared dead mid-test.
            "membership": {"suspect_after": 60.0, "dead_after": 120.0},
            "security": {"secret_env": SECRET_ENV},
            "peers": [{"name": "a", "address": "127.0.0.1:0"}, {"name": "b", "address": "127.0.0.1:0"}],
        }
    )


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def auth(name: str, target: str, purpose: str, secret: Secret | None = None) -> dict[str, str]:
    token = make_token(secret or SECRET_KEY, name=name, target=target, purpose=purpose)
    return {HEADER: token_to_header(token)}


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return SECRET_ENV


# --------------------------------------------------------------------------- the rogue member


@dataclass
class Rogue:
    """Member ``a`` holding the secret, with a live, authenticated WebSocket link to ``b``."""

    session: aiohttp.ClientSession
    base: str
    ws: aiohttp.ClientWebSocketResponse
    ws_header: dict[str, str]  # the (now spent) credential of the WebSocket upgrade
    frames_token: str
    received: list[Frame] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def read_forever(self) -> None:
        # Draining the socket also answers b's heartbeat pings (aiohttp's autoping).
        limits = Limits(max_frame_bytes=MIB, max_decompressed_bytes=8 * MIB)
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                self.received.append(decode_frame(message.data, limits=limits, known_senders=("b",)))

    async def post(self, data: bytes, *, sender: str = "a", frames_token: str | None = None) -> int:
        headers = {
            SENDER_HEADER: sender,
            TOKEN_HEADER: self.frames_token if frames_token is None else frames_token,
            **auth("a", "b", "POST /frames"),
        }
        # A file-like body over 1 MiB: aiohttp warns (ResourceWarning) about large raw bytes.
        payload = io.BytesIO(data) if len(data) > MIB else data
        async with self.session.post(f"{self.base}/frames", data=payload, headers=headers) as response:
            await response.read()
            return response.status


async def gossip_as_a(session: aiohttp.ClientSession, base: str) -> None:
    """Make b hear of a (as a real member's first push-pull would), so b's start does not wait."""
    member = {"name": "a", "address": "127.0.0.1:0", "incarnation": int(time.time() * 1000), "heartbeat": 1}
    payload = {"sender": "a", "members": [{**member, "left": False}]}
    async with session.post(f"{base}/gossip", json=payload, headers=auth("a", "b", "POST /gossip")) as response:
        assert response.status == 200


async def dial_as_a(session: aiohttp.ClientSession, base: str) -> Rogue:
    """The dialer's side of the handshake, by hand: token, HELLO, b's HELLO reply, b's proof."""
    header = auth("a", "b", "GET /ws")
    ws = await session.ws_connect(f"{base}/ws", headers=header, max_msg_size=MIB)
    await ws.send_bytes(encode_frame(Frame(kind="hello", sender="a", round=0, step=0)))
    reply = await ws.receive(timeout=5)
    assert reply.type == aiohttp.WSMsgType.BINARY
    hello = decode_frame(reply.data, limits=Limits(max_frame_bytes=MIB, max_decompressed_bytes=MIB))
    assert hello.kind == "hello" and hello.sender == "b"
    # b proves it holds the secret too, bound to the nonce of our own token.
    sent = token_from_header(header[HEADER])
    verify_acceptor_reply(
        TokenVerifier(SECRET_KEY, self_name="a"), reply_from_meta(hello.meta, sent=sent, sender="b"), sent
    )
    frames_token = hello.meta["frames_token"]
    assert isinstance(frames_token, str) and frames_token
    rogue = Rogue(session=session, base=base, ws=ws, ws_header=header, frames_token=frames_token)
    rogue.reader = asyncio.ensure_future(rogue.read_forever())
    return rogue


@contextlib.asynccontextmanager
async def victim_and_rogue(**transport: Any) -> AsyncIterator[tuple[Peer, Rogue]]:
    model = make_model()
    b = Peer(victim_config(**transport), "b", model, torch.optim.SGD(model.parameters(), lr=0.0))
    port = await b.transport.start()
    base = f"http://127.0.0.1:{port}"
    rogue: Rogue | None = None
    try:
        async with aiohttp.ClientSession() as session:
            await gossip_as_a(session, base)
            starting = asyncio.ensure_future(b.start())
            try:
                rogue = await dial_as_a(session, base)
            finally:
                await starting
            assert b.transport.connected_neighbors() == ("a",)
            yield b, rogue
            await rogue.ws.close()
            if rogue.reader is not None:
                await asyncio.wait_for(rogue.reader, timeout=5)
    finally:
        await b.close()


# --------------------------------------------------------------------------- hostile payloads


def raw(body: bytes, *, flags: int = 0, declared: int | None = None, magic: bytes = b"P2", version: int = 1) -> bytes:
    """A frame from its parts; the header is not checked against the body."""
    return _HEADER.pack(magic, version, flags, len(body) if declared is None else declared) + body


def packed(obj: Any) -> bytes:
    return raw(msgpack.packb(obj, use_bin_type=True))


def tensor_entries(model: torch.nn.Module, value: float = 1.0) -> list[list[Any]]:
    return [
        [name, "float32", list(p.shape), torch.full_like(p, value).detach().numpy().tobytes()]
        for name, p in model.named_parameters()
    ]


def body(model: torch.nn.Module, **fields: Any) -> dict[str, Any]:
    """A params frame body, as a map, with some fields overridden."""
    return {
        "v": 1,
        "kind": "params",
        "sender": "a",
        "round": 10**6,
        "step": 0,
        "meta": {},
        "tensors": tensor_entries(model),
        **fields,
    }


def params_frame(model: torch.nn.Module, *, round_index: int, sender: str = "a", **tensors: torch.Tensor) -> bytes:
    """A schema-valid params frame; ``tensors`` replace the model-shaped ones of the same name."""
    full = {name: torch.full_like(p.detach(), 1e30) for name, p in model.named_parameters()}
    for name, tensor in tensors.items():
        full[name.replace("__", ".")] = tensor
    return encode_frame(Frame(kind="params", sender=sender, round=round_index, step=0, tensors=full))


def msgpack_map_prefix(model: torch.nn.Module, *, without: str) -> bytes:
    """The packed body map of 7 keys, every key but ``without`` packed; the caller appends that one."""
    fields = body(model)
    del fields[without]
    return b"\x87" + b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in fields.items())


def lz4_block(data: bytes) -> bytes:
    return bytes(lz4.block.compress(data, store_size=False))


def hostile_payloads(model: torch.nn.Module) -> dict[str, list[bytes]]:
    """Every payload of the suite, by the reason the victim must count it under."""
    valid = params_frame(model, round_index=10**6)
    rng = torch.Generator().manual_seed(1234)
    noise = [bytes(torch.randint(0, 256, (n,), generator=rng, dtype=torch.uint8).tolist()) for n in (1, 7, 9, 4096)]
    nan, inf = float("nan"), float("inf")
    weight = model[0].weight
    one_nan = weight.detach().clone()
    one_nan[3, 5] = nan
    return {
        "format": [
            b"",  # an empty message
            *noise,  # random bytes
            valid[:7],  # truncated inside the header
            valid[:8],  # header only
            valid[: len(valid) // 2],  # truncated body
            valid[:-1],
            valid + b"\x00",  # trailing garbage
            raw(b"\x80", magic=b"PK"),  # bad magic
            raw(b"\x80", flags=0x02),  # unknown flag bit
            raw(b"this is not an lz4 block", flags=1, declared=100),  # corrupt lz4
            raw(lz4_block(b"\x00" * 1000), flags=1, declared=999),  # lz4 output longer than declared
            # An lz4 bomb inside the cap: 8 MiB of zeros from ~32 KiB; bounded, then not msgpack.
            raw(lz4_block(b"\x00" * (8 * MIB)), flags=1, declared=8 * MIB),
            raw(b"\x91" * 100_000 + b"\xc0"),  # arrays nested 100 000 deep
            raw(b"\x81\xa1k" * 50_000 + b"\xc0"),  # maps nested 50 000 deep
            raw(b"\xdd\xff\xff\xff\xff"),  # an array declaring 2**32-1 elements
            raw(b"\xdf\xff\xff\xff\xff"),  # a map declaring 2**32-1 pairs
            raw(b"\xc6\xff\xff\xff\xff" + b"x" * 16),  # a bin declaring 4 GiB
            raw(b"\xdb\x7f\xff\xff\xff" + b"x" * 16),  # a str declaring 2 GiB
            raw(b"\xc7\xff\x05" + b"x" * 16),  # an ext declaring 255 bytes, 16 present
            # Inside an otherwise valid body: huge declared lengths where the walker looks first.
            raw(msgpack_map_prefix(model, without="tensors") + b"\xa7tensors" + b"\xdd\xff\xff\xff\xff"),
            raw(
                msgpack_map_prefix(model, without="tensors")
                + b"\xa7tensors\x91\x94"
                + msgpack.packb("0.weight")
                + msgpack.packb("float32")
                + msgpack.packb([16, 8])
                + b"\xc6\x7f\xff\xff\xff"
                + b"\x00" * 64
            ),
            raw(msgpack_map_prefix(model, without="sender") + b"\xa6sender\xdb\xff\xff\xff\xff"),
            raw(b"\x81\x01\x02"),  # an int map key (strict_map_key)
            raw(b"\x81\xa1k\xa2\xff\xfe"),  # a str that is not UTF-8
            raw(b"\xc1"),  # the byte msgpack never uses
        ],
        "too_large": [
            raw(b"\x00" * 16, flags=1, declared=2**32 - 1),  # an lz4 bomb declaring 4 GiB - 1
            raw(lz4_block(b"\x00" * (8 * MIB + 1)), flags=1, declared=8 * MIB + 1),  # one byte over the cap
            raw(b"\x80", declared=2**31),  # uncompressed, declaring 2 GiB
        ],
        "version": [
            raw(b"\x80", version=2),
            packed(body(model, v=2)),
        ],
        "schema": [
            packed([1, 2, 3]),  # not a map
            packed({k: v for k, v in body(model).items() if k != "meta"}),  # a key missing
            packed({**body(model), "extra": 1}),  # a key too many
            packed(body(model, round="7")),
            packed(body(model, round=-1)),
            packed(body(model, round=2**64 - 1)),
            packed(body(model, step=True)),
            packed(body(model, step=1.5)),
            packed(body(model, sender=17)),
            packed(body(model, sender="")),
            packed(body(model, sender="x" * 65)),
            packed(body(model, kind="PARAMS")),
            packed(body(model, kind="grads")),  # well-formed, but not a kind gossip peers exchange
            packed(body(model, meta=[1, 2])),
            packed(body(model, meta={"k": [1]})),
            packed(body(model, meta={str(i): i for i in range(65)})),
            packed(body(model, meta={"k": "x" * 257})),
            packed(body(model, tensors={"0.weight": b""})),
            packed(body(model, tensors=[["0.weight", "float32", [16, 8]]])),
            packed(body(model, tensors=[["0.weight", "float32", "16x8", b"\x00" * 512]])),
            packed(body(model, tensors=[["0.weight", "float32", [-16, -8], b"\x00" * 512]])),
            packed(body(model, tensors=[["0.weight", "float32", [1] * 9, b"\x00" * 4]])),
            packed(body(model, tensors=[["0.weight", "float32", [2**31, 1], b"\x00" * 4]])),
            packed(body(model, tensors=[["0.weight", "float32", [16, 8], "text, not bin"]])),
            packed(body(model, tensors=[["0.weight", "float32", [16, 8], b"\x00" * 511]])),  # a byte short
            packed(body(model, tensors=[["0.weight", "float32", [2**30, 2**30], b"\x00" * 4]])),  # 4 EiB declared
            packed(body(model, tensors=[[7, "float32", [1], b"\x00" * 4]])),
            packed(body(model, tensors=tensor_entries(model)[:1] * 2)),  # a tensor name repeated
            packed(body(model, meta=msgpack.ExtType(5, b"x"))),
            packed(body(model, round=msgpack.Timestamp(0))),
            # A map that repeats a key: packed by hand, msgpack itself would merge them.
            raw(b"\x88\xa5round\x00" + msgpack_map_prefix(model, without="v")[1:] + b"\xa1v\x01"),
            # A HELLO (a control frame) on the live link carrying tensors.
            encode_frame(Frame(kind="hello", sender="a", round=0, step=0, tensors={"x": torch.zeros(2)})),
        ],
        "dtype": [
            packed(body(model, tensors=[["0.weight", dtype, [16, 8], b"\x00" * 512]]))
            for dtype in ("complex64", "object", "bool", "float8_e4m3fn", "torch.float32", "")
        ],
        "shape": [
            params_frame(model, round_index=10**6, **{"0__weight": torch.zeros(8, 16)}),  # transposed
            params_frame(model, round_index=10**6, **{"0__weight": torch.zeros(128)}),  # flattened
            params_frame(model, round_index=10**6, **{"0__weight": weight.detach().double()}),  # an allowed dtype
            params_frame(model, round_index=10**6, **{"0__weight": weight.detach().half()}),
            params_frame(model, round_index=10**6, **{"0__weight": torch.zeros(16, 8, dtype=torch.int32)}),
            params_frame(model, round_index=10**6, extra=torch.zeros(1)),  # a tensor b does not have
            encode_frame(Frame(kind="params", sender="a", round=10**6, step=0, tensors={"0.weight": weight})),
            encode_frame(Frame(kind="params", sender="a", round=10**6, step=0)),  # no tensors at all
        ],
        "non_finite": [
            params_frame(model, round_index=10**6, **{"0__bias": torch.full((16,), nan)}),
            params_frame(model, round_index=10**6, **{"2__weight": torch.full((4, 16), inf)}),
            params_frame(model, round_index=10**6, **{"2__bias": torch.tensor([0.0, 0.0, 0.0, -inf])}),
            params_frame(model, round_index=10**6, **{"0__weight": one_nan}),  # hidden among plausible values
        ],
        "unknown_sender": [
            params_frame(model, round_index=10**6, sender="b"),  # in the victim's own name
            params_frame(model, round_index=10**6, sender="c"),  # in a stranger's name
            params_frame(model, round_index=10**6, sender="A"),
            encode_frame(Frame(kind="hello", sender="c", round=0, step=0)),
        ],
    }


# --------------------------------------------------------------------------- helpers


def rejected(peer: Peer) -> Counter[str]:
    return Counter(peer.status()["frames_rejected"]["by_reason"])


def auth_rejected(peer: Peer) -> Counter[str]:
    return Counter(peer.status()["auth_rejected"]["by_reason"])


async def new_rejections(peer: Peer, before: Counter[str], count: int, timeout: float = 5.0) -> Counter[str]:
    """Wait until ``count`` more frames have been refused than in ``before``; return the difference."""
    deadline = time.monotonic() + timeout
    while True:
        delta = rejected(peer) - before
        if sum(delta.values()) >= count or time.monotonic() > deadline:
            return delta
        await asyncio.sleep(0.01)


async def train_until(peer: Peer, stop: asyncio.Event, results: list[Any], gradient_norms: list[float]) -> None:
    """b's training loop: a real loss and real gradients, applied with a learning rate of 0."""
    generator = torch.Generator().manual_seed(0)

    def closure() -> torch.Tensor:
        inputs = torch.randn(32, 8, generator=generator)
        labels = torch.randint(0, 4, (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(peer.model(inputs), labels)
        loss.backward()
        gradient_norms.append(sum(float(p.grad.norm()) for p in peer.model.parameters() if p.grad is not None))
        return loss

    while not stop.is_set():
        results.append(await peer.step(closure))


async def status_code(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kwargs) as response:
        text = await response.text()
        if response.status == 401:  # a refusal names nothing: no peer, no reason, no reply token
            assert set(response.headers) <= {"Content-Type", "Content-Length", "WWW-Authenticate", "Date", "Server"}
        return response.status, (json.loads(text) if text else None)


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- the suite


async def test_hostile_clients_change_nothing_and_training_goes_on(
    secret_env: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="p2pdl")
    async with victim_and_rogue() as (b, rogue):
        base, session = rogue.base, rogue.session
        stop, results, gradient_norms = asyncio.Event(), [], []
        trainer = asyncio.ensure_future(train_until(b, stop, results, gradient_norms))
        try:
            await wait_for(lambda: b.step_index >= 2)  # rounds 0 and 1 are closed: their frames are stale
            step_before = b.step_index
            before = snapshot(b.model)
            received_before = b.status()["frames_received"]
            assert gradient_norms and all(norm > 0 for norm in gradient_norms)  # only lr = 0 holds b still

            await outsiders_learn_nothing(b, rogue)
            await handshake_attacks(b, session, base)
            payloads = hostile_payloads(b.model)
            await every_payload_over_the_link(b, rogue, payloads)
            await hostile_posts(b, rogue, payloads)
            await stale_and_duplicate_frames(b, rogue)
            await flood(b, rogue)
            await slow_and_greedy_clients(b, rogue)

            # The peer is healthy: /healthz answers, the link is up, training kept stepping.
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
            assert b.transport.is_connected("a")
            steps_during_attacks = b.step_index - step_before
            await wait_for(lambda: b.step_index >= step_before + steps_during_attacks + 2)
        finally:
            stop.set()
            await trainer
        assert steps_during_attacks >= 3, "training stalled under attack"
        assert results and all(r.parameter_round is not None and not r.parameter_round.complete for r in results)

        # Not one bit of one parameter moved (compared as raw int32 bits: -0.0 and NaN payloads count too).
        after = snapshot(b.model)
        for name, value in before.items():
            assert torch.equal(after[name], value), f"{name} changed"
            assert torch.equal(after[name].view(torch.int32), value.view(torch.int32)), f"{name}'s bits changed"
        # The one frame accepted was deliberate: the first copy of the duplicated HELLO.
        assert b.status()["frames_received"] - received_before == 1

        status = b.status()
        by_reason = status["frames_rejected"]["by_reason"]
        for reason in (
            "format",
            "too_large",
            "version",
            "schema",
            "dtype",
            "shape",
            "non_finite",
            "stale",
            "unknown_sender",
            "rate_limited",
        ):
            assert by_reason.get(reason, 0) >= 1, reason
        for reason in ("missing", "bad_mac", "replayed", "malformed", "wrong_target", "wrong_purpose", "expired"):
            assert status["auth_rejected"]["by_reason"].get(reason, 0) >= 1, reason
        assert status["connections_timed_out"] >= 4 and status["connections_refused"] >= 1
        print("\nrejections:", json.dumps({k: status[k] for k in ("frames_rejected", "auth_rejected")}))
        print("connections: timed out", status["connections_timed_out"], "refused", status["connections_refused"])
    # The secret never appears in a log line (nor in anything the peer served, checked above).
    assert SECRET not in caplog.text


async def outsiders_learn_nothing(b: Peer, rogue: Rogue) -> None:
    """No secret, a wrong secret, a replayed token: a bare 401 on every route, and nothing else."""
    base, session = rogue.base, rogue.session
    routes = [("GET", "/ws"), ("GET", "/status"), ("GET", "/members"), ("POST", "/gossip"), ("GET", "/state")]
    routes += [("POST", "/frames"), ("GET", "/nonexistent")]
    auth_before = auth_rejected(b)
    frames_before = rejected(b)
    unauthorized = (401, {"error": "unauthorized"})
    for method, path in routes:
        purpose = f"{method} {path}"
        attempts: list[dict[str, str]] = [
            {},  # no credential at all
            auth("a", "b", purpose, WRONG_SECRET),  # a wrong secret
            {HEADER: "p2pdl-hmac v1 name=a;target=b"},  # malformed
            auth("a", "c", purpose),  # the right secret, minted for another peer
            auth("a", "b", "GET /elsewhere"),  # ... for another request
            {HEADER: token_to_header(make_token(SECRET_KEY, name="a", target="b", purpose=purpose, now=1e9))},
        ]
        for headers in attempts:
            extra = {SENDER_HEADER: "a", TOKEN_HEADER: rogue.frames_token} if path == "/frames" else {}
            kwargs: dict[str, Any] = {"headers": {**headers, **extra}}
            if path == "/frames":
                kwargs["data"] = b"P2\x01\x00\x00\x00\x00\x00"
            elif path == "/gossip":
                kwargs["json"] = {"sender": "mallory", "members": []}
            assert await status_code(session, method, base + path, **kwargs) == unauthorized, (path, headers)
    # Replays: a token b accepted once is refused the second time, on any route.
    for path in ("/status", "/members"):
        header = auth("a", "b", f"GET {path}")
        assert (await status_code(session, "GET", base + path, headers=header))[0] == 200
        assert await status_code(session, "GET", base + path, headers=header) == unauthorized
    # The rogue's own WebSocket upgrade, replayed by someone who recorded it.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(f"{base}/ws", headers=rogue.ws_header)
    assert refused.value.status == 401

    counted = auth_rejected(b) - auth_before
    each = len(routes)
    assert counted == Counter(
        missing=each, bad_mac=each, malformed=each, wrong_target=each, wrong_purpose=each, expired=each, replayed=3
    ), counted
    # Refused at the door: no frame from an outsider ever reached the decoder.
    assert rejected(b) == frames_before
    assert not any(token in json.dumps(b.status()) for token in (SECRET, rogue.frames_token))


async def handshake_attacks(b: Peer, session: aiohttp.ClientSession, base: str) -> None:
    """Members' credentials with a bad HELLO: each refused with a close code, the live link untouched."""
    model = b.model
    cases = [
        (os.urandom(64), CLOSE_PROTOCOL_ERROR, "format"),
        (raw(b"\x00" * 16, flags=1, declared=2**32 - 1), CLOSE_PROTOCOL_ERROR, "too_large"),
        (encode_frame(Frame(kind="hello", sender="c", round=0, step=0)), CLOSE_NOT_A_NEIGHBOR, "unknown_sender"),
        (params_frame(model, round_index=0), CLOSE_PROTOCOL_ERROR, "schema"),  # tensors in a handshake
        (encode_frame(Frame(kind="params", sender="a", round=0, step=0)), CLOSE_NOT_A_NEIGHBOR, "unknown_sender"),
    ]
    for hello, code, reason in cases:
        before = rejected(b)
        ws = await session.ws_connect(f"{base}/ws", headers=auth("a", "b", "GET /ws"))
        await ws.send_bytes(hello)
        message = await ws.receive(timeout=5)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == code, reason
        await ws.close()
        assert rejected(b) - before == Counter({reason: 1})
    # A text message instead of a binary HELLO, and a client that never says HELLO at all.
    async with session.ws_connect(f"{base}/ws", headers=auth("a", "b", "GET /ws")) as ws:
        await ws.send_str("HELLO")
        await ws.receive(timeout=5)
        assert ws.close_code == CLOSE_PROTOCOL_ERROR
    async with session.ws_connect(f"{base}/ws", headers=auth("a", "b", "GET /ws")) as ws:
        message = await ws.receive(timeout=5)  # handshake_timeout is 1 s
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == CLOSE_PROTOCOL_ERROR
    assert b.transport.is_connected("a")


async def every_payload_over_the_link(b: Peer, rogue: Rogue, payloads: dict[str, list[bytes]]) -> None:
    """Each payload down the authenticated WebSocket: refused, for exactly the expected reason."""
    for reason, batch in payloads.items():
        before = rejected(b)
        for data in batch:
            await rogue.ws.send_bytes(data)
        delta = await new_rejections(b, before, len(batch))
        assert delta == Counter({reason: len(batch)}), (reason, delta)
        await asyncio.sleep(len(batch) / RATE)  # let the rate limiter's bucket refill
    before = rejected(b)
    await rogue.ws.send_str("a text frame on a binary protocol")
    assert await new_rejections(b, before, 1) == Counter(format=1)
    assert b.transport.is_connected("a")


async def hostile_posts(b: Peer, rogue: Rogue, payloads: dict[str, list[bytes]]) -> None:
    """The same through POST /frames, the dialer's path for large frames, plus its own gate."""
    for reason in ("format", "too_large", "schema", "dtype", "shape", "non_finite", "unknown_sender"):
        before = rejected(b)
        for data in payloads[reason][:3]:
            assert await rogue.post(data) == 204  # refused frames are counted, not errors to the sender
        assert rejected(b) - before == Counter({reason: len(payloads[reason][:3])})
    # A large hostile body (the size the dialer would POST), decoded in the codec pool.
    before = rejected(b)
    big = params_frame(b.model, round_index=10**6, **{"0__weight": torch.full((16, 8), float("nan"))})
    big += b"\x00" * (300 * 1024)
    assert await rogue.post(big) == 204
    assert rejected(b) - before == Counter(format=1)
    # The gate: a wrong frames token, or a sender header other than the authenticated name.
    before = rejected(b)
    assert await rogue.post(b"P2", frames_token="0" * 32) == 403
    assert await rogue.post(b"P2", frames_token="") == 403
    assert await rogue.post(b"P2", sender="b") == 403
    assert rejected(b) - before == Counter(unknown_sender=3)
    # Over max_frame_bytes (1 MiB): refused from Content-Length, before the body is read.
    before = rejected(b)
    with contextlib.suppress(aiohttp.ClientError):
        assert await rogue.post(b"\x00" * (MIB + 1)) == 413
    assert rejected(b) - before == Counter(too_large=1)
    # No Content-Length (chunked): refused before reading.
    headers = {SENDER_HEADER: "a", TOKEN_HEADER: rogue.frames_token, **auth("a", "b", "POST /frames")}

    async def chunks() -> AsyncIterator[bytes]:
        yield b"P2"

    async with rogue.session.post(f"{rogue.base}/frames", data=chunks(), headers=headers) as response:
        assert response.status == 411
    await asyncio.sleep(30 / RATE)


async def rogue_stream(b: Peer, rogue: Rogue) -> FrameStream:
    """The rogue's frame stream to b (GET /stream with its frames token), once b has taken it as the link's."""
    headers = {SENDER_HEADER: "a", TOKEN_HEADER: rogue.frames_token, **auth("a", "b", f"GET {STREAM_PATH}")}
    stream = await open_stream(
        rogue.base.removeprefix("http://"),
        headers,
        ssl=None,
        max_record=MIB,
        on_refused=lambda exc: None,
        timeout=5.0,
    )
    await wait_for(lambda: b.transport._links["a"].stream is not None)
    return stream


async def test_every_hostile_payload_over_a_frame_stream_is_refused_for_the_same_reason(secret_env: str) -> None:
    """The zero-copy receive path refuses every frame the WebSocket and POST paths refuse, counted alike."""
    async with victim_and_rogue() as (b, rogue):
        received_before = b.status()["frames_received"]
        stream = await rogue_stream(b, rogue)
        payloads = hostile_payloads(b.model)
        for reason, batch in payloads.items():
            records = [data for data in batch if data]  # a 0-byte record is the stream's own refusal, below
            before = rejected(b)
            for data in records:
                await stream.send(data)
            delta = await new_rejections(b, before, len(records))
            assert delta == Counter({reason: len(records)}), (reason, delta)
            await asyncio.sleep(len(records) / RATE)  # let the rate limiter's bucket refill
        assert not stream.closed.is_set() and b.transport._links["a"].stream is not None
        assert b.status()["frames_received"] == received_before
        assert b.status()["stream_frames_received"] == 0

        # Records the stream cannot read: counted, the stream closed, the link kept.
        for declared, reason in ((0, "format"), (MIB + 1, "too_large"), (2**32 - 1, "too_large")):
            stream = await rogue_stream(b, rogue)
            before = rejected(b)
            assert stream._transport is not None
            stream._transport.write(RECORD_PREFIX.pack(declared) + b"\x00" * 64)
            assert await new_rejections(b, before, 1) == Counter({reason: 1})
            await asyncio.wait_for(stream.closed.wait(), timeout=5.0)
            assert b.transport.is_connected("a")

        # Without the link's token: 403, counted, no stream.
        before = rejected(b)
        with pytest.raises(TransportError, match="refused GET /stream"):
            await open_stream(
                rogue.base.removeprefix("http://"),
                {SENDER_HEADER: "a", TOKEN_HEADER: "0" * 32, **auth("a", "b", f"GET {STREAM_PATH}")},
                ssl=None,
                max_record=MIB,
                on_refused=lambda exc: None,
                timeout=5.0,
            )
        assert rejected(b) - before == Counter(unknown_sender=1)


async def stale_and_duplicate_frames(b: Peer, rogue: Rogue) -> None:
    """Valid frames at the wrong time: for rounds b has closed, and the same frame twice."""
    floor = b.step_index  # local_steps = 1: every round below the current step is closed
    assert floor >= 2
    before = rejected(b)
    for round_index in (0, 1, floor - 2):
        await rogue.ws.send_bytes(params_frame(b.model, round_index=round_index))
    assert await new_rejections(b, before, 3) == Counter(stale=3)
    # Duplicates. A HELLO on the live link is the one frame b files without ever mixing it, so it
    # can be sent twice without a single honest-looking parameter frame being accepted.
    before = rejected(b)
    hello = encode_frame(Frame(kind="hello", sender="a", round=7, step=0))
    await rogue.ws.send_bytes(hello)
    await rogue.ws.send_bytes(hello)
    assert await new_rejections(b, before, 1) == Counter(stale=1)


async def flood(b: Peer, rogue: Rogue) -> None:
    """Far above max_frames_per_second: the excess is refused before decoding, the link stays up."""
    before = rejected(b)
    count = 1000
    started = time.monotonic()
    frame = raw(b"\x80", version=9)  # cheap to refuse, so what passes the bucket is easy to tell apart
    for _ in range(count):
        await rogue.ws.send_bytes(frame)
    delta = await new_rejections(b, before, count)
    elapsed = time.monotonic() - started
    assert sum(delta.values()) == count and set(delta) == {"version", "rate_limited"}, delta
    assert delta["version"] <= 2 * RATE + RATE * elapsed + 1
    assert delta["rate_limited"] >= count - 2 * RATE - RATE * elapsed - 1
    # The link is still up and, once the bucket refills, frames are judged on their merits again.
    await asyncio.sleep(5 / RATE)
    before = rejected(b)
    await rogue.ws.send_bytes(params_frame(b.model, round_index=10**6, **{"0__bias": torch.full((16,), math.nan)}))
    assert await new_rejections(b, before, 1) == Counter(non_finite=1)


async def slow_and_greedy_clients(b: Peer, rogue: Rogue) -> None:
    """Slowloris heads, a stalled POST body, and more connections than one address may hold."""
    port = b.transport.port
    timed_out_before = b.status()["connections_timed_out"]
    slow = []
    for head in (b"", b"G", b"GET /healthz HTTP/1.1\r\n", b"GET /status HTTP/1.1\r\nHost: x\r\nX-A: "):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        slow.append((reader, writer))
    # A complete, authenticated head, then a body that stops after two bytes of the promised 1000.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = {SENDER_HEADER: "a", TOKEN_HEADER: rogue.frames_token, **auth("a", "b", "POST /frames")}
    head = "POST /frames HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(head.encode() + b"P2")
    answer = await asyncio.wait_for(reader.readline(), timeout=5)  # send_timeout is 1.5 s
    assert answer.startswith(b"HTTP/1.1 408"), answer
    writer.close()
    for reader, writer in slow:
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # the server hung up on it
        writer.close()
    assert b.status()["connections_timed_out"] - timed_out_before >= len(slow)
    # More connections from one address than max_connections_per_address (24): the rest are cut.
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
    await wait_for(lambda: b.status()["connections_refused"] >= 1)
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- what validation cannot stop


async def test_a_rogue_members_well_formed_poison_is_accepted(secret_env: str) -> None:
    """Well-formed, finite, right-shaped values are *valid* frames, however absurd.

    The decoder checks form (size, schema, dtype, shape, finiteness, sender), not plausibility: a
    member holding the secret can send parameters of 1e30 and they pass. What bounds their effect is
    robust mixing (``strategy.robust = "clip"`` or ``"trimmed-mean"``, see p2pdl/core/robust.py), a
    separate option, not validation; with plain gossip (the default) one round drags b all the way.
    """
    async with victim_and_rogue() as (b, rogue):
        poison = params_frame(b.model, round_index=b.step_index + 1)  # every value 1e30, a future round
        expected = {name: TensorSpec.of_tensor(p) for name, p in b.model.named_parameters()}
        frame = decode_frame(poison, limits=b.transport.limits, known_senders=("a",), expected=expected)
        assert all(torch.isfinite(t).all() and t.abs().min() == 1e30 for t in frame.tensors.values())

        before = b.status()
        await rogue.ws.send_bytes(poison)
        await rogue.ws.send_bytes(poison)  # the same frame again is a duplicate
        await wait_for(lambda: b.status()["frames_received"] > before["frames_received"])
        assert await new_rejections(b, Counter(before["frames_rejected"]["by_reason"]), 1) == Counter(stale=1)

        await b.step(lambda: torch.zeros(()))
        # Plain gossip mixed it in with weight 1/2: the limit is robust mixing's job, not the decoder's.
        assert all(p.abs().min() > 1e29 for p in b.model.parameters())


async def test_a_members_frame_for_an_absurd_round_does_not_derail_the_step_counter(secret_env: str) -> None:
    async with victim_and_rogue() as (b, rogue):
        await rogue.ws.send_bytes(params_frame(b.model, round_index=2**63 - 1))
        await wait_for(lambda: b.status()["frames_received"] >= 1)
        for _ in range(2):
            await b.step(lambda: torch.zeros(()))
        assert b.step_index < 10**6


async def test_deeply_nested_gossip_json_is_a_counted_400(secret_env: str) -> None:
    async with victim_and_rogue() as (b, rogue):
        nested = '{"sender": "a", "members": ' + "[" * 100_000 + "]" * 100_000 + "}"
        headers = {**auth("a", "b", "POST /gossip"), "Content-Type": "application/json"}
        async with rogue.session.post(f"{rogue.base}/gossip", data=nested, headers=headers) as response:
            status = response.status
        assert b.status()["frames_rejected"]["by_reason"].get("membership") == 1
        assert status == 400


async def test_a_gossip_body_cut_short_is_a_counted_refusal_without_a_traceback(
    secret_env: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with victim_and_rogue() as (b, rogue):
        port = int(rogue.base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        credential = auth("a", "b", "POST /gossip")[HEADER]
        head = f"POST /gossip HTTP/1.1\r\nHost: b\r\n{HEADER}: {credential}\r\nContent-Length: 500\r\n\r\n"
        writer.write(head.encode() + b'{"sender": "a", "members": [')
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write_eof()  # the body ends 472 bytes early
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        await wait_for(lambda: b.status()["frames_rejected"]["by_reason"].get("membership") == 1)
    assert not [r for r in caplog.records if r.exc_info is not None]


async def test_a_zero_element_tensor_whose_strides_overflow_is_a_frame_error(secret_env: str) -> None:
    async with victim_and_rogue() as (b, rogue):
        huge_empty = [["0.weight", "float32", [0, 2**31 - 1, 2**31 - 1, 2**31 - 1], b""]]
        data = packed(body(b.model, tensors=huge_empty))  # 91 bytes
        before = rejected(b)
        await rogue.ws.send_bytes(data)
        assert await new_rejections(b, before, 1, timeout=2.0) == Counter(schema=1)
        assert b.transport.is_connected("a")
        with pytest.raises(FrameError):
            decode_frame(data, limits=b.transport.limits)
