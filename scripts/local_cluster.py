#!/usr/bin/env python3
"""Start one real ``p2pdl peer`` process per configured peer on this machine and watch them.

    python scripts/local_cluster.py configs/ring4.toml [--steps N] [--out DIR]
        [--kill NAME@STEP] [--freeze NAME@STEP:SECONDS] [--restart NAME@STEP] [--join NAME@STEP]

Shows a live progress bar (mean step, mean loss, the mean of the workload's headline metric:
test accuracy for a classifier, validation loss for a language model) polled from every peer's
``/status``, and splits the CPU cores between peers (``OMP_NUM_THREADS``). A fault schedule
kills, freezes, restarts and adds peers when the swarm reaches given steps (see the options).
At the end it writes ``DIR/summary.json`` (per peer: name, steps, final loss, headline metric and
test accuracy,
bytes sent and received, exit code, whether it was stopped before its last step or killed by the
schedule; every scheduled event and when it fired; the final consensus distance
max_i ||x_i - x̄|| / ||x̄|| over the peers still running, the wall time and whether ``--timeout``
cut the run short) and ``DIR/training.png`` (loss, headline metric and consensus distance over
steps, with the events marked). It exits 2 on a bad config or schedule before starting anything,
and 1 if any peer failed, a scheduled event could not happen, or the timeout stopped the peers:
a peer stopped that way still evaluates and exits 0, so its exit code alone would hide a stalled
run. A peer killed by the schedule is expected to die by SIGKILL and does not count as failed;
a restarted peer counts by the exit code of its last process. Ctrl+C stops every peer cleanly
(SIGTERM), then reaps them. When the workload writes a text sample (``DIR/NAME/sample.txt``, a
language model's continuation of a fixed prompt), the first peer's is printed at the end.
``--resume`` starts every peer with ``--resume`` from its own ``DIR/NAME/checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from fault_schedule import KINDS, SYNTAX, Event, Kind, build_schedule
from tqdm import tqdm

from p2pdl.config import Config, load_config
from p2pdl.core.mixing import consensus_distance
from p2pdl.errors import ConfigError
from p2pdl.net.auth import PeerSecurity, security_from_config
from p2pdl.net.ports import free_ports

# glibc maps big buffers freshly and trims the heap after each free without these, so every
# round page-faults its frame buffers back in; see p2pdl/_malloc.py.
PEER_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824", "PYTHONUNBUFFERED": "1"}
POLL_SECONDS = 0.5
# Outputs of an earlier run in DIR/NAME that would mix with this one's (a restart resumes from
# checkpoint.pt, so an old one must not be there).
CHECKPOINT_FILE = "checkpoint.pt"
STALE_OUTPUTS = ("metrics.jsonl", "summary.json", "model.pt", "sample.txt", CHECKPOINT_FILE)

SCHEDULE_HELP = """\
how the fault schedule works:
  Each option can be repeated. An event fires when the swarm reaches STEP: when the largest
  step that any peer has reported on /status so far is >= STEP. The launcher polls every
  0.5 s, so an event fires at STEP or a few steps later, never before; events due together
  fire in command-line order. STEP runs from 0 to run.steps - 1.

  --kill NAME@STEP            SIGKILL the peer. It stays dead (a later --restart revives it);
                              its exit by SIGKILL is expected and does not fail the run.
  --freeze NAME@STEP:SECONDS  SIGSTOP the peer, then SIGCONT it SECONDS later (> 0).
  --restart NAME@STEP         SIGKILL the peer (if running), then start it again with
                              --resume from its own DIR/NAME: it continues from its last
                              checkpoint.pt, so checkpoint.every must be set and <= STEP.
                              Its last process's exit code counts.
  --join NAME@STEP            start a new peer NAME, not in [[peers]] (configured peers all
                              start at launch), on a free port of the first peer's host, with
                              --join and every running peer as --bootstrap: it downloads the
                              swarm's current state, then trains to run.steps like the others.

  The schedule is checked before any peer starts; a bad one (syntax, unknown name, STEP out of
  range, SECONDS <= 0, joining a configured or already running name, an event on a peer that is
  dead or not joined yet by then, a restart with no checkpoint to resume) exits 2.
