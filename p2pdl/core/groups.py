"""Group epochs for exact rounds: who averages with whom, and how peers agree on it.

An exact round (all-reduce of gradients, or of parameters for local SGD and DiLoCo) averages over
a *group*: an epoch number and an ordered member list. Every frame of the round carries its group,
and a peer applies a result only when every member's contributions carried the same group, so two
members can never combine different splits of the vector. When an attempt fails, the survivors
propose a new group with a higher epoch and redo the same round; conflicting proposals are
settled by a total order (:func:`proposal_key`): a peer adopts any higher proposal that includes
it. The protocol, its quorum rule and its failure cases are specified in docs/PROTOCOL.md §11.

Pure logic, no I/O: the strategy (``p2pdl.strategies.allreduce``) feeds it what arrived.
Trade-off: a group is named in full in every frame (a comma-joined string, at most
:data:`MAX_GROUP_CHARS` characters) rather than by a digest, so a peer that was left out learns
the whole member list from any one frame, at the cost of a few bytes per frame.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p2pdl.errors import FrameSchemaError

# A frame's wire round is round * EPOCH_SPAN + epoch: each attempt of a round has its own mailbox
# slots, and a later attempt (higher epoch) sorts after an earlier one of the same round.
EPOCH_SPAN = 2**20
MAX_GROUP_CHARS = 256  # a frame meta string holds at most 256 characters
MAX_ABORTED = 16  # epochs of the current round a notice lists as aborted (meta "no")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Group:
    """One agreed (or proposed) averaging group: an epoch and the members in rank order."""

    epoch: int
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.epoch < EPOCH_SPAN:
            raise ValueError(f"group epoch must be in [0, {EPOCH_SPAN}), got {self.epoch}")

    @property
    def size(self) -> int:
        return len(self.members)

    def encoded(self) -> str:
        return ",".join(self.members)


def proposal_key(group: Group) -> tuple[int, int, tuple[str, ...]]:
    """The total order over proposals: higher epoch first, then more members, then the names."""
    return (group.epoch, group.size, group.members)


def wire_round(round_index: int, epoch: int) -> int:
    """The ``round`` field of a data frame of attempt ``epoch`` of exact round ``round_index``."""
    return round_index * EPOCH_SPAN + epoch


def quorum(configured: int, min_peers: int) -> int:
    """Members a round needs: ``min_peers`` when set, else a strict majority of the configured peers.

    Any two strict majorities of the same configured set intersect, so two sides of a partition
    can never both train.
    """
    return min_peers if min_peers > 0 else configured // 2 + 1


COMMIT, ABORT, NONE = 1, 0, -1
MAX_BALLOT = 2**40


@dataclass(frozen=True, slots=True)
class Vote:
    """A member's Paxos state for one attempt, as its notices carry it (meta ``cm``)."""

    epoch: int  # the attempt's group epoch
    promised: int = NONE  # the highest ballot it promised (NONE: none)
    accepted: int = NONE  # the ballot of the value it accepted last (NONE: none)
    value: int = NONE  # that value: COMMIT or ABORT (NONE: none)
    ballot: int = NONE  # the ballot of its own recovery proposal (NONE: none)
    proposed: int = NONE  # NONE: preparing that ballot; COMMIT or ABORT: asking the members to accept it

    def wire(self) -> str:
        """The six fields as decimal ints, comma-joined (frame meta holds no lists)."""
        return ",".join(map(str, (self.epoch, self.promised, self.accepted, self.value, self.ballot, self.proposed)))


def _ints(text: object, key: str, count: range, low: int, high: int) -> list[int]:
    """Comma-joined decimal ints in [low, high) from an untrusted peer (``count`` of them)."""
    items = text.split(",") if isinstance(text, str) and text and len(text) <= MAX_GROUP_CHARS else None
    if items is None or len(items) not in count:
        raise FrameSchemaError(f"exact-round meta {key!r} must be {count.start}-{count.stop - 1} comma-joined ints")
    values = []
    for item in items:
        digits = item.removeprefix("-")
        if not digits.isdigit() or len(digits) > 13 or not low <= int(item) < high or item != str(int(item)):
            raise FrameSchemaError(f"exact-round meta {key!r} must hold ints in [{low}, {high}): {text!r:.60}")
        values.append(int(item))
    return values


def parse_vote(value: object) -> Vote:
    """Validate a ``cm`` string (core/commit.py) from an untrusted peer; FrameSchemaError when bad."""
    vote = Vote(*_ints(value, "cm", range(6, 7), NONE, MAX_BALLOT))
    if vote.value not in (NONE, COMMIT, ABORT) or vote.proposed not in (NONE, COMMIT, ABORT):
        raise FrameSchemaError(f"exact-round meta 'cm' values must be -1, 0 or 1, got {value!r:.60}")
    if (vote.accepted == NONE) != (vote.value == NONE) or vote.accepted > vote.promised:
        raise FrameSchemaError(f"exact-round meta 'cm' is not a consistent acceptor state: {value!r:.60}")
    return vote


