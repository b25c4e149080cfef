"""Pod networking of the local runtime: one Linux bridge per dev cluster, one network namespace
per pod joined to it by a veth pair, so that every pod has its own address and ports (two pods
can both listen on 0.0.0.0:30000) and this machine reaches each pod at its address."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


class NetworkError(RuntimeError):
    """The pod network could not be set up; the message says what to do."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def require_privileges() -> None:
    """Network and mount namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN: root."""
    if os.geteuid() != 0:
        raise NetworkError(
            "the local pod runtime needs root (it creates a network namespace and a mount "
            "namespace per pod); run it as root, or start the dev cluster without --local-nodes"
        )
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise NetworkError(f"the local pod runtime needs the `{tool}` command (iproute2, util-linux)")


@dataclass(frozen=True)
class ClusterNetwork:
    """Names and addresses of one dev cluster's pod network, all derived from its index so that
    several dev clusters (a demo and a test run) coexist on one machine."""

    index: int

    @property
    def bridge(self) -> str:
        return f"ffbr{self.index}"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.{100 + self.index}.0.0/16")

    @property
    def host_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def netns_prefix(self) -> str:
        return f"ff{self.index}-"

    def netns(self, pod_uid: str) -> str:
        return f"{self.netns_prefix}{pod_uid[:12]}"

    def veth(self, pod_uid: str) -> str:
        return f"ffv{self.index}x{pod_uid[:8]}"[:15]

    def load_balancer_ip(self, n: int) -> str:
        """Load balancer addresses: loopback, reachable from this machine only."""
        return f"127.{100 + self.index}.{n // 250}.{n % 250 + 1}"


class PodNetwork:
    def __init__(self, cluster: ClusterNetwork) -> None:
        self.cluster = cluster
        self._lock = threading.Lock()
        self._next = 10  # .0.1 is the host; leave a few addresses for it
        self._used: set[str] = set()

    def ensure_bridge(self) -> None:
        c = self.cluster
        if _ip("link", "show", c.bridge, check=False).returncode != 0:
            _ip("link", "add", c.bridge, "type", "bridge")
        _ip("addr", "replace", f"{c.host_ip}/{c.subnet.prefixlen}", "dev", c.bridge)
        _ip("link", "set", c.bridge, "up")
        subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True)

    def _allocate(self) -> str:
        with self._lock:
            hosts = self.cluster.subnet.num_addresses - 2
            for _ in range(hosts):
                n, self._next = self._next, self._next + 1 if self._next + 1 < hosts else 10
                address = str(self.cluster.subnet.network_address + n)
                if address not in self._used:
                    self._used.add(address)
                    return address
        raise NetworkError(f"no free pod address left in {self.cluster.subnet}")

    def create(self, pod_uid: str) -> tuple[str, str]:
        """A namespace for the pod with loopback and eth0 up; returns (netns name, pod IP)."""
        c = self.cluster
        ns, veth = c.netns(pod_uid), c.veth(pod_uid)
        self.delete(pod_uid)  # a leftover of an earlier runtime
        address = self._allocate()
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", c.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{address}/{c.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", c.host_ip)
        return ns, address

    def release(self, address: str) -> None:
        with self._lock:
            self._used.discard(address)

    def delete(self, pod_uid: str) -> None:
        ns = self.cluster.netns(pod_uid)
        kill_namespace_processes(ns)
        _ip("netns", "delete", ns, check=False)
        _ip("link", "delete", self.cluster.veth(pod_uid), check=False)

    def teardown(self) -> None:
        """Every pod namespace of this cluster, every process in them, and the bridge."""
        listing = _ip("netns", "list", check=False).stdout.split()
        for name in listing:
            if name.startswith(self.cluster.netns_prefix):
                kill_namespace_processes(name)
                _ip("netns", "delete", name, check=False)
        _ip("link", "delete", self.cluster.bridge, check=False)


def namespace_pids(netns: str) -> list[int]:
    result = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in result.stdout.split() if p.isdigit()]


def kill_namespace_processes(netns: str) -> None:
    for pid in namespace_pids(netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
