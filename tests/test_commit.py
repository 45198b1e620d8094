"""The decision after an all-gather (p2pdl/core/commit.py, docs/PROTOCOL.md §11.4).

Pure logic on simulated notices: every member's latest notice reaches the others in any order, or
not at all, members freeze and crash, and no two members ever decide differently; with a majority
up and talking, every member that is up decides.
"""

from __future__ import annotations

import random

import pytest

from p2pdl.core.commit import BALLOT_SPAN, Decision, decision_quorum
from p2pdl.core.groups import ABORT, COMMIT, NONE, Group, Notice, Vote, group_meta, parse_notice, parse_vote
from p2pdl.errors import FrameSchemaError

ROUND, PREV = 7, 3
GROUP = Group(5, ("a", "b", "c", "d"))


def notice(decision: Decision, *, round_index: int = ROUND, prev: int = PREV) -> Notice:
    return Notice(round=round_index, group=decision.group, prev=prev, phase="rs", vote=decision.vote)


def members(full: dict[str, bool], group: Group = GROUP, quorum: int = 3) -> dict[str, Decision]:
    return {n: Decision(n, ROUND, group, PREV, quorum, full=full[n]) for n in group.members}


def test_the_decision_quorum_is_a_majority_of_the_group_or_min_peers_if_larger() -> None:
    assert [decision_quorum(n, 3) for n in (2, 3, 4, 5, 6, 7)] == [2, 3, 3, 3, 4, 4]
    assert decision_quorum(2, 1) == 2  # a group of two decides only together
    assert decision_quorum(4, 0) == 3


def test_votes_round_trip_and_bad_ones_are_refused() -> None:
    vote = Vote(5, 257, 257, COMMIT, 257, COMMIT)
    meta = group_meta(ROUND, GROUP, PREV, "rs", vote=vote, aborted=[2, 4])
    parsed = parse_notice(meta)
    assert parsed.vote == vote and parsed.aborted == (2, 4)
    assert parse_notice(group_meta(ROUND, GROUP, PREV, "rs")).vote is None
    bad_votes = ("5,0,0,1", "5,0,0,2,-1,-1", "5,0,1,1,-1,-1", "5,0,-1,1,-1,-1", "x", "5,0,0,01,-1,-1")
    for bad in (*bad_votes, [5, 0, 0, 1, -1, -1], "5,0,0,1,-1,-2", "5,0,0,1,-1," + "9" * 20):
        with pytest.raises(FrameSchemaError, match="'cm'"):
            parse_vote(bad)
    for bad_no in ("", [1], "-1", ",".join(["1"] * 17), "1,x", True):
        with pytest.raises(FrameSchemaError, match="'no'"):
            parse_notice({**meta, "no": bad_no})


def test_a_fault_free_round_commits_in_ballot_zero_and_is_unanimous() -> None:
    group = members(dict.fromkeys(GROUP.members, True))
    notices = {n: notice(d) for n, d in group.items()}
    for name, decision in group.items():
        others = {n: v for n, v in notices.items() if n != name}
        assert decision.update(others, [], recover=False) == COMMIT
        assert decision.unanimous(others) and not decision.contested(others)


def test_three_full_members_commit_without_a_frozen_fourth() -> None:
    group = members({"a": True, "b": True, "c": True, "d": True})
    notices = {n: notice(group[n]) for n in ("a", "b", "c")}
    assert group["a"].update({n: notices[n] for n in ("b", "c")}, [], recover=False) == COMMIT
    assert group["a"].silent(notices) == ["d"]


def test_a_thawed_full_member_does_not_apply_what_the_others_aborted_without_it() -> None:
    """The split brain of issue 12: d froze before its all-gather chunk reached anyone; it thaws
    with every chunk buffered (full), while the three others, not full, decided without it."""
    group = members({"a": False, "b": False, "c": False, "d": True})
    live = ("a", "b", "c")
    decided: dict[str, int | None] = dict.fromkeys(live)
    for _ in range(6):  # a few exchanges of notices among the three
        notices = {n: notice(group[n]) for n in live}
        for name in live:
            others = {n: v for n, v in notices.items() if n != name}
            decided[name] = decided[name] or group[name].update(others, ["d"], recover=True)
    assert set(decided.values()) == {ABORT}
    # d thaws: it had accepted COMMIT in ballot 0, but three promised a later ballot first.
    thawed = group["d"].update({n: notice(group[n]) for n in live}, [], recover=False)
    assert thawed == ABORT


def test_a_member_that_missed_a_chunk_learns_commit_from_a_full_one_and_who_applied_it() -> None:
    """d crashed mid-send: a and b got its chunk (full), c did not; the three decide COMMIT."""
    group = members({"a": True, "b": True, "c": False, "d": False})
    live = ("a", "b", "c")
    decided: dict[str, int | None] = dict.fromkeys(live)
    for _ in range(6):
        notices = {n: notice(group[n]) for n in live}
        for name in live:
            others = {n: v for n, v in notices.items() if n != name}
            recover = not group[name].full or group[name].contested(others)
            decided[name] = decided[name] or group[name].update(others, ["d"], recover=recover)
    assert set(decided.values()) == {COMMIT}
    # a applied it and announces the next round after it: c downloads from a.
    applied = Notice(round=ROUND + 1, group=GROUP, prev=GROUP.epoch, phase="rs")
    assert group["c"].update({"a": applied}, ["d"], recover=True) == COMMIT
    assert group["c"].witnesses == ["a"]


