#!/usr/bin/env python3
"""The ~10M GPT on 4 peers: DDP/gloo, p2pdl allreduce, gossip and DiLoCo, on loopback and on slow links.

    sudo .venv/bin/python benchmarks/gpt_peers.py                      # both parts (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/gpt_peers.py --parts loopback          # no root needed
    sudo .venv/bin/python benchmarks/gpt_peers.py --parts netns        # link timings; loopback curves kept
    .venv/bin/python benchmarks/gpt_peers.py --parts derive            # recompute the derived times only

Workload: ``benchmarks/workloads/gpt_small_ctx64.py``, the small byte-level GPT (6 layers, 384
wide) with a 64-byte context (10,770,432 parameters, 43 MB in fp32). Every row trains the same
tokens: ``--steps`` steps of ``--batch-size`` windows of 64 bytes on each of 4 peers, from the
same initial weights, each peer on its own shard, with one torch thread per process
(``run.torch_threads = 1``, ``OMP_NUM_THREADS=1``): four processes share this machine's cores.

Rows: ``benchmarks/ddp_reference.py`` (DDP, gloo, 4 processes: the reference), p2pdl
``allreduce`` (exact gradient average every step), ``gossip`` on a ring (parameter averaging with
two neighbours every step) and DiLoCo (``allreduce`` with ``local_steps`` H = 50 and 100 and
``outer = "diloco"``, outer lr 0.7 / Nesterov momentum 0.9, the paper's values for an Adam inner
optimizer), all on the same tokens; and DiLoCo H = 50 with twice the tokens (``diloco50x2``, its
schedule over its own steps), which is not judged on the equal-tokens targets but tells how soon
DiLoCo reaches DDP's final loss when the equal-tokens rows end above it; and local SGD
(``localsgd50``: DiLoCo's outer step at lr 1 without momentum, plain averaging every 50 steps, on
the same tokens: ``--only localsgd50`` adds it to an earlier run's rows). The training recipe
lives in one place, :data:`OPTIMIZER` (AdamW, warm-up over 5% of a row's steps, cosine decay,
clipping at 1.0), merged into every row's config.

**loopback** (measured): every process on 127.0.0.1. Per row: the validation loss (mean over
peers of ``test_loss``, nats per byte, on the workload's fixed 32 validation windows) every
``--eval-every`` steps and at the end, tokens/s (tokens trained by all peers over the slowest
peer's training clock, evaluations included), bytes sent per peer (each peer's own counter of
application payload; for DDP, which counts nothing, the ring all-reduce's
``2 (N-1)/N x 4 bytes x parameters`` per step, marked as an estimate).

**netns** (measured step times, derived times to target): each peer in its own network namespace
with a tbf limit of ``--rates`` Mbit/s on its link, both directions (``benchmarks/netns.py``).
Training a full row there would take hours at 20 Mbit/s (an exact average moves ~65 MB per peer
per step), so only step times are measured on the links: ``--link-steps`` steps of DDP and of
p2pdl allreduce (seconds per step: the median step duration after the first), and H + 3 steps
of DiLoCo with H = ``--diloco-link-h`` (10), which hold one outer round: the median local step,
and the duration of the step that holds the outer round. Neither depends on H, so a short H
times both. Then

    time to target (derived) = steps to target x seconds per step           (DDP, allreduce)
    time to target (derived) = ceil(steps to target / H) x period(H)        (DiLoCo)
    period(H) = (H - 1) x local step seconds + outer-round step seconds     (both measured on the link)

where *steps to target* is the first evaluation of the loopback curve at which the row's mean
validation loss is at most DDP's final one (for DiLoCo, only evaluations at outer-round
boundaries count, where the peers hold one model). The speed-up is DDP's time to target over
DiLoCo's. A row that never reaches the target has no time to it.

Trade-offs, also in the JSON: the derived figures assume the loopback run's steps to target hold
on the link (the arithmetic is the same; only the clock differs), and a link step is timed with
four processes sharing two cores, so the compute part is as slow as on loopback. Link byte
counts include TCP/IP headers. The link measurements go to ``benchmarks/results/gpt_peers_links.json``;
``benchmarks/results/gpt_peers.json`` holds the loopback rows and the derived times, recomputed from
both files after each part (``--parts derive`` recomputes them alone), and ``gpt_peers.png`` plots
validation loss over tokens and over training time.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import strategies
from _provenance import Provenance, repo_relative, write_result
from netns import NetnsError, NetnsLan
from report import TIMES
from strategies import Row, Setting, read_jsonl, run_ddp, run_swarm
from time_to_accuracy import write_toml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "gpt_peers.json"
DEFAULT_LINKS = REPO / "benchmarks" / "results" / "gpt_peers_links.json"
WORKLOAD = REPO / "benchmarks" / "workloads" / "gpt_small_ctx64.py"
PARAMETERS = 10_770_432
CONTEXT = 64  # bytes per window of the workload: tokens per sample
PEERS = 4

# The training recipe of every row, in one place (merged into each generated config; DDP reads the
# same config): AdamW with nanoGPT's shakespeare-char settings (peak lr 1e-3, betas 0.9/0.99,
# weight decay 0.1, clipping at 1.0), a linear warm-up over the first 5% of the steps and cosine
# decay to 10% of the peak at the row's last step. The warm-up length is set per run from --steps.
OPTIMIZER: dict[str, dict[str, Any]] = {
    "run": {"grad_clip": 1.0},
    "optimizer": {"kind": "adamw", "lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1},
    "schedule": {"kind": "cosine", "final_lr_fraction": 0.1},
}
PEAK_LR = float(OPTIMIZER["optimizer"]["lr"])
WARMUP_FRACTION = 0.05

DILOCO = {"kind": "allreduce", "outer": "diloco", "outer_lr": 0.7, "outer_momentum": 0.9}
ROWS = (
    Row(key="ddp", label="DDP / gloo (reference)"),
    Row(key="allreduce", label="p2pdl allreduce (H=1)", strategy={"kind": "allreduce"}),
    Row(key="gossip", label="p2pdl gossip (ring)", strategy={"kind": "gossip"}, topology="ring"),
    Row(key="diloco50", label="DiLoCo (H=50)", strategy={**DILOCO, "local_steps": 50}),
    Row(key="diloco100", label="DiLoCo (H=100)", strategy={**DILOCO, "local_steps": 100}),
    # Twice the tokens (its schedule spans its own 2x steps): not an equal-tokens row, it answers
    # "how soon does DiLoCo reach DDP's final loss" when the equal-tokens rows end above it.
    Row(key="diloco50x2", label="DiLoCo (H=50), 2x the tokens", strategy={**DILOCO, "local_steps": 50}, step_scale=2),
    # DiLoCo's outer step at lr 1 without momentum: plain parameter averaging every H steps (local
    # SGD), on the same tokens, to see what the outer Nesterov momentum does over 20 outer rounds.
    Row(
        key="localsgd50",
        label="local SGD (H=50: DiLoCo with outer lr 1, no momentum)",
        strategy={**DILOCO, "local_steps": 50, "outer_lr": 1.0, "outer_momentum": 0.0},
    ),
)
LINK_DILOCO = "diloco50"  # the DiLoCo row timed on the links (with a short H: see run_netns)
LINK_ROWS = ("ddp", "allreduce", LINK_DILOCO)  # the rows whose step times are measured on the links
DILOCO_ROWS = {"diloco50": 50, "diloco100": 100, "diloco50x2": 50, "localsgd50": 50}
EQUAL_TOKENS_DILOCO = ("diloco50", "diloco100", "localsgd50")  # the rows the 2% and 50x targets are judged on
TARGET_VAL_GAP = 0.02  # DiLoCo's final validation loss within 2% of DDP's
TARGET_BYTES_RATIO = 50.0  # and at least 50x fewer bytes
TARGET_SPEEDUP = {100.0: 3.0, 20.0: 10.0}  # time to DDP's final loss on these links, DDP over DiLoCo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["loopback", "netns", "derive"],
        default=["loopback", "netns"],
        help="derive: run nothing, recompute the times to target from the results and the links file",
    )
    parser.add_argument("--only", nargs="+", choices=[r.key for r in ROWS], help="loopback: run only these rows")
    parser.add_argument("--steps", type=int, default=200, help="steps per peer on loopback (default 200)")
    parser.add_argument("--batch-size", type=int, default=2, help="windows of 64 bytes per peer and step (default 2)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 20.0], help="link rates, Mbit/s")
    parser.add_argument("--link-steps", type=int, default=3, help="DDP and allreduce steps timed on each link")
    parser.add_argument("--diloco-link-h", type=int, default=10, help="DiLoCo's H for the link timing (default 10)")
    parser.add_argument("--row-timeout", type=float, default=3600.0, help="seconds before a run counts as hung")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpt_peers", help="run outputs and logs")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument(
        "--reanalyze", action="store_true", help="loopback: train nothing, rebuild the rows from the run outputs"
    )
    parser.add_argument("--link-results", type=Path, default=DEFAULT_LINKS, help="the netns part's measurements")
    args = parser.parse_args(argv)
    longest = max((h for key, h in DILOCO_ROWS.items() if args.only is None or key in args.only), default=1)
    if args.steps % longest:
        parser.error(f"--steps must be a multiple of {longest}, so that DiLoCo ends on an outer round")
    if args.link_steps < 3:
        parser.error(f"--link-steps must be >= 3 (the first step includes connecting), got {args.link_steps}")
    if args.diloco_link_h < 2:
        parser.error(f"--diloco-link-h must be >= 2 (local steps besides the outer round), got {args.diloco_link_h}")
    return args


# --------------------------------------------------------------------------- configs


def merged(base: dict[str, Any], *overlays: dict[str, Any]) -> dict[str, Any]:
    """``base`` with each overlay's tables merged in, key by key (a later overlay wins)."""
    result = copy.deepcopy(base)
    for overlay in overlays:
        for key, value in overlay.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = {**result[key], **value}
            else:
                result[key] = copy.deepcopy(value)
    return result


