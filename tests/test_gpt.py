"""The byte-level GPT workload: model invariants, the byte corpus and its cache, shards,
evaluation, sampling, and two in-process peers training it.

Tests that need real text read the stdlib corpus from the session's shared cache (built once,
about a second); tests of the cache itself use their own cache dir and a small text file through
``P2PDL_GPT_TEXT``. Every model here is the tiny GPT on one torch thread.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pdl import Peer
from p2pdl.config import config_from_mapping
from p2pdl.errors import WorkloadError
from p2pdl.train import corpus as corpus_module
from p2pdl.train.checkpoints import save_model
from p2pdl.train.corpus import (
    SEPARATOR,
    TEXT_ENV,
    VALIDATION_PERCENT,
    is_validation_file,
    load_corpus,
    split_files,
    stdlib_sources,
    text_sources,
)
from p2pdl.train.gpt import GPT, SMALL, TINY, GPTConfig, GPTWorkload, generate, write_sample
from p2pdl.train.workload import load_workload

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "peers"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def stdlib_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default corpus, whatever the environment running the tests says."""
    monkeypatch.delenv(TEXT_ENV, raising=False)


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("P2PDL_CACHE_DIR", str(cache))
    return cache


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the model


def test_shapes_and_context_limit() -> None:
    model = tiny_model()
    tokens = torch.randint(0, 256, (3, TINY.context))
    assert model(tokens).shape == (3, TINY.context, 256)
    assert model(tokens[:, :5]).shape == (3, 5, 256)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.randint(0, 256, (1, TINY.context + 1)))


def test_a_future_byte_never_changes_earlier_logits() -> None:
    model = tiny_model().eval()
    tokens = torch.randint(0, 256, (2, TINY.context), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(tokens)
        for position in (0, 17, TINY.context - 1):
            changed = tokens.clone()
            changed[:, position] = (changed[:, position] + 1) % 256
            logits = model(changed)
            torch.testing.assert_close(logits[:, :position], base[:, :position], rtol=0, atol=1e-6)
            # The changed byte itself is seen from its own position on.
            assert not torch.allclose(logits[:, position], base[:, position])


def test_output_layer_is_tied_to_the_input_embedding() -> None:
    model = tiny_model()
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(tokens), model.hidden(tokens) @ model.token_embedding.weight.T)
    vocab_shaped = [name for name, p in model.named_parameters() if p.shape == (256, TINY.width)]
    assert vocab_shaped == ["token_embedding.weight"]
    assert not any("lm_head" in key or "output" in key for key in model.state_dict())


def test_parameter_counts() -> None:
    def expected(config: GPTConfig) -> int:
        width = config.width
        per_block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width)
        per_block += (4 * width * width + 4 * width) + (4 * width * width + width)
        return 256 * width + config.context * width + config.layers * per_block + 2 * width

    tiny = tiny_model()
    assert param_count(tiny) == expected(TINY) == 834_304 < 1_000_000
    torch.manual_seed(0)
    assert param_count(GPT(SMALL)) == expected(SMALL) == 10_844_160


def test_workload_files_build_their_size_identically_under_one_seed() -> None:
    for filename, size in (("gpt_tiny.py", 834_304), ("gpt_small.py", 10_844_160)):
        loaded = load_workload(PEERS / filename)
        assert loaded.description
        torch.manual_seed(3)
        first = loaded.build_model()
        assert param_count(first) == size
        if size < 1_000_000:
            torch.manual_seed(3)
            second = loaded.build_model().state_dict()
            assert all(torch.equal(value, second[key]) for key, value in first.state_dict().items())


def test_bad_gpt_config_lists_every_problem() -> None:
    with pytest.raises(ValueError, match=r"layers must be >= 1.*not a multiple of heads"):
        GPTConfig(name="bad", layers=0, width=100, heads=3, context=8, shard_windows=4)


# --------------------------------------------------------------------------- the corpus


