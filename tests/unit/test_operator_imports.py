"""The operator's image has no torch: neither the CLI nor any operator module may import the
workloads' heavy dependencies (checked in a fresh interpreter, so earlier imports do not hide it)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "fastapi", "uvicorn", "triton", "safetensors", "tokenizers", "transformers")

PROBE = f"""
import importlib, pkgutil, sys
import fireflyer.cli, fireflyer.operator
fireflyer.cli.build_parser()
for module in pkgutil.walk_packages(fireflyer.operator.__path__, "fireflyer.operator."):
    importlib.import_module(module.name)
print(",".join(sorted(name for name in {HEAVY!r} if name in sys.modules)))
"""


def test_cli_and_operator_modules_import_no_workload_dependency() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"
