"""Installing the operator the three ways users do: Helm, kustomize (GitOps), and the CRDs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fireflyer.dev import build
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fireflyer"


def _helm(kube: Kube, *args: str) -> subprocess.CompletedProcess[str]:
    helm = build.bin_dir() / "helm"
    return subprocess.run(
        [str(helm), "--kubeconfig", str(kube.kubeconfig), *args], capture_output=True, text=True
    )


def _operator_pods_running(kube: Kube, namespace: str, count: int) -> bool:
    pods = kube.with_namespace(namespace).get("pods", selector="app.kubernetes.io/name=fireflyer")["items"]
    return len([p for p in pods if p["status"].get("phase") == "Running"]) == count


def test_helm_lint_template_dry_run_and_install(crds: Kube) -> None:
    lint = _helm(crds, "lint", str(CHART))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "0 chart(s) failed" in lint.stdout
    rendered = _helm(crds, "template", "fireflyer", str(CHART), "--namespace", "default")
    assert rendered.returncode == 0, rendered.stderr
    dry = crds.run("apply", "--dry-run=server", "-f", "-", stdin=rendered.stdout, check=False)
    assert dry.returncode == 0, dry.stderr
    bad = _helm(crds, "template", "fireflyer", str(CHART), "--set", "replicas=0")
    assert bad.returncode != 0 and "replicas" in bad.stderr  # values.schema.json
    install = _helm(
        crds,
        "install",
        "fireflyer",
        str(CHART),
        "--namespace",
        "fireflyer-helm",
        "--create-namespace",
        "--wait=false",
    )
    assert install.returncode == 0, install.stderr
    try:
        wait_for(
            "two operator pods Running", lambda: _operator_pods_running(crds, "fireflyer-helm", 2), timeout=60
        )
        deployment = crds.with_namespace("fireflyer-helm").get("deployment", "fireflyer")
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "--standalone" not in container["args"]  # two replicas: kopf peering
        assert crds.exists("clusterkopfpeering", "fireflyer")
    finally:
        _helm(crds, "uninstall", "fireflyer", "--namespace", "fireflyer-helm")


def test_kustomize_base_applies_and_runs(crds: Kube) -> None:
    crds.run("apply", "--server-side", "-k", str(REPO / "manifests" / "base"), namespaced=False)
    try:
        wait_for(
            "the operator pod Running",
            lambda: _operator_pods_running(crds, "fireflyer-system", 1),
            timeout=60,
        )
        role = crds.get("clusterrole", "fireflyer", namespaced=False)
        resources = {r for rule in role["rules"] for r in rule["resources"]}
        assert {"inferencedeployments", "statefulsets", "pods", "nodes", "expertplacements"} <= resources
    finally:
        rendered = (REPO / "manifests" / "base" / "operator.yaml").read_text()
        crds.run("delete", "--ignore-not-found", "-f", "-", stdin=rendered, namespaced=False, check=False)
