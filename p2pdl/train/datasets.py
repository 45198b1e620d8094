"""Offline datasets for the bundled workloads, with an on-disk cache, and sharding.

Peers never touch the network for data. MNIST-1D is generated from its procedural recipe
(``mnist1d.data.make_dataset``) rather than downloaded; scikit-learn's digits ship inside
the package. Generating MNIST-1D takes a second or two, and a local cluster starts several
peers at once, so the arrays are cached as ``.npz`` keyed by a hash of the generator's
arguments. The cache is written atomically (:func:`p2pdl.train.files.atomic_write`) so a
concurrent reader sees either no file or a whole one; an unreadable
or corrupt file is simply rebuilt. Nothing here uses pickle.

Every function returns fresh, writable numpy arrays (``x`` float32, ``y`` int64) under the
keys ``x``, ``y``, ``x_test``, ``y_test``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from p2pdl.train.files import atomic_write

__all__ = ["cache_dir", "digits", "mnist1d", "shard_indices"]

logger = logging.getLogger(__name__)

# Bump when the cached layout or preprocessing changes, so stale files are ignored.
_CACHE_FORMAT = 1
_DATASET_KEYS = ("x", "y", "x_test", "y_test")
_DIGITS_SPLIT_SEED = 0
_DIGITS_TRAIN_FRACTION = 0.8


def cache_dir() -> Path:
    """``$P2PDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/p2pdl``, else ``~/.cache/p2pdl``."""
    explicit = os.environ.get("P2PDL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "p2pdl"
    return Path.home() / ".cache" / "p2pdl"


def _check_arrays(arrays: dict[str, np.ndarray], features: int) -> None:
    """Raise ValueError unless ``arrays`` has the dataset layout (used on cache reads)."""
    for key in _DATASET_KEYS:
        if key not in arrays:
            raise ValueError(f"missing array {key!r}")
    for x_key, y_key in (("x", "y"), ("x_test", "y_test")):
        x, y = arrays[x_key], arrays[y_key]
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != features:
            raise ValueError(f"{x_key}: expected float32 (N, {features}), got {x.dtype} {x.shape}")
        if y.dtype != np.int64 or y.shape != (x.shape[0],):
            raise ValueError(f"{y_key}: expected int64 ({x.shape[0]},), got {y.dtype} {y.shape}")


def _read_cache(path: Path, features: int) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        # Open the file ourselves: np.load leaks its handle when the bytes are not an npz.
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as npz:
            arrays = {key: np.array(npz[key]) for key in npz.files}
        _check_arrays(arrays, features)
    except Exception as exc:  # any failure to read means "rebuild", never "crash"
        logger.warning("dataset cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    return {key: arrays[key] for key in _DATASET_KEYS}


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically publish ``arrays`` at ``path``; a failure only costs a rebuild next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(
            path,
            lambda handle: np.savez(
                handle, x=arrays["x"], y=arrays["y"], x_test=arrays["x_test"], y_test=arrays["y_test"]
            ),
        )
    except OSError as exc:
        logger.warning("cannot write dataset cache %s (%s); continuing uncached", path, exc)


def _build_mnist1d(args: dict[str, Any]) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset

    class _Args:
        def __init__(self, values: dict[str, Any]) -> None:
            self.__dict__.update(values)

    # make_dataset reseeds the global random and numpy RNGs; put them back afterwards so
    # building (or not building, on a cache hit) never changes a caller's random stream.
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        raw = make_dataset(_Args(args))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {
        "x": np.ascontiguousarray(raw["x"], dtype=np.float32),
        "y": np.ascontiguousarray(raw["y"], dtype=np.int64),
        "x_test": np.ascontiguousarray(raw["x_test"], dtype=np.float32),
        "y_test": np.ascontiguousarray(raw["y_test"], dtype=np.int64),
    }


def mnist1d() -> dict[str, np.ndarray]:
    """MNIST-1D with its default args: ``x`` (4000, 40) float32, ``y`` (4000,) int64,
    ``x_test`` (1000, 40), ``y_test`` (1000,). Built offline and cached on disk."""
    from mnist1d.data import get_dataset_args

    args: dict[str, Any] = dict(get_dataset_args(as_dict=True))
    # The download URL does not affect the generated arrays.
    args.pop("url", None)
    key_source = json.dumps({"format": _CACHE_FORMAT, "args": args}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-{key}.npz"
    features = int(args["final_seq_length"])

    cached = _read_cache(path, features)
    if cached is not None:
        return cached
    logger.info("building MNIST-1D into %s", path)
    arrays = _build_mnist1d(args)
    _write_cache(path, arrays)
    return arrays


def digits() -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 digits: ``x`` (N, 64) float32 in [0, 1], ``y`` int64, split
    80/20 into train and test by a fixed seeded permutation (1437 train, 360 test)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are integer intensities 0..16.
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(y))
    num_train = int(len(y) * _DIGITS_TRAIN_FRACTION)
    train, test = order[:num_train], order[num_train:]
    return {"x": x[train], "y": y[train], "x_test": x[test], "y_test": y[test]}


def shard_indices(num_examples: int, shard_index: int, shard_count: int, *, seed: int = 0) -> np.ndarray:
    """Indices (int64) of the examples in shard ``shard_index`` of ``shard_count``.

    A fixed permutation (seeded by ``seed``) is dealt round-robin: shard ``k`` takes
    positions ``k, k + shard_count, k + 2 * shard_count, ...``. Shards are therefore
    disjoint, together cover every example, and differ in size by at most one.
    """
    problems: list[str] = []
    if num_examples < 1:
        problems.append(f"num_examples must be >= 1, got {num_examples}")
    if shard_count < 1:
        problems.append(f"shard_count must be >= 1, got {shard_count}")
    elif num_examples >= 1 and shard_count > num_examples:
        problems.append(f"shard_count {shard_count} exceeds num_examples {num_examples}; some shards would be empty")
    if shard_count >= 1 and not 0 <= shard_index < shard_count:
        problems.append(f"shard_index must be in [0, {shard_count - 1}], got {shard_index}")
    if problems:
        raise ValueError("bad shard request: " + "; ".join(problems))
    permutation = np.random.default_rng(seed).permutation(num_examples)
    return permutation[shard_index::shard_count].astype(np.int64)
