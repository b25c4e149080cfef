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
from tests.kube import Kube, fresh_namespace, operator_identity

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


# The operator under test acts as the chart's ServiceAccount with the chart's RBAC (release
# OPERATOR_RELEASE in OPERATOR_NAMESPACE), never as the cluster admin: a permission the chart
# lacks fails the test that needs it, and its log is checked for refused requests.
OPERATOR_RELEASE = "fireflyer-tests"
OPERATOR_NAMESPACE = "fireflyer-tests"
RBAC_DENIAL = re.compile(r'forbidden: User \\?"[^"\\]*\\?" cannot |Not enough permissions')


class Operator:
    """The operator as a separate process, as it runs in a cluster; restartable. watch_namespace:
    its --namespace (the chart's namespace mode), else it watches every namespace."""

    def __init__(self, kubeconfig: Path, log: Path, watch_namespace: str | None = None) -> None:
        self.kubeconfig = kubeconfig  # the ServiceAccount's
        self.log = log
        self.watch_namespace = watch_namespace
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.watch_namespace is None:
            self.proc = operator_process.start(self.kubeconfig, self.log)
            return
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*operator_process.COMMAND, "--namespace", self.watch_namespace],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

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

    def refusals(self) -> list[str]:
        """Log lines of requests the authorizer refused (not other 403s, such as a write into a
        namespace being deleted), and kopf's notes that it lacks a permission."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if RBAC_DENIAL.search(line)]


@contextlib.contextmanager
def running_operator(kubeconfig: Path, log: Path, watch_namespace: str | None = None) -> Iterator[Operator]:
    """The operator against the cluster of the admin `kubeconfig`, as the chart's ServiceAccount
    (cluster mode, or namespace mode watching `watch_namespace`). One replica, as --standalone."""
    values = ["replicas=1", *([f"watchNamespace={watch_namespace}"] if watch_namespace else [])]
    release = OPERATOR_RELEASE if watch_namespace is None else f"{OPERATOR_RELEASE}-namespaced"
    identity, _ = operator_identity(Kube(kubeconfig), log.parent, release, OPERATOR_NAMESPACE, *values)
    op = Operator(identity, log, watch_namespace)
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture(scope="session")
def operator(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    with running_operator(crds.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log") as op:
        yield op
    refused = op.refusals()
    assert not refused, "the operator was refused requests its RBAC should allow:\n" + "\n".join(refused[:20])


@pytest.fixture
def kube(cluster: Kube, request: pytest.FixtureRequest) -> Iterator[Kube]:
    """A fresh namespace for one test, deleted afterwards."""
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    yield from fresh_namespace(cluster, base)
