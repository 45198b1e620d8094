"""Group epochs of exact rounds (p2pdl.core.groups): proposals, quorum, tags and the agreement rules."""

from __future__ import annotations

import pytest

from p2pdl.core.groups import (
    EPOCH_SPAN,
    Agreement,
    Group,
    Notice,
    donor_group,
    group_meta,
    ordered,
    parse_notice,
    proposal_key,
    quorum,
    wire_round,
)
from p2pdl.errors import FrameSchemaError


def test_the_default_quorum_is_a_strict_majority_and_two_majorities_always_intersect() -> None:
    assert [quorum(n, 0) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 2, 3, 3, 5]
    assert quorum(4, 2) == 2  # settable
    for configured in range(1, 12):
        need = quorum(configured, 0)
        assert 2 * need > configured  # no partition can give both sides a quorum


def test_proposals_are_totally_ordered_by_epoch_then_size_then_names() -> None:
    small = Group(3, ("a", "b", "c"))
    large = Group(3, ("a", "b", "c", "d"))
    later = Group(4, ("a", "b"))
    other = Group(3, ("a", "b", "e"))
    assert sorted([later, other, large, small], key=proposal_key) == [small, other, large, later]
    assert len({proposal_key(g) for g in (small, large, later, other)}) == 4


def test_each_attempt_has_its_own_wire_round_after_the_earlier_ones() -> None:
    assert wire_round(7, 0) < wire_round(7, 1) < wire_round(7, EPOCH_SPAN - 1) < wire_round(8, 0)
    with pytest.raises(ValueError, match="epoch"):
        Group(EPOCH_SPAN, ("a",))


def test_tags_round_trip_and_bad_tags_are_refused() -> None:
    group = Group(5, ("p0", "p2", "p10"))
    notice = parse_notice(group_meta(12, group, 4, "rs"))
    assert (notice.round, notice.group, notice.prev, notice.phase) == (12, group, 4, "rs")
    good = group_meta(12, group, 4, "wait")
    for key, value in [
        ("xr", -1),
        ("xr", "12"),
        ("epoch", EPOCH_SPAN),
        ("epoch", True),
        ("group", ""),
        ("group", "p0,p0"),
        ("group", "p0,bad name"),
        ("group", "x" * 300),
        ("prev", -2),
        ("phase", "done"),
    ]:
        with pytest.raises(FrameSchemaError):
            parse_notice({**good, key: value})
    with pytest.raises(FrameSchemaError):
        parse_notice({k: v for k, v in good.items() if k != "group"})


def test_ordered_follows_the_agreed_order_then_names() -> None:
    assert ordered(["p4", "p1", "p0", "j"], ["p0", "p1", "p2"]) == ("p0", "p1", "j", "p4")


PEERS = ("a", "b", "c", "d")


def notice(round_index: int, epoch: int, members: str, prev: int = -1) -> Notice:
    return Notice(round=round_index, group=Group(epoch, tuple(members.split(","))), prev=prev, phase="rs")


def test_an_all_gather_aborter_keeps_the_completers_in_its_redo_and_learns_it_is_behind() -> None:
    """The classic case: d dies after sending its all-gather chunk to c only. a aborts; its redo
    group keeps c (whose chunk arrived), so it can never complete R without c; c's notice for
    R + 1 tells a it is behind."""
    a = Agreement("a", PEERS, PEERS)
    first = a.propose(5, PEERS, None)
    assert first == a.agreed == Group(0, PEERS)
    a.missed(["d"])  # the only all-gather chunk a did not get
    redo = a.propose(5, PEERS, first)
    assert redo == Group(1, ("a", "b", "c"))
    assert a.ahead(5) == []
    a.observe("c", notice(6, 0, "a,b,c,d", prev=0))  # c completed R over the first group
    assert a.ahead(5) == ["c"]


def test_a_peer_that_kept_a_losing_average_sees_a_later_prev_and_is_behind() -> None:
    a = Agreement("a", PEERS, PEERS)
    a.applied(Group(3, ("a", "b", "c", "d")))
    a.observe("b", notice(6, 4, "b,c,d", prev=4))  # b, c, d redid round 5 over epoch 4
    assert a.ahead(6) == ["b"]
    a.observe("c", notice(6, 4, "b,c,d", prev=3))
    assert a.ahead(6) == ["b"]  # c's history is a's own: not ahead


