"""Robust mixing under attack, simulated in one process: 8 peers, the last sends its initial parameters x 1000.

    python benchmarks/robust_mixing.py ring:none:0:1 ring:clip:0:1 ring:clip:0.05:1 ring:trim:0:1 \\
        ring:outlier:0:1 exponential:trim:0:1 ring:none:0:0 ring:outlier:0:0

Each argument is TOPOLOGY:RULE:RADIUS:ATTACK (ATTACK 1 = the attacker is present, 0 = it trains
honestly). The same D-PSGD recipe as the swarm (MNIST-1D CNN, SGD lr 0.1 momentum 0.9, batch 32,
400 steps), with the real mixing functions of :mod:`p2pdl.core.robust`:

* ``none``: plain Metropolis-Hastings mixing;
* ``clip``: self-centred clipping with a per-round radius (``adaptive_radius``) or a fixed RADIUS > 0;
* ``trim``: coordinate-wise trimmed mean, trim 1;
* ``outlier``: :class:`~p2pdl.core.robust.OutlierClipper`, what ``strategy.robust = "clip"`` uses.

It prints the honest peers' test accuracies, one line per argument, and writes them to ``--out``.
This is how OutlierClipper's historical reference was chosen; ``tests/test_robust.py`` checks the
real thing with 8 peer processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _provenance import REPO, Provenance, write_result

from p2pdl.core.mixing import mix_into
from p2pdl.core.robust import OutlierClipper, adaptive_radius, clipped_gossip, trimmed_mean
from p2pdl.core.topology import build_graph, mixing_weights
from p2pdl.train.data import BatchStream
from p2pdl.train.workload import load_workload

WORKLOAD = load_workload(Path(__file__).resolve().parent.parent / "peers" / "mnist1d_cnn.py")
PEERS = 8
STEPS = 400
SCALE = 1000.0


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream: BatchStream) -> None:
    inputs, targets = next(stream)
    optimizer.zero_grad()
    WORKLOAD.loss_fn(model(inputs), targets).backward()
    optimizer.step()


def run(kind: str, rule: str, radius: float, attack: bool) -> list[float]:
    names = [f"p{i}" for i in range(PEERS)]
    graph = build_graph(kind, names)  # type: ignore[arg-type]
    torch.manual_seed(0)
    models = [WORKLOAD.build_model() for _ in names]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    initial = [p.detach().clone() for p in models[0].parameters()]
    attacker = PEERS - 1
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    streams = [BatchStream(*WORKLOAD.load_shard(i, PEERS), 32, seed=i) for i in range(PEERS)]
    clippers = [OutlierClipper() for _ in names]
    for _ in range(STEPS):
        for i in range(PEERS):
            if i != attacker or not attack:
                train_step(models[i], optimizers[i], streams[i])
        if attack:
            with torch.no_grad():
                for parameter, value in zip(models[attacker].parameters(), initial, strict=True):
                    parameter.copy_(value * SCALE)
        snapshot = [[p.detach().clone() for p in m.parameters()] for m in models]
        for i in range(PEERS):
            if i == attacker and attack:
                continue
            row = mixing_weights(graph, names[i])
            local = list(models[i].parameters())
            contributions = [(row[names[j]], snapshot[j]) for j in range(PEERS) if j != i and names[j] in row]
            with torch.no_grad():
                if rule == "none":
                    mix_into(local, row[names[i]], contributions)
                elif rule == "clip":
                    clipped_gossip(local, row[names[i]], contributions, radius if radius > 0 else adaptive_radius)
                elif rule == "trim":
                    trimmed_mean(local, [tensors for _, tensors in contributions], 1)
                elif rule == "outlier":
                    clippers[i].mix(local, row[names[i]], contributions)
                else:
                    raise SystemExit(f"unknown rule {rule!r}")
    honest = range(PEERS - 1)
    return [round(WORKLOAD.evaluate(models[i], torch.device("cpu"))["test_accuracy"], 3) for i in honest]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "specs", nargs="*", default=["ring:none:0:1", "ring:outlier:0:1"], help="TOPOLOGY:RULE:RADIUS:ATTACK"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "robust_mixing.json")
    args = parser.parse_args(argv)
    provenance = Provenance([__file__, *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(1)
    rows = []
    for spec in args.specs:
        kind, rule, radius, attack = spec.split(":")
        accuracies = run(kind, rule, float(radius), attack == "1")
        print(spec, accuracies, flush=True)
        rows.append({"spec": spec, "topology": kind, "rule": rule, "radius": float(radius), "attack": attack == "1",
                     "honest_test_accuracies": accuracies})  # fmt: skip
    write_result(args.out, "robust_mixing", {"peers": PEERS, "rows": rows}, provenance)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
