"""Admission on the real API server: every sample is accepted; malformed resources are rejected
with a message that names the field to fix."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import Kube, fresh_namespace

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = REPO_ROOT / "manifests" / "samples"
_DELETE = object()


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((SAMPLES / name).read_text())


def _mutate(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


@pytest.fixture(scope="module")
def dry_run(crds: Kube) -> Iterator[Kube]:
    """One namespace for every server-side dry run: they create nothing, so they can share it."""
    yield from fresh_namespace(crds, "admission-dry-run", "--wait=false")


@pytest.mark.parametrize("path", sorted(SAMPLES.rglob("*.yaml")), ids=lambda p: p.name)
def test_samples_pass_server_side_dry_run(dry_run: Kube, path: Path) -> None:
    result = dry_run.run("apply", "--server-side", "--dry-run=server", "-f", str(path), check=False)
    assert result.returncode == 0, result.stderr


INFD = "inference-deepseek-v3.yaml"
TFS = "threefs-cluster.yaml"
TJ = "training-job.yaml"
XP = "small/expertplacement.yaml"

# (sample, changes, substrings the API server's message must contain)
MALFORMED: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        INFD,
        {"spec.decode.parallelism": {"tensor": 1, "data": 144, "expert": 128}},
        ["spec.decode.parallelism.expert", "parallelism.expert must equal nodesPerUnit × gpusPerNode"],
    ),
    (
        INFD,
        {"spec.prefill.parallelism": {"tensor": 2, "data": 32, "expert": 32}},
        ["spec.prefill.parallelism.data", "parallelism.tensor × parallelism.data must equal"],
    ),
    (
        INFD,
        {"spec.eplb.redundantExperts": 16},
        ["spec.decode.parallelism.expert", "must be divisible by decode.parallelism.expert"],
    ),
    (
        INFD,
        {"spec.eplb.redundantExperts": 8, "spec.decode.units": 0},
        ["spec.prefill.parallelism.expert", "must be divisible by prefill.parallelism.expert"],
    ),
    (
        INFD,
        {"spec.model.architecture.expertGroups": 7},
        ["spec.model.architecture.expertGroups", "routedExperts must be divisible by expertGroups"],
    ),
    (
        INFD,
        {"spec.model.architecture.topKGroups": 9},
        ["spec.model.architecture.topKGroups", "must not exceed expertGroups"],
    ),
    (
        INFD,
        {"spec.model.architecture.topKGroups": 1, "spec.model.architecture.topK": 40},
        ["spec.model.architecture.topK", "experts in the topKGroups selected groups"],
    ),
    (
        INFD,
        {"spec.model.architecture.firstDenseLayers": 61},
        ["spec.model.architecture.firstDenseLayers", "smaller than numLayers"],
    ),
    (
        INFD,
        {"spec.prefill.units": 0, "spec.decode.units": 0},
        ["spec.decode.units", "at least one prefill or decode unit"],
    ),
    (INFD, {"spec.engine": {"kind": "sglang"}}, ["spec.engine.image", "required for sglang and vllm"]),
    (INFD, {"spec.engine.kind": "tensorrt"}, ["spec.engine.kind", "Unsupported value"]),
    (INFD, {"spec.prefill.dispatchMode": "fast"}, ["spec.prefill.dispatchMode"]),
    (INFD, {"spec.decode.gpusPerNode": 0}, ["spec.decode.gpusPerNode"]),
    (INFD, {"spec.decode.nodesPerUnit": _DELETE}, ["spec.decode.nodesPerUnit", "Required value"]),
    (
        INFD,
        {"spec.eplb.windowSeconds": 60, "spec.eplb.intervalSeconds": 600},
        ["spec.eplb.windowSeconds", "at least eplb.intervalSeconds"],
    ),
    (INFD, {"spec.eplb.minGain": 2}, ["spec.eplb.minGain"]),
    (INFD, {"spec.eplb.mode": "sometimes"}, ["spec.eplb.mode"]),
    (
        INFD,
        {"spec.placement.requiredLevel": "leaf", "spec.placement.preferredLevel": "spine"},
        ["spec.placement.preferredLevel", "at or below requiredLevel"],
    ),
    (
        INFD,
        {"spec.placement.topologyProfile": "custom"},
        ["spec.placement.customLevelKeys", "needs customLevelKeys"],
    ),
    (INFD, {"spec.kvCache.path": "relative/dir"}, ["spec.kvCache.path", "absolute path"]),
    (INFD, {"spec.network.rdmaPerPod": -1}, ["spec.network.rdmaPerPod"]),
    (INFD, {"spec.router.policy": "random"}, ["spec.router.policy"]),
    (INFD, {"spec.prefill.replicas": 3}, ["spec.prefill.replicas", "field not declared in schema"]),
    (
        TFS,
        {"spec.storage.replicationFactor": 6},
        ["spec.storage.replicationFactor", "must not exceed storage.nodes"],
    ),
    (TFS, {"spec.storage.disksPerNode": 0}, ["spec.storage.disksPerNode"]),
    (TFS, {"spec.storage.targetsPerDisk": 100}, ["spec.storage.targetsPerDisk"]),
    (TFS, {"spec.storage.chunkSize": 1000000}, ["spec.storage.chunkSize", "power of two"]),
    (
        TFS,
        {"spec.storage.chainTableType": "EC"},
        ["spec.storage.replicationFactor", "EC takes storage.erasureCoding"],
    ),
    (
        TFS,
        {"spec.storage.chainTableType": "EC", "spec.storage.replicationFactor": _DELETE},
        ["spec.storage.erasureCoding", "needs storage.erasureCoding"],
    ),
    (
        TFS,
        {
            "spec.storage.chainTableType": "EC",
            "spec.storage.replicationFactor": _DELETE,
            "spec.storage.erasureCoding": {"dataShards": 4, "parityShards": 2},
        },
        ["spec.storage.erasureCoding", "must not exceed storage.nodes"],
    ),
    (
        TFS,
        {"spec.storage.replicationFactor": _DELETE},
        ["spec.storage.replicationFactor", "required for chainTableType CR"],
    ),
    (
        TFS,
        {
            "spec.foundationdb": {
                "managed": {"replicas": 3},
                "external": {"clusterFile": "fdb:abc@10.0.0.1:4500"},
            }
        },
        ["spec.foundationdb.managed", "exactly one of"],
    ),
    (TFS, {"spec.foundationdb": {}}, ["spec.foundationdb.managed", "exactly one of"]),
    (TFS, {"spec.mgmtd.replicas": 4}, ["spec.mgmtd.replicas"]),
    (TFS, {"spec.storage.diskPathTemplate": "/storage/data"}, ["spec.storage.diskPathTemplate", "{disk}"]),
    (TFS, {"spec.storage.stripeSize": 1000}, ["spec.storage.stripeSize", "number of chains"]),
    (TFS, {"spec.clients.mountPoint": "3fs"}, ["spec.clients.mountPoint", "absolute path"]),
    (TFS, {"spec.clients.mountPoint": "/3fs"}, ["spec.clients.mountPoint", "two levels"]),
    (TFS, {"spec.clients.mountPoint": "/3fs/a;reboot"}, ["spec.clients.mountPoint", "two levels"]),
    (TFS, {"spec.clients.mountPoint": "/"}, ["spec.clients.mountPoint", "two levels"]),
    (TFS, {"spec.clients.mountPoint": "/3fs/./stage"}, ["spec.clients.mountPoint", "segments"]),
    (TFS, {"spec.clients.mountPoint": "/usr/local/bin"}, ["spec.clients.mountPoint", "system directory"]),
    (TFS, {"spec.clients.mountPoint": "/etc/3fs"}, ["spec.clients.mountPoint", "system directory"]),
    (TFS, {"spec.clients.nodeSelector": {}}, ["spec.clients.nodeSelector", "must pick the client nodes"]),
    (TFS, {"spec.storage.diskPathTemplate": "/proc/{disk}"}, ["spec.storage.diskPathTemplate", "system"]),
    (TFS, {"spec.storage.diskPathTemplate": "/data/../{disk}"}, ["spec.storage.diskPathTemplate", "'..'"]),
    (TFS, {"spec.storage.diskPathTemplate": "/d{disk} x"}, ["spec.storage.diskPathTemplate", "letters"]),
    (
        TFS,
        {
            "spec.storage.tolerations": [
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 30}
            ]
        },
        ["spec.storage.tolerations", "replacement procedure"],
    ),
    (
        TFS,
        {"spec.storage.tolerations": [{"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}]},
        ["spec.storage.tolerations", "replacement procedure"],
    ),
    (
        TFS,
        {"spec.monitor.clickhouse": "external"},
        ["spec.monitor.externalAddress", "required when monitor.clickhouse is external"],
    ),
    (TFS, {"spec.reclaimPolicy": "Recycle"}, ["spec.reclaimPolicy"]),
    (
        TFS,
        {"spec.storage.targetsPerDisk": 7, "spec.storage.nodes": 5},
        ["spec.storage.targetsPerDisk", "multiple of the chain width"],
    ),
    (TFS, {"spec.image": _DELETE}, ["spec.image", "Required value"]),
    (
        TJ,
        {"spec.parallelism.schedule": "dualpipe", "spec.parallelism.pipeline": 15, "spec.nodes": 30},
        ["spec.parallelism.pipeline", "even"],
    ),
    (TJ, {"spec.nodes": 16}, ["spec.parallelism", "must equal nodes × gpusPerNode"]),
    (
        TJ,
        {"spec.parallelism.expert": 3},
        ["spec.parallelism.expert", "must divide parallelism.data × parallelism.tensor"],
    ),
    (TJ, {"spec.parallelism.schedule": "none"}, ["spec.parallelism.schedule", "needs a pipeline schedule"]),
    (TJ, {"spec.checkpoint": _DELETE}, ["spec.checkpoint", "resume latest needs checkpoint.path"]),
    (XP, {"spec.layers": 57}, ["spec.phy2log", "phy2log must have `layers` rows"]),
    (XP, {"spec.gpus": 31}, ["spec.phy2log", "gpus × slotsPerGpu entries"]),
    (XP, {"spec.logicalExperts": 255, "spec.slotsPerGpu": 9}, ["spec.phy2log", "below logicalExperts"]),
    (XP, {"spec.role": "router"}, ["spec.role"]),
    (XP, {"spec.generation": 0}, ["spec.generation"]),
]


@pytest.mark.parametrize(
    "sample,changes,expected",
    MALFORMED,
    ids=[
        f"{i:02d}-{s.split('/')[-1].split('.')[0]}-{next(iter(c))}" for i, (s, c, _) in enumerate(MALFORMED)
    ],
)
def test_malformed_resource_is_rejected_naming_the_field(
    dry_run: Kube, sample: str, changes: dict[str, Any], expected: list[str]
) -> None:
    doc = _mutate(_load(sample), changes)
    result = dry_run.run(
        "apply",
        "--server-side",
        "--dry-run=server",
        "-f",
        "-",
        stdin=yaml.safe_dump(doc, allow_unicode=True),
        check=False,
    )
    assert result.returncode != 0, f"accepted: {changes}"
    for text in expected:
        assert text in result.stderr, f"{text!r} not in {result.stderr!r}"


def test_storage_tolerations_with_limits_for_other_taints_are_accepted(dry_run: Kube) -> None:
    """Only a limit on tolerating a lost node is refused: a maintenance taint with
    tolerationSeconds, or the node-loss taints without one, are fine."""
    tolerations = [
        {
            "key": "example.com/maintenance",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 60,
        },
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    ]
    doc = _mutate(_load(TFS), {"spec.storage.tolerations": tolerations})
    result = dry_run.run(
        "apply", "--server-side", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(doc), check=False
    )
    assert result.returncode == 0, result.stderr


def test_architecture_is_immutable(crds: Kube, kube: Kube) -> None:
    doc = _load("small/inference.yaml")
    kube.apply(doc)
    changed = _mutate(doc, {"spec.model.architecture": {"numLayers": 30}})
    result = kube.apply(changed, check=False)
    assert result.returncode != 0
    assert "spec.model.architecture" in result.stderr and "immutable" in result.stderr


def test_threefs_storage_layout_is_fixed(crds: Kube, kube: Kube) -> None:
    doc = _load("small/threefs.yaml")
    doc["metadata"]["name"] = "layout-fixed"
    kube.apply(doc)
    for change in ({"spec.storage.targetsPerDisk": 4}, {"spec.storage.chunkSize": 2097152}):
        result = kube.apply(_mutate(doc, change), check=False)
        assert result.returncode != 0, change
        assert "storage layout" in result.stderr and "fixed once the file system exists" in result.stderr
    # Scheduling fields may change.
    assert (
        kube.apply(_mutate(doc, {"spec.storage.replacementGracePeriodSeconds": 60}), check=False).returncode
        == 0
    )


def test_defaults_are_applied_by_the_api_server(crds: Kube, kube: Kube) -> None:
    kube.apply(_load("small/inference.yaml"))
    stored = kube.get("inferencedeployment", "deepseek-v3-small")
    assert stored["spec"]["model"]["architecture"]["routedExperts"] == 256
    assert stored["spec"]["placement"]["requiredLevel"] == "spine"
    assert stored["spec"]["network"]["rdmaResource"] == "rdma/ib"
    assert stored["spec"]["eplb"]["policy"] == "auto"
    listed = kube.run("get", "fireflyer").stdout  # the category lists every kind
    assert "deepseek-v3-small" in listed
    short = kube.run("get", "infd").stdout
    for column in ("READY", "PREFILL", "DECODE", "BALANCEDNESS", "AGE"):
        assert column in short
