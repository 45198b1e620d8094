"""DiLoCo's outer settings, simulated in one process: which outer lr / momentum trains MNIST-1D?

    python benchmarks/diloco_outer.py [--out benchmarks/results/diloco_outer.json]

4 peers on their shards, H = 8 local SGD steps, exact parameter averaging, then p2pdl's
:class:`~p2pdl.core.outer.OuterOptimizer` (Nesterov) on every peer; 1000 steps, batch 32. Each line is
(inner lr, inner momentum, outer lr, outer momentum) and the test accuracy of peer 0. This is why
configs/diloco4.toml uses 0.5 / 0.5 instead of the paper's 0.7 / 0.9.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _provenance import REPO, Provenance, write_result

from p2pdl.core.outer import OuterOptimizer
from p2pdl.train.data import BatchStream
from p2pdl.train.workload import load_workload

WORKLOAD = load_workload(REPO / "peers" / "mnist1d_cnn.py")
SETTINGS = [
    (0.1, 0.9, 0.7, 0.9),
    (0.1, 0.9, 0.7, 0.5),
    (0.1, 0.9, 1.0, 0.0),
    (0.05, 0.9, 0.7, 0.9),
    (0.1, 0.0, 0.7, 0.9),
    (0.1, 0.9, 0.5, 0.5),
    (0.1, 0.9, 0.8, 0.6),
]


def run(inner_lr: float, momentum: float, outer_lr: float, outer_momentum: float, *, local: int = 8) -> float:
    peers = 4
    torch.manual_seed(0)
    models = [WORKLOAD.build_model() for _ in range(peers)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=inner_lr, momentum=momentum) for m in models]
    outers = [OuterOptimizer(list(m.parameters()), lr=outer_lr, momentum=outer_momentum) for m in models]
    streams = [BatchStream(*WORKLOAD.load_shard(i, peers), 32, seed=i) for i in range(peers)]
    for step in range(1000):
        for model, optimizer, stream in zip(models, optimizers, streams, strict=True):
            inputs, targets = next(stream)
            optimizer.zero_grad()
            WORKLOAD.loss_fn(model(inputs), targets).backward()
            optimizer.step()
        if (step + 1) % local == 0:
            with torch.no_grad():
                for group in zip(*[m.parameters() for m in models], strict=True):
                    mean = torch.stack(group).mean(dim=0)
                    for p in group:
                        p.copy_(mean)
            for outer in outers:
                outer.step()
    return WORKLOAD.evaluate(models[0], torch.device("cpu"))["test_accuracy"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "diloco_outer.json")
    args = parser.parse_args(argv)
    provenance = Provenance([__file__, *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(1)
    rows = []
    for inner_lr, momentum, outer_lr, outer_momentum in SETTINGS:
        accuracy = round(run(inner_lr, momentum, outer_lr, outer_momentum), 4)
        print((inner_lr, momentum, outer_lr, outer_momentum), accuracy, flush=True)
        rows.append({"inner_lr": inner_lr, "inner_momentum": momentum, "outer_lr": outer_lr,
                     "outer_momentum": outer_momentum, "peer0_test_accuracy": accuracy})  # fmt: skip
    result = {"peers": 4, "local_steps": 8, "steps": 1000, "batch_size": 32, "rows": rows}
    write_result(args.out, "diloco_outer", result, provenance)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
