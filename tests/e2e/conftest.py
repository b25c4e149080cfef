"""A dev cluster with local nodes (pods run for real here), the CRDs and the operator."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fireflyer.dev import cluster as dev_cluster
from fireflyer.dev import demo
from tests.conftest import TEST_PORT_BASE, Operator, running_operator
from tests.kube import Kube

LOCAL_NODES = 4
# Beside the integration tests' clusters (TEST_PORT_BASE, + 1000 for the large topology).
E2E_PORT_BASE = TEST_PORT_BASE + 3000

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the local pod runtime needs root (network and mount namespaces per pod)"
)


# Package scope: the cluster and every pod on it stop once the end-to-end tests are done.
@pytest.fixture(scope="package")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    state_dir = tmp_path_factory.mktemp("dev-cluster-local")
    state = dev_cluster.up(state_dir, "small", E2E_PORT_BASE, local_nodes=LOCAL_NODES)
    try:
        demo.install_crds(state.kubeconfig)
        yield Kube(state.kubeconfig)
    finally:
        dev_cluster.down(state_dir, quiet=True)


@pytest.fixture(scope="package")
def local_operator(local_cluster: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    log = tmp_path_factory.mktemp("operator-local") / "operator.log"
    with running_operator(local_cluster.kubeconfig, log) as op:
        yield op


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return str(demo.ensure_tiny_model())
