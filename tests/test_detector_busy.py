"""On an oversubscribed machine no live peer is declared dead (real processes, two busy loops).

Three gossip peers train beside two ``while True: pass`` processes with the default
``[membership]`` (phi-accrual detection between ``suspect_after`` and ``dead_after``). The test
polls every peer's ``GET /members`` through the run: no peer ever shows another as ``dead`` or
counts a ``declared_dead`` for it, and no peer's summary records a rewire that removed anyone
before the swarm's last steps (when finished peers leave).
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
    seen_dead: list[tuple[str, str, float]] = []
    declared: dict[tuple[str, str], int] = {}
    polls = 0
    try:
        for name in NAMES:
            peer_processes.start(config, name)
        deadline = time.monotonic() + 500
        while any(p.poll() is None for p in peer_processes.procs.values()) and time.monotonic() < deadline:
            for name, port in zip(NAMES, ports, strict=True):
                try:
                    view = get_json(f"127.0.0.1:{port}", "/members")
                except OSError:
                    continue  # not up yet, or finished
                if view.get("state") != "training":
                    continue
                polls += 1
                for member in view["members"]:
                    if member["name"] != name and member["state"] == "dead":
                        seen_dead.append((name, member["name"], member["silent_seconds"]))
                    declared[(name, member["name"])] = member["declared_dead"]
            time.sleep(0.25)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    peer_processes.assert_all_finished(timeout=120, steps=STEPS)
    assert polls >= 10, f"only {polls} views polled during training"
    assert not seen_dead, seen_dead
    assert not any(declared.values()), declared
    for name in NAMES:
        rewires = assert_finished(tmp_path / name, STEPS)["rewires"]
        # Peers that finish leave (and are removed) in the last steps; before that nobody is removed.
        assert not [r for r in rewires if r["removed"] and r["step"] < STEPS - 10], (name, rewires)
