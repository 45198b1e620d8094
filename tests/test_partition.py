"""A network partition and its heal, with real peers in separate network namespaces.

Four ``p2pdl peer`` processes, each in its own namespace on a private bridge (``netns_util``):
p0, p1 on side A and p2, p3 on side B of a ring. nftables drops cut A from B (silently, as on a
real partition); the test process reaches every peer over the bridge's host link, which is never
cut. Each side must keep training on its own and drop the other side from its live membership;
after the heal the views must merge (all four live on every peer) and gossip must pull the two
sides' models back together.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import PeerProcesses, assert_finished, get_json, wait_for, write_config
from netns_util import NetnsLab, check_in_ns

PORT = 29500
NAMES = ["p0", "p1", "p2", "p3"]
SIDE_A, SIDE_B = (0, 1), (2, 3)
STEPS = 2400  # a fast machine gets through the partition phase in more steps; the heal needs >= 400
FAST_MEMBERSHIP = {"gossip_interval": 0.25, "gossip_timeout": 1.0, "suspect_after": 1.5, "dead_after": 3.0}
ROUND_TIMEOUT = 2.0
SNAPSHOT_EVERY = 5


class NamespacedPeers(PeerProcesses):
    """``p2pdl peer`` processes, each started inside its own namespace; every one is reaped."""

    def __init__(self, lab: NetnsLab, config: Path, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.lab = lab
        self.config = config

    def prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.lab.names[NAMES.index(name)]]

    def start_peer(self, index: int, *extra: str) -> None:
        self.start(self.config, NAMES[index], *extra)


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    with NetnsLab(len(NAMES)) as built:
        yield built


def test_cut_and_heal_between_namespaces(lab: NetnsLab) -> None:
    """The lab itself: a cut silences exactly the cross-side pairs, the host link stays up."""
    # Nothing listens on port 9: a reachable host answers with RST, a cut one stays silent.
    assert lab.can_connect(0, 2, 9) and lab.can_connect(1, 3, 9)
    lab.cut(SIDE_A, SIDE_B)
    assert not lab.can_connect(0, 2, 9) and not lab.can_connect(3, 1, 9)
    assert lab.can_connect(0, 1, 9) and lab.can_connect(2, 3, 9)
    lab.heal()
    assert lab.can_connect(0, 2, 9) and lab.can_connect(3, 1, 9)


def snapshot(out: Path, step: int) -> torch.Tensor:
    return torch.load(out / "snapshots" / f"step_{step}.pt", weights_only=True).double()


def ring_neighbors(name: str) -> list[str]:
    index = NAMES.index(name)
    return sorted({NAMES[(index - 1) % len(NAMES)], NAMES[(index + 1) % len(NAMES)]})


def side_distance(vectors: dict[str, torch.Tensor]) -> float:
    """||mean(A) - mean(B)|| / ||mean(all)||: how far apart the two sides' models are."""
    side_a = torch.stack([vectors[NAMES[i]] for i in SIDE_A]).mean(dim=0)
    side_b = torch.stack([vectors[NAMES[i]] for i in SIDE_B]).mean(dim=0)
    everyone = torch.stack(list(vectors.values())).mean(dim=0)
    return float((side_a - side_b).norm() / everyone.norm())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("mnist1d_built")
