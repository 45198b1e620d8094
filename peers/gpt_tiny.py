"""Byte-level GPT, tiny (4 layers, 128 wide, 4 heads, 64-byte context; 834,304 parameters).

Trains on the Python standard library's source (or ``$P2PDL_GPT_TEXT``); small enough for
tests and for a four-peer demo on a laptop CPU. The model, corpus and metrics live in
:mod:`p2pdl.train.gpt` and :mod:`p2pdl.train.corpus`. ``generate`` and ``write_sample`` are
exported for ``scripts/gpt_sample.py``; ``sample`` writes each peer's ``OUT/sample.txt`` at the
end of a run, and ``HEADLINE`` makes the validation loss the metric a swarm view shows.
"""

from __future__ import annotations

from p2pdl.train.gpt import HEADLINE, TINY, GPTWorkload, generate, write_sample

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

DESCRIPTION = "byte-level GPT, tiny (834,304 params), Python stdlib source, next-byte cross-entropy"

_workload = GPTWorkload(TINY)
build_model = _workload.build_model
load_shard = _workload.load_shard
loss_fn = _workload.loss_fn
evaluate = _workload.evaluate
sample = _workload.sample  # written to OUT/sample.txt at the end of a run