def test_the_greatest_proposal_that_includes_this_peer_is_adopted_only_for_its_round_and_history() -> None:
    a = Agreement("a", PEERS, PEERS)
    mine = Group(2, ("a", "b", "c"))
    a.observe("b", notice(7, 3, "a,b,c,d"))
    a.observe("c", notice(7, 4, "b,c,d"))  # greater, but without a
    a.observe("d", notice(6, 9, "a,d"))  # another round
    assert a.higher(7, mine) == Group(3, PEERS)
    assert a.higher(7, Group(3, PEERS)) is None
    a.observe("b", notice(7, 5, "a,b,c,d", prev=2))  # another history: never adopted
    assert a.higher(7, mine) is None


def test_a_proposal_with_a_member_this_peer_found_missing_is_not_adopted() -> None:
    a = Agreement("a", PEERS, PEERS)
    a.missed(["d"])  # d's link went down during a's attempt
    a.observe("b", notice(7, 3, "a,b,c,d"))  # b has not noticed yet
    assert a.higher(7, Group(2, ("a", "b", "c"))) is None
    redo = a.propose(7, PEERS, Group(2, ("a", "b", "c", "d")))
    assert redo == Group(4, ("a", "b", "c"))  # above b's epoch: b gives d up on reading it
    assert Agreement("b", PEERS, PEERS).given_up(7, Group(3, PEERS), ["d"]) == []
    b = Agreement("b", PEERS, PEERS)
    b.observe("a", Notice(round=7, group=redo, prev=-1, phase="rs"))
    assert b.given_up(7, Group(3, PEERS), ["c", "d"]) == ["d"]


def test_a_suspect_is_left_out_until_it_announces_and_a_joiner_is_in_once_it_announces_this_round() -> None:
    a = Agreement("a", PEERS, PEERS)
    live = (*PEERS, "e")
    a.missed(["b"])
    assert a.propose(3, live, Group(0, PEERS)) == Group(1, ("a", "c", "d"))
    a.observe("b", notice(3, 0, "a,b,c,d"))  # b is back: a member of the agreed group
    a.observe("e", notice(0, 0, "e"))  # a new peer announced itself, far behind: it resyncs first
    assert a.propose(3, live, None).members == PEERS
    a.observe("e", notice(3, 2, "a,b,c,d,e"))  # e resynced and announces round 3 after a's history
    assert a.propose(3, live, None).members == live
    assert a.missing_from(Group(1, ("a", "c"))) == ["b", "d"]


def test_a_joiner_behind_the_round_or_on_an_older_history_is_not_proposed() -> None:
    """A restarted, thawed or left-out peer is proposed only once it has caught up: the group
    never waits for its download (docs/PROTOCOL.md §11.3 step 1, §11.5)."""
    a = Agreement("a", PEERS, ("a", "b", "c"))
    a.applied(Group(5, ("a", "b", "c")))  # d was left out of the last round
    a.observe("d", notice(8, 5, "a,b,c,d", prev=-1))  # restarted from a checkpoint: no history
    assert not a.eligible("d", 9)
    a.observe("d", notice(9, 6, "a,b,c,d", prev=4))  # this round, but an older history
    assert not a.eligible("d", 9)
    assert a.propose(9, PEERS, None) == Group(5, ("a", "b", "c"))
    a.observe("d", notice(9, 6, "a,b,c,d", prev=5))  # caught up: same round, same history
    assert a.eligible("d", 9)
    assert a.propose(9, PEERS, None) == Group(7, PEERS)  # above the epoch 6 seen for round 9