def relaxed_timeouts(setting_name: str) -> tuple[float, dict[str, dict[str, Any]]]:
    """The round timeout and the transport and membership timeouts of a ``benchmarks/strategies.py``
    setting: "mlp" (a 17 MB model on loopback) or "netns" (on 100 Mbit/s links). A 43 MB exact
    average on a loaded two-core machine, or at 20 Mbit/s (~26 s), needs at least as much room."""
    setting = strategies.settings(strategies.parse_args([]))[setting_name]
    return setting.round_timeout, setting.extra


def write_config(row: Row, setting: Setting, batch_size: int, addresses: Sequence[str], path: Path) -> Path:
    round_timeout, timeouts = relaxed_timeouts("netns" if setting.rate_mbit is not None else "mlp")
    base = {
        "run": {
            "workload": str(WORKLOAD),
            "steps": row.steps(setting),
            "seed": 0,
            "batch_size": batch_size,
            "eval_every": setting.eval_every,
            "torch_threads": 1,
        },
        "strategy": {"kind": "allreduce"} if row.is_ddp else {**row.strategy, "round_timeout": round_timeout},
        "topology": {"kind": row.topology},
    }
    names = [f"p{i}" for i in range(len(addresses))]
    warmup = {"schedule": {"warmup_steps": max(1, round(WARMUP_FRACTION * row.steps(setting)))}}
    data = merged(base, OPTIMIZER, warmup, timeouts)
    data["peers"] = [{"name": n, "address": a} for n, a in zip(names, addresses, strict=True)]
    write_toml(data, path)
    return path