def test_stdlib_split_is_deterministic_and_disjoint_by_file(stdlib_text: None) -> None:
    sources = stdlib_sources()
    assert sources.relative == stdlib_sources().relative == tuple(sorted(sources.relative))
    assert all(name.endswith(".py") for name in sources.relative)
    skipped = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    assert not any(skipped.intersection(name.split("/")[:-1]) for name in sources.relative)
    train, val = split_files(sources.relative)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(sources.relative)
    assert 0.5 * VALIDATION_PERCENT < 100 * len(val) / len(sources.relative) < 2 * VALIDATION_PERCENT
    # A file's side depends on its own path only.
    assert split_files(tuple(reversed(sources.relative)))[1] == list(reversed(val))
    assert all(is_validation_file(name) for name in val)

    corpus = load_corpus()
    assert (corpus.train_files, corpus.val_files) == (len(train), len(val))
    # Exactly the validation files' bytes, joined by one separator each.
    val_bytes = sum((sources.root / name).stat().st_size for name in val) + len(val) - 1
    assert len(corpus.val) == val_bytes
    first = (sources.root / val[0]).read_bytes()
    assert bytes(corpus.val[: len(first) + 1]) == first + SEPARATOR
    assert corpus.train.dtype == np.uint8 and len(corpus.train) > 10 * len(corpus.val)


