"""The ThreeFSCluster controller on the real control plane: bootstrap through admin Jobs (run by
the dev cluster's admin runner with the admin_cli contract double), operator restart mid-way,
storage node loss and replacement, deletion under both reclaim policies."""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.dev import faults
from fireflyer.dev.runtime.threefs_admin import AdminRunner
from tests.conftest import Operator
from tests.kube import Kube, condition, wait_for

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = yaml.safe_load((REPO_ROOT / "manifests/samples/small/threefs.yaml").read_text())
NAME = SMALL["metadata"]["name"]
STORAGE_LABEL = "fireflyer.dev/3fs-storage"
# failoverSeconds in the failover test: well under the dev cluster's own not-ready eviction (15 s).
FAILOVER_SECONDS = 2
META_MOVED_WITHIN_SECONDS = 13
BOOTSTRAP = [
    "configure-fdb",
    "init-cluster",
    "set-config-meta",
    "set-config-storage",
    "set-config-fuse",
    "user-add",
    "create-targets",
    "upload-chains",
    "upload-chain-table",
]


@pytest.fixture(scope="module")
def storage_nodes(cluster: Kube) -> Iterator[list[str]]:
    """Four nodes labelled for 3FS storage: three for the cluster, one spare."""
    names = sorted(n["metadata"]["name"] for n in cluster.get("nodes", namespaced=False)["items"])[-4:]
    for name in names:
        cluster.run("label", "node", name, f"{STORAGE_LABEL}=true", "--overwrite", namespaced=False)
    try:
        yield names
    finally:
        for name in names:
            cluster.run("label", "node", name, f"{STORAGE_LABEL}-", namespaced=False, check=False)


@pytest.fixture(scope="module")
def runner(cluster: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminRunner]:
    admin = AdminRunner(cluster.kubeconfig, tmp_path_factory.mktemp("threefs-sim"))
    admin.start()
    try:
        yield admin
    finally:
        admin.stop()


