#!/usr/bin/env python3
"""Time to accuracy: p2pdl gossip on a ring against the same processes under DDP/gloo.

    python benchmarks/time_to_accuracy.py [configs/ring4.toml] [--steps 1500] [--eval-every 50]

Both systems train the same run config (workload, init, shards, batch order, optimizer, steps)
with one process per ``[[peers]]`` entry and ``OMP_NUM_THREADS=1`` each, one after the other in
the same invocation: first p2pdl through ``scripts/local_cluster.py`` (decentralized SGD, each
peer averaging parameters with its two ring neighbours every step), then
``benchmarks/ddp_reference.py`` (exact gradient averaging, gloo all-reduce). Both evaluate on the
MNIST-1D test set every ``--eval-every`` steps.

For each threshold (default 90% and 93% test accuracy) it reports the first evaluation at which
the *mean* accuracy over peers (ranks) reached it: the time (seconds since each process began
training, including connecting to its peers, the slowest peer's clock) and the samples seen,
``steps * batch_size * peers``. It also reports the final mean accuracy and the wall time of
each whole run as its launcher measures it, from spawning the processes to reaping the last
one (so it includes interpreter start-up, imports, loading data and exit; the JSON also has the
launcher's own start-up and p2pdl's plotting, as ``wall_seconds``). The ports of the config are replaced by free
ones so a run never collides with a cluster already on the default ports.

Writes ``benchmarks/results/time_to_accuracy.json`` and prints a markdown table. Trade-off:
evaluation is synchronous in both systems and its cost is inside the timings; it is the same
cost for both, and evaluating less often would only make the first-crossing step coarser.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

from _provenance import Provenance, repo_relative, write_result

from p2pdl.net.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "ring4.toml"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "time_to_accuracy.json"
DEFAULT_THRESHOLDS = (0.90, 0.93)
RUN_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, help="steps for both systems (default run.steps)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (default 50)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "time_to_accuracy", help="run outputs")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON results file")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per system")
    args = parser.parse_args(argv)
    if args.eval_every < 1:
        parser.error(f"--eval-every must be >= 1, got {args.eval_every}")
    return args


# --------------------------------------------------------------------------- config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML value")


def write_toml(data: dict[str, Any], path: Path) -> None:
    """Tables of scalars and arrays of tables: the shape of every p2pdl config."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines += [f"[{key}]", *(f"{k} = {_toml_value(v)}" for k, v in value.items()), ""]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for table in value:
                lines += [f"[[{key}]]", *(f"{k} = {_toml_value(v)}" for k, v in table.items()), ""]
        else:
            lines.insert(0, f"{key} = {_toml_value(value)}")
    path.write_text("\n".join(lines))


def derived_config(source: Path, out: Path, *, eval_every: int) -> tuple[Path, dict[str, Any]]:
    """A copy of ``source`` on free ports, with the workload path made absolute."""
    data = tomllib.loads(source.read_text())
    run = data["run"]
    run["workload"] = str((source.resolve().parent / run["workload"]).resolve())
    run["eval_every"] = eval_every
    ports = free_ports(len(data["peers"]))
    for peer, port in zip(data["peers"], ports, strict=True):
        peer["address"] = f"127.0.0.1:{port}"
    path = out / f"{source.stem}.toml"
    write_toml(data, path)
    return path, data


# --------------------------------------------------------------------------- runs


def run_system(command: list[str], log: Path, timeout: float) -> float:
    """Run a launcher to completion; return its wall time in seconds (raises on failure)."""
    started = time.perf_counter()
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **RUN_ENV}, cwd=REPO
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # both launchers stop and reap their workers on SIGTERM
            proc.wait(timeout=60)
            raise
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{command[1]} exited {code}; see {log}")
    return wall


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def accuracy_curve(metric_files: list[Path]) -> list[dict[str, float]]:
    """Mean test accuracy over processes at each evaluation that every process made.

    ``steps`` counts the steps done (the record's 0-based ``step`` + 1); ``time`` is the latest
    of the processes' clocks at that step, i.e. when the last one got there.
    """
    by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for path in metric_files:
        for row in read_jsonl(path):
            if "test_accuracy" in row:
                by_step[int(row["step"]) + 1].append((float(row["test_accuracy"]), float(row["time"])))
    curve = []
    for steps in sorted(by_step):
        points = by_step[steps]
        if len(points) == len(metric_files):
            curve.append(
                {
                    "steps": steps,
                    "mean_accuracy": sum(a for a, _ in points) / len(points),
                    "time": max(t for _, t in points),
                }
            )
    return curve


