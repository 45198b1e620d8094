"""Gossip consensus: the measured per-round contraction of disagreement against λ2 of W.

No training: N real :class:`p2pdl.Peer` s (gossip, ``local_steps = 1``) share one event loop
(uvloop, like the CLI), each with its own aiohttp server and real loopback WebSocket links, and
every step runs a closure that returns a zero loss without ``backward``, so no parameter has a
gradient, SGD skips them all and only mixing moves the parameters.

Each peer's model is ``nn.Linear(64, 64)`` (4,160 parameters) seeded by its index. After every
round the benchmark reads all peers' parameters x_i and records

* the disagreement ``D_t = sqrt(sum_i ||x_i - x̄||^2)``; theory: ``D_t ~ C λ2^t`` once the faster
  modes of W have died out, with λ2 the second largest eigenvalue modulus of the MH matrix;
* the drift of the mean, ``||x̄_t - x̄_0|| / ||x̄_0||``, which a symmetric doubly-stochastic W
  keeps at rounding level.

The rate is ``exp(slope)`` of a least-squares fit of ``log D_t`` over a tail window, rounds
``--fit-from`` .. ``--fit-to``, cut short where ``D_t / D_0`` reaches 1e4 machine epsilons: below
that, rounding noise in the mixing, not λ2, sets the decay. Parameters are float64 by default so
the tail is long even on exponential-8 (λ2 = 1/3, so float32 would leave only ~8 usable rounds).

Usage: ``python benchmarks/consensus.py [--rounds 40] [--dtype float64|float32]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _provenance import Provenance, write_result

from p2pdl import Peer
from p2pdl.config import Config, config_from_mapping
from p2pdl.core.topology import build_graph, mixing_matrix, second_largest_eigenvalue_modulus
from p2pdl.net.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = REPO / "peers" / "mnist1d_cnn.py"  # must exist for the config; never run
WIDTH = 64

# (label, topology table, peer count)
TOPOLOGIES: tuple[tuple[str, dict[str, Any], int], ...] = (
    ("ring-8", {"kind": "ring"}, 8),
    ("torus-4x4", {"kind": "torus", "rows": 4, "cols": 4}, 16),
    ("exponential-8", {"kind": "exponential"}, 8),
)


def gossip_config(topology: dict[str, Any], count: int) -> Config:
    names = [f"p{i}" for i in range(count)]
    ports = free_ports(count)
    return config_from_mapping(
        {
            "run": {"workload": str(WORKLOAD), "lr": 0.01, "momentum": 0.0, "eval_every": 0},
            "strategy": {"kind": "gossip", "local_steps": 1, "round_timeout": 30.0},
            "topology": topology,
            "transport": {"startup_timeout": 30.0, "send_timeout": 30.0},
            "membership": {"suspect_after": 30.0, "dead_after": 60.0},
            "peers": [{"name": n, "address": f"127.0.0.1:{p}"} for n, p in zip(names, ports, strict=True)],
        }
    )


def zero_closure() -> torch.Tensor:
    """A zero loss and no backward: every grad stays None, so SGD leaves the parameters alone."""
    return torch.zeros(())


def flat_parameters(peer: Peer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in peer.model.parameters()])


def disagreement_and_mean(peers: list[Peer]) -> tuple[float, torch.Tensor]:
    stacked = torch.stack([flat_parameters(p) for p in peers])  # (peers, params)
    mean = stacked.mean(dim=0)
    return float((stacked - mean).norm()), mean


def fit_rate(d: list[float], start: int, stop: int) -> float:
    """exp(slope) of a least-squares line through (t, log D_t), t in [start, stop]."""
    t = np.arange(start, stop + 1, dtype=np.float64)
    slope = np.polyfit(t, np.log(np.asarray(d[start : stop + 1])), 1)[0]
    return float(math.exp(slope))


async def measure(
    label: str, topology: dict[str, Any], count: int, rounds: int, dtype: torch.dtype, fit: tuple[int, int]
) -> dict[str, Any]:
    config = gossip_config(topology, count)
    graph = build_graph(
        config.topology.kind,
        config.peer_names,
        rows=config.topology.rows,
        cols=config.topology.cols,
    )
    slem = second_largest_eigenvalue_modulus(mixing_matrix(graph))
    peers = []
    for index, name in enumerate(config.peer_names):
        torch.manual_seed(index)
        model = torch.nn.Linear(WIDTH, WIDTH, dtype=dtype)
        peers.append(Peer(config, name, model, torch.optim.SGD(model.parameters(), lr=0.01)))
    async with contextlib.AsyncExitStack() as stack:
        for peer in peers:
            stack.push_async_callback(peer.close)
        # Together: each start waits for its neighbours to be up.
        await asyncio.gather(*(peer.start() for peer in peers))

        d0, mean0 = disagreement_and_mean(peers)
        disagreement = [d0]
        drift = [0.0]
        seconds = []
        for _ in range(rounds):
            started = time.perf_counter()
            await asyncio.gather(*(peer.step(zero_closure) for peer in peers))
            seconds.append(time.perf_counter() - started)
            d, mean = disagreement_and_mean(peers)
            disagreement.append(d)
            drift.append(float((mean - mean0).norm() / mean0.norm()))
        partial = sum(peer.ledger.partial for peer in peers)
        complete = sum(peer.ledger.complete for peer in peers)

    floor = 1e4 * torch.finfo(dtype).eps * d0
    usable = max(t for t, d in enumerate(disagreement) if d > floor)
    stop = min(fit[1], usable, rounds)
    # A fast graph in float32 reaches the floor early: then fit the last 5 usable rounds.
    start = min(fit[0], max(1, stop - 5))
    if stop - start < 2:
        raise RuntimeError(f"{label}: only rounds {start}..{stop} are above the rounding floor")
    rate = fit_rate(disagreement, start, stop)
    geometric = (disagreement[stop] / disagreement[start]) ** (1 / (stop - start))
    return {
        "topology": label,
        "peers": count,
        "lambda2": slem,
        "measured_rate": rate,
        "geometric_mean_ratio": geometric,
        "relative_error": (rate - slem) / slem,
        "fit_rounds": [start, stop],
        "max_mean_drift_relative": max(drift),
        "complete_rounds": complete,
        "partial_rounds": partial,
        "median_round_seconds": float(np.median(seconds)),
        "disagreement": disagreement,
        "per_round_ratio": [b / a for a, b in itertools.pairwise(disagreement)],
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = getattr(torch, args.dtype)
    results = []
    for label, topology, count in TOPOLOGIES:
        results.append(await measure(label, topology, count, args.rounds, dtype, (args.fit_from, args.fit_to)))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--fit-from", type=int, default=10, help="first round of the tail fit")
    parser.add_argument("--fit-to", type=int, default=35, help="last round of the tail fit")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "consensus.json")
    args = parser.parse_args()
    provenance = Provenance()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        print("note: set MALLOC_MMAP_THRESHOLD_=268435456 in the environment", file=sys.stderr)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner:
        results = runner.run(run(args))

    print(
        f"{'topology':<14} {'peers':>5} {'λ2':>8} {'measured':>9} {'rel.err':>8} "
        f"{'fit rounds':>10} {'mean drift':>11} {'partial':>7} {'s/round':>8}"
    )
    for r in results:
        window = f"{r['fit_rounds'][0]}..{r['fit_rounds'][1]}"
        print(
            f"{r['topology']:<14} {r['peers']:>5} {r['lambda2']:>8.4f} {r['measured_rate']:>9.4f} "
            f"{r['relative_error']:>+8.2%} {window:>10} {r['max_mean_drift_relative']:>11.1e} "
            f"{r['partial_rounds']:>7} {r['median_round_seconds']:>8.4f}"
        )
    report = {
        "model": f"nn.Linear({WIDTH}, {WIDTH}), {args.dtype}, seeded by peer index",
        "rounds": args.rounds,
        "rate": "exp(slope) of a least-squares fit of log D_t over fit_rounds",
        "drift": "max over rounds of ||mean_t - mean_0|| / ||mean_0||",
        "results": results,
    }
    write_result(args.out, "consensus", report, provenance)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
