#!/usr/bin/env python3
"""GPT training throughput on one device: plain PyTorch, one p2pdl peer, two peers sharing it.

    python benchmarks/gpt_throughput.py [--device cuda] [--workload small] [--steps 60]

Three rows, run one after the other in the same invocation, all training the same byte-level GPT
(``peers/gpt_small.py`` by default) with Adam at the same batch size:

* ``pytorch``: a plain loop in this process (forward, backward, ``optimizer.step``), no p2pdl;
* ``one_peer``: one ``p2pdl peer`` process, alone in its swarm (``allreduce`` over one member, so
  nothing crosses the wire): what the peer machinery costs (the compute thread, the strategy,
  metrics, ``/status``);
* ``two_peers``: two ``p2pdl peer`` processes on the same device, exact gradient all-reduce
  over loopback every step: what sharing one GPU between two peers gives in total.

Tokens per second are counted as ``batch_size * context`` per step per peer, over the steps after
the first ``--warmup`` (which include CUDA context creation, allocator warm-up and kernel
selection); for the peers they come from each peer's ``metrics.jsonl`` timestamps. The CPU is
the fallback device, so the script runs anywhere (``--device cpu --workload tiny`` is its smoke
test); the figure it exists for is the CUDA one, from ``scripts/gpu_check.sh``.

Writes ``--results`` (default ``benchmarks/results/gpt_throughput_<device>.json``) through
:func:`_provenance.write_result` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _provenance import Provenance, write_result
from time_to_accuracy import free_ports, write_toml

REPO = Path(__file__).resolve().parent.parent
PEER = [sys.executable, "-m", "p2pdl.cli", "peer", "--config"]
WORKLOADS = {"tiny": REPO / "peers" / "gpt_tiny.py", "small": REPO / "peers" / "gpt_small.py"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="small")
    parser.add_argument("--steps", type=int, default=60, help="steps per row (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate (default 10)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpt_throughput", help="run outputs")
    parser.add_argument("--results", type=Path, help="JSON results file")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per row")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 1:
        parser.error(f"--steps ({args.steps}) must exceed --warmup + 1 ({args.warmup + 1})")
    if args.warmup < 1 or args.batch_size < 1:
        parser.error("--warmup and --batch-size must be >= 1")
    if args.results is None:
        args.results = REPO / "benchmarks" / "results" / f"gpt_throughput_{args.device}.json"
    return args


def context_of(workload: str) -> int:
    sys.path.insert(0, str(REPO))
    from p2pdl.train.gpt import SIZES

    return SIZES[workload].context


def plain_pytorch(args: argparse.Namespace) -> dict[str, Any]:
    """The reference: the same model, data and optimizer in a plain loop on ``args.device``."""
    sys.path.insert(0, str(REPO))
    import torch

    from p2pdl.train.workload import load_workload

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    device = torch.device(args.device)
    workload = load_workload(WORKLOADS[args.workload])
    torch.manual_seed(0)
    model = workload.build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    inputs, targets = workload.load_shard(0, 1)
    generator = torch.Generator().manual_seed(0)
    stamps: list[float] = []
    for _ in range(args.steps):
        index = torch.randint(0, inputs.shape[0], (args.batch_size,), generator=generator)
        x, y = inputs[index].to(device, non_blocking=True), targets[index].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = workload.loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        float(loss.detach())  # a host sync per step, as the peer's loop has
        stamps.append(time.perf_counter())
    return rate(stamps, args, peers=1) | {"final_loss": float(loss.detach())}


def rate(stamps: list[float], args: argparse.Namespace, *, peers: int) -> dict[str, Any]:
    """Tokens per second over the steps after the warm-up, from per-step completion times."""
    measured = len(stamps) - args.warmup
    seconds = stamps[-1] - stamps[args.warmup - 1]
    tokens = measured * args.batch_size * context_of(args.workload) * peers
    return {"steps_measured": measured, "seconds": round(seconds, 4), "tokens_per_second": round(tokens / seconds, 1)}


def peer_config(args: argparse.Namespace, count: int, path: Path) -> Path:
    ports = free_ports(count)
    config = {
        "run": {
            "workload": str(WORKLOADS[args.workload]),
            "steps": args.steps,
            "seed": 0,
            "batch_size": args.batch_size,
            "optimizer": "adam",
            "lr": args.lr,
            "eval_every": 0,
            "device": args.device,
        },
        "strategy": {"kind": "allreduce", "local_steps": 1, "round_timeout": 60.0},
        "topology": {"kind": "full"},
        "membership": {"dead_after": 120.0},
        "peers": [{"name": f"p{i}", "address": f"127.0.0.1:{port}"} for i, port in enumerate(ports)],
    }
    write_toml(config, path)
    return path


def peers_on_device(args: argparse.Namespace, count: int) -> dict[str, Any]:
    """``count`` real peer processes on the device; the rate summed over peers."""
    out = args.out / f"peers{count}"
    out.mkdir(parents=True, exist_ok=True)
    config = peer_config(args, count, out / "config.toml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "268435456"}
    procs = [
        subprocess.Popen(
            [*PEER, str(config), "--name", f"p{i}", "--out", str(out / f"p{i}")],
            cwd=REPO,
            env=env,
        )
        for i in range(count)
    ]
    deadline = time.monotonic() + args.timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = [proc.returncode for proc in procs]
    if any(codes):
        raise SystemExit(f"{count} peer(s): exit codes {codes}; logs under {out}")
    per_peer = []
    for i in range(count):
        rows = [json.loads(line) for line in (out / f"p{i}" / "metrics.jsonl").read_text().splitlines() if line]
        stamps = [float(r["time"]) for r in rows if "loss" in r and not r.get("final")]
        per_peer.append(rate(stamps, args, peers=1))
    total = sum(p["tokens_per_second"] for p in per_peer)
    return {"tokens_per_second": round(total, 1), "per_peer": per_peer}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    provenance = Provenance(argv)
    rows = {
        "pytorch": plain_pytorch(args),
        "one_peer": peers_on_device(args, 1),
        "two_peers": peers_on_device(args, 2),
    }
    reference = rows["pytorch"]["tokens_per_second"]
    for row in rows.values():
        row["vs_pytorch"] = round(row["tokens_per_second"] / reference, 3)
    result = {
        "device": args.device,
        "workload": args.workload,
        "batch_size": args.batch_size,
        "context": context_of(args.workload),
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
    }
    write_result(args.results, "gpt_throughput", result, provenance)
    print(f"| row | tokens/s | vs plain PyTorch |  ({args.workload} GPT on {args.device}, batch {args.batch_size})")
    print("|---|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['tokens_per_second']:,.0f} | {row['vs_pytorch']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
