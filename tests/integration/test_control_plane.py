"""The local control plane behaves like a real cluster: scheduling by GPU/RDMA resources,
garbage collection, and node-failure eviction driven by the controller manager."""

from __future__ import annotations

import json
import time

import pytest

from fireflyer.dev import faults
from tests.kube import Kube, condition, wait_for

pytestmark = pytest.mark.integration


def _pod(name: str, gpus: int, rdma: int = 0, node: str | None = None) -> dict:
    resources = {"nvidia.com/gpu": str(gpus)}
    if rdma:
        resources["rdma/ib"] = str(rdma)
    spec: dict = {
        "containers": [{"name": "main", "image": "busybox", "resources": {"limits": resources}}],
        "tolerations": [
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 2,
            },
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 2,
            },
        ],
    }
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_nodes_carry_gpu_rdma_and_topology(cluster: Kube) -> None:
    nodes = cluster.get("nodes", namespaced=False)["items"]
    assert len(nodes) == 8
    leaves = {n["metadata"]["labels"]["network.topology.nvidia.com/leaf"] for n in nodes}
    assert len(leaves) == 2
    for node in nodes:
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert labels["nvidia.com/gpu.count"] == "8"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["status"]["allocatable"]["rdma/ib"] == "8"
        nics = json.loads(node["metadata"]["annotations"]["fireflyer.dev/rdma-nics"])
        assert [nic["gpus"] for nic in nics] == [[i] for i in range(8)]
        assert condition(node, "Ready")["status"] == "True"


def test_deployment_pods_run_and_are_garbage_collected(kube: Kube) -> None:
    kube.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "gpu-app"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "gpu-app"}},
                "template": {
                    "metadata": {"labels": {"app": "gpu-app"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "main",
                                "image": "busybox",
                                "resources": {"limits": {"nvidia.com/gpu": "4", "rdma/ib": "4"}},
                            }
                        ]
                    },
                },
            },
        }
    )

    def running() -> list:
        pods = kube.get("pods", selector="app=gpu-app")["items"]
        ok = [p for p in pods if p["status"].get("phase") == "Running" and p["spec"].get("nodeName")]
        return ok if len(ok) == 3 else []

    pods = wait_for("3 Running gpu-app pods", running)
    assert all(p["status"].get("podIP") for p in pods)
    kube.run("delete", "deployment", "gpu-app", "--wait=false")
    # The garbage collector removes the ReplicaSet and then its pods.
    wait_for(
        "gpu-app pods to be garbage-collected", lambda: not kube.get("pods", selector="app=gpu-app")["items"]
    )
    assert not kube.get("replicasets", selector="app=gpu-app")["items"]


def test_eight_gpus_bind_nine_stay_pending(kube: Kube) -> None:
    kube.apply(_pod("eight", 8))
    kube.apply(_pod("nine", 9))
    wait_for(
        "the 8-GPU pod to be Running", lambda: kube.get("pod", "eight")["status"].get("phase") == "Running"
    )
    nine = wait_for(
        "the 9-GPU pod to be marked unschedulable",
        lambda: (pod := kube.get("pod", "nine")) and condition(pod, "PodScheduled") and pod,
    )
    scheduled = condition(nine, "PodScheduled")
    assert scheduled["status"] == "False"
    assert scheduled["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in scheduled["message"]
    assert not nine["spec"].get("nodeName")


def test_not_ready_node_gets_its_pods_evicted(kube: Kube, cluster: Kube) -> None:
    # The dev cluster's default not-ready toleration is 15 s (fireflyer.dev.cluster); this pod
    # tolerates the taint for 2 s, so eviction follows within seconds of the taint.
    nodes = cluster.get("nodes", namespaced=False)["items"]
    victim = sorted(n["metadata"]["name"] for n in nodes)[-1]
    kube.apply(_pod("doomed", 1, rdma=1, node=victim))
    wait_for("the pod to run", lambda: kube.get("pod", "doomed")["status"].get("phase") == "Running")
    faults.make_node_not_ready(cluster.kubeconfig, victim)
    try:

        def tainted() -> bool:
            node = cluster.get("node", victim, namespaced=False)
            return any(t["key"] == "node.kubernetes.io/not-ready" for t in node["spec"].get("taints", []))

        wait_for("the node lifecycle controller to taint the node", tainted, timeout=60)
        wait_for(
            "the pod to be evicted",
            lambda: kube.get("pod", "doomed")["metadata"].get("deletionTimestamp"),
            timeout=60,
        )
        # No kubelet confirms the end of a pod on a lost node: it stays Terminating.
        time.sleep(3)
        assert kube.exists("pod", "doomed")
    finally:
        faults.heal_node(cluster.kubeconfig, victim)
    wait_for("the healed node to finish the deletion", lambda: not kube.exists("pod", "doomed"), timeout=30)
    wait_for(
        "the node to be Ready again",
        lambda: condition(cluster.get("node", victim, namespaced=False), "Ready")["status"] == "True",
    )


def test_failed_pod_fault(kube: Kube, cluster: Kube) -> None:
    kube.apply(_pod("fragile", 1))
    wait_for("the pod to run", lambda: kube.get("pod", "fragile")["status"].get("phase") == "Running")
    faults.fail_pod(cluster.kubeconfig, kube.namespace, "fragile")
    pod = wait_for(
        "the pod to fail", lambda: (p := kube.get("pod", "fragile"))["status"].get("phase") == "Failed" and p
    )
    state = pod["status"]["containerStatuses"][0]["state"]
    assert state["terminated"]["exitCode"] == 1


def test_helm_works_against_the_cluster(cluster: Kube) -> None:
    import subprocess

    from fireflyer.dev import build

    helm = build.bin_dir() / "helm"
    result = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith(build.HELM_VERSION), result
    listed = subprocess.run(
        [str(helm), "list", "-A", "--kubeconfig", str(cluster.kubeconfig)], capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
