"""The local pod runtime as a kubelet: what a pod asks for is what it gets, on this machine."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import needs_root
from tests.kube import Kube, condition, fresh_namespace, wait_for

pytestmark = [pytest.mark.integration, needs_root]
LOCAL = {"fireflyer.dev/local-runtime": "true"}
TOLERATE = [{"key": "fireflyer.dev/local-runtime", "operator": "Exists"}]


def _pod(name: str, command: str, **extra: object) -> dict[str, object]:
    container = {"name": "main", "image": "unused", "command": ["/bin/sh", "-c", command]}
    container.update(extra.pop("container", {}))  # type: ignore[call-overload]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"nodeSelector": LOCAL, "tolerations": TOLERATE, "containers": [container], **extra},
    }


@pytest.fixture
def ns(local_cluster: Kube) -> Iterator[Kube]:
    yield from fresh_namespace(local_cluster, "runtime", "--timeout=120s")


def _status(kube: Kube, pod: str) -> dict[str, object]:
    return kube.get("pod", pod)["status"]  # type: ignore[no-any-return]


def test_a_pod_gets_its_volumes_environment_address_and_peer_names(ns: Kube) -> None:
    server = _pod(
        "web-0",
        "cat /etc/cfg/greeting; echo node=$NODE ip=$POD_IP rank=$RANK; exec python3 -m http.server 8080",
        hostname="web-0",
        subdomain="web",
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}],
        container={
            "env": [
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            ],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True}],
        },
    )
    client = _pod(
        "client",
        'python3 -c "import urllib.request as u; '
        "print(u.urlopen('http://web-0.web." + ns.namespace + ".svc.cluster.local:8080/').status)\"; "
        "touch /etc/cfg-written-here && echo wrote; printf 'gave up' > /dev/termination-log; exit 3",
        restartPolicy="Never",
    )
    ns.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "cfg"},
                "data": {"greeting": "hello"},
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {"clusterIP": "None", "selector": {"app": "web-0"}, "ports": [{"port": 8080}]},
            },
            server,
        ]
    )
    ready = wait_for(
        "web-0 Ready", lambda: (condition(ns.get("pod", "web-0"), "Ready") or {}).get("status") == "True"
    )
    assert ready
    status = _status(ns, "web-0")
    ip = status["podIP"]
    assert isinstance(ip, str) and ip.startswith("10.")
    # This machine reaches the pod at its own address.
    with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as response:
        assert response.status == 200
    logs = ns.run("logs", "web-0").stdout
    assert "hello" in logs and f"ip={ip}" in logs and "rank=web-0" in logs and "node=local-" in logs
    ns.apply(client)
    wait_for("the client to end", lambda: _status(ns, "client").get("phase") == "Failed", timeout=60)
    out = ns.run("logs", "client").stdout
    assert "200" in out.splitlines()[0]  # the headless Service's pod name resolved and answered
    assert "wrote" in out  # the pod writes to its own root, not this machine's
    terminated = _status(ns, "client")["containerStatuses"][0]["state"]["terminated"]  # type: ignore[index]
    assert terminated["exitCode"] == 3
    assert terminated["message"] == "gave up"  # its termination message, from its own /dev
    assert not Path("/dev/termination-log").exists()
    assert not Path("/etc/cfg-written-here").exists()


def test_a_crashing_container_is_restarted_with_back_off_and_deletion_kills_it(ns: Kube) -> None:
    ns.apply(_pod("crasher", "echo run; sleep 0.5; exit 7"))
    restarted = wait_for(
        "two restarts",
        lambda: (
            (s := _status(ns, "crasher").get("containerStatuses"))
            and s[0]["restartCount"] >= 2  # type: ignore[index]
            and s
        ),
        timeout=60,
    )
    last = restarted[0]["lastState"]["terminated"]
    assert last["exitCode"] == 7
    assert ns.run("logs", "crasher", "--previous").stdout.strip() == "run"
    ns.apply(_pod("sleeper", "exec sleep 1000"))
    wait_for("sleeper running", lambda: _status(ns, "sleeper").get("phase") == "Running")
    uid = ns.get("pod", "sleeper")["metadata"]["uid"]
    netns = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
             if n.endswith(uid[:12])]  # fmt: skip
    assert len(netns) == 1
    pids = subprocess.run(["ip", "netns", "pids", netns[0]], capture_output=True, text=True).stdout.split()
    assert pids, "the pod's processes run in its network namespace"
    ns.run("delete", "pod", "sleeper", "--timeout=30s")
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} outlived its pod"
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert netns[0] not in listing


def test_a_shorter_grace_on_a_second_deletion_ends_a_pod_that_ignores_sigterm(ns: Kube) -> None:
    """As with a kubelet: every container gets SIGTERM at once, and `kubectl delete
    --grace-period=1` on a pod already terminating with a long grace brings the kill forward."""
    stubborn = "trap '' TERM; while true; do sleep 0.2; done"
    command = ["/bin/sh", "-c", stubborn]
    containers = [{"name": name, "image": "unused", "command": command} for name in ("main", "side")]
    ns.apply(_pod("stubborn", stubborn, terminationGracePeriodSeconds=300, containers=containers))
    wait_for("stubborn running", lambda: _status(ns, "stubborn").get("phase") == "Running")
    ns.run("delete", "pod", "stubborn", "--wait=false")
    time.sleep(3)
    assert ns.exists("pod", "stubborn"), "both containers ignore SIGTERM: the 300 s grace holds"
    started = time.monotonic()
    ns.run("delete", "pod", "stubborn", "--grace-period=1", "--timeout=30s")
    assert time.monotonic() - started < 15


def test_node_leases_keep_local_nodes_ready(local_cluster: Kube) -> None:
    nodes = local_cluster.get("nodes", selector="fireflyer.dev/local-runtime=true", namespaced=False)["items"]
    assert len(nodes) >= 2
    for node in nodes:
        assert (condition(node, "Ready") or {}).get("status") == "True"
        taints = json.dumps(node["spec"].get("taints") or [])
        assert "fireflyer.dev/local-runtime" in taints
