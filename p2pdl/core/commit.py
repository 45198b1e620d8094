"""Deciding an exact round after its all-gather: every member applies it, or none does.

An attempt's all-gather can end differently at different members: one receives every member's
averaged chunk (it is *full*), another misses one (a member crashed or froze mid-send, a link
dropped). If the full one applied its result while the other redid the round over a smaller group,
two peers would hold averages over different groups for the same round (a split brain, however
short). So no member applies an attempt until the members have *decided* it, by a single-decree
Paxos over their group notices (docs/PROTOCOL.md §11.4):

* the value is ``COMMIT`` (apply the all-gather's result) or ``ABORT`` (redo the round);
* ballot 0 belongs to the all-gather itself: a full member accepts ``COMMIT`` in it as soon as it
  has every chunk, so in a round without faults the decision costs one notice per member;
* a member that is not full, or a full one that waits on a lost member, runs recovery ballots
  ``k * BALLOT_SPAN + rank + 1``: the prepare/promise, then accept, phases of Paxos. The value
  proposed is the one accepted in the highest ballot among a quorum of promises, else ``ABORT``;
* a value is decided once a quorum of the group accepted it in one ballot. The quorum is a strict
  majority of the attempt's group (or ``min_peers`` if larger), so any two quorums intersect.

Every member's acceptor state (and its proposal, if it runs one) rides in its notices' ``cm``
meta; a notice is the latest state of its sender, and an acceptor's state only grows, so reading
the latest notices is reading the promises and accepts. Two facts shortcut the vote: a member that
announces the next round with this attempt's epoch as ``prev`` has applied it (``COMMIT``); a
member that lists the attempt's epoch in its notices' ``no`` has learnt ``ABORT``, or left the
attempt before sending its all-gather chunk, when no member can ever be full (``ABORT``).

Pure logic, no I/O: :mod:`p2pdl.strategies.allreduce` feeds it the notices and sends its votes.
Trade-off: a fault-free round waits for a quorum of the members' notices after its all-gather
(about one notice latency) before it applies, where it could apply at once; that wait is what
makes a frozen or cut-off member unable to apply an attempt that the others abandoned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import replace

from p2pdl.core.groups import ABORT, COMMIT, NONE, Group, Notice, Vote

BALLOT_SPAN = 256  # recovery ballots are k * BALLOT_SPAN + rank + 1: unique per member (rank < 255)


def decision_quorum(size: int, quorum: int) -> int:
    """Accepts that decide an attempt of ``size`` members: a strict majority, or ``quorum`` if larger
    (capped at ``size``). Any two such sets of one group intersect."""
    return min(size, max(quorum, size // 2 + 1))


class Decision:
    """One member's side of the decision of one attempt: its acceptor and proposer state.

    ``full``: this member received every all-gather chunk (it accepts ``COMMIT`` in ballot 0).
    """

    def __init__(self, me: str, round_index: int, group: Group, prev: int, quorum: int, *, full: bool) -> None:
        self.me, self.round, self.group, self.prev = me, round_index, group, prev
        self.rank = group.members.index(me)
        self.quorum = decision_quorum(group.size, quorum)
        self.full = full
        self.vote = Vote(group.epoch, 0, 0, COMMIT) if full else Vote(group.epoch)
        self.witnesses: list[str] = []  # members seen in the next round after applying this attempt

    def _votes(self, notices: Mapping[str, Notice]) -> dict[str, Vote]:
        """The members' latest votes on this attempt (this member's own included)."""
        votes = {self.me: self.vote}
        for name in self.group.members:
            notice = notices.get(name)
            if (
                name != self.me
                and notice is not None
                and notice.vote is not None
                and notice.round == self.round
                and notice.vote.epoch == self.group.epoch
                and notice.group == self.group
            ):
                votes[name] = notice.vote
        return votes

    def silent(self, notices: Mapping[str, Notice]) -> list[str]:
        """Members whose vote on this attempt has not been heard."""
        votes = self._votes(notices)
        return [n for n in self.group.members if n not in votes]

    def contested(self, notices: Mapping[str, Notice]) -> bool:
        """Some member is not full, or runs a recovery ballot: every member then helps decide."""
        return any(v.value != COMMIT or v.accepted != 0 or v.ballot != NONE for v in self._votes(notices).values())

    def unanimous(self, notices: Mapping[str, Notice]) -> bool:
        """Every member accepted COMMIT in ballot 0 (so none waits for a member to download from)."""
        votes = self._votes(notices)
        return len(votes) == self.group.size and not self.contested(notices)

    def left(self, notices: Mapping[str, Notice]) -> int | None:
        """COMMIT or ABORT when a member's notice shows it left the attempt (see the module doc)."""
        epoch = self.group.epoch
        self.witnesses = [
            name
            for name in self.group.members
            if name != self.me
            and (notice := notices.get(name)) is not None
            and notice.phase != "sync"
            and notice.round == self.round + 1
            and notice.prev == epoch
        ]
        if self.witnesses:
            return COMMIT
        for notice in notices.values():
            if notice.round == self.round and notice.prev == self.prev and epoch in notice.aborted:
                return ABORT
        return None

    def update(self, notices: Mapping[str, Notice], lost: Collection[str], *, recover: bool) -> int | None:
        """Take the members' latest notices: act as their acceptor, run this member's recovery
        proposal when ``recover``, and return the decided value (None while undecided).

        ``lost``: members known gone (their votes will not come); they cannot lead a recovery.
        """
        known = self.left(notices)
        if known is not None:
            return known
        votes = self._votes(notices)
        # Acceptor: answer the members' proposals in ballot order.
        for other in sorted((v for n, v in votes.items() if n != self.me and v.ballot > 0), key=lambda v: v.ballot):
            mine = self.vote
            if other.proposed == NONE and other.ballot > mine.promised:
                self.vote = replace(mine, promised=other.ballot)
            elif other.proposed != NONE and other.ballot >= mine.promised:
                self.vote = replace(mine, promised=other.ballot, accepted=other.ballot, value=other.proposed)
        votes[self.me] = self.vote
        decided = self._decided(votes)
        if decided is not None or not recover:
            return decided
        self._propose(votes, lost)
        votes[self.me] = self.vote
        return self._decided(votes)

    def _decided(self, votes: Mapping[str, Vote]) -> int | None:
        tally = Counter((v.accepted, v.value) for v in votes.values() if v.accepted != NONE)
        for (_, value), count in tally.items():
            if count >= self.quorum:
                return value
        return None

    def _propose(self, votes: Mapping[str, Vote], lost: Collection[str]) -> None:
        """Recovery (Paxos phases 1 and 2) led by the first member in rank order still voting."""
        leaders = [n for n in self.group.members if n == self.me or (n in votes and n not in lost)]
        if leaders[0] != self.me:
            return
        mine = self.vote
        highest = max(max(v.promised, v.accepted, v.ballot) for v in votes.values())
        if mine.ballot == NONE or any(v.promised > mine.ballot for v in votes.values()):
            ballot = (max(highest, 0) // BALLOT_SPAN + 1) * BALLOT_SPAN + self.rank + 1
            self.vote = mine = replace(mine, promised=ballot, ballot=ballot, proposed=NONE)
        if mine.proposed != NONE:
            return
        promises = [v for n, v in votes.items() if n != self.me and v.promised == mine.ballot] + [mine]
        if len(promises) < self.quorum:
            return
        accepted = [v for v in promises if v.accepted != NONE]
        value = max(accepted, key=lambda v: v.accepted).value if accepted else ABORT
        self.vote = replace(mine, accepted=mine.ballot, value=value, proposed=value)
