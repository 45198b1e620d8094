#!/usr/bin/env python3
"""The compressed reduce-scatter and DGC against the fp32 all-reduce, 8 peers, at equal steps.

    .venv/bin/python benchmarks/compression_rs.py                    # every row, the wide MLP, 200 steps
    .venv/bin/python benchmarks/compression_rs.py --mlp-steps 80 --only ar-none ar-topk1-dgc   # BENCHMARKS §19
    .venv/bin/python benchmarks/compression_rs.py --tables loopback --loopback-steps 600   # the CNN
    .venv/bin/python benchmarks/compression_rs.py --reanalyze        # rebuild the tables from runs/compression_rs
    .venv/bin/python benchmarks/compression_rs.py --mlp-steps 500 --only ar-none ar-powersgd4 ar-powersgd4-head \
        --results benchmarks/results/compression_powersgd.json           # BENCHMARKS §19a

Issue 13's target: at least 64x fewer wire bytes than the fp32 all-reduce at most 1 point of
accuracy lost, at equal steps, on 8 peers. Same runner and conventions as
``benchmarks/compression.py`` (8 processes on this machine's cores, mean test accuracy over the
peers, wire bytes = each peer's own count of application bytes after lz4, every row measured in
the same invocation). Rows, all ``strategy.kind = "allreduce"`` with H = 1:

* fp32 (the uncompressed reduce-scatter + all-gather), SGD momentum 0.9: the baseline;
* fp16 through the compressed reduce-scatter (half the fp32 bytes: the all-gather it replaced
  sent twice them at 8 peers);
* top-1% with error feedback under the optimizer's momentum 0.9 (what §11 measured, now
  over the reduce-scatter);
* top-1% and top-0.5% with DGC momentum correction 0.9 (optimizer momentum 0), and top-1% with
  DGC and a 12-step sparsity warm-up (25%, 6.25%, 1.5625%, then 1%: its early steps cost more
  bytes, which the ratio over the whole run includes);
* PowerSGD rank 4 with error feedback under the optimizer's momentum 0.9, through the paper's two
  fp32 all-reduces of P and Q (``p2pdl/strategies/allreduce_powersgd.py``); and the same with the
  classifier (10 x 2048) averaged uncompressed (``min_numel`` 32768).

The wide MLP (4.3M parameters) is the default table: on the 5,210-parameter CNN the frame headers
alone are more than 1/64 of an fp32 round, so no compressor can reach 64x there.

A row of 80 MLP steps takes 8-12 minutes with 8 processes on 2 busy cores.

Writes ``benchmarks/results/compression_rs.json`` and prints the tables.
"""

from __future__ import annotations

import sys

from compression import compression_table
from strategies import REPO, Row, main

RESULTS = REPO / "benchmarks" / "results" / "compression_rs.json"
ALLREDUCE = {"kind": "allreduce"}
NO_MOMENTUM = {"momentum": 0.0}  # DGC owns the momentum; the config refuses a second one


def dgc(ratio: float, warmup_steps: int = 0) -> dict[str, object]:
    return {"kind": "topk", "ratio": ratio, "min_numel": 0, "momentum_correction": 0.9, "warmup_steps": warmup_steps}


ROWS = (
    Row(key="ar-none", label="all-reduce, fp32", strategy=ALLREDUCE),
    Row(key="ar-fp16", label="reduce-scatter, fp16", strategy=ALLREDUCE, compression={"kind": "fp16", "min_numel": 0}),
    Row(
        key="ar-topk1-ef",
        label="reduce-scatter, top-1% + EF (optimizer momentum)",
        strategy=ALLREDUCE,
        compression={"kind": "topk", "ratio": 0.01, "min_numel": 0},
    ),
    Row(
        key="ar-topk1-dgc",
        label="reduce-scatter, top-1% + DGC",
        strategy=ALLREDUCE,
        compression=dgc(0.01),
        run=NO_MOMENTUM,
    ),
    Row(
        key="ar-topk1-dgc-warmup",
        label="reduce-scatter, top-1% + DGC, 12-step warm-up",
        strategy=ALLREDUCE,
        compression=dgc(0.01, 12),
        run=NO_MOMENTUM,
    ),
    Row(
        key="ar-topk05-dgc",
        label="reduce-scatter, top-0.5% + DGC",
        strategy=ALLREDUCE,
        compression=dgc(0.005),
        run=NO_MOMENTUM,
    ),
    Row(
        key="ar-powersgd4",
        label="all-reduce of PowerSGD factors, rank 4 + EF",
        strategy=ALLREDUCE,
        compression={"kind": "powersgd", "rank": 4, "min_numel": 0},
    ),
    # The same with the 10 x 2048 classifier (20,480 values) averaged exactly: rank 4 of a
    # 10-row matrix keeps little, and it is 0.5% of the model.
    Row(
        key="ar-powersgd4-head",
        label="all-reduce of PowerSGD factors, rank 4 + EF, classifier fp32",
        strategy=ALLREDUCE,
        compression={"kind": "powersgd", "rank": 4, "min_numel": 32768},
    ),
)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--tables" for a in argv):
        argv = ["--tables", "mlp", "--mlp-steps", "200", *argv]
    sys.exit(
        main(
            argv,
            all_rows=ROWS,
            description=__doc__,
            results_path=RESULTS,
            script="benchmarks/compression_rs.py",
            out=REPO / "runs" / "compression_rs",
            extra_table=compression_table,
        )
    )
