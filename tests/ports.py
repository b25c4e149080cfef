"""Ports for the servers and rendezvous a test starts, picked below the kernel's ephemeral range.

A port found by binding port 0 comes from the ephemeral range, from which the kernel also takes
the source ports of outgoing connections: between the pick and the listen, a connection (a
rendezvous of an earlier scenario, say) may take it. A port below that range is handed out only
by explicit binds, so it stays free until its server listens.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below the dev cluster's ports (fireflyer.dev.cluster.DEFAULT_PORT_BASE, 26380 and up) and the
# test control planes' (tests.conftest.TEST_PORT_BASE, 27380 and up).
_LOWEST, _HIGHEST = 12000, 26000
_given: set[int] = set()
_random = random.SystemRandom()  # independent of any seed a test sets


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that is free now and is not one the kernel hands to outgoing connections."""
    highest = min(_HIGHEST, _ephemeral_low() - 1)
    if highest < _LOWEST:  # a machine whose ephemeral range starts this low: take one from it
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    for _ in range(500):
        port = _random.randint(_LOWEST, highest)
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_LOWEST}-{highest}")


def free_addr() -> str:
    return f"127.0.0.1:{free_port()}"
