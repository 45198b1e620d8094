"""Files a peer publishes: each appears whole or not at all.

Every file p2pdl writes for later reading (checkpoint, final model, parameter snapshots,
``summary.json``, the dataset cache) goes through :func:`atomic_write`: the bytes go to a
fresh temporary file in the target's directory, which is flushed and fsynced, renamed over the
target with :func:`os.replace`, and then the directory is fsynced so the rename itself survives
a crash. A reader, or a peer resuming from its checkpoint, sees the previous file or the new
one, never a torn one. Trade-off: two fsyncs per file, and disk room for a second copy while
it is written.

``metrics.jsonl`` is the exception by design: it is a log, appended one JSON line per step by
:class:`MetricsWriter`; a crash can cut only its last line, which a reader skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "MetricsWriter",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
]


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Publish ``path`` atomically with ``write(handle)`` filling a temporary file.

    The temporary name is unique (``mkstemp``), so writers in other threads or processes never
    collide; it is removed when ``write`` or the rename fails.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)  # os.replace: atomic on POSIX
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable. Some filesystems cannot open or fsync a directory: the file
    # itself is already whole and fsynced there, so that is not an error.
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text, written atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON with a final newline, written atomically."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def atomic_torch_save(path: Path, value: Any) -> None:
    """``torch.save(value)`` written atomically (load it back with ``weights_only=True``)."""
    atomic_write(path, lambda handle: torch.save(value, handle))


class MetricsWriter:
    """Append-only JSON lines; flushed every ``flush_every`` records, fsynced on close."""

    def __init__(self, path: Path, *, flush_every: int = 20) -> None:
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._flush_every = flush_every
        self._pending = 0

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._pending += 1
        if self._pending >= self._flush_every:
            self._handle.flush()
            self._pending = 0

    def close(self) -> None:
        if self._handle.closed:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