def test_corpus_is_built_once_then_memory_mapped(
    tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = tmp_path / "novel.txt"
    text.write_bytes(b"It was a dark and stormy night. " * 200)
    monkeypatch.setenv(TEXT_ENV, str(text))
    builds = []
    real_build = corpus_module._build

    def counting_build(sources: object) -> object:
        builds.append(sources)
        return real_build(sources)  # type: ignore[arg-type]

    monkeypatch.setattr(corpus_module, "_build", counting_build)
    first = load_corpus()
    assert len(builds) == 1
    assert len(list(own_cache.glob("corpus-*.train.npy"))) == 1
    second = load_corpus()
    assert len(builds) == 1, "the second load must read the cache, not rebuild"
    assert isinstance(second.train, np.memmap) and isinstance(second.val, np.memmap)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    # One file: the last 5% of its bytes are held out.
    assert len(second.val) == len(text.read_bytes()) * VALIDATION_PERCENT // 100
    assert (second.train_files, second.val_files) == (1, 0)

    # A changed file gets a new key and a rebuild.
    text.write_bytes(b"Call me Ishmael. " * 300)
    third = load_corpus()
    assert len(builds) == 2 and bytes(third.train[:16]) == b"Call me Ishmael."
    assert len(list(own_cache.glob("corpus-*.train.npy"))) == 2

    # A corrupt cache file is rebuilt, never trusted. It is replaced, not truncated in place:
    # `third` still maps the old file, and so would any peer that loaded it (p2pdl's own writes
    # are atomic renames for the same reason).
    expected = np.array(third.train)
    for path in own_cache.glob("corpus-*.train.npy"):
        path.unlink()
        path.write_bytes(b"not an array")
    assert np.array_equal(load_corpus().train, expected)
    assert len(builds) == 3


def test_text_sources_file_directory_and_glob(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n")
    (folder / "sub" / "b.md").write_text("beta\n")
    (folder / ".hidden").write_text("secret\n")
    assert text_sources(str(folder)).relative == ("a.txt", "sub/b.md")
    assert text_sources(str(folder / "a.txt")).relative == ("a.txt",)
    assert text_sources(str(folder / "**" / "*.md")).relative == ("b.md",)


def test_text_corpus_feeds_the_workload(tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = tmp_path / "poem.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog\n" * 100)
    monkeypatch.setenv(TEXT_ENV, str(text))
    workload = GPTWorkload(GPTConfig(name="t", layers=1, width=16, heads=2, context=16, shard_windows=32))
    inputs, _ = workload.load_shard(0, 1)
    assert set(bytes(inputs.flatten().to(torch.uint8).tolist())) <= set(text.read_bytes())
    assert np.isfinite(workload.evaluate(workload.build_model(), CPU)["test_loss"])


@pytest.mark.parametrize("spec", ["missing.txt", "missing_dir/*.txt", "empty"])
def test_bad_text_path_is_a_workload_error_naming_it(
    spec: str, tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty").write_bytes(b"")
    monkeypatch.setenv(TEXT_ENV, str(tmp_path / spec))
    with pytest.raises(WorkloadError, match=re.escape(f"{TEXT_ENV}={tmp_path / spec}")):
        load_corpus()
    # Through the workload file as the train loop calls it, too.
    with pytest.raises(WorkloadError, match=TEXT_ENV):
        load_workload(PEERS / "gpt_tiny.py").load_shard(0, 1)


# --------------------------------------------------------------------------- shards and training


def test_load_shard_windows(stdlib_text: None) -> None:
    workload = load_workload(PEERS / "gpt_tiny.py")
    inputs, targets = workload.load_shard(0, 4)
    assert inputs.shape == targets.shape == (TINY.shard_windows, TINY.context)
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.device.type == "cpu"
    assert int(inputs.min()) >= 0 and int(inputs.max()) <= 255
    assert torch.equal(inputs[:, 1:], targets[:, :-1]), "targets are the inputs shifted by one byte"
    again_inputs, again_targets = workload.load_shard(0, 4)
    assert torch.equal(inputs, again_inputs) and torch.equal(targets, again_targets)
    other_inputs, _ = workload.load_shard(1, 4)
    assert not torch.equal(inputs, other_inputs)
    with pytest.raises(ValueError, match="bad shard request"):
        workload.load_shard(4, 4)


def test_each_shard_reads_only_its_own_slice(tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One 20,000-byte file: training is its first 19,000 bytes, so shard 0 of 2 is the 'a' run
    # [0, 9500) and shard 1 the 'b' run [9500, 19000).
    text = tmp_path / "ab.txt"
    text.write_bytes(b"a" * 9_500 + b"b" * 10_500)
    monkeypatch.setenv(TEXT_ENV, str(text))
    workload = GPTWorkload(GPTConfig(name="t", layers=1, width=16, heads=2, context=32, shard_windows=256))
    first, _ = workload.load_shard(0, 2)
    second, second_targets = workload.load_shard(1, 2)
    assert set(first.unique().tolist()) == {ord("a")}
    assert set(second.unique().tolist()) | set(second_targets.unique().tolist()) == {ord("b")}


def test_tiny_gpt_training_loss_falls_with_adam(stdlib_text: None) -> None:
    workload = GPTWorkload(TINY)
    inputs, targets = workload.load_shard(0, 4)
    model = tiny_model()
    before = workload.evaluate(model, CPU)["test_loss"]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        batch = torch.randint(0, len(inputs), (8,), generator=generator)
        loss = workload.loss_fn(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Uniform guessing over 256 bytes costs ln 256 = 5.55 nats; learning byte frequencies alone
    # takes it well below 4.5.
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert workload.evaluate(model, CPU)["test_loss"] < before - 1.0


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_reports_finite_metrics_and_restores_mode(stdlib_text: None, training: bool) -> None:
    workload = load_workload(PEERS / "gpt_tiny.py")
    model = tiny_model().train(training)
    metrics = workload.evaluate(model, CPU)
    assert model.training is training
    assert {"test_loss", "test_accuracy", "perplexity", "bits_per_byte"} <= metrics.keys()
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    # An untrained model is close to uniform over the 256 bytes.
    assert abs(metrics["test_loss"] - math.log(256)) < 0.5
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert all(p.grad is None for p in model.parameters())
    assert workload.evaluate(model, CPU) == metrics, "the validation windows are fixed"


# --------------------------------------------------------------------------- sampling


def test_generate_returns_the_requested_bytes_reproducibly() -> None:
    model = tiny_model().train()
    sample = generate(model, b"def ", 40, 0.8, CPU, seed=5)
    assert isinstance(sample, bytes) and len(sample) == 40
    assert generate(model, b"def ", 40, 0.8, CPU, seed=5) == sample
    assert generate(model, b"def ", 40, 0.8, CPU, seed=6) != sample
    assert generate(model, b"def ", 10, 0.0, CPU, seed=1) == generate(model, b"def ", 10, 0.0, CPU, seed=2)
    # A prompt longer than the context is cut to its last `context` bytes.
    assert len(generate(model, b"x" * (TINY.context + 30), 5, 1.0, CPU, seed=0)) == 5
    assert model.training
    with pytest.raises(ValueError, match="prompt"):
        generate(model, b"", 5, 1.0, CPU, seed=0)


def test_write_sample_writes_text(tmp_path: Path) -> None:
    out = tmp_path / "sample.txt"
    text = write_sample(tiny_model(), out, CPU, max_new_tokens=60)
    written = out.read_bytes().decode("utf-8", errors="replace")
    assert written == text and written.startswith("def ") and len(written) > len("def ")


def test_sample_script_loads_a_peer_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("gpt_sample_script", REPO / "scripts" / "gpt_sample.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    peer_dir = tmp_path / "p0"
    peer_dir.mkdir()
    save_model(tiny_model(), peer_dir / "model.pt")
    out = tmp_path / "sample.txt"
    assert script.main([str(peer_dir), "--prompt", "import ", "--tokens", "30", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").startswith("import ")
    assert capsys.readouterr().out.startswith("import ")
    # The wrong size is refused with a message, not a traceback.
    assert script.main([str(peer_dir), "--workload", str(PEERS / "gpt_small.py")]) == 2
    assert "cannot load" in capsys.readouterr().err


# --------------------------------------------------------------------------- two peers


async def test_two_gossiping_peers_lower_validation_loss(stdlib_text: None) -> None:
    config = config_from_mapping(
        {
            "run": {"workload": str(PEERS / "gpt_tiny.py"), "optimizer": "adam", "lr": 3e-3},
            "strategy": {"kind": "gossip", "round_timeout": 10.0},
            "topology": {"kind": "ring"},
            "transport": {"startup_timeout": 10.0},
            "peers": [{"name": "a", "address": "127.0.0.1:0"}, {"name": "b", "address": "127.0.0.1:0"}],
        }
    )
    workload = GPTWorkload(TINY)
    models = {name: tiny_model() for name in ("a", "b")}
    before = workload.evaluate(models["a"], CPU)["test_loss"]
    b = Peer(config, "b", models["b"], torch.optim.Adam(models["b"].parameters(), lr=3e-3))
    port_b = await b.transport.start()
    a = Peer(
        config,
        "a",
        models["a"],
        torch.optim.Adam(models["a"].parameters(), lr=3e-3),
        bootstrap=(f"127.0.0.1:{port_b}",),
    )

    async def train(peer: Peer, shard: int) -> int:
        inputs, targets = workload.load_shard(shard, 2)
        model, complete = peer.model, 0
        for step in range(20):
            x, y = inputs[step * 8 : (step + 1) * 8], targets[step * 8 : (step + 1) * 8]

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = workload.loss_fn(model(x), y)
                loss.backward()
                return loss

            result = await peer.step(closure)
            complete += result.parameter_round is not None and result.parameter_round.complete
        return complete

    try:
        await asyncio.gather(a.start(), b.start())  # each waits to link the other
        rounds = await asyncio.gather(train(a, 0), train(b, 1))
    finally:
        await asyncio.gather(a.close(), b.close())
    assert min(rounds) >= 15, rounds
    for model in models.values():
        assert workload.evaluate(model, CPU)["test_loss"] < before - 0.5
