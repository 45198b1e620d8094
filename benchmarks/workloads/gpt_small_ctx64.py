"""The small byte-level GPT (6 layers, 384 wide, 6 heads) with a 64-byte context, for CPU benchmarks.

``peers/gpt_small.py``'s model with its context cut from 256 to 64 bytes (10,770,432 parameters:
only the positional table shrinks) and a validation set of 32 windows instead of 64. A training
step then costs a quarter of the compute for the same batch size, and an evaluation a sixteenth,
so that four peers on a two-core machine train a few hundred steps of the ~10M model in minutes
(``benchmarks/gpt_peers.py``). Trade-off: a model that sees 64 bytes of context reaches a higher
loss than one that sees 256, and the smaller validation set is a noisier estimate; both are the
same for every system a benchmark compares.
"""

from __future__ import annotations

from dataclasses import replace

from p2pdl.train.gpt import SMALL, GPTWorkload

DESCRIPTION = "byte-level GPT, small with a 64-byte context (10,770,432 params), Python stdlib source"

_workload = GPTWorkload(replace(SMALL, name="small-ctx64", context=64, eval_windows=32))
build_model = _workload.build_model
load_shard = _workload.load_shard
loss_fn = _workload.loss_fn
evaluate = _workload.evaluate
