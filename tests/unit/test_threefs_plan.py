"""ThreeFSCluster planning without a cluster: bootstrap gating, step records, retries, replacement."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from fireflyer.operator.threefs import children as K
from fireflyer.operator.threefs import ownership
from fireflyer.operator.threefs.admin_jobs import StepResult
from fireflyer.operator.threefs.plan import Observed, plan
from fireflyer.threefs import admin
from fireflyer.threefs.chaintable import plan_chain_table

REPO = Path(__file__).resolve().parents[2]
SMALL = yaml.safe_load((REPO / "manifests/samples/small/threefs.yaml").read_text())
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
ALL_STEPS = [
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


def _cr(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc["metadata"].update(namespace="ns", uid="0123-4567", generation=1)
    doc["spec"]["storage"].update(spec)
    if status is not None:
        doc["status"] = status
    return doc


def _workload(kind: str, ready: int, wanted: int) -> dict[str, Any]:
    if kind == "DaemonSet":
        return {"kind": kind, "spec": {}, "status": {"numberReady": ready, "desiredNumberScheduled": wanted}}
    return {"kind": kind, "spec": {"replicas": wanted}, "status": {"readyReplicas": ready}}


def _node(
    name: str, ready: bool = True, since: datetime = NOW, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    stamp = since.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": str(ready), "lastTransitionTime": stamp}]},
    }


def _pod(name: str, component: str, node: str, ip: str = "10.0.0.9") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"fireflyer.dev/component": component}},
        "spec": {"nodeName": node},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def _observed(**overrides: Any) -> Observed:
    base: dict[str, Any] = {
        "now": NOW,
        "nodes": {},
        "pods": [],
        "workloads": {},
        "jobs": {},
        "results": {},
    }
    base.update(overrides)
    return Observed(**base)


def _launched_step(desired: Any) -> str | None:
    jobs = [o for o in desired.launch if o["kind"] == "Job"]
    return jobs[0]["metadata"]["labels"]["fireflyer.dev/admin-step"] if jobs else None


def test_nothing_runs_before_foundationdb_is_ready() -> None:
    desired = plan(_cr(), _observed())
    kinds = {(c["kind"], c["metadata"]["name"]) for c in desired.children}
    assert ("StatefulSet", "threefs-small-fdb") in kinds
    assert ("StatefulSet", "threefs-small-mgmtd") not in kinds
    assert _launched_step(desired) is None
    assert desired.status["phase"] == "Bootstrapping"
    for child in desired.children:
        assert child["metadata"]["ownerReferences"][0]["uid"] == "0123-4567"


def test_steps_are_recorded_then_the_next_one_starts() -> None:
    fdb_ready = {"fdb": _workload("StatefulSet", 1, 1)}
    desired = plan(_cr(), _observed(workloads=fdb_ready))
    assert _launched_step(desired) == "configure-fdb"
    job = next(o for o in desired.launch if o["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "threefs-small-admin"
    done = StepResult("configure-fdb", 0, "$ configure new single ssd\nDatabase created\n")
    desired = plan(
        _cr(), _observed(workloads=fdb_ready, jobs={"configure-fdb": {}}, results={"configure-fdb": done})
    )
    assert desired.status["bootstrapSteps"] == ["configure-fdb"]
    assert ("Job", "threefs-small-admin-configure-fdb") in desired.cleanup
    assert ("ConfigMap", "threefs-small-admin-configure-fdb-result") in desired.cleanup
    assert _launched_step(desired) == "init-cluster"


def test_a_step_in_flight_blocks_the_next() -> None:
    desired = plan(
        _cr(), _observed(workloads={"fdb": _workload("StatefulSet", 1, 1)}, jobs={"configure-fdb": {}})
    )
    assert _launched_step(desired) is None


def test_a_failed_step_is_reported_and_retried_after_a_pause() -> None:
    fdb_ready = {"fdb": _workload("StatefulSet", 1, 1)}
    failed = StepResult("configure-fdb", 1, "$ configure new single ssd\nERROR: coordinators unreachable\n")
    desired = plan(
        _cr(), _observed(workloads=fdb_ready, jobs={"configure-fdb": {}}, results={"configure-fdb": failed})
    )
    assert "coordinators unreachable" in desired.status["lastAdminError"]
    assert _launched_step(desired) is None
    assert any(e.reason == "AdminStepFailed" for e in desired.events)
    later = _observed(workloads=fdb_ready, now=NOW + timedelta(seconds=20))
    assert _launched_step(plan(_cr(desired.status), later)) == "configure-fdb"


def test_user_add_writes_the_token_into_a_secret_the_operator_creates_empty() -> None:
    mgmtd = {"mgmtd": _workload("StatefulSet", 1, 1)}
    ip = [_pod("threefs-small-mgmtd-0", "mgmtd", "n1")]
    desired = plan(_cr({"bootstrapSteps": ALL_STEPS[:5]}), _observed(workloads=mgmtd, pods=ip))
    assert _launched_step(desired) == "user-add"
    # The operator never holds the token: the Secret is created (or emptied) without data.
    assert desired.claim_token
    secret = K.token_secret(_cr())
    assert secret["kind"] == "Secret" and "data" not in secret and "stringData" not in secret
    job = next(o for o in desired.launch if o["kind"] == "Job")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOKEN_SECRET"] == "threefs-small-token"
    # The Job's Role may patch that Secret and the step's result, by name, while the step runs.
    role = next(c for c in desired.children if c["kind"] == "Role")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["patch"],
            "resourceNames": ["threefs-small-admin-user-add-result"],
        },
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["patch"],
            "resourceNames": ["threefs-small-token"],
        },
    ]
    # A finished user-add (its output already blanked out by the Job) is recorded; the Role
    # keeps no rule once nothing runs.
    output = "$ user-add --root --admin 0 root\nUid 0\nToken <redacted>(Expired at N/A)\n"
    result = {"user-add": StepResult("user-add", 0, output)}
    desired = plan(_cr({"bootstrapSteps": ALL_STEPS[:5]}), _observed(jobs={"user-add": {}}, results=result))
    assert "user-add" in desired.status["bootstrapSteps"] and not desired.claim_token
    role = next(c for c in desired.children if c["kind"] == "Role")
    assert role["rules"] == []


def test_a_failed_step_never_puts_a_token_in_status_or_events() -> None:
    leaked = "$ user-add --root --admin 0 root\nToken AAAsecret42(Expired at N/A)\nError: boom\n"
    result = {"user-add": StepResult("user-add", 1, leaked)}
    desired = plan(_cr({"bootstrapSteps": ALL_STEPS[:5]}), _observed(jobs={"user-add": {}}, results=result))
    assert "boom" in desired.status["lastAdminError"]
    assert "AAAsecret42" not in desired.status["lastAdminError"]
    assert all("AAAsecret42" not in e.message for e in desired.events)


def _bootstrapped(
    nodes: dict[str, Any],
    pods: list[dict[str, Any]],
    health: admin.Health | None,
    taken: datetime | None,
    status_extra: dict[str, Any] | None = None,
) -> Any:
    status = {"bootstrapSteps": ALL_STEPS, **(status_extra or {})}
    workloads = {
        "fdb": _workload("StatefulSet", 1, 1),
        "mgmtd": _workload("StatefulSet", 1, 1),
        "meta": _workload("StatefulSet", 1, 1),
        "storage": _workload("StatefulSet", 3, 3),
        "fuse": _workload("DaemonSet", 8, 8),
    }
    cr = _cr(status, replacementGracePeriodSeconds=30, nodeSelector={"storage": "yes"})
    observed = _observed(nodes=nodes, pods=pods, workloads=workloads, health=health, health_taken_at=taken)
    return plan(cr, observed)


def _health(dead_node: int | None, also_dead: int | None = None) -> admin.Health:
    table = plan_chain_table([10001, 10002, 10003], 1, 2, 3)
    node_of = {t.target_id: t.node_id for t in table.targets}
    chains, targets = [], []
    for chain in table.chains:
        states = [("OFFLINE" if node_of[t] in (dead_node, also_dead) else "SERVING") for t in chain.targets]
        chains.append(
            admin.ChainRow(chain.chain_id, 1, "SERVING", tuple(zip(chain.targets, states, strict=True)))
        )
        targets += [
            admin.TargetRow(t, chain.chain_id, "HEAD", s, "x", node_of[t], 0, 0)
            for t, s in zip(chain.targets, states, strict=True)
        ]
    return admin.Health(chains, targets)


def _cluster(failed_since: datetime) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    labels = {"storage": "yes"}
    nodes = {f"n{i}": _node(f"n{i}", labels=labels) for i in range(4)}
    nodes["n1"] = _node("n1", ready=False, since=failed_since, labels=labels)
    pods = [_pod("threefs-small-mgmtd-0", "mgmtd", "n0")] + [
        _pod(f"threefs-small-storage-{i}", "storage", f"n{i}") for i in range(3)
    ]
    return nodes, pods


def test_a_failed_storage_node_is_replaced_after_the_grace_period() -> None:
    nodes, pods = _cluster(NOW - timedelta(seconds=10))
    assert _bootstrapped(nodes, pods, _health(10002), NOW).status.get("replacement") is None  # within grace
    nodes, pods = _cluster(NOW - timedelta(seconds=60))
    desired = _bootstrapped(nodes, pods, _health(10002), NOW)
    replacement = desired.status["replacement"]
    assert (
        replacement["oldNodeId"] == 10002
        and replacement["newNodeId"] == 10004
        and replacement["step"] == "remove"
    )
    assert _launched_step(desired) == "replace-1-remove"
    commands = next(o for o in desired.launch if o["kind"] == "ConfigMap")["data"]["commands"].splitlines()
    assert all(c.startswith("update-chain --mode remove") for c in commands)  # targets already offline
    assert len(commands) == 2 and len(replacement["removedTargets"]) == 2


def test_replacement_waits_when_a_chain_would_lose_its_last_serving_target() -> None:
    nodes, pods = _cluster(NOW - timedelta(seconds=60))
    # Node 10002 failed, but its targets are the only ones still serving their chains.
    desired = _bootstrapped(nodes, pods, _health(10001, also_dead=10003), NOW)
    assert _launched_step(desired) is None
    degraded = next(c for c in desired.status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "ReplacementBlocked" and "no serving target" in degraded["message"]


def test_no_spare_node_is_a_degraded_condition() -> None:
    nodes, pods = _cluster(NOW - timedelta(seconds=60))
    del nodes["n3"]
    desired = _bootstrapped(nodes, pods, _health(10002), NOW)
    degraded = next(c for c in desired.status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "NoSpareStorageNode"


def test_reschedule_renders_the_new_id_before_the_pod_goes() -> None:
    nodes, pods = _cluster(NOW - timedelta(seconds=60))
    replacement = {
        "ordinal": 1,
        "nodeName": "n1",
        "oldNodeId": 10002,
        "newNodeId": 10004,
        "step": "remove",
        "removedTargets": [[900100001, 101000200101, 0]],
        "startedAt": "2026-11-22T11:59:00Z",
    }
    status = {"bootstrapSteps": ALL_STEPS, "replacement": replacement}
    workloads = {
        "fdb": _workload("StatefulSet", 1, 1),
        "mgmtd": _workload("StatefulSet", 1, 1),
        "storage": _workload("StatefulSet", 3, 3),
    }
    removed = {
        "replace-1-remove": StepResult("replace-1-remove", 0, "$ update-chain --mode remove 1 2\nok\n")
    }
    cr = _cr(status, replacementGracePeriodSeconds=30, nodeSelector={"storage": "yes"})
    first = plan(
        cr,
        _observed(
            nodes=nodes,
            pods=pods,
            workloads=workloads,
            jobs={"replace-1-remove": {}},
            results=removed,
        ),
    )

    def app_toml(desired: Any) -> str:
        config = next(c for c in desired.children if c["metadata"]["name"] == "threefs-small-storage-config")
        return str(config["data"]["app-1.toml"])

    # The pass that learns the targets are out: the new id is not rendered yet, so the pod stays.
    assert first.status["replacement"]["step"] == "reschedule"
    assert "node_id = 10002" in app_toml(first) and first.delete_pods == []
    # Next pass: the new id is rendered (applied before deletions), then the old pod goes.
    second = plan(
        _cr(first.status, replacementGracePeriodSeconds=30, nodeSelector={"storage": "yes"}),
        _observed(nodes=nodes, pods=pods, workloads=workloads),
    )
    assert "node_id = 10004" in app_toml(second)
    assert second.delete_pods == ["threefs-small-storage-1"]
    assert second.status["storageNodeIds"]["1"] == 10004


def test_sync_waits_for_a_health_check_after_the_targets_were_added() -> None:
    nodes, pods = _cluster(NOW - timedelta(seconds=60))
    pods[2]["spec"]["nodeName"] = "n3"  # the replacement runs on the spare
    replacement = {
        "ordinal": 1,
        "nodeName": "n1",
        "oldNodeId": 10002,
        "newNodeId": 10004,
        "step": "sync",
        "removedTargets": [],
        "startedAt": "2026-11-22T11:58:00Z",
        "syncSince": "2026-11-22T11:59:30Z",
    }
    extra = {"replacement": replacement, "storageNodeIds": {"0": 10001, "1": 10004, "2": 10003}}
    # Chains cut to two serving targets: "serving", but not whole.
    short = _health(None)
    short = admin.Health(
        [admin.ChainRow(c.chain_id, 1, "SERVING", c.targets[:2]) for c in short.chains], short.targets
    )
    assert _launched_step(_bootstrapped(nodes, pods, short, NOW, extra)) != "replace-1-unregister"
    # A whole, serving table, but read before the targets were added.
    early = NOW.replace(hour=11, minute=59, second=10)
    assert _launched_step(_bootstrapped(nodes, pods, _health(None), early, extra)) != "replace-1-unregister"
    # Whole, serving and read afterwards: the old node goes.
    assert _launched_step(_bootstrapped(nodes, pods, _health(None), NOW, extra)) == "replace-1-unregister"


# -- a cluster created again under the same name -------------------------------------------------


def _owned(kind: str, name: str, step: str, uid: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {
            "name": name,
            "labels": {"fireflyer.dev/admin-step": step},
            "ownerReferences": [{"kind": "ThreeFSCluster", "name": "threefs-small", "uid": uid}],
        },
    }


def test_a_predecessors_step_objects_are_not_this_clusters_results() -> None:
    """The old cluster's finished init-cluster Job and result, not yet garbage-collected, are
    found by name and label but not by owner: they are removed, and nothing runs until then."""
    old_job = _owned("Job", "threefs-small-admin-init-cluster", "init-cluster", "old-uid")
    old_result = _owned("ConfigMap", "threefs-small-admin-init-cluster-result", "init-cluster", "old-uid")
    ours = _owned("Job", "threefs-small-admin-configure-fdb", "configure-fdb", "0123-4567")
    found = ownership.step_objects("0123-4567", [old_job, ours], [old_result])
    assert found.jobs == [ours] and found.results == []
    assert found.stale == [
        ("Job", "threefs-small-admin-init-cluster"),
        ("ConfigMap", "threefs-small-admin-init-cluster-result"),
    ]
    fdb_ready = {"fdb": _workload("StatefulSet", 1, 1)}
    desired = plan(_cr(), _observed(workloads=fdb_ready, stale=found.stale))
    assert set(found.stale) <= set(desired.cleanup)
    assert _launched_step(desired) is None and not desired.claim_token
    assert desired.status["bootstrapSteps"] == []
    assert any(e.reason == "StaleStepObjects" for e in desired.events)
    # Once they are gone, the bootstrap starts from the beginning, with a token Secret of its own.
    desired = plan(_cr(), _observed(workloads=fdb_ready))
    assert _launched_step(desired) == "configure-fdb" and desired.claim_token


def test_a_predecessors_token_secret_is_emptied_and_taken_over() -> None:
    owner = {"kind": "ThreeFSCluster", "name": "threefs-small", "uid": "0123-4567"}
    patch = ownership.blank_token_patch(owner)
    assert patch == {"metadata": {"ownerReferences": [owner]}, "data": None}


def _services(desired: Any) -> set[tuple[str, str]]:
    return {
        (c["kind"], c["metadata"]["name"])
        for c in desired.children
        if c["kind"] in ("StatefulSet", "DaemonSet", "ConfigMap")
    }


def test_an_mgmtd_pod_without_an_address_keeps_meta_storage_and_fuse() -> None:
    """The mgmtd pod leaving a lost node has no IP for a while: the services stay as rendered
    (anything not desired is pruned), and MgmtdReady is False until a pod has an address."""
    nodes = {f"n{i}": _node(f"n{i}", labels={"storage": "yes"}) for i in range(4)}
    storage = [_pod(f"threefs-small-storage-{i}", "storage", f"n{i + 1}") for i in range(3)]
    with_mgmtd = _bootstrapped(
        nodes, [_pod("threefs-small-mgmtd-0", "mgmtd", "n0", ip="10.0.0.1"), *storage], None, None
    )
    recorded = {"mgmtdAddresses": with_mgmtd.status["mgmtdAddresses"]}
    assert recorded == {"mgmtdAddresses": ["10.0.0.1:8000"]}
    pending = _pod("threefs-small-mgmtd-0", "mgmtd", "")
    pending["status"] = {"phase": "Pending"}
    without = _bootstrapped(nodes, [pending, *storage], None, None, status_extra=recorded)
    wanted = {
        ("StatefulSet", "threefs-small-meta"),
        ("StatefulSet", "threefs-small-storage"),
        ("DaemonSet", "threefs-small-fuse"),
        ("ConfigMap", "threefs-small-storage-config"),
    }
    assert wanted <= _services(with_mgmtd) and wanted <= _services(without)
    same = {c["metadata"]["name"]: c for c in with_mgmtd.children}
    for child in without.children:
        if child["kind"] == "ConfigMap" and child["metadata"]["name"] in same:
            assert child["data"] == same[child["metadata"]["name"]]["data"]  # nothing rolls
    mgmtd = next(c for c in without.status["conditions"] if c["type"] == "MgmtdReady")
    assert mgmtd["status"] == "False"


def test_pods_being_deleted_on_a_lost_node_are_force_deleted_but_storage_is_not() -> None:
    """No kubelet confirms the end of a pod on a NotReady or vanished node: its StatefulSet would
    wait forever for the mgmtd or meta pod to go. Storage pods move only by replacement."""
    nodes = {f"n{i}": _node(f"n{i}", labels={"storage": "yes"}) for i in range(4)}
    nodes["n1"] = _node("n1", ready=False, labels={"storage": "yes"})
    evicted = {"deletionTimestamp": "2026-11-22T11:59:00Z"}
    mgmtd = _pod("threefs-small-mgmtd-0", "mgmtd", "n1")
    meta = _pod("threefs-small-meta-0", "meta", "gone-node")
    healthy_leaving = _pod("threefs-small-monitor-0", "monitor", "n0")
    storage = _pod("threefs-small-storage-0", "storage", "n1")
    for pod in (mgmtd, meta, healthy_leaving, storage):
        pod["metadata"].update(evicted)
    running_on_lost = _pod("threefs-small-fdb-0", "fdb", "n1")
    desired = _bootstrapped(nodes, [mgmtd, meta, healthy_leaving, storage, running_on_lost], None, None)
    assert desired.delete_pods == ["threefs-small-meta-0", "threefs-small-mgmtd-0"]


WORKLOAD_KINDS = ("StatefulSet", "Deployment")


def _node_loss_tolerations(workload: dict[str, Any]) -> list[tuple[str, int | None]]:
    """The taint keys of a lost node that the workload's pods tolerate, with how long."""
    tolerations = workload["spec"]["template"]["spec"].get("tolerations") or []
    return sorted(
        (t["key"], t.get("tolerationSeconds"))
        for t in tolerations
        if t.get("effect") == "NoExecute" and t.get("key", "").startswith("node.kubernetes.io/")
    )


