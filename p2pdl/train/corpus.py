"""Byte-level text corpora for language-model workloads, cached as memory-mapped uint8 arrays.

The default corpus is the Python standard library's own source: every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]``, sorted by relative path, leaving out ``site-packages`` (and
``dist-packages``) and every ``test``, ``tests`` and ``idle_test`` directory, so the model reads
library code rather than test fixtures (which include deliberately broken and Python 2 files).
It ships with every Python, so a peer needs no download. On CPython 3.11.7 that is 734 files:
699 for training (11,485,513 bytes) and 35 for validation (633,860 bytes); other versions differ
a little, and :func:`load_corpus` reports the running interpreter's figures.

``P2PDL_GPT_TEXT`` points at the operator's own text instead: a file, a directory (every
non-hidden regular file below it, recursively) or a glob (``**`` allowed). A path that matches
nothing, or only empty files, raises :class:`~p2pdl.errors.WorkloadError` naming it.

Split: with at least :data:`MIN_FILES_FOR_FILE_SPLIT` files, a file goes to validation when a
SHA-256 of its relative path falls in the lowest :data:`VALIDATION_PERCENT` percent, so the split
is deterministic, disjoint by file, and a file keeps its side when others are added or removed.
With fewer files (one novel, say), the last :data:`VALIDATION_PERCENT` percent of every file's
bytes is held out instead. Files are joined with one ASCII file-separator byte (0x1C) between them.

Cache: ``corpus-<key>.train.npy`` and ``.val.npy`` under :func:`p2pdl.train.datasets.cache_dir`,
each written atomically (:func:`p2pdl.train.files.atomic_write`) and opened with
``mmap_mode="r"``, so the peers on one machine share one copy in the page cache and a peer's
memory never holds the whole corpus. The key hashes the Python version, the source, and every
file's relative path, size and modification time: a different stdlib or an edited text file
rebuilds it. An unreadable cache file is rebuilt, never trusted. Trade-off: the key is built from
``stat`` alone, so an edit that keeps a file's size and mtime is not seen; reading every byte to
hash it would cost as much as rebuilding.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pdl.errors import WorkloadError
from p2pdl.train.datasets import cache_dir
from p2pdl.train.files import atomic_write

__all__ = [
    "MIN_FILES_FOR_FILE_SPLIT",
    "SEPARATOR",
    "TEXT_ENV",
    "VALIDATION_PERCENT",
    "Corpus",
    "is_validation_file",
    "load_corpus",
    "split_files",
    "stdlib_sources",
    "text_sources",
]

logger = logging.getLogger(__name__)

TEXT_ENV = "P2PDL_GPT_TEXT"
VALIDATION_PERCENT = 5
MIN_FILES_FOR_FILE_SPLIT = 20
SEPARATOR = b"\x1c"  # ASCII FS, "file separator": between documents
# Bump when the cached layout or the split rule changes, so stale files are ignored.
_CACHE_FORMAT = 1
_SKIPPED_TOP = frozenset({"site-packages", "dist-packages"})
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """A corpus split into training and validation bytes (read-only uint8 1-D arrays)."""

    source: str  # "stdlib" or "P2PDL_GPT_TEXT=<its value>"
    train: np.ndarray
    val: np.ndarray
    train_files: int
    val_files: int  # 0 when the split is by bytes (too few files)


@dataclass(frozen=True)
class _Sources:
    label: str
    root: Path
    relative: tuple[str, ...]  # POSIX paths under root, sorted


def stdlib_sources() -> _Sources:
    """The stdlib's ``*.py`` files (see the module docstring for what is left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    relative: list[str] = []
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        # Pruned in place, so os.walk never descends into site-packages or test suites.
        subfolders[:] = [
            name for name in subfolders if name not in _SKIPPED_DIRS and not (here == root and name in _SKIPPED_TOP)
        ]
        relative.extend((here / name).relative_to(root).as_posix() for name in names if name.endswith(".py"))
    if not relative:
        raise WorkloadError(f"no *.py files under the stdlib directory {root}")
    return _Sources("stdlib", root, tuple(sorted(relative)))


