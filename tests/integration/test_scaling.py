"""Scaling a role through its InferenceRoleScaler on the real control plane: `kubectl scale`
moves whole units, and a change of the deployment's units wins over the live value."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Operator
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = yaml.safe_load((REPO_ROOT / "manifests/samples/small/inference.yaml").read_text())
NAME = SMALL["metadata"]["name"]
PREFILL_SCALER = f"{NAME}-prefill"


def _prefill_units(kube: Kube) -> list[str]:
    sets = kube.get("statefulsets", selector=f"fireflyer.dev/deployment={NAME},fireflyer.dev/role=prefill")
    return sorted(s["metadata"]["name"] for s in sets["items"])


def _prefill_pods(kube: Kube) -> list[str]:
    pods = kube.get("pods", selector=f"fireflyer.dev/deployment={NAME},fireflyer.dev/role=prefill")
    return sorted(p["metadata"]["name"] for p in pods["items"] if not p["metadata"].get("deletionTimestamp"))


def _scaler(kube: Kube) -> dict[str, Any]:
    return kube.get("inferencerolescaler", PREFILL_SCALER)  # type: ignore[no-any-return]


def _reasons(kube: Kube) -> set[str]:
    return {e.get("reason") for e in kube.get("events")["items"]}


def test_kubectl_scale_moves_whole_units_and_the_spec_wins_back(operator: Operator, kube: Kube) -> None:
    kube.apply(SMALL)
    wait_for(
        "the prefill scaler with its status",
        lambda: (
            kube.exists("inferencerolescaler", PREFILL_SCALER)
            and _scaler(kube).get("status", {}).get("replicas") == 1
        ),
        timeout=30,
    )
    owner = _scaler(kube)["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("InferenceDeployment", NAME)
    # The scale subresource an HPA reads: replicas and the role's pod selector.
    base = f"/apis/fireflyer.dev/v1alpha1/namespaces/{kube.namespace}"
    path = f"{base}/inferencerolescalers/{PREFILL_SCALER}/scale"
    scale = json.loads(kube.run("get", "--raw", path, namespaced=False).stdout)
    assert scale["spec"]["replicas"] == 1
    assert scale["status"]["selector"] == (
        f"fireflyer.dev/component=unit,fireflyer.dev/deployment={NAME},fireflyer.dev/role=prefill"
    )

    kube.run("scale", f"inferencerolescaler/{PREFILL_SCALER}", "--replicas", "2")
    wait_for(
        "a second whole prefill unit",
        lambda: (
            _prefill_units(kube) == [f"{NAME}-prefill-0", f"{NAME}-prefill-1"]
            and len(_prefill_pods(kube)) == 2 * SMALL["spec"]["prefill"]["nodesPerUnit"]
        ),
        timeout=30,
    )
    wait_for(
        "status to show two prefill units",
        lambda: (
            kube.get("inferencedeployment", NAME)["status"].get("prefill", {}).get("units") == 2
            and _scaler(kube)["status"].get("replicas") == 2
        ),
        timeout=30,
    )
    assert kube.get("inferencedeployment", NAME)["spec"]["prefill"]["units"] == 1  # Git's intent untouched
    assert "UnitsScaled" in _reasons(kube)

    # A new value in the deployment wins: the scaler is reset and the role follows it.
    changed = copy.deepcopy(SMALL)
    changed["spec"]["prefill"]["units"] = 0
    kube.apply(changed)
    wait_for(
        "the scaler reset to the spec's units and the prefill units gone",
        lambda: (
            _scaler(kube)["spec"]["replicas"] == 0 and _prefill_units(kube) == [] and not _prefill_pods(kube)
        ),
        timeout=40,
    )
    status = _scaler(kube)["status"]
    assert status["deploymentUnits"] == 0
    assert "ScalerReset" in _reasons(kube)
    assert kube.get("inferencedeployment", NAME)["status"]["prefillReady"] == "0/0"
