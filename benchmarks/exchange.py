"""One exact averaging round of an 11.17M-parameter fp32 model: p2pdl all-reduce vs gloo.

Each system runs as ``n`` real processes on loopback, started by this script (the parent) and
reaped by it. Both see the same model, ``nn.Linear(3342, 3342)`` (11,172,306 parameters incl.
bias, 44.7 MB of fp32 gradients), the same environment (``MALLOC_*_THRESHOLD_``,
``OMP_NUM_THREADS=1``) and the same barrier (a gloo ``barrier`` before every round), and the runs
alternate gloo, p2pdl, p2pdl, gloo per process count (with ``--aiohttp-path``: gloo, p2pdl,
p2pdl_aiohttp, then the reverse; ``--copy-path`` adds p2pdl_copy) so that machine noise hits
both alike.

* ``gloo``: ``torch.distributed.all_reduce`` of one flat (11,172,306,) fp32 tensor.
* ``gloo_ddp``: the same plus what p2pdl's round also does: flatten the grads into a bucket,
  all-reduce, divide, copy back (DDP's bucket path), for an apples-to-apples reference.
* ``p2pdl``: a real :class:`p2pdl.Peer` per process (allreduce strategy, uvloop like the CLI);
  the timed call is ``await peer.strategy.reduce_gradients(step)``: flatten, encode, send,
  receive, decode, reduce, all-gather, unflatten. Large frames go over the links' frame streams,
  each chunk written from the flat buffer itself (encode packs only the frame's framing).
* ``p2pdl_copy`` (with ``--copy-path``): the same over frame streams, but every frame copied into
  one ``bytes`` on the codec thread before it is sent (the send path before zero-copy sends), to
  measure what sending chunks from the flat buffer saves, side by side.
* ``p2pdl_aiohttp`` (with ``--aiohttp-path``): the same with no frame stream, so large frames take
  the older path through aiohttp (``POST /frames`` from the dialer, the WebSocket from the acceptor).

A round's time is the slowest rank's (each rank times from the barrier to its own end). Round 0
is checked against the exact mean. After the timed rounds every p2pdl rank runs a few
instrumented rounds that record when each piece ran (a timeline, see ``breakdown`` in the
output), and rank 0 runs a few more under cProfile (event-loop thread only).

Usage: ``python benchmarks/exchange.py [--peers 2 4] [--rounds 15] [--out benchmarks/results/exchange.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _provenance import Provenance, write_result

from p2pdl.net.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = REPO / "peers" / "mnist1d_cnn.py"
FEATURES = 3342  # nn.Linear(3342, 3342): 3342 * 3342 + 3342 = 11,172,306 parameters
CHILD_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
WORKER_TIMEOUT = 600.0  # seconds one group of worker processes may take


# --------------------------------------------------------------------------- worker side


def _model_and_grads(rank: int) -> tuple[Any, list[Any]]:
    """The model and this rank's gradients (seeded per rank, so any rank can rebuild any other's)."""
    import torch

    model = torch.nn.Linear(FEATURES, FEATURES)
    return model, _seeded_grads(model, rank)


def _seeded_grads(model: Any, rank: int) -> list[Any]:
    import torch

    generator = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(p.shape, generator=generator) for p in model.parameters()]


def _exact_mean(model: Any, world: int) -> list[Any]:
    """The mean of every rank's gradients, summed in rank order then divided (as p2pdl does)."""
    per_rank = [_seeded_grads(model, r) for r in range(world)]
    means = []
    for position in range(len(per_rank[0])):
        out = per_rank[0][position].clone()
        for r in range(1, world):
            out.add_(per_rank[r][position])
        means.append(out.div_(world))
    return means


def _init_dist(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=WORKER_TIMEOUT),
    )


