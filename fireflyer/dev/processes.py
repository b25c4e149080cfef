"""Start, find and stop the control-plane processes that `fireflyer dev up` owns."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class PortBusyError(RuntimeError):
    """A port the dev cluster needs is already in use."""


def ensure_free(port: int, component: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise PortBusyError(
                f"port {port} on 127.0.0.1 (for {component}) is already in use; "
                f"stop what holds it or pick other ports with --port-base"
            ) from exc


def start(binary: Path, args: list[str], log_file: Path) -> int:
    """Start a detached process (its own session, so it outlives the CLI) logging to a file."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [str(binary), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid


def is_ours(pid: int, binary: str) -> bool:
    """True when pid is alive and still runs the binary we started (pids get reused)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return os.path.basename(exe.removesuffix(" (deleted)")) == os.path.basename(binary)


def exited_early(pid: int) -> bool:
    """Reap a child that already exited (when we are its parent) and report it."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")
    return waited == pid


def stop(pid: int, binary: str, grace: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after `grace` seconds. Returns True if it was running."""
    if not is_ours(pid, binary):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        exited_early(pid)
        if not is_ours(pid, binary):
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    exited_early(pid)
    return True
