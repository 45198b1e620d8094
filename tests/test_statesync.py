"""State transfer to a joiner: a hostile donor can refuse service but never corrupt the joiner.

Unit tests feed :class:`StateAssembler` hand-made streams (wrong shapes and dtypes, unknown and
missing tensors, NaN, out-of-order and duplicate frames, inconsistent optimizer state) and check
that each is refused with a clear :class:`~p2pdl.errors.FrameError` and that the joiner's
parameters and Adam state are bit-for-bit what they were. The in-process tests download real
state over HTTP: from an honest donor :class:`~p2pdl.Peer`, and from a raw server that sends
oversized lengths, truncated streams and frames a real decoder must refuse.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web

from p2pdl import Peer
from p2pdl.config import config_from_mapping
from p2pdl.errors import FrameError, FrameSchemaError, NonFiniteError, ShapeMismatchError, TransportError
from p2pdl.peer.statesync import (
    LENGTH,
    STATE,
    STATE_META,
    StateAssembler,
    StateSnapshot,
    snapshot_state,
    state_frames,
)
from p2pdl.wire import Frame, encode_frame

PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
DONOR_STEP = 12


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def trained(seed: int, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an Adam that has stepped, so it holds step, exp_avg and exp_avg_sq per parameter."""
    model = make_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4, generator=generator)).pow(2).sum().backward()
        optimizer.step()
    return model, optimizer


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Everything a transfer may write: parameters, then every optimizer state tensor."""
    tensors = [p.detach().clone() for p in model.parameters()]
    for _, entries in sorted(optimizer.state_dict()["state"].items()):
        tensors += [v.detach().clone() for _, v in sorted(entries.items()) if isinstance(v, torch.Tensor)]
    return tensors


def same(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return len(before) == len(after) and all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


def donor_tensors() -> dict[str, torch.Tensor]:
    model, optimizer = trained(seed=7, steps=3)
    return dict(snapshot_state(model, optimizer, DONOR_STEP).tensors)


def stream(
    tensors: dict[str, torch.Tensor], *, count: int | None = None, chunk_bytes: int = 64, step: int = DONOR_STEP
) -> list[Frame]:
    """The frames an honest donor would send for ``tensors`` (small chunks: several frames)."""
    frames = list(state_frames(StateSnapshot(step=step, tensors=tensors), "d", chunk_bytes=chunk_bytes))
    if count is not None:
        frames[0] = Frame(kind=STATE_META, sender="d", round=0, step=step, meta={"tensors": count, "bytes": 0})
    return frames


def feed_all(assembler: StateAssembler, frames: list[Frame]) -> int:
    for frame in frames:
        assembler.feed(frame)
    return assembler.apply()


def test_an_honest_stream_loads_parameters_optimizer_state_and_step() -> None:
    donor_model, donor_optimizer = trained(seed=7, steps=3)
    frames = list(state_frames(snapshot_state(donor_model, donor_optimizer, DONOR_STEP), "d", chunk_bytes=64))
    assert len(frames) > 3  # a meta frame and several chunks
    model, optimizer = trained(seed=1)
    assert feed_all(StateAssembler(model, optimizer), frames) == DONOR_STEP
    assert same(state_of(model, optimizer), state_of(donor_model, donor_optimizer))
    assert optimizer.param_groups[0]["lr"] == 0.01  # the joiner keeps its own hyperparameters


def test_a_fresh_joiner_without_optimizer_state_takes_the_donors() -> None:
    model = make_model(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    donor_model, donor_optimizer = trained(seed=7, steps=3)
    frames = stream(dict(snapshot_state(donor_model, donor_optimizer, DONOR_STEP).tensors))
    feed_all(StateAssembler(model, optimizer), frames)
    assert same(state_of(model, optimizer), state_of(donor_model, donor_optimizer))
    # It trains on from there without error.
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_transfers_its_optimizer_state_in_its_own_dtype(dtype: torch.dtype) -> None:
    """torch keeps Adam's moments in the parameter's dtype; the joiner must accept them as such."""

    def trained_16(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = make_model(seed).to(dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(5, 4).to(dtype)).float().pow(2).sum().backward()
            optimizer.step()
        return model, optimizer

    donor_model, donor_optimizer = trained_16(7)
    assert {v.dtype for s in donor_optimizer.state.values() for k, v in s.items() if k == "exp_avg"} == {dtype}
    frames = list(state_frames(snapshot_state(donor_model, donor_optimizer, DONOR_STEP), "d", chunk_bytes=64))
    model, optimizer = trained_16(1)
    assert feed_all(StateAssembler(model, optimizer), frames) == DONOR_STEP
    assert same(state_of(model, optimizer), state_of(donor_model, donor_optimizer))
    assert all(p.dtype == dtype for p in model.parameters())


def _replace(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], Any]:
    def mutate(tensors: dict[str, torch.Tensor]) -> Any:
        tensors[name] = make(tensors[name])
        return stream(tensors)

    return mutate


def _without(*names: str) -> Callable[[dict[str, torch.Tensor]], Any]:
    def mutate(tensors: dict[str, torch.Tensor]) -> Any:
        for name in names:
            del tensors[name]
        return stream(tensors)

    return mutate


def _with_extra(name: str, tensor: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], Any]:
    def mutate(tensors: dict[str, torch.Tensor]) -> Any:
        tensors[name] = tensor
        return stream(tensors)

    return mutate


def _frames(edit: Callable[[list[Frame]], list[Frame]]) -> Callable[[dict[str, torch.Tensor]], Any]:
    return lambda tensors: edit(stream(tensors))


def _state(tensors: dict[str, torch.Tensor], step: int = DONOR_STEP) -> Frame:
    return Frame(kind=STATE, sender="d", round=0, step=step, tensors=tensors)


def _meta(count: Any) -> Frame:
    return Frame(kind=STATE_META, sender="d", round=0, step=DONOR_STEP, meta={"tensors": count, "bytes": 0})


HOSTILE: dict[str, tuple[Callable[[dict[str, torch.Tensor]], list[Frame]], type[FrameError], str]] = {
    "wrong shape": (_replace("model/0.weight", lambda t: torch.zeros(4, 3)), ShapeMismatchError, "expected"),
    "flattened": (_replace("model/0.weight", lambda t: t.reshape(-1)), ShapeMismatchError, "expected"),
    "wrong dtype": (_replace("model/0.bias", lambda t: t.double()), ShapeMismatchError, "expected"),
    "optimizer dtype": (_replace("opt/0/exp_avg", lambda t: t.half()), ShapeMismatchError, "expected"),
    "step not scalar": (_replace("opt/0/step", lambda t: t.reshape(1)), ShapeMismatchError, "expected"),
    "unknown parameter": (_with_extra("model/evil", torch.zeros(3)), ShapeMismatchError, "unknown tensor"),
    "unknown index": (_with_extra("opt/99/exp_avg", torch.zeros(3)), ShapeMismatchError, "unknown tensor"),
    "unknown key": (_with_extra("opt/0/evil", torch.zeros(3, 4)), ShapeMismatchError, "unknown tensor"),
    "path in name": (_with_extra("opt/0/../1/step", torch.zeros(())), ShapeMismatchError, "unknown tensor"),
    "missing parameter": (_without("model/2.bias"), FrameSchemaError, "lacks parameters"),
    "partial adam state": (_without("opt/1/exp_avg_sq"), FrameSchemaError, "inconsistent optimizer state"),
    "no step anywhere": (
        _without(*(f"opt/{i}/step" for i in range(4))),
        FrameSchemaError,
        "inconsistent optimizer state",
    ),
    "nan parameter": (
        _replace("model/0.weight", lambda t: t.index_fill(0, torch.tensor([1]), float("nan"))),
        NonFiniteError,
        "NaN",
    ),
    "inf momentum": (
        _replace("opt/2/exp_avg", lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))),
        NonFiniteError,
        "NaN",
    ),
    "negative second moment": (_replace("opt/0/exp_avg_sq", lambda t: t - 1.0), FrameSchemaError, "negative"),
    "negative step": (_replace("opt/0/step", lambda t: torch.tensor(-3.0)), FrameSchemaError, "whole number"),
    "fractional step": (_replace("opt/0/step", lambda t: torch.tensor(2.5)), FrameSchemaError, "whole number"),
    "truncated stream": (_frames(lambda f: f[:-1]), FrameSchemaError, "ended early"),
    "meta only": (_frames(lambda f: f[:1]), FrameSchemaError, "ended early"),
    "no meta": (_frames(lambda f: f[1:]), FrameSchemaError, "unexpected 'state'"),
    "meta last": (_frames(lambda f: [*f[1:], f[0]]), FrameSchemaError, "unexpected 'state'"),
    "meta twice": (_frames(lambda f: [f[0], f[0], *f[1:]]), FrameSchemaError, "repeated state_meta"),
    "meta after chunks": (_frames(lambda f: [*f[:2], f[0], *f[2:]]), FrameSchemaError, "repeated state_meta"),
    "zero announced": (_frames(lambda f: [_meta(0), *f[1:]]), FrameSchemaError, "bad or repeated"),
    "huge announced": (_frames(lambda f: [_meta(10**9), *f[1:]]), FrameSchemaError, "bad or repeated"),
    "announced as text": (_frames(lambda f: [_meta("20"), *f[1:]]), FrameSchemaError, "bad or repeated"),
    "fewer announced": (lambda t: stream(t, count=3), FrameSchemaError, "more than the 3 tensors"),
    "other step": (
        _frames(lambda f: [*f[:2], _state(f[2].tensors, DONOR_STEP + 1), *f[3:]]),
        FrameSchemaError,
        "unexpected",
    ),
    "other kind": (
        _frames(
            lambda f: [*f[:2], Frame(kind="params", sender="d", round=0, step=DONOR_STEP, tensors=f[2].tensors), *f[3:]]
        ),
        FrameSchemaError,
        "unexpected 'params'",
    ),
    "duplicate name": (_frames(lambda f: [*f[:2], f[1], *f[2:]]), FrameSchemaError, "sent twice"),
    "duplicate in place of another": (
        _frames(lambda f: [*f[:-1], _state(f[1].tensors)]),
        FrameSchemaError,
        "sent twice",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=[c.replace(" ", "_") for c in HOSTILE])
def test_a_hostile_stream_is_refused_and_the_joiner_is_untouched(case: str) -> None:
    mutate, error, message = HOSTILE[case]
    frames = mutate(donor_tensors())
    model, optimizer = trained(seed=1)
    before = state_of(model, optimizer)
    with pytest.raises(error, match=message):
        feed_all(StateAssembler(model, optimizer), frames)
    assert same(state_of(model, optimizer), before)
    # The joiner still trains from its own state.
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_refused_frame_leaves_nothing_behind() -> None:
    """A chunk with one bad tensor is dropped whole: its good tensors do not count later."""
    tensors = donor_tensors()
    frames = stream(tensors, chunk_bytes=1 << 20)  # meta and one chunk with everything
    assert len(frames) == 2
    assembler = StateAssembler(*trained(seed=1))
    assembler.feed(frames[0])
    bad = dict(frames[1].tensors)
    bad["model/2.bias"] = torch.full((2,), float("nan"))
    with pytest.raises(NonFiniteError):
        assembler.feed(_state(bad))
    assembler.feed(frames[1])  # the honest chunk is then accepted: no "sent twice"
    assert assembler.complete


def test_a_donor_with_a_different_optimizer_is_refused_by_a_joiner_that_has_state() -> None:
    """SGD momentum state offered to an Adam joiner that already holds state: refused, not mixed."""
    donor = make_model(7)
    sgd = torch.optim.SGD(donor.parameters(), lr=0.1, momentum=0.9)
    donor(torch.randn(2, 4)).sum().backward()
    sgd.step()
    frames = stream(dict(snapshot_state(donor, sgd, DONOR_STEP).tensors))
    model, optimizer = trained(seed=1)
    before = state_of(model, optimizer)
    with pytest.raises(FrameSchemaError, match="inconsistent optimizer state"):
        feed_all(StateAssembler(model, optimizer), frames)
    assert same(state_of(model, optimizer), before)


# --------------------------------------------------------------------------- over HTTP


def swarm_config(donor_address: str) -> Any:
    return config_from_mapping(
        {
            "run": {"workload": str(PEERS_DIR / "mnist1d_cnn.py")},
            "strategy": {"kind": "gossip", "round_timeout": 1.0},
            "topology": {"kind": "ring"},
            "transport": {"startup_timeout": 10.0, "state_timeout": 3.0, "max_frame_mib": 1.0},
            "peers": [{"name": "d", "address": donor_address}, {"name": "j", "address": "127.0.0.1:0"}],
        }
    )


@contextlib.asynccontextmanager
async def raw_donor(body: bytes) -> AsyncIterator[str]:
    """An HTTP server that answers ``GET /state`` with exactly ``body``; yields its address."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-p2pdl-state"})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/state", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def records(frames: list[Frame]) -> bytes:
    return b"".join(LENGTH.pack(len(data)) + data for data in (encode_frame(f) for f in frames))


