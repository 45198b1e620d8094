"""The fault schedule of ``scripts/local_cluster.py``: kill, freeze, restart and join peers at swarm steps.

Each event names a peer and the swarm step at which it fires (``NAME@STEP``; a freeze adds
``:SECONDS``). The swarm step is the largest step any peer has reported on ``/status`` so far,
so an event fires at its planned step or, because the launcher polls, a few steps after it;
never before. Events due together fire in the order they were given on the command line.

The whole schedule is checked before any peer starts, against the config and by playing each
peer's life through it (configured, joined, killed), so that a run never reaches step 400 only
to find that its last event names a peer that was never there. The trade-off is that the check
only sees the plan: a peer that exits on its own before its event is found out when the event
fires, and recorded as skipped.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["kill", "freeze", "restart", "join"]
KINDS: tuple[Kind, ...] = ("kill", "freeze", "restart", "join")
SYNTAX = {
    "kill": "NAME@STEP",
    "freeze": "NAME@STEP:SECONDS",
    "restart": "NAME@STEP",
    "join": "NAME@STEP",
}


def valid_name(name: str) -> bool:
    """The rule of ``[[peers]] name`` in p2pdl's config."""
    return 1 <= len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)


@dataclass(kw_only=True)
class Event:
    """One scheduled fault, and what happened when it fired."""

    kind: Kind
    name: str
    step: int  # planned swarm step
    seconds: float | None = None  # freeze: how long the peer stays stopped
    fired_step: int | None = None  # the swarm step when it fired
    fired_at: float | None = None  # seconds since launch
    resumed_at: float | None = None  # freeze: seconds since launch of the SIGCONT
    exit_code: int | None = None  # kill: the killed process's; restart: the one it killed (None if dead)
    pid: int | None = None  # restart, join: the process it started
    address: str | None = None  # join: where the new peer listens
    skipped: str | None = None  # why it could not fire
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)  # restart, join

    @property
    def label(self) -> str:
        suffix = f":{self.seconds:g}" if self.seconds is not None else ""
        return f"--{self.kind} {self.name}@{self.step}{suffix}"

    @property
    def done(self) -> bool:
        return self.fired_step is not None or self.skipped is not None

    @property
    def missed(self) -> str | None:
        """Why the event did not happen, or None when it fired."""
        if self.fired_step is not None:
            return None
        return self.skipped or "the swarm ended before this step"

    def record(self) -> dict[str, Any]:
        """The event as listed in summary.json."""
        row: dict[str, Any] = {"name": self.name, "kind": self.kind, "step": self.step}
        if self.seconds is not None:
            row["seconds"] = self.seconds
        row["fired_step"] = self.fired_step
        row["fired_seconds"] = round(self.fired_at, 3) if self.fired_at is not None else None
        if self.kind == "freeze":
            row["resumed_seconds"] = round(self.resumed_at, 3) if self.resumed_at is not None else None
        if self.kind in ("kill", "restart"):
            row["killed_exit_code"] = self.exit_code
        if self.kind in ("restart", "join"):
            row["pid"] = self.pid
            row["exit_code"] = self.process.returncode if self.process is not None else None
        if self.address is not None:
            row["address"] = self.address
        if self.missed is not None:
            row["skipped"] = self.missed
        return row


def parse_event(kind: Kind, text: str) -> Event | str:
    """``NAME@STEP`` (``NAME@STEP:SECONDS`` for a freeze) as an Event, or the problem with it."""
    bad = f"--{kind} {text!r}: expected {SYNTAX[kind]}"
    name, at, rest = text.partition("@")
    if not at or not name:
        return bad
    seconds: float | None = None
    if kind == "freeze":
        step_text, colon, seconds_text = rest.partition(":")
        if not colon:
            return bad
        try:
            seconds = float(seconds_text)
        except ValueError:
            return f"{bad}; SECONDS {seconds_text!r} is not a number"
        if not math.isfinite(seconds) or seconds <= 0:
            return f"--{kind} {text!r}: SECONDS must be a finite number > 0, got {seconds_text}"
    else:
        step_text = rest
    try:
        step = int(step_text)
    except ValueError:
        return f"{bad}; STEP {step_text!r} is not a whole number"
    return Event(kind=kind, name=name, step=step, seconds=seconds)


def build_schedule(
    given: list[tuple[Kind, str]], *, configured: list[str], steps: int, checkpoint_every: int
) -> tuple[list[Event], list[str]]:
    """The events in firing order, and every problem of the schedule (empty when it is sound).

    ``configured`` are the ``[[peers]]`` names (all started at launch), ``steps`` is run.steps,
    ``checkpoint_every`` is checkpoint.every (a restart resumes from the last checkpoint).
    """
    problems: list[str] = []
    events: list[Event] = []
    for kind, text in given:
        parsed = parse_event(kind, text)
        if isinstance(parsed, str):
            problems.append(parsed)
        else:
            events.append(parsed)
    for event in events:
        if not 0 <= event.step < steps:
            problems.append(f"{event.label}: STEP must be from 0 to {steps - 1}: the peers stop at run.steps = {steps}")
    joiners = {e.name for e in events if e.kind == "join"}
    known = ", ".join(configured)
    for event in events:
        if event.kind == "join" and not valid_name(event.name):
            problems.append(f"{event.label}: a peer name is 1-64 characters of letters, digits, '-', '_', '.'")
        elif event.name not in configured and event.name not in joiners:
            problems.append(f"{event.label}: no peer {event.name!r} (configured: {known}; --join adds a new name)")
    events.sort(key=lambda e: e.step)  # stable: events due together keep their command-line order
    problems += _play_lives(events, configured, checkpoint_every)
    return events, problems


def _play_lives(events: list[Event], configured: list[str], checkpoint_every: int) -> list[str]:
    """Walk every peer through the events in order; each event must find its peer able to take it."""
    problems: list[str] = []
    alive = dict.fromkeys(configured, True)  # name -> running (False: killed by the schedule)
    started_at = dict.fromkeys(configured, 0)  # the step its current checkpoints count from
    history: dict[str, str] = {}  # name -> the event that put it in its current state
    for event in events:
        name = event.name
        if name not in alive and event.kind != "join":
            if event.name in {e.name for e in events if e.kind == "join"}:
                problems.append(f"{event.label}: {name} has not joined yet at step {event.step}")
            continue
        if event.kind == "join":
            if name in configured:
                problems.append(
                    f"{event.label}: {name} is in [[peers]], so it runs from the start; "
                    "--join starts a peer under a new name"
                )
            elif name in alive:
                problems.append(f"{event.label}: {name} is already running ({history[name]})")
            else:
                alive[name], started_at[name], history[name] = True, event.step, f"joined by {event.label}"
            continue
        if not alive[name] and event.kind != "restart":
            problems.append(f"{event.label}: {name} is dead by then ({history[name]}); only --restart revives it")
            continue
        if event.kind == "kill":
            alive[name], history[name] = False, f"killed by {event.label}"
        elif event.kind == "restart":
            first = started_at[name] + checkpoint_every
            if checkpoint_every <= 0:
                problems.append(
                    f"{event.label}: checkpoint.every is 0, so {name} has no checkpoint to resume from; "
                    "set checkpoint.every (steps) below STEP"
                )
            elif event.step < first:
                problems.append(
                    f"{event.label}: {name} writes its first checkpoint at step {first} "
                    f"(checkpoint.every = {checkpoint_every}), after STEP; restart later or checkpoint more often"
                )
            alive[name], history[name] = True, f"restarted by {event.label}"
    return problems
