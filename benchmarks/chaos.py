#!/usr/bin/env python3
"""Chaos: exact averaging (allreduce, DiLoCo) while peers are killed, restarted and frozen.

    python benchmarks/chaos.py [--strategies diloco allreduce] [--peers 8] [--steps 200]
        [--kill-every 15] [--freeze-every 60] [--freeze-seconds 12]

For each strategy it runs the same swarm twice in one invocation, one run after the other:
failure-free, then under chaos. Under chaos, every ``--kill-every`` seconds a random running peer
is SIGKILLed and started again with ``--resume`` (it continues from its last checkpoint and is
re-admitted by the swarm), and every ``--freeze-every`` seconds one random running peer is
SIGSTOPped for ``--freeze-seconds``; both clocks start when the swarm completes its first step.
No fault is injected in the last checkpoint interval, nor when the training left (estimated from
the swarm's pace) is shorter than the fault takes to recover from: the longest restart measured
in the run (kill to the victim past the swarm step of its kill; 30 s until one is measured) or
the freeze plus the detection time. A peer stopped across the end of the run has nobody left to
download the final state from and exits with ``QuorumLostError``, as designed.
The peers are real ``p2pdl peer`` processes started through
``scripts/local_cluster.py``'s :class:`Cluster`, training the tiny byte-level GPT
(``peers/gpt_tiny.py``) on 127.0.0.1.

Figures, per strategy, chaos against failure-free:

* **goodput**: distinct (peer, step) pairs trained, times the batch size, per second of the
  swarm's training time (first step to last step, any peer). A step that a restarted peer trains
  twice counts once; the ratio chaos / failure-free is the figure.
* **final quality**: the mean over the peers running at the end of the final validation loss
  (``test_loss``, nats per byte), and its relative difference from the failure-free run (target:
  within 2%).
* **longest global stall**: the longest wall-clock gap during which no peer completed a new
  swarm step (the swarm step at time t is the largest step any peer had completed by t). The
  target is ``2 * median step time + detection time``, where the detection time is the
  membership's ``dead_after`` bound unless ``--detection-seconds`` gives a measured one. The run
  also measures it (``detection``): per kill and freeze, the seconds from the signal to the first
  survivor's "declared dead" log line about the victim; the row's
  ``stall_target_measured_seconds`` is the same target with the slowest freeze detection of the
  run (a freeze nobody declared counts as its whole length), the latency that machine and load
  actually gave.
* **bit-identity**: at every snapshot step (every outer step for DiLoCo, every
  ``--snapshot-every`` steps for allreduce) the snapshots of all peers that wrote one are compared
  with ``torch.equal``; the figure is the number of steps compared and of steps that differed.

Writes ``--results`` (default ``benchmarks/results/chaos.json``) through
:func:`_provenance.write_result` and prints a markdown table. The random choices are seeded
(``--seed``), so the schedule of kills and freezes is reproducible; when they fire relative to
the training depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import random
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from _provenance import Provenance, write_result  # noqa: E402
from fault_schedule import Event  # noqa: E402
from local_cluster import PEER_ENV, Cluster, fetch_status, read_jsonl  # noqa: E402
from time_to_accuracy import free_ports, write_toml  # noqa: E402

from p2pdl.config import load_config  # noqa: E402
from p2pdl.net.auth import security_from_config  # noqa: E402

WORKLOAD = REPO / "peers" / "gpt_tiny.py"
STALLS_KEPT = 5  # the longest stalls whose log lines are classified
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \S+: (.*)$")
# Log markers of the recovery chain (p2pdl/strategies/allreduce_round.py, allreduce.py) -> the cause they count.
STALL_MARKERS = {
    "(deadline)": "attempt ended at its deadline",
    "(not_live:": "attempt ended: member declared dead",
    "(link_down:": "attempt ended: member's link down",
    "(given_up:": "attempt ended: another member gave up on it",
    ": adopting epoch": "attempt ended: adopted a greater proposal",
    "below quorum": "a peer fell below quorum",
    "downloading state": "a peer resynced",
}
# p2pdl/membership/gossip.py logs each death it declares with the silence and the limit it crossed.
DECLARED_DEAD = re.compile(r"member (\S+) declared dead: silent ([\d.]+) s, limit ([\d.]+) s")
DETECTION_WINDOW = 30.0  # a declaration this long after a fault no longer belongs to it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", choices=("diloco", "allreduce"), default=["diloco", "allreduce"])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="steps per run (choose >= 5 min of training)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local-steps", type=int, default=10, help="DiLoCo's H (default 10)")
    parser.add_argument("--snapshot-every", type=int, default=10, help="allreduce: steps between identity checks")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--kill-every", type=float, default=15.0, help="seconds between kill+restarts")
    parser.add_argument("--freeze-every", type=float, default=60.0, help="seconds between freezes")
    parser.add_argument("--freeze-seconds", type=float, default=12.0)
    parser.add_argument("--detection-seconds", type=float, help="measured failure-detection latency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "chaos")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "chaos.json")
    args = parser.parse_args(argv)
    if args.peers < 3:
        parser.error("--peers must be >= 3 (a majority must survive one failure)")
    if min(args.kill_every, args.freeze_every, args.freeze_seconds) <= 0:
        parser.error("--kill-every, --freeze-every and --freeze-seconds must be > 0")
    return args


def swarm_config(args: argparse.Namespace, strategy: str, path: Path) -> Path:
    ports = free_ports(args.peers)
    table: dict[str, Any] = {"kind": "allreduce", "round_timeout": 15.0, "local_steps": 1}
    if strategy == "diloco":
        table |= {"local_steps": args.local_steps, "outer": "diloco", "outer_lr": 0.7, "outer_momentum": 0.9}
    config = {
        "run": {
            "workload": str(WORKLOAD),
            "steps": args.steps,
            "seed": 0,
            "batch_size": args.batch_size,
            "optimizer": "adam",
            "lr": 0.003,
            "eval_every": 0,
            "torch_threads": 1,
        },
        "strategy": table,
        "topology": {"kind": "full"},
        "membership": {"dead_after": 30.0},
        "checkpoint": {"every": args.checkpoint_every},
        "peers": [{"name": f"p{i}", "address": f"127.0.0.1:{port}"} for i, port in enumerate(ports)],
    }
    write_toml(config, path)
    return path


def run_swarm(args: argparse.Namespace, strategy: str, chaos: bool) -> dict[str, Any]:
    """One run; under ``chaos`` the timed kills and freezes fire while it trains."""
    out = args.out / f"{strategy}_{'chaos' if chaos else 'clean'}"
    out.mkdir(parents=True, exist_ok=True)
    config_path = swarm_config(args, strategy, out / "config.toml")
    config = load_config(config_path)
    snapshot_every = args.local_steps if strategy == "diloco" else args.snapshot_every
    cluster_args = argparse.Namespace(config=config_path, device=None, snapshot_every=snapshot_every, resume=False)
    env = {**os.environ, **PEER_ENV, "OMP_NUM_THREADS": "1"}
    cluster = Cluster(cluster_args, config, out, args.steps, env)
    for entry in config.peers:
        cluster.launch(entry.name)
    security = security_from_config(config.security, "chaos")
    rng = random.Random(args.seed)
    events: list[dict[str, Any]] = []
    next_kill = next_freeze = float("inf")  # set when the swarm completes its first step
    swarm_step = -1
    timed_out = False
    trained_from: tuple[float, int] | None = None  # (time, swarm step) when training started
    restarting: dict[str, tuple[float, int]] = {}  # victim -> (kill time, swarm step at the kill)
    restart_seconds: list[float] = []  # kill -> the victim past the swarm step of its kill, measured
    try:
        while cluster.running():
            now = cluster.elapsed()
            if now > args.timeout:
                timed_out = True
                break
            polled = cluster.polled()
            statuses = dict(zip(polled, (fetch_status(cluster.addresses[n], security) for n in polled), strict=True))
            swarm_step = max([swarm_step, *(int(s["step"]) for s in statuses.values() if s)])
            for name, (killed_at, step_at_kill) in list(restarting.items()):
                if (status := statuses.get(name)) and int(status["step"]) > step_at_kill:
                    restart_seconds.append(now - killed_at)
                    del restarting[name]
            if chaos and swarm_step >= 1 and next_kill == float("inf"):
                # The clock of the chaos starts with training, not with the processes' start-up.
                next_kill, next_freeze = now + args.kill_every, now + args.freeze_every
                trained_from = (now, swarm_step)
            # No fault that the swarm would finish before recovering from: a peer restarted or
            # thawed after the others have finished finds nobody to download the final state from
            # and, as designed, exits with QuorumLostError. The training left is estimated from
            # the swarm's pace so far; a restart needs the longest one measured in this run (30 s
            # until one is), a freeze its length and the detection time.
            left = float("inf")
            if trained_from is not None and swarm_step > trained_from[1]:
                pace = (now - trained_from[0]) / (swarm_step - trained_from[1])
                left = (args.steps - swarm_step) * pace
            recovery = {
                "restart": max(restart_seconds, default=30.0),
                "freeze": args.freeze_seconds + (args.detection_seconds or 5.0),
            }
            if chaos and 1 <= swarm_step < args.steps - args.checkpoint_every:
                for kind, due in (("restart", now >= next_kill), ("freeze", now >= next_freeze)):
                    candidates = cluster.polled()
                    if not due or len(candidates) < 2 or left < recovery[kind]:
                        continue
                    name = rng.choice(sorted(candidates))
                    seconds = args.freeze_seconds if kind == "freeze" else None
                    event = Event(kind=kind, name=name, step=swarm_step, seconds=seconds)  # type: ignore[arg-type]
                    fired_wall = time.time()  # before the signal: a restart's fire also waits and spawns
                    line = cluster.fire(event, swarm_step)
                    print(f"chaos {strategy}: {now:7.1f} s, swarm step {swarm_step}: {line}", flush=True)
                    events.append(event.record() | {"at_seconds": round(now, 2), "at_wall": round(fired_wall, 3)})
                    if kind == "restart":
                        restarting[name] = (now, swarm_step)
                        next_kill += args.kill_every
                    else:
                        next_freeze += args.freeze_every
            cluster.thaw_due()
            time.sleep(cluster.pause())
    finally:
        cluster.stop()
    exit_codes = {name: proc.returncode for name, proc in cluster.procs.items()}
    result = analyse(out, cluster.names, exit_codes, events, args, strategy, timed_out, snapshot_every)
    result["restart_seconds"] = [round(seconds, 2) for seconds in restart_seconds]
    return result


def analyse(
    out: Path,
    names: list[str],
    exit_codes: dict[str, int | None],
    events: list[dict[str, Any]],
    args: argparse.Namespace,
    strategy: str,
    timed_out: bool,
    snapshot_every: int,
) -> dict[str, Any]:
    first_done: dict[int, float] = {}  # swarm step -> earliest wall time any peer completed it
    trained: set[tuple[str, int]] = set()
    finals: dict[str, dict[str, Any]] = {}
    for name in names:
        for row in read_jsonl(out / name / "metrics.jsonl"):
            if row.get("final"):
                finals[name] = row
            elif "loss" in row and "wall" in row:
                step = int(row["step"])
                first_done[step] = min(first_done.get(step, float("inf")), float(row["wall"]))
                if row.get("shards", 1):
                    trained.add((name, step))
    steps = sorted(first_done)
    times = [first_done[s] for s in steps]
    # The swarm step over time: gaps between successive new maxima of the completed steps.
    frontier: list[float] = []
    best = -1
    for step, at in sorted(first_done.items(), key=lambda item: item[1]):
        if step > best:
            best = step
            frontier.append(at)
    gaps = [b - a for a, b in itertools.pairwise(frontier)]
    longest = sorted(itertools.pairwise(frontier), key=lambda pair: pair[0] - pair[1])[:STALLS_KEPT]
    training_seconds = (max(times) - min(times)) if times else 0.0
    per_step = statistics.median(gaps) if gaps else None
    losses = [float(row["test_loss"]) for row in finals.values() if row.get("test_loss") is not None]
    identity = bit_identity(out, names, snapshot_every)
    identity["conflicting_rounds"] = conflicting_rounds(out, names)
    return {
        "strategy": strategy,
        "exit_codes": exit_codes,
        "timed_out": timed_out,
        "events": events,
        "steps_reached": max(steps) + 1 if steps else 0,
        "training_seconds": round(training_seconds, 2),
        "samples": len(trained) * args.batch_size,
        "goodput_samples_per_second": round(len(trained) * args.batch_size / training_seconds, 2)
        if training_seconds
        else None,
        "median_step_seconds": round(per_step, 4) if per_step is not None else None,
        "longest_stall_seconds": round(max(gaps), 3) if gaps else None,
        "longest_stalls": [stall_causes(out, names, start, end) for start, end in longest],
        "attempt_endings": attempt_endings(out, names),
        "detection": detection_latencies(out, names, events),
        "final_test_loss": statistics.fmean(losses) if losses else None,
        "peers_at_end": sorted(finals),
        "identity": identity,
    }


def log_lines(out: Path, names: list[str]) -> list[tuple[float, str, str]]:
    """(wall time, peer, message) of every log line of every peer (all its lives), in time order."""
    lines = []
    for name in names:
        path = out / name / "peer.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            match = LOG_LINE.match(line)
            if match:
                at = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                lines.append((at, name, match[2]))
    return sorted(lines)


def stall_causes(out: Path, names: list[str], start: float, end: float) -> dict[str, Any]:
    """What the peers logged during one stall (between two new swarm steps): how the attempts
    ended (``p2pdl.strategies.allreduce_round`` logs each with its cause), whether a peer waited below
    quorum, and the resyncs."""
    causes: Counter[str] = Counter()
    for at, _, message in log_lines(out, names):
        if start <= at <= end:
            for marker, cause in STALL_MARKERS.items():
                if marker in message:
                    causes[cause] += 1
    return {"seconds": round(end - start, 3), "from_wall": round(start, 3), "causes": dict(sorted(causes.items()))}


def detection_latencies(out: Path, names: list[str], events: list[dict[str, Any]]) -> dict[str, Any]:
    """How long the survivors took to declare each fault's victim dead, measured in this run.

    For each kill and freeze that fired: the seconds from the signal to the first survivor's
    "declared dead" log line about the victim (its graph is rebuilt there, which is when the
    exact rounds stop waiting for the victim, PROTOCOL.md §11.3) and to the last one's, and the
    first survivor's limit crossing (``crossed_seconds``; the line follows it by up to a quarter
    of a gossip period plus the event loop's lag). A declaration belongs to a fault if it comes
    within :data:`DETECTION_WINDOW` seconds and before the next fault on the same victim; a
    survivor that had a fault of its own from 30 s before the signal on is left out (a restarted
    one hears of the victim late, through relays). A killed peer that was back before any
    survivor's limit passed is never declared: such events are counted, not timed. Per kind: the
    events, how many were declared, and the first survivor's latency (median, max)."""
    declared: dict[str, list[tuple[float, float, str]]] = defaultdict(list)  # victim -> (line, crossed, survivor)
    for at, survivor, message in log_lines(out, names):
        match = DECLARED_DEAD.search(message)
        if match:
            declared[match[1]].append((at, at - (float(match[2]) - float(match[3])), survivor))
    fired = [e for e in events if e.get("at_wall") is not None and e.get("fired_step") is not None]
    per_event = []
    for event in fired:
        start, victim = event["at_wall"], event["name"]
        later = [e["at_wall"] for e in fired if e["name"] == victim and e["at_wall"] > start]
        end = min([start + DETECTION_WINDOW, *later])
        busy = {e["name"] for e in fired if e["name"] != victim and start - 30.0 <= e["at_wall"] <= end}
        first: dict[str, tuple[float, float]] = {}
        for line_at, crossed, survivor in sorted(declared[victim]):
            if survivor != victim and survivor not in busy and start <= line_at <= end:
                first.setdefault(survivor, (line_at - start, crossed - start))
        per_event.append(
            {
                "kind": event["kind"],
                "name": victim,
                "at_seconds": event["at_seconds"],
                "seconds": event.get("seconds"),
                "first_seconds": round(min(v[0] for v in first.values()), 3) if first else None,
                "crossed_seconds": round(min(v[1] for v in first.values()), 3) if first else None,
                "last_seconds": round(max(v[0] for v in first.values()), 3) if first else None,
                "survivors_declaring": len(first),
                "survivors_left_out": sorted(busy),
            }
        )
    summary: dict[str, Any] = {"events": per_event}
    for kind in ("freeze", "restart"):
        timed = [e["first_seconds"] for e in per_event if e["kind"] == kind and e["first_seconds"] is not None]
        summary[kind] = {
            "events": sum(1 for e in per_event if e["kind"] == kind),
            "declared": len(timed),
            "first_median_seconds": round(statistics.median(timed), 3) if timed else None,
            "first_max_seconds": round(max(timed), 3) if timed else None,
        }
    # What a freeze cost the swarm at most before the survivors stopped waiting: its detection, or
    # the whole freeze when nobody declared the victim dead before it thawed.
    waits = [
        e["first_seconds"] if e["first_seconds"] is not None else e["seconds"]
        for e in per_event
        if e["kind"] == "freeze" and (e["first_seconds"] is not None or e["seconds"] is not None)
    ]
    summary["freeze"]["slowest_seconds"] = round(max(waits), 3) if waits else None
    return summary


