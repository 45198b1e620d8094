#!/usr/bin/env python3
"""Compute-bound step time: overlapped all-reduce against the same peers training alone.

    MALLOC_MMAP_THRESHOLD_=268435456 .venv/bin/python benchmarks/overlap_allreduce.py
    .venv/bin/python benchmarks/overlap_allreduce.py --peers 2 4 --steps 30 --repeats 2

For each peer count N, three rows run in one invocation, interleaved ``--repeats`` times so
that a change in the machine's load hits all of them alike:

* ``alone``: N concurrent ``p2pdl peer`` processes, each the only member of its own swarm (an
  all-reduce of one, which exchanges nothing). On a shared machine this is the fair baseline:
  the N peers of a swarm share the cores too, so "the peer alone" must be N processes at once.
* ``allreduce``: one swarm of N peers, ``strategy.kind = "allreduce"``: flatten, reduce-scatter
  and all-gather after backward, write-back.
* ``overlap``: the same swarm with ``strategy.overlap = true``: buckets of ``--bucket-mb``
  reduced from backward hooks while backward runs, gradients as views of the buckets.

Per row: the step time (the median over peers of each peer's median seconds between
consecutive steps, after ``--warmup`` steps) and its ratio to ``alone``; and the per-step phase
times every all-reduce peer records (``phase_seconds`` in its ``summary.json``): forward +
backward, the wait in ``reduce_gradients`` (the whole exchange without overlap, only the
buckets' tail with it), and the copies (flatten + write-back; with overlap, rebinding the
gradients). A ratio above the target says which phase holds it back.

Workload (default ``peers/gpt_tiny.py``, 834k parameters, one torch thread per process):
forward and backward of a small GPT, so the step is compute-bound on a CPU. The result goes to
``benchmarks/results/overlap_allreduce.json`` through :mod:`_provenance`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _provenance import Provenance, write_result
from time_to_accuracy import free_ports, write_toml

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "overlap_allreduce.json"
PEER_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "268435456"}
ROUND_TIMEOUT = 60.0  # seconds: a slow machine must not look like a missing peer
TARGET = 1.15  # issue 13: overlapped step time <= 1.15x the peer alone


def _config(path: Path, names: list[str], args: argparse.Namespace, strategy: dict[str, Any]) -> Path:
    data = {
        "run": {
            "workload": str((REPO / args.workload).resolve()),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "optimizer": "sgd",
            "lr": 0.01,
            "eval_every": 0,
            "torch_threads": 1,
        },
        "strategy": {"kind": "allreduce", "round_timeout": ROUND_TIMEOUT, **strategy},
        "topology": {"kind": "full"},
        "transport": {"startup_timeout": 180.0},
        "membership": {"suspect_after": ROUND_TIMEOUT, "dead_after": 2 * ROUND_TIMEOUT},
        "peers": [
            {"name": n, "address": f"127.0.0.1:{port}"} for n, port in zip(names, free_ports(len(names)), strict=True)
        ],
    }
    write_toml(data, path)
    return path


def _run(configs: list[tuple[Path, str]], out: Path, timeout: float) -> list[Path]:
    """Start one ``p2pdl peer`` per (config, name) at once and wait for all; the output folders."""
    env = {**os.environ, **PEER_ENV}
    procs, logs, dirs = [], [], []
    try:
        for config, name in configs:
            peer_out = out / f"{config.stem}-{name}"
            peer_out.mkdir(parents=True, exist_ok=True)
            dirs.append(peer_out)
            logs.append(open(peer_out / "peer.log", "wb"))  # noqa: SIM115 - closed below
            command = [
                sys.executable, "-m", "p2pdl.cli", "peer", "--config", str(config), "--name", name,
                "--out", str(peer_out),
            ]  # fmt: skip
            procs.append(subprocess.Popen(command, stdout=logs[-1], stderr=subprocess.STDOUT, env=env, cwd=REPO))
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    failed = [d.name for d, p in zip(dirs, procs, strict=True) if p.returncode != 0]
    if failed:
        tail = (dirs[0] / "peer.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"peers {failed} failed:\n{tail}")
    return dirs


def _step_seconds(peer_out: Path, warmup: int) -> float:
    rows = [json.loads(line) for line in (peer_out / "metrics.jsonl").read_text().splitlines()]
    walls = [row["wall"] for row in rows if "loss" in row and "wall" in row]
    deltas = [b - a for a, b in zip(walls[warmup:], walls[warmup + 1 :], strict=False)]
    return statistics.median(deltas)


def _phases(peer_out: Path, steps: int) -> dict[str, float]:
    summary = json.loads((peer_out / "summary.json").read_text())
    phases = summary["strategy_status"]["phase_seconds"]
    return {phase: seconds / steps for phase, seconds in phases.items()}


def _row(dirs: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    per_peer = [_step_seconds(d, args.warmup) for d in dirs]
    phases = [_phases(d, args.steps) for d in dirs]
    return {
        "step_seconds": statistics.median(per_peer),
        "step_seconds_per_peer": [round(s, 5) for s in per_peer],
        "phase_seconds_per_step": {k: round(statistics.median(p[k] for p in phases), 5) for k in phases[0]},
    }


def measure(peers: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    names = [f"p{i}" for i in range(peers)]
    rows: dict[str, list[dict[str, Any]]] = {"alone": [], "allreduce": [], "overlap": []}
    timeout = 60.0 + 10.0 * args.steps
    for repeat in range(args.repeats):
        base = work / f"n{peers}-r{repeat}"
        base.mkdir(parents=True)
        alone = [(_config(base / f"alone{i}.toml", [name], args, {}), name) for i, name in enumerate(names)]
        rows["alone"].append(_row(_run(alone, base, timeout), args))
        plain = _config(base / "allreduce.toml", names, args, {})
        rows["allreduce"].append(_row(_run([(plain, n) for n in names], base, timeout), args))
        overlapped = _config(base / "overlap.toml", names, args, {"overlap": True, "bucket_mb": args.bucket_mb})
        rows["overlap"].append(_row(_run([(overlapped, n) for n in names], base, timeout), args))
        figures = ", ".join(f"{k} {v[-1]['step_seconds']:.4f} s" for k, v in rows.items())
        print(f"{peers} peers, repeat {repeat}: {figures}", flush=True)
    result: dict[str, Any] = {}
    alone_seconds = statistics.median(r["step_seconds"] for r in rows["alone"])
    for label, repeats in rows.items():
        seconds = statistics.median(r["step_seconds"] for r in repeats)
        result[label] = {
            "step_seconds": round(seconds, 5),
            "ratio_to_alone": round(seconds / alone_seconds, 3),
            "phase_seconds_per_step": repeats[len(repeats) // 2]["phase_seconds_per_step"],
            "repeats": repeats,
        }
    result["overlap_meets_target"] = result["overlap"]["ratio_to_alone"] <= TARGET
    return result


def table(by_peers: dict[str, dict[str, Any]]) -> str:
    """The markdown rows of docs/BENCHMARKS.md section 18 (rendered from this JSON)."""
    lines = [
        "| peers | row | step (s) | vs alone | fwd + bwd (s/step) | wait in reduce (s/step) | copies (s/step) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for peers, rows in by_peers.items():
        for label in ("alone", "allreduce", "overlap"):
            row = rows[label]
            phases = row["phase_seconds_per_step"]
            lines.append(
                f"| {peers} | {label} | {row['step_seconds']:.4f} | {row['ratio_to_alone']:.3f}\u00d7 | "
                f"{phases['forward_backward']:.4f} | {phases['reduce']:.4f} | {phases['copies']:.4f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="peers/gpt_tiny.py")
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the step time")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bucket-mb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    provenance = Provenance()
    with tempfile.TemporaryDirectory(prefix="overlap-bench-") as work:
        by_peers = {str(n): measure(n, args, Path(work)) for n in args.peers}
    result = {
        "workload": args.workload,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "bucket_mb": args.bucket_mb,
        "target_ratio": TARGET,
        "peers": by_peers,
        "table": table(by_peers),
    }
    write_result(args.out, "overlap_allreduce", result, provenance)
    print(result["table"])


if __name__ == "__main__":
    main()
