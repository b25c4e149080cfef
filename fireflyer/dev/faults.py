"""Fault injection on the simulated cluster (the kwok stages in hack/kwok/stages.yaml react)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

FAULT_LABEL = "fireflyer.dev/fault"


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


def make_node_not_ready(kubeconfig: Path, node: str) -> None:
    """The node reports Ready=False until heal_node; the node lifecycle controller taints it."""
    _label(kubeconfig, "node", node, "not-ready")


def heal_node(kubeconfig: Path, node: str) -> None:
    _label(kubeconfig, "node", node, None)


def fail_pod(kubeconfig: Path, namespace: str, pod: str) -> None:
    """The pod's containers exit 1 and the pod ends in phase Failed."""
    _label(kubeconfig, "pod", pod, "fail", namespace)
