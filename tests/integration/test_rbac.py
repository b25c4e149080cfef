"""The operator's permissions, proven on the real API server: what the chart's ServiceAccount may
do (SelfSubjectRulesReview, as `kubectl auth can-i --list` shows it) is exactly the reviewed list
below, in cluster mode and in namespace mode; in namespace mode nothing reaches past the watched
namespace but reading Nodes; and the operator, running as that ServiceAccount with --namespace,
brings up a ThreeFSCluster and an InferenceDeployment and deletes the file system without one
refused request. (The session's operator runs as the chart's ServiceAccount in cluster mode, so
every other integration test exercises the cluster-mode list.)"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.dev.runtime.threefs_admin import AdminRunner
from tests.conftest import Operator, running_operator
from tests.integration.test_threefs import _cluster_doc, runner, storage_nodes  # noqa: F401 (fixtures)
from tests.kube import Kube, chart_rbac, condition, fresh_namespace, operator_identity, wait_for

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
INFERENCE = yaml.safe_load((REPO_ROOT / "manifests/samples/small/inference.yaml").read_text())

Rules = dict[tuple[str, str], set[str]]  # (API group, resource) → verbs

# Reviewed: each grant is what a call in fireflyer/operator (or kopf on its behalf) needs; the
# chart's rbac.yaml says why, line by line. Server-side apply needs create besides patch for an
# object that does not exist yet.
NAMESPACED: Rules = {
    ("fireflyer.dev", "inferencedeployments"): {"get", "list", "watch", "patch"},
    ("fireflyer.dev", "threefsclusters"): {"get", "list", "watch", "patch"},
    ("fireflyer.dev", "trainingjobs"): {"get", "list", "watch", "patch"},
    ("fireflyer.dev", "expertplacements"): {"list", "watch", "create", "patch", "delete"},
    ("fireflyer.dev", "inferencedeployments/status"): {"patch"},
    ("fireflyer.dev", "threefsclusters/status"): {"patch"},
    ("fireflyer.dev", "trainingjobs/status"): {"patch"},
    ("fireflyer.dev", "expertplacements/status"): {"patch"},
    ("fireflyer.dev", "inferencerolescalers"): {"get", "list", "watch", "create", "patch"},
    ("fireflyer.dev", "inferencerolescalers/status"): {"patch"},
    ("fireflyer.dev", "inferencedeployments/finalizers"): {"update"},
    ("fireflyer.dev", "threefsclusters/finalizers"): {"update"},
    ("fireflyer.dev", "trainingjobs/finalizers"): {"update"},
    ("apps", "statefulsets"): {"list", "watch", "create", "patch", "delete"},
    ("apps", "daemonsets"): {"list", "watch", "create", "patch", "delete"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"list", "watch", "create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"list", "create", "patch", "delete"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch", "delete"},
    ("", "secrets"): {"create", "patch"},
    ("", "serviceaccounts"): {"create", "patch"},
    ("rbac.authorization.k8s.io", "roles"): {"create", "patch"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"create", "patch"},
    ("", "events"): {"create"},
    ("apps.foundationdb.org", "foundationdbclusters"): {"get", "create", "patch"},
}
NODES: Rules = {("", "nodes"): {"list", "watch"}}
PEERING_VERBS = {"list", "watch", "patch", "create"}
CLUSTER_MODE_ONLY: Rules = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("kopf.dev", "clusterkopfpeerings"): PEERING_VERBS,
}
NAMESPACE_MODE_ONLY: Rules = {("kopf.dev", "kopfpeerings"): PEERING_VERBS}
# Granted to every authenticated user by the API server's own roles, not by the chart.
EVERY_USER: Rules = {
    ("authorization.k8s.io", "selfsubjectaccessreviews"): {"create"},
    ("authorization.k8s.io", "selfsubjectrulesreviews"): {"create"},
    ("authentication.k8s.io", "selfsubjectreviews"): {"create"},
}
SENSITIVE = [
    ("", "secrets"),
    ("", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io", "rolebindings"),
]
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]


def _merge(*parts: Rules) -> Rules:
    merged: Rules = {}
    for part in parts:
        for key, verbs in part.items():
            merged.setdefault(key, set()).update(verbs)
    return merged


def effective_rules(identity: Path, namespace: str) -> Rules:
    """What the identity may do in `namespace` (its cluster-wide grants included), as the API
    server reports it to the identity itself."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace},
    }
    done = Kube(identity).run(
        "create", "--validate=false", "-f", "-", "-o", "json", stdin=json.dumps(review), namespaced=False
    )
    rules: Rules = {}
    for rule in json.loads(done.stdout)["status"]["resourceRules"]:
        assert not rule.get("resourceNames"), f"a rule limited to names was not reviewed: {rule}"
        for group in rule.get("apiGroups", []):
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def _can(cluster: Kube, user: str, verb: str, resource: str, *scope: str) -> bool:
    answer = cluster.run("auth", "can-i", verb, resource, "--as", user, *scope, namespaced=False, check=False)
    return answer.stdout.strip() == "yes"


