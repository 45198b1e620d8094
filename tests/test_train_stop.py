"""A stop request never waits out a round's timeout: the step gets a grace period, then is abandoned."""

from __future__ import annotations

import asyncio

from p2pdl.peer.node import StepResult
from p2pdl.train.loop import _step_unless_stopped


def result(step: int) -> StepResult:
    return StepResult(step=step, loss=0.5, gradient_round=None, parameter_round=None)


async def test_a_step_without_a_stop_runs_to_the_end() -> None:
    async def step() -> StepResult:
        await asyncio.sleep(0.01)
        return result(3)

    assert await _step_unless_stopped(step(), asyncio.Event(), grace=0.1) == result(3)
    assert await _step_unless_stopped(step(), None, grace=0.1) == result(3)


async def test_a_step_that_ends_within_the_grace_counts() -> None:
    stop = asyncio.Event()

    async def step() -> StepResult:
        stop.set()  # the stop arrives mid-step
        await asyncio.sleep(0.05)
        return result(4)

    assert await _step_unless_stopped(step(), stop, grace=5.0) == result(4)


async def test_a_step_stuck_in_a_round_is_abandoned_after_the_grace() -> None:
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def step() -> StepResult:
        try:
            await asyncio.Event().wait()  # a round whose partners never answer
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    asyncio.get_running_loop().call_later(0.05, stop.set)
    async with asyncio.timeout(10):
        assert await _step_unless_stopped(step(), stop, grace=0.1) is None
    assert cancelled.is_set()


async def test_an_error_in_the_step_still_propagates() -> None:
    async def step() -> StepResult:
        raise ValueError("boom")

    try:
        await _step_unless_stopped(step(), asyncio.Event(), grace=0.1)
    except ValueError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the error was swallowed")
