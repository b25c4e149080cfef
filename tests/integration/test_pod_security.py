"""The pods the operator renders, and the operator's own, against the API server's Pod Security
Admission at each level (server-side dry runs in namespaces labelled to enforce it); and the API
key Secret of an InferenceDeployment mounted into the router and the units by the operator."""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.api.inference import InferenceDeployment
from fireflyer.api.training import TrainingJob
from fireflyer.operator.inference import children
from fireflyer.operator.training import children as training
from tests.conftest import Operator
from tests.kube import Kube, fresh_namespace, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
INFERENCE = yaml.safe_load((REPO / "manifests/samples/small/inference.yaml").read_text())
TRAINING = yaml.safe_load((REPO / "manifests/samples/small/training.yaml").read_text())
OPERATOR = list(yaml.safe_load_all((REPO / "manifests/base/operator.yaml").read_text()))
LEVELS = ("restricted", "baseline", "privileged")
DOMAIN = ("leaf", "network.topology.nvidia.com/leaf", "leaf-00")
NODES = ("h100-000", "h100-001")


@pytest.fixture(scope="module")
def enforcing(cluster: Kube) -> Iterator[dict[str, Kube]]:
    """A namespace per Pod Security level, enforcing it. They only ever see server-side dry runs,
    so their deletion is not waited for (each took the namespace controller's 5 s and more)."""
    with contextlib.ExitStack() as stack:
        spaces = {}
        for level in LEVELS:
            space = contextlib.contextmanager(fresh_namespace)(cluster, f"psa-{level}", "--wait=false")
            ns = stack.enter_context(space)
            ns.run(
                "label",
                "namespace",
                ns.namespace,
                f"pod-security.kubernetes.io/enforce={level}",
                namespaced=False,
            )
            spaces[level] = ns
        yield spaces


