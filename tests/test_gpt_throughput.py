"""The GPU-readiness benchmark of ``scripts/gpu_check.sh``, run on the CPU fallback.

``benchmarks/gpt_throughput.py`` is what a lent GPU machine runs; here it runs its three rows on
the CPU with the tiny GPT, so a broken launcher, config or rate computation fails in CI rather
than on a scarce GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpt_throughput_rows_on_cpu(tmp_path: Path) -> None:
    results = tmp_path / "gpt_throughput.json"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "268435456"}
    command = [
        sys.executable, "benchmarks/gpt_throughput.py", "--device", "cpu", "--workload", "tiny",
        "--steps", "14", "--warmup", "4", "--batch-size", "4",
        "--out", str(tmp_path / "runs"), "--results", str(results), "--timeout", "300",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(results.read_text())
    assert result["provenance"]["command"]
    rows = result["rows"]
    assert set(rows) == {"pytorch", "one_peer", "two_peers"}
    for row in rows.values():
        assert row["tokens_per_second"] > 0
    assert rows["pytorch"]["steps_measured"] == 10
    assert [p["steps_measured"] for p in rows["two_peers"]["per_peer"]] == [10, 10]
    assert rows["pytorch"]["vs_pytorch"] == 1.0
