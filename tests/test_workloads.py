"""Workload loading, offline datasets and their cache, sharding and batch iteration.

Hermetic: every cache lives under a pytest tmp dir. MNIST-1D is generated once per session
(about a second) and copied into each test's own cache dir.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pdl.errors import WorkloadError
from p2pdl.train import data as data_module
from p2pdl.train import datasets
from p2pdl.train.data import BatchStream, batch_indices, batches_per_epoch
from p2pdl.train.workload import LoadedWorkload, load_workload

PEERS = Path(__file__).resolve().parent.parent / "peers"
WORKLOAD_FILES = ("mnist1d_cnn.py", "mnist1d_wide_mlp.py", "digits_mlp.py")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def mnist1d_session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding a real MNIST-1D build, made once per session."""
    cache = tmp_path_factory.mktemp("p2pdl-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("P2PDL_CACHE_DIR", str(cache))
        numpy_state = np.random.get_state()[1].copy()
        python_state = random.getstate()
        datasets.mnist1d()
        # Building reseeds the global RNGs internally; they must come back untouched.
        assert np.array_equal(np.random.get_state()[1], numpy_state)
        assert random.getstate() == python_state
    assert len(list(cache.glob("mnist1d-*.npz"))) == 1
    return cache


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist1d_session_cache: Path) -> Path:
    """This test's own cache dir, pre-filled with the session's MNIST-1D file."""
    cache = tmp_path / "cache"
    shutil.copytree(mnist1d_session_cache, cache)
    monkeypatch.setenv("P2PDL_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def mnist1d_file(cache_dir: Path) -> Path:
    (path,) = cache_dir.glob("mnist1d-*.npz")
    return path


@pytest.fixture
def workload(request: pytest.FixtureRequest, cache_dir: Path) -> LoadedWorkload:
    return load_workload(PEERS / request.param)


@pytest.fixture
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- workloads


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("filename", "expected_params"),
    [("mnist1d_cnn.py", 5_210), ("mnist1d_wide_mlp.py", 4_300_810), ("digits_mlp.py", 9_610)],
)
def test_bundled_workload_parameter_counts(filename: str, expected_params: int) -> None:
    loaded = load_workload(PEERS / filename)
    assert loaded.name == Path(filename).stem
    assert loaded.path == (PEERS / filename).resolve()
    assert loaded.description
    assert _param_count(loaded.build_model()) == expected_params


def test_build_model_is_identical_under_same_seed() -> None:
    loaded = load_workload(PEERS / "mnist1d_cnn.py")
    torch.manual_seed(7)
    first = loaded.build_model().state_dict()
    torch.manual_seed(7)
    second = loaded.build_model().state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("workload", WORKLOAD_FILES, indirect=True)
def test_workload_shards_and_forward(workload: LoadedWorkload) -> None:
    full_inputs, full_targets = workload.load_shard(0, 1)
    shards = [workload.load_shard(k, 3) for k in range(3)]
    assert sum(len(targets) for _, targets in shards) == len(full_targets)
    for inputs, targets in shards:
        assert inputs.dtype == torch.float32
        assert targets.dtype == torch.int64
        assert inputs.device.type == "cpu"
        assert inputs.shape[0] == targets.shape[0]
        assert inputs.shape[1:] == full_inputs.shape[1:]
    inputs, targets = shards[0]
    model = workload.build_model()
    output = model(inputs[:8])
    assert output.shape == (8, 10)
    loss = workload.loss_fn(output, targets[:8])
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("workload", WORKLOAD_FILES, indirect=True)
@pytest.mark.parametrize("training", [True, False])
def test_evaluate_reports_metrics_and_restores_mode(workload: LoadedWorkload, training: bool) -> None:
    torch.manual_seed(0)
    model = workload.build_model()
    model.train(training)
    metrics = workload.evaluate(model, torch.device("cpu"))
    assert model.training is training
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert np.isfinite(metrics["test_loss"])
    assert all(isinstance(value, float) for value in metrics.values())
    # No gradient bookkeeping leaks out of evaluation.
    assert all(p.grad is None for p in model.parameters())


