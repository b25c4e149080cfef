"""The informers' in-memory views (fireflyer.operator.cache): what kube.list_ may answer from
them, and writes seen before their watch events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fireflyer.operator import cache, kube
from fireflyer.operator import labels as L


def _obj(kind: str, name: str, version: str, namespace: str = "ns", **labels: str) -> dict[str, Any]:
    meta = {"name": name, "namespace": namespace, "resourceVersion": version, "labels": labels}
    return {"kind": kind, "metadata": {**meta, "managedFields": [{"big": "x"}]}, "spec": {}}


@pytest.fixture
def informers() -> Iterator[dict[str, cache.Informer]]:
    made = {
        "Pod": cache.Informer("Pod", slim=cache.slim_pod),
        "StatefulSet": cache.Informer("StatefulSet", cache.MANAGED),
    }
    for informer in made.values():
        informer.synced.set()
    cache._informers.update(made)
    kube.set_cache(kube.CacheHooks(cache.serve, cache.current, cache.written))
    try:
        yield made
    finally:
        kube.set_cache(None)
        cache._informers.clear()


def test_selectors_an_informer_can_answer() -> None:
    assert cache.parse_selector("a=b,c") == {"a": "b", "c": None}
    assert cache.parse_selector("a==b") == {"a": "b"}
    assert cache.parse_selector("a!=b") is None
    assert cache.parse_selector("a in (b)") is None


def test_whole_cluster_pods_come_from_the_informer_but_filtered_pod_lists_do_not(
    informers: dict[str, cache.Informer],
) -> None:
    informers["Pod"].upsert(_obj("Pod", "p", "3"))
    assert [p["metadata"]["name"] for p in kube.list_("Pod")] == ["p"]
    assert "managedFields" not in kube.list_("Pod")[0]["metadata"]
    assert cache.serve("Pod", "ns", None) is None  # full pods (statuses) come from the API
    assert cache.serve("Pod", None, "a=b") is None


def test_statefulsets_are_served_only_under_our_filter(informers: dict[str, cache.Informer]) -> None:
    ours = {L.MANAGED_BY: L.MANAGER, L.COMPONENT: "unit"}
    cache.written(_obj("StatefulSet", "u1", "5", **ours))
    cache.written(_obj("StatefulSet", "u2", "6", namespace="other", **ours))
    cache.written(_obj("StatefulSet", "theirs", "7"))  # not ours: never held
    selector = f"{L.COMPONENT}=unit,{L.MANAGED_BY}={L.MANAGER}"
    assert sorted(s["metadata"]["name"] for s in kube.list_("StatefulSet", None, selector)) == ["u1", "u2"]
    assert [s["metadata"]["name"] for s in kube.list_("StatefulSet", "other", selector)] == ["u2"]
    assert cache.serve("StatefulSet", None, f"{L.COMPONENT}=unit") is None


def test_an_older_version_never_replaces_a_newer_one(informers: dict[str, cache.Informer]) -> None:
    pods = informers["Pod"]
    pods.upsert(_obj("Pod", "p", "10", phase="new"))
    pods.upsert(_obj("Pod", "p", "9", phase="old"))  # a late watch event after our own write
    assert pods.items()[0]["metadata"]["labels"] == {"phase": "new"}
    pods.remove(_obj("Pod", "p", "11"))
    assert pods.items() == []


def test_an_unsynced_informer_answers_nothing(informers: dict[str, cache.Informer]) -> None:
    informers["Pod"].synced.clear()
    assert cache.serve("Pod", None, None) is None


def test_an_unchanged_apply_is_skipped_until_someone_else_changes_the_object(
    informers: dict[str, cache.Informer], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, Any]] = []
    version = iter(range(100, 200))

    def call(method: str, path: str, body: Any = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
        sent.append(body)
        return {**body, "metadata": {**body["metadata"], "resourceVersion": str(next(version))}}

    monkeypatch.setattr(kube, "_call", call)
    kube._applied.clear()
    unit = _obj("StatefulSet", "u1", "", **{L.MANAGED_BY: L.MANAGER})
    kube.apply(unit)
    kube.apply(unit)
    assert len(sent) == 1, "the second apply of the same content was skipped"
    informers["StatefulSet"].upsert(_obj("StatefulSet", "u1", "150", **{L.MANAGED_BY: L.MANAGER}))
    kube.apply(unit)  # edited by someone else since: applied again (drift repair)
    assert len(sent) == 2
    kube.apply({**unit, "spec": {"replicas": 2}})
    assert len(sent) == 3, "new content is always applied"


def test_a_controllers_status_update_is_no_reason_to_apply_again(
    informers: dict[str, cache.Informer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A StatefulSet's controller moves its version with every replica count while pods start;
    a forced pass must not re-apply it for that. A spec edit (the generation moves) or a label of
    ours removed by hand is repaired."""
    sent: list[dict[str, Any]] = []

    def call(method: str, path: str, body: Any = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
        sent.append(body)
        return {**body, "metadata": {**body["metadata"], "resourceVersion": "100", "generation": 1}}

    monkeypatch.setattr(kube, "_call", call)
    kube._applied.clear()
    ours = {L.MANAGED_BY: L.MANAGER, "fireflyer.dev/role": "decode"}
    unit = _obj("StatefulSet", "u1", "", **ours)
    kube.apply(unit)

    def held(version: str, generation: int, **labels: str) -> None:
        obj = _obj("StatefulSet", "u1", version, **labels)
        obj["metadata"]["generation"] = generation
        obj["status"] = {"readyReplicas": 1}
        informers["StatefulSet"].upsert(obj)

    held("101", 1, **ours)  # the controller wrote its status
    kube.apply(unit)
    assert len(sent) == 1, "a status update alone is not drift"
    held("102", 2, **ours)  # someone edited the spec
    kube.apply(unit)
    assert len(sent) == 2
    held("103", 1, **{L.MANAGED_BY: L.MANAGER})  # a label of ours removed
    kube.apply(unit)
    assert len(sent) == 3


def test_a_promised_object_is_held_until_its_write_arrives_or_the_promise_expires(
    informers: dict[str, cache.Informer],
) -> None:
    sets = informers["StatefulSet"]
    ours = {L.MANAGED_BY: L.MANAGER}
    sets.upsert(_obj("StatefulSet", "u1", "7", **ours, nodes="old"))
    sets.promise(_obj("StatefulSet", "u1", "", **ours, nodes="new"), seconds=60)
    assert sets.get("ns", "u1")["metadata"]["labels"]["nodes"] == "new"  # type: ignore[index]
    sets.upsert(_obj("StatefulSet", "u1", "8", **ours, nodes="new"))  # the apply's answer
    assert sets.get("ns", "u1")["metadata"]["resourceVersion"] == "8"  # type: ignore[index]

    sets.promise(_obj("StatefulSet", "u1", "", **ours, nodes="newer"), seconds=0)
    sets.promise(_obj("StatefulSet", "u2", "", **ours), seconds=0)
    # The writes never happened: what was held before comes back, the new one goes.
    assert [s["metadata"]["labels"]["nodes"] for s in sets.items()] == ["new"]


def test_a_failed_write_withdraws_its_promise_at_once(informers: dict[str, cache.Informer]) -> None:
    """A write refused (its namespace is being deleted) must not keep its nodes reserved for the
    promise's whole lifetime; a write that did happen is kept."""
    sets = informers["StatefulSet"]
    ours = {L.MANAGED_BY: L.MANAGER}
    sets.upsert(_obj("StatefulSet", "u1", "7", **ours, nodes="old"))
    sets.promise(_obj("StatefulSet", "u1", "", **ours, nodes="new"), seconds=60)
    sets.promise(_obj("StatefulSet", "u2", "", **ours, nodes="other"), seconds=60)
    sets.promise(_obj("StatefulSet", "u3", "", **ours, nodes="written"), seconds=60)
    sets.upsert(_obj("StatefulSet", "u3", "9", **ours, nodes="written"))  # this write happened
    for name in ("u1", "u2", "u3"):
        sets.retract(_obj("StatefulSet", name, "", **ours))
    held = {s["metadata"]["name"]: s["metadata"]["labels"]["nodes"] for s in sets.items()}
    assert held == {"u1": "old", "u3": "written"}


def test_a_cached_node_keeps_what_placement_reads() -> None:
    from fireflyer.dev import topology
    from fireflyer.placement import build_topology

    node = topology.nodes(topology.load("small"))[0]
    node["status"] |= {
        "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "t", "message": "ok"}],
        "images": [{"names": ["x"], "sizeBytes": 1}] * 50,
        "nodeInfo": {"kernelVersion": "6"},
    }
    node["spec"]["taints"] = [{"key": "a", "effect": "NoSchedule"}]
    slim = cache.slim_node(node)
    assert "images" not in slim["status"] and "nodeInfo" not in slim["status"]
    assert slim["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    name = node["metadata"]["name"]
    assert build_topology([slim], []).nodes[name] == build_topology([node], []).nodes[name]


def test_nodes_are_served_whatever_namespace_the_operator_is_scoped_to(
    informers: dict[str, cache.Informer], monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = cache.Informer("Node", slim=cache.slim_node)
    nodes.synced.set()
    nodes.upsert({"metadata": {"name": "n1", "resourceVersion": "1"}})
    informers["Node"] = nodes
    cache._informers["Node"] = nodes
    monkeypatch.setattr(kube, "_scope", "team-a")  # namespace mode
    assert [n["metadata"]["name"] for n in kube.list_("Node")] == ["n1"]
    assert kube.get("Node", "n1") is not None


def test_creations_and_status_writes_reach_the_informer_before_their_watch_events(
    informers: dict[str, cache.Informer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new deployment's scaler is created, then its status written; the next pass, inside the
    # watch's lag, must compare with that status rather than write it again.
    informers["InferenceRoleScaler"] = cache.Informer("InferenceRoleScaler")
    informers["InferenceRoleScaler"].synced.set()
    cache._informers["InferenceRoleScaler"] = informers["InferenceRoleScaler"]
    stored: dict[str, Any] = {}

    def api(method: str, path: str, body: Any = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if method == "POST":
            stored.update(body, metadata={**body["metadata"], "resourceVersion": "10"})
        else:
            stored.update(status=body["status"], metadata={**stored["metadata"], "resourceVersion": "11"})
        return dict(stored)

    monkeypatch.setattr(kube, "_call", api)
    scaler = {
        "kind": "InferenceRoleScaler",
        "metadata": {"name": "svc-decode", "namespace": "ns"},
        "spec": {},
    }
    assert kube.create(scaler) is not None
    assert cache.current("InferenceRoleScaler", "ns", "svc-decode") is not None
    kube.patch_status("InferenceRoleScaler", "svc-decode", "ns", {"replicas": 2})
    held = cache.current("InferenceRoleScaler", "ns", "svc-decode")
    assert held is not None and held["status"] == {"replicas": 2}
    assert held["metadata"]["resourceVersion"] == "11"
