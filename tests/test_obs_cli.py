"""``p2pdl status --watch`` (through rich's console capture) and ``--tensorboard``."""

from __future__ import annotations

import asyncio
import importlib
import os
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from test_obs import closure_for, three_peers

from p2pdl import cli
from p2pdl.errors import ConfigError
from p2pdl.obs.watch import swarm_table, watch
from p2pdl.train.tensorboard import TensorBoardLog


def swarm(states: dict[str, str]) -> dict[str, Any]:
    figures = {
        "step": 42,
        "loss": 0.25,
        "metric": 0.75,
        "metric_name": "test_accuracy",
        "steps_per_second": 3.5,
        "rounds_complete": 40,
        "rounds_partial": 2,
        "refused": 1,
        "links": [{"neighbor": "b", "health": 0, "kilobytes_per_second": None}],
        "version": [1, 2],
    }
    return {
        "self": "a",
        "members": [
            {"name": n, "address": "x:1", "state": s, "silent_seconds": 0.0, "figures": figures}
            for n, s in states.items()
        ],
        "events": [{"time": 0.0, "kind": "death", "members": ["c"]}],
    }


def test_the_table_shows_every_member_with_its_state_and_figures() -> None:
    console = Console(record=True, width=140, color_system=None)
    console.print(swarm_table(swarm({"a": "alive", "b": "alive", "c": "dead"})))
    text = console.export_text()
    assert "2 live of 3" in text and "test_accuracy" in text
    rows = [line for line in text.splitlines() if line.strip("│ ").startswith(("a", "b", "c"))]
    assert len(rows) == 3 and "dead" in rows[2] and "42" in rows[0] and "0.7500" in rows[0]
    assert "death: c" in text


def test_watch_keeps_polling_through_a_failed_read() -> None:
    answers: list[Any] = [OSError("connection refused"), swarm({"a": "alive"})]

    def fetch() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    console = Console(record=True, width=120, color_system=None)
    assert watch(fetch, console=console, interval=0.0, count=2, sleep=lambda _: None) == 1
    assert "1 live of 1" in console.export_text()


async def test_status_watch_shows_the_swarm_of_a_real_peer(capsys: pytest.CaptureFixture[str]) -> None:
    async with three_peers() as peers:
        await asyncio.gather(*(p.step(closure_for(p.model)) for p in peers))
        for peer in peers:
            peer.telemetry.sample()
        address = f"127.0.0.1:{peers[0].transport.port}"
        argv = ["status", "--watch", address, "--count", "2", "--interval", "0.3"]
        code = await asyncio.to_thread(cli.main, argv)
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK
    assert "3 live of 3" in out and "as seen by a" in out


def test_tensorboard_writes_event_files(tmp_path: Path) -> None:
    if os.environ.get("CI") != "true":  # CI installs the dev extra, which has tensorboard: never skip there
        pytest.importorskip("tensorboard")
    board = TensorBoardLog(tmp_path / "tb")
    board.step(0, {"loss": 1.0, "rounds_partial": 0, "bytes_sent": 10, "bytes_received": 20}, steps_per_second=2.0)
    board.evaluation(0, {"test_accuracy": 0.5})
    board.close()
    assert [p.name for p in (tmp_path / "tb").iterdir() if p.name.startswith("events.out.tfevents")]


def test_tensorboard_without_the_package_is_a_clear_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def no_tensorboard(name: str, package: str | None = None) -> Any:
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_tensorboard)
    with pytest.raises(ConfigError, match=r"pip install 'p2pdl\[tensorboard\]'"):
        TensorBoardLog(tmp_path / "tb")
