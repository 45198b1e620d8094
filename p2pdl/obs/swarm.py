"""What one peer has seen of the swarm over time: membership events and every member's curves.

:class:`SwarmWatch` is sampled once per gossip period with the membership view and the figures
book. It turns state changes into a timeline of events and appends each member's new figures
to a short history, which the dashboard draws as curves and the Prometheus churn counter counts.

Events are this peer's *local* verdicts, like the failure detector they come from: a ``join``
is a member seen for the first time, ``leave`` an announced leave, ``death`` one member declared
dead in a period, ``partition`` two or more declared dead in the same period (this peer lost a
whole group at once), ``rejoin`` a dead or left member alive again (``heal`` when two or more
come back together), and ``suspect`` a member whose heartbeat stalled. Trade-off: a partition
is told from a burst of deaths by timing alone; the timeline cannot tell a real network split
from several crashes within one period.

Everything is bounded: :data:`MAX_EVENTS` events, ``history`` points per member, and members
only as many as the view holds (history of a forgotten member is dropped with it).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_EVENTS = 200
EVENT_KINDS = ("join", "leave", "death", "partition", "rejoin", "heal", "suspect")
_GONE = frozenset({"dead", "left"})


@dataclass(frozen=True, slots=True)
class Event:
    time: float  # wall-clock seconds
    kind: str  # one of EVENT_KINDS
    members: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"time": round(self.time, 3), "kind": self.kind, "members": list(self.members)}


class SwarmWatch:
    """Timeline and per-member history, fed by :meth:`sample` once per gossip period."""

    def __init__(self, own_name: str, *, history: int) -> None:
        self.own_name = own_name
        self._states: dict[str, str] = {}
        self._events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self.event_counts: Counter[str] = Counter()
        self._history: dict[str, deque[list[Any]]] = {}
        self._history_length = history
        self._versions: dict[str, tuple[int, ...]] = {}

    def sample(
        self, members: Iterable[Mapping[str, Any]], figures: Mapping[str, Mapping[str, Any]], now: float
    ) -> list[Event]:
        """Record the view's states and the figures' new points; returns the events found now."""
        states = {str(m["name"]): str(m["state"]) for m in members}
        found: list[Event] = []
        joined = [n for n in states if n not in self._states and n != self.own_name]
        if joined and self._states:  # the first sample is the starting point, not a burst of joins
            found.append(Event(now, "join", tuple(joined)))
        died, back, left, suspect = [], [], [], []
        for name, state in states.items():
            before = self._states.get(name)
            if before is None or before == state:
                continue
            if state == "dead":
                died.append(name)
            elif state == "left":
                left.append(name)
            elif state == "suspect":
                suspect.append(name)
            elif state == "alive" and before in _GONE:
                back.append(name)
        if died:
            found.append(Event(now, "partition" if len(died) > 1 else "death", tuple(died)))
        if back:
            found.append(Event(now, "heal" if len(back) > 1 else "rejoin", tuple(back)))
        if left:
            found.append(Event(now, "leave", tuple(left)))
        if suspect:
            found.append(Event(now, "suspect", tuple(suspect)))
        for event in found:
            self._events.append(event)
            self.event_counts[event.kind] += 1
        self._states = states
        self._record(figures, now, keep=states.keys())
        return found

    def _record(self, figures: Mapping[str, Mapping[str, Any]], now: float, keep: Iterable[str]) -> None:
        for name, entry in figures.items():
            version = tuple(entry["v"])
            if self._versions.get(name) == version:
                continue
            self._versions[name] = version
            points = self._history.setdefault(name, deque(maxlen=self._history_length))
            points.append([round(now, 3), entry["s"], entry["l"], entry["h"], entry["r"]])
        kept = set(keep) | {self.own_name}
        for name in [n for n in self._history if n not in kept]:
            del self._history[name]
            self._versions.pop(name, None)

    def states(self) -> dict[str, str]:
        return dict(self._states)

    def events(self) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self._events]

    def history(self) -> dict[str, list[list[Any]]]:
        """Per member: ``[wall time, step, loss, headline metric, steps per second]`` points."""
        return {name: list(points) for name, points in self._history.items()}


class RateMeter:
    """Steps per second over a sliding window of (time, step) samples."""

    def __init__(self, window: float = 10.0) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque(maxlen=256)

    def add(self, now: float, step: int) -> float:
        """Record ``step`` at monotonic ``now``; returns the rate over the window."""
        self._samples.append((now, step))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        first_time, first_step = self._samples[0]
        elapsed = now - first_time
        return max(0.0, (step - first_step) / elapsed) if elapsed > 0 else 0.0
