"""The one owner of background tasks: every task a component starts is tracked and reaped.

A component (transport, peer, strategy) holds a :class:`TaskOwner`, starts its background
coroutines through :meth:`TaskOwner.spawn`, and on shutdown calls :meth:`TaskOwner.cancel_all`,
which cancels every task still running and waits for them, bounded by a timeout. There is no
fire-and-forget ``create_task`` anywhere in p2pdl (STYLE rule 6). Finished tasks drop out of
the set on their own, so a long-lived owner does not grow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


async def reap(tasks: Iterable[asyncio.Task[Any]], *, expected: tuple[type[BaseException], ...] = ()) -> None:
    """Wait for ``tasks`` (already cancelled or finishing) and re-raise the first unexpected failure.

    A task's own cancellation and the ``expected`` errors are its normal end. Unlike ``await task``
    under ``suppress(CancelledError)``, a cancellation of the caller itself still propagates.
    """
    pending = list(tasks)
    if not pending:
        return
    await asyncio.wait(pending)
    for task in pending:
        if task.cancelled():
            continue
        error = task.exception()
        if error is not None and not isinstance(error, expected):
            raise error


class TaskOwner:
    """A tracked set of named tasks, cancelled and awaited together."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Start ``coro`` as a task named ``"<prefix>:<name>"`` and keep it until it ends."""
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self._prefix}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def cancel(self) -> list[asyncio.Task[Any]]:
        """Cancel every running task; returns them, for :meth:`wait`."""
        pending = list(self._tasks)
        for task in pending:
            task.cancel()
        return pending

    @staticmethod
    async def wait(tasks: Iterable[asyncio.Task[Any]], timeout: float) -> None:
        """Wait for ``tasks`` to end, at most ``timeout`` seconds.

        The wait is bounded: a task that ignores its cancellation is left behind rather than
        hanging the shutdown. The caller's own cancellation still propagates.
        """
        pending = list(tasks)
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def cancel_all(self, timeout: float, *, also: Iterable[asyncio.Task[Any]] = ()) -> None:
        """Cancel every running task (and ``also``), then wait for them at most ``timeout`` seconds."""
        extra = list(also)
        for task in extra:
            task.cancel()
        await self.wait([*self.cancel(), *extra], timeout)