def gloo_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    _init_dist(args.rank, args.world, args.dist_port)
    model, grads = _model_and_grads(args.rank)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    flat_grads = torch.cat([g.reshape(-1) for g in grads])
    flat = torch.empty(total)
    bucket = torch.empty(total)
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()

    # Correctness: one all-reduce of the seeded gradients against the exact mean.
    flat.copy_(flat_grads)
    dist.all_reduce(flat)
    expected = torch.cat([m.reshape(-1) for m in _exact_mean(model, args.world)])
    max_error = float((flat / args.world - expected).abs().max())

    times: dict[str, list[float]] = {"gloo": [], "gloo_ddp": []}
    for index in range(args.warmup + args.rounds):
        flat.copy_(flat_grads)
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(flat)
        elapsed = time.perf_counter() - started
        if index >= args.warmup:
            times["gloo"].append(elapsed)

        for p, g in zip(params, grads, strict=True):
            p.grad.copy_(g)
        dist.barrier()
        started = time.perf_counter()
        torch.cat([p.grad.reshape(-1) for p in params], out=bucket)
        dist.all_reduce(bucket)
        bucket.div_(args.world)
        offset = 0
        for p in params:
            p.grad.copy_(bucket[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        elapsed = time.perf_counter() - started
        if index >= args.warmup:
            times["gloo_ddp"].append(elapsed)
    dist.barrier()
    dist.destroy_process_group()
    return {"rank": args.rank, "params": total, "times": times, "max_abs_error": max_error, "exact": None}


class Timeline:
    """(label, start, end) intervals of one rank's instrumented rounds, thread-safe."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float, str]] = []
        self._lock = threading.Lock()
        self.enabled = False

    def add(self, label: str, start: float, end: float) -> None:
        if self.enabled:
            with self._lock:
                self.events.append((label, start, end, threading.current_thread().name))

    def wrap_sync(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(label, start, time.perf_counter())

        return timed

    def wrap_async(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                self.add(label, start, time.perf_counter())

        return timed


def _instrument(peer: Any, timeline: Timeline) -> None:
    """Record when each piece of ``reduce_gradients`` runs, without changing what it does."""
    import p2pdl.strategies.flat_vector as flat_vector_module
    import p2pdl.wire.decode as wire_decode
    import p2pdl.wire.encode as wire_encode

    strategy = peer.strategy
    transport = peer.transport
    ctx = strategy._ctx
    # Each compute call is labelled by what its function calls (the round's calls are lambdas).
    # "assemble" is the copy of the members' averaged chunks into the averaged buffer (since
    # 452735c, as each piece's all-gather arrives); before it, the write-back after the decision.
    labels = {
        "into_flat": "flatten",
        "exact_mean": "reduce(exact_mean)",
        "assemble": "assemble(unflatten_chunks)",
        "write_chunks": "assemble(unflatten_chunks)",
        "write_back": "assemble(unflatten_chunks)",
    }

    def labelled_compute(fn: Callable[[], Any]) -> Any:
        names = (getattr(fn, "__name__", ""), *getattr(getattr(fn, "__code__", None), "co_names", ()))
        label = next((labels[n] for n in names if n in labels), "compute")
        return timeline.wrap_async(f"compute:{label}", original_compute)(fn)

    original_compute = ctx.run_compute
    object.__setattr__(ctx, "run_compute", labelled_compute)
    timeline.reset_labels = lambda: None  # type: ignore[attr-defined]
    transport.encode_parts = timeline.wrap_async("encode(await)", transport.encode_parts)
    transport.send_encoded = timeline.wrap_async("send(await)", transport.send_encoded)
    transport.collect = timeline.wrap_async("collect(wait)", transport.collect)
    transport._decode_data = timeline.wrap_sync("decode(codec thread)", transport._decode_data)
    original_on_bytes = transport._on_bytes

    async def on_bytes(link: Any, data: Any, **kwargs: Any) -> None:
        # The moment a whole frame is in (a WebSocket message, a POST body or a stream record).
        now = time.perf_counter()
        via = "stream" if kwargs.get("owned") else "aiohttp"
        timeline.add(f"frame in via {via} ({len(data) / 1e6:.1f} MB)", now, now)
        await original_on_bytes(link, data, **kwargs)

    transport._on_bytes = on_bytes
    wire_decode._all_finite = timeline.wrap_sync("  finite check", wire_decode._all_finite)
    wire_encode.encode_frame_parts = timeline.wrap_sync(
        "  encode_frame_parts(codec thread)", wire_encode.encode_frame_parts
    )
    flat_vector_module.unflatten_chunks_into = timeline.wrap_sync(
        "  unflatten_chunks_into", flat_vector_module.unflatten_chunks_into
    )
    # p2pdl.net.transport imported both encoders by name; point it at the timed ones too.
    import p2pdl.net.transport as transport_module

    transport_module.encode_frame_parts = wire_encode.encode_frame_parts
    transport_module.encode_frame_parts_inline = timeline.wrap_sync(
        "  encode_frame_parts_inline(event loop)", wire_encode.encode_frame_parts_inline
    )


def _summarise_timeline(events: list[tuple[str, float, float, str]], starts: list[float]) -> dict[str, Any]:
    """Per label: mean total busy ms per round, and the first round's intervals relative to start."""
    rounds = len(starts)
    per_label: dict[str, float] = {}
    last_round: list[dict[str, Any]] = []
    for label, start, end, _thread in events:
        per_label[label] = per_label.get(label, 0.0) + (end - start) * 1000 / rounds
    # The last instrumented round (warmest) as a timeline.
    last_start = starts[-1]
    for label, start, end, thread in sorted(events, key=lambda e: e[1]):
        if start >= last_start:
            last_round.append(
                {
                    "what": label,
                    "from_ms": round((start - last_start) * 1000, 2),
                    "to_ms": round((end - last_start) * 1000, 2),
                    "ms": round((end - start) * 1000, 2),
                    "thread": thread,
                }
            )
    return {
        "mean_ms_per_round_by_label": {k: round(v, 2) for k, v in sorted(per_label.items())},
        "last_round_timeline": last_round,
    }


async def _p2pdl_main(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from p2pdl import Peer
    from p2pdl.config import config_from_mapping

    names = [f"p{r}" for r in range(args.world)]
    ports = [int(p) for p in args.ports.split(",")]
    if args.worker == "p2pdl_aiohttp":
        # The path before frame streams, for comparison: no link opens one, so large frames go
        # over POST /frames (dialer) and the WebSocket (acceptor).
        from p2pdl.net.transport import Transport

        Transport._open_stream_task = lambda self, link, ws: None  # type: ignore[method-assign]
    if args.worker == "p2pdl_copy":
        # The send path before zero-copy sends: the whole frame copied into one bytes, off the loop.
        from p2pdl.net.transport import Transport
        from p2pdl.wire import EncodedFrame

        async def copying(self: Transport, frame: Any) -> EncodedFrame:
            return EncodedFrame((await self.encode(frame),), borrowed=False)

        Transport.encode_parts = copying  # type: ignore[method-assign]
    config = config_from_mapping(
        {
            "run": {"workload": str(WORKLOAD), "eval_every": 0},
            "strategy": {
                "kind": "allreduce",
                "round_timeout": 300.0,
                "pipeline": args.pipeline if args.worker == "p2pdl_pipeline" else 1,
            },
            "transport": {"startup_timeout": 120.0, "send_timeout": 300.0, "max_frame_mib": 512.0},
            "membership": {"suspect_after": 300.0, "dead_after": 600.0},
            "topology": {"kind": "full"},
            "peers": [{"name": n, "address": f"127.0.0.1:{p}"} for n, p in zip(names, ports, strict=True)],
        }
    )
    device = torch.device(args.device)
    model, grads = _model_and_grads(args.rank)
    model = model.to(device)
    grads = [g.to(device) for g in grads]
    params = list(model.parameters())
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = [e.to(device) for e in _exact_mean(model, args.world)]
    loop = asyncio.get_running_loop()

    async def barrier() -> None:
        # In a thread: the event loop must keep flushing sends while other ranks finish.
        await asyncio.to_thread(dist.barrier)

    timeline = Timeline()
    times: list[float] = []
    exact: bool | None = None
    max_error = 0.0
    profile_text = ""
    async with Peer(config, names[args.rank], model, optimizer, device=device) as peer:
        await barrier()
        step = 0

        async def one_round() -> float:
            nonlocal step
            for p, g in zip(params, grads, strict=True):
                p.grad.copy_(g)
            await barrier()
            started = time.perf_counter()
            outcome = await peer.strategy.reduce_gradients(step)
            elapsed = time.perf_counter() - started
            assert outcome is not None and outcome.complete, outcome
            step += 1
            return elapsed

        await one_round()
        exact = all(torch.equal(p.grad, e) for p, e in zip(params, expected, strict=True))
        max_error = max(float((p.grad - e).abs().max()) for p, e in zip(params, expected, strict=True))
        for index in range(args.warmup + args.rounds):
            elapsed = await one_round()
            if index >= args.warmup:
                times.append(elapsed)

        _instrument(peer, timeline)
        starts: list[float] = []
        for _ in range(args.profile_rounds):
            timeline.reset_labels()  # type: ignore[attr-defined]
            timeline.enabled = True
            for p, g in zip(params, grads, strict=True):
                p.grad.copy_(g)
            await barrier()
            starts.append(time.perf_counter())
            await peer.strategy.reduce_gradients(step)
            step += 1
            timeline.enabled = False

        if args.profile_rounds:
            profiler = cProfile.Profile()
            for _ in range(args.profile_rounds):
                timeline.reset_labels()  # type: ignore[attr-defined]
                for p, g in zip(params, grads, strict=True):
                    p.grad.copy_(g)
                await barrier()
                if args.rank == 0:
                    profiler.enable()
                await peer.strategy.reduce_gradients(step)
                if args.rank == 0:
                    profiler.disable()
                step += 1
            if args.rank == 0:
                buffer = io.StringIO()
                pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(14)
                profile_text = buffer.getvalue()
        await barrier()
    del loop
    dist.barrier()
    dist.destroy_process_group()
    result: dict[str, Any] = {
        "rank": args.rank,
        "params": sum(p.numel() for p in params),
        "times": {args.worker: times},
        "exact": exact,
        "max_abs_error": max_error,
    }
    if args.profile_rounds:
        result["breakdown"] = _summarise_timeline(timeline.events, starts)
        result["cprofile_event_loop_thread"] = profile_text
    return result


def p2pdl_worker(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    from p2pdl._malloc import tune_allocator

    tune_allocator()  # a no-op under CHILD_ENV, which already sets both thresholds

    _init_dist(args.rank, args.world, args.dist_port)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_p2pdl_main(args))


# --------------------------------------------------------------------------- parent side


def run_group(system: str, world: int, args: argparse.Namespace, tmp: Path, *, profile: bool) -> list[dict[str, Any]]:
    """Start ``world`` worker processes of ``system``, wait for them, reap them all."""
    ports = free_ports(world + 1)
    procs: list[subprocess.Popen[bytes]] = []
    outputs = [tmp / f"{system}-{world}-{r}-{time.monotonic_ns()}.json" for r in range(world)]
    try:
        for rank in range(world):
            command = [
                sys.executable, __file__, "--worker", system,
                "--rank", str(rank), "--world", str(world), "--rounds", str(args.rounds),
                "--warmup", str(args.warmup), "--dist-port", str(ports[-1]),
                "--ports", ",".join(map(str, ports[:world])), "--result", str(outputs[rank]),
                "--profile-rounds", str(args.profile_rounds if profile else 0),
                "--device", args.device, "--pipeline", str(args.pipeline),
            ]  # fmt: skip
            env = {**os.environ, **CHILD_ENV, **dict(e.split("=", 1) for e in args.env)}
            procs.append(subprocess.Popen(command, env=env, cwd=REPO))
        deadline = time.monotonic() + WORKER_TIMEOUT
        for proc in procs:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise RuntimeError(f"{system} worker exited with {code}")
        return [json.loads(path.read_text()) for path in outputs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats_ms(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 2),
        "p10_ms": round(_percentile(values, 0.1) * 1000, 2),
        "p90_ms": round(_percentile(values, 0.9) * 1000, 2),
        "rounds": len(values),
    }


def _slowest_rank(results: list[dict[str, Any]], key: str) -> list[float]:
    per_rank = [r["times"][key] for r in results]
    return [max(round_times) for round_times in zip(*per_rank, strict=True)]


def main_parent(args: argparse.Namespace) -> int:
    provenance = Provenance()
    report: dict[str, Any] = {
        "model": f"nn.Linear({FEATURES}, {FEATURES})",
        "params": FEATURES * FEATURES + FEATURES,
        "megabytes_fp32": round((FEATURES * FEATURES + FEATURES) * 4 / 1e6, 2),
        "rounds_per_run": args.rounds,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "round_time": "slowest rank, barrier to end of its all-reduce",
        "env": {
            **CHILD_ENV,
            **dict(e.split("=", 1) for e in args.env),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "event_loop": "uvloop (p2pdl)",
        },
        "by_world": {},
    }
    with tempfile.TemporaryDirectory(prefix="p2pdl-exchange-") as tmp_name:
        tmp = Path(tmp_name)
        for world in args.peers:
            samples: dict[str, list[float]] = {"gloo": [], "gloo_ddp": [], "p2pdl": []}
            extra: dict[str, Any] = {}
            # ABBA order: gloo, p2pdl, p2pdl, gloo, ... so drift in machine load cancels out.
            systems_in_order = ["gloo", "p2pdl"]
            variants = (
                (args.copy_path, "p2pdl_copy"),
                (args.aiohttp_path, "p2pdl_aiohttp"),
                (args.pipeline > 1, "p2pdl_pipeline"),
            )
            for flag, variant in variants:
                if flag:
                    samples[variant] = []
                    systems_in_order.append(variant)
            order = [systems_in_order if k % 2 == 0 else systems_in_order[::-1] for k in range(args.repeats)]
            profiled = False
            for systems in order:
                for system in systems:
                    print(f"[exchange] world={world} {system} ...", flush=True)
                    profile = system == "p2pdl" and not profiled
                    profiled = profiled or profile
                    results = run_group(system, world, args, tmp, profile=profile)
                    for key in results[0]["times"]:
                        samples[key] += _slowest_rank(results, key)
                    if system == "p2pdl":
                        extra.setdefault("p2pdl_bit_exact_vs_mean", []).append(all(r["exact"] for r in results))
                        extra["p2pdl_max_abs_error"] = max(r["max_abs_error"] for r in results)
                        if "breakdown" in results[0]:
                            extra["breakdown_rank0_dialer"] = results[0]["breakdown"]
                            extra["breakdown_last_rank_acceptor"] = results[-1]["breakdown"]
                            extra["cprofile_rank0_event_loop_thread"] = results[0][
                                "cprofile_event_loop_thread"
                            ].splitlines()
                    elif system in ("p2pdl_aiohttp", "p2pdl_copy", "p2pdl_pipeline"):
                        exact = all(r["exact"] for r in results)
                        extra.setdefault(f"{system}_bit_exact_vs_mean", []).append(exact)
                    else:
                        extra["gloo_max_abs_error"] = max(r["max_abs_error"] for r in results)
            entry = {key: _stats_ms(values) for key, values in samples.items()}
            entry["ratio_p2pdl_over_gloo_median"] = round(entry["p2pdl"]["median_ms"] / entry["gloo"]["median_ms"], 3)
            entry["ratio_p2pdl_over_gloo_ddp_median"] = round(
                entry["p2pdl"]["median_ms"] / entry["gloo_ddp"]["median_ms"], 3
            )
            if args.copy_path:
                copy_ms = entry["p2pdl_copy"]["median_ms"]
                entry["ratio_p2pdl_copy_over_gloo_median"] = round(copy_ms / entry["gloo"]["median_ms"], 3)
                entry["ratio_p2pdl_over_p2pdl_copy_median"] = round(entry["p2pdl"]["median_ms"] / copy_ms, 3)
            if args.aiohttp_path:
                aiohttp_ms = entry["p2pdl_aiohttp"]["median_ms"]
                entry["ratio_p2pdl_aiohttp_over_gloo_median"] = round(aiohttp_ms / entry["gloo"]["median_ms"], 3)
                entry["ratio_p2pdl_over_p2pdl_aiohttp_median"] = round(entry["p2pdl"]["median_ms"] / aiohttp_ms, 3)
            if args.pipeline > 1:
                pipeline_ms = entry["p2pdl_pipeline"]["median_ms"]
                entry["pipeline_pieces"] = args.pipeline
                entry["ratio_p2pdl_pipeline_over_gloo_median"] = round(pipeline_ms / entry["gloo"]["median_ms"], 3)
                entry["ratio_p2pdl_pipeline_over_p2pdl_median"] = round(pipeline_ms / entry["p2pdl"]["median_ms"], 3)
            entry.update(extra)
            report["by_world"][str(world)] = entry

    print()
    print(f"{'peers':>5} {'system':>13} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8}   ratio p2pdl/gloo")
    for world, entry in report["by_world"].items():
        for system in ("gloo", "gloo_ddp", "p2pdl", "p2pdl_pipeline", "p2pdl_copy", "p2pdl_aiohttp"):
            if system not in entry:
                continue
            s = entry[system]
            ratio = f"{entry[f'ratio_{system}_over_gloo_median']:.2f}x" if system.startswith("p2pdl") else ""
            cells = f"{s['median_ms']:>10.1f} {s['p10_ms']:>8.1f} {s['p90_ms']:>8.1f}"
            print(f"{world:>5} {system:>13} {cells}   {ratio}")
        print(
            f"{'':>5} exact mean: p2pdl bit-exact={entry.get('p2pdl_bit_exact_vs_mean')}, "
            f"gloo max abs err={entry.get('gloo_max_abs_error'):.2e}"
        )
    write_result(args.out, "exchange", report, provenance)
    print(f"\nwrote {args.out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--device", default="cpu", help="where p2pdl's model and gradients live (cuda: on the GPU); gloo stays on CPU"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="ABBA runs per system and process count")
    parser.add_argument("--profile-rounds", type=int, default=3, help="instrumented p2pdl rounds")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for every worker, e.g. MALLOC_TRIM_THRESHOLD_=1073741824",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "exchange.json")
    parser.add_argument(
        "--aiohttp-path",
        action="store_true",
        help="also time p2pdl without frame streams (large frames over POST /frames and the WebSocket)",
    )
    parser.add_argument(
        "--copy-path",
        action="store_true",
        help="also time p2pdl with every frame copied before it is sent (the send path before zero-copy sends)",
    )
    parser.add_argument(
        "--pipeline",
        type=int,
        default=1,
        metavar="P",
        help="also time p2pdl with strategy.pipeline = P (the vector reduced in P pieces at once; 1: not timed)",
    )
    parser.add_argument(
        "--worker", choices=("gloo", "p2pdl", "p2pdl_copy", "p2pdl_aiohttp", "p2pdl_pipeline"), help=argparse.SUPPRESS
    )
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dist-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is None:
        if os.environ.get("MALLOC_TRIM_THRESHOLD_") is None:
            print(
                "note: set MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 for this process too",
                file=sys.stderr,
            )
        return main_parent(args)
    worker = gloo_worker if args.worker == "gloo" else p2pdl_worker
    result = worker(args)
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
