"""Multi-rank units on the real control plane: the role's ExpertPlacement reaches its pods as a
ConfigMap that changes in place (no new revision, no restart), the generation the units report
comes back as status, and a unit whose RDMA preflight failed moves to other nodes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fireflyer.eplb.synthetic import zipf_load
from tests.conftest import Operator
from tests.integration.test_eplb_controller import LoadServer, load_server  # noqa: F401 (fixture)
from tests.kube import Kube, condition, wait_for

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = yaml.safe_load((REPO_ROOT / "manifests/samples/small/inference.yaml").read_text())
STATIC = yaml.safe_load((REPO_ROOT / "manifests/samples/small/expertplacement.yaml").read_text())
NAME = SMALL["metadata"]["name"]
PLACEMENT_DIR = "/etc/fireflyer/placement"


def _doc(mode: str, load_url: str | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    if load_url:
        doc["metadata"]["annotations"] = {"eplb.fireflyer.dev/load-url": load_url}
    doc["spec"]["eplb"].update(mode=mode, intervalSeconds=10, windowSeconds=10)
    return doc


def _placement_doc(kube: Kube, role: str) -> dict[str, Any] | None:
    result = kube.run("get", "configmap", f"{NAME}-{role}-placement", "-o", "json", check=False)
    if result.returncode != 0:
        return None
    return json.loads(json.loads(result.stdout)["data"]["placement.json"])  # type: ignore[no-any-return]


def _unit(kube: Kube, role: str) -> dict[str, Any]:
    return kube.get("statefulset", f"{NAME}-{role}-0")  # type: ignore[no-any-return]


def _pods(kube: Kube, role: str) -> list[dict[str, Any]]:
    selector = f"fireflyer.dev/deployment={NAME},fireflyer.dev/role={role},fireflyer.dev/unit=0"
    return kube.get("pods", selector=selector)["items"]  # type: ignore[no-any-return]


def _role_status(kube: Kube, role: str) -> dict[str, Any]:
    return (kube.get("inferencedeployment", NAME).get("status") or {}).get(role) or {}  # type: ignore[no-any-return]


def _running(kube: Kube, role: str, count: int) -> list[dict[str, Any]] | None:
    pods = _pods(kube, role)
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    ok = len(live) == count and all(p["status"].get("phase") == "Running" for p in live)
    return live if ok else None


def _assert_mounted(sts: dict[str, Any], role: str) -> None:
    template = sts["spec"]["template"]["spec"]
    volume = next(v for v in template["volumes"] if v["name"] == "placement")
    assert volume["configMap"]["name"] == f"{NAME}-{role}-placement"
    mount = next(m for m in template["containers"][0]["volumeMounts"] if m["name"] == "placement")
    assert mount["mountPath"] == PLACEMENT_DIR and mount["readOnly"] is True


def test_dynamic_placements_reach_the_pods_and_the_applied_generation_comes_back(
    operator: Operator,
    kube: Kube,
    load_server: LoadServer,  # noqa: F811
) -> None:
    tokens = zipf_load(58, 256, 1.0, np.random.default_rng(11)).tolist()
    # An engine running the default split reports generation null.
    load_server.payload = {
        "layers": 58,
        "experts": 256,
        "windowSeconds": 10,
        "tokens": tokens,
        "generation": None,
    }
    kube.apply(_doc("dynamic", load_server.url))

    xp = wait_for(
        "a decode ExpertPlacement",
        lambda: (
            kube.get("expertplacement", f"{NAME}-decode-1")
            if kube.exists("expertplacement", f"{NAME}-decode-1")
            else None
        ),
        timeout=60,
    )
    doc = wait_for(
        "the placement in the decode ConfigMap",
        lambda: (d := _placement_doc(kube, "decode")) and d.get("generation") == 1 and d,
    )
    assert doc["phy2log"] == xp["spec"]["phy2log"]
    assert (doc["gpus"], doc["slotsPerGpu"], doc["layers"], doc["logicalExperts"]) == (32, 9, 58, 256)
    sts = _unit(kube, "decode")
    _assert_mounted(sts, "decode")
    assert sts["metadata"]["generation"] == 1  # publishing changed no pod template
    wait_for(
        "the default split reported",
        lambda: _role_status(kube, "decode").get("appliedPlacementGeneration") == 0,
    )

    load_server.payload = {**load_server.payload, "generation": 1}
    wait_for(
        "appliedUnits on the placement",
        lambda: (
            (kube.get("expertplacement", f"{NAME}-decode-1").get("status") or {}).get("appliedUnits") == 1
        ),
        timeout=60,
    )
    wait_for(
        "the role's applied generation",
        lambda: _role_status(kube, "decode").get("appliedPlacementGeneration") == 1,
    )
    assert _role_status(kube, "decode")["placementGeneration"] == 1


def test_a_static_placement_changes_in_place_without_restarting_units(
    operator: Operator,
    kube: Kube,
    load_server: LoadServer,  # noqa: F811
) -> None:
    # Static mode needs no load window: only the generation.
    load_server.payload = {"generation": 1}
    kube.apply(_doc("static", load_server.url))
    kube.apply(STATIC)
    wait_for(
        "the static placement in the ConfigMap",
        lambda: (_placement_doc(kube, "decode") or {}).get("generation") == 1,
    )
    assert _placement_doc(kube, "prefill") == {}  # no placement for prefill: the default split

    before = wait_for("the decode unit running", lambda: _running(kube, "decode", 4), timeout=60)
    sts = _unit(kube, "decode")
    _assert_mounted(sts, "decode")
    wait_for(
        "the static generation reported",
        lambda: _role_status(kube, "decode").get("appliedPlacementGeneration") == 1,
        timeout=60,
    )

    changed = copy.deepcopy(STATIC)
    changed["spec"]["generation"] = 2
    changed["spec"]["phy2log"] = [row[1:] + row[:1] for row in STATIC["spec"]["phy2log"]]
    kube.apply(changed)
    doc = wait_for(
        "generation 2 in the ConfigMap",
        lambda: (d := _placement_doc(kube, "decode")) and d.get("generation") == 2 and d,
    )
    assert doc["phy2log"] == changed["spec"]["phy2log"]
    load_server.payload = {"generation": 2}
    wait_for(
        "appliedUnits of the new generation",
        lambda: (
            (kube.get("expertplacement", STATIC["metadata"]["name"]).get("status") or {}).get("appliedUnits")
            == 1
        ),
        timeout=60,
    )
    status = wait_for(
        "the role's status",
        lambda: (s := _role_status(kube, "decode")).get("appliedPlacementGeneration") == 2 and s,
    )
    assert status["placementGeneration"] == 2
    # Prefill has no placement of its own (the default split): healthy, named by decode's.
    cond = wait_for(
        "EplbHealthy", lambda: condition(kube.get("inferencedeployment", NAME), "EplbHealthy"), timeout=30
    )
    assert (cond["status"], cond["reason"]) == ("True", "PlacementFound") and "generation 2" in cond[
        "message"
    ]

    after = _unit(kube, "decode")
    assert after["spec"]["template"] == sts["spec"]["template"]
    assert after["metadata"]["generation"] == sts["metadata"]["generation"]
    assert {p["metadata"]["uid"] for p in _pods(kube, "decode")} == {p["metadata"]["uid"] for p in before}


def test_a_failed_preflight_moves_the_unit_to_other_nodes(operator: Operator, kube: Kube) -> None:
    kube.apply(_doc("off"))  # no load collection: this is about placement
    before = wait_for("the prefill unit running", lambda: _running(kube, "prefill", 2), timeout=60)
    assert "--preflight" in before[0]["spec"]["containers"][0]["command"][2]
    old_nodes = sorted(p["spec"]["nodeName"] for p in before)
    victim = sorted(p["metadata"]["name"] for p in before)[1]
    message = "preflight failed: rank 9 → rank 2 over mlx5_1: 3.2 GB/s < 40 GB/s"
    status = {
        "containerStatuses": [
            {
                "name": "engine",
                "image": before[0]["spec"]["containers"][0]["image"],
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 1,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {
                    "terminated": {
                        "exitCode": 1,
                        "reason": "Error",
                        "message": message,
                        "startedAt": "2026-01-01T00:00:00Z",
                        "finishedAt": "2026-01-01T00:00:05Z",
                    }
                },
            }
        ]
    }
    kube.run(
        "patch", "pod", victim, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status})
    )

    def moved() -> list[dict[str, Any]] | None:
        pods = _running(kube, "prefill", 2)
        return pods if pods and not {p["spec"]["nodeName"] for p in pods} & set(old_nodes) else None

    try:
        wait_for("the prefill unit on other nodes", moved, timeout=60)
    except AssertionError as error:
        pods = [
            (p["metadata"]["name"], p["spec"].get("nodeName"), p["status"]) for p in _pods(kube, "prefill")
        ]
        raise AssertionError(f"{error}\npods: {pods}\noperator log:\n{operator.tail()}") from None
    events = [e for e in kube.get("events")["items"] if e.get("reason") == "PreflightFailed"]
    assert events and message in events[0]["message"]
    assert events[0]["involvedObject"]["kind"] == "InferenceDeployment"
    unit = next(u for u in kube.get("inferencedeployment", NAME)["status"]["units"] if u["role"] == "prefill")
    assert unit["avoidNodes"] == old_nodes and unit["avoidUntil"]