def _cluster_doc(reclaim: str = "Delete", name: str = NAME, **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc["metadata"]["name"] = name
    doc["spec"]["storage"]["nodeSelector"] = {STORAGE_LABEL: "true"}
    doc["spec"]["storage"]["replacementGracePeriodSeconds"] = 3
    doc["spec"]["reclaimPolicy"] = reclaim
    doc["spec"]["failoverSeconds"] = 5  # the dev cluster's pace: an mgmtd on a lost node moves soon
    doc["spec"].update(spec)
    return doc


def _tfs(kube: Kube, name: str = NAME) -> dict[str, Any]:
    return kube.get("threefscluster", name)  # type: ignore[no-any-return]


def _ready(kube: Kube, name: str = NAME) -> dict[str, Any] | None:
    obj = _tfs(kube, name)
    cond = condition(obj, "Ready")
    return obj if cond and cond["status"] == "True" else None


def _simulated(runner: AdminRunner, kube: Kube) -> dict[str, Any]:
    return json.loads(runner.state_path(kube.namespace, NAME).read_text())  # type: ignore[no-any-return]


def _bootstrap(
    kube: Kube, operator: Operator, reclaim: str = "Delete", name: str = NAME, **spec: Any
) -> dict[str, Any]:
    kube.apply(_cluster_doc(reclaim, name, **spec))
    try:
        return wait_for(  # type: ignore[no-any-return]
            f"ThreeFSCluster {name} Ready", lambda: _ready(kube, name), timeout=240, interval=1
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\noperator log:\n{operator.tail()}") from None


def test_bootstrap_runs_every_step_once(
    kube: Kube, operator: Operator, runner: AdminRunner, storage_nodes: list[str]
) -> None:
    obj = _bootstrap(kube, operator)
    status = obj["status"]
    assert status["bootstrapSteps"] == BOOTSTRAP
    assert status["phase"] == "Ready" and status["storageReady"] == "3/3"
    # 3 nodes × 2 disks × 2 targets per disk / 3 replicas.
    assert status["chains"] == {"total": 4, "serving": 4, "degraded": 0}
    assert status["targets"] == {"serving": 12}
    for cond in (
        "FoundationDBReady",
        "MgmtdReady",
        "MetaReady",
        "StorageReady",
        "ChainTableReady",
        "ClientsReady",
    ):
        assert condition(obj, cond)["status"] == "True", cond  # type: ignore[index]

    state = _simulated(runner, kube)
    assert state["cluster"] == {"chainTableId": 1, "chunkSize": 1048576, "stripeSize": 4}
    assert set(state["configs"]) == {"MGMTD", "META", "STORAGE", "FUSE"}
    assert state["chainTable"]["chains"] == sorted(int(c) for c in state["chains"])
    commands = [line.split()[0] for line in state["log"] if not line.startswith("list-")]
    for command in ("init-cluster", "user-add", "upload-chains", "upload-chain-table"):
        assert commands.count(command) == 1, command
    assert commands.count("create-target") == 12

    # The root token reached its Secret (written by the user-add Job, as its own ServiceAccount);
    # the FUSE clients mount with it. It is nowhere else: not in status, Events, pod or Job specs,
    # nor any ConfigMap (admin step results included).
    token = kube.run("get", "secret", f"{NAME}-token", "-o", "jsonpath={.data.token}").stdout
    root_token = base64.b64decode(token).decode()
    assert root_token == state["users"]["root"]["token"]
    assert root_token not in json.dumps(obj["status"])
    for kinds in ("events", "pods,jobs,daemonsets,statefulsets", "configmaps"):
        assert root_token not in kube.run("get", kinds, "-o", "json").stdout, kinds
    storage = kube.get("statefulset", f"{NAME}-storage")
    pod = storage["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {STORAGE_LABEL: "true"}
    assert pod["containers"][0]["securityContext"]["capabilities"]["add"] == ["IPC_LOCK", "SYS_RESOURCE"]
    assert pod["initContainers"][0]["securityContext"]["privileged"] is True
    fuse = kube.get("daemonset", f"{NAME}-fuse")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in fuse["containers"][0]["volumeMounts"]}
    assert mounts["mount"]["mountPropagation"] == "Bidirectional" and mounts["shm"]["mountPath"] == "/dev/shm"
    # Only the mount point itself is shared with the host, and only on the picked nodes.
    mount_point = obj["spec"]["clients"]["mountPoint"]
    assert mounts["mount"]["mountPath"] == mount_point
    volume = next(v for v in fuse["volumes"] if v["name"] == "mount")
    assert volume["hostPath"]["path"] == mount_point
    assert fuse["nodeSelector"] == SMALL["spec"]["clients"]["nodeSelector"]
    pods = kube.get("pods", selector=f"fireflyer.dev/threefs={NAME},fireflyer.dev/component=storage")["items"]
    assert len({p["spec"]["nodeName"] for p in pods}) == 3
    assert {p["spec"]["nodeName"] for p in pods} <= set(storage_nodes)
    for kind in ("statefulset", "service", "configmap", "poddisruptionbudget", "daemonset"):
        for item in kube.get(kind, selector=f"fireflyer.dev/threefs={NAME}")["items"]:
            assert item["metadata"]["ownerReferences"][0]["kind"] == "ThreeFSCluster", item["metadata"][
                "name"
            ]
    # Admin Jobs and their results are cleaned up once read.
    wait_for(
        "admin Jobs cleaned up",
        lambda: (
            not kube.get("jobs", selector="fireflyer.dev/admin-step")["items"]
            or all(
                j["metadata"]["labels"]["fireflyer.dev/admin-step"].startswith("health-")
                for j in kube.get("jobs", selector="fireflyer.dev/admin-step")["items"]
            )
        ),
    )
    printed = kube.run("get", "tfs", NAME).stdout
    assert "Ready" in printed and "3/3" in printed


def test_operator_restart_mid_bootstrap_resumes(
    kube: Kube, operator: Operator, runner: AdminRunner, storage_nodes: list[str]
) -> None:
    kube.apply(_cluster_doc())
    wait_for(
        "bootstrap to pass set-config-meta",
        lambda: "set-config-meta" in (_tfs(kube).get("status") or {}).get("bootstrapSteps", []),
        timeout=180,
        interval=0.5,
    )
    operator.stop(kill=True)
    try:
        # Admin work in flight finishes while no operator watches.
        wait_for(
            "the in-flight admin step to finish",
            lambda: (
                not [
                    p
                    for p in kube.get("pods", selector="fireflyer.dev/admin-step")["items"]
                    if p["status"].get("phase") == "Running"
                ]
            ),
            timeout=30,
        )
    finally:
        operator.start()
    obj = wait_for(f"Ready after restart:\n{operator.tail()}", lambda: _ready(kube), timeout=240, interval=1)
    assert obj["status"]["bootstrapSteps"] == BOOTSTRAP
    state = _simulated(runner, kube)
    mutating = [line for line in state["log"] if not line.startswith("list-")]
    assert len(mutating) == len(set(mutating)), f"a finished step ran again: {mutating}"


def test_storage_node_loss_is_replaced_on_the_spare(
    kube: Kube, cluster: Kube, operator: Operator, runner: AdminRunner, storage_nodes: list[str]
) -> None:
    """A storage node is lost (the mgmtd pod's, when it shares one with a storage pod): it is
    replaced on the spare, and meta and storage keep running."""
    _bootstrap(kube, operator)
    selector = f"fireflyer.dev/threefs={NAME},fireflyer.dev/component=storage"
    pods = {
        p["metadata"]["name"]: p["spec"]["nodeName"] for p in kube.get("pods", selector=selector)["items"]
    }
    mgmtd_node = kube.get("pod", f"{NAME}-mgmtd-0")["spec"]["nodeName"]
    on_mgmtd_node = [name for name, node in pods.items() if node == mgmtd_node]
    victim_pod = on_mgmtd_node[0] if on_mgmtd_node else f"{NAME}-storage-1"
    ordinal = victim_pod.rsplit("-", 1)[1]
    victim = pods[victim_pod]
    spare = (set(storage_nodes) - set(pods.values())).pop()
    old_id = _tfs(kube)["status"]["storageNodeIds"][ordinal]
    faults.make_node_not_ready(cluster.kubeconfig, victim)
    try:
        try:
            wait_for(
                "the replacement to finish",
                lambda: (o := _tfs(kube)).get("status", {}).get("replacementsCompleted") == 1 and o,
                timeout=240,
                interval=1,
            )
            obj = wait_for("Ready again", lambda: _ready(kube), timeout=120, interval=1)
        except AssertionError as exc:
            pods_now = kube.run("get", "pods,statefulsets", "-o", "wide").stdout
            raise AssertionError(
                f"{exc}\n{_tfs(kube).get('status')}\n{pods_now}\n{operator.tail()}"
            ) from None
    finally:
        faults.heal_node(cluster.kubeconfig, victim)
    assert obj["status"]["storageNodeIds"][ordinal] == 10004 and old_id == 10001 + int(ordinal)
    moved = kube.get("pod", victim_pod)
    assert moved["spec"]["nodeName"] == spare
    state = _simulated(runner, kube)
    assert str(old_id) not in state["nodes"]
    for chain in state["chains"].values():
        assert len(chain["targets"]) == 3
        assert all(state["targets"][str(t)]["state"] == "SERVING" for t in chain["targets"])
        assert old_id not in {state["targets"][str(t)]["node"] for t in chain["targets"]}
    log = state["log"]
    first_remove = next(i for i, c in enumerate(log) if c.startswith("update-chain --mode remove"))
    first_add = next(i for i, c in enumerate(log) if c.startswith("update-chain --mode add"))
    unregister = next(i for i, c in enumerate(log) if c.startswith(f"unregister-node {old_id}"))
    assert first_remove < first_add < unregister
    reasons = kube.run("get", "events", "-o", "jsonpath={.items[*].reason}").stdout.split()
    assert "StorageNodeReplacing" in reasons and "StorageNodeReplaced" in reasons


def test_a_meta_pod_on_a_lost_node_runs_on_a_live_node_after_failover_seconds(
    kube: Kube, cluster: Kube, operator: Operator, runner: AdminRunner, storage_nodes: list[str]
) -> None:
    """The node of the meta pod is lost: with failoverSeconds 2 the pod is evicted long before the
    cluster's own not-ready eviction, the operator ends it (no kubelet will), and its successor
    runs on a live node; the file system is Ready again (after a storage replacement when a
    storage pod shared the node)."""
    _bootstrap(kube, operator, failoverSeconds=FAILOVER_SECONDS)
    meta = f"{NAME}-meta-0"
    victim = kube.get("pod", meta)["spec"]["nodeName"]

    def moved() -> bool:
        pods = kube.get("pods", selector=f"fireflyer.dev/threefs={NAME},fireflyer.dev/component=meta")
        return any(
            pod["metadata"]["name"] == meta
            and pod["spec"].get("nodeName") not in (None, victim)
            and not pod["metadata"].get("deletionTimestamp")
            and (condition(pod, "Ready") or {}).get("status") == "True"
            for pod in pods["items"]
        )

    lost_at = time.monotonic()
    faults.make_node_not_ready(cluster.kubeconfig, victim)
    try:
        try:
            wait_for("meta-0 Ready on a live node", moved, timeout=60, interval=0.25)
            took = time.monotonic() - lost_at
            wait_for("Ready again", lambda: _ready(kube), timeout=240, interval=1)
        except AssertionError as exc:
            pods_now = kube.run("get", "pods", "-o", "wide").stdout
            raise AssertionError(f"{exc}\n{pods_now}\n{operator.tail()}") from None
    finally:
        faults.heal_node(cluster.kubeconfig, victim)
    assert took <= META_MOVED_WITHIN_SECONDS, f"meta-0 took {took:.1f} s to run on a live node"
    meta_set = kube.get("statefulset", f"{NAME}-meta")["spec"]["template"]["spec"]
    seconds = {t["key"]: t.get("tolerationSeconds") for t in meta_set["tolerations"]}
    assert seconds["node.kubernetes.io/not-ready"] == FAILOVER_SECONDS


def test_delete_wipes_disks_retain_keeps_data(
    kube: Kube, operator: Operator, runner: AdminRunner, storage_nodes: list[str]
) -> None:
    _bootstrap(kube, operator, reclaim="Retain")
    # Now and then kopf runs the deletion handler but keeps its finalizer while the resync timer
    # stops (nolar/kopf#1305), and finishes the deletion on its retry a minute later.
    kube.run("delete", "threefscluster", NAME, "--timeout=150s")
    assert not kube.get("jobs", selector="fireflyer.dev/wipe=true")["items"]
    claims = kube.get("pvc")["items"]
    assert claims and all(c["metadata"]["name"].startswith(f"data-{NAME}-fdb-") for c in claims)

    # A second file system, under its own name, with reclaimPolicy Delete.
    other = f"{NAME}-b"
    obj = _bootstrap(kube, operator, reclaim="Delete", name=other)
    selector = f"fireflyer.dev/threefs={other},fireflyer.dev/component=storage"
    nodes = {p["spec"]["nodeName"] for p in kube.get("pods", selector=selector)["items"]}
    assert obj["status"]["phase"] == "Ready" and len(nodes) == 3
    kube.run("delete", "threefscluster", other, "--wait=false")
    wipe = f"fireflyer.dev/threefs={other},fireflyer.dev/wipe=true"
    jobs = wait_for(
        "a wipe Job per storage node",
        lambda: (j := kube.get("jobs", selector=wipe)["items"]) and len(j) == len(nodes) and j,
        timeout=90,
    )
    assert {j["spec"]["template"]["spec"]["nodeName"] for j in jobs} == nodes
    for job in jobs:  # owned, unprivileged, tolerating only what the storage pods tolerate
        assert job["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
        pod = job["spec"]["template"]["spec"]
        assert "privileged" not in pod["containers"][0]["securityContext"] and "tolerations" not in pod
    wait_for("the cluster to be gone", lambda: not kube.exists("threefscluster", other), timeout=90)
    # The Delete cluster's FoundationDB claim goes with it; the Retain cluster's stays.
    wait_for(
        "only the retained claim left",
        lambda: {c["metadata"]["name"] for c in kube.get("pvc")["items"]} == {f"data-{NAME}-fdb-0"},
        timeout=60,
    )
