"""``GET /metrics``: one peer's figures in the Prometheus text format, through ``prometheus_client``.

Every value is read at scrape time from the same status dict that ``GET /status`` serves, by a
custom collector, so the two can never disagree and no counter is kept twice. The one exception
is the round-latency histogram, which needs each round's duration as it happens: the node calls
:meth:`PeerMetrics.observe_round`.

Each peer has its own :class:`~prometheus_client.CollectorRegistry` (not the process-global one),
so several peers in one process, as in the tests, each export only their own figures.

Names follow the Prometheus conventions: ``p2pdl_`` prefix, base units (seconds, bytes),
``_total`` for counters. Label values come only from bounded sets (refusal reasons, link and
member states, event kinds, the strategy's name, evaluation metric names of the workload, and
neighbour names, which the graph's degree bounds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from p2pdl.obs.swarm import EVENT_KINDS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MEMBER_STATES = ("alive", "suspect", "dead", "left")
LINK_STATES = ("connecting", "connected", "left")
PHASES = ("compute", "communication", "waiting")
# Strategy status fields that count rounds whose exchange had to be redone from scratch.
_REDONE_FIELDS = ("catch_ups", "resyncs_requested")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class _StatusCollector(Collector):
    """Builds every metric family from one call of ``status``."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        status = self._status()
        telemetry = status.get("telemetry", {})
        strategy = status.get("strategy", {})
        kind = str(strategy.get("kind", "unknown"))
        yield from self._training(status, telemetry)
        yield from self._rounds(status, strategy, kind)
        yield from self._traffic(status)
        yield from self._refusals(status)
        yield from self._membership(status, telemetry)
        info = InfoMetricFamily("p2pdl_peer", "This peer's name and strategy")
        info.add_metric([], {"name": str(status.get("name", "")), "strategy": kind})
        yield info

    def _training(self, status: Mapping[str, Any], telemetry: Mapping[str, Any]) -> Iterator[Any]:
        yield GaugeMetricFamily("p2pdl_step", "Training steps done", value=float(status.get("step", 0)))
        loss = _number(status.get("loss"))
        if loss is not None:
            yield GaugeMetricFamily("p2pdl_loss", "Training loss of the last step", value=loss)
        evaluation = GaugeMetricFamily("p2pdl_eval", "Latest evaluation metrics of the workload", labels=["metric"])
        for metric, value in sorted(status.get("eval", {}).items()):
            if (number := _number(value)) is not None:
                evaluation.add_metric([str(metric)], number)
        yield evaluation
        yield GaugeMetricFamily(
            "p2pdl_steps_per_second", "Training steps per second, recent", value=telemetry.get("steps_per_second", 0.0)
        )
        seconds = CounterMetricFamily(
            "p2pdl_step_seconds", "Time inside training steps, by phase", labels=["phase"], unit="seconds"
        )
        timing = telemetry.get("seconds", {})
        for phase in PHASES:
            seconds.add_metric([phase], float(timing.get(phase, 0.0)))
        yield seconds

    def _rounds(self, status: Mapping[str, Any], strategy: Mapping[str, Any], kind: str) -> Iterator[Any]:
        rounds = CounterMetricFamily("p2pdl_rounds", "Communication rounds by outcome", labels=["strategy", "outcome"])
        ledger = status.get("rounds", {})
        rounds.add_metric([kind, "complete"], float(ledger.get("complete", 0)))
        rounds.add_metric([kind, "partial"], float(ledger.get("partial", 0)))
        redone = sum(int(strategy.get(field) or 0) for field in _REDONE_FIELDS)
        rounds.add_metric([kind, "redone"], float(redone))
        yield rounds

    def _traffic(self, status: Mapping[str, Any]) -> Iterator[Any]:
        for direction in ("sent", "received"):
            yield CounterMetricFamily(
                f"p2pdl_bytes_{direction}", f"Wire bytes {direction}", value=float(status.get(f"bytes_{direction}", 0))
            )
            yield CounterMetricFamily(
                f"p2pdl_frames_{direction}", f"Frames {direction}", value=float(status.get(f"frames_{direction}", 0))
            )
        per_link = {
            direction: CounterMetricFamily(
                f"p2pdl_neighbor_bytes_{direction}", f"Wire bytes {direction}, per neighbour", labels=["neighbor"]
            )
            for direction in ("sent", "received")
        }
        links = GaugeMetricFamily("p2pdl_links", "Links to neighbours by state", labels=["state"])
        counts = dict.fromkeys(LINK_STATES, 0)
        for link in status.get("neighbors", []):
            counts[str(link.get("state"))] = counts.get(str(link.get("state")), 0) + 1
            for direction, family in per_link.items():
                if (number := _number(link.get(f"bytes_{direction}"))) is not None:
                    family.add_metric([str(link["name"])], number)
        for state, count in counts.items():
            links.add_metric([state], float(count))
        yield from per_link.values()
        yield links
        ratio = _number(status.get("compression", {}).get("ratio"))
        yield GaugeMetricFamily(
            "p2pdl_compression_ratio",
            "float32-equivalent bytes over wire bytes sent (1 when nothing is compressed)",
            value=ratio if ratio is not None else 1.0,
        )

    def _refusals(self, status: Mapping[str, Any]) -> Iterator[Any]:
        for key, metric, text in (
            ("frames_rejected", "p2pdl_frames_rejected", "Frames and gossip bodies refused, by reason"),
            ("auth_rejected", "p2pdl_credentials_rejected", "Credentials refused, by reason"),
        ):
            family = CounterMetricFamily(metric, text, labels=["reason"])
            for reason, count in sorted(status.get(key, {}).get("by_reason", {}).items()):
                family.add_metric([str(reason)], float(count))
            yield family
        yield CounterMetricFamily(
            "p2pdl_connections_refused",
            "Connections refused by the connection limits",
            value=float(status.get("connections_refused", 0)),
        )

    def _membership(self, status: Mapping[str, Any], telemetry: Mapping[str, Any]) -> Iterator[Any]:
        members = GaugeMetricFamily(
            "p2pdl_members", "Members of the swarm by state, in this peer's view", labels=["state"]
        )
        by_state = telemetry.get("members_by_state", {})
        for state in MEMBER_STATES:
            members.add_metric([state], float(by_state.get(state, 0)))
        yield members
        churn = CounterMetricFamily("p2pdl_membership_events", "Churn seen by this peer, by kind", labels=["kind"])
        events = telemetry.get("events", {})
        for event in EVENT_KINDS:
            churn.add_metric([event], float(events.get(event, 0)))
        yield churn
        yield GaugeMetricFamily(
            "p2pdl_digest_bytes",
            "Bytes of figures this peer carries in each gossip body",
            value=float(telemetry.get("digest_bytes", 0)),
        )


class PeerMetrics:
    """One peer's registry: the status collector and the round-latency histogram."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatusCollector(status))
        self._round_seconds = Histogram(
            "p2pdl_round_seconds",
            "Duration of one communication round",
            labelnames=["strategy"],
            buckets=ROUND_BUCKETS,
            registry=self.registry,
        )

    def observe_round(self, strategy: str, seconds: float) -> None:
        self._round_seconds.labels(strategy=strategy).observe(max(0.0, seconds))

    def render(self) -> bytes:
        """The exposition text of every metric, for ``GET /metrics``."""
        return generate_latest(self.registry)