def run_one(row: Row, setting: Setting, args: argparse.Namespace, lan: NetnsLan | None) -> dict[str, Any]:
    """Train ``row`` under ``setting`` (in ``lan``'s namespaces if given); the run record of strategies.py."""
    out: Path = args.out.resolve() / setting.name / row.key
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob("*"):
        if stale.is_file() and stale.name in ("metrics.jsonl", "summary.json", "model.pt", "checkpoint.pt"):
            stale.unlink()
    addresses = strategies.addresses_for(setting, PEERS, lan)
    config = write_config(row, setting, args.batch_size, addresses, out / "config.toml")
    before = lan.counters() if lan is not None else None
    if row.is_ddp:
        run = run_ddp(setting, config, out / "ddp", PEERS, lan, args.row_timeout)
    else:
        run = run_swarm(setting, row, config, out, [f"p{i}" for i in range(PEERS)], lan, args.row_timeout)
    if lan is not None and before is not None:
        sent = [a["sent"] - b["sent"] for a, b in zip(lan.counters(), before, strict=True)]
        run["link_bytes_sent_per_peer"] = {"mean": statistics.mean(sent), "max": max(sent)}
    return run


def recorded_run(row: Row, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A loopback row's run record and stamp, read back from its run directory (``--reanalyze``).

    ``run.json`` holds both; a directory without one (a run by an older version of this script)
    is rebuilt from the summaries its processes wrote, with a stamp that says so.
    """
    saved = folder / "run.json"
    if saved.exists():
        document = json.loads(saved.read_text())
        return document["run"], document["measured"]
    unstamped = {"note": f"rebuilt from {repo_relative(folder)}: the run's own stamp was not kept"}
    if row.is_ddp:
        summary = json.loads((folder / "ddp" / "summary.json").read_text())
        peers = [
            {"name": f"rank{r}", "exit_code": code, "steps": rank.get("steps"), "bytes_sent": None}
            for r, (code, rank) in enumerate(zip(summary["exit_codes"], summary["ranks"], strict=True))
        ]
        files = [str(folder / "ddp" / f"rank{r}" / "metrics.jsonl") for r in range(PEERS)]
        return {
            "peers": peers,
            "metric_files": files,
            "hung": False,
            "wall_seconds": summary["wall_seconds"],
        }, unstamped
    peers = []
    for name in (f"p{i}" for i in range(PEERS)):
        path = folder / name / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        peers.append(
            {
                "name": name,
                "exit_code": 0 if summary else None,
                "steps": summary.get("steps"),
                "bytes_sent": summary.get("bytes_sent"),
            }
        )
    files = [str(folder / p["name"] / "metrics.jsonl") for p in peers]
    return {"peers": peers, "metric_files": files, "hung": False, "wall_seconds": None}, unstamped


def failures(run: dict[str, Any]) -> list[str]:
    problems = [
        f"{p['name']} exited {p['exit_code']}" if p["exit_code"] is not None else f"{p['name']} did not finish"
        for p in run["peers"]
        if p["exit_code"] != 0
    ]
    return problems + (["hung: still running at the row timeout"] if run["hung"] and not finished(run) else [])


def finished(run: dict[str, Any]) -> bool:
    """Every process trained every step and exited 0 (so a row timeout that fired during exit cut nothing)."""
    steps = {p["steps"] for p in run["peers"]}
    return len(steps) == 1 and None not in steps and all(p["exit_code"] == 0 for p in run["peers"])


# --------------------------------------------------------------------------- loopback


def loss_curve(metric_files: Sequence[Path], tokens_per_step: int) -> tuple[list[dict[str, float]], list[float]]:
    """Mean validation loss over peers at each evaluated step every peer reached; each peer's final loss.

    A final evaluation joins the curve where every peer made it at the same step (its periodic
    one is skipped there). ``time`` is the slowest peer's training clock at that step.
    """
    by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    finals: list[tuple[int, float, float]] = []
    for path in metric_files:
        for record in read_jsonl(path):
            if "test_loss" not in record:
                continue
            point = (float(record["test_loss"]), float(record["time"]))
            if record.get("final"):
                finals.append((int(record["step"]) + 1, *point))
            else:
                by_step[int(record["step"]) + 1].append(point)
    if len(finals) == len(metric_files) and len({s for s, _, _ in finals}) == 1:
        by_step[finals[0][0]] = [(loss, t) for _, loss, t in finals]
    curve = [
        {
            "steps": steps,
            "tokens": steps * tokens_per_step,
            "val_loss": statistics.mean(loss for loss, _ in points),
            "time": max(t for _, t in points),
        }
        for steps, points in sorted(by_step.items())
        if len(points) == len(metric_files)
    ]
    return curve, [loss for _, loss, _ in finals]


def loopback_row(row: Row, run: dict[str, Any], steps: int, tokens_per_step: int) -> dict[str, Any]:
    curve, finals = loss_curve([Path(p) for p in run["metric_files"]], tokens_per_step)
    sent = [p["bytes_sent"] for p in run["peers"] if p["bytes_sent"] is not None]
    estimate = None
    if row.is_ddp:
        estimate = steps * 2 * (PEERS - 1) / PEERS * 4 * PARAMETERS  # a ring all-reduce of the fp32 gradient
    seconds = curve[-1]["time"] if curve else None
    return {
        "row": row.key,
        "label": row.label,
        "strategy": row.strategy if not row.is_ddp else {"kind": "ddp", "backend": "gloo"},
        "topology": row.topology if not row.is_ddp else None,
        "problems": failures(run),
        "notes": ["the row timeout fired while the processes were exiting, after every one had trained every step"]
        if run["hung"] and finished(run)
        else [],
        "final_val_loss": statistics.mean(finals) if len(finals) == PEERS else None,
        "final_val_loss_per_peer": finals,
        "training_seconds": seconds,
        "tokens": steps * tokens_per_step,
        "tokens_per_second": steps * tokens_per_step / seconds if seconds else None,
        "bytes_sent_per_peer": {"mean": statistics.mean(sent), "max": max(sent)} if sent else None,
        "bytes_sent_per_peer_estimate": estimate,
        "wall_seconds": run["wall_seconds"],
        "peers": run["peers"],
        "metric_files": [repo_relative(path) for path in run["metric_files"]],
        "curve": curve,
    }


def sent_bytes(row: dict[str, Any]) -> float | None:
    if row["bytes_sent_per_peer"] is not None:
        return float(row["bytes_sent_per_peer"]["mean"])
    estimate = row["bytes_sent_per_peer_estimate"]
    return None if estimate is None else float(estimate)


def steps_to(row: dict[str, Any], target: float) -> int | None:
    """First evaluated step with mean validation loss <= ``target`` (DiLoCo: at outer-round boundaries)."""
    period = DILOCO_ROWS.get(row["row"], 1)
    return next((int(p["steps"]) for p in row["curve"] if p["val_loss"] <= target and p["steps"] % period == 0), None)


def identical_prefix(first: dict[str, Any], second: dict[str, Any]) -> int | None:
    """Steps from the start at which the first process of each row logged bit-identical training losses."""
    if not first.get("metric_files") or not second.get("metric_files"):
        return None
    losses = [
        [r["loss"] for r in read_jsonl(REPO / row["metric_files"][0]) if "loss" in r and not r.get("final")]
        for row in (first, second)
    ]
    same = 0
    for a, b in zip(*losses, strict=False):
        if a != b:
            break
        same += 1
    return same


def judge_loopback(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's loopback targets, each with the figures it was decided on."""
    ddp = rows.get("ddp")
    if ddp is None or ddp["final_val_loss"] is None:
        return {"reference": "DDP row missing or failed: nothing to compare"}
    reference, ddp_bytes = ddp["final_val_loss"], sent_bytes(ddp)
    verdicts: dict[str, Any] = {"ddp_final_val_loss": reference}
    allreduce = rows.get("allreduce")
    if allreduce is not None and allreduce["curve"]:
        ddp_curve = {p["steps"]: p["val_loss"] for p in ddp["curve"]}
        gaps = [abs(p["val_loss"] - ddp_curve[p["steps"]]) for p in allreduce["curve"] if p["steps"] in ddp_curve]
        verdicts["allreduce_follows_ddp"] = {
            "max_abs_val_loss_gap": max(gaps) if gaps else None,
            "points_compared": len(gaps),
            "final_val_loss_gap": None
            if allreduce["final_val_loss"] is None
            else allreduce["final_val_loss"] / reference - 1,
            "identical_training_loss_steps": identical_prefix(ddp, allreduce),
        }
    for key in EQUAL_TOKENS_DILOCO:
        row = rows.get(key)
        if row is None or row["final_val_loss"] is None:
            continue
        gap = row["final_val_loss"] / reference - 1
        sent = sent_bytes(row)
        ratio = ddp_bytes / sent if ddp_bytes and sent else None
        verdicts[key] = {
            "val_loss_gap": gap,
            "within_2_percent": gap <= TARGET_VAL_GAP,
            "bytes_ratio_vs_ddp": ratio,
            "at_least_50x_fewer_bytes": ratio is not None and ratio >= TARGET_BYTES_RATIO,
        }
    return verdicts


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:,.1f}"


