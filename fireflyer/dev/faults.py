"""Fault injection on the simulated cluster (the kwok stages in hack/kwok/stages.yaml react)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

FAULT_LABEL = "fireflyer.dev/fault"
# On the pods of a node made NotReady: the kwok stages then leave their graceful deletions
# Terminating, as a real dead kubelet does, until they are force-deleted or the node heals.
NODE_LOST_LABEL = "fireflyer.dev/node-lost"


def _label(kubeconfig: Path, kind: str, name: str, value: str | None, namespace: str | None = None) -> None:
    patch = {"metadata": {"labels": {FAULT_LABEL: value}}}
    cmd = [
        "kubectl",
        "--kubeconfig",
        str(kubeconfig),
        "patch",
        kind,
        name,
        "--type=merge",
        "-p",
        json.dumps(patch),
    ]
    if namespace:
        cmd += ["-n", namespace]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _label_node_pods(kubeconfig: Path, node: str, change: str) -> None:
    """`kubectl label` every pod bound to `node` (in any namespace) with `change`."""
    subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "label", "pods", "--all-namespaces",
         f"--field-selector=spec.nodeName={node}", change, "--overwrite"],
        check=False, capture_output=True, text=True,
    )  # fmt: skip


def make_node_not_ready(kubeconfig: Path, node: str) -> None:
    """The node reports Ready=False until heal_node; the node lifecycle controller taints it.
    Its kubelet is gone: pods deleted there stay Terminating unless deleted with grace 0."""
    _label_node_pods(kubeconfig, node, f"{NODE_LOST_LABEL}=true")
    _label(kubeconfig, "node", node, "not-ready")


def heal_node(kubeconfig: Path, node: str) -> None:
    """The kubelet is back: the node turns Ready and finishes the deletions that waited for it."""
    _label(kubeconfig, "node", node, None)
    _label_node_pods(kubeconfig, node, f"{NODE_LOST_LABEL}-")


def fail_pod(kubeconfig: Path, namespace: str, pod: str) -> None:
    """The pod's containers exit 1 and the pod ends in phase Failed."""
    _label(kubeconfig, "pod", pod, "fail", namespace)