def test_cnn_trains_alone_to_80_percent(cache_dir: Path, one_thread: None) -> None:
    """A real, short training run: Adam 1e-2, batch 64, 1000 steps (about 2 s on a CPU)."""
    loaded = load_workload(PEERS / "mnist1d_cnn.py")
    torch.manual_seed(0)
    model = loaded.build_model()
    inputs, targets = loaded.load_shard(0, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch_inputs, batch_targets in islice(BatchStream(inputs, targets, 64, seed=0), 1000):
        optimizer.zero_grad()
        loader_loss = loaded.loss_fn(model(batch_inputs), batch_targets)
        loader_loss.backward()
        optimizer.step()
    metrics = loaded.evaluate(model, torch.device("cpu"))
    assert metrics["test_accuracy"] >= 0.80, metrics


# --------------------------------------------------------------------------- load_workload


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_workload_names_every_missing_function(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "partial.py",
        "import torch\n\ndef build_model():\n    return torch.nn.Linear(1, 1)\n\nloss_fn = 3\n",
    )
    with pytest.raises(WorkloadError) as info:
        load_workload(path)
    message = str(info.value)
    assert str(path.resolve()) in message
    assert "load_shard (missing)" in message
    assert "evaluate (missing)" in message
    assert "loss_fn (not callable: int)" in message
    assert "build_model (" not in message


def test_load_workload_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.py"
    with pytest.raises(WorkloadError, match="no such file") as info:
        load_workload(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("source", "cause"),
    [("x = 1 / 0\n", ZeroDivisionError), ("def broken(:\n", SyntaxError)],
)
def test_load_workload_chains_import_failure(tmp_path: Path, source: str, cause: type[BaseException]) -> None:
    path = _write(tmp_path / "broken.py", source)
    with pytest.raises(WorkloadError, match="import failed") as info:
        load_workload(path)
    assert isinstance(info.value.__cause__, cause)
    assert str(path.resolve()) in str(info.value)


def test_load_workload_description(tmp_path: Path) -> None:
    functions = "".join(
        f"def {name}(*args):\n    pass\n" for name in ("build_model", "load_shard", "loss_fn", "evaluate")
    )
    with_constant = _write(tmp_path / "a.py", f'DESCRIPTION = "from constant"\n{functions}')
    with_docstring = _write(tmp_path / "b.py", f'"""From docstring.\n\nMore."""\n{functions}')
    bad_type = _write(tmp_path / "c.py", f"DESCRIPTION = 3\n{functions}")
    assert load_workload(with_constant).description == "from constant"
    assert load_workload(with_docstring).description == "From docstring."
    with pytest.raises(WorkloadError, match="DESCRIPTION must be a str"):
        load_workload(bad_type)


def test_two_workloads_with_same_stem_do_not_collide(tmp_path: Path) -> None:
    loaded = []
    for value in (1, 2):
        folder = tmp_path / f"dir{value}"
        folder.mkdir()
        _write(
            folder / "same.py",
            f"def build_model():\n    return {value}\nload_shard = loss_fn = evaluate = build_model\n",
        )
        loaded.append(load_workload(folder / "same.py"))
    assert [w.build_model() for w in loaded] == [1, 2]


# --------------------------------------------------------------------------- datasets


def test_mnist1d_layout(cache_dir: Path) -> None:
    arrays = datasets.mnist1d()
    assert arrays["x"].shape == (4000, 40) and arrays["x"].dtype == np.float32
    assert arrays["y"].shape == (4000,) and arrays["y"].dtype == np.int64
    assert arrays["x_test"].shape == (1000, 40) and arrays["x_test"].dtype == np.float32
    assert arrays["y_test"].shape == (1000,) and arrays["y_test"].dtype == np.int64
    assert set(np.unique(arrays["y"]).tolist()) == set(range(10))
    assert arrays["x"].flags.writeable


def test_mnist1d_cache_hit_does_not_rebuild(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(args: object) -> dict[str, np.ndarray]:
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(datasets, "_build_mnist1d", refuse)
    assert datasets.mnist1d()["x"].shape == (4000, 40)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not an npz file at all")


def _wrong_dtype(path: Path) -> None:
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["x"] = arrays["x"].astype(np.float64)
    np.savez(path, **arrays)


def _pickled_object(path: Path) -> None:
    np.savez(path, x=np.array([{"evil": True}], dtype=object))


@pytest.mark.parametrize("corrupt", [_truncate, _garbage, _wrong_dtype, _pickled_object])
def test_corrupt_mnist1d_cache_is_rebuilt(
    mnist1d_file: Path, monkeypatch: pytest.MonkeyPatch, corrupt: Callable[[Path], None]
) -> None:
    expected = datasets.mnist1d()
    corrupt(mnist1d_file)
    builds: list[object] = []
    real_build = datasets._build_mnist1d

    def counting_build(args: dict[str, object]) -> dict[str, np.ndarray]:
        builds.append(args)
        # The real generator is deterministic; reuse its output to keep this test fast.
        return {key: value.copy() for key, value in expected.items()}

    monkeypatch.setattr(datasets, "_build_mnist1d", counting_build)
    rebuilt = datasets.mnist1d()
    assert len(builds) == 1
    assert all(np.array_equal(rebuilt[key], expected[key]) for key in expected)
    # The rewritten file is whole again, and no temp files are left behind.
    monkeypatch.setattr(datasets, "_build_mnist1d", real_build)
    with np.load(mnist1d_file, allow_pickle=False) as npz:
        assert np.array_equal(npz["x"], expected["x"])
    assert sorted(p.name for p in mnist1d_file.parent.iterdir()) == [mnist1d_file.name]


def test_unwritable_cache_still_returns_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist1d_session_cache: Path
) -> None:
    monkeypatch.setenv("P2PDL_CACHE_DIR", str(mnist1d_session_cache))
    expected = datasets.mnist1d()
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir should be")
    monkeypatch.setenv("P2PDL_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(datasets, "_build_mnist1d", lambda args: expected)
    assert datasets.mnist1d() is expected


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2PDL_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("P2PDL_CACHE_DIR")
    assert datasets.cache_dir() == tmp_path / "xdg" / "p2pdl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.cache_dir() == tmp_path / "home" / ".cache" / "p2pdl"


def test_digits_layout_and_fixed_split() -> None:
    first, second = datasets.digits(), datasets.digits()
    assert first["x"].shape == (1437, 64) and first["x"].dtype == np.float32
    assert first["x_test"].shape == (360, 64)
    assert first["y"].dtype == np.int64 and first["y_test"].shape == (360,)
    assert first["x"].min() >= 0.0 and first["x"].max() <= 1.0
    assert all(np.array_equal(first[key], second[key]) for key in first)


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(("num_examples", "shard_count"), [(4000, 4), (1797, 5), (7, 7), (10, 1)])
def test_shards_are_disjoint_cover_everything_and_balanced(num_examples: int, shard_count: int) -> None:
    shards = [shard_indices_of(num_examples, k, shard_count) for k in range(shard_count)]
    joined = np.concatenate(shards)
    assert joined.dtype == np.int64
    assert len(joined) == num_examples
    assert np.array_equal(np.sort(joined), np.arange(num_examples))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


def shard_indices_of(num_examples: int, shard_index: int, shard_count: int) -> np.ndarray:
    indices = datasets.shard_indices(num_examples, shard_index, shard_count)
    # Same seed, same shard: every peer process agrees on who owns what.
    assert np.array_equal(indices, datasets.shard_indices(num_examples, shard_index, shard_count))
    return indices


def test_shard_seed_changes_assignment() -> None:
    assert not np.array_equal(datasets.shard_indices(100, 0, 2, seed=0), datasets.shard_indices(100, 0, 2, seed=1))


@pytest.mark.parametrize(
    ("num_examples", "shard_index", "shard_count", "match"),
    [
        (10, 2, 2, r"shard_index must be in \[0, 1\], got 2"),
        (10, -1, 2, "shard_index"),
        (10, 0, 0, "shard_count must be >= 1"),
        (3, 0, 4, "exceeds num_examples"),
        (0, 0, 1, "num_examples must be >= 1"),
    ],
)
def test_bad_shard_requests(num_examples: int, shard_index: int, shard_count: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        datasets.shard_indices(num_examples, shard_index, shard_count)


# --------------------------------------------------------------------------- batches


def test_batch_indices_deterministic_and_seeded() -> None:
    first = batch_indices(100, 8, seed=3, step=17)
    assert first.dtype == torch.int64 and first.shape == (8,)
    assert torch.equal(first, batch_indices(100, 8, seed=3, step=17))
    assert not torch.equal(first, batch_indices(100, 8, seed=4, step=17))


def test_batch_indices_cover_each_example_once_per_epoch() -> None:
    num_examples, batch_size = 103, 10
    per_epoch = batches_per_epoch(num_examples, batch_size)
    assert per_epoch == 10
    for epoch in range(3):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = torch.cat([batch_indices(num_examples, batch_size, seed=0, step=s) for s in steps])
        assert len(seen) == len(set(seen.tolist())) == per_epoch * batch_size
        assert int(seen.min()) >= 0 and int(seen.max()) < num_examples
    epoch0 = batch_indices(num_examples, batch_size, seed=0, step=0)
    epoch1 = batch_indices(num_examples, batch_size, seed=0, step=per_epoch)
    assert not torch.equal(epoch0, epoch1)


def test_batch_stream_resumes_exactly() -> None:
    inputs = torch.arange(50, dtype=torch.float32).unsqueeze(1) * 10
    targets = torch.arange(50)
    continuous = list(islice(BatchStream(inputs, targets, 8, seed=5), 20))
    for start in (0, 1, 5, 6, 13):
        resumed = BatchStream(inputs, targets, 8, seed=5, start_step=start)
        for offset, (x_batch, y_batch) in enumerate(islice(resumed, 20 - start)):
            x_expected, y_expected = continuous[start + offset]
            assert torch.equal(x_batch, x_expected) and torch.equal(y_batch, y_expected)
        assert resumed.step == 20
    for step, (x_batch, y_batch) in enumerate(continuous):
        indices = batch_indices(50, 8, seed=5, step=step)
        assert torch.equal(y_batch, targets[indices])
        assert torch.equal(x_batch, inputs[indices])


def test_batch_stream_computes_one_permutation_per_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_order = data_module._epoch_order

    def counting_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
        calls.append(epoch)
        return real_order(num_examples, seed, epoch)

    monkeypatch.setattr(data_module, "_epoch_order", counting_order)
    stream = BatchStream(torch.zeros(40, 2), torch.zeros(40, dtype=torch.int64), 10, seed=0)
    list(islice(stream, 12))
    assert calls == [0, 1, 2]


@pytest.mark.parametrize(
    ("num_examples", "batch_size", "step", "match"),
    [(5, 8, 0, "exceeds num_examples"), (5, 0, 0, "batch_size must be >= 1"), (5, 2, -1, "step")],
)
def test_bad_batch_requests(num_examples: int, batch_size: int, step: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        batch_indices(num_examples, batch_size, seed=0, step=step)


def test_batch_stream_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        BatchStream(torch.zeros(10, 2), torch.zeros(9, dtype=torch.int64), 2, seed=0)
