"""On an oversubscribed machine no live peer is declared dead (real processes, two busy loops).

Three gossip peers train beside two ``while True: pass`` processes with the default
``[membership]`` (phi-accrual detection between ``suspect_after`` and ``dead_after``). The test
polls every peer's ``GET /members`` through the run: once a peer has seen another alive, it
never shows it ``dead`` nor counts a ``declared_dead`` for it, and no peer's summary records a
rewire that removed anyone before the swarm's last steps (when finished peers leave).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PeerProcesses, assert_finished, free_ports, get_json, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.usefixtures("mnist1d_built")]

NAMES = ["p0", "p1", "p2"]
STEPS = 400


def test_busy_loops_beside_the_swarm_never_get_a_live_peer_declared_dead(
    tmp_path: Path, peer_processes: PeerProcesses
) -> None:
    ports = free_ports(len(NAMES))
    config = write_config(
        tmp_path / "ring.toml",
        names=NAMES,
        ports=ports,
        run={"steps": STEPS, "eval_every": 0},
        strategy={"kind": "gossip"},
        topology={"kind": "ring"},
        transport={"startup_timeout": 120.0},
    )
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    # Per (observer, member): the member's declared_dead count when the observer first saw it
    # alive. Before that the member may not have started yet (dead_after applies to it).
    baseline: dict[tuple[str, str], int] = {}
    false_deaths: list[tuple[str, str, str, float]] = []
    polls = 0
    unreachable: list[str] = []
    try:
        for name in NAMES:
            peer_processes.start(config, name)
        deadline = time.monotonic() + 500
        while any(p.poll() is None for p in peer_processes.procs.values()) and time.monotonic() < deadline:
            for name, port in zip(NAMES, ports, strict=True):
                try:
                    view = get_json(f"127.0.0.1:{port}", "/members")
                except OSError as exc:
                    unreachable[:] = [f"{name}: {exc!r}"]  # the latest only: not up yet, or finished
                    continue
                polls += 1
                for member in view["members"]:
                    key = (name, member["name"])
                    if member["name"] == name:
                        continue
                    if key not in baseline:
                        if member["state"] == "alive" and member["incarnation"] > 0:
                            baseline[key] = member["declared_dead"]
                        continue
                    if member["state"] == "dead" or member["declared_dead"] > baseline[key]:
                        false_deaths.append((*key, member["state"], member["silent_seconds"]))
            time.sleep(0.25)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    peer_processes.assert_all_finished(timeout=120, steps=STEPS)
    assert polls >= 10, f"only {polls} views polled; last failure: {unreachable}"
    assert len(baseline) == len(NAMES) * (len(NAMES) - 1), f"not every peer saw every other alive: {baseline}"
    assert not false_deaths, false_deaths
    for name in NAMES:
        rewires = assert_finished(tmp_path / name, STEPS)["rewires"]
        # Peers that finish leave (and are removed) in the last steps; before that nobody is removed.
        assert not [r for r in rewires if r["removed"] and r["step"] < STEPS - 10], (name, rewires)