def attempt_endings(out: Path, names: list[str]) -> dict[str, int]:
    """How the attempts that lacked a frame ended, summed over every peer's last life."""
    total: Counter[str] = Counter()
    for name in names:
        path = out / name / "summary.json"
        if path.exists():
            figures = json.loads(path.read_text()).get("strategy_status", {})
            total.update(figures.get("attempt_endings", {}))
    return dict(sorted(total.items()))


def conflicting_rounds(out: Path, names: list[str]) -> list[int] | None:
    """Exact rounds that two peers applied over different group epochs (PROTOCOL.md §11.4), from
    every peer's last life (``applied_epochs`` in summary.json); None when no peer recorded any."""
    held: dict[int, int] = {}
    conflicts: set[int] = set()
    recorded = False
    for name in names:
        path = out / name / "summary.json"
        runs = json.loads(path.read_text()).get("strategy_status", {}).get("applied_epochs") if path.exists() else None
        if runs is None:
            continue
        recorded = True
        for first, last, epoch in runs:
            for round_index in range(first, last + 1):
                if held.setdefault(round_index, epoch) != epoch:
                    conflicts.add(round_index)
    return sorted(conflicts) if recorded else None


def bit_identity(out: Path, names: list[str], every: int) -> dict[str, Any]:
    """Compare, at each snapshot step, the snapshots of every peer that wrote one."""
    by_step: dict[int, list[Path]] = defaultdict(list)
    for name in names:
        for path in (out / name / "snapshots").glob("step_*.pt"):
            by_step[int(path.stem.split("_")[1])].append(path)
    compared, differed = 0, []
    for step, paths in sorted(by_step.items()):
        if len(paths) < 2 or step % every:
            continue
        flats = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
        same = all(torch.equal(flat, flats[0]) for flat in flats[1:])
        compared += 1
        if not same:
            differed.append(step)
    return {"steps_compared": compared, "steps_differing": differed, "always_identical": compared > 0 and not differed}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    provenance = Provenance(argv)
    rows = []
    for strategy in args.strategies:
        clean = run_swarm(args, strategy, chaos=False)
        chaotic = run_swarm(args, strategy, chaos=True)
        detection = args.detection_seconds if args.detection_seconds is not None else 30.0
        row: dict[str, Any] = {"strategy": strategy, "clean": clean, "chaos": chaotic}
        if clean["goodput_samples_per_second"] and chaotic["goodput_samples_per_second"]:
            row["goodput_ratio"] = round(chaotic["goodput_samples_per_second"] / clean["goodput_samples_per_second"], 3)
        if clean["final_test_loss"] and chaotic["final_test_loss"]:
            row["final_loss_vs_clean"] = round(chaotic["final_test_loss"] / clean["final_test_loss"] - 1, 4)
        if chaotic["median_step_seconds"] is not None:
            row["stall_target_seconds"] = round(2 * chaotic["median_step_seconds"] + detection, 3)
        row["detection_seconds"] = detection
        measured = chaotic["detection"]["freeze"]["slowest_seconds"]
        if chaotic["median_step_seconds"] is not None and measured is not None:
            # The same target with the slowest freeze detection this run actually paid.
            row["stall_target_measured_seconds"] = round(2 * chaotic["median_step_seconds"] + measured, 3)
        rows.append(row)
    result = {
        "workload": "gpt_tiny",
        "peers": args.peers,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "local_steps": args.local_steps,
        "kill_every_seconds": args.kill_every,
        "freeze_every_seconds": args.freeze_every,
        "freeze_seconds": args.freeze_seconds,
        "rows": rows,
    }
    write_result(args.results, "chaos", result, provenance)
    print("| strategy | goodput chaos/clean | final loss vs clean | longest stall (target) | bit-identical |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        chaotic = row["chaos"]
        identity = chaotic["identity"]
        print(
            f"| {row['strategy']} | {row.get('goodput_ratio')} | {row.get('final_loss_vs_clean')} | "
            f"{chaotic['longest_stall_seconds']} s ({row.get('stall_target_seconds')} s) | "
            f"{identity['always_identical']} ({identity['steps_compared']} steps compared) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
