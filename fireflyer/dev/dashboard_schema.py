"""Check Grafana dashboards against Grafana's dashboard schema.

The checker is a small Go program (hack/dashboard-validate) on the Grafana Foundation SDK, whose
types are generated from Grafana's own dashboard, panel-plugin and query schemas. It is built
once into the same version-keyed cache as the control-plane binaries.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fireflyer.dev.build import REPO_ROOT, BuildError, cache_root

VALIDATOR_MODULE = REPO_ROOT / "hack" / "dashboard-validate"
VALIDATOR = "dashboard-validate"
FOUNDATION_SDK_VERSION = "v0.0.22"  # github.com/grafana/grafana-foundation-sdk/go, pinned in go.mod
DASHBOARDS_DIR = REPO_ROOT / "charts" / "fireflyer" / "dashboards"


def validator_key() -> str:
    """The SDK version plus the module's sources: any change builds a fresh binary."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((VALIDATOR_MODULE / name).read_bytes())
    return f"{VALIDATOR}_grafana-foundation-sdk-{FOUNDATION_SDK_VERSION}_{digest.hexdigest()[:12]}"


def validator_path() -> Path:
    return cache_root() / validator_key() / VALIDATOR


def ensure_validator() -> Path:
    """Return the validator binary, building it first if the cache lacks it."""
    out = validator_path()
    if out.is_file():
        return out
    go = shutil.which("go")
    if go is None:
        raise BuildError(f"the Go toolchain is not on PATH: install Go 1.26 or newer to build {VALIDATOR}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(VALIDATOR + ".partial")
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false")
    started = time.monotonic()
    print(f"building {VALIDATOR} (Grafana Foundation SDK {FOUNDATION_SDK_VERSION})", file=sys.stderr)
    result = subprocess.run(
        [go, "build", "-ldflags", "-s -w", "-o", str(partial), "."],
        cwd=VALIDATOR_MODULE,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise BuildError(f"building {VALIDATOR} failed:\n{result.stderr[-4000:]}")
    os.replace(partial, out)
    print(f"built {VALIDATOR} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return out


def dashboard_files(directory: Path = DASHBOARDS_DIR) -> list[Path]:
    return sorted(directory.glob("*.json"))


def validate(paths: list[Path]) -> list[str]:
    """Problems found, one `FILE: PATH.IN.JSON: message` line each; empty when all pass."""
    if not paths:
        return []
    result = subprocess.run([str(ensure_validator()), *map(str, paths)], capture_output=True, text=True)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"{VALIDATOR} failed: {result.stderr.strip()}")
    return result.stdout.splitlines()
