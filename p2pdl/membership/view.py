"""Who is in the swarm: a gossip-style membership view with heartbeat failure detection.

Pure state, no I/O: the node feeds it what it hears and asks it who is live. Each member carries
a name, an address, an *incarnation* and a *heartbeat* counter. A member bumps its own heartbeat
every gossip period; views are merged by keeping, per member, the highest (incarnation,
heartbeat) pair (van Renesse et al. 1998). Each peer decides **locally** that a member is
``suspect`` when its counter has not advanced for ``suspect_after`` seconds and ``dead`` when
its silence reaches a limit learnt from that member's own heartbeat rhythm: a phi-accrual
detector (:mod:`p2pdl.core.deadline`) over the measured inter-arrival times (each clipped at
``suspect_after``, so one long stall does not make it lax for long; a silence that reached the
dead limit is an outage, left out unless another came within the last 20 arrivals), crossing
``phi_threshold``, clamped to ``[suspect_after, dead_after]`` (before enough heartbeats are
measured, and with ``phi_threshold = 0``, the limit is ``dead_after``; a member whose counter
was heard once and never advanced since is dead at ``suspect_after``). A regular peer is thus
dropped a few seconds after it stops, and a peer on a loaded machine, whose heartbeats come
irregularly, is given proportionally longer. Death is never gossiped, so a healed partition or a restarted peer is
alive again as soon as fresh counters arrive. ``left`` *is* gossiped: a clean leave is announced
and every peer rewires at once. A frame on a direct link is evidence of life too (:meth:`touch`),
also from a configured peer that never gossips; that evidence is local and is not gossiped on,
because a digest entry carries only counters the member itself advanced.

A process that was itself paused (SIGSTOP, a stalled event loop) measures everybody's silence
across its own pause. :meth:`beat` notices the gap between its own beats and extends every
member's evidence by the excess (as Cassandra skips convictions after a local pause), so a
thawed peer does not declare the whole swarm dead, and that gap is no sample of anyone's rhythm.

The incarnation is the wall-clock start time of the peer process in milliseconds, so a peer that
restarts under the same name is newer than any state of its previous life without storing
anything. Trade-off: peers need loosely synchronised clocks only across restarts of one name.

Peers agree on the graph without a coordinator because the ordering of live members is
deterministic: configured peers in config order first, then joiners by name.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from p2pdl.core.deadline import ArrivalWindow
from p2pdl.errors import MembershipError

MemberState = Literal["alive", "suspect", "left", "dead"]
_LIVE: frozenset[str] = frozenset({"alive", "suspect"})
MAX_MEMBERS = 4096
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of a view. ``heard_at`` is local monotonic time of the last counter increase."""

    name: str
    address: str
    incarnation: int
    heartbeat: int
    left: bool = False
    heard_at: float = 0.0

    @property
    def version(self) -> tuple[int, int, bool]:
        # A leave outranks a heartbeat of the same incarnation: it is the member's last word.
        return (self.incarnation, self.heartbeat if not self.left else 2**62, self.left)

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "incarnation": self.incarnation,
            "heartbeat": self.heartbeat,
            "left": self.left,
        }


