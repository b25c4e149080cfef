"""The chart's 3FS uninstall hook: ThreeFSClusters are deleted, and waited for, before the
operator goes (their finalizer needs it), by an identity that may do exactly that."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from fireflyer.operator.threefs import uninstall
from tests.kube import CHART

TEMPLATE = "templates/threefs-uninstall.yaml"


def _render(*values: str) -> list[dict[str, Any]]:
    from fireflyer.dev import build

    sets = [arg for value in values for arg in ("--set", value)]
    result = subprocess.run(
        [str(build.ensure_binaries() / "helm"), "template", "rel", str(CHART), "--namespace", "ops",
         "--show-only", TEMPLATE, *sets],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def test_a_pre_delete_hook_deletes_the_threefs_clusters_and_waits() -> None:
    objects = _by_kind(_render())
    job = objects["Job"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    assert "hook-succeeded" in job["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "fireflyer.operator.threefs.uninstall"]
    assert container["args"] == ["--timeout=600"]  # every namespace
    assert job["spec"]["activeDeadlineSeconds"] > 600
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Its identity is part of the release (so it exists when the hook runs) and may only list,
    # watch and delete ThreeFSClusters, everywhere.
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert "helm.sh/hook" not in (objects["ServiceAccount"]["metadata"].get("annotations") or {})
    assert objects["ClusterRole"]["rules"] == [
        {
            "apiGroups": ["fireflyer.dev"],
            "resources": ["threefsclusters"],
            "verbs": ["list", "watch", "delete"],
        }
    ]
    binding = objects["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == objects["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "ops"}
    ]


def test_in_namespace_mode_the_hook_reaches_only_the_watched_namespace() -> None:
    objects = _by_kind(_render("watchNamespace=team", "threefs.uninstallTimeoutSeconds=120"))
    assert "ClusterRole" not in objects and "ClusterRoleBinding" not in objects
    assert objects["Role"]["metadata"]["namespace"] == "team"
    assert objects["RoleBinding"]["metadata"]["namespace"] == "team"
    container = objects["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--timeout=120", "--namespace=team"]


def test_the_hook_can_be_turned_off() -> None:
    from fireflyer.dev import build

    result = subprocess.run(
        [str(build.ensure_binaries() / "helm"), "template", "rel", str(CHART), "--set",
         "threefs.deleteOnUninstall=false"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "threefs-uninstall" not in result.stdout


def test_uninstall_deletes_every_cluster_and_reports_those_left(monkeypatch: pytest.MonkeyPatch) -> None:
    live = {("a", "fs1"), ("b", "fs2")}
    deleted: list[tuple[str, str]] = []
    stuck = {("b", "fs2")}  # its operator never finishes the cleanup

    def list_(kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        assert kind == "ThreeFSCluster"
        return [{"metadata": {"namespace": ns, "name": n}} for ns, n in live if namespace in (None, ns)]

    def delete(kind: str, name: str, namespace: str) -> bool:
        deleted.append((namespace, name))
        if (namespace, name) not in stuck:
            live.discard((namespace, name))
        return True

    monkeypatch.setattr(uninstall.kube, "list_", list_)
    monkeypatch.setattr(uninstall.kube, "delete", delete)
    monkeypatch.setattr(uninstall, "POLL_SECONDS", 0.01)
    assert uninstall.delete_all(None, timeout=0.1) == [("b", "fs2")]
    assert sorted(deleted) == [("a", "fs1"), ("b", "fs2")]
    assert uninstall.main(["--namespace", "a", "--timeout", "0.1"]) == 0


def test_the_kustomize_base_has_no_uninstall_hook() -> None:
    """Applied without Helm, the hook's Job would run at once and delete every ThreeFSCluster."""
    base = CHART.parents[1] / "manifests" / "base" / "operator.yaml"
    assert "threefs-uninstall" not in base.read_text()
