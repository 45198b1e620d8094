#!/usr/bin/env python3
"""Every p2pdl strategy against DDP/gloo, 8 peers on MNIST-1D: on loopback, and on 100 Mbit/s links.

    sudo .venv/bin/python benchmarks/strategies.py                       # both tables (~36 min on 2 cores)
    .venv/bin/python benchmarks/strategies.py --tables loopback          # no root needed (~13 min)
    sudo .venv/bin/python benchmarks/strategies.py --tables netns --only gossip ddp   # rerun rows, merged in
    .venv/bin/python benchmarks/strategies.py --reanalyze                # rebuild tables from runs/strategies

Rows: gossip (ring), allreduce (exact, H=1), local SGD (allreduce, H=8), DiLoCo (allreduce H=8,
outer lr 0.5 / momentum 0.5: the paper's 0.7 / 0.9 diverges on top of an inner SGD momentum of
0.9), async-gossip (ring), ps sync (server p0, which also trains), ps async, ps local SGD
(parameters averaged on the server every 8 steps), push-sum, and
``benchmarks/ddp_reference.py`` (DDP, gloo) as the reference, measured in the same invocation.

* **loopback**: the ConvBase CNN (5,210 parameters), SGD lr 0.1, momentum 0.9, batch 32 per
  peer, ``--loopback-steps`` (1500) steps, evaluation every 50; every peer on 127.0.0.1 (free
  ports). Communication is cheap here, so the table measures the algorithms plus their CPU
  overhead.
* **netns**: the wide MLP (4.3M parameters, 17 MB in fp32), every peer in its own network
  namespace on a private bridge (``benchmarks/netns.py``), with a tbf qdisc limiting every
  peer's link to ``--rate-mbit`` (100) in both directions. Each row trains for at most
  ``--netns-steps`` steps *or* ``--netns-seconds`` seconds of training clock, whichever comes
  first (then the peers are stopped with SIGTERM and make a final evaluation; DDP stops itself
  via ``--max-seconds``), so slow rows are cut off instead of taking an hour: the table is
  "what each strategy reaches within the same time budget". The MLP tops out near 68% test
  accuracy on MNIST-1D (an MLP has no translation invariance; the MNIST-1D paper reports 68% for
  its MLP too), so this table reports 40% / 50% / 60% and the best accuracy as well as 80% / 90%.
  Transport and membership timeouts are relaxed for this table (round and send timeouts
  120 s, WebSocket heartbeat 60 s, suspect/dead after 30 / 60 s): on a saturated 100 Mbit/s link
  a 17 MB frame takes 1.4 s alone and 10 s when seven share the parameter server's link, and the
  defaults (10 s, 5 s) would turn slowness into churn.

Time to X% is the first evaluation at which the *mean* test accuracy over the peers reached X,
on the peers' own training clocks (seconds since each built its model, so connecting is
included; at a given step, the slowest peer's clock). Samples = steps x batch x peers. Bytes sent
per peer come from each peer's own counter (application payload); in the netns table also from
its veth link (TCP/IP headers included, which is the only measurement DDP gets). On loopback
DDP's bytes are an estimate: a ring all-reduce sends 2 (N-1)/N x 4 bytes x parameters per step.

Every peer and rank runs with ``OMP_NUM_THREADS=1``, ``MALLOC_MMAP_THRESHOLD_=268435456`` and
``MALLOC_TRIM_THRESHOLD_=1073741824``. Trade-off, stated in the output too: all 8 processes of a
row share this machine's cores (2 here), so times are for 8 processes on those cores, and a
strategy that burns CPU in its communication path loses time that it would not lose on 8
machines. A failed row (crash, hang, non-convergence) is kept in the table, marked, with its
logs under ``--out``.

Writes ``benchmarks/results/strategies.json`` and prints one markdown table per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _provenance import Provenance, write_result
from netns import NetnsLan
from time_to_accuracy import free_ports, write_toml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "strategies.json"
CNN = REPO / "peers" / "mnist1d_cnn.py"
WIDE_MLP = REPO / "peers" / "mnist1d_wide_mlp.py"
PEER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
PARAMETERS = {CNN: 5_210, WIDE_MLP: 4_300_810}  # for DDP's loopback byte estimate
CHANCE = 0.10  # ten classes
COLLAPSE = 0.10  # a final mean accuracy this far below the best one marks the row as diverged
STOP_GRACE = 90.0  # seconds peers get after SIGTERM to finish a round, evaluate and exit


@dataclass(frozen=True, kw_only=True)
class Row:
    key: str
    label: str
    strategy: dict[str, Any] = field(default_factory=dict)
    topology: str = "full"
    # Async PS counts the server's own steps, each a small update (lr / (n (1 + staleness))), so it
    # gets more of them; time and samples to X% stay comparable across rows.
    step_scale: int = 1
    compression: dict[str, Any] = field(default_factory=dict)  # the [compression] table, if any
    ddp_args: tuple[str, ...] = ()  # DDP rows: extra benchmarks/ddp_reference.py flags (comm hooks)
    run: dict[str, Any] = field(default_factory=dict)  # [run] keys over the setting's (DGC: momentum 0)

    def steps(self, setting: Setting) -> int:
        return setting.steps * self.step_scale

    @property
    def is_ddp(self) -> bool:
        return self.key.startswith("ddp")


ROWS = (
    Row(key="gossip", label="gossip (ring)", strategy={"kind": "gossip"}, topology="ring"),
    Row(key="allreduce", label="allreduce (exact, H=1)", strategy={"kind": "allreduce"}),
    Row(key="localsgd", label="local SGD (allreduce, H=8)", strategy={"kind": "allreduce", "local_steps": 8}),
    Row(
        key="diloco",
        label="DiLoCo (H=8, outer lr 0.5, mom. 0.5)",
        strategy={"kind": "allreduce", "local_steps": 8, "outer": "diloco", "outer_lr": 0.5, "outer_momentum": 0.5},
    ),
    Row(key="async-gossip", label="async-gossip (ring)", strategy={"kind": "async-gossip"}, topology="ring"),
    Row(key="ps-sync", label="ps sync (server p0)", strategy={"kind": "ps", "server": "p0", "ps_mode": "sync"}),
    Row(
        key="ps-async",
        label="ps async (server p0)",
        strategy={"kind": "ps", "server": "p0", "ps_mode": "async"},
        step_scale=2,
    ),
    Row(
        key="ps-local",
        label="ps local SGD (server p0, H=8)",
        strategy={"kind": "ps", "server": "p0", "ps_mode": "sync", "local_steps": 8},
    ),
    Row(key="push-sum", label="push-sum (exponential)", strategy={"kind": "push-sum"}, topology="ring"),
    Row(key="ddp", label="DDP / gloo (reference)"),
)


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One table: a workload, a schedule and a network."""

    name: str
    workload: Path
    steps: int
    eval_every: int
    lr: float
    thresholds: tuple[float, ...]
    max_seconds: float | None  # training-clock budget per row; None: run every step
    rate_mbit: float | None  # None: loopback
    batch_size: int = 32
    momentum: float = 0.9
    round_timeout: float = 10.0
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_args(
    argv: list[str] | None = None,
    *,
    rows: Sequence[Row] = ROWS,
    description: str | None = __doc__,
    results: Path = DEFAULT_RESULTS,
    out: Path = REPO / "runs" / "strategies",
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tables",
        nargs="+",
        choices=["loopback", "netns", "mlp"],
        default=["loopback", "netns"],
        help="loopback: the CNN; netns: the wide MLP on rate-limited links; mlp: the wide MLP on loopback, "
        "a fixed number of steps (accuracy at equal steps for large tensors)",
    )
    parser.add_argument("--only", nargs="+", choices=[r.key for r in rows], help="run only these rows")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--loopback-steps", type=int, default=1500)
    parser.add_argument("--loopback-eval-every", type=int, default=50)
    parser.add_argument("--mlp-steps", type=int, default=150)
    parser.add_argument("--netns-steps", type=int, default=400)
    parser.add_argument("--netns-eval-every", type=int, default=10)
    parser.add_argument("--netns-seconds", type=float, default=120.0, help="training-clock budget per netns row")
    parser.add_argument("--netns-lr", type=float, default=0.1, help="SGD lr for the wide MLP (momentum 0.9)")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--row-timeout", type=float, default=900.0, help="seconds before a row counts as hung")
    parser.add_argument("--out", type=Path, default=out, help="run outputs and logs")
    parser.add_argument("--results", type=Path, default=results)
    parser.add_argument(
        "--reanalyze",
        action="store_true",
        help="run nothing: rebuild the tables of --results from the run outputs under --out",
    )
    args = parser.parse_args(argv)
    if args.peers < 2:
        parser.error(f"--peers must be >= 2, got {args.peers}")
    return args


