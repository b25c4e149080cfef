"""The NVLink transport's Triton kernels, run on CPU: Triton's interpreter executes them for a
node's ranks simulated in one process (tests/unit/nvlink_node.py), so CI covers the fast path's
routing, peer writes, layouts and combine without GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_simulated_ranks_dispatch_and_combine_through_the_nvlink_kernels() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "tests.unit.nvlink_node"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every simulated rank received and combined what it should" in result.stdout
