"""Running a kernel script under Triton's interpreter (TRITON_INTERPRET=1 must be set before
triton is imported, so each script runs as its own process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(module: str, timeout: float = 300) -> dict[str, float]:
    """Run `python -m module` with the interpreter on; → the `name=value` numbers it prints."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {key: float(value) for key, value in (item.split("=") for item in result.stdout.split())}