# --------------------------------------------------------------------------- configs


def write_config(setting: Setting, row: Row, addresses: Sequence[str], path: Path) -> Path:
    names = [f"p{i}" for i in range(len(addresses))]
    strategy = {**row.strategy, "round_timeout": setting.round_timeout} if not row.is_ddp else {"kind": "allreduce"}
    if strategy.get("kind") == "async-gossip":
        strategy.pop("round_timeout")  # it never waits for a round
    data: dict[str, Any] = {
        "run": {
            "workload": str(setting.workload),
            "steps": row.steps(setting),
            "seed": 0,
            "batch_size": setting.batch_size,
            "optimizer": "sgd",
            "lr": setting.lr,
            "momentum": setting.momentum,
            "eval_every": setting.eval_every,
            "torch_threads": 1,
            **row.run,
        },
        "strategy": strategy,
        "topology": {"kind": row.topology},
        **setting.extra,
        **({"compression": row.compression} if row.compression else {}),
        "peers": [{"name": n, "address": a} for n, a in zip(names, addresses, strict=True)],
    }
    write_toml(data, path)
    return path


def addresses_for(setting: Setting, count: int, lan: NetnsLan | None) -> list[str]:
    if lan is None:
        return [f"127.0.0.1:{port}" for port in free_ports(count)]
    return [f"{ip}:29500" for ip in lan.addresses]  # one namespace each, so one port serves all


