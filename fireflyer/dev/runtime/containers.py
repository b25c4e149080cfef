"""One container as a process tree in the pod's namespaces, and its probes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for task in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return out


class ContainerProcess:
    """`ip netns exec NS unshare …` runs the sandbox as pid 1 of a new pid namespace; killing that
    pid 1 ends every process of the container."""

    def __init__(self, netns: str, spec: dict[str, Any], spec_path: Path, log_path: Path) -> None:
        spec_path.write_text(json.dumps(spec))
        previous = log_path.with_name(log_path.stem + ".previous.log")
        if log_path.exists():
            log_path.replace(previous)
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    "unshare",
                    "--mount",
                    "--uts",
                    "--pid",
                    "--fork",
                    "--propagation",
                    "private",
                    "--kill-child",
                    sys.executable,
                    "-m",
                    "fireflyer.dev.runtime.sandbox",
                    str(spec_path),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def init_pid(self) -> int | None:
        """The container's pid 1, as this machine numbers it."""
        children = _children(self.proc.pid)
        return children[0] if children else None

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code  # a signal shows as 128 + signo, like a shell

    def signal_term(self) -> None:
        """SIGTERM to the container's pid 1, if it still runs."""
        init = self.init_pid
        if init is not None and self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL to the container (unless it ended already); waits for it and returns its exit code."""
        if self.poll() is None:
            for pid in (self.init_pid, self.proc.pid):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("container process %d did not end after SIGKILL", self.proc.pid)
        code = self.poll()
        return 137 if code is None else code

    def stop(self, grace: float) -> int:
        """SIGTERM to the container's pid 1, then SIGKILL after the grace period."""
        self.signal_term()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.poll() is None:
            time.sleep(0.1)
        return self.kill()


def _port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"probe port {port!r} is not a named port of container {container.get('name')}")


def probe(
    probe_spec: Mapping[str, Any], container: Mapping[str, Any], pod_ip: str, init_pid: int | None
) -> bool:
    """One probe attempt, as a kubelet makes it: httpGet (2xx/3xx), tcpSocket, or exec in the
    container's namespaces (exit 0)."""
    timeout = float(probe_spec.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe_spec:
            get = probe_spec["httpGet"]
            host = get.get("host") or pod_ip
            scheme = get.get("scheme", "HTTP").lower()
            url = f"{scheme}://{host}:{_port(container, get['port'])}{get.get('path', '/')}"
            request = urllib.request.Request(
                url, headers={h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            )
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return 200 <= response.status < 400
        if "tcpSocket" in probe_spec:
            tcp = probe_spec["tcpSocket"]
            with socket.create_connection(
                (tcp.get("host") or pod_ip, _port(container, tcp["port"])), timeout=timeout
            ):
                return True
        if "exec" in probe_spec and init_pid is not None:
            command = probe_spec["exec"]["command"]
            enter = ["nsenter", "-t", str(init_pid), "-m", "-n", "-p", "-u", "-r", "-w", "--"]
            return (
                subprocess.run([*enter, *command], capture_output=True, timeout=max(timeout, 1)).returncode
                == 0
            )
    except (OSError, urllib.error.URLError, ValueError, subprocess.TimeoutExpired):
        return False
    return False
