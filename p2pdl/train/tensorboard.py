"""``p2pdl peer --tensorboard DIR``: the training curves as TensorBoard event files.

Written through :mod:`torch.utils.tensorboard`, which needs the optional ``tensorboard`` package
(``pip install 'p2pdl[tensorboard]'``); asking for it without the package is a config error
raised before the peer joins the swarm, not a crash mid-run. Each peer writes its own run
directory, so pointing TensorBoard at the parent of several peers' directories overlays them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from p2pdl.errors import ConfigError


class TensorBoardLog:
    """Scalars per step under ``train/``, ``eval/``, ``rounds/`` and ``traffic/``."""

    def __init__(self, directory: Path) -> None:
        try:
            module = importlib.import_module("torch.utils.tensorboard")
        except ImportError as exc:
            raise ConfigError(
                [f"--tensorboard needs the tensorboard package: pip install 'p2pdl[tensorboard]' ({exc})"]
            ) from exc
        self._writer: Any = module.SummaryWriter(log_dir=str(directory))

    def step(self, step: int, record: Mapping[str, Any], *, steps_per_second: float) -> None:
        """One metrics record of the training loop (see :mod:`p2pdl.train.loop`)."""
        writer = self._writer
        writer.add_scalar("train/loss", record["loss"], step)
        writer.add_scalar("train/steps_per_second", steps_per_second, step)
        writer.add_scalar("rounds/partial", record["rounds_partial"], step)
        writer.add_scalar("traffic/bytes_sent", record["bytes_sent"], step)
        writer.add_scalar("traffic/bytes_received", record["bytes_received"], step)
        if "round_seconds" in record:
            writer.add_scalar("rounds/seconds", record["round_seconds"], step)

    def evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(f"eval/{name}", value, step)

    def close(self) -> None:
        self._writer.close()