"""


FAULT_HELP = {
    "kill": "SIGKILL peer NAME when the swarm reaches STEP",
    "freeze": "SIGSTOP peer NAME at STEP, SIGCONT it SECONDS later",
    "restart": "SIGKILL peer NAME at STEP and start it again with --resume",
    "join": "start the new peer NAME (not in [[peers]]) at STEP with --join",
}


def _tagged(kind: Kind) -> Callable[[str], tuple[Kind, str]]:
    """An argparse ``type`` that keeps which fault option a value came with."""

    def tag(text: str) -> tuple[Kind, str]:
        return kind, text

    return tag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=SCHEDULE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, help="override run.steps")
    parser.add_argument("--out", type=Path, help="output directory (default runs/CONFIG_STEM)")
    parser.add_argument("--threads", type=int, help="torch threads per peer (default: cores / peers, >= 1)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override run.device")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before peers are stopped")
    parser.add_argument(
        "--snapshot-every",
        type=int,
        help="steps between parameter snapshots (default run.eval_every)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and CI)")
    parser.add_argument(
        "--resume", action="store_true", help="start every peer with --resume from DIR/NAME/checkpoint.pt"
    )
    faults = parser.add_argument_group("fault schedule (each option repeatable; details below)")
    for kind in KINDS:
        faults.add_argument(
            f"--{kind}",
            dest="faults",
            action="append",
            default=[],
            metavar=SYNTAX[kind],
            type=_tagged(kind),
            help=FAULT_HELP[kind],
        )
    return parser.parse_args(argv)


def fetch_status(address: str, security: PeerSecurity) -> dict[str, Any] | None:
    """One peer's /status (authenticated and over TLS when the swarm uses them)."""
    headers = security.headers(target=None, method="GET", path="/status")
    request = urllib.request.Request(f"{security.scheme}://{address}/status", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=0.5, context=security.client_ssl) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except (urllib.error.URLError, TimeoutError, OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def flat_parameters(path: Path) -> torch.Tensor:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, torch.Tensor):
        return state.reshape(-1).to(torch.float64)
    return torch.cat([v.reshape(-1).to(torch.float64) for v in state.values() if v.is_floating_point()])


def consensus_over_steps(out: Path, names: list[str]) -> list[tuple[int, float]]:
    """The consensus distance at every snapshot step, over the peers that saved that snapshot.

    With a fault schedule the peers present change over the run (killed, joined), so each step
    counts the peers that were training then; a step seen by fewer than two peers is left out.
    """
    saved: dict[int, list[str]] = {}
    for name in names:
        for path in (out / name / "snapshots").glob("step_*.pt"):
            saved.setdefault(int(path.stem.split("_")[1]), []).append(name)
    series = []
    for step in sorted(saved):
        if len(saved[step]) < 2:
            continue
        vectors = [flat_parameters(out / n / "snapshots" / f"step_{step}.pt") for n in saved[step]]
        series.append((step, consensus_distance(vectors)))
    return series


EVENT_COLORS = {"kill": "tab:red", "freeze": "tab:blue", "restart": "tab:orange", "join": "tab:green"}