def parse_members(payload: Any) -> list[Member]:
    """Validate a gossiped view (JSON list of member dicts) from an untrusted peer."""
    if not isinstance(payload, list) or len(payload) > MAX_MEMBERS:
        raise MembershipError(f"members must be a list of at most {MAX_MEMBERS} entries")
    members = []
    for entry in payload:
        if not isinstance(entry, dict) or set(entry) != {
            "name",
            "address",
            "incarnation",
            "heartbeat",
            "left",
        }:
            raise MembershipError("each member needs exactly name, address, incarnation, heartbeat, left")
        name, address = entry["name"], entry["address"]
        incarnation, heartbeat, left = entry["incarnation"], entry["heartbeat"], entry["left"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise MembershipError(f"bad member name {name!r}")
        if not isinstance(address, str) or not 3 <= len(address) <= 300 or ":" not in address:
            raise MembershipError(f"bad address for {name!r}")
        for label, value in (("incarnation", incarnation), ("heartbeat", heartbeat)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**62:
                raise MembershipError(f"bad {label} for {name!r}")
        if not isinstance(left, bool):
            raise MembershipError(f"bad left flag for {name!r}")
        members.append(Member(name, address, incarnation, heartbeat, left))
    return members


def natural_key(name: str) -> tuple[Any, ...]:
    """'p2' < 'p10': digits compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """Failure-detector timing in seconds; validated by the config."""

    gossip_interval: float
    suspect_after: float
    dead_after: float  # the ceiling of the adaptive dead limit (the limit itself without history)
    phi_threshold: float = 0.0  # phi at which a member is dead; 0: fixed dead_after, no adaptation
    tombstone_after: float = 600.0  # forget dead/left members after this long


class MembershipView:
    """This peer's view of the swarm."""

    def __init__(
        self,
        *,
        name: str,
        address: str,
        configured: Sequence[tuple[str, str]],
        timing: Timing,
        incarnation: int | None = None,
        now: float | None = None,
    ) -> None:
        self.name = name
        self.timing = timing
        start = time.monotonic() if now is None else now
        self._configured_order = {n: i for i, (n, _) in enumerate(configured)}
        own = Member(
            name=name,
            address=address,
            incarnation=incarnation if incarnation is not None else int(time.time() * 1000),
            heartbeat=0,
            heard_at=start,
        )
        self._members: dict[str, Member] = {name: own}
        # Configured peers start as alive with heartbeat -1 (never heard): if they never show up,
        # the detector declares them dead; the first real heartbeat replaces the placeholder.
        for peer_name, peer_address in configured:
            if peer_name != name:
                self._members[peer_name] = Member(peer_name, peer_address, 0, 0, heard_at=start)
        self._heard: set[str] = {name}  # learnt through gossip (or a leave): these are gossiped on
        self._linked: set[str] = set()  # heard only on a direct link so far: local evidence
        self._last_live: tuple[str, ...] = ()
        self._arrivals: dict[str, ArrivalWindow] = {}  # heartbeat rhythm of each member, as heard here
        self.deaths: dict[str, int] = {}  # per member: times this peer declared it dead (tick)
        # The last tick's new deaths: (name, seconds silent at the tick, its dead limit then); the
        # silence crossed the limit (silent - limit) seconds before the tick.
        self.declared_dead: list[tuple[str, float, float]] = []
        self.paused_seconds = 0.0  # this process's own pauses, forgiven to every member
        self.changes = 0  # bumped whenever the live set changes, so callers can rewire cheaply

    # ------------------------------------------------------------------ reading

    @property
    def incarnation(self) -> int:
        return self._members[self.name].incarnation

    def member(self, name: str) -> Member | None:
        return self._members.get(name)

    def state_of(self, name: str, now: float | None = None) -> MemberState:
        member = self._members[name]
        if member.left:
            return "left"
        if name == self.name:
            return "alive"
        silent = (time.monotonic() if now is None else now) - member.heard_at
        if silent >= self.dead_limit(name):
            return "dead"
        if silent >= self.timing.suspect_after:
            return "suspect"
        return "alive"

    def dead_limit(self, name: str) -> float:
        """Seconds of silence after which ``name`` is dead: adaptive, within the configured bounds."""
        timing = self.timing
        window = self._arrivals.get(name)
        if timing.phi_threshold <= 0 or window is None:
            return timing.dead_after
        if not len(window):
            # Heard once and never advanced since: a live member advances its counter every
            # gossip period, so this is a member that died before this peer first heard of it
            # (the others still relay its last entry to a peer that just restarted, which would
            # otherwise wait dead_after at start-up for a link to it). The floor still applies.
            return timing.suspect_after
        return window.dead_after(timing.phi_threshold, timing.suspect_after, timing.dead_after)

    def order_key(self, name: str) -> tuple[int, tuple[Any, ...]]:
        return (self._configured_order.get(name, len(self._configured_order)), natural_key(name))

    def live_names(self, now: float | None = None) -> tuple[str, ...]:
        """Alive and suspect members in the agreed order (config order, then joiners by name)."""
        live = [n for n in self._members if self.state_of(n, now) in _LIVE]
        return tuple(sorted(live, key=self.order_key))

    def heard_from(self, name: str) -> bool:
        """Has ``name`` ever been heard from, on a link or through gossip (beyond config)?"""
        return name in self._heard or name in self._linked

    def addresses(self) -> dict[str, str]:
        return {m.name: m.address for m in self._members.values()}

    def snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        """The view as served by ``GET /members``."""
        at = time.monotonic() if now is None else now
        return [
            {
                **m.to_wire(),
                "state": self.state_of(m.name, at),
                "silent_seconds": round(at - m.heard_at, 3),
                "dead_after_seconds": round(self.dead_limit(m.name), 3),
                "declared_dead": self.deaths.get(m.name, 0),
            }
            for m in sorted(self._members.values(), key=lambda m: self.order_key(m.name))
        ]

    def digest(self) -> list[dict[str, Any]]:
        """What this peer gossips: every member it knows, with its latest version."""
        return [m.to_wire() for m in self._members.values() if m.name in self._heard or m.left]

    # ------------------------------------------------------------------ writing

    def beat(self) -> None:
        """Advance this peer's own heartbeat (once per gossip period)."""
        own = self._members[self.name]
        now = time.monotonic()
        paused = now - own.heard_at - self.timing.gossip_interval
        if own.heartbeat > 0 and paused > self.timing.gossip_interval:
            # This process did not run for a while: nobody could be heard meanwhile.
            self.paused_seconds += paused
            for name, member in self._members.items():
                if name != self.name:
                    self._members[name] = replace(member, heard_at=min(now, member.heard_at + paused))
            for window in self._arrivals.values():
                window.forget_last()
        self._members[self.name] = replace(own, heartbeat=own.heartbeat + 1, heard_at=now)

    def touch(self, name: str, now: float | None = None) -> None:
        """Direct evidence of life (a frame arrived on a link): as good as a fresh heartbeat.

        It counts for a configured peer not yet learnt through gossip: its placeholder keeps
        incarnation 0 and the configured address, so the member's first own digest entry (any
        real incarnation) replaces it. Only names already in the view are refreshed: the caller
        passes the name of an accepted link, and a link exists only for a configured or gossiped
        member, so a sender cannot create members this way. A member that left stays left
        until a newer incarnation of it is gossiped.
        """
        member = self._members.get(name)
        if member is None or member.left or name == self.name:
            return
        self._members[name] = replace(member, heard_at=time.monotonic() if now is None else now)
        if name not in self._heard:
            self._linked.add(name)

    def set_own_address(self, address: str) -> None:
        """The address to advertise, once known (e.g. after binding port 0)."""
        self._members[self.name] = replace(self._members[self.name], address=address)

    def leave(self) -> None:
        own = self._members[self.name]
        self._members[self.name] = replace(own, left=True)

    def mark_left(self, name: str) -> bool:
        """``name`` said goodbye on a direct link; returns True when the live set changed."""
        member = self._members.get(name)
        if member is None or member.left or name == self.name:
            return False
        self._members[name] = replace(member, left=True)
        self._heard.add(name)
        self.changes += 1
        return True

    def merge(self, remote: Iterable[Member], now: float | None = None) -> bool:
        """Fold a remote view in; returns True when the live set changed."""
        at = time.monotonic() if now is None else now
        before = self.live_names(at)
        for incoming in remote:
            if incoming.name == self.name:
                continue  # only this process speaks for itself
            current = self._members.get(incoming.name)
            if current is not None and incoming.version <= current.version and incoming.name in self._heard:
                continue
            if current is not None and incoming.version <= current.version and current.left:
                continue
            if len(self._members) >= MAX_MEMBERS and current is None:
                continue
            if current is None or incoming.incarnation != current.incarnation:
                # A new life has its own rhythm; gaps beyond the floor are recorded as the floor.
                self._arrivals[incoming.name] = ArrivalWindow(clip=self.timing.suspect_after)
            if current is None or incoming.version > current.version:
                # Silent here (no counter, no frame) for the whole dead limit: an outage (a freeze,
                # a partition), which says little about the member's rhythm unless it recurs.
                outage = current is not None and at - current.heard_at >= self.dead_limit(incoming.name)
                self._arrivals[incoming.name].arrived(at, outage=outage)
            self._members[incoming.name] = replace(incoming, heard_at=at)
            self._heard.add(incoming.name)
        self._forget_tombstones(at)
        changed = self.live_names(at) != before
        if changed:
            self.changes += 1
        return changed

    def tick(self, now: float | None = None) -> bool:
        """Re-evaluate timeouts; returns True when the live set changed since the last call."""
        at = time.monotonic() if now is None else now
        live = self.live_names(at)
        changed = live != self._last_live
        self.declared_dead = []
        for name in sorted(set(self._last_live) - set(live)):
            member = self._members.get(name)
            if member is not None and not member.left:
                self.deaths[name] = self.deaths.get(name, 0) + 1
                self.declared_dead.append((name, at - member.heard_at, self.dead_limit(name)))
        self._last_live = live
        if changed:
            self.changes += 1
        return changed

    def _forget_tombstones(self, now: float) -> None:
        limit = self.timing.tombstone_after
        for name in [
            n
            for n, m in self._members.items()
            if n != self.name and n not in self._configured_order and now - m.heard_at > limit
        ]:
            del self._members[name]
            self._arrivals.pop(name, None)
            self._heard.discard(name)
            self._linked.discard(name)