def first_crossings(
    curve: list[dict[str, float]], thresholds: list[float], samples_per_step: int
) -> dict[str, dict[str, float] | None]:
    result: dict[str, dict[str, float] | None] = {}
    for threshold in thresholds:
        hit = next((point for point in curve if point["mean_accuracy"] >= threshold), None)
        result[f"{threshold:g}"] = (
            None
            if hit is None
            else {
                "steps": hit["steps"],
                "samples": int(hit["steps"]) * samples_per_step,
                "time": hit["time"],
                "mean_accuracy": hit["mean_accuracy"],
            }
        )
    return result


def summarize(
    name: str,
    metric_files: list[Path],
    thresholds: list[float],
    samples_per_step: int,
    wall: float,
    launcher_wall: float | None,
) -> dict[str, Any]:
    curve = accuracy_curve(metric_files)
    return {
        "system": name,
        "thresholds": first_crossings(curve, thresholds, samples_per_step),
        "final_mean_accuracy": curve[-1]["mean_accuracy"] if curve else None,
        "final_steps": curve[-1]["steps"] if curve else None,
        "training_seconds": curve[-1]["time"] if curve else None,
        "wall_seconds": round(wall, 3),
        "launcher_wall_seconds": launcher_wall,
        "curve": curve,
    }


# --------------------------------------------------------------------------- report


def _cell(entry: dict[str, float] | None, field: str) -> str:
    if entry is None:
        return "not reached"
    if field == "samples":
        return f"{int(entry['samples']):,}"
    return f"{entry['time']:.1f} s (step {int(entry['steps'])})"


def markdown_table(systems: list[dict[str, Any]], thresholds: list[float]) -> str:
    low, high = (f"{t:g}" for t in (thresholds[0], thresholds[-1]))
    header = (
        f"| system | time to {float(low):.0%} | samples to {float(low):.0%} | time to {float(high):.0%} "
        "| final mean accuracy | wall time of the whole run |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for system in systems:
        crossings = system["thresholds"]
        final = system["final_mean_accuracy"]
        lines.append(
            f"| {system['system']} | {_cell(crossings[low], 'time')} | {_cell(crossings[low], 'samples')} "
            f"| {_cell(crossings[high], 'time')} | {final:.4f} | {system['launcher_wall_seconds']:.1f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    provenance = Provenance([__file__, *(argv if argv is not None else sys.argv[1:])])
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    thresholds = sorted(args.thresholds)
    config, data = derived_config(args.config, out, eval_every=args.eval_every)
    steps = args.steps or int(data["run"].get("steps", 600))
    names = [peer["name"] for peer in data["peers"]]
    samples_per_step = int(data["run"].get("batch_size", 32)) * len(names)
    loads: dict[str, list[float]] = {}

    loads["p2pdl_before"] = list(os.getloadavg())
    p2pdl_out = out / "p2pdl"
    p2pdl_command = [
        sys.executable, str(REPO / "scripts" / "local_cluster.py"), str(config),
        "--steps", str(steps), "--out", str(p2pdl_out), "--threads", "1", "--no-progress",
        "--timeout", str(args.timeout),
    ]  # fmt: skip
    p2pdl_wall = run_system(p2pdl_command, out / "p2pdl.log", args.timeout + 120)
    cluster = json.loads((p2pdl_out / "summary.json").read_text())

    loads["ddp_before"] = list(os.getloadavg())
    ddp_out = out / "ddp"
    ddp_command = [
        sys.executable, str(REPO / "benchmarks" / "ddp_reference.py"), str(config),
        "--steps", str(steps), "--out", str(ddp_out), "--eval-every", str(args.eval_every),
        "--timeout", str(args.timeout),
    ]  # fmt: skip
    ddp_wall = run_system(ddp_command, out / "ddp.log", args.timeout + 120)
    reference = json.loads((ddp_out / "summary.json").read_text())
    loads["after"] = list(os.getloadavg())

    topology = data.get("topology", {}).get("kind", "ring")
    strategy = data.get("strategy", {}).get("kind", "gossip")
    systems = [
        summarize(
            f"p2pdl {strategy}, {topology} of {len(names)}",
            [p2pdl_out / name / "metrics.jsonl" for name in names],
            thresholds,
            samples_per_step,
            p2pdl_wall,
            cluster.get("wall_seconds"),
        ),
        summarize(
            f"DDP (gloo), {len(names)} ranks",
            [ddp_out / f"rank{rank}" / "metrics.jsonl" for rank in range(len(names))],
            thresholds,
            samples_per_step,
            ddp_wall,
            reference.get("wall_seconds"),
        ),
    ]
    table = markdown_table(systems, thresholds)
    result = {
        "config": repo_relative(args.config),
        "steps": steps,
        "eval_every": args.eval_every,
        "peers": len(names),
        "batch_size": int(data["run"].get("batch_size", 32)),
        "lr": data["run"].get("lr"),
        "thresholds": thresholds,
        "omp_num_threads_per_process": 1,
        "load_average_by_phase": loads,
        "systems": systems,
        "table": table,
    }
    write_result(args.results, "time_to_accuracy", result, provenance)
    print(table)
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
