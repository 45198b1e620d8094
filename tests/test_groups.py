"""Group epochs of exact rounds (p2pdl.core.groups): the order of proposals, the quorum and the tags."""

from __future__ import annotations

import pytest

from p2pdl.core.groups import (
    EPOCH_SPAN,
    Group,
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