@dataclass(frozen=True, slots=True)
class Notice:
    """What a peer announced in its latest group notice (or data frame) about an exact round."""

    round: int
    group: Group
    prev: int  # the epoch of the group whose average the sender applied last (-1: none yet)
    phase: str  # "rs": proposing and exchanging, "wait": below quorum, "sync": behind, downloading state
    vote: Vote | None = None  # the sender's vote on the decision of attempt vote.epoch (core/commit.py)
    aborted: tuple[int, ...] = ()  # epochs of this round the sender knows no member applies


PHASES = frozenset({"rs", "wait", "sync"})


def group_meta(
    round_index: int,
    group: Group,
    prev: int,
    phase: str,
    *,
    vote: Vote | None = None,
    aborted: Sequence[int] = (),
) -> dict[str, Any]:
    """The frame meta that tags an exact round with its group (docs/PROTOCOL.md §11); a notice
    also carries the sender's vote on an attempt's decision and the epochs it knows aborted."""
    meta: dict[str, Any] = {"xr": round_index, "epoch": group.epoch, "group": group.encoded(), "prev": prev}
    meta["phase"] = phase
    if vote is not None:
        meta["cm"] = vote.wire()
    if aborted:
        meta["no"] = ",".join(map(str, aborted[-MAX_ABORTED:]))
    return meta


