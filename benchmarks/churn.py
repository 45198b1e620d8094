#!/usr/bin/env python3
"""Churn: how fast a ring notices a lost peer, and how fast a joiner downloads an 11M-parameter state.

    python benchmarks/churn.py                      # both measurements, writes results/churn.json
    python benchmarks/churn.py --only detection     # or: --only transfer
    python benchmarks/churn.py --kills 3 --transfers 3 --gossip-interval 0.25 --dead-after 3

Every peer is a real ``p2pdl peer`` process on 127.0.0.1 with ``OMP_NUM_THREADS=1`` and the glibc
allocator settings of ``p2pdl._malloc`` in its environment.

**Detection latency.** Eight peers train the MNIST-1D CNN with synchronous gossip on a ring. One
after another, ``--kills`` non-adjacent peers (p2, p5, p7) get SIGKILL; for each, the latency of
each of its ring neighbours is the wall-clock ``time`` of the neighbour's first ``rewires`` record
(from ``/status``) that removes the victim, minus the moment just before the signal was sent. A
killed peer says nothing, so only the failure detector can notice: a neighbour declares it dead
``dead_after`` after it *received* the victim's last heartbeat (up to one ``gossip_interval``
before the kill) at its next membership tick (up to one ``gossip_interval`` later), so the
expected latency is ``dead_after ± gossip_interval``. The same is then repeated in a fresh swarm with SIGTERM,
where the peer finishes its step and announces its leave, so neighbours should rewire at once.

**State transfer.** A donor trains ``benchmarks/workloads/mlp11m.py`` (11,061,610 parameters; the
state is parameters plus SGD momentum, ~88 MB) alone until it has taken a few steps. Then, one
after another, ``--transfers`` joiners start with ``--listen/--bootstrap/--join``; each writes a
``joined`` event whose ``seconds`` the joiner measures itself from the request until the state is
loaded (``GET /state`` streaming, decoding, validating, applying). The benchmark also records the
process-level time from spawning the joiner until its log says the state was loaded (interpreter
start, imports, model build, membership bootstrap included). Each joiner is stopped with SIGTERM
before the next one starts.

Trade-off: the timings come from the peers' own clocks and logs, so the benchmark polls slowly
(10 Hz) and still times to the millisecond; the price is that it trusts p2pdl's ``rewires`` and
``joined`` records, which the churn tests check independently.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _provenance import Provenance, write_result

from p2pdl.net.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "churn.json"
CNN_WORKLOAD = REPO / "peers" / "mnist1d_cnn.py"
BIG_WORKLOAD = REPO / "benchmarks" / "workloads" / "mlp11m.py"
PEER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
RING = [f"p{i}" for i in range(8)]
VICTIMS = ("p2", "p5", "p7")  # never adjacent in the ring that is left after the earlier ones
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["detection", "transfer"], help="run one measurement only")
    parser.add_argument("--kills", type=int, default=3, choices=[1, 2, 3], help="victims per signal (default 3)")
    parser.add_argument("--transfers", type=int, default=3, help="joiners in the state-transfer run (default 3)")
    parser.add_argument("--gossip-interval", type=float, default=0.25, help="membership.gossip_interval, seconds")
    parser.add_argument("--suspect-after", type=float, default=1.5, help="membership.suspect_after, seconds")
    parser.add_argument("--dead-after", type=float, default=3.0, help="membership.dead_after, seconds")
    parser.add_argument("--round-timeout", type=float, default=2.0, help="strategy.round_timeout, seconds")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "churn_bench", help="peer outputs and logs")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    if args.transfers < 1:
        parser.error("--transfers must be >= 1")
    return args


def write_config(path: Path, *, workload: Path, peers: dict[str, int], run: dict[str, Any], args: Any) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "run": {"workload": str(workload), "eval_every": 0, "batch_size": 32, "lr": 0.05, "momentum": 0.9, **run},
        "strategy": {"kind": "gossip", "round_timeout": args.round_timeout},
        "topology": {"kind": "ring"},
        "transport": {"startup_timeout": 120.0},
        "membership": {
            "gossip_interval": args.gossip_interval,
            "gossip_timeout": min(1.0, args.suspect_after),
            "suspect_after": args.suspect_after,
            "dead_after": args.dead_after,
        },
        "checkpoint": {"every": 0},
    }
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    for name, port in peers.items():
        lines += ["[[peers]]", f'name = "{name}"', f'address = "127.0.0.1:{port}"', ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


class Processes:
    """``p2pdl peer`` processes; every one is stopped and reaped on close."""

    def __init__(self, out: Path) -> None:
        # Fresh outputs: peers append to metrics.jsonl, and a stale 'joined' event must not be read.
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        self.out = out
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    def start(self, config: Path, name: str, *extra: str) -> subprocess.Popen[bytes]:
        folder = self.out / name
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "peer.log", "wb")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        command = [
            sys.executable, "-m", "p2pdl.cli", "peer",
            "--config", str(config), "--name", name, "--out", str(folder), *extra,
        ]  # fmt: skip
        env = {**os.environ, **PEER_ENV}
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.out / name / "peer.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


def status(port: int) -> dict[str, Any]:
    with _OPENER.open(f"http://127.0.0.1:{port}/status", timeout=2) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def ring_neighbors(live: list[str], name: str) -> list[str]:
    index = live.index(name)
    return sorted({live[index - 1], live[(index + 1) % len(live)]})


# ---------------------------------------------------------------------------- detection


def detection_run(args: argparse.Namespace, how: signal.Signals) -> list[dict[str, Any]]:
    """Eight peers; send ``how`` to each victim in turn; per neighbour, the signal-to-rewire time."""
    label = how.name.lower()
    out = args.out / f"detection_{label}"
    ports = dict(zip(RING, free_ports(len(RING)), strict=True))
    procs = Processes(out)
    config = write_config(out / "swarm.toml", workload=CNN_WORKLOAD, peers=ports, run={"steps": 1_000_000}, args=args)
    events: list[dict[str, Any]] = []
    try:
        for name in RING:
            procs.start(config, name)
        wait_for(lambda: all(status(p)["step"] >= 30 for p in ports.values()), 180, "every peer at step 30")
        live = list(RING)
        for victim in VICTIMS[: args.kills]:
            neighbors = ring_neighbors(live, victim)
            time.sleep(2.0)  # steady state: every link up, a complete round just done
            step = status(ports[victim])["step"]
            sent = time.time()
            procs.procs[victim].send_signal(how)
            rewired: dict[str, float] = {}

            def all_rewired(
                victim: str = victim,
                sent: float = sent,
                rewired: dict[str, float] = rewired,
                neighbors: list[str] = neighbors,
            ) -> bool:
                for neighbor in neighbors:
                    if neighbor in rewired:
                        continue
                    for record in status(ports[neighbor])["rewires"]:
                        if victim in record["removed"] and record["time"] >= sent:
                            rewired[neighbor] = record["time"] - sent
                            break
                return len(rewired) == len(neighbors)

            wait_for(all_rewired, 60, f"{neighbors} to rewire around {victim}")
            live.remove(victim)
            # Every survivor's view must drop the victim too (non-neighbours do not rewire).
            wait_for(
                lambda victim=victim: all(victim not in status(ports[n])["live_members"] for n in live),
                30,
                f"every survivor to drop {victim}",
            )
            detected_by_all = time.time() - sent
            code = procs.procs[victim].wait(timeout=60)
            events.append(
                {
                    "signal": how.name,
                    "victim": victim,
                    "victim_step": step,
                    "victim_exit_code": code,
                    "neighbors": rewired,
                    "all_survivors_dropped_seconds_polled": round(detected_by_all, 3),
                }
            )
            print(f"  {how.name} {victim} at step {step}: " + ", ".join(f"{n} {s:.3f}s" for n, s in rewired.items()))
    finally:
        procs.close()
    return events


def latency_stats(events: list[dict[str, Any]]) -> dict[str, Any]:
    values = [v for e in events for v in e["neighbors"].values()]
    return {
        "samples": len(values),
        "median_seconds": round(statistics.median(values), 3),
        "min_seconds": round(min(values), 3),
        "max_seconds": round(max(values), 3),
        "per_neighbor_seconds": [round(v, 3) for v in values],
    }


# ---------------------------------------------------------------------------- state transfer


def read_joined(path: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    joined = [r for r in records if r.get("event") == "joined"]
    if len(joined) != 1:
        raise RuntimeError(f"expected one 'joined' event in {path}, found {len(joined)}")
    return dict(joined[0])


def transfer_run(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = args.out / "transfer"
    ports = free_ports(1 + args.transfers)
    procs = Processes(out)
    config = write_config(
        out / "swarm.toml", workload=BIG_WORKLOAD, peers={"donor": ports[0]}, run={"steps": 1_000_000}, args=args
    )
    results: list[dict[str, Any]] = []
    try:
        procs.start(config, "donor")
        wait_for(lambda: status(ports[0])["step"] >= 5, 300, "the donor to take 5 steps")
        for index in range(args.transfers):
            name = f"joiner{index}"
            donor_step = status(ports[0])["step"]
            spawned = time.time()
            proc = procs.start(
                config,
                name,
                "--listen",
                f"127.0.0.1:{ports[1 + index]}",
                "--bootstrap",
                f"127.0.0.1:{ports[0]}",
                "--join",
            )
            wait_for(lambda name=name: "loaded state of step" in procs.log(name), 300, f"{name} to load", 0.02)
            loaded = time.time() - spawned
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
            if code != 0:
                raise RuntimeError(f"{name} exited {code}:\n{procs.log(name)[-3000:]}")
            joined = read_joined(out / name / "metrics.jsonl")
            results.append(
                {
                    "joiner": name,
                    "donor_step_before": donor_step,
                    "joined_at_step": joined["step"],
                    "fetch_seconds": round(joined["seconds"], 4),
                    "spawn_to_loaded_seconds": round(loaded, 3),
                }
            )
            print(f"  {name}: state of step {joined['step']} in {joined['seconds']:.3f}s ({loaded:.2f}s from spawn)")
            time.sleep(1.0)  # the donor rewires back to training alone
    finally:
        procs.close()
    return results


# ---------------------------------------------------------------------------- report


def detection_table(detection: dict[str, Any]) -> str:
    rows = [
        "| signal | kills | neighbour samples | median (s) | min (s) | max (s) | expected |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for how, data in detection["signals"].items():
        stats = data["stats"]
        expected = (
            f"<= dead_after + gossip_interval = {detection['expected_sigkill_seconds']:.2f} s"
            if how == "SIGKILL"
            else "immediate (announced leave)"
        )
        rows.append(
            f"| {how} | {len(data['events'])} | {stats['samples']} | {stats['median_seconds']:.3f} | "
            f"{stats['min_seconds']:.3f} | {stats['max_seconds']:.3f} | {expected} |"
        )
    return "\n".join(rows)


def transfer_table(transfers: list[dict[str, Any]]) -> str:
    rows = [
        "| joiner | state of step | request to loaded (s) | spawn to loaded (s) |",
        "|---|---:|---:|---:|",
    ]
    for t in transfers:
        rows.append(
            f"| {t['joiner']} | {t['joined_at_step']} | {t['fetch_seconds']:.3f} | {t['spawn_to_loaded_seconds']:.2f} |"
        )
    fetch = statistics.median(t["fetch_seconds"] for t in transfers)
    spawn = statistics.median(t["spawn_to_loaded_seconds"] for t in transfers)
    rows.append(f"| **median** | | **{fetch:.3f}** | **{spawn:.2f}** |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    provenance = Provenance([__file__, *(argv if argv is not None else sys.argv[1:])])
    previous: dict[str, Any] = {}
    if args.results.exists():
        previous = json.loads(args.results.read_text())
    result: dict[str, Any] = {
        "membership": {
            "gossip_interval": args.gossip_interval,
            "suspect_after": args.suspect_after,
            "dead_after": args.dead_after,
        },
        "round_timeout": args.round_timeout,
        "detection": previous.get("detection"),
        "state_transfer": previous.get("state_transfer"),
    }
    if args.only in (None, "detection"):
        detection: dict[str, Any] = {}
        for how in (signal.SIGKILL, signal.SIGTERM):
            print(f"detection: 8-peer ring, {how.name} x{args.kills}")
            events = detection_run(args, how)
            detection[how.name] = {"events": events, "stats": latency_stats(events)}
        result["detection"] = {
            # With --only, the other part keeps its own provenance from an earlier run.
            "provenance": provenance.record(),
            "peers": len(RING),
            "workload": "peers/mnist1d_cnn.py",
            "expected_sigkill_seconds": round(args.dead_after + args.gossip_interval, 3),
            "signals": detection,
        }
    if args.only in (None, "transfer"):
        print(f"state transfer: {BIG_WORKLOAD.name}, {args.transfers} joiners")
        transfers = transfer_run(args)
        result["state_transfer"] = {
            "provenance": provenance.record(),
            "workload": "benchmarks/workloads/mlp11m.py",
            "parameters": 11_061_610,
            "state_mib": round(2 * 11_061_610 * 4 / 2**20, 1),  # parameters + momentum buffers, fp32
            "target_seconds": 2.0,
            "transfers": transfers,
            "median_fetch_seconds": round(statistics.median(t["fetch_seconds"] for t in transfers), 4),
            "median_spawn_to_loaded_seconds": round(
                statistics.median(t["spawn_to_loaded_seconds"] for t in transfers), 3
            ),
        }
    if result["detection"] is not None:
        print("\n## Failure detection: signal to neighbour rewire\n")
        print(detection_table(result["detection"]))
    if result["state_transfer"] is not None:
        print("\n## State transfer: 11M-parameter model + SGD momentum, loopback\n")
        print(transfer_table(result["state_transfer"]["transfers"]))
    write_result(args.results, "churn", result, provenance)
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
