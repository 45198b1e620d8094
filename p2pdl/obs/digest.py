"""Each member's headline figures, carried in the membership gossip so any peer sees the swarm.

A member's *figures* are a small JSON object that only the member itself writes: its step, last
loss, headline evaluation metric, steps per second, complete and partial rounds, refused frames,
and the health of up to :data:`MAX_LINKS` of its links. Every gossip body carries a ``figures``
map (member name -> entry) next to ``members``; a receiver keeps, per member, the entry with the
highest version ``(incarnation, heartbeat)``, exactly as it does for the member's counters, so
the figures of every member spread through the swarm at gossip speed with no extra request.

Trade-off: the figures are hearsay. They are as fresh as the gossip (a few gossip periods) and
only as honest as the member that wrote them; a peer relays what it heard without being able to
check it. They are for watching a swarm, never for deciding anything about training.

Bounds, all enforced on receipt before anything is kept (a refusal rejects the whole gossip body
and is counted like any bad gossip): an entry is an object with exactly the known keys, each of
its declared type and range, finite numbers only, names that match the membership name rule, and
at most :data:`MAX_LINKS` links. Those rules alone bound an entry to :data:`MAX_ENTRY_BYTES` as
compact JSON (the tests build the largest valid entry). A body carries at most
:data:`MAX_ENTRIES` entries; a sender includes its own and the freshest others up to that.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from p2pdl.errors import MembershipError

MAX_LINKS = 8  # links per member in a digest entry, the unhealthiest first
MAX_ENTRY_BYTES = 1024  # the largest valid entry as compact JSON (8 links of 64-character names)
MAX_ENTRIES = 256  # entries in one gossip body: at most 256 KiB of figures per exchange
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_METRIC = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_MAX_COUNT = 2**53  # counters stay exact in a JavaScript number

# Link health codes, worst last: the dashboard colours edges by them.
LINK_UP, LINK_CONNECTING, LINK_DOWN = 0, 1, 2
_LINK_HEALTH = {"connected": LINK_UP, "connecting": LINK_CONNECTING, "left": LINK_DOWN}

# key -> (meaning, kind) where kind is one of: count, number, optional number, metric name, version, links
_SCHEMA: dict[str, str] = {
    "v": "version",  # [incarnation, heartbeat] of the member when it wrote the entry
    "s": "count",  # training step
    "l": "optional number",  # last training loss
    "h": "optional number",  # headline evaluation metric (e.g. test_accuracy)
    "hn": "metric name",  # the headline metric's name ("" when it has none yet)
    "r": "number",  # steps per second, recent
    "c": "count",  # complete rounds
    "p": "count",  # partial rounds
    "f": "count",  # frames and credentials refused
    "k": "links",  # [[neighbour, health code, kilobytes per second or null], ...]
}


@dataclass(frozen=True, slots=True)
class Link:
    """One link of a member as it reported it."""

    neighbor: str
    health: int  # LINK_UP, LINK_CONNECTING or LINK_DOWN
    kilobytes_per_second: float | None  # wire traffic both ways; None when the transport does not count it


def link_health(state: str) -> int:
    """The health code of a transport link state (an unknown state counts as down)."""
    return _LINK_HEALTH.get(state, LINK_DOWN)


def build_entry(
    *,
    version: tuple[int, int],
    step: int,
    loss: float | None,
    headline: tuple[str, float | None],
    steps_per_second: float,
    complete: int,
    partial: int,
    refused: int,
    links: Iterable[Link],
) -> dict[str, Any]:
    """This member's entry, within every bound that :func:`parse_entry` checks."""

    def number(value: float | None) -> float | None:
        return round(value, 6) if value is not None and math.isfinite(value) else None

    chosen = sorted(links, key=lambda link: (-link.health, link.neighbor))[:MAX_LINKS]
    name, value = headline
    entry = {
        "v": [version[0], version[1]],
        "s": min(step, _MAX_COUNT),
        "l": number(loss),
        "h": number(value),
        "hn": name if _METRIC.fullmatch(name) else "",
        "r": number(steps_per_second) or 0.0,
        "c": min(complete, _MAX_COUNT),
        "p": min(partial, _MAX_COUNT),
        "f": min(refused, _MAX_COUNT),
        "k": [
            [
                link.neighbor,
                link.health,
                None if link.kilobytes_per_second is None else round(link.kilobytes_per_second, 1),
            ]
            for link in chosen
        ],
    }
    assert encoded_size(entry) <= MAX_ENTRY_BYTES, entry  # names are capped at 64 characters
    return entry


def encoded_size(entry: Mapping[str, Any]) -> int:
    """Bytes of ``entry`` as compact JSON, the measure of every size bound here."""
    return len(json.dumps(entry, separators=(",", ":")).encode())


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


