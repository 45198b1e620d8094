"""p2pdl.tasks: the one owner of background tasks, and reaping them without losing a cancel."""

from __future__ import annotations

import asyncio

import pytest

from p2pdl.errors import TransportError
from p2pdl.tasks import TaskOwner, reap


async def test_an_owner_names_its_tasks_forgets_finished_ones_and_cancels_the_rest() -> None:
    owner = TaskOwner("peer")
    done = owner.spawn(asyncio.sleep(0), "quick")
    hanging = owner.spawn(asyncio.sleep(3600), "hanging")
    assert hanging.get_name() == "peer:hanging"
    await done
    await asyncio.sleep(0)
    assert len(owner) == 1
    await owner.cancel_all(1.0)
    assert hanging.cancelled() and len(owner) == 0


async def test_a_task_that_ignores_its_cancel_does_not_hang_the_owner() -> None:
    owner = TaskOwner("peer")
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = owner.spawn(stubborn(), "stubborn")
    await asyncio.sleep(0)
    await owner.cancel_all(0.05)  # returns after its bound although the task lives on
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait([task])


async def test_reap_accepts_cancelled_and_expected_failures_and_raises_others() -> None:
    async def fail(error: BaseException) -> None:
        raise error

    cancelled = asyncio.ensure_future(asyncio.sleep(3600))
    expected = asyncio.ensure_future(fail(TransportError("link gone")))
    cancelled.cancel()
    await reap([cancelled, expected], expected=(TransportError,))
    unexpected = asyncio.ensure_future(fail(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        await reap([unexpected], expected=(TransportError,))


async def test_reap_lets_its_callers_own_cancellation_through() -> None:
    slow = asyncio.ensure_future(asyncio.sleep(3600))
    reaper = asyncio.ensure_future(reap([slow]))
    await asyncio.sleep(0.01)
    reaper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reaper
    slow.cancel()
    await asyncio.wait([slow])
