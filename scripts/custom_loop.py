#!/usr/bin/env python3
"""A custom training loop on the public API: two gossiping Peers in one process, on 127.0.0.1.

    .venv/bin/python scripts/custom_loop.py [--steps 30]

Any ``nn.Module`` and any torch optimizer work. Each peer trains on its own half of a synthetic
regression task (a fixed random linear teacher plus noise) and, after every optimizer step,
averages its parameters with the other peer (gossip on a 2-peer ring: each keeps half of its own
parameters and takes half of the other's). Both peers bind port 0; peer ``b`` starts its server
first and ``a`` learns where it landed through a bootstrap address, as in tests/test_peer_async.py.
Across machines, each peer would run in its own process with a real address in the config.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import warnings
from pathlib import Path

import torch

import p2pdl

# The config must name an existing workload file even though a Peer built from Python never
# imports it (the CLI does); any of the shipped ones will do.
WORKLOAD = Path(__file__).resolve().parent.parent / "peers" / "mnist1d_cnn.py"

CONFIG = """
[run]
workload = "{workload}"
seed = 0

[strategy]
kind = "gossip"
local_steps = 1
round_timeout = 5.0

[topology]
kind = "ring"

[transport]
startup_timeout = 10.0

[[peers]]
name = "a"
address = "127.0.0.1:0"

[[peers]]
name = "b"
address = "127.0.0.1:0"
"""


def make_data(shard: int, count: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard ``shard`` of a regression task: inputs (count, 16), targets (count, 1)."""
    teacher = torch.Generator().manual_seed(1234)
    weights = torch.randn(16, 1, generator=teacher)  # the same teacher on every shard
    local = torch.Generator().manual_seed(shard)
    inputs = torch.randn(count, 16, generator=local)
    targets = inputs @ weights + 0.1 * torch.randn(count, 1, generator=local)
    return inputs, targets


def make_model() -> torch.nn.Module:
    # Identical initial parameters on every peer: seed, then build.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


async def run_peer(peer: p2pdl.Peer, shard: int, steps: int, batch_size: int = 32) -> list[float]:
    """One peer's loop; across machines this is the whole program of each process."""
    inputs, targets = make_data(shard)
    model = peer.model
    losses = []
    # start(): bind, learn the membership, link every neighbour; close(): announce the leave.
    async with peer:
        for step in range(steps):
            start = (step * batch_size) % len(inputs)
            x, y = inputs[start : start + batch_size], targets[start : start + batch_size]

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                # Runs on the peer's compute thread; gradients were zeroed just before.
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            result = await peer.step(closure)  # closure, optimizer step, gossip round
            losses.append(result.loss)
            round_ = result.parameter_round
            state = "no round" if round_ is None else ("complete" if round_.complete else f"missing {round_.missing}")
            print(f"{peer.name} step {result.step:3d}  loss {result.loss:.4f}  gossip round {state}")
        peer.record_eval({"final_train_loss": losses[-1]})  # shows up under "eval" in GET /status
        status = peer.status()
        print(
            f"{peer.name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, sent {status['bytes_sent']} bytes, "
            f"rounds {status['rounds']['complete']} complete / {status['rounds']['partial']} partial"
        )
    return losses


async def main(steps: int) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "swarm.toml"
        path.write_text(CONFIG.format(workload=WORKLOAD.as_posix()))
        config = p2pdl.load_config(path)

    model_a, model_b = make_model(), make_model()
    optimizer_a = torch.optim.SGD(model_a.parameters(), lr=0.05, momentum=0.9)
    optimizer_b = torch.optim.Adam(model_b.parameters(), lr=0.01)  # peers may differ in optimizer
    peer_b = p2pdl.Peer(config, "b", model_b, optimizer_b)
    # Both addresses say port 0: bind b's server now and give a its real port as a bootstrap address.
    port_b = await peer_b.transport.start()
    peer_a = p2pdl.Peer(config, "a", model_a, optimizer_a, bootstrap=(f"127.0.0.1:{port_b}",))
    await asyncio.gather(run_peer(peer_a, 0, steps), run_peer(peer_b, 1, steps))
    return 0


if __name__ == "__main__":
    # Received tensors are read-only views of the wire bytes; torch warns once that it cannot mark
    # them read-only. p2pdl only reads them (the `p2pdl` command filters the same warning).
    warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    raise SystemExit(asyncio.run(main(parser.parse_args().steps)))
