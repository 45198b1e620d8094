"""The membership protocol on the wire: push-pull digest exchange, ``POST /gossip`` and ``GET /members``.

:class:`MembershipGossip` drives a :class:`~p2pdl.membership.view.MembershipView` over a
:class:`~p2pdl.net.transport.Transport`. Every ``gossip_interval`` it bumps its own heartbeat,
starts one push-pull exchange with up to ``fanout`` live members (plus bootstrap seeds and members
believed dead); it re-runs the failure detector four times a period. Whenever the live set changes it calls
``on_change``; what a change means (a rewire) is the node's business.

Trade-off: each exchange runs in its own task, at most one in flight per address, bounded by
``gossip_timeout``. The beat and the detector therefore never wait on an address that silently
drops packets (a partition, a dead seed), at the cost of one pending task per such address.
Every reply and request body is hostile input: capped at :data:`MAX_GOSSIP_BYTES`, parsed by
:func:`~p2pdl.membership.view.parse_members` (and its ``figures`` by
:func:`~p2pdl.obs.digest.parse_figures`), and a refusal is counted, never fatal.

Each body may also carry ``figures``, every member's headline training figures
(:mod:`p2pdl.obs.digest`); the node writes its own into the :class:`~p2pdl.obs.digest.FigureBook`
as plain data and this component only relays and keeps the newest.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
from collections.abc import Callable
from typing import Any

from aiohttp import web

from p2pdl.config import MembershipConfig
from p2pdl.errors import MembershipError, TransportError
from p2pdl.membership.view import MembershipView, parse_members
from p2pdl.net.http import read_bounded
from p2pdl.net.transport import Transport
from p2pdl.obs.digest import FigureBook, parse_figures
from p2pdl.tasks import TaskOwner

log = logging.getLogger(__name__)

MAX_GOSSIP_BYTES = 1024 * 1024  # one digest, either direction: 4096 members fit with room to spare
# Logged for each death this peer declares; benchmarks/chaos.py reads the detection latency from it
# (the silence crossed the limit (silent - limit) seconds before the line's time).
DECLARED_DEAD_LOG = "member %s declared dead: silent %.3f s, limit %.3f s"
# The detector runs this many times per gossip period, so a death takes effect within a quarter
# period of the silence crossing its limit instead of up to a whole one (the rounds and the graph
# see members only through the graph this rebuilds).
DETECTOR_LOOKS = 4


def merge_digest(view: MembershipView, body: Any, figures: FigureBook | None = None) -> bool:
    """Fold a gossip body (``{"members": [...], "figures": {...}}``) into ``view`` and ``figures``.

    Returns True when the live set changed. Raises :class:`MembershipError` for anything that is
    not a valid digest, before touching the view or the figures. ``figures`` is optional on the wire.
    """
    if not isinstance(body, dict) or "members" not in body:
        raise MembershipError("gossip body must be an object with 'members'")
    members = parse_members(body["members"])
    incoming = parse_figures(body["figures"]) if "figures" in body else {}
    changed = view.merge(members)
    if figures is not None:
        known = view.addresses()
        figures.merge(incoming, known)
        figures.retain(known)
    return changed


class MembershipGossip:
    """One peer's side of the membership protocol. Start with :meth:`start`, end with :meth:`close`.

    Args:
        view: the membership view it keeps current (the node reads it).
        transport: serves the two routes and carries the exchanges.
        config: gossip period, timeout, fanout and failure-detector timing.
        seeds: ``HOST:PORT`` addresses tried every period until they answer (bootstrap).
        request_timeout: seconds to receive one whole ``POST /gossip`` body.
        on_change: called when a merge or the detector changed the live set.
        describe: the node's own fields for ``GET /members`` (live set, neighbours, counters).
        figures: every member's headline figures, relayed in each body (None: not carried).
    """

    def __init__(
        self,
        *,
        view: MembershipView,
        transport: Transport,
        config: MembershipConfig,
        seeds: tuple[str, ...],
        request_timeout: float,
        on_change: Callable[[], None],
        describe: Callable[[], dict[str, Any]],
        figures: FigureBook | None = None,
    ) -> None:
        self.view = view
        self._transport = transport
        self._config = config
        self._seeds = seeds
        self._request_timeout = request_timeout
        self._on_change = on_change
        self._describe = describe
        self.figures = figures
        self._tasks = TaskOwner(f"{view.name}:gossip")
        self._inflight: dict[str, asyncio.Task[None]] = {}  # address -> its one running exchange
        transport.add_route("POST", "/gossip", self._gossip_handler)
        transport.add_route("GET", "/members", self._members_handler)

    @property
    def seeds(self) -> tuple[str, ...]:
        return self._seeds

    def start(self) -> None:
        """Start the gossip period (beat, exchanges, failure detector)."""
        self._tasks.spawn(self._loop(), "loop")

    async def leave(self, timeout: float) -> None:
        """Mark this peer left and push that digest once to the live members, within ``timeout`` seconds."""
        self.view.leave()
        for task in list(self._inflight.values()):
            task.cancel()  # an exchange in flight would carry the old view; announce the leave now
        self._inflight.clear()
        leaving = self.gossip_once(include_seeds=False)
        if leaving:
            await asyncio.wait(leaving, timeout=timeout)

    async def close(self, timeout: float) -> None:
        """Stop the period and every exchange, waiting at most ``timeout`` seconds."""
        await self._tasks.cancel_all(timeout)
        self._inflight.clear()

    # ------------------------------------------------------------------ the period

    async def _loop(self) -> None:
        look = self._config.gossip_interval / DETECTOR_LOOKS
        while True:
            self.view.beat()
            self.gossip_once(include_seeds=True)
            for _ in range(DETECTOR_LOOKS):
                self._detect()
                await asyncio.sleep(look)

    def _detect(self) -> None:
        """Re-run the failure detector; a death takes effect (rewire, rounds end) from here."""
        if self.view.tick():
            for name, silent, limit in self.view.declared_dead:
                log.info(DECLARED_DEAD_LOG, name, silent, limit)
            self._on_change()

    def targets(self, *, include_seeds: bool) -> dict[str, str | None]:
        """Up to ``fanout`` live members, plus seeds and members believed dead (address -> name)."""
        fanout = self._config.fanout
        live = [n for n in self.view.live_names() if n != self.view.name]
        addresses = self.view.addresses()
        # address -> the peer's name when known, so its token is valid for that peer only
        chosen: dict[str, str | None] = {addresses[n]: n for n in random.sample(live, min(fanout, len(live)))}
        if include_seeds:
            # Bootstrap addresses and members believed dead are retried every period: this is
            # how a joiner finds the swarm and how two sides of a healed partition merge.
            unreachable = [
                m["address"] for m in self.view.snapshot() if m["state"] == "dead" and m["name"] != self.view.name
            ]
            pool = [a for a in (*self._seeds, *unreachable) if a not in chosen]
            chosen.update(dict.fromkeys(random.sample(pool, min(fanout, len(pool)))))
        return chosen

    def gossip_once(self, *, include_seeds: bool) -> list[asyncio.Task[None]]:
        """Start one push-pull exchange per target that has none in flight; returns the new tasks."""
        started = []
        for address, target in self.targets(include_seeds=include_seeds).items():
            if address in self._inflight:
                continue  # the previous exchange with this address is still waiting: no pile-up
            task = self._tasks.spawn(self._exchange(address, target), f"exchange:{address}")
            self._inflight[address] = task
            task.add_done_callback(functools.partial(self._exchange_done, address))
            started.append(task)
        return started

    def _exchange_done(self, address: str, task: asyncio.Task[None]) -> None:
        if self._inflight.get(address) is task:
            del self._inflight[address]

    async def _exchange(self, address: str, target: str | None) -> None:
        payload = {"sender": self.view.name, **self._body()}
        try:
            reply = await self._transport.request_json(
                address, "POST", "/gossip", payload, self._config.gossip_timeout, MAX_GOSSIP_BYTES, target=target
            )
            self._merge(reply)
        except TransportError:
            return
        except MembershipError as exc:
            self._transport.stats.frames_rejected[exc.reason] += 1
            log.debug("%s: bad membership reply from %s: %s", self.view.name, address, exc)

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"members": self.view.digest()}
        if self.figures is not None:
            body["figures"] = self.figures.outgoing()
        return body

    def _merge(self, body: Any) -> None:
        if merge_digest(self.view, body, self.figures):
            self._on_change()

    # ------------------------------------------------------------------ the routes

    async def _gossip_handler(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_GOSSIP_BYTES:
            return web.json_response({"error": "gossip body too large"}, status=413)
        try:
            async with asyncio.timeout(self._request_timeout):
                raw = await read_bounded(request.content, MAX_GOSSIP_BYTES)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise MembershipError(f"gossip body is not JSON: {exc}") from exc
            self._merge(body)
        except (MembershipError, TimeoutError, TransportError) as exc:
            self._transport.stats.frames_rejected[MembershipError.reason] += 1
            return web.json_response({"error": f"bad gossip: {exc}"[:200]}, status=400)
        return web.json_response(self._body())

    async def _members_handler(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": self.view.name,
                **self._describe(),
                "incarnation": self.view.incarnation,
                "members": self.view.snapshot(),
            }
        )