def _hostile_bodies() -> dict[str, tuple[bytes, str]]:
    honest = records(stream(donor_tensors()))
    tensors = donor_tensors()
    tensors["model/0.weight"] = torch.full((3, 4), float("nan"))
    return {
        "oversize length": (LENGTH.pack(2**31) + b"\x00" * 64, "over the cap"),
        "truncated": (honest[: len(honest) - 20], "ended early"),
        "empty": (b"", "ended early"),
        "half a length": (honest[:2], "ended early"),
        "garbage frame": (struct.pack("<I", 16) + b"\xff" * 16, "bad magic"),
        "nan on the wire": (records(stream(tensors)), "contains NaN"),
        "wrong sender": (
            records([Frame(kind=STATE_META, sender="mallory", round=0, step=1, meta={"tensors": 1, "bytes": 0})]),
            "not a known peer",
        ),
    }


HOSTILE_BODIES = _hostile_bodies()


@pytest.mark.parametrize("case", list(HOSTILE_BODIES), ids=[c.replace(" ", "_") for c in HOSTILE_BODIES])
async def test_a_hostile_donor_over_http_is_refused_and_the_joiner_is_untouched(case: str) -> None:
    body, message = HOSTILE_BODIES[case]
    async with raw_donor(body) as address:
        model, optimizer = trained(seed=1)
        joiner = Peer(swarm_config(address), "j", model, optimizer)
        await joiner.transport.start()
        try:
            before = state_of(model, optimizer)
            with pytest.raises(TransportError, match=message):
                await joiner.fetch_state("d")
            assert same(state_of(model, optimizer), before)
            assert joiner.step_index == 0
        finally:
            await joiner.close()


async def test_an_honest_donor_peer_serves_parameters_optimizer_state_and_step() -> None:
    donor_model, donor_optimizer = trained(seed=7, steps=3)
    donor = Peer(swarm_config("127.0.0.1:0"), "d", donor_model, donor_optimizer)
    port = await donor.transport.start()
    donor.step_index = DONOR_STEP
    model, optimizer = trained(seed=1)
    joiner = Peer(swarm_config(f"127.0.0.1:{port}"), "j", model, optimizer)
    await joiner.transport.start()
    try:
        assert await joiner.fetch_state("d") == DONOR_STEP
        assert joiner.step_index == DONOR_STEP
        assert same(state_of(model, optimizer), state_of(donor_model, donor_optimizer))
    finally:
        await joiner.close()
        await donor.close()
