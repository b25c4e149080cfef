"""kvCache on 3FS on the real control plane: units wait until the named ThreeFSCluster is Ready
(bootstrapped by the dev cluster's admin runner), then mount its FUSE mount point; a kvCache.path
outside that mount is reported as an invalid spec without touching running units."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.dev.runtime.threefs_admin import AdminRunner
from tests.conftest import Operator
from tests.integration.test_threefs import _cluster_doc, runner, storage_nodes  # noqa: F401 (fixtures)
from tests.kube import Kube, condition, wait_for

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = yaml.safe_load((REPO_ROOT / "manifests/samples/small/inference.yaml").read_text())
NAME = SMALL["metadata"]["name"]
CLUSTER = "threefs-small"
KV = {"threeFSCluster": CLUSTER, "path": "/3fs/stage/kvcache/small"}


def _doc(kv: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc["spec"]["kvCache"] = kv
    doc["spec"]["eplb"] = {"mode": "off", "redundantExperts": 0}
    return doc


def _kv_condition(kube: Kube) -> dict[str, Any]:
    return condition(kube.get("inferencedeployment", NAME), "KvCacheReady") or {}


def _units(kube: Kube) -> list[dict[str, Any]]:
    selector = f"fireflyer.dev/deployment={NAME},fireflyer.dev/component=unit"
    return kube.get("statefulsets", selector=selector)["items"]  # type: ignore[no-any-return]


def _reasons(kube: Kube) -> set[str]:
    return {e.get("reason") for e in kube.get("events")["items"]}


def test_units_wait_for_their_3fs_cluster_then_mount_it(
    operator: Operator,
    kube: Kube,
    runner: AdminRunner,  # noqa: F811
    storage_nodes: list[str],  # noqa: F811
) -> None:
    kube.apply(_doc(KV))
    cond = wait_for("KvCacheReady=False", lambda: (c := _kv_condition(kube)).get("status") == "False" and c)
    assert cond["reason"] == "ThreeFSClusterNotFound" and CLUSTER in cond["message"]
    assert _units(kube) == []
    decode = condition(kube.get("inferencedeployment", NAME), "DecodeReady")
    assert decode and decode["reason"] == "ThreeFSClusterNotFound"
    wait_for("a ThreeFSClusterNotFound event", lambda: "ThreeFSClusterNotFound" in _reasons(kube))

    kube.apply(_cluster_doc(name=CLUSTER))
    try:
        wait_for(
            "KvCacheReady=True",
            lambda: _kv_condition(kube).get("status") == "True",
            timeout=300,
            interval=1,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\noperator log:\n{operator.tail()}") from None
    assert "ThreeFSClusterReady" in _reasons(kube)
    units = wait_for("both units", lambda: len(u := _units(kube)) == 2 and u)
    for sts in units:
        template = sts["spec"]["template"]["spec"]
        volume = next(v for v in template["volumes"] if v["name"] == "kv-cache")
        assert volume["hostPath"] == {"path": "/3fs/stage", "type": "Directory"}
        mount = next(m for m in template["containers"][0]["volumeMounts"] if m["name"] == "kv-cache")
        assert mount["mountPath"] == "/3fs/stage" and mount["mountPropagation"] == "HostToContainer"
        assert "--kv-cache-dir /3fs/stage/kvcache/small" in template["containers"][0]["command"][2]
    wait_for(
        "the deployment Ready",
        lambda: (condition(kube.get("inferencedeployment", NAME), "Ready") or {}).get("status") == "True",
        timeout=60,
    )
    pods = {
        p["metadata"]["uid"] for p in kube.get("pods", selector=f"fireflyer.dev/deployment={NAME}")["items"]
    }

    # A path the cluster's mount does not hold: an invalid spec, and the running units stay.
    kube.apply(_doc({"threeFSCluster": CLUSTER, "path": "/data/kvcache"}))
    cond = wait_for(
        "KvCacheReady=InvalidSpec", lambda: (c := _kv_condition(kube)).get("reason") == "InvalidSpec" and c
    )
    assert "/data/kvcache" in cond["message"] and "/3fs/stage" in cond["message"]
    degraded = condition(kube.get("inferencedeployment", NAME), "Degraded")
    assert degraded and degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert len(_units(kube)) == 2
    now = {
        p["metadata"]["uid"] for p in kube.get("pods", selector=f"fireflyer.dev/deployment={NAME}")["items"]
    }
    assert pods <= now  # nothing recreated (the router's pods are among them too)
