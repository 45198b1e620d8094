"""Shared fixtures: a process reaper for multi-process tests, a dataset cache, config writers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PEERS_DIR = REPO / "peers"

# glibc maps big buffers freshly and trims the heap without these; set before any peer starts.
PEER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One MNIST-1D build per test session, shared by every peer process the tests start."""
    cache = os.environ.get("P2PDL_CACHE_DIR") or str(tmp_path_factory.mktemp("p2pdl-cache"))
    previous = os.environ.get("P2PDL_CACHE_DIR")
    os.environ["P2PDL_CACHE_DIR"] = cache
    yield
    if previous is None:
        os.environ.pop("P2PDL_CACHE_DIR", None)


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago on 127.0.0.1 (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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
) -> Path:
    """Write a TOML config for peers on 127.0.0.1."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    def table(name: str, values: dict[str, object]) -> list[str]:
        return [f"[{name}]", *(f"{k} = {value(v)}" for k, v in values.items()), ""]

    workload_path = Path(workload) if Path(workload).is_absolute() else PEERS_DIR / workload
    lines = table("run", {"workload": str(workload_path), "eval_every": 0, **(run or {})})
    lines += table("strategy", strategy or {})
    lines += table("topology", topology or {"kind": "ring"})
    lines += table("transport", {"startup_timeout": 60.0, **(transport or {})})
    if membership:
        lines += table("membership", membership)
    if checkpoint:
        lines += table("checkpoint", checkpoint)
    if compression:
        lines += table("compression", compression)
    for name, port in zip(names, ports, strict=True):
        lines += ["[[peers]]", f'name = "{name}"', f'address = "127.0.0.1:{port}"', ""]
    path.write_text("\n".join(lines))
    return path


def run_cluster(config: Path, out: Path, timeout: float = 600) -> dict[str, Any]:
    """Run every peer of ``config`` through scripts/local_cluster.py; return its summary.json."""
    command = [sys.executable, str(REPO / "scripts" / "local_cluster.py"), str(config), "--out", str(out)]
    result = subprocess.run(
        [*command, "--no-progress", "--threads", "1", "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 100,
        env={**os.environ, **PEER_ENV},
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return data


class PeerProcesses:
    """Starts real ``p2pdl peer`` processes and guarantees every one is reaped."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[object] = []

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
        return proc

    def prefix(self, name: str) -> list[str]:
        """A command prefix for peer ``name`` (e.g. ``ip netns exec NS``); none by default."""
        return []

    def wait_all(self, timeout: float) -> dict[str, int]:
        codes = {}
        for name, proc in self.procs.items():
            codes[name] = proc.wait(timeout=timeout)
        return codes

    def log(self, name: str) -> str:
        return (self._tmp / name / "peer.log").read_text(errors="replace")

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
            log.close()  # type: ignore[attr-defined]


@pytest.fixture
def peer_processes(tmp_path: Path) -> Iterator[PeerProcesses]:
    procs = PeerProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture
def config_writer(tmp_path: Path) -> Callable[..., Path]:
    def make(**kwargs: object) -> Path:
        return write_config(tmp_path / "swarm.toml", **kwargs)  # type: ignore[arg-type]

    return make
