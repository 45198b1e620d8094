"""The mailbox: frames by (kind, round, sender), late frames refused, a leaver's sent frames kept."""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2pdl.errors import InboxFullError, StaleFrameError
from p2pdl.net.mailbox import Mailbox
from p2pdl.wire import Frame


def frame(sender: str, round_index: int, kind: str = "grad") -> Frame:
    return Frame(kind=kind, sender=sender, round=round_index, step=round_index)


async def test_a_frame_sent_before_its_sender_left_still_counts() -> None:
    """The peer that finishes first leaves while the others still collect what it sent them."""
    mailbox = Mailbox(per_sender_limit=4)
    mailbox.put(frame("b", 7))
    mailbox.mark_gone("b")
    arrived = await mailbox.collect("grad", 7, ["b"], timeout=30.0)
    assert set(arrived) == {"b"} and arrived["b"].round == 7


async def test_a_sender_that_left_without_sending_is_not_waited_for() -> None:
    mailbox = Mailbox(per_sender_limit=4)
    mailbox.put(frame("a", 3))
    mailbox.mark_gone("b")
    async with asyncio.timeout(5.0):  # far below the collect's own timeout: b is not awaited
        arrived = await mailbox.collect("grad", 3, ["a", "b"], timeout=600.0)
    assert set(arrived) == {"a"}


async def test_leaving_wakes_a_collect_waiting_on_the_leaver() -> None:
    mailbox = Mailbox(per_sender_limit=4)
    collecting = asyncio.create_task(mailbox.collect("grad", 1, ["b"], timeout=600.0))
    await asyncio.sleep(0)
    mailbox.mark_gone("b")
    async with asyncio.timeout(5.0):
        assert await collecting == {}


async def test_late_and_duplicate_frames_are_refused() -> None:
    mailbox = Mailbox(per_sender_limit=4)
    mailbox.put(frame("a", 5))
    with pytest.raises(StaleFrameError, match="duplicate"):
        mailbox.put(frame("a", 5))
    assert set(await mailbox.collect("grad", 5, ["a"], timeout=1.0)) == {"a"}
    mailbox.advance("grad", 6)
    with pytest.raises(StaleFrameError, match="after the round closed"):
        mailbox.put(frame("a", 5))


async def test_a_sender_far_ahead_supersedes_its_oldest_frame_of_the_kind() -> None:
    mailbox = Mailbox(per_sender_limit=2)
    mailbox.put(frame("a", 1))
    mailbox.put(frame("a", 2))
    mailbox.put(frame("a", 3))  # over the limit: round 1 goes
    assert mailbox.superseded == 1
    assert await mailbox.collect("grad", 1, ["a"], timeout=0.01) == {}
    assert set(await mailbox.collect("grad", 3, ["a"], timeout=1.0)) == {"a"}
    mailbox.put(frame("a", 4, kind="other"))
    with pytest.raises(InboxFullError):  # full, and nothing older of this kind to drop
        mailbox.put(frame("a", 5, kind="third"))


async def test_a_full_sender_of_notices_loses_an_old_notice_not_its_data_frame() -> None:
    """Notices pile up while this peer downloads its state (only the newest counts); a data frame
    that arrives then supersedes the oldest of them instead of being refused (issue 12: a
    restarted peer lost a member's reduce-scatter frame that way, and the round waited for it)."""
    mailbox = Mailbox(per_sender_limit=3)
    for seq in (100, 101, 102):
        mailbox.put(frame("a", seq, kind="xg"))
    mailbox.put(frame("a", 7, kind="rs8"))
    assert mailbox.superseded == 1
    assert set(await mailbox.collect("rs8", 7, ["a"], timeout=1.0)) == {"a"}
    newest = mailbox.take_latest("xg", "a")
    assert newest is not None and newest.round == 102
    # One frame of each kind: nothing is older than a frame of its own kind, so a full sender is refused.
    for kind in ("x", "y", "z"):
        mailbox.put(frame("a", 1, kind=kind))
    with pytest.raises(InboxFullError):
        mailbox.put(frame("a", 1, kind="w"))


async def test_a_full_sender_keeps_its_data_frames_when_no_notice_can_go() -> None:
    """Only notices (frames without tensors) of another kind are replaced: frames with tensors
    of a kind collected round by round are never dropped for another kind's frame."""
    mailbox = Mailbox(per_sender_limit=2)
    for round_index in (1, 2):
        mailbox.put(Frame(kind="rs4", sender="a", round=round_index, step=0, tensors={"x": torch.zeros(1)}))
    with pytest.raises(InboxFullError):
        mailbox.put(frame("a", 9, kind="ag4"))
    assert set(await mailbox.collect("rs4", 1, ["a"], timeout=1.0)) == {"a"}