def _admitted(ns: Kube, pod_spec: dict[str, Any]) -> str:
    """ "" when the API server would create a pod of this spec in ns, else why not."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"psa-{uuid.uuid4().hex[:6]}", "namespace": ns.namespace},
        "spec": pod_spec,
    }
    result = ns.run("create", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(pod), check=False)
    return "" if result.returncode == 0 else result.stderr


def _levels(spaces: dict[str, Kube], pod_spec: dict[str, Any]) -> dict[str, str]:
    return {level: _admitted(spaces[level], pod_spec) for level in LEVELS}


def _inference(**spec: Any) -> tuple[dict[str, Any], Any]:
    doc = copy.deepcopy(INFERENCE)
    doc["metadata"] |= {"namespace": "any", "uid": "cr-uid"}
    for key, value in spec.items():
        doc["spec"][key] = {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return doc, InferenceDeployment.model_validate(doc).spec


def _unit(**spec: Any) -> dict[str, Any]:
    doc, parsed = _inference(**spec)
    sts = children.statefulset(doc, parsed, "prefill", 0, NODES[:1], DOMAIN, "2025-01-01T00:00:00Z")
    return sts["spec"]["template"]["spec"]


def _no_violation_but(reasons: str, *allowed: str) -> None:
    """Every violation PSA lists is one of `allowed`; the rest of the pod passed."""
    for never in ("allowPrivilegeEscalation", "seccompProfile", "capabilities.drop", "privileged"):
        assert never not in reasons, reasons
    assert all(a in reasons for a in allowed), reasons


def test_the_router_and_the_operator_meet_restricted(enforcing: dict[str, Kube]) -> None:
    doc, spec = _inference(router={"apiKeySecret": "llm-keys"})
    router = children.router(doc, spec, {"decode": ["d0.svc"]})[0]["spec"]["template"]["spec"]
    assert _admitted(enforcing["restricted"], router) == ""
    operator = next(d for d in OPERATOR if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    operator = {k: v for k, v in operator.items() if k != "serviceAccountName"}  # not made here
    assert _admitted(enforcing["restricted"], operator) == ""


def test_units_with_rdma_and_node_paths_need_privileged(enforcing: dict[str, Kube]) -> None:
    verdicts = _levels(enforcing, _unit())
    assert verdicts["privileged"] == ""
    # What keeps them out of the other levels is exactly IPC_LOCK, the hostPath model and root.
    _no_violation_but(verdicts["restricted"], '"IPC_LOCK"', "hostPath", "runAsNonRoot")
    _no_violation_but(verdicts["baseline"], '"IPC_LOCK"', "hostPath")
    assert "runAsNonRoot" not in verdicts["baseline"]


def test_units_without_rdma_or_node_paths_meet_baseline(enforcing: dict[str, Kube]) -> None:
    pod = _unit(model={"source": "hf://deepseek-ai/DeepSeek-V3"}, network={"rdmaPerPod": 0})
    verdicts = _levels(enforcing, pod)
    assert verdicts["baseline"] == "" and verdicts["privileged"] == ""
    _no_violation_but(verdicts["restricted"], "runAsNonRoot")
    assert "IPC_LOCK" not in verdicts["restricted"] and "hostPath" not in verdicts["restricted"]


def test_trainers_with_rdma_need_privileged_and_nothing_else_fails(enforcing: dict[str, Kube]) -> None:
    doc = copy.deepcopy(TRAINING)
    doc["metadata"] |= {"namespace": "any", "uid": "cr-uid"}
    spec = TrainingJob.model_validate(doc).spec
    job = training.job(doc, spec, 0, NODES[: spec.nodes], DOMAIN, "2025-01-01T00:00:00Z", [])
    verdicts = _levels(enforcing, job["spec"]["template"]["spec"])
    assert verdicts["privileged"] == ""
    _no_violation_but(verdicts["baseline"], '"IPC_LOCK"', "hostPath")


# -- API keys through the operator -------------------------------------------------------------


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["volumes"] if v["name"] == name)


def test_the_operator_mounts_the_api_key_secret_into_the_router_and_the_units(
    operator: Operator, kube: Kube
) -> None:
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "llm-keys"},
            "stringData": {"api-keys": "sk-first\nsk-second\n"},
        }
    )
    doc = copy.deepcopy(INFERENCE)
    doc["spec"]["router"] = {**doc["spec"].get("router", {}), "apiKeySecret": "llm-keys"}
    kube.apply(doc)
    name = doc["metadata"]["name"]

    def router() -> dict[str, Any] | None:
        found = kube.get("deployments", selector=f"fireflyer.dev/deployment={name}")["items"]
        return found[0] if found else None

    deployment = wait_for("the router Deployment", router, timeout=60)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    secret = _volume(pod, "api-keys")["secret"]
    assert secret["secretName"] == "llm-keys" and secret["items"] == [{"key": "api-keys", "path": "api-keys"}]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert mount["readOnly"] is True
    flag = container["args"].index("--api-key-file")
    assert container["args"][flag + 1] == f"{mount['mountPath']}/api-keys"
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The router's pods exist: the ReplicaSet's pods passed admission with this template.
    wait_for(
        "a router pod",
        lambda: kube.get("pods", selector=f"fireflyer.dev/deployment={name},fireflyer.dev/component=router")[
            "items"
        ],
        timeout=60,
    )

    def units() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = kube.get("statefulsets", selector=f"fireflyer.dev/deployment={name}")[
            "items"
        ]
        return items if len(items) == 2 else []

    for sts in wait_for("both units", units, timeout=60):
        template = sts["spec"]["template"]["spec"]
        assert _volume(template, "api-keys")["secret"]["secretName"] == "llm-keys"
        env = {e["name"]: e.get("value") for e in template["containers"][0]["env"]}
        assert env["FIREFLYER_API_KEY_FILE"] == "/etc/fireflyer/api-keys/api-keys"
    # Nothing of the Secret is copied anywhere the operator writes.
    assert "sk-first" not in kube.run("get", "inferencedeployment", name, "-o", "yaml").stdout
    assert "sk-first" not in kube.run("get", "deployments,statefulsets,configmaps", "-o", "yaml").stdout
