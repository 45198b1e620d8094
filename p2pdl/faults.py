"""Fault injection at named protocol points, for fault tests and chaos runs.

A test that kills a peer from outside cannot choose *where* in a round the peer dies: a SIGKILL
sent when the victim passes step 40 lands in whatever it is doing. The exact-averaging protocol
has two failure cases that need different recoveries (PROTOCOL.md §11.4): a member that dies
after sending its reduce-scatter chunks but before its all-gather chunk leaves every survivor
without that chunk (the round is redone), while one that dies after its all-gather chunk went
out may leave survivors that completed the round next to survivors that did not. So the peer
itself dies there, by the same SIGKILL, when the environment asks it to::

    P2PDL_FAULT="kill:rs:40"           # die right after sending the reduce-scatter chunks of
                                       # round 40 (or of the first round after it this peer runs)
    P2PDL_FAULT="kill:ag:80,kill:rs:90"
    P2PDL_FAULT="stop:mean:40"         # SIGSTOP itself once, with every reduce-scatter chunk of
                                       # round 40 in hand and before its all-gather chunk goes out

    P2PDL_FAULT="hang:mean:40:30"      # hold the round for 30 s, once, at that point, while the
                                       # event loop runs on: heartbeats go out, frames do not

``ACTION`` is ``kill`` (SIGKILL: a crash), ``stop`` (SIGSTOP, once: a freeze that the test ends
with SIGCONT) or ``hang`` (``hang:PHASE:ROUND:SECONDS``: the round awaits that long, once: a
member that is alive to the membership but whose frames do not come, as behind a stuck link).
``PHASE`` is ``rs`` (after the reduce-scatter frames were sent), ``mean`` (after
every member's reduce-scatter frame arrived, before the all-gather frames go out) or ``ag``
(after the all-gather frames were sent); ``ROUND`` is the exact round (the step under ``local_steps = 1``, the step
divided by ``local_steps`` otherwise); a peer that skipped that round (it caught up from a
member's state) dies at the first such phase after it. Without the variable every hook is a check of an empty
set. A malformed value is a :class:`~p2pdl.errors.ConfigError` at start-up
(:func:`load`), never a silent no-op.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Mapping
from typing import NamedTuple

from p2pdl.errors import ConfigError

__all__ = ["ENV", "PHASES", "Point", "at", "load", "parse"]

log = logging.getLogger(__name__)

ENV = "P2PDL_FAULT"
PHASES = ("rs", "mean", "ag")
ACTIONS = ("kill", "stop", "hang")


class Point(NamedTuple):
    """One planned fault: ``action`` at ``phase`` of round ``round`` (or the first one after it)."""

    action: str
    phase: str
    round: int
    seconds: float = 0.0  # hang: how long the round is held


_planned: frozenset[Point] | None = None
_done: set[Point] = set()  # stops and hangs that fired (each fires once)


def parse(spec: str) -> frozenset[Point]:
    """The points of ``spec``: ``ACTION:PHASE:ROUND`` (``hang:PHASE:ROUND:SECONDS``), comma separated."""
    points: set[Point] = set()
    problems: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        fields = item.split(":")
        shape = "hang:PHASE:ROUND:SECONDS (e.g. hang:mean:40:30)" if fields[0] == "hang" else None
        if len(fields) != (4 if shape else 3):
            problems.append(f"{ENV}: {item!r} is not {shape or 'ACTION:PHASE:ROUND (e.g. kill:rs:40)'}")
            continue
        action, phase, round_text = fields[:3]
        seconds = 0.0
        if shape:
            try:
                seconds = float(fields[3])
            except ValueError:
                seconds = math.nan
            if not (math.isfinite(seconds) and seconds > 0):
                problems.append(f"{ENV}: seconds {fields[3]!r} in {item!r} is not a positive number")
        if action not in ACTIONS:
            problems.append(f"{ENV}: action {action!r} in {item!r} is not one of {', '.join(ACTIONS)}")
        if phase not in PHASES:
            problems.append(f"{ENV}: phase {phase!r} in {item!r} is not one of {', '.join(PHASES)}")
        if not round_text.isdigit():
            problems.append(f"{ENV}: round {round_text!r} in {item!r} is not a non-negative integer")
        elif action in ACTIONS and phase in PHASES:
            points.add(Point(action, phase, int(round_text), seconds))
    if problems:
        raise ConfigError(problems)
    return frozenset(points)


def load(environ: Mapping[str, str] = os.environ) -> frozenset[Point]:
    """Read and check :data:`ENV` once; the peer calls it at start-up so a typo fails loudly."""
    global _planned
    _planned = parse(environ.get(ENV, ""))
    _done.clear()
    if _planned:
        log.warning("fault injection armed (%s): %s", ENV, sorted(_planned))
    return _planned


def at(phase: str, round_index: int) -> float:
    """Die here (SIGKILL, no cleanup, like a crash) or freeze (SIGSTOP) at a planned ``phase`` of a
    round at or past the plan's; the seconds the caller must hold the round for (a hang), else 0."""
    planned = _planned if _planned is not None else load()
    hold = 0.0
    for point in planned:
        if phase != point.phase or round_index < point.round or point in _done:
            continue
        if point.action == "hang":
            _done.add(point)
            log.warning("fault injection: hang %.1f s at %s of round %d", point.seconds, phase, round_index)
            hold = max(hold, point.seconds)
            continue
        log.warning("fault injection: SIG%s at %s of round %d", point.action.upper(), phase, round_index)
        for handler in logging.getLogger().handlers:
            handler.flush()
        if point.action == "stop":
            _done.add(point)
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return hold
