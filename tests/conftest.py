"""Shared fixtures: a dataset cache, a process reaper for multi-process tests, a config writer.

The helpers themselves live in ``helpers.py``; the names below are re-exported for test files
that import them from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import PEER_ENV, PEERS_DIR, REPO, PeerProcesses, free_ports, run_cluster, write_config

__all__ = ["PEERS_DIR", "PEER_ENV", "REPO", "PeerProcesses", "free_ports", "run_cluster", "write_config"]


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One MNIST-1D build per test session, shared by every peer process the tests start."""
    cache = os.environ.get("P2PDL_CACHE_DIR") or str(tmp_path_factory.mktemp("p2pdl-cache"))
    previous = os.environ.get("P2PDL_CACHE_DIR")
    os.environ["P2PDL_CACHE_DIR"] = cache
    yield
    if previous is None:
        os.environ.pop("P2PDL_CACHE_DIR", None)


@pytest.fixture(scope="session")
def mnist1d_built(_dataset_cache: None) -> None:
    """Build MNIST-1D into the shared cache once, before a swarm starts: peers that each build it
    on their first step, all at once on a busy machine, can stall a first round past its timeout."""
    from p2pdl.train import datasets

    datasets.mnist1d()


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
