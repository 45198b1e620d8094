"""``ps``: a parameter server. One configured peer holds the model and the optimizer.

Workers push their gradient every step and pull the server's parameters, which replace their
own; the server also trains on its own shard. Two modes:

* ``sync`` (bulk-synchronous, K-of-N): each server round waits for ``ps_quorum`` workers (all
  live workers by default) or ``round_timeout``, averages their gradients with its own, takes one
  optimizer step and sends the new parameters to every connected worker. Gradients computed on
  older parameters are dropped. Consistency: with K = N every step is an exact synchronous
  average, like all-reduce through a hub; with K < N, stragglers' gradients are dropped.
* ``async``: the server applies each worker gradient as it arrives, with a staleness-aware
  learning rate lr / (n (1 + staleness)) for n gradient sources (Zhang et al. 2016), and answers
  that worker with the parameters it produced; its own gradient is one more such update
  (staleness 0). Consistency: asynchronous SGD; a worker's gradient may be computed on
  parameters that are ``staleness`` updates old. The run's clock is the server's: when it
  finishes it sends its final parameters (``final`` in the frame's meta) and workers stop on them.

With ``local_steps`` = H > 1 (sync mode only), the PS runs local SGD through the server: every
peer, the server included, takes its own optimizer steps, and every H steps the workers send
their parameters (``ps_avg``); the server averages them with its own (``ps_quorum`` of them, or
what arrived within ``round_timeout``) and sends the average back, which every worker loads
(keeping its optimizer state, as all-reduce local SGD does). Consistency: as local SGD; after
each sync every worker that took part holds the server's average.

Fault tolerance: a dead worker is just a missing contribution; the server never waits past the
round timeout. When the server is unreachable, workers keep training locally (their own
optimizer step) and resume pushing when it is back; a restarted server resumes from its own
checkpoint (``--resume``) and its parameters overwrite the workers' local drift on the next pull.

The two roles share only the wire kinds and the counters in ``/status``, so each lives in its own
module (:mod:`p2pdl.strategies.ps_server`, :mod:`p2pdl.strategies.ps_worker`) on the
:class:`ParameterServerRole` base here; the registry picks the role by ``server_of``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pdl.config import PsMode
from p2pdl.errors import FrameSchemaError
from p2pdl.strategies.base import RoundConfig, StrategyBase, StrategyContext, build_codec
from p2pdl.wire import Frame

GRADIENT = "ps_grad"
PARAMETERS = "ps_params"
AVERAGE = "ps_avg"  # local SGD through the server: a worker's parameters every H steps


@dataclass(frozen=True, kw_only=True, slots=True)
class ParameterServerConfig(RoundConfig):
    """The ``[strategy]`` keys both parameter-server roles read."""

    server: str | None  # the server peer's name (None: the first configured peer)
    ps_mode: PsMode  # "sync": K-of-N rounds; "async": apply each gradient on arrival
    ps_quorum: int  # sync: gradients the server waits for per round; 0 = every live worker


def server_of(ctx: StrategyContext) -> str:
    """The server's name: ``strategy.server``, else the first configured peer."""
    return ctx.config.server or (ctx.configured[0] if ctx.configured else ctx.name)


class ParameterServerRole(StrategyBase):
    """What the server and its workers share: the server's name, the codec, the version clock,
    and the counters that ``/status`` reports for either role."""

    name = "ps"
    is_server = False

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.config = ParameterServerConfig.from_table(ctx.config)
        self.server = server_of(ctx)
        # Workers may compress their gradients (with error feedback); parameters go back in fp32.
        self._codec = build_codec(ctx, error_feedback=ctx.compression.error_feedback)
        # local_steps = H > 1 (sync mode): local SGD through the server; every H steps the server
        # averages its parameters with the workers' and sends the average back.
        self._periodic = self.config.local_steps > 1
        self._version = 0  # server: updates applied; worker: the server version its parameters are
        self._server_step = 0  # server: its own step; worker: the latest the server reported
        self._local_step = True
        self.pushes = 0
        self.pulls = 0
        self.server_unreachable = 0
        self.applied = 0
        self.dropped_stale = 0
        self.undecodable = 0
        self.raw_bytes = 0
        self._staleness_sum = 0

    def _workers(self) -> tuple[str, ...]:
        return tuple(n for n in self._ctx.topology().names if n != self.server)

    def _refuse(self, kind: str, sender: str) -> FrameSchemaError:
        role = "server" if self.is_server else "worker"
        return FrameSchemaError(f"ps {role} does not take {kind!r} from {sender!r}")

    async def _send(self, to: str, frame: Frame) -> None:
        data = await self._ctx.exchange.encode(frame)
        await self._ctx.exchange.send_encoded(to, data)

    def wants_local_step(self) -> bool:
        return self._periodic or self._local_step

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "round": self._version,
            "role": "server" if self.is_server else "worker",
            "server": self.server,
            "mode": self.config.ps_mode,
            "local_steps": self.config.local_steps,
            "version": self._version,
            "pushes": self.pushes,
            "pulls": self.pulls,
            "server_unreachable": self.server_unreachable,
            "applied": self.applied,
            "dropped_stale": self.dropped_stale,
            "undecodable": self.undecodable,
            "mean_staleness": self._staleness_sum / self.applied if self.applied and self.is_server else None,
        }
