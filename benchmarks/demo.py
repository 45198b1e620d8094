"""The demo's figures (README, ``make demo``) with their provenance: one run of the local cluster.

Runs ``scripts/local_cluster.py CONFIG --out DIR --no-progress`` exactly as ``make demo`` does
(same allocator environment, one process per peer on this machine), then writes the cluster's
summary (mean test accuracy, final consensus distance, wall time, per-peer steps and bytes) to
a result JSON with the command, commit and load average, and which peers had to build the
dataset cache first (a first run on a machine does; that time is in the wall time). Nothing is
averaged: one run is one sample, and on a shared machine its wall time moves with the load
recorded next to it, while accuracy and consensus distance depend on the interleaving of gossip
rounds and vary a little from run to run.

Reproduce::

    python benchmarks/demo.py [--config configs/ring4.toml] [--out benchmarks/results/demo.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from _provenance import REPO, Provenance, repo_relative, write_result

# What `make demo` sets for the peers (see the Makefile and p2pdl/_malloc.py).
DEMO_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
SUMMARY_KEYS = (
    "config",
    "strategy",
    "topology",
    "steps",
    "mean_test_accuracy",
    "final_consensus_distance",
    "wall_seconds",
    "threads_per_peer",
)


def busy_addresses(config: Path) -> list[str]:
    """The configured peer addresses something on this machine already listens on."""
    busy = []
    for peer in tomllib.loads(config.read_text())["peers"]:
        host, _, port = peer["address"].rpartition(":")
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((host, int(port))) == 0:
                busy.append(peer["address"])
    return busy


def built_dataset(log: Path) -> bool:
    """Whether this peer's log says it built a dataset cache (p2pdl.train.datasets logs "building ...")."""
    if not log.exists():
        return False
    return any("p2pdl.train.datasets: building" in line for line in log.read_text(errors="replace").splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "ring4.toml")
    parser.add_argument(
        "--runs-dir", type=Path, help="peer outputs and logs, emptied first (default runs/bench_demo/CONFIG_STEM)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo.json")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before the cluster is stopped")
    args = parser.parse_args(argv)
    busy = busy_addresses(args.config)
    if busy:
        print(f"demo: addresses already in use: {', '.join(busy)} (another cluster running?)", file=sys.stderr)
        return 2
    # A fresh directory per config: a peer finding another run's checkpoint or logs there would mislead.
    runs_dir: Path = args.runs_dir or REPO / "runs" / "bench_demo" / args.config.stem
    shutil.rmtree(runs_dir, ignore_errors=True)
    provenance = Provenance()
    command = [
        sys.executable, str(REPO / "scripts" / "local_cluster.py"), str(args.config),
        "--out", str(runs_dir), "--no-progress", "--timeout", str(args.timeout),
    ]  # fmt: skip
    env = {**os.environ, **DEMO_ENV, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(command, cwd=REPO, env=env, check=False)
    summary_path = runs_dir / "summary.json"
    if not summary_path.exists():
        print(f"demo: no {summary_path} (local_cluster exited {completed.returncode})", file=sys.stderr)
        return 1
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    result = {key: summary.get(key) for key in SUMMARY_KEYS}
    result["config"] = repo_relative(args.config)
    # A peer that builds the dataset cache (first run on a machine) spends that time before training.
    result["dataset_built_by"] = [
        peer["name"] for peer in summary.get("peers", []) if built_dataset(runs_dir / peer["name"] / "peer.log")
    ]
    result["local_cluster_exit_code"] = completed.returncode
    result["peers"] = [
        {key: peer.get(key) for key in ("name", "exit_code", "steps", "test_accuracy", "bytes_sent", "rounds")}
        for peer in summary.get("peers", [])
    ]
    write_result(args.out, "demo", result, provenance)
    print(f"wrote {args.out}")
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
