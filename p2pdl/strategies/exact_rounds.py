"""The agreement side of exact rounds: group notices, lost members and the decision (PROTOCOL.md §11).

:mod:`p2pdl.strategies.allreduce_round` moves the tensors; :class:`GroupNotices` does the talking
about them: it announces this peer's round, proposal and vote in ``xg`` notices, reads the peers'
latest ones into the pure :class:`~p2pdl.core.groups.Agreement`, tells which pending members are
lost (§11.3 step 3), waits below quorum (§11.6) and runs the decision after an all-gather
(:class:`~p2pdl.core.commit.Decision`, §11.4). It also keeps the counters of all that for
``/status``. Trade-off: notices are polled every :data:`LOOK_EVERY` seconds (or at once when one
arrives) rather than pushed into a state machine, which keeps every wait a bounded loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from p2pdl.core.commit import Decision
from p2pdl.core.groups import ABORT, COMMIT, Agreement, Group, Vote, group_meta, parse_notice
from p2pdl.errors import FrameError, QuorumLostError
from p2pdl.strategies.base import StrategyContext
from p2pdl.wire import Frame

__all__ = [
    "ALL_GATHER",
    "GROUP_NOTICE",
    "LOOK_EVERY",
    "REDUCE_SCATTER",
    "Attempt",
    "Behind",
    "GroupNotices",
    "first_failure",
]

REDUCE_SCATTER = "rs"  # data kinds are "rs<n>" and "ag<n>" for a group of n members
ALL_GATHER = "ag"
GROUP_NOTICE = "xg"  # no tensors: "this is my round and the group I propose" (PROTOCOL.md §11)
LOOK_EVERY = 0.1  # seconds between looks at the notices while a round waits
_WAIT_NOTICE_EVERY = 0.5  # seconds between notices while waiting below quorum or undecided
# Seconds a pending member's link may stay down before its frames count as missing: a link that
# closes and comes straight back (a redial) loses nothing, a crashed peer's never comes back.
_LINK_GRACE = 1.0
_APPLIED_RUNS = 256  # runs of (rounds, epoch) kept for status()["applied_epochs"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one attempt of an exact round ended."""

    complete: bool
    missing: tuple[str, ...] = ()
    phase: str = "rs"
    adopt: Group | None = None


class Behind(Exception):  # control flow only: never leaves the all-reduce strategy
    """Members of this peer's group are past its round: it must download a member's state."""

    def __init__(self, donors: Sequence[str]) -> None:
        super().__init__(", ".join(donors))
        self.donors = tuple(donors)


async def first_failure(tasks: Sequence[asyncio.Task[T]], failure: Callable[[T], Attempt | None]) -> Attempt | None:
    """Wait for the sub-rounds ``tasks`` of one attempt (buckets, pieces) until one ends with a
    failed attempt (``failure`` of its result: returned, the others left running for the caller to
    cancel) or every one ended well (None). A task's exception (:class:`Behind`) propagates."""
    pending: set[asyncio.Task[T]] = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        failed = next((f for f in (failure(task.result()) for task in done) if f is not None), None)
        if failed is not None:
            return failed
    return None


