"""A byte-level, decoder-only GPT and the workload that trains it on a byte corpus.

The model is the GPT-2 shape as nanoGPT writes it: learned positional embeddings, pre-LayerNorm
blocks of causal self-attention (``scaled_dot_product_attention`` with ``is_causal=True``, so
torch picks a fused kernel and no mask is stored) and a 4x GELU MLP, a final LayerNorm, and an
output layer tied to the input embedding. The vocabulary is the 256 byte values: no tokenizer to
ship or agree on, at the price of sequences about four times longer than with BPE.

Sizes are frozen :class:`GPTConfig` values (:data:`TINY` for tests, :data:`SMALL` for
benchmarks); a workload file picks one by building a :class:`GPTWorkload` (``peers/gpt_tiny.py``,
``peers/gpt_small.py``), since a config names a workload file and nothing more.

Data (see :mod:`p2pdl.train.corpus`): shard ``i`` of ``n`` is a fixed number of windows drawn
deterministically from the ``i``-th contiguous ``1/n`` slice of the training bytes, so peers
read disjoint text and a peer's memory holds only its windows, not the corpus. Evaluation scores
a fixed, evenly spaced set of validation windows: loss, perplexity, bits per byte, and next-byte
accuracy as ``test_accuracy``.

Sampling: :func:`generate` and :func:`write_sample`; :meth:`GPTWorkload.sample` is the workload's
end-of-run hook (a seeded continuation of :data:`SAMPLE_PROMPT`, which the loop writes to
``OUT/sample.txt``), and ``scripts/gpt_sample.py`` samples from a peer's ``model.pt`` afterwards.
The headline metric is the validation loss, ``val_loss`` (lower is better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from p2pdl.errors import WorkloadError
from p2pdl.train.corpus import Corpus, load_corpus
from p2pdl.train.files import atomic_write_text

__all__ = [
    "GPT",
    "HEADLINE",
    "SAMPLE_PROMPT",
    "SIZES",
    "SMALL",
    "TINY",
    "GPTConfig",
    "GPTWorkload",
    "generate",
    "write_sample",
]

VOCAB = 256
SAMPLE_PROMPT = b"def "
_WINDOW_SEED = 0x6770_7400  # separates the window draw from any other seeded stream
HEADLINE = ("val_loss", "min")
_SAMPLE_BYTES = 200
_EVAL_CHUNK = 16  # validation windows per forward: bounds the (B, heads, T, T) attention memory


@dataclass(frozen=True, kw_only=True, slots=True)
class GPTConfig:
    """One model size and how much data a peer holds for it."""

    name: str
    layers: int
    width: int  # embedding and residual width
    heads: int  # attention heads; width / heads is the head size
    context: int  # bytes per window (the longest sequence the model sees)
    shard_windows: int  # training windows ``load_shard`` returns per shard
    eval_windows: int = 64  # validation windows ``evaluate`` scores

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("layers", "width", "heads", "context", "shard_windows", "eval_windows")
            if getattr(self, name) < 1
        ]
        if self.heads >= 1 and self.width % self.heads:
            problems.append(f"width {self.width} is not a multiple of heads {self.heads}")
        if problems:
            raise ValueError(f"GPTConfig {self.name!r}: " + "; ".join(problems))


# 834,304 parameters; a step on a batch of 16 costs milliseconds on one CPU core.
TINY = GPTConfig(name="tiny", layers=4, width=128, heads=4, context=64, shard_windows=4096)
# 10,844,160 parameters: nanoGPT's shakespeare-char shape (with biases).
SMALL = GPTConfig(name="small", layers=6, width=384, heads=6, context=256, shard_windows=8192)
SIZES = {config.name: config for config in (TINY, SMALL)}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        # (B, T, 3C) -> three (B, heads, T, C / heads)
        q, k, v = (
            part.view(batch, time, self.heads, width // self.heads).transpose(1, 2)
            for part in self.qkv(x).split(width, dim=2)
        )
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.proj(attended.transpose(1, 2).contiguous().view(batch, time, width))
        return out


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(config.width)
        self.attention = CausalSelfAttention(config)
        self.norm_mlp = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, 4 * config.width),
            nn.GELU(),
            nn.Linear(4 * config.width, config.width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_attention(x))
        out: torch.Tensor = x + self.mlp(self.norm_mlp(x))
        return out


class GPT(nn.Module):
    """Byte-level GPT: ``(B, T)`` int64 bytes -> ``(B, T, 256)`` next-byte logits, ``T <= context``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(VOCAB, config.width)
        self.position_embedding = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * layers) so its variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attention.proj.weight, mean=0.0, std=residual_std)
            last = block.mlp[2]
            assert isinstance(last, nn.Linear)
            nn.init.normal_(last.weight, mean=0.0, std=residual_std)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final normalised hidden states, ``(B, T, width)``."""
        time = tokens.shape[1]
        if time > self.config.context:
            raise ValueError(f"sequence of {time} bytes exceeds the context of {self.config.context}")
        positions = torch.arange(time, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.norm(x)
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Tied output layer: the logits are similarities with the input embeddings.
        return functional.linear(self.hidden(tokens), self.token_embedding.weight)


def _as_gpt(model: nn.Module) -> GPT:
    if not isinstance(model, GPT):
        raise TypeError(f"expected a GPT, got {type(model).__name__}")
    return model


def generate(
    model: nn.Module,
    prompt: bytes,
    max_new_tokens: int,
    temperature: float,
    device: torch.device,
    seed: int,
) -> bytes:
    """``max_new_tokens`` bytes continuing ``prompt``, sampled at ``temperature`` (0: greedy).

    Reproducible for a given ``seed`` and device; the model's train/eval mode is restored.
    """
    gpt = _as_gpt(model)
    if not prompt:
        raise ValueError("the prompt must hold at least one byte")
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError(f"need max_new_tokens >= 0 and temperature >= 0, got {max_new_tokens}, {temperature}")
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([list(prompt)], dtype=torch.int64, device=device)  # (1, len(prompt))
    was_training = gpt.training
    gpt.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = gpt(tokens[:, -gpt.config.context :])[:, -1, :]  # (1, 256)
                if temperature == 0:
                    following = logits.argmax(dim=-1, keepdim=True)
                else:
                    probabilities = torch.softmax(logits / temperature, dim=-1)
                    following = torch.multinomial(probabilities, 1, generator=generator)
                tokens = torch.cat([tokens, following], dim=1)
    finally:
        gpt.train(was_training)
    return bytes(tokens[0, len(prompt) :].tolist())


def write_sample(
    model: nn.Module,
    out_path: Path,
    device: torch.device,
    *,
    prompt: bytes = SAMPLE_PROMPT,
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """Generate from ``prompt`` and write prompt plus continuation to ``out_path`` as UTF-8 text.

    Bytes that are not valid UTF-8 become U+FFFD. Returns the text written.
    """
    text = (prompt + generate(model, prompt, max_new_tokens, temperature, device, seed)).decode(
        "utf-8", errors="replace"
    )
    atomic_write_text(out_path, text)
    return text


def _windows(data: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """Rows ``data[s : s + length]`` for each start, as a ``(len(starts), length)`` int64 tensor."""
    rows = np.asarray(data[starts[:, None] + np.arange(length)], dtype=np.int64)
    return torch.from_numpy(rows)


class GPTWorkload:
    """The four workload functions for one :class:`GPTConfig`, bound methods of one instance.

    The corpus is loaded on first use and kept per ``P2PDL_GPT_TEXT`` value; validation windows
    are kept per device.
    """

    def __init__(self, config: GPTConfig) -> None:
        self.config = config
        self._corpus: Corpus | None = None
        self._validation: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus()
        return self._corpus

    def build_model(self) -> nn.Module:
        return GPT(self.config)

    def load_shard(self, shard_index: int, shard_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``shard_windows`` windows from the shard's slice: inputs and targets ``(N, context)`` int64.

        Targets are the inputs shifted by one byte; both are views of one ``(N, context + 1)``
        tensor, so a shard costs ``N * (context + 1) * 8`` bytes.
        """
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(f"bad shard request: index {shard_index} of {shard_count}")
        train = self.corpus().train
        length = self.config.context + 1
        low, high = len(train) * shard_index // shard_count, len(train) * (shard_index + 1) // shard_count
        if high - low < length:
            raise WorkloadError(
                f"corpus {self.corpus().source}: shard {shard_index} of {shard_count} holds {high - low} "
                f"training bytes, fewer than one window of {length}"
            )
        rng = np.random.default_rng([_WINDOW_SEED, shard_index, shard_count])
        starts = rng.integers(low, high - length + 1, size=self.config.shard_windows)
        windows = _windows(train, starts, length)
        return windows[:, :-1], windows[:, 1:]

    @staticmethod
    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every position: ``output`` (B, T, 256), ``target`` (B, T)."""
        return functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    def _validation_set(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._validation:
            val = self.corpus().val
            length = self.config.context + 1
            if len(val) < length:
                raise WorkloadError(
                    f"corpus {self.corpus().source}: {len(val)} validation bytes, fewer than one window of {length}"
                )
            starts = np.linspace(0, len(val) - length, self.config.eval_windows).astype(np.int64)
            windows = _windows(val, starts, length).to(device)
            self._validation[key] = (windows[:, :-1], windows[:, 1:])
        return self._validation[key]

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation ``val_loss`` (nats per byte; also as ``test_loss``), ``perplexity``, ``bits_per_byte``, and
        ``test_accuracy``: the fraction of positions whose most likely next byte is the right one."""
        inputs, targets = self._validation_set(device)
        total_loss, correct = 0.0, 0
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for begin in range(0, len(inputs), _EVAL_CHUNK):
                    chunk, expected = inputs[begin : begin + _EVAL_CHUNK], targets[begin : begin + _EVAL_CHUNK]
                    logits = model(chunk)
                    total_loss += functional.cross_entropy(
                        logits.reshape(-1, VOCAB), expected.reshape(-1), reduction="sum"
                    ).item()
                    correct += int((logits.argmax(dim=-1) == expected).sum().item())
        finally:
            model.train(was_training)
        positions = targets.numel()
        test_loss = total_loss / positions
        return {
            "val_loss": test_loss,
            "test_loss": test_loss,
            "test_accuracy": correct / positions,
            "perplexity": math.exp(test_loss),
            "bits_per_byte": test_loss / math.log(2),
        }

    def sample(self, model: nn.Module, device: torch.device) -> str:
        """The end-of-run sample: :data:`SAMPLE_PROMPT` and a continuation sampled at temperature
        0.8 with seed 0, as text.

        Seeded, so peers holding the same parameters on the same kind of device write the same
        text; sampled rather than greedy, because a greedy byte model early in training repeats
        one byte. Generation runs in the parameters' dtype.
        """
        continuation = generate(model, SAMPLE_PROMPT, _SAMPLE_BYTES, 0.8, device, seed=0)
        return (SAMPLE_PROMPT + continuation).decode("utf-8", errors="replace")
