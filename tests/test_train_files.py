"""Files a peer writes: atomic publication, checkpoint round trip, metrics log, dataset cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch

from p2pdl.train.checkpoints import load_checkpoint, save_checkpoint, save_model, save_snapshot
from p2pdl.train.datasets import _read_cache, _write_cache
from p2pdl.train.files import (
    MetricsWriter,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_each_helper_publishes_its_content(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    atomic_write_text(tmp_path / "t", "héllo")
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2.5, None]})
    atomic_torch_save(tmp_path / "x.pt", {"w": torch.arange(3)})
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2.5, None]}
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["w"], torch.arange(3))
    assert leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"step": 1})

    def torn(handle: IO[bytes]) -> None:
        handle.write(b'{"step": 2, "half')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, torn)
    assert json.loads(target.read_text()) == {"step": 1}
    assert leftovers(tmp_path) == []
    with pytest.raises(AttributeError, match="pickle"):  # a torch.save that fails half way: same guarantee
        atomic_torch_save(target, {"bad": lambda: None})
    assert json.loads(target.read_text()) == {"step": 1}
    assert leftovers(tmp_path) == []


def test_concurrent_writers_never_tear_the_file(tmp_path: Path) -> None:
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(5):
                atomic_write_bytes(target, data)
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in payloads
    assert leftovers(tmp_path) == []


def make_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_checkpoint_round_trip_restores_model_optimizer_step_and_rng(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(model, optimizer, 17, path)
    expected_draw = torch.rand(3)  # the RNG continues from where the checkpoint was taken

    restored = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=0.01)
    assert load_checkpoint(restored, restored_optimizer, path) == 17
    assert torch.equal(torch.rand(3), expected_draw)
    for mine, theirs in zip(restored.parameters(), model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    own, loaded = optimizer.state_dict()["state"], restored_optimizer.state_dict()["state"]
    assert own.keys() == loaded.keys()
    for index in own:
        for key in own[index]:
            assert torch.equal(own[index][key], loaded[index][key])
    assert leftovers(tmp_path) == []


def test_final_model_and_snapshots(tmp_path: Path) -> None:
    model = make_model()
    save_model(model, tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state.keys() == model.state_dict().keys()
    save_snapshot(model, tmp_path, 40)
    flat = torch.load(tmp_path / "snapshots" / "step_40.pt", weights_only=True)
    assert flat.dtype == torch.float32 and flat.numel() == sum(p.numel() for p in model.parameters())
    assert torch.equal(flat[:12], model[0].weight.detach().reshape(-1))


def test_metrics_are_appended_as_json_lines_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    for start in (0, 3):  # a resumed peer appends to the same log
        writer = MetricsWriter(path, flush_every=2)
        for step in range(start, start + 3):
            writer.write({"step": step, "loss": 1.0 / (step + 1)})
        writer.close()
        writer.close()  # closing twice is harmless
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))


def test_dataset_cache_round_trip_through_the_atomic_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.standard_normal((6, 5)).astype(np.float32),
        "y": np.arange(6, dtype=np.int64),
        "x_test": rng.standard_normal((2, 5)).astype(np.float32),
        "y_test": np.arange(2, dtype=np.int64),
    }
    path = tmp_path / "cache" / "data.npz"
    _write_cache(path, arrays)
    read = _read_cache(path, features=5)
    assert read is not None and all(np.array_equal(read[k], arrays[k]) for k in arrays)
    assert leftovers(path.parent) == []
    path.write_bytes(b"not an npz")  # a corrupt cache is rebuilt, never a crash
    assert _read_cache(path, features=5) is None