def test_an_epoch_listed_as_aborted_is_aborted_and_a_restarted_peer_proves_nothing() -> None:
    decision = Decision("a", ROUND, GROUP, PREV, 3, full=True)
    redo = Group(9, ("a", "b", "c"))
    # A restarted member proposing a later epoch of the round says nothing about this attempt...
    restarted = Notice(round=ROUND, group=redo, prev=PREV, phase="rs")
    assert decision.update({"d": restarted}, [], recover=False) is None
    # ...one that left it before its all-gather chunk went out (or learnt ABORT) says so.
    left = Notice(round=ROUND, group=redo, prev=PREV, phase="rs", aborted=(4, GROUP.epoch))
    assert decision.update({"d": left}, [], recover=False) == ABORT
    # Another history's notice (a different prev) is not evidence.
    other = Notice(round=ROUND, group=redo, prev=PREV + 1, phase="rs", aborted=(GROUP.epoch,))
    assert Decision("a", ROUND, GROUP, PREV, 3, full=True).update({"d": other}, [], recover=False) is None


def test_recovery_ballots_are_unique_per_member_and_above_every_ballot_seen() -> None:
    group = members({"a": False, "b": False, "c": False, "d": False})
    group["a"].update({}, [], recover=True)
    assert group["a"].vote.ballot == BALLOT_SPAN + 1 and group["a"].vote.proposed == NONE
    # b leads only once a is lost, and outbids a's ballot.
    assert group["b"].update({"a": notice(group["a"])}, [], recover=True) is None
    assert group["b"].vote.promised == BALLOT_SPAN + 1 and group["b"].vote.ballot == NONE  # a leads
    assert group["b"].update({"a": notice(group["a"])}, ["a"], recover=True) is None
    assert group["b"].vote.ballot == 2 * BALLOT_SPAN + 2 == group["b"].vote.promised


@pytest.mark.parametrize("seed", range(300))
def test_no_two_members_ever_decide_differently(seed: int) -> None:
    """Random full/not-full members, random delivery of latest notices (delayed, reordered,
    dropped), freezes and crashes: every decision agrees; a majority that talks decides."""
    rng = random.Random(seed)
    size = rng.choice([2, 3, 4, 5, 6])
    group = Group(5, tuple(f"p{i}" for i in range(size)))
    quorum = rng.choice([0, size // 2 + 1])
    # Full members exist only if every member's chunk went out: sometimes none is full.
    any_full = rng.random() < 0.7
    full = {n: any_full and rng.random() < 0.6 for n in group.members}
    deciders = {n: Decision(n, ROUND, group, PREV, quorum, full=full[n]) for n in group.members}
    q = deciders[group.members[0]].quorum
    crashed = set(rng.sample(group.members, rng.randint(0, size - q)))
    crash_at = {n: rng.randint(0, 3) for n in crashed}
    frozen = {n: rng.randint(0, 40) for n in group.members if n not in crashed and rng.random() < 0.3}
    views: dict[str, dict[str, Notice]] = {n: {} for n in group.members}  # what each has received
    published = {n: notice(deciders[n]) for n in group.members}  # each one's latest notice
    decided: dict[str, int] = {}
    for tick in range(400):
        for name in group.members:
            if (name in crashed and tick > crash_at[name]) or frozen.get(name, -1) > tick or name in decided:
                continue
            decision = deciders[name]
            lost = [n for n in group.members if n in crashed or frozen.get(n, -1) > tick]
            recover = not decision.full or tick > 20 or decision.contested(views[name]) or bool(lost)
            verdict = decision.update(views[name], lost, recover=recover)
            published[name] = notice(decision)
            if verdict is not None:
                assert decided.setdefault(name, verdict) == verdict
                # What the strategy announces next: the next round after applying it, or a
                # redo of this round that lists it as aborted.
                published[name] = (
                    Notice(round=ROUND + 1, group=group, prev=group.epoch, phase="rs")
                    if verdict == COMMIT
                    else Notice(round=ROUND, group=Group(6, group.members), prev=PREV, phase="rs", aborted=(5,))
                )
        for sender in group.members:  # delivery: each latest notice reaches each peer with p = 0.5
            if sender in crashed and tick > crash_at[sender]:
                continue
            for receiver in group.members:
                if receiver != sender and rng.random() < 0.5:
                    views[receiver][sender] = published[sender]
        if len(set(decided.values())) > 1:
            break
    assert len(set(decided.values())) <= 1, (decided, full, crashed, frozen)
    if COMMIT in decided.values():
        assert any(full.values())
    up = [n for n in group.members if n not in crashed]
    assert all(n in decided for n in up), (decided, full, crashed, frozen, q)