def text_sources(spec: str) -> _Sources:
    """The files ``spec`` (a file, a directory or a glob) names; WorkloadError naming it if none."""
    path = Path(spec).expanduser()
    if any(char in spec for char in "*?["):
        # glob.glob, not Path.glob: the pattern may be absolute, which Path.glob refuses.
        matches = glob.glob(str(path), recursive=True)  # noqa: PTH207
        files = [Path(match) for match in matches]
        files = [file.resolve() for file in files if file.is_file()]
        if not files:
            raise WorkloadError(f"{TEXT_ENV}={spec}: the glob matches no files")
        root = Path(os.path.commonpath([file.parent for file in files]))
    elif path.is_dir():
        root = path.resolve()
        files = [
            file
            for file in root.rglob("*")
            if file.is_file() and not any(part.startswith(".") for part in file.relative_to(root).parts)
        ]
        if not files:
            raise WorkloadError(f"{TEXT_ENV}={spec}: the directory holds no (non-hidden) files")
    elif path.is_file():
        root = path.resolve().parent
        files = [path.resolve()]
    else:
        raise WorkloadError(f"{TEXT_ENV}={spec}: no such file or directory")
    return _Sources(f"{TEXT_ENV}={spec}", root, tuple(sorted(file.relative_to(root).as_posix() for file in files)))


def is_validation_file(relative: str) -> bool:
    """Whether the file at ``relative`` (a POSIX path) is held out, by a stable hash of the path."""
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALIDATION_PERCENT


def split_files(relative: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``(train, validation)`` relative paths, each in the given order."""
    train = [name for name in relative if not is_validation_file(name)]
    val = [name for name in relative if is_validation_file(name)]
    return train, val


def _cache_key(sources: _Sources) -> str:
    entries = []
    for name in sources.relative:
        stat = (sources.root / name).stat()
        entries.append([name, stat.st_size, stat.st_mtime_ns])
    key_source = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "python": sys.version,
            "source": sources.label,
            "root": str(sources.root),
            "files": entries,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key_source.encode()).hexdigest()[:16]


def _build(sources: _Sources) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Read every file and split it: ``(train, val, train_files, val_files)``."""

    def read(name: str) -> bytes:
        try:
            return (sources.root / name).read_bytes()
        except OSError as exc:
            raise WorkloadError(f"corpus {sources.label}: cannot read {sources.root / name}: {exc}") from exc

    train_names, val_names = split_files(sources.relative)
    if len(sources.relative) >= MIN_FILES_FOR_FILE_SPLIT and train_names and val_names:
        train = SEPARATOR.join(read(name) for name in train_names)
        val = SEPARATOR.join(read(name) for name in val_names)
        counts = (len(train_names), len(val_names))
    else:
        # Too few files for a by-file split: hold out the tail of every file instead.
        heads, tails = [], []
        for name in sources.relative:
            data = read(name)
            cut = len(data) - len(data) * VALIDATION_PERCENT // 100
            heads.append(data[:cut])
            tails.append(data[cut:])
        train, val = SEPARATOR.join(heads), SEPARATOR.join(tails)
        counts = (len(sources.relative), 0)
    if not train.strip(SEPARATOR) or not val.strip(SEPARATOR):
        raise WorkloadError(f"corpus {sources.label}: too little text to split into training and validation")
    return np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8), *counts


def _open_cached(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        array: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim != 1:
            raise ValueError(f"expected a 1-D uint8 array, got {array.dtype} {array.shape}")
    except Exception as exc:  # any failure to read means "rebuild", never "crash"
        logger.warning("corpus cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    return array


def _write(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))


def load_corpus() -> Corpus:
    """The corpus ``P2PDL_GPT_TEXT`` names, else the stdlib's source; built once, then memory-mapped."""
    spec = os.environ.get(TEXT_ENV)
    sources = text_sources(spec) if spec else stdlib_sources()
    key = _cache_key(sources)
    folder = cache_dir()
    train_path, val_path, meta_path = (folder / f"corpus-{key}.{part}" for part in ("train.npy", "val.npy", "json"))

    train, val = _open_cached(train_path), _open_cached(val_path)
    try:
        counts = json.loads(meta_path.read_text())
        train_files, val_files = int(counts["train_files"]), int(counts["val_files"])
    except (OSError, ValueError, KeyError, TypeError):
        train = None  # the file counts are part of the cache: rebuild without them
    if train is not None and val is not None:
        return Corpus(sources.label, train, val, train_files, val_files)

    logger.info("building the %s byte corpus (%d files) into %s", sources.label, len(sources.relative), folder)
    train_bytes, val_bytes, train_files, val_files = _build(sources)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write(train_path, train_bytes)
        _write(val_path, val_bytes)
        counts_text = json.dumps({"train_files": train_files, "val_files": val_files})
        atomic_write(meta_path, lambda handle: handle.write(counts_text.encode()))
    except OSError as exc:
        logger.warning("cannot write corpus cache under %s (%s); continuing uncached", folder, exc)
        return Corpus(sources.label, train_bytes, val_bytes, train_files, val_files)
    mapped_train, mapped_val = _open_cached(train_path), _open_cached(val_path)
    if mapped_train is None or mapped_val is None:
        return Corpus(sources.label, train_bytes, val_bytes, train_files, val_files)
    return Corpus(sources.label, mapped_train, mapped_val, train_files, val_files)
