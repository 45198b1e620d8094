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


def test_latency_is_from_the_signal_to_the_first_survivors_limit_crossing(tmp_path: Path, chaos: object) -> None:
    fired = float(int(time.time()))
    # p1 crossed p3's limit 5.2 s after the freeze (logged 0.4 s later), p2 at 6.0 s; p3's own
    # line about another peer and a declaration outside the window do not count.
    write_peer_log(tmp_path / "p1" / "peer.log", [(fired + 5.6, "p3", 5.4, 5.0), (fired + 60.0, "p3", 5.0, 5.0)])
    write_peer_log(tmp_path / "p2" / "peer.log", [(fired + 6.0, "p3", 5.0, 5.0)])
    write_peer_log(tmp_path / "p3" / "peer.log", [(fired + 1.0, "p3", 5.0, 5.0)])
    events = [
        {"kind": "freeze", "name": "p3", "at_seconds": 10.0, "at_wall": fired},
        {"kind": "restart", "name": "p1", "at_seconds": 20.0, "at_wall": fired + 100.0},  # back before any limit
    ]
    summary = chaos.detection_latencies(tmp_path, ["p1", "p2", "p3"], events)  # type: ignore[attr-defined]
    freeze, restart = summary["events"]
    assert freeze["first_seconds"] == pytest.approx(5.2, abs=2e-3)
    assert freeze["last_seconds"] == pytest.approx(6.0, abs=2e-3)
    assert freeze["survivors_declaring"] == 2
    assert restart["first_seconds"] is None and restart["survivors_declaring"] == 0
    assert summary["freeze"] == {
        "events": 1,
        "declared": 1,
        "first_median_seconds": freeze["first_seconds"],
        "first_max_seconds": freeze["first_seconds"],
    }
    assert summary["restart"]["events"] == 1 and summary["restart"]["declared"] == 0
