"""The mailbox: received data frames keyed by (kind, round, sender), bounded per sender.

Strategies ``collect`` one round with a deadline and then ``advance`` the kind, which closes the
earlier rounds: a late frame for a closed round is refused as stale instead of piling up. The
trade-off of the per-sender bound is that a sender far ahead of this peer loses its oldest
frames (superseded), never this peer's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection

from p2pdl.errors import InboxFullError, StaleFrameError
from p2pdl.wire import Frame


class _PeerGone(Exception):
    """Resolves a pending mailbox slot whose sender left the swarm."""


class Mailbox:
    """Received data frames, keyed by (kind, round, sender), with bounded buffering.

    A strategy ``collect``s the frames of one round; ``advance`` then marks earlier rounds of
    that kind as finished, so late frames for them are refused as stale instead of piling up.
    """

    def __init__(self, per_sender_limit: int) -> None:
        self._limit = per_sender_limit
        self._slots: dict[tuple[str, int, str], asyncio.Future[Frame]] = {}
        self._floor: dict[str, int] = {}
        self._gone: set[str] = set()
        self._arrival = asyncio.Event()  # set on every accepted frame; waiters clear and re-check
        self.superseded = 0  # frames replaced by a newer one from the same sender before use

    def _slot(self, kind: str, round_index: int, sender: str) -> asyncio.Future[Frame]:
        key = (kind, round_index, sender)
        slot = self._slots.get(key)
        if slot is None:
            slot = asyncio.get_running_loop().create_future()
            self._slots[key] = slot
        return slot

    def put(self, frame: Frame) -> None:
        """File a decoded frame; raises StaleFrameError or InboxFullError when refused."""
        floor = self._floor.get(frame.kind, 0)
        if frame.round < floor:
            raise StaleFrameError(
                f"{frame.kind} frame for round {frame.round} from {frame.sender!r} arrived after "
                f"the round closed (now at {floor})"
            )
        slot = self._slot(frame.kind, frame.round, frame.sender)
        if slot.done():
            raise StaleFrameError(f"duplicate {frame.kind} frame for round {frame.round} from {frame.sender!r}")
        unclaimed = [key for key, f in self._slots.items() if key[2] == frame.sender and f.done()]
        if len(unclaimed) >= self._limit:
            # A sender that outpaces this peer (it started later, or runs without a round barrier)
            # supersedes its own oldest frame of the same kind, or else its oldest notice (a frame
            # without tensors) of another kind that it has sent a newer one of: notices, of which
            # only the latest counts, pile up while this peer downloads its state. Anything else
            # is refused.
            older = [key for key in unclaimed if key[0] == frame.kind and key[1] < frame.round]
            if not older:
                notices = [key for key in unclaimed if key[0] != frame.kind and not self._slots[key].result().tensors]
                older = _behind_a_newer(notices)
            if not older:
                del self._slots[(frame.kind, frame.round, frame.sender)]
                raise InboxFullError(
                    f"{frame.sender!r} has {len(unclaimed)} unclaimed frames buffered (limit {self._limit})"
                )
            del self._slots[min(older, key=lambda key: key[1])]
            self.superseded += 1
        slot.set_result(frame)
        self._arrival.set()

    def _done_keys(self, kind: str, sender: str) -> list[tuple[str, int, str]]:
        return [
            key
            for key, slot in self._slots.items()
            if key[0] == kind and key[2] == sender and slot.done() and slot.exception() is None
        ]

    def take_latest(self, kind: str, sender: str) -> Frame | None:
        """The newest buffered frame of ``kind`` from ``sender``; older ones are dropped."""
        keys = self._done_keys(kind, sender)
        if not keys:
            return None
        newest = max(keys, key=lambda key: key[1])
        frame = self._slots[newest].result()
        for key in keys:
            del self._slots[key]
        return frame

    async def wait_for_senders(self, kind: str, senders: Collection[str], count: int, timeout: float) -> set[str]:
        """Wait up to ``timeout`` seconds until ``count`` of ``senders`` have a frame of ``kind`` buffered.

        Returns the senders that have one (possibly fewer than ``count`` on timeout). Rounds do not
        matter here: used by strategies without a round barrier (async gossip, parameter server).
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            self._arrival.clear()  # before checking, so an arrival after the check is not missed
            ready = {s for s in senders if self._done_keys(kind, s)}
            remaining = deadline - asyncio.get_running_loop().time()
            if len(ready) >= count or remaining <= 0:
                return ready
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrival.wait()

    async def collect(self, kind: str, round_index: int, senders: Collection[str], timeout: float) -> dict[str, Frame]:
        """Wait up to ``timeout`` seconds for each sender's frame; return those that arrived.

        A sender that has left is not waited for, but a frame it sent before leaving counts: a
        peer that finishes first leaves while the others still collect the frames it sent them.
        """
        waiting: dict[str, asyncio.Future[Frame]] = {}
        for sender in senders:
            if sender not in self._gone:
                waiting[sender] = self._slot(kind, round_index, sender)
            elif (slot := self._slots.get((kind, round_index, sender))) is not None and slot.done():
                waiting[sender] = slot
        pending = [f for f in waiting.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        arrived: dict[str, Frame] = {}
        for sender, slot in waiting.items():
            if slot.done() and slot.exception() is None:
                arrived[sender] = slot.result()
                del self._slots[(kind, round_index, sender)]
        return arrived

    def advance(self, kind: str, floor: int) -> None:
        """Rounds of ``kind`` below ``floor`` are finished: drop their slots, refuse late frames."""
        self._floor[kind] = max(floor, self._floor.get(kind, 0))
        for key in [k for k in self._slots if k[0] == kind and k[1] < floor]:
            slot = self._slots.pop(key)
            if not slot.done():
                slot.cancel()

    def mark_gone(self, sender: str) -> None:
        """``sender`` left: wake every collect waiting on it instead of letting it time out."""
        self._gone.add(sender)
        for key, slot in list(self._slots.items()):
            if key[2] == sender and not slot.done():
                slot.set_exception(_PeerGone(sender))
                slot.exception()  # mark retrieved: nobody else will look at it
                del self._slots[key]

    def highest_round(self, kind: str, senders: Collection[str]) -> int | None:
        """The latest round of ``kind`` already buffered from any of ``senders``."""
        rounds = [r for (k, r, s), f in self._slots.items() if k == kind and s in senders and f.done()]
        return max(rounds, default=None)

    def mark_back(self, sender: str) -> None:
        self._gone.discard(sender)

    def pending_count(self) -> int:
        return len(self._slots)


def _behind_a_newer(keys: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """The keys of the kind with the most frames among ``keys`` (one sender's; the first such
    kind in ``keys`` on a tie) below that kind's newest round; empty when no kind has two."""
    by_kind: dict[str, list[tuple[str, int, str]]] = {}
    for key in keys:
        by_kind.setdefault(key[0], []).append(key)
    crowded = max(by_kind.values(), key=len, default=[])
    if len(crowded) < 2:
        return []
    newest = max(key[1] for key in crowded)
    return [key for key in crowded if key[1] < newest]
