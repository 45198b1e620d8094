"""Peers waiting below quorum re-announce at a bounded rate (PROTOCOL.md §11.6).

In the chaos benchmark two peers left below quorum at the end of a run (one restarted, one
thawed after the others had finished) answered each other's `wait` notices as fast as the links
went, until each one's rate limit refused the other's frames. Each wait loop re-announces when it
reads a notice, so the same notice must not go out again within the re-announce interval.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection
from typing import Any

import test_allreduce_overlap as overlap
import torch

from p2pdl.config.sections import StrategyConfig
from p2pdl.errors import QuorumLostError
from p2pdl.strategies.exact_rounds import GROUP_NOTICE
from p2pdl.wire import Frame

WAIT_SECONDS = 2.0


async def test_two_peers_below_quorum_do_not_answer_each_others_notices_in_a_ping_pong() -> None:
    # Two live peers and min_peers = 3: neither may train; both wait, announcing, until quorum_timeout.
    config = StrategyConfig(kind="allreduce", round_timeout=5.0, min_peers=3, quorum_timeout=WAIT_SECONDS)
    models, strategies = overlap._peers(["p0", "p1"], config)
    notices: Counter[str] = Counter()
    for strategy in strategies:
        exchange = strategy._ctx.exchange
        send = exchange.broadcast

        async def counted(frame: Frame, neighbors: Collection[str], send: Any = send) -> dict[str, Any]:
            if frame.kind == GROUP_NOTICE:
                notices[frame.sender] += 1
            result: dict[str, Any] = await send(frame, neighbors)
            return result

        exchange.broadcast = counted  # type: ignore[method-assign]
    before = [[p.detach().clone() for p in model.parameters()] for model in models]

    async def wait(index: int) -> None:
        model = models[index]
        await strategies[index]._rounds.average(0, lambda: [p.data for p in model.parameters()])

    outcomes = await asyncio.gather(wait(0), wait(1), return_exceptions=True)
    assert all(isinstance(o, QuorumLostError) for o in outcomes), outcomes
    # At most one notice per re-announce interval (0.5 s), plus the first: 5 in 2 s. The
    # ping-pong sent thousands.
    assert set(notices) == {"p0", "p1"}
    assert max(notices.values()) <= WAIT_SECONDS / 0.5 + 3, notices
    for model, kept in zip(models, before, strict=True):  # nothing was applied
        assert all(torch.equal(p, k) for p, k in zip(model.parameters(), kept, strict=True))