@pytest.fixture
def other_namespace(cluster: Kube) -> Iterator[Kube]:
    """A namespace the operator must not reach in namespace mode (where it lives, for instance)."""
    yield from fresh_namespace(cluster, "rbac-elsewhere", "--wait=false")


def _release(
    cluster: Kube, tmp_path: Path, release: str, namespace: str, *values: str
) -> Iterator[tuple[Path, str]]:
    """The chart's RBAC installed as `release`, for the length of the loop over it: (a kubeconfig
    acting as its ServiceAccount, that account's user name)."""
    identity, account = operator_identity(cluster, tmp_path, release, namespace, *values)
    try:
        yield identity, f"system:serviceaccount:{namespace}:{account}"
    finally:
        rendered = yaml.safe_dump_all(chart_rbac(release, namespace, *values))
        cluster.run("delete", "--ignore-not-found", "-f", "-", stdin=rendered, namespaced=False, check=False)


def test_cluster_mode_grants_exactly_the_reviewed_list(crds: Kube, kube: Kube, tmp_path: Path) -> None:
    for identity, _ in _release(crds, tmp_path, "fireflyer-rbac", "fireflyer-tests"):
        granted = effective_rules(identity, kube.namespace)
        assert granted == _merge(NAMESPACED, NODES, CLUSTER_MODE_ONLY, EVERY_USER)


def test_namespace_mode_grants_the_list_in_its_namespace_and_nodes_alone_elsewhere(
    crds: Kube, kube: Kube, other_namespace: Kube, tmp_path: Path
) -> None:
    watched, home = kube.namespace, other_namespace.namespace
    for identity, user in _release(crds, tmp_path, "fireflyer-rbac-ns", home, f"watchNamespace={watched}"):
        assert effective_rules(identity, watched) == _merge(
            NAMESPACED, NAMESPACE_MODE_ONLY, NODES, EVERY_USER
        )
        assert effective_rules(identity, home) == _merge(NODES, EVERY_USER)
        assert effective_rules(identity, "default") == _merge(NODES, EVERY_USER)
        # The API server's own answer for the whole cluster: no Secret, ServiceAccount, Role or
        # RoleBinding permission outside the watched namespace.
        for _, resource in SENSITIVE:
            for verb in VERBS:
                assert not _can(crds, user, verb, resource, "--all-namespaces"), (verb, resource)
                assert not _can(crds, user, verb, resource, "-n", home), (verb, resource)
        listed = crds.run("auth", "can-i", "--list", "-n", home, "--as", user, namespaced=False).stdout
        for _, resource in SENSITIVE:
            assert not any(line.startswith(resource) for line in listed.splitlines()), listed


def _ready(kube: Kube, kind: str, name: str) -> dict[str, Any] | None:
    obj = kube.get(kind, name)
    cond = condition(obj, "Ready")
    return obj if cond and cond["status"] == "True" else None


def test_namespace_mode_operator_runs_3fs_and_inference_unrefused(
    operator: Operator,
    cluster: Kube,
    kube: Kube,
    runner: AdminRunner,  # noqa: F811
    storage_nodes: list[str],  # noqa: F811
    tmp_path: Path,
) -> None:
    # The session's cluster-wide operator would reconcile this namespace too: it pauses meanwhile.
    operator.stop()
    try:
        with running_operator(cluster.kubeconfig, tmp_path / "operator.log", kube.namespace) as scoped:
            threefs = _cluster_doc(reclaim="Delete")
            name, infd = threefs["metadata"]["name"], INFERENCE["metadata"]["name"]
            kube.apply(threefs)
            kube.apply(copy.deepcopy(INFERENCE))
            try:
                wait_for("the InferenceDeployment Ready", lambda: _ready(kube, "infd", infd), timeout=120)
                obj = wait_for(
                    "the ThreeFSCluster Ready", lambda: _ready(kube, "tfs", name), timeout=240, interval=1
                )
                assert obj["status"]["phase"] == "Ready"
                # Deletion wipes the disks with Jobs the operator creates, then lets the cluster go.
                kube.run("delete", "threefscluster", name, "--wait=false")
                wait_for(
                    "the ThreeFSCluster gone", lambda: not kube.exists("threefscluster", name), timeout=120
                )
            except AssertionError as error:
                raise AssertionError(f"{error}\noperator log:\n{scoped.tail()}") from None
            assert not scoped.refusals(), "\n".join(scoped.refusals()[:20])
            assert "Not enough permissions" not in scoped.log.read_text()  # kopf's own fallbacks
    finally:
        operator.start()