def plot(
    out: Path,
    names: list[str],
    consensus: list[tuple[int, float]],
    events: list[Event],
    steps: int,
    headline: str = "test_accuracy",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in names:
        rows = read_jsonl(out / name / "metrics.jsonl")
        losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if losses:
            window = max(1, len(losses) // 50)
            smoothed = [
                sum(v for _, v in losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                for i in range(len(losses))
            ]
            axes[0].plot([s for s, _ in losses], smoothed, label=name, linewidth=1)
        scores = [(r["step"] + 1, r[headline]) for r in rows if r.get(headline) is not None]
        if scores:
            axes[1].plot(*zip(*scores, strict=True), marker=".", label=name)
    axes[0].set(title="training loss (smoothed)", xlabel="step", ylabel="loss")
    axes[1].set(title=headline.replace("_", " "), xlabel="step", ylabel=headline)
    if consensus:
        axes[2].semilogy([s for s, _ in consensus], [max(c, 1e-12) for _, c in consensus], marker=".")
    axes[2].set(title="consensus distance max_i ||x_i - x̄|| / ||x̄||", xlabel="step")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.set_xlim(0, steps + max(1, steps // 50))  # one scale on every panel: event lines line up
        for event in events:
            if event.fired_step is None:
                continue
            color = EVENT_COLORS[event.kind]
            axis.axvline(event.fired_step, color=color, linestyle="--", linewidth=1, alpha=0.8)
            axis.text(
                event.fired_step,
                0.98,
                f" {event.kind} {event.name}",
                transform=axis.get_xaxis_transform(),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color=color,
            )
    if len(names) <= 10:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Cluster:
    """The peer processes of one run: starts them, applies the schedule's faults, reaps them.

    ``procs`` holds each peer's current process (a restart replaces it); ``killed`` the peers
    that the schedule killed and did not restart, whose exit by SIGKILL is expected.
    """

    def __init__(self, args: argparse.Namespace, config: Config, out: Path, steps: int, env: dict[str, str]) -> None:
        self._args = args
        self._out = out
        self._steps = steps
        self._env = env
        self._snapshot_every = args.snapshot_every if args.snapshot_every is not None else config.run.eval_every
        self._host = config.peers[0].host
        self.addresses = {entry.name: entry.address for entry in config.peers}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()
        self._commands: dict[str, list[str]] = {}
        self._logs: list[IO[bytes]] = []
        self._frozen: dict[str, float] = {}  # name -> perf_counter time of its SIGCONT
        self._freezes: list[Event] = []  # fired freezes not resumed yet
        self.started = time.perf_counter()

    @property
    def names(self) -> list[str]:
        """Every peer started so far: the configured ones, then joiners in join order."""
        return list(self.procs)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def running(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def polled(self) -> list[str]:
        """Running peers that can answer /status now (a frozen one cannot)."""
        return [name for name in self.running() if name not in self._frozen]

    def launch(self, name: str, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        """Start peer ``name`` afresh, writing to DIR/NAME (an earlier run's outputs removed)."""
        peer_out = self._out / name
        peer_out.mkdir(parents=True, exist_ok=True)
        for stale in STALE_OUTPUTS:
            if not (self._args.resume and stale == CHECKPOINT_FILE):
                (peer_out / stale).unlink(missing_ok=True)
        for snapshot in (peer_out / "snapshots").glob("step_*.pt"):
            snapshot.unlink()
        command = [
            sys.executable, "-m", "p2pdl.cli", "peer",
            "--config", str(self._args.config), "--name", name,
            "--steps", str(self._steps), "--out", str(peer_out),
            "--snapshot-every", str(self._snapshot_every),
            *extra,
        ]  # fmt: skip
        if self._args.resume and "--resume" not in extra:
            command.append("--resume")
        if self._args.device:
            command += ["--device", self._args.device]
        self._commands[name] = command
        (peer_out / "peer.log").write_bytes(b"")
        return self._spawn(name, command)

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(self._out / name / "peer.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._env)
        self.procs[name] = proc
        return proc

    def _sigkill(self, name: str) -> int:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        self._frozen.pop(name, None)
        return proc.wait()

    def fire(self, event: Event, swarm_step: int) -> str:
        """Apply ``event`` now (the swarm is at ``swarm_step``); returns the line to show."""
        name = event.name
        proc = self.procs.get(name)
        running = proc is not None and proc.poll() is None
        if proc is None and event.kind != "join":
            event.skipped = f"{name} never started (its --join did not happen)"
        elif proc is not None and not running and not (event.kind == "restart" and name in self.killed):
            event.skipped = f"{name} had already exited with code {proc.returncode}"
        elif event.kind == "join" and not self.polled():
            event.skipped = "no running peer to join through"
        if event.skipped is not None:
            return f"{event.label} skipped: {event.skipped}"
        event.fired_step, event.fired_at = swarm_step, self.elapsed()
        if event.kind == "kill":
            event.exit_code = self._sigkill(name)
            self.killed.add(name)
            return f"{event.label}: SIGKILL, exit {event.exit_code}"
        if event.kind == "freeze":
            assert proc is not None and event.seconds is not None
            proc.send_signal(signal.SIGSTOP)
            self._frozen[name] = max(self._frozen.get(name, 0.0), time.perf_counter() + event.seconds)
            self._freezes.append(event)
            return f"{event.label}: SIGSTOP for {event.seconds:g} s"
        if event.kind == "restart":
            if running:
                event.exit_code = self._sigkill(name)
            self.killed.discard(name)
            with open(self._out / name / "peer.log", "ab") as log:
                log.write(f"\n--- local_cluster: {event.label} at swarm step {swarm_step}: --resume ---\n".encode())
            event.process = self._spawn(name, [*self._commands[name], "--resume"])
            event.pid = event.process.pid
            return f"{event.label}: SIGKILL, exit {event.exit_code}; started again with --resume, pid {event.pid}"
        bootstrap = [flag for peer in self.polled() for flag in ("--bootstrap", self.addresses[peer])]
        event.address = f"{self._host}:{free_ports(1, self._host)[0]}"
        self.addresses[name] = event.address
        event.process = self.launch(name, ("--join", "--listen", event.address, *bootstrap))
        event.pid = event.process.pid
        return f"{event.label}: started on {event.address}, pid {event.pid}"

    def thaw_due(self, *, everyone: bool = False) -> list[str]:
        """SIGCONT the frozen peers whose time is up (``everyone``: all of them); the lines to show."""
        now = time.perf_counter()
        lines = []
        for name, until in list(self._frozen.items()):
            if everyone or now >= until:
                del self._frozen[name]
                self.procs[name].send_signal(signal.SIGCONT)
                lines.append(f"{name}: SIGCONT")
                for event in [e for e in self._freezes if e.name == name]:
                    event.resumed_at = self.elapsed()
                    self._freezes.remove(event)
        return lines

    def pause(self) -> float:
        """Seconds to sleep before the next poll: the poll interval, or less for a due SIGCONT."""
        due = [until - time.perf_counter() for until in self._frozen.values()]
        return max(0.01, min([POLL_SECONDS, *due]))

    def stop(self) -> None:
        """SIGCONT the frozen, SIGTERM the running, reap every process and close the logs."""
        self.thaw_due(everyone=True)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


def mean_headline(statuses: list[dict[str, Any]]) -> tuple[str, float | None]:
    """The headline metric the peers' ``/status`` name (test accuracy by default) and its mean."""
    named = [s["headline"] for s in statuses if isinstance(s.get("headline"), dict)]
    metric = str(named[0]["metric"]) if named else "test_accuracy"
    values = [float(h["value"]) for h in named if h.get("metric") == metric and h.get("value") is not None]
    if not named:
        values = [float(s[metric]) for s in statuses if s.get(metric) is not None]
    return metric, sum(values) / len(values) if values else None


def summary_headline(peers: list[dict[str, Any]]) -> tuple[str, str, float | None]:
    """The headline metric of the peers' summaries, whether lower or higher is better, its mean."""
    named = [p["headline"] for p in peers if isinstance(p.get("headline"), dict)]
    if not named:
        return "test_accuracy", "max", None
    metric, goal = str(named[0]["metric"]), str(named[0]["goal"])
    values = [float(h["value"]) for h in named if h.get("metric") == metric and h.get("value") is not None]
    return metric, goal, sum(values) / len(values) if values else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"local_cluster: {exc}", file=sys.stderr)
        return 2
    steps = args.steps or config.run.steps
    events, problems = build_schedule(
        args.faults, configured=list(config.peer_names), steps=steps, checkpoint_every=config.checkpoint.every
    )
    if problems:
        print("local_cluster: bad fault schedule:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    security = security_from_config(config.security, "local-cluster")
    out: Path = args.out or Path("runs") / args.config.stem
    out.mkdir(parents=True, exist_ok=True)
    joiners = sum(1 for e in events if e.kind == "join")
    threads = args.threads or max(1, (os.cpu_count() or 1) // (len(config.peers) + joiners))
    env = {**os.environ, **PEER_ENV, "OMP_NUM_THREADS": str(threads)}
    cluster = Cluster(args, config, out, steps, env)
    for entry in config.peers:
        cluster.launch(entry.name)

    bar = tqdm(total=steps, desc="swarm", unit="step", disable=args.no_progress, dynamic_ncols=True)
    pending = list(events)
    swarm_step = -1  # the largest step any peer has reported so far
    interrupted = False
    timed_out = False
    try:
        while cluster.running():
            if cluster.elapsed() > args.timeout:
                print(f"local_cluster: timeout after {args.timeout}s, stopping peers", file=sys.stderr)
                timed_out = True
                break
            polled = cluster.polled()
            statuses = [s for s in (fetch_status(cluster.addresses[n], security) for n in polled) if s]
            swarm_step = max([swarm_step, *(int(s["step"]) for s in statuses)])
            while pending and swarm_step >= pending[0].step:
                line = cluster.fire(pending.pop(0), swarm_step)
                tqdm.write(f"local_cluster: {cluster.elapsed():7.1f} s, swarm step {swarm_step}: {line}")
            for line in cluster.thaw_due():
                tqdm.write(f"local_cluster: {cluster.elapsed():7.1f} s, swarm step {swarm_step}: {line}")
            if statuses:
                mean_step = sum(s["step"] for s in statuses) / len(statuses)
                losses = [s["loss"] for s in statuses if s.get("loss") is not None]
                metric, mean = mean_headline(statuses)
                bar.n = int(mean_step)
                bar.set_postfix(
                    {
                        "loss": f"{sum(losses) / len(losses):.3f}" if losses else "-",
                        metric: f"{mean:.3f}" if mean is not None else "-",
                        "up": f"{len(statuses)}/{len(cluster.running())}",
                    }
                )
                bar.refresh()
            time.sleep(cluster.pause())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        cluster.stop()
        bar.close()

    wall = cluster.elapsed()
    names = cluster.names
    fired = [e for e in events if e.fired_step is not None]
    peers = []
    for name in names:
        summary_path = out / name / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        peers.append(
            {
                "name": name,
                "exit_code": cluster.procs[name].returncode,
                "killed_by_schedule": name in cluster.killed,
                "restarts": sum(1 for e in fired if e.kind == "restart" and e.name == name),
                "steps": summary.get("steps"),
                "stopped_early": summary.get("stopped_early"),
                "final_loss": summary.get("final_loss"),
                "headline": summary.get("headline"),
                "test_accuracy": summary.get("test_accuracy"),
                "bytes_sent": summary.get("bytes_sent"),
                "bytes_received": summary.get("bytes_received"),
                "rounds": summary.get("rounds"),
                "compression": summary.get("compression"),
            }
        )
    survivors = [n for n in names if n not in cluster.killed]
    models = [out / n / "model.pt" for n in survivors]
    final_consensus = (
        consensus_distance([flat_parameters(m) for m in models]) if models and all(m.exists() for m in models) else None
    )
    consensus = consensus_over_steps(out, names)
    accuracies = [p["test_accuracy"] for p in peers if p["test_accuracy"] is not None]
    metric, goal, headline_mean = summary_headline(peers)
    result = {
        "config": str(args.config),
        "strategy": config.strategy.kind,
        "topology": config.topology.kind,
        "steps": steps,
        "peers": peers,
        "events": [event.record() for event in events],
        "mean_test_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "headline": {"metric": metric, "goal": goal, "mean": headline_mean},
        "final_consensus_distance": final_consensus,
        "consensus_over_steps": [{"step": s, "distance": d} for s, d in consensus],
        "wall_seconds": round(wall, 3),
        "timed_out": timed_out,
        "threads_per_peer": threads,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    png = plot(out, names, consensus, events, steps, metric)
    failed = [str(p["name"]) for p in peers if not p["killed_by_schedule"] and p["exit_code"] != 0]
    missed = [e for e in events if e.missed is not None]
    headline_text = f"{headline_mean:.4f}" if headline_mean is not None else "n/a"
    consensus_text = f"{final_consensus:.3g}" if final_consensus is not None else "n/a"
    print(
        f"{len(names)} peers, {steps} steps in {wall:.1f}s: mean {metric.replace('_', ' ')} {headline_text}, "
        f"consensus distance {consensus_text}; wrote {out / 'summary.json'} and {png}"
    )
    samples = [out / n / "sample.txt" for n in survivors if (out / n / "sample.txt").exists()]
    if samples:
        print(f"--- sample from {samples[0].parent.name} ({samples[0]}):\n{samples[0].read_text()}\n---")
    if failed:
        print(
            f"local_cluster: peers failed: {', '.join(failed)} (see {out}/NAME/peer.log)",
            file=sys.stderr,
        )
        return 1
    if timed_out:
        print(f"local_cluster: the peers were stopped at the {args.timeout}s timeout", file=sys.stderr)
        return 1
    if interrupted:
        return 130
    if missed:
        reasons = "; ".join(f"{e.label}: {e.missed}" for e in missed)
        print(f"local_cluster: scheduled events did not happen: {reasons}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
