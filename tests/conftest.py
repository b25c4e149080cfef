"""Shared fixtures: a session-scoped local control plane and a namespace per test."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fireflyer.dev import demo, operator_process
from tests.kube import Kube, fresh_namespace

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests run their own cluster beside a demo cluster that may be up on the default ports.
TEST_PORT_BASE = int(os.environ.get("FIREFLYER_TEST_PORT_BASE", "27380"))
# The operator under test checks 3FS health every 2 s instead of every minute.
os.environ.setdefault("FIREFLYER_THREEFS_HEALTH_SECONDS", "2")


def _cluster(tmp_path_factory: pytest.TempPathFactory, topology: str, port_base: int) -> Iterator[Kube]:
    from fireflyer.dev import cluster as dev_cluster

    state_dir = tmp_path_factory.mktemp(f"dev-cluster-{topology}")
    state = dev_cluster.up(state_dir, topology, port_base)
    try:
        yield Kube(state.kubeconfig)
    finally:
        dev_cluster.down(state_dir, quiet=True)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """The `small` topology: 2 leaves × 4 nodes × 8 H100."""
    yield from _cluster(tmp_path_factory, "small", TEST_PORT_BASE)


@pytest.fixture(scope="module")
def deepseek_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """The `deepseek` topology: 256 H800 nodes, 4 spines × 8 leaves × 8 nodes."""
    yield from _cluster(tmp_path_factory, "deepseek", TEST_PORT_BASE + 1000)


def install_crds(cluster: Kube) -> Kube:
    """The fireflyer CRDs installed (from crds/, via kustomize)."""
    demo.install_crds(cluster.kubeconfig)
    return cluster


@pytest.fixture(scope="session")
def crds(cluster: Kube) -> Kube:
    return install_crds(cluster)


class Operator:
    """The operator as a separate process, as it runs in a cluster; restartable."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = operator_process.start(self.kubeconfig, self.log)

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running_operator(kubeconfig: Path, log: Path) -> Iterator[Operator]:
    op = Operator(kubeconfig, log)
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture(scope="session")
def operator(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    with running_operator(crds.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log") as op:
        yield op


@pytest.fixture
def kube(cluster: Kube, request: pytest.FixtureRequest) -> Iterator[Kube]:
    """A fresh namespace for one test, deleted afterwards."""
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    yield from fresh_namespace(cluster, base)