class GroupNotices:
    """One peer's notices of exact rounds: what it announces and what it reads of the others."""

    def __init__(
        self,
        ctx: StrategyContext,
        agreement: Agreement,
        *,
        quorum: int,
        round_deadline: Callable[[], float],
        quorum_timeout: float,
    ) -> None:
        self._ctx = ctx
        self._agreement = agreement
        self._quorum = quorum
        self._round_deadline = round_deadline
        self._quorum_timeout = quorum_timeout
        self._seq = 0
        self._said: tuple[Any, ...] | None = None  # the last notice sent (round, meta, recipients)
        self._said_at = float("-inf")
        self.bad_notices = 0
        # The epochs of the current round known aborted (sent as "no"), and the round to announce
        # once a contested round is applied.
        self.aborted_round, self.aborted = -1, list[int]()
        self.post_commit: int | None = None
        self.decisions: Counter[str] = Counter()  # how each all-gather was decided
        # The epoch each round was applied over, as runs [first round, last round, epoch] (the
        # last _APPLIED_RUNS): two peers never hold different epochs for one round (§11.4).
        self.applied_epochs: list[list[int]] = []
        # How attempts that lacked a frame ended: "deadline", "not_live", "link_down",
        # "given_up" (PROTOCOL.md §11.3), or "adopted" (a greater proposal).
        self.attempt_endings: Counter[str] = Counter()

    def _live(self) -> tuple[str, ...]:
        return self._ctx.topology().names

    def _peers(self) -> tuple[str, ...]:
        return tuple(p for p in self._live() if p != self._ctx.name)

    async def linger(self, final_round: int, group: Group) -> None:
        """Before this peer leaves: announce ``final_round`` (the round after its last) until every
        live peer has announced it too, so a member that is behind (restarted, thawed) finds this
        peer ahead while it is still up and downloads the final state from it. Unbounded here:
        the node bounds it by ``transport.shutdown_timeout``."""
        while True:
            await self.notify(final_round, group, "rs")
            self.read(final_round, group, act=False)
            seen = self._agreement.seen
            behind = [n for n in self._peers() if (notice := seen.get(n)) is None or notice.round < final_round]
            if not behind:
                return
            await self._ctx.exchange.wait_for_senders(GROUP_NOTICE, behind, 1, _WAIT_NOTICE_EVERY)

    def status(self) -> dict[str, Any]:
        return {
            "bad_notices": self.bad_notices,
            "attempt_endings": dict(sorted(self.attempt_endings.items())),
            "decisions": dict(sorted(self.decisions.items())),
            "applied_epochs": self.applied_epochs,
        }

    async def notify(self, round_index: int, group: Group, phase: str, vote: Vote | None = None) -> None:
        """Tell every live peer (members or not) this peer's round and the group it proposes (and
        its vote on an attempt's decision, and the epochs of the round it knows aborted)."""
        meta = group_meta(
            round_index,
            group,
            self._agreement.prev,
            phase,
            vote=vote,
            aborted=self.aborted if round_index == self.aborted_round else (),
        )
        peers = self._peers()
        # The same notice to the same peers goes out at most every _WAIT_NOTICE_EVERY seconds.
        # Every wait loop re-announces when it reads a notice: two peers waiting on each other
        # (below quorum, lingering, undecided) would otherwise answer each other's notices in a
        # ping-pong as fast as the links go, until the receivers' rate limits refuse them.
        said, now = (round_index, tuple(sorted(meta.items())), peers), time.monotonic()
        if said == self._said and now < self._said_at + _WAIT_NOTICE_EVERY:
            return
        self._said, self._said_at = said, now
        # A notice's frame round is a per-sender sequence (wall-clock milliseconds, strictly
        # increasing, so also across a restart): the mailbox keeps the newest and never sees a
        # duplicate when a peer announces the same round twice.
        self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
        notice = Frame(kind=GROUP_NOTICE, sender=self._ctx.name, round=self._seq, step=round_index, meta=meta)
        await self._ctx.exchange.broadcast(notice, peers)

    def abandon(self, round_index: int, epoch: int) -> None:
        """No member applies attempt ``epoch`` of this round: say so in every later notice of it."""
        if self.aborted_round != round_index:
            self.aborted_round, self.aborted = round_index, []
        if epoch not in self.aborted:
            self.aborted.append(epoch)

    async def decide(self, round_index: int, group: Group, *, full: bool) -> int:
        """Decide the attempt after its all-gather (PROTOCOL.md §11.4): COMMIT or ABORT, the same
        for every member. ``full``: every member's all-gather chunk arrived here.

        A member that is not full and learns COMMIT raises Behind with the members that applied
        it (it downloads the result). Behind too when a peer is past this round while undecided;
        QuorumLostError when nothing is decided for ``quorum_timeout`` seconds.
        """
        decision = Decision(self._ctx.name, round_index, group, self._agreement.prev, self._quorum, full=full)
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + self._round_deadline()
        down_since: dict[str, float] = {}
        announced: Vote | None = None
        announced_at = began
        while True:
            self.read(round_index, group, act=False)
            seen = self._agreement.seen
            now = loop.time()
            silent = decision.silent(seen)
            lost = self.lost(silent, round_index, group, down_since, now)[0] if silent else []
            recover = not full or bool(lost) or now >= deadline or decision.contested(seen)
            verdict = decision.update(seen, lost, recover=recover)
            if decision.vote != announced or now - announced_at >= _WAIT_NOTICE_EVERY:
                # Before acting on the verdict too: the others may need this vote to reach it.
                announced, announced_at = decision.vote, now
                await self.notify(round_index, group, "rs", vote=decision.vote)
            if verdict == COMMIT and full:
                unanimous = decision.unanimous(seen)
                self.decisions["unanimous" if unanimous else "commit"] += 1
                if not unanimous:
                    self.post_commit = round_index + 1
                return COMMIT
            if verdict == COMMIT and decision.witnesses:
                self.decisions["commit_elsewhere"] += 1
                raise Behind(decision.witnesses)
            if verdict == ABORT:
                self.decisions["abort"] += 1
                self.abandon(round_index, group.epoch)
                return ABORT
            ahead = self._agreement.ahead(round_index) if verdict is None else []
            if ahead:
                self.decisions["left_behind"] += 1
                raise Behind(ahead)
            if now - began >= self._quorum_timeout:
                self.decisions["undecided"] += 1
                raise QuorumLostError(round_index, silent, group.size, decision.quorum, now - began)
            await self._ctx.exchange.wait_for_senders(GROUP_NOTICE, self._peers(), 1, LOOK_EVERY)

    def read(self, round_index: int, group: Group, *, act: bool) -> Group | None:
        """Take the peers' latest notices; with ``act``, raise Behind when this peer is behind and
        return a higher proposal that includes it (to adopt), if any.

        The members of ``group`` are read even once they left: a member that finished last voted
        (or announced the next round) just before it left, and this peer's decision needs that.
        """
        me = self._ctx.name
        for sender in dict.fromkeys([*self._peers(), *(m for m in group.members if m != me)]):
            frame = self._ctx.exchange.take_latest(GROUP_NOTICE, sender)
            if frame is None:
                continue
            try:
                self._agreement.observe(sender, parse_notice(frame.meta))
            except FrameError:
                self.bad_notices += 1
        if not act:
            return None
        ahead = self._agreement.ahead(round_index)
        if ahead:
            raise Behind(ahead)
        return self._agreement.higher(round_index, group)

    def lost(
        self, pending: Sequence[str], round_index: int, group: Group, down_since: dict[str, float], now: float
    ) -> tuple[list[str], str]:
        """Pending members whose frames for this attempt will not come, and why (PROTOCOL.md §11.3).

        The attempt ends as soon as one is known lost instead of at the deadline: a member that
        left or that the membership declared dead; one whose link has been down for
        :data:`_LINK_GRACE` seconds (a crashed process closes its sockets at once, long before its
        heartbeats are missed, and a restarted one may come back before they are); one that is
        resyncing or that another member of the group has given up on (:meth:`Agreement.given_up`).
        Ending an attempt early is always safe (§11.4): it costs at most a redo.
        """
        live = self._live()
        gone = [n for n in pending if n not in live]
        if gone:
            return gone, f"not_live: {','.join(gone)}"
        exchange = self._ctx.exchange
        for name in pending:
            if exchange.is_connected(name):
                down_since.pop(name, None)
            else:
                down_since.setdefault(name, now)
        cut = [n for n in pending if n in down_since and now - down_since[n] >= _LINK_GRACE]
        if cut:
            return cut, f"link_down: {','.join(cut)}"
        given_up = self._agreement.given_up(round_index, group, pending)
        if given_up:
            return given_up, f"given_up: {','.join(given_up)}"
        return [], ""

    async def wait_for_quorum(self, round_index: int, group: Group, since: float) -> Group | None:
        """Below quorum: announce, listen for a while; a higher proposal to adopt, if one came."""
        waited = time.monotonic() - since
        if waited >= self._quorum_timeout:
            missing = self._agreement.missing_from(group)
            raise QuorumLostError(round_index, missing, group.size, self._quorum, waited)
        await self.notify(round_index, group, "wait")
        await self._ctx.exchange.wait_for_senders(GROUP_NOTICE, self._peers(), 1, _WAIT_NOTICE_EVERY)
        return self.read(round_index, group, act=True)

    def record_applied(self, round_index: int, epoch: int) -> None:
        runs = self.applied_epochs
        if runs and runs[-1][2] == epoch and runs[-1][1] == round_index - 1:
            runs[-1][1] = round_index
        else:
            runs.append([round_index, round_index, epoch])
            del runs[:-_APPLIED_RUNS]
