"""Byte-level GPT, small (6 layers, 384 wide, 6 heads, 256-byte context; 10,844,160 parameters).

nanoGPT's shakespeare-char shape, trained on the Python standard library's source (or
``$P2PDL_GPT_TEXT``); for benchmarks, on a GPU or with patience. The model, corpus and metrics
live in :mod:`p2pdl.train.gpt` and :mod:`p2pdl.train.corpus`. ``generate`` and ``write_sample``
are exported for ``scripts/gpt_sample.py``; ``sample`` writes each peer's ``OUT/sample.txt``
and ``HEADLINE`` makes the validation loss the metric a swarm view shows.
"""

from __future__ import annotations

from p2pdl.train.gpt import HEADLINE, SMALL, GPTWorkload, generate, write_sample

__all__ = [
    "DESCRIPTION",
    "HEADLINE",
    "build_model",
    "evaluate",
    "generate",
    "load_shard",
    "loss_fn",
    "sample",
    "write_sample",
]

DESCRIPTION = "byte-level GPT, small (10,844,160 params), Python stdlib source, next-byte cross-entropy"

_workload = GPTWorkload(SMALL)
build_model = _workload.build_model
load_shard = _workload.load_shard
loss_fn = _workload.loss_fn
evaluate = _workload.evaluate
sample = _workload.sample  # written to OUT/sample.txt at the end of a run