# Integers beyond float precision would break both the entry's size bound (a 300-digit integer
# is valid JSON) and math.isfinite (OverflowError), so only integers of at most 2**53 count.
_MAX_EXACT_INT = 2**53


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= _MAX_EXACT_INT
    return isinstance(value, float) and math.isfinite(value)


def _check_field(key: str, kind: str, value: Any) -> None:
    ok = True
    if kind == "version":
        ok = isinstance(value, list) and len(value) == 2 and all(_is_count(v) for v in value)
    elif kind == "count":
        ok = _is_count(value)
    elif kind == "number":
        ok = _is_number(value) and value >= 0
    elif kind == "optional number":
        ok = value is None or _is_number(value)
    elif kind == "metric name":
        ok = isinstance(value, str) and (value == "" or bool(_METRIC.fullmatch(value)))
    elif kind == "links":
        ok = isinstance(value, list) and len(value) <= MAX_LINKS and all(_is_link(link) for link in value)
    if not ok:
        raise MembershipError(f"figures: bad {key!r}")


def _is_link(value: Any) -> bool:
    if not isinstance(value, list) or len(value) != 3:
        return False
    neighbor, health, rate = value
    return (
        isinstance(neighbor, str)
        and bool(_NAME.fullmatch(neighbor))
        and type(health) is int
        and health in (LINK_UP, LINK_CONNECTING, LINK_DOWN)
        and (rate is None or (_is_number(rate) and rate >= 0))
    )


def parse_entry(entry: Any) -> dict[str, Any]:
    """Check one member's entry from the network; returns it unchanged or raises MembershipError."""
    if not isinstance(entry, dict) or set(entry) != set(_SCHEMA):
        raise MembershipError(f"figures: an entry needs exactly the keys {sorted(_SCHEMA)}")
    for key, kind in _SCHEMA.items():
        _check_field(key, kind, entry[key])
    return entry


def parse_figures(payload: Any) -> dict[str, dict[str, Any]]:
    """Check a gossip body's ``figures`` map; raises MembershipError before anything is kept."""
    if not isinstance(payload, dict) or len(payload) > MAX_ENTRIES:
        raise MembershipError(f"figures must be an object of at most {MAX_ENTRIES} entries")
    parsed = {}
    for name, entry in payload.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise MembershipError(f"figures: bad member name {str(name)[:70]!r}")
        parsed[name] = parse_entry(entry)
    return parsed


def links_of(entry: Mapping[str, Any]) -> list[Link]:
    return [Link(neighbor, health, rate) for neighbor, health, rate in entry["k"]]


class FigureBook:
    """The newest figures of every member this peer has heard of (its own included).

    Entries are kept only for members that the membership view knows (:meth:`retain`), so the
    book is bounded by the view, and never for a member with an older version than held.
    """

    def __init__(self, own_name: str) -> None:
        self.own_name = own_name
        self._entries: dict[str, dict[str, Any]] = {}
        self._received: dict[str, float] = {}  # monotonic time each entry arrived: freshness for relaying

    def set_own(self, entry: dict[str, Any]) -> None:
        self._entries[self.own_name] = entry
        self._received[self.own_name] = time.monotonic()

    def merge(self, figures: Mapping[str, dict[str, Any]], known: Iterable[str]) -> None:
        """Keep each already-checked entry of a known member that is newer than the one held."""
        members = set(known)
        for name, entry in figures.items():
            if name == self.own_name or name not in members:
                continue  # only this process writes its own figures; strangers are not kept
            held = self._entries.get(name)
            if held is None or tuple(entry["v"]) > tuple(held["v"]):
                self._entries[name] = entry
                self._received[name] = time.monotonic()

    def retain(self, known: Iterable[str]) -> None:
        """Forget the figures of members the view no longer holds."""
        members = set(known) | {self.own_name}
        for name in [n for n in self._entries if n not in members]:
            del self._entries[name]
            self._received.pop(name, None)

    def get(self, name: str) -> dict[str, Any] | None:
        return self._entries.get(name)

    def entries(self) -> dict[str, dict[str, Any]]:
        return dict(self._entries)

    def outgoing(self) -> dict[str, dict[str, Any]]:
        """What one gossip body carries: this member's entry first, then the freshest others."""
        own = self._entries.get(self.own_name)
        others = sorted(
            ((n, e) for n, e in self._entries.items() if n != self.own_name),
            key=lambda item: self._received.get(item[0], 0.0),
            reverse=True,
        )
        chosen = ([(self.own_name, own)] if own is not None else []) + others
        return dict(chosen[:MAX_ENTRIES])
