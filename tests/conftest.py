"""Shared fixtures: a session-scoped local control plane and a namespace per test."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import Kube, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests run their own cluster beside a demo cluster that may be up on the default ports.
TEST_PORT_BASE = int(os.environ.get("FIREFLYER_TEST_PORT_BASE", "27380"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    from fireflyer.dev import cluster as dev_cluster

    state_dir = tmp_path_factory.mktemp("dev-cluster")
    topology = os.environ.get("FIREFLYER_TEST_TOPOLOGY", "small")
    state = dev_cluster.up(state_dir, topology, TEST_PORT_BASE)
    try:
        yield Kube(state.kubeconfig)
    finally:
        dev_cluster.down(state_dir, quiet=True)


@pytest.fixture
def kube(cluster: Kube, request: pytest.FixtureRequest) -> Iterator[Kube]:
    """A fresh namespace for one test, deleted afterwards."""
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    cluster.run("create", "namespace", name, namespaced=False)
    ns = cluster.with_namespace(name)
    wait_for(f"the default ServiceAccount in {name}", lambda: ns.exists("serviceaccount", "default"))
    try:
        yield ns
    finally:
        cluster.run("delete", "namespace", name, "--wait=false", namespaced=False, check=False)