def test_mgmtd_meta_and_monitor_leave_a_lost_node_after_failover_seconds_and_storage_never() -> None:
    """Kubernetes would keep a pod on a NotReady node for 300 s; the stateless 3FS services move
    after spec.failoverSeconds. Storage pods stay: only the replacement procedure moves them, and
    FoundationDB's pods keep the cluster default (their data is on the node)."""
    nodes = {f"n{i}": _node(f"n{i}", labels={"storage": "yes"}) for i in range(4)}
    storage_pods = [_pod(f"threefs-small-storage-{i}", "storage", f"n{i + 1}") for i in range(3)]
    pods = [_pod("threefs-small-mgmtd-0", "mgmtd", "n0", ip="10.0.0.1"), *storage_pods]
    workloads = {
        "fdb": _workload("StatefulSet", 1, 1),
        "mgmtd": _workload("StatefulSet", 1, 1),
        "meta": _workload("StatefulSet", 1, 1),
        "storage": _workload("StatefulSet", 3, 3),
    }
    lost = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
    for failover in (None, 7):
        cr = _cr({"bootstrapSteps": ALL_STEPS}, nodeSelector={"storage": "yes"})
        cr["spec"]["monitor"] = {"clickhouse": "external", "externalAddress": "clickhouse.example:9000"}
        if failover is not None:
            cr["spec"]["failoverSeconds"] = failover
        desired = plan(cr, _observed(nodes=nodes, pods=pods, workloads=workloads))
        by_name = {c["metadata"]["name"]: c for c in desired.children if c["kind"] in WORKLOAD_KINDS}
        expected = 60 if failover is None else failover
        for component in ("mgmtd", "meta", "monitor"):
            workload = by_name[f"threefs-small-{component}"]
            assert _node_loss_tolerations(workload) == [(key, expected) for key in lost], component
        assert _node_loss_tolerations(by_name["threefs-small-storage"]) == [(key, None) for key in lost]
        assert _node_loss_tolerations(by_name["threefs-small-fdb"]) == []


