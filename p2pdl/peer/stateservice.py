"""The peer's side of state transfer: it serves ``GET /state`` and downloads a donor's state.

:class:`StateService` serves this peer's state as the stream of :mod:`p2pdl.peer.statesync`
(with ``fresh=1``, the state at the end of its next step, PROTOCOL.md §3.5), and downloads a
donor's state into the peer's model, optimizer, step and strategy: a join, or a resync of a peer
that fell behind its group. The stream format and the joiner's checks stay in
:mod:`~p2pdl.peer.statesync`, which needs no socket; this module holds the HTTP and the timing.

Trade-off: a ``fresh`` download is held for up to three of the donor's median steps (at least
1 s, at most half the state timeout), in exchange for a state taken at a step boundary that the
joiner can load before the round it joins; a donor that ends no step in that time serves its
current state instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import aiohttp
import torch
from aiohttp import web

from p2pdl.config import TransportConfig
from p2pdl.core.topology import Graph
from p2pdl.errors import FrameSchemaError, FrameTooLargeError, P2PDLError, TransportError
from p2pdl.membership.view import MembershipView
from p2pdl.net.transport import Transport
from p2pdl.peer.statesync import LENGTH, StateAssembler, StateSnapshot, snapshot_state, state_frames
from p2pdl.strategies.base import Strategy
from p2pdl.wire import decode_frame

log = logging.getLogger(__name__)

T = TypeVar("T")
_STATE_CHUNK_BYTES = 16 * 1024 * 1024


class StateLoaded(Protocol):
    """The part of the peer's step hooks that a download calls (``StepHooks.state_loaded``)."""

    def state_loaded(self, step: int) -> None: ...


class StateHost(Protocol):
    """What :class:`StateService` reads from and writes to the peer that owns it."""

    step_index: int  # served with the state, and replaced by a downloaded one

    @property
    def state(self) -> str: ...  # the peer's lifecycle state ("training", ...)

    @property
    def strategy(self) -> Strategy: ...

    @property
    def graph(self) -> Graph: ...  # over the live members: the donors to try, neighbours first

    @property
    def hooks(self) -> StateLoaded | None: ...

    async def run_compute(self, fn: Callable[[], T]) -> T: ...


