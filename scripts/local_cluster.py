#!/usr/bin/env python3
"""Start one real ``p2pdl peer`` process per configured peer on this machine and watch them.

    python scripts/local_cluster.py configs/ring4.toml [--steps N] [--out DIR]

Shows a live progress bar (mean step, mean loss, mean test accuracy) polled from every peer's
``/status``, and splits the CPU cores between peers (``OMP_NUM_THREADS``). At the end it writes
``DIR/summary.json`` (per peer: name, steps, final loss, test accuracy, bytes sent and received,
exit code, whether it was stopped before its last step; plus the final consensus distance
max_i ||x_i - x̄|| / ||x̄||, the wall time and whether ``--timeout`` cut the run short) and
``DIR/training.png`` (loss, test accuracy and consensus distance over steps). It exits non-zero
if any peer failed or the timeout stopped the peers: a peer stopped that way still evaluates and
exits 0, so its exit code alone would hide a stalled run. Ctrl+C stops every peer cleanly (SIGTERM), then reaps them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from p2pdl.config import load_config
from p2pdl.core.mixing import consensus_distance
from p2pdl.errors import ConfigError
from p2pdl.net.auth import PeerSecurity, security_from_config

# glibc maps big buffers freshly and trims the heap after each free without these, so every
# round page-faults its frame buffers back in; see p2pdl/_malloc.py.
PEER_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824", "PYTHONUNBUFFERED": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, help="override run.steps")
    parser.add_argument("--out", type=Path, help="output directory (default runs/CONFIG_STEM)")
    parser.add_argument("--threads", type=int, help="torch threads per peer (default: cores / peers, >= 1)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override run.device")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before peers are stopped")
    parser.add_argument(
        "--snapshot-every",
        type=int,
        help="steps between parameter snapshots (default run.eval_every)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and CI)")
    return parser.parse_args(argv)


def fetch_status(address: str, security: PeerSecurity) -> dict[str, Any] | None:
    """One peer's /status (authenticated and over TLS when the swarm uses them)."""
    headers = security.headers(target=None, method="GET", path="/status")
    request = urllib.request.Request(f"{security.scheme}://{address}/status", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=0.5, context=security.client_ssl) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except (urllib.error.URLError, TimeoutError, OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def flat_parameters(path: Path) -> torch.Tensor:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, torch.Tensor):
        return state.reshape(-1).to(torch.float64)
    return torch.cat([v.reshape(-1).to(torch.float64) for v in state.values() if v.is_floating_point()])


def consensus_over_steps(out: Path, names: list[str]) -> list[tuple[int, float]]:
    steps: set[int] | None = None
    for name in names:
        found = {int(p.stem.split("_")[1]) for p in (out / name / "snapshots").glob("step_*.pt")}
        steps = found if steps is None else steps & found
    series = []
    for step in sorted(steps or ()):
        vectors = [flat_parameters(out / n / "snapshots" / f"step_{step}.pt") for n in names]
        series.append((step, consensus_distance(vectors)))
    return series


