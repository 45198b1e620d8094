"""P2PDL_FAULT: the fault-injection spec is parsed strictly and a bad one stops the CLI by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from p2pdl import faults
from p2pdl.errors import ConfigError


def test_parse_reads_every_point() -> None:
    points = {("kill", "rs", 40, 0.0), ("kill", "ag", 80, 0.0), ("stop", "mean", 9, 0.0), ("hang", "mean", 7, 2.5)}
    assert faults.parse("kill:rs:40, kill:ag:80,stop:mean:9,hang:mean:7:2.5") == points
    assert faults.parse("") == frozenset()


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("kill:rs", "ACTION:PHASE:ROUND"),
        ("pause:rs:4", "action 'pause'"),
        ("kill:xx:4", "phase 'xx'"),
        ("kill:ag:-1", "round '-1'"),
        ("kill:ag:four", "round 'four'"),
        ("hang:ag:4", "hang:PHASE:ROUND:SECONDS"),
        ("hang:ag:4:-1", "seconds '-1'"),
        ("hang:ag:4:nan", "seconds 'nan'"),
        ("kill:ag:4:3", "ACTION:PHASE:ROUND"),
    ],
)
def test_parse_names_the_bad_item(spec: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        faults.parse(spec)


def test_at_fires_only_at_the_planned_phase_from_the_planned_round(monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[int] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append(sig))
    faults.load({faults.ENV: "kill:rs:3"})
    try:
        faults.at("ag", 3)
        faults.at("rs", 2)
        assert killed == []
        faults.at("rs", 5)  # a peer that skipped round 3 (it resynced) dies at its next one
        assert killed == [faults.signal.SIGKILL]
    finally:
        faults.load({})


def test_a_stop_fires_once(monkeypatch: pytest.MonkeyPatch) -> None:
    signals: list[int] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: signals.append(sig))
    faults.load({faults.ENV: "stop:mean:3"})
    try:
        faults.at("mean", 3)
        faults.at("mean", 4)
        assert signals == [faults.signal.SIGSTOP]
    finally:
        faults.load({})


def test_a_hang_is_returned_once_and_signals_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    signals: list[int] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: signals.append(sig))
    faults.load({faults.ENV: "hang:ag:3:2.5"})
    try:
        assert faults.at("rs", 3) == 0.0
        assert faults.at("ag", 4) == 2.5
        assert faults.at("ag", 5) == 0.0
        assert signals == []
    finally:
        faults.load({})


def test_the_cli_refuses_a_malformed_spec_by_name(tmp_path: Path) -> None:
    config = REPO / "configs" / "ring4.toml"
    done = subprocess.run(
        [sys.executable, "-m", "p2pdl.cli", "peer", "--config", str(config), "--name", "p0", "--out", str(tmp_path)],
        env={"P2PDL_FAULT": "kill:reduce:4", "PATH": "/usr/bin:/bin"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "phase 'reduce'" in done.stderr
