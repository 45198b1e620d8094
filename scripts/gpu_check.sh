#!/usr/bin/env bash
# One short check for a lent GPU machine: the CUDA-marked tests, the exchange benchmark with
# the gradient on the device, then GPT tokens/s (plain PyTorch, one peer, two peers sharing the GPU).
# Run from the repository root; results land in $OUT when it is set.
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
export MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 PYTHONUNBUFFERED=1
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch
  .venv/bin/pip install -q -e '.[dev]'
fi
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')" | tee "$out/device.txt"
.venv/bin/python -m pytest -m cuda -p no:cacheprovider -q tests/test_cuda.py tests/test_aggregation.py 2>&1 | tee "$out/cuda_tests.txt"
.venv/bin/python benchmarks/exchange.py --peers 2 4 --rounds 10 --out "$out/exchange_gpu.json" 2>&1 | tee "$out/exchange.txt"
# The GPT on CUDA: tokens per second for plain PyTorch, one p2pdl peer and two peers sharing the GPU.
.venv/bin/python benchmarks/gpt_throughput.py --device cuda --workload small --steps 60 \
  --out "$out/gpt_throughput" --results "$out/gpt_throughput_cuda.json" 2>&1 | tee "$out/gpt_throughput.txt"
