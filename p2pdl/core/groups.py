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


@dataclass(frozen=True, slots=True)
class Notice:
    """What a peer announced in its latest group notice (or data frame) about an exact round."""

    round: int
    group: Group
    prev: int  # the epoch of the group whose average the sender applied last (-1: none yet)
    phase: str  # "rs": proposing and exchanging, "wait": below quorum


PHASES = frozenset({"rs", "wait"})


def group_meta(round_index: int, group: Group, prev: int, phase: str) -> dict[str, Any]:
    """The frame meta that tags an exact round with its group (docs/PROTOCOL.md §11)."""
    return {"xr": round_index, "epoch": group.epoch, "group": group.encoded(), "prev": prev, "phase": phase}


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
    )


def ordered(names: Sequence[str], order: Sequence[str]) -> tuple[str, ...]:
    """``names`` in the order of ``order`` (the agreed live order); names not in it go last, sorted."""
    position = {name: i for i, name in enumerate(order)}
    return tuple(sorted(set(names), key=lambda n: (position.get(n, len(position)), n)))