# --------------------------------------------------------------------------- running a row


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_swarm(
    setting: Setting, row: Row, config: Path, out: Path, names: list[str], lan: NetnsLan | None, row_timeout: float
) -> dict[str, Any]:
    """Start one ``p2pdl peer`` per name (in its namespace, if any) and wait; SIGTERM at the budget."""
    env = {**os.environ, **PEER_ENV}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    started = time.monotonic()
    budget_hit = hung = False
    try:
        for index, name in enumerate(names):
            peer_out = out / name
            peer_out.mkdir(parents=True, exist_ok=True)
            command = [
                sys.executable, "-m", "p2pdl.cli", "peer", "--config", str(config), "--name", name,
                "--steps", str(row.steps(setting)), "--out", str(peer_out),
            ]  # fmt: skip
            prefix = lan.prefix(index) if lan is not None else []
            logs.append(open(peer_out / "peer.log", "wb"))  # noqa: SIM115 - closed below
            procs.append(
                subprocess.Popen([*prefix, *command], stdout=logs[-1], stderr=subprocess.STDOUT, env=env, cwd=REPO)
            )
        metrics = [out / name / "metrics.jsonl" for name in names]
        training_since: float | None = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if training_since is None and all(m.exists() for m in metrics):
                training_since = now  # the file is opened just before each peer's clock starts
            since = now - training_since if training_since is not None else 0.0
            if setting.max_seconds is not None and since > setting.max_seconds:
                budget_hit = True
                break
            if now - started > row_timeout:
                hung = True
                break
            time.sleep(0.2)
    finally:
        _stop(procs, STOP_GRACE)
        for handle in logs:
            handle.close()
    peers = []
    for name, proc in zip(names, procs, strict=True):
        summary_path = out / name / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        peers.append(
            {
                "name": name,
                "exit_code": proc.returncode,
                "steps": summary.get("steps"),
                "test_accuracy": summary.get("test_accuracy"),
                "bytes_sent": summary.get("bytes_sent"),
                "bytes_received": summary.get("bytes_received"),
            }
        )
    return {
        "peers": peers,
        "metric_files": [str(out / name / "metrics.jsonl") for name in names],
        "budget_hit": budget_hit,
        "hung": hung,
        "wall_seconds": round(time.monotonic() - started, 2),
    }