def plot(out: Path, names: list[str], consensus: list[tuple[int, float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in names:
        rows = read_jsonl(out / name / "metrics.jsonl")
        losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if losses:
            window = max(1, len(losses) // 50)
            smoothed = [
                sum(v for _, v in losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                for i in range(len(losses))
            ]
            axes[0].plot([s for s, _ in losses], smoothed, label=name, linewidth=1)
        accuracy = [(r["step"] + 1, r["test_accuracy"]) for r in rows if "test_accuracy" in r]
        if accuracy:
            axes[1].plot(*zip(*accuracy, strict=True), marker=".", label=name)
    axes[0].set(title="training loss (smoothed)", xlabel="step", ylabel="loss")
    axes[1].set(title="test accuracy", xlabel="step", ylabel="accuracy")
    if consensus:
        axes[2].semilogy([s for s, _ in consensus], [max(c, 1e-12) for _, c in consensus], marker=".")
    axes[2].set(title="consensus distance max_i ||x_i - x̄|| / ||x̄||", xlabel="step")
    for axis in axes:
        axis.grid(alpha=0.3)
    if len(names) <= 10:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"local_cluster: {exc}", file=sys.stderr)
        return 2
    sec = config.security
    security = security_from_config(sec, "local-cluster")
    steps = args.steps or config.run.steps
    names = list(config.peer_names)
    out: Path = args.out or Path("runs") / args.config.stem
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(names))
    snapshot_every = args.snapshot_every if args.snapshot_every is not None else config.run.eval_every
    env = {**os.environ, **PEER_ENV, "OMP_NUM_THREADS": str(threads)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {}
    started = time.perf_counter()
    for entry in config.peers:
        peer_out = out / entry.name
        peer_out.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl", "summary.json", "model.pt"):
            (peer_out / stale).unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "p2pdl.cli", "peer",
            "--config", str(args.config), "--name", entry.name,
            "--steps", str(steps), "--out", str(peer_out),
            "--snapshot-every", str(snapshot_every),
        ]  # fmt: skip
        if args.device:
            command += ["--device", args.device]
        logs[entry.name] = open(peer_out / "peer.log", "wb")  # noqa: SIM115 - closed below
        procs[entry.name] = subprocess.Popen(command, stdout=logs[entry.name], stderr=subprocess.STDOUT, env=env)

    bar = tqdm(total=steps, desc="swarm", unit="step", disable=args.no_progress, dynamic_ncols=True)
    interrupted = False
    timed_out = False
    try:
        while any(p.poll() is None for p in procs.values()):
            if time.perf_counter() - started > args.timeout:
                print(f"local_cluster: timeout after {args.timeout}s, stopping peers", file=sys.stderr)
                timed_out = True
                break
            statuses = [s for s in (fetch_status(e.address, security) for e in config.peers) if s]
            if statuses:
                mean_step = sum(s["step"] for s in statuses) / len(statuses)
                losses = [s["loss"] for s in statuses if s.get("loss") is not None]
                accuracies = [s["test_accuracy"] for s in statuses if s.get("test_accuracy") is not None]
                bar.n = int(mean_step)
                bar.set_postfix(
                    loss=f"{sum(losses) / len(losses):.3f}" if losses else "-",
                    acc=f"{sum(accuracies) / len(accuracies):.3f}" if accuracies else "-",
                    up=f"{len(statuses)}/{len(names)}",
                )
                bar.refresh()
            time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for handle in logs.values():
            handle.close()
        bar.close()

    wall = time.perf_counter() - started
    peers = []
    for name in names:
        summary_path = out / name / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        peers.append(
            {
                "name": name,
                "exit_code": procs[name].returncode,
                "steps": summary.get("steps"),
                "stopped_early": summary.get("stopped_early"),
                "final_loss": summary.get("final_loss"),
                "test_accuracy": summary.get("test_accuracy"),
                "bytes_sent": summary.get("bytes_sent"),
                "bytes_received": summary.get("bytes_received"),
                "rounds": summary.get("rounds"),
                "compression": summary.get("compression"),
            }
        )
    models = [out / n / "model.pt" for n in names]
    final_consensus = (
        consensus_distance([flat_parameters(m) for m in models]) if all(m.exists() for m in models) else None
    )
    consensus = consensus_over_steps(out, names)
    accuracies = [p["test_accuracy"] for p in peers if p["test_accuracy"] is not None]
    result = {
        "config": str(args.config),
        "strategy": config.strategy.kind,
        "topology": config.topology.kind,
        "steps": steps,
        "peers": peers,
        "mean_test_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "final_consensus_distance": final_consensus,
        "consensus_over_steps": [{"step": s, "distance": d} for s, d in consensus],
        "wall_seconds": round(wall, 3),
        "timed_out": timed_out,
        "threads_per_peer": threads,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    png = plot(out, names, consensus)
    failed = [p["name"] for p in peers if p["exit_code"] != 0]
    mean_accuracy = result["mean_test_accuracy"] if accuracies else float("nan")
    consensus_text = f"{final_consensus:.3g}" if final_consensus is not None else "n/a"
    print(
        f"{len(names)} peers, {steps} steps in {wall:.1f}s: mean test accuracy {mean_accuracy:.4f}, "
        f"consensus distance {consensus_text}; wrote {out / 'summary.json'} and {png}"
    )
    if failed:
        print(
            f"local_cluster: peers failed: {', '.join(failed)} (see {out}/NAME/peer.log)",
            file=sys.stderr,
        )
        return 1
    if timed_out:
        print(f"local_cluster: the peers were stopped at the {args.timeout}s timeout", file=sys.stderr)
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
