#!/usr/bin/env python3
"""Failure-detection latency with the adaptive (phi-accrual) detector, idle and beside busy loops.

    python benchmarks/detection.py                 # writes benchmarks/results/detection.json
    python benchmarks/detection.py --busy 0 --signals SIGSTOP

Four real ``p2pdl peer`` processes train the MNIST-1D CNN with synchronous gossip on a ring, with
the default ``[membership]`` (1 s heartbeats, ``suspect_after`` 5 s as the floor, ``dead_after``
20 s as the ceiling, ``phi_threshold`` 8). Once the swarm is past step 30 and 15 s more have
passed (the detector needs 4 heartbeat intervals before it adapts), p3 gets SIGSTOP (a
freeze: it cannot even close its sockets) or SIGKILL. The latency is, per surviving peer, the
time from just before the signal until that peer's ``GET /members`` first shows p3 ``dead``
(polled every 0.1 s). Each case runs once idle and once with ``--busy`` processes spinning
``while True: pass`` beside the peers, so the machine is oversubscribed. The detector promises
a latency between the floor and the ceiling (``GET /members`` judges the silence when asked; the
graph and the rounds act on it at the detector's next run, four times a gossip period), and
no live peer declared dead: ``false_deaths`` is how much the survivors' ``declared_dead``
counters for one another grew between the signal and the victim's removal.

Trade-off: one victim per swarm and a fresh swarm per case keep the cases independent, at the
cost of a swarm start (tens of seconds on a busy machine) per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _provenance import Provenance, write_result

from p2pdl.net.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
NAMES = ["p0", "p1", "p2", "p3"]
VICTIM = "p3"
WARMUP_SECONDS = 15.0
ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def write_config(path: Path, ports: list[int]) -> None:
    lines = [
        "[run]",
        f'workload = "{REPO / "peers" / "mnist1d_cnn.py"}"',
        "steps = 100000",
        "eval_every = 0",
        "",
        "[strategy]",
        'kind = "gossip"',
        "",
        "[topology]",
        'kind = "ring"',
        "",
        "[transport]",
        "startup_timeout = 120.0",
        "",
    ]
    for name, port in zip(NAMES, ports, strict=True):
        lines += ["[[peers]]", f'name = "{name}"', f'address = "127.0.0.1:{port}"', ""]
    path.write_text("\n".join(lines))


def get(port: int, path: str) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=2.0) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def members(port: int) -> dict[str, Any]:
    return get(port, "/members")


def survivor_deaths(survivors: dict[str, int]) -> int:
    """How often, in all, the survivors have declared one another dead."""
    return sum(
        member["declared_dead"]
        for port in survivors.values()
        for member in members(port)["members"]
        if member["name"] in survivors
    )


def run_case(how: signal.Signals, busy: int, workdir: Path) -> dict[str, Any]:
    ports = free_ports(len(NAMES))
    config = workdir / "ring.toml"
    write_config(config, ports)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in NAMES:
            out = workdir / name
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "peer.log", "ab") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "p2pdl.cli", "peer", "--config", str(config), "--name", name,
                     "--out", str(out)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **ENV},
                )  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if all(get(p, "/status")["step"] >= 30 for p in ports):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("the swarm did not reach step 30 within 300 s")
        time.sleep(WARMUP_SECONDS)  # let every survivor measure the victim's rhythm (>= 4 intervals)
        survivors = {n: ports[i] for i, n in enumerate(NAMES) if n != VICTIM}
        limits = {n: next(m for m in members(p)["members"] if m["name"] == VICTIM) for n, p in survivors.items()}
        deaths_before = survivor_deaths(survivors)
        sent = time.monotonic()
        procs[VICTIM].send_signal(how)
        latency: dict[str, float] = {}
        while len(latency) < len(survivors) and time.monotonic() - sent < 60:
            for name, port in survivors.items():
                if name in latency:
                    continue
                view = {m["name"]: m for m in members(port)["members"]}
                if view[VICTIM]["state"] == "dead":
                    latency[name] = round(time.monotonic() - sent, 3)
            time.sleep(0.1)
        false_deaths = survivor_deaths(survivors) - deaths_before
        return {
            "signal": how.name,
            "busy_loops": busy,
            "latency_seconds": latency,
            "dead_after_seconds_before": {n: m["dead_after_seconds"] for n, m in limits.items()},
            "false_deaths": false_deaths,
        }
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in [*procs.values(), *spinners]:
            if proc in spinners:
                proc.kill()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes in the loaded cases")
    parser.add_argument("--signals", nargs="+", default=["SIGSTOP", "SIGKILL"], choices=["SIGSTOP", "SIGKILL"])
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "detection.json")
    args = parser.parse_args(argv)
    provenance = Provenance([__file__, *(argv if argv is not None else sys.argv[1:])])
    cases = []
    for name in args.signals:
        for busy in sorted({0, args.busy}):
            with tempfile.TemporaryDirectory(prefix="p2pdl-detection-") as workdir:
                case = run_case(signal.Signals[name], busy, Path(workdir))
            print(json.dumps(case))
            cases.append(case)
    result = {
        "membership": {"gossip_interval": 1.0, "suspect_after": 5.0, "dead_after": 20.0, "phi_threshold": 8.0},
        "peers": len(NAMES),
        "workload": "peers/mnist1d_cnn.py",
        "cases": cases,
    }
    write_result(args.results, "detection", result, provenance)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
