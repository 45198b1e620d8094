"""``p2pdl status --watch``: a live terminal table of every member, from one peer's view.

It polls that peer's ``GET /api/swarm`` (the dashboard's data, which already holds every
member's figures from the gossip) and redraws a :mod:`rich` table in place. One address is
enough to watch the whole swarm; no other machine needs to be reachable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

_STATE_STYLE = {"alive": "green", "suspect": "yellow", "dead": "bold red", "left": "dim"}
_LINK_MARK = {0: "[green]●[/]", 1: "[yellow]◐[/]", 2: "[red]○[/]"}


def _number(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def swarm_table(swarm: Mapping[str, Any]) -> Group:
    """The members table and the last few events, as one renderable."""
    members = swarm.get("members", [])
    live = sum(1 for m in members if m["state"] in ("alive", "suspect"))
    metric = next((m["figures"]["metric_name"] for m in members if m["figures"] and m["figures"]["metric_name"]), "")
    table = Table(title=f"p2pdl swarm as seen by {swarm.get('self', '?')}: {live} live of {len(members)}")
    for column, justify in (
        ("peer", "left"),
        ("state", "left"),
        ("step", "right"),
        ("steps/s", "right"),
        ("loss", "right"),
        (metric or "metric", "right"),
        ("partial", "right"),
        ("refused", "right"),
        ("links", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for member in members:
        figures = member["figures"] or {}
        links = " ".join(f"{_LINK_MARK.get(k['health'], '?')}{k['neighbor']}" for k in figures.get("links", []))
        table.add_row(
            member["name"] + (" *" if member["name"] == swarm.get("self") else ""),
            Text(member["state"], style=_STATE_STYLE.get(member["state"], "")),
            str(figures.get("step", "-")),
            _number(figures.get("steps_per_second"), 2),
            _number(figures.get("loss"), 4),
            _number(figures.get("metric"), 4),
            str(figures.get("rounds_partial", "-")),
            str(figures.get("refused", "-")),
            links,
        )
    events = [
        f"{time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['kind']}: {', '.join(e['members'])}"
        for e in swarm.get("events", [])[-5:]
    ]
    return Group(table, Text("\n".join(events) or "no membership events yet", style="dim"))


def watch(
    fetch: Callable[[], Mapping[str, Any]],
    *,
    console: Console,
    interval: float,
    count: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Redraw the table every ``interval`` seconds, ``count`` times (None: until interrupted).

    A failed poll shows its error in place of the table and the loop keeps trying. Returns how
    many polls succeeded.
    """
    succeeded = polls = 0
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while count is None or polls < count:
            polls += 1
            try:
                live.update(swarm_table(fetch()), refresh=True)
                succeeded += 1
            except OSError as exc:  # urllib's errors, timeouts and refused connections
                live.update(Text(f"cannot read the swarm: {exc}", style="red"), refresh=True)
            if count is None or polls < count:
                sleep(interval)
    return succeeded
