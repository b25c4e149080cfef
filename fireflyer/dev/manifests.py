"""manifests/base/operator.yaml, rendered from the Helm chart so that kustomize and Helm users
get the same RBAC and Deployment."""

from __future__ import annotations

import subprocess

from fireflyer.dev import build

CHART = build.REPO_ROOT / "charts" / "fireflyer"
OPERATOR_YAML = build.REPO_ROOT / "manifests" / "base" / "operator.yaml"
NAMESPACE = "fireflyer-system"
HEADER = "# Rendered from charts/fireflyer by `fireflyer manifests`; do not edit.\n"


def render() -> str:
    helm = build.ensure_binaries() / "helm"
    result = subprocess.run(
        # One replica: a kustomize apply cannot create the kopf peering object in the same pass
        # as its CRD; Helm (CRDs first) installs two replicas with peering. No uninstall hook.
        [
            str(helm),
            "template",
            "fireflyer",
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--skip-crds",
            "--set",
            "replicas=1",
            # kustomize has no pre-delete hook: applied as is, the Job would delete every
            # ThreeFSCluster at install time (docs/threefs.md, "Uninstalling").
            "--set",
            "threefs.deleteOnUninstall=false",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise build.BuildError(f"helm template failed: {result.stderr}")
    return HEADER + result.stdout


def write() -> None:
    OPERATOR_YAML.write_text(render())


def stale() -> bool:
    return not OPERATOR_YAML.is_file() or OPERATOR_YAML.read_text() != render()
