"""Ports, peer processes and clusters for the multi-process tests: one copy, used by every file.

The trade-off is strictness over convenience. A real-process test passes only when every peer
ran to its configured step count on its own (``summary.json``: ``steps`` equal to ``run.steps``,
``stopped_early`` false) and the cluster launcher did not have to stop it at its timeout; an
exit code alone is not enough, because a peer stopped by SIGTERM still evaluates, writes its
summary and exits 0. Test configs are checked too: ``membership.dead_after`` must exceed the
round timeout, or a round slowed by a busy machine would see its partners declared dead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from p2pdl.net.ports import free_ports as free_ports  # re-exported: tests take it from here

REPO = Path(__file__).resolve().parent.parent
PEERS_DIR = REPO / "peers"
LOCAL_CLUSTER = REPO / "scripts" / "local_cluster.py"

# glibc maps big buffers freshly and trims the heap without these; set before any peer starts.
PEER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}
# p2pdl's defaults (p2pdl/config.py, MembershipConfig); the check below needs them.
DEFAULT_ROUND_TIMEOUT = 10.0
DEFAULT_SUSPECT_AFTER = 5.0
DEFAULT_DEAD_AFTER = 20.0


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _membership_for(round_timeout: float, membership: dict[str, object] | None) -> dict[str, object] | None:
    """The membership table to write: the given one, checked, or one that outlasts the round.

    A peer that waits a whole round timeout for a partner must not find that partner declared
    dead meanwhile: on a loaded machine the first round can take most of its timeout.
    """
    if membership is None:
        if round_timeout < DEFAULT_DEAD_AFTER:
            return None
        membership = {"suspect_after": round_timeout, "dead_after": 2 * round_timeout}
    dead_after = float(membership.get("dead_after", DEFAULT_DEAD_AFTER))  # type: ignore[arg-type]
    if dead_after <= round_timeout:
        raise ValueError(
            f"test config: membership.dead_after ({dead_after} s) must be above strategy.round_timeout "
            f"({round_timeout} s), or a slow round sees its partners declared dead"
        )
    return membership


def write_config(
    path: Path,
    *,
    names: list[str],
    ports: list[int],
    workload: str = "mnist1d_cnn.py",
    run: dict[str, object] | None = None,
    strategy: dict[str, object] | None = None,
    topology: dict[str, object] | None = None,
    transport: dict[str, object] | None = None,
    membership: dict[str, object] | None = None,
    checkpoint: dict[str, object] | None = None,
    compression: dict[str, object] | None = None,
    schedule: dict[str, object] | None = None,
    host: str = "127.0.0.1",
) -> Path:
    """Write a TOML config for peers on ``host``; refuse a membership that a slow round outlives."""

    def table(name: str, values: dict[str, object]) -> list[str]:
        return [f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items()), ""]

    strategy = strategy or {}
    round_timeout = float(strategy.get("round_timeout", DEFAULT_ROUND_TIMEOUT))  # type: ignore[arg-type]
    membership = _membership_for(round_timeout, membership)
    workload_path = Path(workload) if Path(workload).is_absolute() else PEERS_DIR / workload
    lines = table("run", {"workload": str(workload_path), "eval_every": 0, **(run or {})})
    lines += table("strategy", strategy)
    lines += table("topology", topology or {"kind": "ring"})
    lines += table("transport", {"startup_timeout": 60.0, **(transport or {})})
    optional = (("membership", membership), ("checkpoint", checkpoint), ("compression", compression))
    for name, values in (*optional, ("schedule", schedule)):
        if values:
            lines += table(name, values)
    for name, port in zip(names, ports, strict=True):
        lines += ["[[peers]]", f'name = "{name}"', f'address = "{host}:{port}"', ""]
    path.write_text("\n".join(lines))
    return path


def configured_steps(config: Path) -> int:
    """``run.steps`` of a config file (p2pdl's default when absent)."""
    run = tomllib.loads(config.read_text()).get("run", {})
    if "steps" in run:
        return int(run["steps"])
    from p2pdl.config import load_config

    return load_config(config).run.steps


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """Every row of ``out/metrics.jsonl`` (steps, events, evaluations)."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def log_tail(out: Path, chars: int = 2000) -> str:
    path = out / "peer.log"
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no peer.log)"


def assert_finished(out: Path, steps: int) -> dict[str, Any]:
    """The peer whose output is ``out`` ran all ``steps`` itself; returns its summary.json."""
    path = out / "summary.json"
    assert path.exists(), f"{out.name} wrote no summary.json:\n{log_tail(out)}"
    summary = read_json(path)
    assert summary["stopped_early"] is False, f"{out.name} was stopped before its end:\n{log_tail(out)}"
    assert summary["steps"] == steps, f"{out.name} ended at step {summary['steps']}, not {steps}:\n{log_tail(out)}"
    return summary


def run_cluster(
    config: Path,
    out: Path,
    *,
    timeout: float = 600,
    stragglers: Collection[str] = (),
) -> dict[str, Any]:
    """Run every peer of ``config`` through scripts/local_cluster.py; return its summary.json.

    Fails unless every peer exited 0, the launcher never hit ``timeout`` and every peer not in
    ``stragglers`` reached the configured step count without being stopped. (A straggler of an
    asynchronous strategy may legitimately stop when the swarm reaches the last step.)
    """
    command = [sys.executable, str(LOCAL_CLUSTER), str(config), "--out", str(out)]
    result = subprocess.run(
        [*command, "--no-progress", "--threads", "1", "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 100,
        env={**os.environ, **PEER_ENV},
        check=False,
    )
    report = result.stdout[-3000:] + result.stderr[-3000:]
    summary_path = out / "summary.json"
    assert summary_path.exists(), f"local_cluster wrote no summary ({result.returncode}):\n{report}"
    summary = read_json(summary_path)
    logs = "\n".join(f"--- {p['name']}:\n{log_tail(out / p['name'], 1500)}" for p in summary["peers"])
    assert not summary["timed_out"], f"the cluster hit its {timeout} s timeout:\n{report}\n{logs}"
    assert result.returncode == 0, f"local_cluster exited {result.returncode}:\n{report}\n{logs}"
    steps = configured_steps(config)
    for peer in summary["peers"]:
        assert peer["exit_code"] == 0, peer
        assert peer["stopped_early"] is False, peer
        if peer["name"] not in stragglers:
            assert peer["steps"] == steps, (peer, steps)
    return summary


def load_state(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def flat_model(path: Path) -> torch.Tensor:
    """Every floating-point value of a saved state_dict (or tensor), as one float64 vector."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, torch.Tensor):
        return state.reshape(-1).double()
    return torch.cat([v.reshape(-1).double() for v in state.values() if v.is_floating_point()])


def assert_identical_models(dirs: Iterable[Path]) -> None:
    """Every ``DIR/model.pt`` holds bit-identical parameters (the strategy promises one model)."""
    dirs = list(dirs)
    reference = load_state(dirs[0] / "model.pt")
    for other in dirs[1:]:
        state = load_state(other / "model.pt")
        assert list(state) == list(reference)
        for key in reference:
            assert torch.equal(state[key], reference[key]), f"{other.name}.{key} differs from {dirs[0].name}.{key}"


def assert_one_group_per_round(statuses: Mapping[str, Mapping[str, Any]]) -> None:
    """No two peers applied one exact round over different groups (PROTOCOL.md §11.4): compares
    the ``applied_epochs`` runs ([first round, last round, epoch]) of the peers' strategy status."""
    epochs: dict[int, tuple[int, str]] = {}
    for name, status_ in statuses.items():
        for first, last, epoch in status_["applied_epochs"]:
            for round_index in range(first, last + 1):
                held = epochs.setdefault(round_index, (epoch, name))
                assert held[0] == epoch, (
                    f"round {round_index}: {held[1]} applied epoch {held[0]}, {name} applied epoch {epoch}"
                )


def get_json(address: str, path: str = "/status", timeout: float = 2.0) -> dict[str, Any]:
    """GET ``http://address/path`` as JSON, never through a proxy from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}{path}", timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def status(port: int) -> dict[str, Any]:
    """``/status`` of the peer listening on 127.0.0.1:``port``."""
    return get_json(f"127.0.0.1:{port}")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s (connection errors count as not yet) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class PeerProcesses:
    """Starts real ``p2pdl peer`` processes and guarantees every one is reaped."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.outs: dict[str, Path] = {}
        self._logs: list[IO[bytes]] = []

    def start(
        self, config: Path, name: str, *extra: str, out: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        out = out or self._tmp / name
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "peer.log", "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        command = [
            sys.executable, "-m", "p2pdl.cli", "peer",
            "--config", str(config), "--name", name, "--out", str(out), *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(
            [*self.prefix(name), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **PEER_ENV, **(env or {})},
            cwd=REPO,
        )
        self.procs[name] = proc
        self.outs[name] = out
        return proc

    def prefix(self, name: str) -> list[str]:
        """A command prefix for peer ``name`` (e.g. ``ip netns exec NS``); none by default."""
        return []

    def wait_all(self, timeout: float) -> dict[str, int]:
        """Exit codes of every peer; fails (naming the peers still running) after ``timeout`` s in all."""
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                running = [n for n, p in self.procs.items() if p.poll() is None]
                raise AssertionError(f"peers still running after {timeout} s: {running}") from None
        return codes

    def assert_all_finished(self, timeout: float, steps: int, names: Iterable[str] | None = None) -> None:
        """Every peer (or ``names``) exits 0 within ``timeout`` having run all ``steps`` itself."""
        codes = self.wait_all(timeout)
        for name in names if names is not None else codes:
            assert codes[name] == 0, f"{name} exited {codes[name]}:\n{self.log(name)[-2000:]}"
            assert_finished(self.outs[name], steps)

    def log(self, name: str) -> str:
        path = self.outs.get(name, self._tmp / name) / "peer.log"
        return path.read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
