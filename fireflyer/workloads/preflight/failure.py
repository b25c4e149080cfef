"""How a failed preflight is reported: one line that starts with `preflight failed:`, on stderr
and in the pod's termination message, so `kubectl describe pod` shows which rank and link failed.
Imports nothing heavy: the launcher reports with it before and without torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fireflyer.errors import FireflyerError

# Kubernetes' default terminationMessagePath; the kubelet reads at most 4096 bytes of it.
TERMINATION_LOG = Path("/dev/termination-log")
TERMINATION_LIMIT = 4096
EXIT_FAILED = 3


class PreflightError(FireflyerError):
    """A unit that must not serve: the message names the rank(s), their pods and the failed check."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail if detail.startswith("preflight failed:") else f"preflight failed: {detail}")


def write_termination_log(message: str, path: Path = TERMINATION_LOG) -> bool:
    """Writes the message where the kubelet picks it up; False when that file is not there (outside
    a pod) or not writable. Never creates the file: outside Kubernetes it is not ours to create."""
    if not path.exists() or not os.access(path, os.W_OK):
        return False
    data = message.encode()[:TERMINATION_LIMIT]
    try:
        with path.open("wb") as out:
            out.write(data)
    except OSError:
        return False
    return True


def report_failure(message: str, path: Path = TERMINATION_LOG) -> None:
    print(message, file=sys.stderr, flush=True)
    write_termination_log(message, path)


def exit_failed(message: str, path: Path = TERMINATION_LOG) -> None:
    """Reports and ends the process at once: for a rank stuck inside a collective, whose main
    thread cannot be interrupted, so the pod restarts instead of hanging."""
    report_failure(message, path)
    os._exit(EXIT_FAILED)