def run_ddp(
    setting: Setting,
    config: Path,
    out: Path,
    count: int,
    lan: NetnsLan | None,
    row_timeout: float,
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    command = [
        sys.executable, str(REPO / "benchmarks" / "ddp_reference.py"), str(config), *extra_args,
        "--steps", str(setting.steps), "--out", str(out), "--eval-every", str(setting.eval_every),
        "--timeout", str(row_timeout), "--thresholds", *(str(t) for t in setting.thresholds),
    ]  # fmt: skip
    if setting.max_seconds is not None:
        command += ["--max-seconds", str(setting.max_seconds)]
    if lan is not None:
        # ip netns exec NS-{rank}: the namespace names differ only in their last field.
        command += [
            "--rank-prefix", f"ip netns exec {lan.namespaces[0].rsplit('-', 1)[0]}-{{rank}}",
            "--master-addr", lan.addresses[0], "--master-port", "29400", "--gloo-ifname", "eth0",
        ]  # fmt: skip
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "launcher.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **PEER_ENV}, cwd=REPO)
        try:
            code = proc.wait(timeout=row_timeout + 60)
        except subprocess.TimeoutExpired:
            _stop([proc], 30)
            code = proc.returncode
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    ranks = summary.get("ranks", [{}] * count)
    return {
        "peers": [
            {
                "name": f"rank{r}",
                "exit_code": (summary.get("exit_codes") or [code] * count)[r],
                "steps": ranks[r].get("steps"),
                "test_accuracy": ranks[r].get("test_accuracy"),
                "bytes_sent": None,
                "bytes_received": None,
            }
            for r in range(count)
        ],
        "metric_files": [str(out / f"rank{r}" / "metrics.jsonl") for r in range(count)],
        "budget_hit": any(rank.get("stopped_early") for rank in ranks),
        "hung": code != 0 and not summary,
        "wall_seconds": round(time.monotonic() - started, 2),
    }


# --------------------------------------------------------------------------- analysis


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return rows


def accuracy_curve(metric_files: Sequence[Path]) -> tuple[list[dict[str, float]], list[float]]:
    """Mean accuracy at each evaluated step that every process reached; and each one's final accuracy.

    ``steps`` counts steps done; ``time`` is the latest process clock at that step. A final
    evaluation joins the curve only where every process made its final one at the same step.
    """
    by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    finals: list[tuple[int, float, float]] = []
    for path in metric_files:
        for record in read_jsonl(path):
            if "test_accuracy" not in record:
                continue
            point = (float(record["test_accuracy"]), float(record["time"]))
            if record.get("final"):
                finals.append((int(record["step"]) + 1, *point))
            else:
                by_step[int(record["step"]) + 1].append(point)
    if len(finals) == len(metric_files) and len({s for s, _, _ in finals}) == 1 and finals[0][0] not in by_step:
        by_step[finals[0][0]] = [(a, t) for _, a, t in finals]
    curve = [
        {
            "steps": steps,
            "mean_accuracy": sum(a for a, _ in points) / len(points),
            "time": max(t for _, t in points),
        }
        for steps, points in sorted(by_step.items())
        if len(points) == len(metric_files)
    ]
    return curve, [a for _, a, _ in finals]


def summarize(setting: Setting, row: Row, run: dict[str, Any], link_sent: dict[str, float] | None) -> dict[str, Any]:
    """One table row from a finished run. ``link_sent``: mean and max bytes each namespace sent."""
    count = len(run["peers"])
    curve, finals = accuracy_curve([Path(p) for p in run["metric_files"]])
    samples_per_step = setting.batch_size * count
    crossings: dict[str, dict[str, float] | None] = {}
    for threshold in setting.thresholds:
        hit = next((p for p in curve if p["mean_accuracy"] >= threshold), None)
        crossings[f"{threshold:g}"] = (
            None
            if hit is None
            else {
                "steps": hit["steps"],
                "samples": int(hit["steps"]) * samples_per_step,
                "time": hit["time"],
                "mean_accuracy": hit["mean_accuracy"],
            }
        )
    sent = [p["bytes_sent"] for p in run["peers"] if p["bytes_sent"] is not None]
    steps_done = [p["steps"] for p in run["peers"] if p["steps"] is not None]
    final = sum(finals) / len(finals) if finals else None
    problems = []  # the row failed
    notes = []  # worth knowing, but the numbers stand
    if run["hung"]:
        problems.append(f"hung: still running after the row timeout ({run['wall_seconds']:.0f} s)")
    failed_exits = [f"{p['name']}={p['exit_code']}" for p in run["peers"] if p["exit_code"] != 0]
    if failed_exits and run["budget_hit"] and len(finals) >= count // 2:
        # SIGTERM at the budget: a peer caught inside a round whose partners already left can exit 1.
        notes.append(f"after the budget's SIGTERM: exit {', '.join(failed_exits)}")
    elif failed_exits:
        problems.append(f"exit {', '.join(failed_exits)}")
    if len(finals) != count:
        (notes if run["budget_hit"] and finals else problems).append(
            f"final accuracy over {len(finals)} of {count} peers (the others made no final evaluation)"
        )
    if not curve and not run["budget_hit"]:
        problems.append("no evaluation reached by every peer")
    estimate = None
    if row.is_ddp and not row.ddp_args and link_sent is None and steps_done:
        # gloo counts nothing; a ring all-reduce sends 2 (N-1)/N of the fp32 gradient per step.
        estimate = int(max(steps_done) * 2 * (count - 1) / count * 4 * PARAMETERS.get(setting.workload, 0))
    return {
        "row": row.key,
        "label": row.label,
        "strategy": row.strategy if not row.is_ddp else {"kind": "ddp", "backend": "gloo"},
        "topology": row.topology if not row.is_ddp else None,
        "status": "failed" if problems else ("time budget" if run["budget_hit"] else "ok"),
        "budget_hit": run["budget_hit"],
        "problems": problems,
        "notes": notes,
        "thresholds": crossings,
        "final_mean_accuracy": final,
        "best_mean_accuracy": max(
            [p["mean_accuracy"] for p in curve] + ([final] if final is not None else []), default=None
        ),
        "steps_done": {"min": min(steps_done), "max": max(steps_done)} if steps_done else None,
        "training_seconds": curve[-1]["time"] if curve else None,
        "bytes_sent_per_peer": {"mean": sum(sent) / len(sent), "max": max(sent)} if sent else None,
        "bytes_sent_per_peer_estimate": estimate,
        "link_bytes_sent_per_peer": link_sent,
        "wall_seconds": run["wall_seconds"],
        "peers": run["peers"],
        "curve": curve,
    }


def run_row(setting: Setting, row: Row, args: argparse.Namespace, lan: NetnsLan | None) -> dict[str, Any]:
    out: Path = args.out.resolve() / setting.name / row.key
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob("*"):
        if stale.is_file() and stale.name in ("metrics.jsonl", "summary.json", "model.pt", "checkpoint.pt"):
            stale.unlink()
    addresses = addresses_for(setting, args.peers, lan)
    config = write_config(setting, row, addresses, out / "config.toml")
    before = lan.counters() if lan is not None else None
    if row.is_ddp:
        run = run_ddp(setting, config, out / "ddp", args.peers, lan, args.row_timeout, row.ddp_args)
    else:
        names = [f"p{i}" for i in range(args.peers)]
        run = run_swarm(setting, row, config, out, names, lan, args.row_timeout)
    link_sent = None
    if lan is not None and before is not None:
        sent = [a["sent"] - b["sent"] for a, b in zip(lan.counters(), before, strict=True)]
        link_sent = {"mean": sum(sent) / len(sent), "max": max(sent)}
    return summarize(setting, row, run, link_sent)


def reanalyze(setting: Setting, previous: dict[str, Any], out: Path, rows: Sequence[Row] = ROWS) -> dict[str, Any]:
    """Rebuild a row from its run directory and the exit codes, wall time and link bytes saved earlier."""
    row = next(r for r in rows if r.key == previous["row"])
    folder = out / setting.name / row.key
    peers = previous["peers"]
    if row.is_ddp:
        files = [str(folder / "ddp" / f"rank{r}" / "metrics.jsonl") for r in range(len(peers))]
    else:
        files = [str(folder / p["name"] / "metrics.jsonl") for p in peers]
    budget_hit = previous.get("budget_hit")
    if budget_hit is None:  # results written before the flag was stored
        done = previous["steps_done"]
        budget_hit = setting.max_seconds is not None and (done is None or done["min"] < setting.steps)
    run = {
        "peers": peers,
        "metric_files": files,
        "budget_hit": budget_hit,
        "hung": any(p.startswith("hung") for p in previous["problems"]),
        "wall_seconds": previous["wall_seconds"],
    }
    return summarize(setting, row, run, previous["link_bytes_sent_per_peer"])


# --------------------------------------------------------------------------- report


def judge(row: dict[str, Any]) -> list[str]:
    """The row's problems: what the run reported, plus a collapse of accuracy (non-convergence)."""
    problems = [p for p in row["problems"] if not p.startswith(("diverged", "no learning"))]
    final, best = row["final_mean_accuracy"], row["best_mean_accuracy"]
    done = row["steps_done"]
    trained = done is not None and done["max"] >= 100  # enough steps that MNIST-1D is well above chance
    if trained and best is not None and best < CHANCE + 0.05:
        problems.append(f"no learning: best mean accuracy {best:.3f} after up to {done['max']} steps (chance 0.10)")
    if final is not None and best is not None and best - final > COLLAPSE:
        problems.append(f"diverged: final mean accuracy {final:.3f} is {best - final:.3f} below the best ({best:.3f})")
    return problems


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:,.1f}"


