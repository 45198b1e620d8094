"""A rogue swarm member for robust-mixing tests: every round it sends its initial parameters x 1000.

    python tests/workloads/attacker_peer.py CONFIG NAME STEPS

It is a real peer built on the public API (p2pdl.Peer): it holds the swarm's config, joins the
topology like anyone else, and before each step overwrites its model with the poisoned values, so
each parameter frame it sends is well-formed but scaled by 1000 (finite: decoding accepts it).
"""

from __future__ import annotations

import asyncio
import sys

import torch

from p2pdl import Peer, load_config
from p2pdl.train.loop import build_model
from p2pdl.train.optim import build_optimizer
from p2pdl.train.workload import load_workload

SCALE = 1000.0


async def main(config_path: str, name: str, steps: int) -> None:
    config = load_config(config_path)
    workload = load_workload(config.run.workload)
    model = build_model(workload, config.run.seed, torch.device("cpu"))
    poisoned = [p.detach().clone() * SCALE for p in model.parameters()]
    optimizer = build_optimizer(config.optimizer_settings, model)
    async with Peer(config, name, model, optimizer) as peer:
        while peer.step_index < steps:
            with torch.no_grad():
                for parameter, value in zip(model.parameters(), poisoned, strict=True):
                    parameter.copy_(value)
            await peer.step(lambda: torch.zeros(()))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