def loopback_table(rows: list[dict[str, Any]], commit: str | None = None) -> str:
    """The loopback rows; a row measured at another commit than ``commit`` (kept by ``--only``)
    says when and where in its status."""
    reference = next((r["final_val_loss"] for r in rows if r["row"] == "ddp"), None)
    ddp_bytes = next((sent_bytes(r) for r in rows if r["row"] == "ddp"), None)
    lines = [
        "| row | final val loss | vs DDP | tokens/s | MB sent per peer | fewer bytes than DDP "
        "| steps to DDP's final loss | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        final, sent = row["final_val_loss"], sent_bytes(row)
        versus = "—" if final is None or reference is None or row["row"] == "ddp" else f"{final / reference - 1:+.2%}"
        estimate = " (est.)" if row["bytes_sent_per_peer"] is None and sent is not None else ""
        ratio = f"{ddp_bytes / sent:,.0f}{TIMES}" if ddp_bytes and sent and row["row"] != "ddp" else "—"
        reached = steps_to(row, reference) if reference is not None else None
        cells = [
            row["label"],
            "n/a" if final is None else f"{final:.4f}",
            versus,
            "n/a" if row["tokens_per_second"] is None else f"{row['tokens_per_second']:,.0f}",
            f"{_mb(sent)}{estimate}",
            ratio,
            "not reached" if reached is None else str(reached),
            "**FAILED**: " + "; ".join(row["problems"])
            if row["problems"]
            else "; ".join(["ok", *row.get("notes", []), *earlier(row, commit)]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def earlier(row: dict[str, Any], commit: str | None) -> list[str]:
    """A note for a row that an earlier invocation measured, at another commit than ``commit``."""
    measured = row.get("measured") or {}
    if commit is None or not measured.get("commit") or measured["commit"] == commit:
        return []
    date = str(measured.get("date_utc", "")).replace("T", " ")[:16]
    return [f"measured earlier: `{measured['commit'][:7]}`, {date} UTC"]


def run_loopback(args: argparse.Namespace, previous: list[dict[str, Any]], provenance: Provenance) -> dict[str, Any]:
    setting = Setting(
        name="loopback",
        workload=WORKLOAD,
        steps=args.steps,
        eval_every=args.eval_every,
        lr=PEAK_LR,
        thresholds=(),
        max_seconds=None,
        rate_mbit=None,
    )
    tokens_per_step = args.batch_size * CONTEXT * PEERS
    kept = {r["row"]: r for r in previous} if args.only else {}
    started = time.monotonic()
    for row in ROWS:
        if args.only and row.key not in args.only:
            continue
        folder = args.out.resolve() / setting.name / row.key
        if args.reanalyze:
            run, stamp = recorded_run(row, folder)
        else:
            print(f"[{time.monotonic() - started:7.1f} s] loopback: {row.label} ...", flush=True)
            stamp = provenance.stamp()
            run = run_one(row, setting, args, None)
            (folder / "run.json").write_text(json.dumps({"run": run, "measured": stamp}, indent=1))
        done = loopback_row(row, run, row.steps(setting), tokens_per_step)
        done["measured"] = stamp
        kept[row.key] = done
        print(f"    final val loss {done['final_val_loss']}, {done['wall_seconds']} s wall {done['problems']}")
    rows = [kept[r.key] for r in ROWS if r.key in kept]
    return {
        "setting": {
            "workload": repo_relative(WORKLOAD),
            "parameters": PARAMETERS,
            "peers": PEERS,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "context": CONTEXT,
            "tokens_per_step_all_peers": tokens_per_step,
            "eval_every": args.eval_every,
            "optimizer": OPTIMIZER,
            "warmup_fraction_of_steps": WARMUP_FRACTION,
            "torch_threads_per_process": 1,
        },
        "rows": rows,
        "targets": judge_loopback({r["row"]: r for r in rows}),
        "table": loopback_table(rows, provenance.commit),
    }


# --------------------------------------------------------------------------- netns


def step_durations(metric_file: Path) -> tuple[list[float], list[bool]]:
    """Per step after the first: its duration, and whether it held a communication round."""
    records = [r for r in read_jsonl(metric_file) if "loss" in r and not r.get("final")]
    durations = [b["time"] - a["time"] for a, b in itertools.pairwise(records)]
    return durations, ["round" in r for r in records[1:]]


def link_timing(key: str, run: dict[str, Any]) -> dict[str, Any]:
    """Measured seconds per step (DDP, allreduce), or per local step and outer-round step (DiLoCo)."""
    per_peer = [step_durations(Path(p)) for p in run["metric_files"]]
    timing: dict[str, Any] = {
        "problems": failures(run),
        "steps_done": [p["steps"] for p in run["peers"]],
        "link_bytes_sent_per_peer": run.get("link_bytes_sent_per_peer"),
        "wall_seconds": run["wall_seconds"],
    }
    if key in DILOCO_ROWS:
        local = [d for durations, rounds in per_peer for d, r in zip(durations, rounds, strict=True) if not r]
        outer = [d for durations, rounds in per_peer for d, r in zip(durations, rounds, strict=True) if r]
        timing["local_step_seconds"] = statistics.median(local) if local else None
        timing["outer_round_step_seconds"] = statistics.mean(outer) if outer else None
    else:
        every = [d for durations, _ in per_peer for d in durations]
        timing["seconds_per_step"] = statistics.median(every) if every else None
    return timing


def derived_times(loopback: list[dict[str, Any]], timings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Time to DDP's final validation loss on one link: loopback steps x measured link step times."""
    rows = {r["row"]: r for r in loopback}
    ddp = rows.get("ddp")
    if ddp is None or ddp["final_val_loss"] is None:
        return {"problem": "no loopback DDP row: no target"}
    target = ddp["final_val_loss"]
    derived: dict[str, Any] = {"target_val_loss": target}
    for key, row in rows.items():
        steps = steps_to(row, target)
        entry: dict[str, Any] = {"steps_to_target": steps}
        if key in DILOCO_ROWS:
            timing = timings.get(LINK_DILOCO, {})
            local, outer = timing.get("local_step_seconds"), timing.get("outer_round_step_seconds")
            if local is not None and outer is not None:
                period = (DILOCO_ROWS[key] - 1) * local + outer
                entry["period_seconds"] = period
                entry["seconds"] = None if steps is None else math.ceil(steps / DILOCO_ROWS[key]) * period
        elif key in timings and timings[key].get("seconds_per_step") is not None:
            entry["seconds_per_step"] = timings[key]["seconds_per_step"]
            entry["seconds"] = None if steps is None else steps * timings[key]["seconds_per_step"]
        if "seconds" in entry:
            derived[key] = entry
    ddp_seconds = derived.get("ddp", {}).get("seconds")
    for key in (*DILOCO_ROWS, "allreduce"):
        seconds = derived.get(key, {}).get("seconds")
        if seconds and ddp_seconds:
            derived[key]["speedup_vs_ddp"] = ddp_seconds / seconds
    ddp_step = timings.get("ddp", {}).get("seconds_per_step")
    for key, h in DILOCO_ROWS.items():
        # Secondary: at the loss DiLoCo ends with, how much sooner than DDP gets there (same formulas).
        diloco, outcome = rows.get(key), derived.get(key)
        if diloco is None or outcome is None or diloco["final_val_loss"] is None or ddp_step is None:
            continue
        own, ddp_steps = steps_to(diloco, diloco["final_val_loss"]), steps_to(ddp, diloco["final_val_loss"])
        if own is not None and ddp_steps is not None:
            outcome["at_own_final_loss"] = {
                "val_loss": diloco["final_val_loss"],
                "ddp_steps": ddp_steps,
                "ddp_seconds": ddp_steps * ddp_step,
                "seconds": math.ceil(own / h) * outcome["period_seconds"],
                "speedup_vs_ddp": ddp_steps * ddp_step / (math.ceil(own / h) * outcome["period_seconds"]),
            }
    return derived


def run_netns(args: argparse.Namespace, provenance: Provenance) -> dict[str, Any]:
    """Time DDP, p2pdl allreduce and DiLoCo steps on each rate-limited LAN (measurements only)."""
    rates: dict[str, Any] = {}
    started = time.monotonic()
    for rate in args.rates:
        timings: dict[str, dict[str, Any]] = {}
        for key in LINK_ROWS:
            row = next(r for r in ROWS if r.key == key)
            steps = args.link_steps
            if key in DILOCO_ROWS:
                # period(H) is built from a local step and an outer-round step, neither of which depends
                # on H, so a short H times both; H + 3 steps hold one outer round and local steps around it.
                row = Row(
                    key=key,
                    label=f"DiLoCo (H={args.diloco_link_h})",
                    strategy={**DILOCO, "local_steps": args.diloco_link_h},
                )
                steps = args.diloco_link_h + 3
            setting = Setting(
                name=f"netns{rate:g}",
                workload=WORKLOAD,
                steps=steps,
                eval_every=0,
                lr=PEAK_LR,
                thresholds=(),
                max_seconds=None,
                rate_mbit=rate,
            )
            elapsed = time.monotonic() - started
            print(f"[{elapsed:7.1f} s] netns {rate:g} Mbit/s: {row.label}, {steps} steps", flush=True)
            stamp = provenance.stamp()
            with NetnsLan(PEERS, rate_mbit=rate) as lan:
                timings[key] = {**link_timing(key, run_one(row, setting, args, lan)), "steps": steps}
            timings[key]["measured"] = stamp
            print(f"    {json.dumps({k: v for k, v in timings[key].items() if k != 'measured'})}", flush=True)
        rates[f"{rate:g}"] = {"rate_mbit": rate, "measured": timings}
    return {"batch_size": args.batch_size, "rates": rates}


def derive(loopback: list[dict[str, Any]], links: dict[str, Any], source: Path) -> dict[str, Any]:
    """Each link's measured step times combined with the loopback curves: times to DDP's final loss."""
    rates: dict[str, Any] = {}
    for name, entry in links["rates"].items():
        derived = derived_times(loopback, entry["measured"])
        speedups = {key: derived.get(key, {}).get("speedup_vs_ddp") for key in DILOCO_ROWS}
        target = TARGET_SPEEDUP.get(entry["rate_mbit"])
        rates[name] = {
            **entry,
            "derived": derived,
            "target_speedup": target,
            "target_met": {k: (s is not None and target is not None and s >= target) for k, s in speedups.items()},
        }
    return {"measured_in": repo_relative(source), "rates": rates, "table": netns_table(rates)}


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.1f} s" if value < 600 else f"{value / 60:,.1f} min"


def own_loss_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    return (
        f"{_seconds(entry['ddp_seconds'])} / {_seconds(entry['seconds'])} = {entry['speedup_vs_ddp']:.2f}{TIMES} "
        f"(loss {entry['val_loss']:.4f})"
    )


def netns_table(rates: dict[str, Any]) -> str:
    lines = [
        "| link | row | measured: s per step (DiLoCo: local step / outer-round step) "
        "| MB on link per peer, whole timed run "
        "| derived: time to DDP's final loss | speed-up vs DDP | target "
        "| derived: at DiLoCo's own final loss, DDP's time / DiLoCo's |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, entry in rates.items():
        measured, derived = entry["measured"], entry["derived"]
        for key in ("ddp", "allreduce", *DILOCO_ROWS):
            row = next(r for r in ROWS if r.key == key)
            timing = measured.get(LINK_DILOCO if key in DILOCO_ROWS else key, {})
            if key in DILOCO_ROWS:
                local, outer = timing.get("local_step_seconds"), timing.get("outer_round_step_seconds")
                step_text = f"{_seconds(local)} / {_seconds(outer)}"
            else:
                step_text = _seconds(timing.get("seconds_per_step"))
            link = timing.get("link_bytes_sent_per_peer")
            total = None if not link else link["mean"]
            result = derived.get(key, {})
            steps = result.get("steps_to_target")
            time_text = "not reached" if steps is None else f"{_seconds(result.get('seconds'))} ({steps} steps)"
            speedup = result.get("speedup_vs_ddp")
            goal = entry["target_speedup"] if key in DILOCO_ROWS else None
            met = "met" if entry["target_met"].get(key) else "**not met**"
            verdict = "—" if goal is None else f"≥ {goal:g}{TIMES}: {met}"
            problems = "; ".join(timing.get("problems", []))
            cells = [
                f"{name} Mbit/s",
                row.label,
                step_text + (f" (**{problems}**)" if problems else ""),
                f"{_mb(total)} ({timing.get('steps')} steps)",
                time_text,
                "—" if speedup is None else f"{speedup:.2f}{TIMES}",
                verdict,
                own_loss_cell(result.get("at_own_final_loss")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot and main


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (by_tokens, by_time) = pyplot.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        tokens = [p["tokens"] / 1e3 for p in row["curve"]]
        losses = [p["val_loss"] for p in row["curve"]]
        by_tokens.plot(tokens, losses, marker=".", label=row["label"])
        by_time.plot([p["time"] for p in row["curve"]], losses, marker=".", label=row["label"])
    by_tokens.set_xlabel("tokens trained, all peers (thousands)")
    by_time.set_xlabel("training clock, slowest peer (s), loopback")
    for axis in (by_tokens, by_time):
        axis.set_ylabel("validation loss (nats per byte)")
        axis.grid(alpha=0.3)
    by_tokens.legend()
    figure.suptitle(f"~10M GPT (10.77M params), {PEERS} peers on 127.0.0.1")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    provenance = Provenance([__file__, *(sys.argv[1:] if argv is None else argv)])
    previous = json.loads(args.results.read_text()) if args.results.exists() else {}
    result: dict[str, Any] = {
        "loopback": previous.get("loopback"),
        "netns": previous.get("netns"),
        "formula": {
            "measured": "loopback: curves, final validation loss, tokens/s, bytes; netns (in the links file): "
            "seconds per step on the link (DDP, allreduce), seconds per local step and per outer-round step "
            "(DiLoCo), link bytes",
            "derived": "time to target = steps to target (loopback curve) x seconds per step (link); DiLoCo: "
            "ceil(steps to target / H) x period(H), period(H) = (H - 1) x local step s + outer-round step s",
        },
        "note": f"All {PEERS} processes of a run share this machine's {os.cpu_count()} CPU cores, "
        "one torch thread each.",
    }
    if ("loopback" not in args.parts or args.only) and "provenance" in previous:
        # Loopback rows measured by an earlier invocation stay: so does its provenance.
        result["earlier_provenance"] = [*previous.get("earlier_provenance", []), previous["provenance"]]
    status = 0
    if "loopback" in args.parts:
        earlier = (previous.get("loopback") or {}).get("rows", [])
        result["loopback"] = run_loopback(args, earlier, provenance)
        plot(result["loopback"]["rows"], args.results.with_suffix(".png"))
        # Kept even if the netns part fails: that part can be rerun alone (--parts netns).
        write_result(args.results, "gpt_peers", {**result, "table": result["loopback"]["table"]}, provenance)
    if "netns" in args.parts:
        try:
            links = run_netns(args, provenance)
        except NetnsError as exc:  # no root, no tc: the loopback part stands, this part did not run
            print(f"gpt_peers: netns part unavailable: {exc}", file=sys.stderr)
            status = 1
        else:
            write_result(args.link_results, "gpt_peers_links", links, provenance)
    if args.link_results.exists() and result["loopback"]:
        result["netns"] = derive(
            result["loopback"]["rows"], json.loads(args.link_results.read_text()), args.link_results
        )
    tables = [f"#### Loopback\n\n{result['loopback']['table']}"] if result["loopback"] else []
    if result["netns"]:
        tables.append(f"#### Emulated links (netns, tbf)\n\n{result['netns']['table']}")
    result["table"] = "\n\n".join(tables)
    if result["loopback"]:
        write_result(args.results, "gpt_peers", result, provenance)
    print(f"\n{result['table']}\n\nwrote {args.results}")
    return status


if __name__ == "__main__":
    sys.exit(main())