def test_partition_both_sides_train_then_views_and_models_merge(lab: NetnsLab, tmp_path: Path) -> None:
    address = {name: f"{lab.addresses[i]}:{PORT}" for i, name in enumerate(NAMES)}
    config = write_config(
        tmp_path / "swarm.toml",
        names=NAMES,
        ports=[PORT + i for i in range(len(NAMES))],
        run={"steps": STEPS, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "eval_every": 0},
        strategy={"kind": "gossip", "round_timeout": ROUND_TIMEOUT},
        topology={"kind": "ring"},
        transport={"startup_timeout": 90.0},
        membership=FAST_MEMBERSHIP,
    )
    text = config.read_text()
    for i, name in enumerate(NAMES):
        text = text.replace(f'"127.0.0.1:{PORT + i}"', f'"{address[name]}"')
    config.write_text(text)
    peers = NamespacedPeers(lab, config, tmp_path)
    try:
        for index in range(len(NAMES)):
            peers.start_peer(index, "--snapshot-every", str(SNAPSHOT_EVERY))

        def steps() -> dict[str, int]:
            return {name: int(get_json(address[name], "/status")["step"]) for name in NAMES}

        def live(name: str) -> list[str]:
            return list(get_json(address[name], "/members")["live"])

        wait_for(lambda: min(steps().values()) >= 100, 150, "every peer past step 100")
        lab.cut(SIDE_A, SIDE_B)
        cut_at = time.monotonic()
        side_of = {NAMES[i]: [NAMES[j] for j in side] for side in (SIDE_A, SIDE_B) for i in side}
        wait_for(
            lambda: all(live(name) == side_of[name] for name in NAMES),
            30,
            "each side's live membership to exclude the other side",
        )
        split_seconds = time.monotonic() - cut_at
        # The membership detector, not the round timeout, splits the swarm: dead_after plus slack.
        assert split_seconds < FAST_MEMBERSHIP["dead_after"] + 6 * FAST_MEMBERSHIP["gossip_interval"] + 3.0
        at_split = steps()
        wait_for(
            lambda: all(steps()[n] >= at_split[n] + 120 for n in NAMES),
            120,
            "both sides to train 120 more steps while partitioned",
        )
        # Still partitioned: /status from inside each namespace reaches its own side only.
        for index, side in ((0, SIDE_A), (2, SIDE_B)):
            probe = (
                "import json,sys,urllib.request as u\n"
                "opener = u.build_opener(u.ProxyHandler({}))\n"
                "print(json.load(opener.open(f'http://{sys.argv[1]}/status', timeout=2))['step'])"
            )
            mate = NAMES[side[1]]
            out = check_in_ns(lab.names[index], [sys.executable, "-c", probe, address[mate]])
            assert int(out.stdout) > at_split[mate]
            other = NAMES[(SIDE_B if side == SIDE_A else SIDE_A)[0]]
            with pytest.raises(subprocess.CalledProcessError):
                check_in_ns(lab.names[index], [sys.executable, "-c", probe, address[other]], timeout=20)
        for name in NAMES:
            members = get_json(address[name], "/members")
            assert members["live"] == side_of[name], members
            assert members["neighbors"] == [n for n in side_of[name] if n != name], members
        before_heal = steps()
        assert max(before_heal.values()) < STEPS - 400, f"partition phase ran too long: {before_heal}"
        lab.heal()
        healed_at = time.monotonic()
        wait_for(lambda: all(live(name) == NAMES for name in NAMES), 30, "every peer to see all four live again")
        merge_seconds = time.monotonic() - healed_at
        wait_for(
            lambda: all(sorted(get_json(address[n], "/members")["neighbors"]) == ring_neighbors(n) for n in NAMES),
            10,
            "every peer to rewire back into the four-peer ring",
        )
        for proc in peers.procs.values():
            proc.wait(timeout=300)
    finally:
        peers.close()
    for name, proc in peers.procs.items():
        assert proc.returncode == 0, peers.log(name)

    # The last snapshot step that all four peers wrote while the partition held.
    common = set.intersection(
        *({int(p.stem.removeprefix("step_")) for p in (tmp_path / n / "snapshots").glob("step_*.pt")} for n in NAMES)
    )
    partitioned = max(s for s in common if s < min(before_heal.values()))
    during = side_distance({n: snapshot(tmp_path / n, partitioned) for n in NAMES})
    final = {
        n: torch.cat(
            [v.reshape(-1) for v in torch.load(tmp_path / n / "model.pt", weights_only=True).values()]
        ).double()
        for n in NAMES
    }
    after = side_distance(final)
    summaries = {n: assert_finished(tmp_path / n, STEPS) for n in NAMES}  # every step, none stopped
    report = {
        "split_s": split_seconds,
        "merge_s": merge_seconds,
        "during": during,
        "final": after,
        "at_split": at_split,
        "before_heal": before_heal,
    }
    assert after < 1e-2, report
    # The sides drifted apart while cut off (each trained on its own) and gossip closed the gap.
    assert during > 1e-2 and during > 10 * after, report
    for name, result in summaries.items():
        assert result["test_accuracy"] >= 0.8, (name, result["test_accuracy"])
        # Every peer rewired around its neighbour across the cut, then back to it after the heal.
        across = next(n for n in ring_neighbors(name) if n not in side_of[name])
        rewires = result["rewires"]
        dropped = next(i for i, r in enumerate(rewires) if across in r["removed"])
        assert any(across in r["added"] for r in rewires[dropped:]), (name, rewires)