def test_services_in_the_host_network_claim_their_ports_on_the_node() -> None:
    """Two mgmtd (or meta) pods on one node would bind the same host ports and one would crash:
    as host ports the scheduler keeps them apart, a pod moving off a lost node included."""
    nodes = {f"n{i}": _node(f"n{i}", labels={"storage": "yes"}) for i in range(4)}
    pods = [_pod("threefs-small-mgmtd-0", "mgmtd", "n0", ip="10.0.0.1")]
    workloads = {"fdb": _workload("StatefulSet", 1, 1), "mgmtd": _workload("StatefulSet", 1, 1)}
    for host_network in (True, False):
        cr = _cr({"bootstrapSteps": ALL_STEPS}, nodeSelector={"storage": "yes"})
        cr["spec"]["network"]["hostNetwork"] = host_network
        desired = plan(cr, _observed(nodes=nodes, pods=pods, workloads=workloads))
        sets = {c["metadata"]["name"]: c for c in desired.children if c["kind"] == "StatefulSet"}
        for component, ports in (("mgmtd", [8000, 9000]), ("meta", [8001, 9001]), ("storage", [8002, 9002])):
            container = sets[f"threefs-small-{component}"]["spec"]["template"]["spec"]["containers"][0]
            assert [p["containerPort"] for p in container["ports"]] == ports, component
            claimed = [p.get("hostPort") for p in container["ports"]]
            assert claimed == (ports if host_network else [None, None]), component
