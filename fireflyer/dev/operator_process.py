"""The operator from this checkout as a separate process against a dev cluster (demo, tests,
benchmarks): standalone, no metrics or health ports, output appended to a log file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

COMMAND = [
    sys.executable,
    "-m",
    "fireflyer.cli",
    "operator",
    "--standalone",
    "--metrics-port",
    "0",
    "--health-port",
    "0",
]


def start(kubeconfig: Path, log: Path, detach: bool = False) -> subprocess.Popen[bytes]:
    """detach: the process outlives the caller (its own session), as `fireflyer demo` needs."""
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            COMMAND,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=detach,
        )
