#!/usr/bin/env python3
"""Generate text from a GPT a peer trained: load its ``model.pt`` and continue a prompt.

    .venv/bin/python scripts/gpt_sample.py runs/gpt_tiny_ring4/p0 [--workload peers/gpt_tiny.py]
        [--prompt 'def '] [--tokens 500] [--temperature 0.8] [--seed 0] [--out sample.txt]

The first argument is a peer's output directory (its ``model.pt`` is used) or a ``.pt`` file
holding a ``state_dict``. ``--workload`` names the workload file the swarm trained, which fixes
the model size; a size mismatch is reported, not guessed around. The prompt and its continuation
are printed, and with ``--out`` also written as UTF-8 text (invalid bytes become U+FFFD).
Loading uses ``weights_only=True``: a model file is never a way to run code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from p2pdl.errors import WorkloadError
from p2pdl.train.gpt import SAMPLE_PROMPT, generate, write_sample
from p2pdl.train.workload import load_workload

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a peer's output directory, or a model .pt file")
    parser.add_argument("--workload", type=Path, default=REPO / "peers" / "gpt_tiny.py")
    parser.add_argument("--prompt", default=SAMPLE_PROMPT.decode(), help="text to continue (UTF-8)")
    parser.add_argument("--tokens", type=int, default=500, help="bytes to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely byte")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write the sample here")
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("--prompt must not be empty")
    if args.tokens < 0 or args.temperature < 0:
        parser.error("--tokens and --temperature must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.model / "model.pt" if args.model.is_dir() else args.model
    device = torch.device(args.device)
    try:
        model = load_workload(args.workload).build_model()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, WorkloadError, RuntimeError) as exc:
        # RuntimeError: load_state_dict's missing/unexpected keys and shape mismatches.
        print(f"gpt_sample: cannot load {path} into {args.workload}: {exc}", file=sys.stderr)
        return 2
    model.to(device)
    prompt = args.prompt.encode("utf-8")
    if args.out is not None:
        text = write_sample(
            model,
            args.out,
            device,
            prompt=prompt,
            max_new_tokens=args.tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
    else:
        continuation = generate(model, prompt, args.tokens, args.temperature, device, args.seed)
        text = (prompt + continuation).decode("utf-8", errors="replace")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