def _int(meta: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise FrameSchemaError(f"exact-round meta {key!r} must be an int in [{low}, {high}), got {value!r:.40}")
    return value


def parse_members(text: object) -> tuple[str, ...]:
    """A comma-joined member list from the network: distinct valid names, at least one."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_GROUP_CHARS:
        raise FrameSchemaError("exact-round meta 'group' must be a non-empty string of at most 256 chars")
    members = tuple(text.split(","))
    if len(set(members)) != len(members) or not all(_NAME.fullmatch(m) for m in members):
        raise FrameSchemaError(f"exact-round meta 'group' is not a list of distinct peer names: {text!r:.80}")
    return members


def parse_notice(meta: Mapping[str, Any]) -> Notice:
    """Validate the group tags of a frame from an untrusted peer; FrameSchemaError when bad."""
    phase = meta.get("phase")
    if phase not in PHASES:
        raise FrameSchemaError(f"exact-round meta 'phase' must be one of {sorted(PHASES)}, got {phase!r:.40}")
    return Notice(
        round=_int(meta, "xr", 0, 2**62 // EPOCH_SPAN),
        group=Group(_int(meta, "epoch", 0, EPOCH_SPAN), parse_members(meta.get("group"))),
        prev=_int(meta, "prev", -1, EPOCH_SPAN),
        phase=str(phase),
        vote=parse_vote(meta["cm"]) if "cm" in meta else None,
        aborted=tuple(_ints(meta["no"], "no", range(1, MAX_ABORTED + 1), 0, EPOCH_SPAN)) if "no" in meta else (),
    )


def ordered(names: Sequence[str], order: Sequence[str]) -> tuple[str, ...]:
    """``names`` in the order of ``order`` (the agreed live order); names not in it go last, sorted."""
    position = {name: i for i, name in enumerate(order)}
    return tuple(sorted(set(names), key=lambda n: (position.get(n, len(position)), n)))


class Agreement:
    """One peer's side of the group agreement: pure state, fed by the strategy that does the I/O.

    It holds the agreed group (of the last applied round) and its epoch as ``prev``, the latest
    notice of every peer, and the *suspects*: members that missed an attempt and have announced
    nothing since. The rules are those of docs/PROTOCOL.md §11.3.
    """

    def __init__(self, me: str, configured: Sequence[str], members: Sequence[str]) -> None:
        self.me = me
        self.configured = tuple(configured)
        self.agreed = Group(0, tuple(members) or (me,))
        self.prev = -1  # the epoch of the group whose average this peer applied last
        self.seen: dict[str, Notice] = {}
        self.suspects: set[str] = set()

    def observe(self, sender: str, notice: Notice) -> None:
        """``sender`` announced ``notice``: remember it; a suspect heard from again is eligible again."""
        self.seen[sender] = notice
        self.suspects.discard(sender)

    def ahead(self, round_index: int) -> list[str]:
        """Peers past this one (a later round, or the same round after a later group's average),
        furthest first: this peer is behind when the list is not empty."""
        ahead = [
            (n.round, n.prev, s)
            for s, n in self.seen.items()
            if n.round > round_index or (n.round == round_index and n.prev > self.prev)
        ]
        return [s for _, _, s in sorted(ahead, reverse=True)]

    def higher(self, round_index: int, group: Group) -> Group | None:
        """The greatest proposal for this round, after the same history, that includes this peer,
        none of its suspects, and is greater than ``group`` (to adopt), if any.

        A proposal with a member this peer found missing would only fail again here: this peer's
        own next proposal (one epoch above it, without the suspect) is the one to converge on."""
        higher = [
            n.group
            for n in self.seen.values()
            if n.round == round_index
            and n.prev == self.prev
            and n.phase != "sync"
            and self.me in n.group.members
            and not self.suspects.intersection(n.group.members)
            and proposal_key(n.group) > proposal_key(group)
        ]
        return max(higher, key=proposal_key) if higher else None

    def eligible(self, name: str, round_index: int) -> bool:
        """May ``name`` be proposed for an attempt of ``round_index`` (docs/PROTOCOL.md §11.3 step 1)?

        Not while it is a suspect or resyncing (its latest notice has phase ``sync``). A member of
        the agreed group is eligible otherwise. Any other peer (a joiner: new, restarted, thawed,
        or left out of the last applied round) only once it has announced this round (or a later
        one) after the same history: until then it is behind and resyncs, and the group trains on
        without waiting for its download.
        """
        if name == self.me:
            return True
        notice = self.seen.get(name)
        if name in self.suspects or (notice is not None and notice.phase == "sync"):
            return False
        if name in self.agreed.members:
            return True
        return notice is not None and (
            notice.round > round_index or (notice.round == round_index and notice.prev >= self.prev)
        )

    def given_up(self, round_index: int, group: Group, pending: Sequence[str]) -> list[str]:
        """The ``pending`` members of ``group`` whose frames for this attempt will not come.

        A pending member that is resyncing (phase ``sync``) has left the round. A pending member
        that another member of ``group`` left out of a greater proposal for this round, after the
        same history, was found missing by that member: that member has abandoned this attempt,
        so the attempt cannot complete without a redo anyway, and waiting on would only add this
        peer's own detection time to the other's. And once a member of ``group`` lists this
        attempt's epoch as aborted (meta ``no``), no member applies it: every pending member's
        frame is given up (that member left before its all-gather chunk went out, or ABORT was
        decided), so an all-gather never waits out its deadline for a member that adopted
        another proposal.
        """
        lost = {n for n in pending if (notice := self.seen.get(n)) is not None and notice.phase == "sync"}
        for sender, notice in self.seen.items():
            if sender not in group.members or notice.round != round_index or notice.prev != self.prev:
                continue
            if group.epoch in notice.aborted:
                return list(pending)
            if notice.phase != "sync" and proposal_key(notice.group) > proposal_key(group):
                lost.update(n for n in pending if n != sender and n not in notice.group.members)
        return [n for n in pending if n in lost]

    def propose(self, round_index: int, live: Sequence[str], after: Group | None, *, waited: bool = False) -> Group:
        """The group for the next attempt of ``round_index`` over the ``live`` members (agreed order).

        ``after`` is the failed attempt, or with ``waited`` the group this peer waited below
        quorum with (kept while nothing changed). Members: the live peers that are
        :meth:`eligible`. The epoch is the agreed one for an unchanged first attempt, else one
        above every epoch seen for this round.
        """
        members = tuple(n for n in live if self.eligible(n, round_index))
        if after is None and members == self.agreed.members:
            return self.agreed
        if waited and after is not None and members == after.members:
            return after
        seen = [n.group.epoch for n in self.seen.values() if n.round == round_index]
        floor = max([self.agreed.epoch, *seen, *([after.epoch] if after else [])])
        return Group(floor + 1, members)

    def missed(self, names: Sequence[str]) -> None:
        """These members missed an attempt: out of proposals until they announce again."""
        self.suspects.update(names)

    def applied(self, group: Group) -> None:
        """A round was applied over ``group``: it is the agreed group now."""
        self.agreed, self.prev = group, group.epoch

    def missing_from(self, group: Group) -> list[str]:
        """The configured and agreed members that ``group`` lacks (for QuorumLostError)."""
        wanted = dict.fromkeys([*self.configured, *self.agreed.members])
        return [n for n in wanted if n not in group.members]

    def take_history(self, agreed: Group, prev: int) -> None:
        """This peer loaded a member's state: take the donor's agreed group and ``prev``."""
        self.agreed, self.prev = agreed, prev
        self.suspects.clear()

    def keep_notices_for(self, round_index: int) -> None:
        """After a resync to ``round_index``: forget every notice except the proposals for that
        round (to adopt); the others are history skipped over, or must be heard again."""
        self.seen = {s: n for s, n in self.seen.items() if n.round == round_index}

    def state_meta(self) -> dict[str, Any]:
        """What a donor adds to the ``state_meta`` frame (docs/PROTOCOL.md §3.5)."""
        return {"xr_epoch": self.agreed.epoch, "xr_group": self.agreed.encoded(), "xr_prev": self.prev}


def donor_group(meta: Mapping[str, Any]) -> tuple[Group, int] | None:
    """The agreed group and ``prev`` a donor put in its ``state_meta`` frame, or None if absent or bad."""
    epoch, prev = meta.get("xr_epoch"), meta.get("xr_prev")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not isinstance(prev, int) or isinstance(prev, bool):
        return None
    try:
        if not -1 <= prev < EPOCH_SPAN:
            return None
        return Group(epoch, parse_members(meta.get("xr_group"))), prev
    except (FrameSchemaError, ValueError):
        return None
