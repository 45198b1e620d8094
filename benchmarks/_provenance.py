"""Where a benchmark figure came from: the provenance block every result JSON starts with.

A figure in docs/BENCHMARKS.md is only worth what its conditions are: the code it measured, the
command that produced it and how busy the machine was. Every script under ``benchmarks/`` writes
its result through :func:`write_result`, which puts a ``provenance`` block first:

* ``command``: the command line as run, relative to the repository root, with the environment
  variables that change timings (allocator thresholds, ``OMP_NUM_THREADS``) in front, so that it
  can be pasted back into a shell at the same commit;
* ``commit`` and ``dirty``: ``git rev-parse HEAD`` and whether tracked files outside
  ``benchmarks/results/`` differed from it (``dirty_paths`` names them); a result from a dirty
  tree is not reproducible from the commit;
* ``date_utc`` (start), ``seconds`` (wall time of the whole script);
* ``load_average_start`` / ``load_average_end``: 1, 5 and 15 minute load averages. The
  development machine is shared, so a time is read together with these; a ratio measured side by
  side in one run is what survives a busy machine;
* ``cpu_count`` (and the cores this process may use), ``platform``, ``python`` and the versions of
  the packages whose speed the figures depend on.

The trade-off is a few ``git`` calls per run and a block of metadata in every JSON, against
figures that cannot be traced back to the code they measured.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# Environment variables that change what a benchmark measures; recorded in front of the command.
# P2PDL_CACHE_DIR: an empty dataset cache makes every peer build MNIST-1D before it trains.
TIMING_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "P2PDL_CACHE_DIR",
)
PACKAGES = ("torch", "numpy", "aiohttp", "msgpack", "lz4")
MAX_DIRTY_PATHS = 20


def _git(*args: str) -> str | None:
    try:
        completed = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.rstrip("\n")


def repo_relative(path: Path | str) -> str:
    """``path`` relative to the repository root when it lies inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _relative(argument: str) -> str:
    """An absolute path inside the repository, alone or as ``--opt=PATH``, made relative to its root."""
    prefix, sep, value = argument.partition("=") if argument.startswith("--") else ("", "", argument)
    path = Path(value)
    if path.is_absolute():
        with contextlib.suppress(ValueError):
            value = str(path.resolve().relative_to(REPO))
    return f"{prefix}{sep}{value}"


def command_line(argv: list[str] | None = None) -> str:
    """The command as run, from the repository root: timing environment, ``python``, script, arguments."""
    argv = list(sys.argv if argv is None else argv)
    env = [f"{name}={os.environ[name]}" for name in TIMING_ENV if name in os.environ]
    return shlex.join([*env, "python", _relative(str(Path(argv[0]).resolve())), *map(_relative, argv[1:])])


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


class Provenance:
    """Captured when a benchmark starts; :meth:`record` adds the end of the run."""

    def __init__(self, argv: list[str] | None = None) -> None:
        self.command = command_line(argv)
        self.date_utc = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.load_average_start = _load_average()
        self._started = time.monotonic()
        self.commit = _git("rev-parse", "HEAD")
        # Result files are what a run writes, not what it measures: a tree differing only there is clean.
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
        self.dirty_paths = [line[3:] for line in changed.splitlines()] if changed else []

    def stamp(self) -> dict[str, Any]:
        """A compact mark for one part of a result that may later be merged with parts of other runs."""
        return {
            "command": self.command,
            "commit": self.commit,
            "dirty": bool(self.dirty_paths),
            "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_average": _load_average(),
        }

    def record(self) -> dict[str, Any]:
        """The provenance block, with the load average and wall time at this moment as the end."""
        return {
            "command": self.command,
            "commit": self.commit,
            "dirty": bool(self.dirty_paths),
            "dirty_paths": self.dirty_paths[:MAX_DIRTY_PATHS],
            "date_utc": self.date_utc,
            "seconds": round(time.monotonic() - self._started, 1),
            "load_average_start": self.load_average_start,
            "load_average_end": _load_average(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "packages": _versions(),
        }


def write_result(path: Path, benchmark: str, result: dict[str, Any], provenance: Provenance) -> dict[str, Any]:
    """Write ``{"benchmark", "provenance", **result}`` as indented JSON (atomically) and return it."""
    document = {"benchmark": benchmark, "provenance": provenance.record(), **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(path)
    return document