class StateService:
    """Serves this peer's state on ``GET /state`` and downloads another peer's.

    Owned by the node: it registers :meth:`state_handler`, calls :meth:`serve_fresh` and
    :meth:`step_took` at the end of every step and :meth:`release_held` when it closes.
    """

    def __init__(
        self,
        *,
        name: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        transport: Transport,
        membership: MembershipView,
        config: TransportConfig,
        host: StateHost,
    ) -> None:
        self.name = name
        self.model = model
        self.optimizer = optimizer
        self.transport = transport
        self.membership = membership
        self.config = config
        self.host = host
        # GET /state?fresh=1 (PROTOCOL.md §3.5): downloads waiting for the end of the next step,
        # and the last steps' wall times, which bound that wait.
        self._fresh_waiters: list[asyncio.Future[StateSnapshot | None]] = []
        self._step_walls: deque[float] = deque(maxlen=16)

    # ------------------------------------------------------------------ donor

    async def state_handler(self, request: web.Request) -> web.StreamResponse:
        fresh = request.query.get("fresh", "0")
        if fresh not in ("0", "1"):
            raise web.HTTPBadRequest(text=f"GET /state: fresh must be 0 or 1, not {fresh[:20]!r}")
        snapshot = await self._next_step_snapshot() if fresh == "1" else None
        if snapshot is None:
            # The strategy says when the live state is consistent (not between an optimizer step
            # and the step count that goes with it), and what it serves besides (outer state, its
            # group).
            async with asyncio.timeout(self.config.state_timeout):
                await self.host.strategy.state_ready()
            snapshot = await self.host.run_compute(self._snapshot)
        response = web.StreamResponse(headers={"Content-Type": "application/x-p2pdl-state"})
        await response.prepare(request)
        timeout = self.config.send_timeout
        try:
            for frame in state_frames(snapshot, self.name, chunk_bytes=_STATE_CHUNK_BYTES):
                data = await self.transport.encode(frame)
                async with asyncio.timeout(timeout):
                    await response.write(LENGTH.pack(len(data)))
                    await response.write(data)
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientError) as exc:
            # The downloader went away (it gave up, or this peer is closing): its loss, not an error here.
            log.info("%s: state download aborted by the other side: %s", self.name, exc)
        return response

    def _snapshot(self) -> StateSnapshot:
        return snapshot_state(self.model, self.optimizer, self.host.step_index, self.host.strategy.served_state())

    def step_took(self, wall: float) -> None:
        """A step ended after ``wall`` seconds (they bound the hold of a ``fresh`` download)."""
        self._step_walls.append(wall)

    def _fresh_hold(self) -> float:
        """How long a ``fresh`` download waits for the end of this peer's next step: three
        times its median step (a median of 1 s while none is measured), at least 1 s, at most
        half the state timeout (PROTOCOL.md §3.5)."""
        median = statistics.median(self._step_walls) if self._step_walls else 1.0
        return min(self.config.state_timeout / 2, max(1.0, 3 * median))

    async def _next_step_snapshot(self) -> StateSnapshot | None:
        """The state at the end of the step in progress (or of the next one), before this peer
        computes the one after; None when it is not training, closes meanwhile, or no step ends
        within :meth:`_fresh_hold` (below quorum, at the end of its run): the caller then serves
        the current state."""
        if self.host.state != "training":
            return None
        waiter: asyncio.Future[StateSnapshot | None] = asyncio.get_running_loop().create_future()
        self._fresh_waiters.append(waiter)
        try:
            async with asyncio.timeout(self._fresh_hold()):
                return await waiter
        except TimeoutError:
            return None
        finally:
            if waiter in self._fresh_waiters:
                self._fresh_waiters.remove(waiter)

    async def serve_fresh(self) -> None:
        """End of a step: one snapshot for every ``fresh`` download waiting (none: nothing to
        do), taken before the next step's forward pass, so a joiner has the whole of that step
        to load it and announce the round it joins (PROTOCOL.md §3.5, §11.5)."""
        if not self._fresh_waiters:
            return
        waiters, self._fresh_waiters = self._fresh_waiters, []
        try:
            snapshot = await self.host.run_compute(self._snapshot)
        except Exception as exc:  # the downloads fail with it; training goes on
            log.warning("%s: state snapshot failed: %s", self.name, exc)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        log.info("%s: serving the state of step %d fresh to %d download(s)", self.name, snapshot.step, len(waiters))
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(snapshot)

    def release_held(self) -> None:
        """The peer is closing: downloads held for the end of a step that will not come get the
        current state now."""
        waiters, self._fresh_waiters = self._fresh_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ joiner

    async def fetch_state(self, donor: str | None = None, *, at_least: int = 0, fresh: bool = False) -> int:
        """Download parameters, optimizer state and step from a live neighbour; returns the step.

        A donor whose state is before step ``at_least`` is refused as soon as its first frame
        says so, before anything is loaded, and the next candidate is tried. With ``fresh`` the
        donor serves the state at the end of its next step (PROTOCOL.md §3.5).
        """
        candidates = [donor] if donor else [n for n in self.host.graph.neighbors.get(self.name, ())]
        candidates += [n for n in self.host.graph.names if n != self.name and n not in candidates]
        errors = []
        for name in candidates:
            address = self.membership.addresses().get(name)
            if not address:
                continue
            try:
                step = await self._fetch_state_from(name, address, at_least, fresh=fresh)
            except (P2PDLError, OSError) as exc:
                errors.append(f"{name}: {exc}")
                continue
            log.info("%s: loaded state of step %d from %s", self.name, step, name)
            hooks = self.host.hooks
            if hooks is not None:
                await self.host.run_compute(functools.partial(hooks.state_loaded, step))
            return step
        raise TransportError(f"{self.name}: no live peer served its state ({'; '.join(errors) or 'none live'})")

    async def resync(self, donors: Sequence[str], *, at_least: int = 0, fresh: bool = False) -> int:
        """Re-admission: a peer that fell behind its group downloads a member's state (the first of
        ``donors`` that serves one at ``at_least`` or later) and continues from its step."""
        errors = []
        for donor in donors:
            try:
                return await self.fetch_state(donor, at_least=at_least, fresh=fresh)
            except (P2PDLError, OSError) as exc:
                errors.append(str(exc))
        raise TransportError(f"{self.name}: resync failed: {'; '.join(errors) or 'no donor'}")

    async def _fetch_state_from(self, donor: str, address: str, at_least: int = 0, *, fresh: bool = False) -> int:
        limits = self.transport.limits
        assembler = StateAssembler(self.model, self.optimizer, self.host.strategy.state_specs())
        loop = asyncio.get_running_loop()
        timeout = self.config.state_timeout
        async with (
            asyncio.timeout(timeout),
            self.transport.open_stream(
                address, "/state", timeout, target=donor, params={"fresh": "1"} if fresh else None
            ) as response,
        ):
            if response.status != 200:
                raise TransportError(f"GET {address}/state: HTTP {response.status}")
            while not assembler.complete:
                (length,) = LENGTH.unpack(await _read_state(response.content, LENGTH.size))
                if length > limits.max_frame_bytes:
                    raise FrameTooLargeError(f"state frame of {length} bytes is over the cap")
                data = await _read_state(response.content, length)
                frame = await loop.run_in_executor(
                    None, functools.partial(decode_frame, data, limits=limits, known_senders=(donor,))
                )
                assembler.feed(frame)
                if assembler.step is not None and assembler.step < at_least:
                    raise TransportError(f"{donor} serves the state of step {assembler.step}, before step {at_least}")

        def load() -> int:
            # Model, optimizer, step and the strategy's state change together on the compute thread.
            step = assembler.apply()
            self.host.step_index = step
            self.host.strategy.state_replaced(assembler.extra, assembler.meta)
            return step

        return await self.host.run_compute(load)


async def _read_state(content: aiohttp.StreamReader, size: int) -> bytes:
    """The next ``size`` bytes of a state stream; an early end or a broken connection is a typed error."""
    try:
        return await content.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise FrameSchemaError(f"state stream ended early: {len(exc.partial)} of {size} bytes of a record") from exc
    except aiohttp.ClientError as exc:
        raise TransportError(f"state stream broke: {exc}") from exc
