#!/usr/bin/env python3
"""Every compressor, 8 peers on MNIST-1D, against DDP/gloo with its fp16 and PowerSGD hooks.

    sudo .venv/bin/python benchmarks/compression.py --netns-seconds 90     # both tables (~40 min on 2 cores)
    .venv/bin/python benchmarks/compression.py --tables loopback           # no root needed
    .venv/bin/python benchmarks/compression.py --reanalyze                 # rebuild tables from runs/compression

The runner, settings and first table are those of ``benchmarks/strategies.py`` (read its
docstring for how time, samples and bytes are measured): **loopback**, the CNN for 1500 steps, so
accuracies are compared at equal steps, and **netns**, the wide MLP (4.3M parameters) on
100 Mbit/s tbf links with a training-clock budget per row, so the time columns show what the
bytes saved buy. Rows:

* the exact all-reduce uncompressed, and with fp16, bf16, int8 (scale per 256 values), top-k
  1% and 0.1% and PowerSGD rank 4 (both with error feedback; tensors under 1000 values stay
  fp32). They were measured as an all-gather of the compressed gradients; since then every
  compressor but PowerSGD runs a compressed reduce-scatter instead
  (``benchmarks/compression_rs.py``, BENCHMARKS.md §19);
* gossip on a ring, uncompressed and CHOCO-gossip with top-1% (consensus step 0.04);
* DDP on gloo, plain and with ``fp16_compress_hook`` and ``powerSGD_hook`` (rank 4), in the same
  run.

The second table per setting gives wire bytes per step per peer (p2pdl: the peer's own count of
application bytes after lz4; DDP on loopback: 2 (N-1)/N x 4 bytes x parameters for plain DDP and
half of that with the fp16 hook, computed because gloo counts nothing; DDP in netns: bytes on its
veth link, TCP/IP headers included), the ratio against the uncompressed row of the same strategy
and against the fp32 all-reduce, and the accuracy change in points against the uncompressed row.

Writes ``benchmarks/results/compression.json`` and prints the tables.
"""

from __future__ import annotations

import sys
from typing import Any

from strategies import REPO, Row, Setting, main

RESULTS = REPO / "benchmarks" / "results" / "compression.json"
ALLREDUCE = {"kind": "allreduce"}
LARGE = 1000  # tensors with fewer values stay fp32 (biases; the CNN's first convolution)

ROWS = (
    Row(key="ar-none", label="all-reduce, fp32", strategy=ALLREDUCE),
    Row(key="ar-fp16", label="all-reduce, fp16", strategy=ALLREDUCE, compression={"kind": "fp16", "min_numel": 0}),
    Row(key="ar-bf16", label="all-reduce, bf16", strategy=ALLREDUCE, compression={"kind": "bf16", "min_numel": 0}),
    Row(
        key="ar-int8",
        label="all-reduce, int8",
        strategy=ALLREDUCE,
        compression={"kind": "int8", "min_numel": 0, "chunk": 256},
    ),
    Row(
        key="ar-topk1",
        label="all-reduce, top-1% + EF",
        strategy=ALLREDUCE,
        compression={"kind": "topk", "ratio": 0.01, "min_numel": LARGE},
    ),
    Row(
        key="ar-topk01",
        label="all-reduce, top-0.1% + EF",
        strategy=ALLREDUCE,
        compression={"kind": "topk", "ratio": 0.001, "min_numel": LARGE},
    ),
    Row(
        key="ar-powersgd4",
        label="all-reduce, PowerSGD r4 + EF",
        strategy=ALLREDUCE,
        compression={"kind": "powersgd", "rank": 4, "min_numel": LARGE},
    ),
    Row(key="gossip-none", label="gossip (ring), fp32", strategy={"kind": "gossip"}, topology="ring"),
    Row(
        key="choco-topk1",
        label="CHOCO-gossip (ring), top-1%",
        strategy={"kind": "gossip"},
        topology="ring",
        compression={"kind": "topk", "ratio": 0.01, "min_numel": LARGE, "choco_gamma": 0.04},
    ),
    Row(key="ddp", label="DDP / gloo"),
    Row(key="ddp-fp16", label="DDP / gloo, fp16_compress_hook", ddp_args=("--comm-hook", "fp16")),
    Row(
        key="ddp-powersgd4",
        label="DDP / gloo, powerSGD_hook r4",
        ddp_args=("--comm-hook", "powersgd", "--powersgd-rank", "4"),
    ),
)
BASELINE = {"ar": "ar-none", "gossip": "gossip-none", "choco": "gossip-none", "ddp": "ddp"}
PARAMETERS = {"mnist1d_cnn.py": 5_210, "mnist1d_wide_mlp.py": 4_300_810}


def bytes_per_step(setting: Setting, row: dict[str, Any]) -> tuple[float | None, str]:
    """Wire bytes per step per peer, and where the figure comes from."""
    done = row["steps_done"]
    if done is None or not done["max"]:
        return None, "n/a"
    steps = done["max"]
    if row["link_bytes_sent_per_peer"] is not None and row["row"].startswith("ddp"):
        return row["link_bytes_sent_per_peer"]["mean"] / steps, "link"
    if row["bytes_sent_per_peer"] is not None:
        return row["bytes_sent_per_peer"]["mean"] / steps, "app"
    if row["row"] in ("ddp", "ddp-fp16"):
        count = len(row["peers"])
        fp32 = 2 * (count - 1) / count * 4 * PARAMETERS[setting.workload.name]
        return fp32 / (2 if row["row"] == "ddp-fp16" else 1), "computed"
    return None, "n/a"


def compression_table(setting: Setting, rows: list[dict[str, Any]]) -> str:
    by_key = {r["row"]: r for r in rows}
    per_step = {r["row"]: bytes_per_step(setting, r) for r in rows}
    threshold = setting.thresholds[0] if setting.rate_mbit is None else 0.5
    header = [
        "compressor",
        "wire bytes/step/peer",
        "vs fp32, same strategy",
        "vs fp32 all-reduce",
        "final acc",
        "Δ acc (points)",
        f"time to {threshold:.0%}",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        own, source = per_step[row["row"]]
        base_key = BASELINE[row["row"].split("-")[0]]
        base = by_key.get(base_key)
        base_bytes = per_step.get(base_key, (None, ""))[0]
        allreduce_bytes = per_step.get("ar-none", (None, ""))[0]
        final = row["final_mean_accuracy"]
        base_final = base["final_mean_accuracy"] if base is not None else None
        crossing = row["thresholds"].get(f"{threshold:g}")
        cells = [
            row["label"],
            "n/a" if own is None else f"{own:,.0f} ({source})",
            "n/a" if own is None or base_bytes is None else f"{base_bytes / own:.1f}x",
            "n/a" if own is None or allreduce_bytes is None else f"{allreduce_bytes / own:.1f}x",
            "n/a" if final is None else f"{final:.4f}",
            "n/a" if final is None or base_final is None else f"{100 * (final - base_final):+.2f}",
            "—" if crossing is None else f"{crossing['time']:.1f} s (step {int(crossing['steps'])})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(
        main(
            all_rows=ROWS,
            description=__doc__,
            results_path=RESULTS,
            script="benchmarks/compression.py",
            out=REPO / "runs" / "compression",
            extra_table=compression_table,
        )
    )
