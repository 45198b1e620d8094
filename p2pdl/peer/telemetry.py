"""A peer's telemetry: its own figures for the gossip, the swarm timeline, metrics and dashboard.

:class:`PeerTelemetry` is the node's one observability component. Once per gossip period it
writes this peer's figures (:mod:`p2pdl.obs.digest`) into the book that the membership gossip
relays, and samples the view and the book into the timeline and curves
(:class:`~p2pdl.obs.swarm.SwarmWatch`). It times each step (compute, communication, waiting),
feeds the round-latency histogram, and serves ``/metrics``, ``/api/swarm`` and the dashboard on
the peer's port and, with ``[observe] listen``, on a second server (:mod:`p2pdl.obs.dashboard`).

The time split of a step: *compute* is time on the peer's compute thread (forward, backward,
optimizer step, and the strategy's mixing), *waiting* is what the strategy reports as held back
on purpose (e.g. an asynchronous peer waiting for laggards within its lead bound), and
*communication* is the rest of the step: encoding, sending, and waiting for neighbours' frames.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from p2pdl.config import ObserveConfig
from p2pdl.membership.view import MembershipView
from p2pdl.net.auth import Secret, load_secret
from p2pdl.obs.dashboard import MetricsServer, Route, routes
from p2pdl.obs.digest import FigureBook, Link, build_entry, encoded_size, link_health
from p2pdl.obs.metrics import PeerMetrics
from p2pdl.obs.swarm import RateMeter, SwarmWatch
from p2pdl.tasks import TaskOwner

log = logging.getLogger(__name__)

HEADLINE_METRICS = ("test_accuracy", "accuracy", "test_loss")


def headline_metric(evaluation: Mapping[str, float], preferred: str | None = None) -> tuple[str, float | None]:
    """The one evaluation figure a swarm view shows: the workload's own (``preferred``) when it
    names one, else accuracy when the workload reports it."""
    if preferred is not None and preferred in evaluation:
        return preferred, evaluation[preferred]
    for name in HEADLINE_METRICS:
        if name in evaluation:
            return name, evaluation[name]
    if evaluation:
        name = sorted(evaluation)[0]
        return name, evaluation[name]
    return "", None


class PeerTelemetry:
    """Owned by the node: call :meth:`start` after the transport, :meth:`close` before it.

    Args:
        name: this peer's name.
        view: the membership view (read only).
        status: the node's ``/status`` dict (the metrics and figures are read from it).
        observe: the ``[observe]`` config.
        interval: seconds between samples (the gossip period).
        on_reject: counts a refused metrics token under a reason.
    """

    def __init__(
        self,
        *,
        name: str,
        view: MembershipView,
        status: Callable[[], dict[str, Any]],
        observe: ObserveConfig,
        interval: float,
        on_reject: Callable[[str], None],
    ) -> None:
        self.name = name
        self._view = view
        self._status = status
        self._interval = interval
        self.figures = FigureBook(name)
        self.watch = SwarmWatch(name, history=observe.history)
        self.metrics = PeerMetrics(status)
        self._rate = RateMeter()
        self.steps_per_second = 0.0
        self.seconds: dict[str, float] = {"compute": 0.0, "communication": 0.0, "waiting": 0.0}
        self._link_bytes: dict[str, tuple[float, float]] = {}  # neighbour -> (time, bytes both ways)
        self._tasks = TaskOwner(f"{name}:telemetry")
        token: Secret | None = None
        if observe.has_token:
            token = load_secret(env=observe.token_env, file=observe.token_file)
        self.server = (
            MetricsServer(observe.listen, self.route_table(), token=token, on_reject=on_reject)
            if observe.listen is not None
            else None
        )

    def route_table(self) -> list[Route]:
        return routes(swarm=self.swarm, metrics=self.metrics.render)

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()
        self.sample()
        self._tasks.spawn(self._loop(), "sample")

    async def close(self, timeout: float) -> None:
        await self._tasks.cancel_all(timeout)
        if self.server is not None:
            await self.server.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.sample()

    # ------------------------------------------------------------------ what the node reports

    def step_done(self, *, wall: float, compute: float, waiting: float) -> None:
        """One step took ``wall`` seconds, of which ``compute`` on the compute thread and ``waiting`` held."""
        waiting = min(max(0.0, waiting), wall)
        compute = min(max(0.0, compute), wall - waiting)
        self.seconds["compute"] += compute
        self.seconds["waiting"] += waiting
        self.seconds["communication"] += wall - compute - waiting

    def round_done(self, strategy: str, seconds: float) -> None:
        self.metrics.observe_round(strategy, seconds)

    def status(self) -> dict[str, Any]:
        """The ``telemetry`` part of ``/status`` (and of ``/metrics``)."""
        states = Counter(self.watch.states().values())
        return {
            "steps_per_second": round(self.steps_per_second, 4),
            "seconds": {phase: round(value, 6) for phase, value in self.seconds.items()},
            "members_by_state": dict(states),
            "events": dict(self.watch.event_counts),
            "digest_bytes": encoded_size(self.figures.outgoing()),
        }

    # ------------------------------------------------------------------ sampling

    def sample(self) -> None:
        """Write this peer's figures and fold the view and the book into the timeline."""
        status = self._status()
        now = time.monotonic()
        self.steps_per_second = self._rate.add(now, int(status["step"]))
        own = self._view.member(self.name)
        assert own is not None
        refused = status["frames_rejected"]["total"] + status["auth_rejected"]["total"]
        self.figures.set_own(
            build_entry(
                version=(own.incarnation, own.heartbeat),
                step=int(status["step"]),
                loss=status["loss"],
                headline=headline_metric(status["eval"], (status.get("headline") or {}).get("metric")),
                steps_per_second=self.steps_per_second,
                complete=int(status["rounds"]["complete"]),
                partial=int(status["rounds"]["partial"]),
                refused=int(refused),
                links=self._links(status["neighbors"], now),
            )
        )
        self.figures.retain(self._view.addresses())
        self.watch.sample(self._view.snapshot(), self.figures.entries(), time.time())

    def _links(self, neighbors: list[dict[str, Any]], now: float) -> list[Link]:
        """Each link's health, and its throughput when the transport counts bytes per link."""
        links = []
        for link in neighbors:
            name = str(link["name"])
            rate = None
            sent, received = link.get("bytes_sent"), link.get("bytes_received")
            if isinstance(sent, int) and isinstance(received, int):
                total = float(sent + received)
                before = self._link_bytes.get(name)
                if before is not None and now > before[0]:
                    rate = max(0.0, (total - before[1]) / (now - before[0]) / 1000.0)
                self._link_bytes[name] = (now, total)
            links.append(Link(name, link_health(str(link["state"])), rate))
        return links

    def swarm(self) -> dict[str, Any]:
        """``GET /api/swarm``: every member as this peer sees it, with figures, curves and events."""
        members = []
        for member in self._view.snapshot():
            entry = self.figures.get(member["name"])
            members.append(
                {
                    "name": member["name"],
                    "address": member["address"],
                    "state": member["state"],
                    "silent_seconds": member["silent_seconds"],
                    "figures": None if entry is None else _readable(entry),
                }
            )
        return {
            "self": self.name,
            "time": round(time.time(), 3),
            "interval": self._interval,
            "members": members,
            "history": self.watch.history(),
            "events": self.watch.events(),
            "digest_bytes": encoded_size(self.figures.outgoing()),
        }


def _readable(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "step": entry["s"],
        "loss": entry["l"],
        "metric": entry["h"],
        "metric_name": entry["hn"],
        "steps_per_second": entry["r"],
        "rounds_complete": entry["c"],
        "rounds_partial": entry["p"],
        "refused": entry["f"],
        "links": [{"neighbor": n, "health": h, "kilobytes_per_second": r} for n, h, r in entry["k"]],
        "version": entry["v"],
    }