def test_a_resyncing_peer_is_not_proposed_or_adopted_until_it_announces_again() -> None:
    a = Agreement("a", PEERS, PEERS)
    syncing = Notice(round=4, group=Group(3, PEERS), prev=-1, phase="sync")
    a.observe("b", syncing)
    assert not a.eligible("b", 4)  # a member of the agreed group, but downloading a state
    assert a.propose(4, PEERS, None).members == ("a", "c", "d")
    a.observe("c", Notice(round=4, group=Group(7, PEERS), prev=-1, phase="sync"))
    assert a.higher(4, Group(0, PEERS)) is None  # a sync notice is no proposal
    a.observe("b", notice(4, 2, "a,b,c,d"))
    assert a.eligible("b", 4)


def test_a_pending_member_is_given_up_when_it_resyncs_or_another_member_gave_up_on_it() -> None:
    a = Agreement("a", PEERS, PEERS)
    attempt = Group(0, PEERS)
    a.observe("b", notice(4, 0, "a,b,c,d"))
    assert a.given_up(4, attempt, ["c", "d"]) == []
    a.observe("b", notice(4, 1, "a,b,c"))  # b found d missing and proposes without it
    assert a.given_up(4, attempt, ["c", "d"]) == ["d"]
    a.observe("e", notice(4, 9, "a,e"))  # not a member of the attempt: no evidence
    assert a.given_up(4, attempt, ["c"]) == []
    a.observe("b", notice(4, 2, "a,b", prev=3))  # another history: no evidence
    assert a.given_up(4, attempt, ["c", "d"]) == []
    a.observe("c", Notice(round=2, group=Group(0, PEERS), prev=-1, phase="sync"))
    assert a.given_up(4, attempt, ["c", "d"]) == ["c"]


def test_every_pending_member_is_given_up_once_a_member_lists_the_attempt_as_aborted() -> None:
    """The stall found by the chaos-recovery test: b adopted a greater proposal (including
    everyone) in its reduce-scatter, so its all-gather chunk for epoch 1 never comes; a, already
    in its all-gather, learns that from b's ``no`` instead of waiting out its deadline."""
    a = Agreement("a", PEERS, PEERS)
    attempt = Group(1, ("a", "b", "d"))
    adopted = Group(2, PEERS)
    a.observe("b", Notice(round=4, group=adopted, prev=-1, phase="rs"))
    assert a.given_up(4, attempt, ["b"]) == []  # a greater proposal with b in it says nothing
    a.observe("b", Notice(round=4, group=adopted, prev=-1, phase="rs", aborted=(1,)))
    assert a.given_up(4, attempt, ["b", "d"]) == ["b", "d"]
    assert a.given_up(4, Group(0, ("a", "b", "d")), ["b"]) == []  # another epoch
    a.observe("b", Notice(round=4, group=adopted, prev=3, phase="rs", aborted=(1,)))
    assert a.given_up(4, attempt, ["b"]) == []  # another history


def test_waiting_below_quorum_keeps_its_epoch_until_the_members_change() -> None:
    a = Agreement("a", PEERS, PEERS)
    a.missed(["b", "c", "d"])
    alone = a.propose(4, PEERS, Group(0, PEERS))
    assert alone == Group(1, ("a",)) and alone.size < quorum(len(PEERS), 0)
    assert a.propose(4, PEERS, alone, waited=True) == alone
    a.observe("c", notice(4, 1, "b,c,d"))
    grown = a.propose(4, PEERS, alone, waited=True)
    assert grown.members == ("a", "c") and grown.epoch == 2


def test_a_donor_group_is_taken_only_when_valid() -> None:
    good = {"xr_epoch": 4, "xr_group": "a,b,c", "xr_prev": 3}
    assert donor_group(good) == (Group(4, ("a", "b", "c")), 3)
    for bad in ({}, {**good, "xr_epoch": True}, {**good, "xr_group": "a,a"}, {**good, "xr_prev": -5}):
        assert donor_group(bad) is None
    a = Agreement("a", PEERS, PEERS)
    a.missed(["d"])
    a.observe("b", notice(9, 4, "a,b,c"))
    a.observe("c", notice(8, 4, "a,b,c"))
    a.take_history(Group(4, ("a", "b", "c")), 3)
    a.keep_notices_for(9)
    assert (a.agreed, a.prev, a.suspects, set(a.seen)) == (Group(4, ("a", "b", "c")), 3, set(), {"b"})
