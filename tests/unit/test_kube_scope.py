"""The operator's API access in namespace mode reaches its namespace only, and its child watches
are filtered by the API server."""

from __future__ import annotations

from collections.abc import Iterator

import kopf
import pytest
from kopf._cogs.structs import references

from fireflyer.operator import kube


@pytest.fixture
def scoped() -> Iterator[None]:
    kube.set_scope("team-a")
    try:
        yield
    finally:
        kube.set_scope(None)


def test_reads_across_namespaces_cover_the_watched_one_alone(scoped: None) -> None:
    assert kube._path("Pod") == "/api/v1/namespaces/team-a/pods"
    assert kube._path("StatefulSet") == "/apis/apps/v1/namespaces/team-a/statefulsets"
    assert kube._path("Node") == "/api/v1/nodes"  # cluster-scoped: unchanged
    assert kube._path("Job", "team-a", "j") == "/apis/batch/v1/namespaces/team-a/jobs/j"


def test_cluster_mode_lists_every_namespace() -> None:
    assert kube._path("Pod") == "/api/v1/pods"


def _selector(settings: kopf.OperatorSettings, group: str, plural: str) -> list[str]:
    """The server-side label selectors kopf sends when it watches group/v1 plural."""
    resource = references.Resource(group, "v1", plural, namespaced=True)
    return list(settings.watching.label_selectors.collect(resource))


def test_child_watches_carry_the_managed_by_selector() -> None:
    settings = kopf.OperatorSettings()
    kube.configure_watches(settings)
    managed = ["app.kubernetes.io/managed-by=fireflyer"]
    for group, plural in (
        ("batch", "jobs"),
        ("", "services"),
        ("apps", "statefulsets"),
        ("apps", "deployments"),
        ("apps", "daemonsets"),
    ):
        assert _selector(settings, group, plural) == managed, plural
    # Every pod counts against a node's free GPUs; nodes are read whole.
    assert _selector(settings, "", "pods") == [] and _selector(settings, "", "nodes") == []
    assert settings.scanning.disabled is False


def test_namespace_mode_skips_kopfs_cluster_wide_observation(scoped: None) -> None:
    settings = kopf.OperatorSettings()
    kube.configure_watches(settings)
    assert settings.scanning.disabled is True
