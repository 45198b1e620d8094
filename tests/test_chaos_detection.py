"""The chaos benchmark's in-run detection latency: read from the lines the membership really logs.

The peer's log line is produced here by the same logging format as the CLI and the same message
format as :mod:`p2pdl.membership.gossip`, so a change to either that the benchmark's parser does
not follow fails this test rather than silently dropping every measurement.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from pathlib import Path

import pytest

from p2pdl.membership.gossip import DECLARED_DEAD_LOG

REPO = Path(__file__).resolve().parent.parent
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # p2pdl/cli.py's


def write_peer_log(path: Path, lines: list[tuple[float, str, float, float]]) -> None:
    """(wall time, victim, silent, limit) as the gossip logger writes them."""
    formatter = logging.Formatter(LOG_FORMAT)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for at, victim, silent, limit in lines:
            record = logging.LogRecord(
                "p2pdl.membership.gossip", logging.INFO, __file__, 1, DECLARED_DEAD_LOG, (victim, silent, limit), None
            )
            record.created = at
            record.msecs = (at % 1) * 1000
            out.write(formatter.format(record) + "\n")


@pytest.fixture
def chaos() -> object:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module("chaos")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_latency_is_from_the_signal_to_the_first_survivors_declaration(tmp_path: Path, chaos: object) -> None:
    fired = float(int(time.time()))
    # p1 declared p3 dead 5.6 s after the freeze (its silence crossed the limit 0.4 s before), p2
    # at 6.0 s; p4, restarted 10 s before the freeze, is left out; p3's own line and one after
    # p3's next fault do not count for this one.
    write_peer_log(tmp_path / "p1" / "peer.log", [(fired + 5.6, "p3", 5.4, 5.0), (fired + 25.0, "p3", 5.0, 5.0)])
    write_peer_log(tmp_path / "p2" / "peer.log", [(fired + 6.0, "p3", 5.0, 5.0)])
    write_peer_log(tmp_path / "p3" / "peer.log", [(fired + 1.0, "p3", 5.0, 5.0)])
    write_peer_log(tmp_path / "p4" / "peer.log", [(fired + 3.0, "p3", 5.0, 5.0)])
    events = [
        {"kind": "restart", "name": "p4", "at_seconds": 0.0, "at_wall": fired - 10.0, "fired_step": 1},
        {"kind": "freeze", "name": "p3", "seconds": 12.0, "at_seconds": 10.0, "at_wall": fired, "fired_step": 5},
        {"kind": "freeze", "name": "p3", "seconds": 12.0, "at_seconds": 30.0, "at_wall": fired + 20.0, "fired_step": 9},
        {"kind": "freeze", "name": "p2", "seconds": 12.0, "at_seconds": 40.0, "at_wall": fired + 30.0},  # never fired
    ]
    summary = chaos.detection_latencies(tmp_path, ["p1", "p2", "p3", "p4"], events)  # type: ignore[attr-defined]
    restart, freeze, again = summary["events"]
    assert freeze["first_seconds"] == pytest.approx(5.6, abs=2e-3)
    assert freeze["crossed_seconds"] == pytest.approx(5.2, abs=2e-3)
    assert freeze["last_seconds"] == pytest.approx(6.0, abs=2e-3)
    assert freeze["survivors_declaring"] == 2 and freeze["survivors_left_out"] == ["p4"]
    assert again["first_seconds"] == pytest.approx(5.0, abs=2e-3) and again["survivors_declaring"] == 1
    assert restart["first_seconds"] is None and restart["survivors_declaring"] == 0
    assert summary["freeze"] == {
        "events": 2,
        "declared": 2,
        "first_median_seconds": pytest.approx(5.3, abs=2e-3),
        "first_max_seconds": freeze["first_seconds"],
        "slowest_seconds": freeze["first_seconds"],
    }
    assert summary["restart"] == {
        "events": 1,
        "declared": 0,
        "first_median_seconds": None,
        "first_max_seconds": None,
    }


def test_a_freeze_nobody_declared_costs_its_whole_length(tmp_path: Path, chaos: object) -> None:
    fired = float(int(time.time()))
    write_peer_log(tmp_path / "p1" / "peer.log", [])
    events = [{"kind": "freeze", "name": "p2", "seconds": 12.0, "at_seconds": 1.0, "at_wall": fired, "fired_step": 3}]
    summary = chaos.detection_latencies(tmp_path, ["p1", "p2"], events)  # type: ignore[attr-defined]
    assert summary["freeze"]["declared"] == 0 and summary["freeze"]["slowest_seconds"] == 12.0