def _crossing(entry: dict[str, float] | None) -> str:
    if entry is None:
        return "—"
    return f"{entry['time']:.1f} s / {int(entry['samples']) / 1000:,.0f}k (step {int(entry['steps'])})"


def markdown_table(setting: Setting, rows: list[dict[str, Any]]) -> str:
    percent = [f"{t:.0%}" for t in setting.thresholds]
    header = ["strategy", *(f"to {p}: time / samples" for p in percent), "final acc", "best acc"]
    header += ["MB sent/peer (mean, max)"]
    if setting.rate_mbit is not None:
        header += ["MB on link/peer (mean, max)"]
    header += ["steps done"]
    header += ["status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 2) + "---|"]
    for row in rows:
        final, best = row["final_mean_accuracy"], row["best_mean_accuracy"]
        sent = row["bytes_sent_per_peer"]
        if sent is not None:
            sent_text = f"{_mb(sent['mean'])}, {_mb(sent['max'])}"
        elif row["bytes_sent_per_peer_estimate"] is not None:
            sent_text = f"≈{_mb(row['bytes_sent_per_peer_estimate'])} (est.)"
        else:
            sent_text = "n/a"
        cells = [
            row["label"],
            *(_crossing(row["thresholds"][f"{t:g}"]) for t in setting.thresholds),
            "n/a" if final is None else f"{final:.4f}",
            "n/a" if best is None else f"{best:.4f}",
            sent_text,
        ]
        if setting.rate_mbit is not None:
            link = row["link_bytes_sent_per_peer"]
            cells.append("n/a" if link is None else f"{_mb(link['mean'])}, {_mb(link['max'])}")
        done = row["steps_done"]
        if done is None:
            cells.append("n/a")
        else:
            cells.append(str(done["min"]) if done["min"] == done["max"] else f"{done['min']}-{done['max']}")
        row["problems"] = judge(row)
        if row["problems"]:
            row["status"] = "failed"
        status = row["status"] if not row["problems"] else f"**FAILED**: {'; '.join(row['problems'])}"
        if row.get("notes"):
            status += f" ({'; '.join(row['notes'])})"
        cells.append(status)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings(args: argparse.Namespace) -> dict[str, Setting]:
    relaxed = {
        "transport": {
            "send_timeout": 120.0,
            "startup_timeout": 120.0,
            "heartbeat_interval": 60.0,
        },
        "membership": {"gossip_timeout": 10.0, "suspect_after": 60.0, "dead_after": 240.0},
    }
    return {
        "loopback": Setting(
            name="loopback",
            workload=CNN,
            steps=args.loopback_steps,
            eval_every=args.loopback_eval_every,
            lr=0.1,
            thresholds=(0.90, 0.93),
            max_seconds=None,
            rate_mbit=None,
            extra={"transport": {"startup_timeout": 120.0}},
        ),
        "mlp": Setting(
            name="mlp",
            workload=WIDE_MLP,
            steps=args.mlp_steps,
            eval_every=25,
            lr=args.netns_lr,
            thresholds=(0.40, 0.50, 0.60),
            max_seconds=None,
            rate_mbit=None,
            round_timeout=60.0,
            extra={
                "transport": {"startup_timeout": 120.0, "send_timeout": 60.0},
                "membership": {"suspect_after": 60.0, "dead_after": 120.0},
            },
        ),
        "netns": Setting(
            name="netns",
            workload=WIDE_MLP,
            steps=args.netns_steps,
            eval_every=args.netns_eval_every,
            lr=args.netns_lr,
            thresholds=(0.40, 0.50, 0.60, 0.80, 0.90),
            max_seconds=args.netns_seconds,
            rate_mbit=args.rate_mbit,
            round_timeout=120.0,
            extra=relaxed,
        ),
    }


def main(
    argv: list[str] | None = None,
    *,
    all_rows: Sequence[Row] = ROWS,
    description: str | None = __doc__,
    results_path: Path = DEFAULT_RESULTS,
    script: str = "benchmarks/strategies.py",
    out: Path = REPO / "runs" / "strategies",
    extra_table: Callable[[Setting, list[dict[str, Any]]], str] | None = None,
) -> int:
    """Run the rows of ``all_rows`` in each chosen setting; write the results and print the tables.

    ``extra_table`` renders a second table per setting from the same rows (kept as "extra_table").
    """
    args = parse_args(argv, rows=all_rows, description=description, results=results_path, out=out)
    provenance = Provenance([str(REPO / script), *(sys.argv[1:] if argv is None else argv)])
    rows = [r for r in all_rows if args.only is None or r.key in args.only]
    chosen = settings(args)
    previous = json.loads(args.results.read_text()) if args.results.exists() else {}
    tables: dict[str, Any] = dict(previous.get("tables", {})) if args.only or args.reanalyze else {}
    started = time.monotonic()
    for name in args.tables:
        setting = chosen[name]
        results = []
        if args.reanalyze:
            rows_before = previous["tables"][name]["rows"]
            results = [reanalyze(setting, r, args.out.resolve(), all_rows) for r in rows_before]
            for again, before in zip(results, rows_before, strict=True):
                if "measured" in before:
                    again["measured"] = before["measured"]
        for row in rows if not args.reanalyze else ():
            print(f"[{time.monotonic() - started:7.1f} s] {name}: {row.label} ...", flush=True)
            stamp = provenance.stamp()  # rows of several invocations end up merged in one file
            if setting.rate_mbit is None:
                results.append(run_row(setting, row, args, None))
            else:
                with NetnsLan(args.peers, rate_mbit=setting.rate_mbit) as lan:
                    results.append(run_row(setting, row, args, lan))
            done = results[-1]
            done["measured"] = stamp
            print(
                f"    {done['status']}: final {done['final_mean_accuracy']}, best {done['best_mean_accuracy']}, "
                f"{done['wall_seconds']:.0f} s wall {'; '.join(done['problems'])}",
                flush=True,
            )
        if args.only and name in tables and not args.reanalyze:  # merge the rerun rows into the earlier table
            merged = {r["row"]: r for r in tables[name]["rows"]}
            merged.update({r["row"]: r for r in results})
            results = [merged[r.key] for r in all_rows if r.key in merged]
        tables[name] = {
            "setting": {
                "workload": str(setting.workload.relative_to(REPO)),
                "peers": args.peers,
                "steps": setting.steps,
                "eval_every": setting.eval_every,
                "batch_size": setting.batch_size,
                "lr": setting.lr,
                "momentum": setting.momentum,
                "thresholds": list(setting.thresholds),
                "max_training_seconds": setting.max_seconds,
                "rate_mbit": setting.rate_mbit,
                "config_overrides": setting.extra,
            },
            "rows": results,
            "table": markdown_table(setting, results),
            **({"extra_table": extra_table(setting, results)} if extra_table is not None else {}),
        }
    cores = os.cpu_count()
    note = (
        f"All {args.peers} processes of a row share this machine's {cores} CPU cores (OMP_NUM_THREADS=1 each): "
        f"times are for {args.peers} processes on {cores} cores, not {args.peers} machines."
    )
    result: dict[str, Any] = {"note": note, "tables": tables}
    if args.reanalyze or args.only:
        # The measurements of earlier invocations stand: keep their provenance next to this one's.
        earlier = list(previous.get("earlier_provenance", []))
        if "provenance" in previous:
            earlier.append(previous["provenance"])
        elif "command" in previous:  # a file written before provenance was recorded
            earlier.append({"command": previous["command"], "commit": None, **previous.get("host", {})})
        result["earlier_provenance"] = earlier
    write_result(args.results, Path(script).stem, result, provenance)
    for table in tables.values():
        setting_info = table["setting"]
        network = "loopback" if setting_info["rate_mbit"] is None else f"{setting_info['rate_mbit']:g} Mbit/s tbf links"
        print(f"\n### {args.peers} peers, {setting_info['workload']}, {network}\n")
        print(table["table"])
        if "extra_table" in table:
            print("\n" + table["extra_table"])
    print(f"\n{note}\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
