"""Micro-benchmark of p2pdl.compression.compressors on one 11.17M-element fp32 gradient, on this CPU.

For each compressor: encode and decode time (min and median over ``--repeats``), the raw wire
bytes (what :func:`p2pdl.compression.compressors.wire_bytes` counts), the bytes after frame-level lz4 (one
``lz4.block.compress`` of the concatenated raw parts, as :func:`p2pdl.wire.encode.encode_frame` would
do on the frame body), both as a ratio against the 44.7 MB of fp32, and the relative
reconstruction error ||decode(encode(g)) - g|| / ||g|| of one step (no error feedback).

Two gradients of shape (3342, 3342) (the ``nn.Linear(3342, 3342)`` weight of
benchmarks/exchange.py; PowerSGD views it as that matrix, the rest flatten it):

* ``randn``: standard normal, the easy case for quantisers;
* ``heavy``: Student-t with 3 degrees of freedom times a log-normal per-row scale, closer to real
  gradients (a few rows and entries dominate), the hard case for per-chunk int8 and the case
  top-k is for.

Top-k is also timed path by path: exact ``torch.topk`` against the sampled-threshold selection
that ``encode`` uses above EXACT_TOPK_MAX_NUMEL elements (both return the same indices).

Reproduce (the allocator setting keeps 44 MB temporaries from being mmap'd and page-faulted
on every call, as in the other benchmarks)::

    MALLOC_MMAP_THRESHOLD_=268435456 .venv/bin/python benchmarks/compressors.py \\
        [--repeats 9] [--threads 1] [--out benchmarks/results/compressors.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lz4.block
import torch
from _provenance import Provenance, write_result

from p2pdl.compression.compressors import Compressor, CompressorKind, TopKCompressor, build_compressor, wire_bytes

REPO = Path(__file__).resolve().parent.parent
SHAPE = (3342, 3342)  # 11,168,964 elements, 44.7 MB of fp32
KINDS: tuple[CompressorKind, ...] = ("none", "fp16", "bf16", "int8", "topk", "powersgd")
SETTINGS: dict[str, Any] = {"ratio": 0.01, "rank": 4, "chunk": 1024, "seed": 0}


def gradient(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(SHAPE, generator=generator)
    if kind == "randn":
        return normal
    # Student-t(3) = N / sqrt(chi2_3 / 3), times a log-normal scale per row (per output unit).
    chi2 = sum(torch.randn(SHAPE, generator=generator).square_() for _ in range(3))
    row_scale = torch.exp(torch.randn(SHAPE[0], 1, generator=generator))
    return normal.div_(chi2.div_(3).sqrt_()).mul_(row_scale)


def timed(function: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Wall-clock seconds of ``repeats`` calls after one warm-up call, and the last result."""
    result = function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return times, result


def lz4_bytes(parts: dict[str, torch.Tensor]) -> tuple[int, float]:
    raw = b"".join(part.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for part in parts.values())
    start = time.perf_counter()
    compressed = lz4.block.compress(raw, store_size=False)
    return min(len(compressed), len(raw)), time.perf_counter() - start


def bench_compressor(kind: CompressorKind, grad: torch.Tensor, repeats: int) -> dict[str, Any]:
    compressor: Compressor = build_compressor(kind, **SETTINGS)
    # The first encode of a key is PowerSGD's cold start; time the warm steady state.
    encode_times, parts = timed(lambda: compressor.encode("w", grad), repeats)
    decode_times, decoded = timed(lambda: compressor.decode("w", parts, SHAPE, grad.device), repeats)
    raw = wire_bytes(parts)
    compressed, lz4_seconds = lz4_bytes(parts)
    fp32 = grad.numel() * 4
    return {
        "compressor": kind,
        "encode_ms_min": 1e3 * min(encode_times),
        "encode_ms_median": 1e3 * statistics.median(encode_times),
        "decode_ms_min": 1e3 * min(decode_times),
        "decode_ms_median": 1e3 * statistics.median(decode_times),
        "raw_bytes": raw,
        "lz4_bytes": compressed,
        "lz4_ms": 1e3 * lz4_seconds,
        "raw_ratio": fp32 / raw,
        "lz4_ratio": fp32 / compressed,
        "relative_error": float((decoded - grad).norm() / grad.norm()),
    }


def bench_topk_paths(grad: torch.Tensor, repeats: int) -> dict[str, Any]:
    compressor = TopKCompressor(SETTINGS["ratio"], seed=0)
    flat = grad.reshape(-1)
    k = compressor.k_for(flat.numel())
    magnitudes = flat.abs()
    sample_size = compressor._sample_size(flat.numel(), k)
    exact_times, exact = timed(lambda: compressor._exact(magnitudes, k), repeats)
    sampled_times, sampled = timed(lambda: compressor._sampled(magnitudes, k, sample_size), repeats)
    return {
        "k": k,
        "sample_size": sample_size,
        "exact_ms_min": 1e3 * min(exact_times),
        "exact_ms_median": 1e3 * statistics.median(exact_times),
        "sampled_ms_min": 1e3 * min(sampled_times),
        "sampled_ms_median": 1e3 * statistics.median(sampled_times),
        "same_indices": bool(torch.equal(exact, sampled)),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| gradient | compressor | encode ms | decode ms | raw MB | lz4 MB | ratio raw | ratio lz4 | rel. error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['gradient']} | {row['compressor']} | {row['encode_ms_min']:.1f} | {row['decode_ms_min']:.1f}"
            f" | {row['raw_bytes'] / 1e6:.3f} | {row['lz4_bytes'] / 1e6:.3f} | {row['raw_ratio']:.2f}"
            f" | {row['lz4_ratio']:.2f} | {row['relative_error']:.2e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=9)
    # One thread, like benchmarks/exchange.py's OMP_NUM_THREADS=1: on a shared 2-core machine
    # two intra-op threads wait on each other whenever one is descheduled (sampled top-k went
    # from ~90 ms to ~500 ms that way), so one thread gives the reproducible numbers.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compressors.json")
    args = parser.parse_args()
    provenance = Provenance()
    torch.set_num_threads(args.threads)

    rows = []
    topk_paths = {}
    for name in ("randn", "heavy"):
        grad = gradient(name)
        for kind in KINDS:
            rows.append({"gradient": name, **bench_compressor(kind, grad, args.repeats)})
            print(f"{name:6} {kind:9} done", flush=True)
        topk_paths[name] = bench_topk_paths(grad, args.repeats)
        del grad

    table = markdown(rows)
    print()
    print(table)
    print()
    for name, paths in topk_paths.items():
        print(
            f"top-k selection ({name}, k={paths['k']}): exact torch.topk {paths['exact_ms_min']:.1f} ms, "
            f"sampled threshold {paths['sampled_ms_min']:.1f} ms (min of {args.repeats}); "
            f"same indices: {paths['same_indices']}"
        )

    result = {
        "torch_threads": torch.get_num_threads(),
        "shape": list(SHAPE),
        "settings": SETTINGS,
        "repeats": args.repeats,
        "rows": rows,
        "topk_selection": topk_paths,
        "table": table,
    }
    write_result(args.out, "compressors", result, provenance)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
