"""What unit pods mount: the role's current ExpertPlacement (a ConfigMap re-read in place, never a
new revision) and the kvCache 3FS cluster's FUSE mount, and the gate that holds units until that
cluster is Ready."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest

from fireflyer.api.inference import InferenceDeployment
from fireflyer.operator.inference import children, mounts
from fireflyer.operator.inference.plan import Desired, Observed, plan
from tests.unit.test_inference_plan import NOW, _nodes, _pods
from tests.unit.test_inference_revision import NODES, SAMPLE

NAME = SAMPLE["metadata"]["name"]


def _cr(**spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    doc["metadata"] |= {"namespace": "ns", "uid": "uid-1", "generation": 1}
    doc["spec"].update(spec)
    return doc


def _xp(role: str, generation: int, *, ours: bool = True, gpus: int = 32, fill: int = 0) -> dict[str, Any]:
    slots = 288 // gpus
    labels = {"app.kubernetes.io/managed-by": "fireflyer"} if ours else {}
    return {
        "apiVersion": "fireflyer.dev/v1alpha1",
        "kind": "ExpertPlacement",
        "metadata": {"name": f"{NAME}-{role}-{generation}", "namespace": "ns", "labels": labels},
        "spec": {
            "deployment": NAME,
            "role": role,
            "generation": generation,
            "layers": 58,
            "logicalExperts": 256,
            "gpus": gpus,
            "slotsPerGpu": slots,
            "phy2log": [[(s + fill) % 256 for s in range(gpus * slots)] for _ in range(58)],
        },
    }


def _plan(cr: dict[str, Any], **observed: Any) -> Desired:
    return plan(cr, Observed(nodes=_nodes(), pods=[], statefulsets={}, router=None, now=NOW, **observed))


def _child(desired: Desired, kind: str, name: str) -> dict[str, Any]:
    return next(c for c in desired.children if c["kind"] == kind and c["metadata"]["name"] == name)


def _unit(desired: Desired, role: str) -> dict[str, Any]:
    return _child(desired, "StatefulSet", children.unit_name(NAME, role, 0))


def _engine(sts: dict[str, Any]) -> dict[str, Any]:
    return sts["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def _volume(sts: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == name), None)


def _condition(desired: Desired, cond_type: str) -> dict[str, Any]:
    return next(c for c in desired.status["conditions"] if c["type"] == cond_type)


# --- the placement ConfigMap -------------------------------------------------------------------


def test_each_role_gets_its_current_placement_and_mounts_it() -> None:
    placements = [_xp("decode", 1), _xp("decode", 2, fill=7), _xp("prefill", 1, gpus=16)]
    desired = _plan(_cr(), placements=placements)

    decode_cm = _child(desired, "ConfigMap", f"{NAME}-decode-placement")
    doc = json.loads(decode_cm["data"]["placement.json"])
    assert set(doc) == {"generation", "layers", "logicalExperts", "gpus", "slotsPerGpu", "phy2log"}
    assert doc["generation"] == 2 and doc["gpus"] == 32 and doc["slotsPerGpu"] == 9
    assert doc["phy2log"] == placements[1]["spec"]["phy2log"]
    assert decode_cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    prefill_doc = json.loads(
        _child(desired, "ConfigMap", f"{NAME}-prefill-placement")["data"]["placement.json"]
    )
    assert prefill_doc["generation"] == 1 and prefill_doc["gpus"] == 16

    for role in ("prefill", "decode"):
        sts = _unit(desired, role)
        assert _volume(sts, "placement") == {
            "name": "placement",
            "configMap": {"name": f"{NAME}-{role}-placement"},
        }
        mount = next(m for m in _engine(sts)["volumeMounts"] if m["name"] == "placement")
        assert mount == {"name": "placement", "mountPath": "/etc/fireflyer/placement", "readOnly": True}
        # The serve command reads the same directory.
        assert "--placement-dir /etc/fireflyer/placement" in _engine(sts)["command"][2]
    # Applied before the units whose pods mount them.
    kinds = [(c["kind"], c["metadata"]["name"]) for c in desired.children]
    assert kinds.index(("ConfigMap", f"{NAME}-decode-placement")) < kinds.index(
        ("StatefulSet", children.unit_name(NAME, "decode", 0))
    )


def test_no_placement_yet_is_an_empty_document() -> None:
    desired = _plan(_cr())
    for role in ("prefill", "decode"):
        assert _child(desired, "ConfigMap", f"{NAME}-{role}-placement")["data"] == {"placement.json": "{}"}


def test_a_new_generation_changes_the_config_map_and_nothing_the_pods_run() -> None:
    first = _plan(_cr(), placements=[_xp("decode", 1)])
    sets = {c["metadata"]["name"]: c for c in first.children if c["kind"] == "StatefulSet"}
    pods = [pod for sts in sets.values() for pod in _pods(sts, NOW - timedelta(minutes=5))]
    second = plan(
        _cr(),
        Observed(
            nodes=_nodes(),
            pods=pods,
            statefulsets=sets,
            router=None,
            now=NOW,
            placements=[_xp("decode", 1), _xp("decode", 2, fill=3)],
        ),
    )
    name = f"{NAME}-decode-placement"
    assert json.loads(_child(second, "ConfigMap", name)["data"]["placement.json"])["generation"] == 2
    assert _child(first, "ConfigMap", name) != _child(second, "ConfigMap", name)
    assert _unit(second, "decode") == sets[children.unit_name(NAME, "decode", 0)]
    assert second.recreate == {}


def test_static_mode_uses_the_users_placement_and_skips_ones_that_do_not_fit() -> None:
    # Ours (left from dynamic mode) and a user's of the wrong width are not used.
    placements = [_xp("decode", 5), _xp("decode", 1, ours=False), _xp("decode", 2, ours=False, gpus=16)]
    cr = _cr(eplb={**SAMPLE["spec"]["eplb"], "mode": "static"})
    doc = json.loads(
        _child(_plan(cr, placements=placements), "ConfigMap", f"{NAME}-decode-placement")["data"][
            "placement.json"
        ]
    )
    assert doc["generation"] == 1 and doc["gpus"] == 32


def test_dynamic_mode_ignores_placements_of_other_deployments_and_roles() -> None:
    other = _xp("decode", 9)
    other["spec"]["deployment"] = "someone-else"
    going = _xp("decode", 8)
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    placements = [other, going, _xp("prefill", 7, gpus=16), _xp("decode", 3)]
    doc = json.loads(
        _child(_plan(_cr(), placements=placements), "ConfigMap", f"{NAME}-decode-placement")["data"][
            "placement.json"
        ]
    )
    assert doc["generation"] == 3


def test_eplb_off_mounts_no_placement() -> None:
    desired = _plan(_cr(eplb={"mode": "off", "redundantExperts": 0}), placements=[_xp("decode", 1)])
    assert not [c for c in desired.children if c["metadata"]["name"].endswith("-placement")]
    assert _volume(_unit(desired, "decode"), "placement") is None


# --- the unit revision ---------------------------------------------------------------------------


def test_revisions_of_existing_specs_are_unchanged() -> None:
    """Pinned: an operator upgrade must not restart units whose spec did not change."""
    spec = InferenceDeployment.model_validate(SAMPLE).spec
    assert children.revision(spec, "decode", NODES) == "1d8f13bab3"
    assert children.revision(spec, "prefill", ("a",)) == "ec5389069d"


def test_kv_cache_is_part_of_the_revision() -> None:
    doc = copy.deepcopy(SAMPLE)
    doc["spec"]["kvCache"] = {"threeFSCluster": "threefs", "path": "/3fs/stage/kv"}
    spec = InferenceDeployment.model_validate(doc).spec
    base = children.revision(spec, "decode", NODES, "/3fs/stage")
    assert base != children.revision(InferenceDeployment.model_validate(SAMPLE).spec, "decode", NODES)
    assert children.revision(spec, "decode", NODES, "/mnt/3fs") != base


# --- kvCache on 3FS ------------------------------------------------------------------------------

KV = {"threeFSCluster": "threefs", "path": "/3fs/stage/kvcache/small"}


def _cluster(ready: bool = True, mount: str | None = None, phase: str = "Ready") -> dict[str, Any]:
    spec: dict[str, Any] = {"clients": {"mountPoint": mount}} if mount else {}
    status = "True" if ready else "False"
    return {
        "metadata": {"name": "threefs", "namespace": "ns"},
        "spec": spec,
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": status, "message": phase}]},
    }


@pytest.mark.parametrize(
    ("path", "mount", "inside"),
    [
        ("/3fs/stage/kvcache", "/3fs/stage", True),
        ("/3fs/stage", "/3fs/stage/", True),
        ("/3fs/stagex/kv", "/3fs/stage", False),
        ("/3fs/stage/../etc", "/3fs/stage", False),
        ("/data/kv", "/3fs/stage", False),
    ],
)
def test_path_under(path: str, mount: str, inside: bool) -> None:
    assert mounts.path_under(path, mount) is inside


def test_units_mount_the_ready_clusters_fuse_mount() -> None:
    desired = _plan(_cr(kvCache=KV), threefs=_cluster())
    for role in ("prefill", "decode"):
        sts = _unit(desired, role)
        assert _volume(sts, "kv-cache") == {
            "name": "kv-cache",
            "hostPath": {"path": "/3fs/stage", "type": "Directory"},
        }
        mount = next(m for m in _engine(sts)["volumeMounts"] if m["name"] == "kv-cache")
        assert mount == {"name": "kv-cache", "mountPath": "/3fs/stage", "mountPropagation": "HostToContainer"}
        assert "--kv-cache-dir /3fs/stage/kvcache/small" in _engine(sts)["command"][2]
    cond = _condition(desired, "KvCacheReady")
    assert cond["status"] == "True" and cond["reason"] == "ThreeFSClusterReady"
    assert not [e for e in desired.events if e.reason.startswith("ThreeFS")]  # nothing changed


def test_a_custom_mount_point_is_mounted() -> None:
    kv = {"threeFSCluster": "threefs", "path": "/mnt/hf3fs/kv"}
    desired = _plan(_cr(kvCache=kv), threefs=_cluster(mount="/mnt/hf3fs"))
    assert _volume(_unit(desired, "decode"), "kv-cache")["hostPath"]["path"] == "/mnt/hf3fs"  # type: ignore[index]


@pytest.mark.parametrize(
    ("cluster", "reason"),
    [
        (None, "ThreeFSClusterNotFound"),
        (_cluster(ready=False, phase="Bootstrapping"), "ThreeFSClusterNotReady"),
    ],
)
def test_units_wait_for_their_3fs_cluster(cluster: dict[str, Any] | None, reason: str) -> None:
    desired = _plan(_cr(kvCache=KV), threefs=cluster)
    assert not [c for c in desired.children if c["kind"] == "StatefulSet"]
    assert _condition(desired, "KvCacheReady")["reason"] == reason
    assert _condition(desired, "DecodeReady")["reason"] == reason
    ready = _condition(desired, "Ready")
    assert ready["status"] == "False" and ready["reason"] == reason and "threefs" in ready["message"]
    assert [e.reason for e in desired.events] == [reason]
    assert desired.status["decodeReady"] == "0/1"

    # The Event is posted when the gate changes, not on every pass.
    cr = _cr(kvCache=KV)
    cr["status"] = {"conditions": desired.status["conditions"]}
    assert not _plan(cr, threefs=cluster).events
    # Once Ready: units are created, and an Event says so.
    after = _plan(cr, threefs=_cluster())
    assert {c["metadata"]["name"] for c in after.children if c["kind"] == "StatefulSet"} == {
        children.unit_name(NAME, "prefill", 0),
        children.unit_name(NAME, "decode", 0),
    }
    assert [(e.type, e.reason) for e in after.events if e.reason.startswith("ThreeFS")] == [
        ("Normal", "ThreeFSClusterReady")
    ]


def test_a_kv_path_outside_the_mount_is_an_invalid_spec() -> None:
    kv = {"threeFSCluster": "threefs", "path": "/data/kvcache"}
    desired = _plan(_cr(kvCache=kv), threefs=_cluster())
    assert not [c for c in desired.children if c["kind"] == "StatefulSet"]
    for cond_type, status in (("KvCacheReady", "False"), ("Ready", "False"), ("Degraded", "True")):
        cond = _condition(desired, cond_type)
        assert (cond["status"], cond["reason"]) == (status, "InvalidSpec")
        assert "/data/kvcache" in cond["message"] and "/3fs/stage" in cond["message"]
    assert [e.reason for e in desired.events] == ["InvalidSpec"]


def test_running_units_stay_when_their_cluster_goes_away_and_are_not_rolled() -> None:
    first = _plan(_cr(kvCache=KV), threefs=_cluster())
    sets = {c["metadata"]["name"]: c for c in first.children if c["kind"] == "StatefulSet"}
    pods = [pod for sts in sets.values() for pod in _pods(sts, NOW - timedelta(minutes=5))]
    # A changed engine argument makes every unit outdated; the cluster is gone meanwhile.
    cr = _cr(kvCache=KV, engine={"kind": "fireflyer", "args": ["--max-num-seqs", "8"]})
    desired = plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))
    assert desired.recreate == {}
    decode = _unit(desired, "decode")
    assert _volume(decode, "kv-cache")["hostPath"]["path"] == "/3fs/stage"  # type: ignore[index]
    assert _condition(desired, "KvCacheReady")["reason"] == "ThreeFSClusterNotFound"
