"""Desired child objects of a TrainingJob (pure builders): one indexed Job whose pods are the
job's nodes, and a headless Service through which the ranks find rank 0.

Why an indexed Job and not a StatefulSet: a training run ends. With restartPolicy Never a rank
that exits 0 stays Succeeded and the Job turns Complete when every index has, which is exactly
"the run finished"; a StatefulSet would start the finished pod again. A rank that exits non-zero
stays Failed (its logs kept) instead of being restarted in place, and backoffLimit 0 makes the Job
controller never replace one rank on its own: the operator restarts the whole job, because the
surviving ranks hold collectives with a rank that is gone. The completion index is a stable
NODE_RANK and gives each pod the host name <job>-<index>, so rank 0 has a DNS name through the
headless Service before any pod exists. One Job is one attempt: deleting it removes every pod of
the attempt at once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fireflyer.api.training import TrainingJobSpec
from fireflyer.operator import labels as L
from fireflyer.operator import pod_security as security
from fireflyer.operator.network import hca_env, network_env
from fireflyer.operator.objects import owner_reference
from fireflyer.placement.pinning import pod_placement

MASTER_PORT = 29500
STATUS_PORT = 29600
DEFAULT_COMMAND = ("fireflyer", "train")
SHM_SIZE = "64Gi"
COMPONENT = "trainer"
ATTEMPT_ANNOTATION = L.ATTEMPT  # on the Job; the pods carry it as a label
MAX_NAME = 50  # pod host names are <job>-<index> and must stay within 63 characters


def child_name(job: str) -> str:
    """The Job's and the Service's name: the TrainingJob's, made a DNS label short enough for
    pod host names (a Service name must start with a letter and hold no dots)."""
    name = job.replace(".", "-")
    if not name[:1].isalpha():
        name = f"tj-{name}"
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(job.encode()).hexdigest()[:5]
        name = f"{name[: MAX_NAME - 6].rstrip('-')}-{digest}"
    return name


def label_value(job: str) -> str:
    """The TrainingJob's name as a label value (at most 63 characters)."""
    if len(job) <= 63:
        return job
    return f"{job[:57].rstrip('-.')}-{hashlib.sha256(job.encode()).hexdigest()[:5]}"


def master_addr(job: str, namespace: str) -> str:
    """DNS name of rank 0 (completion index 0) through the headless Service."""
    name = child_name(job)
    return f"{name}-0.{name}.{namespace}.svc.cluster.local"


def base_labels(job: str) -> dict[str, str]:
    return {L.TRAINING_JOB: label_value(job), L.COMPONENT: COMPONENT, L.MANAGED_BY: L.MANAGER}


def revision(spec: TrainingJobSpec) -> str:
    """Everything that, when it changes, needs the pods recreated. restart and placement are
    left out: they take effect at the next start and never restart a running job by themselves
    (so do preemptible and terminationGracePeriodSeconds).
    Fields at their defaults are left out too, so that an operator upgrade that adds a field
    does not restart every running job."""
    material = spec.model_dump(by_alias=True, exclude_defaults=True, mode="json")
    material.pop("restart", None)
    material.pop("placement", None)
    material.pop("preemptible", None)  # read by the lending decision, not by the pods
    material.pop("terminationGracePeriodSeconds", None)  # the next attempt's pods get it
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]


def trainer_args(spec: TrainingJobSpec) -> list[str]:
    """`fireflyer train` flags rendered from the spec, then spec.args. Every rank gets the same
    line; only rank 0 serves /status on --status-port."""
    args: list[str] = []
    if spec.model.source:
        args += ["--model", spec.model.source]
    if spec.dataset:
        args += ["--data", spec.dataset.path]
    if spec.checkpoint:
        args += [
            "--checkpoint-dir",
            spec.checkpoint.path,
            "--checkpoint-every",
            str(spec.checkpoint.interval_steps),
            "--keep",
            str(spec.checkpoint.keep),
        ]
    args += [
        "--pipeline",
        str(spec.parallelism.pipeline),
        "--schedule",
        spec.parallelism.schedule,
        "--micro-batches",
        str(spec.effective_micro_batches),
        "--steps",
        str(spec.steps),
        "--status-port",
        str(STATUS_PORT),
    ]
    # The trainer's expert groups (ranks that split the routed experts); it does not combine them
    # with a pipeline yet, so there every stage keeps all its experts (docs/training-operator.md).
    if spec.parallelism.expert > 1 and spec.parallelism.pipeline == 1:
        args += ["--expert-parallel", str(spec.parallelism.expert)]
    return args + list(spec.args)


def add_host_paths(
    paths: list[tuple[str, str, bool]], volumes: list[dict[str, Any]], mounts: list[dict[str, Any]]
) -> None:
    """Node directories (volume name, path, read-only) as hostPath volumes mounted at the same
    path; a writable one is created when missing. HostToContainer: a FUSE mount that comes back
    after the pod started is seen."""
    for volume, path, read_only in paths:
        kind = "Directory" if read_only else "DirectoryOrCreate"
        volumes.append({"name": volume, "hostPath": {"path": path, "type": kind}})
        mounts.append(
            {"name": volume, "mountPath": path, "readOnly": read_only, "mountPropagation": "HostToContainer"}
        )


def rendezvous_env(job: str, namespace: str, spec: TrainingJobSpec) -> list[dict[str, Any]]:
    index = f"metadata.annotations['{L.COMPLETION_INDEX}']"
    return [
        {"name": "MASTER_ADDR", "value": master_addr(job, namespace)},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(spec.nodes)},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": index}}},
        {"name": "NPROC_PER_NODE", "value": str(spec.gpus_per_node)},
    ]


def _resources(spec: TrainingJobSpec) -> dict[str, Any]:
    amounts = {"nvidia.com/gpu": str(spec.gpus_per_node)}
    if spec.network.rdma_per_pod:
        amounts[spec.network.rdma_resource] = str(spec.network.rdma_per_pod)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _host_paths(spec: TrainingJobSpec) -> list[tuple[str, str, bool]]:
    """(volume name, path, read-only) of the absolute paths the trainer reads and writes: they
    live on the node (a 3FS FUSE mount or a local disk) and are seen at the same path."""
    paths: dict[str, tuple[str, bool]] = {}
    if spec.model.source and spec.model.source.startswith("/"):
        paths[spec.model.source] = ("model", True)
    if spec.dataset and spec.dataset.path.startswith("/"):
        paths.setdefault(spec.dataset.path, ("data", True))
    if spec.checkpoint and spec.checkpoint.path.startswith("/"):
        paths[spec.checkpoint.path] = ("checkpoint", False)  # written: never read-only
    return [(name, path, ro) for path, (name, ro) in paths.items()]


def job(
    cr: dict[str, Any],
    spec: TrainingJobSpec,
    attempt: int,
    nodes: tuple[str, ...],
    domain: tuple[str, str, str],
    placed_at: str,
    node_objs: list[dict[str, Any]],
) -> dict[str, Any]:
    """One attempt of the job: an indexed Job of one pod per planned node, pinned to the planned
    nodes inside the planned domain (level, node label key, value; no key: the whole cluster).
    node_objs are the planned Node objects (their NIC annotations give the HCA list)."""
    name = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    child = child_name(name)
    selector = {L.TRAINING_JOB: label_value(name)}
    pod_labels = {**spec.pod_labels, **base_labels(name), L.ATTEMPT: str(attempt)}
    # `fireflyer train` writes to /tmp, /dev/shm and the node paths only; a command of the job's
    # own may write anywhere.
    read_only_root = not spec.command
    mounts: list[dict[str, Any]] = [security.tmp_mount(), {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        security.tmp_volume(),
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
    ]
    add_host_paths(_host_paths(spec), volumes, mounts)
    container: dict[str, Any] = {
        "name": "trainer",
        "image": spec.image,
        "command": list(spec.command) or list(DEFAULT_COMMAND),
        "args": trainer_args(spec),
        "env": [
            *rendezvous_env(name, namespace, spec),
            *network_env(spec.network),
            *(hca_env(node_objs, spec.gpus_per_node) if spec.network.rdma_per_pod else []),
            {"name": "FIREFLYER_TRAINING_JOB", "value": name},
            *(security.read_only_root_env() if read_only_root else []),
        ],
        "ports": [
            {"name": "rendezvous", "containerPort": MASTER_PORT},
            {"name": "status", "containerPort": STATUS_PORT},
        ],
        "resources": _resources(spec),
        "securityContext": security.container_security_context(
            read_only_root=read_only_root, add=security.rdma_capabilities(spec.network)
        ),
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": child,
            "namespace": namespace,
            "labels": {**base_labels(name), L.REVISION: revision(spec)},
            "annotations": {
                ATTEMPT_ANNOTATION: str(attempt),
                L.PLACED_AT: placed_at,
                L.PLACED_DOMAIN: f"{domain[0]}/{domain[2]}",
            },
            "ownerReferences": [owner_reference(cr)],
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.nodes,
            "parallelism": spec.nodes,
            # The Job controller never replaces a rank: any failure fails the Job and the
            # operator restarts the whole job (restart.maxRestarts).
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    # Time for a deleted pod's trainer to finish its step and checkpoint it.
                    "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
                    "subdomain": child,
                    "schedulerName": spec.placement.scheduler_name or "default-scheduler",
                    "hostNetwork": spec.network.host_network,
                    "dnsPolicy": "ClusterFirstWithHostNet" if spec.network.host_network else "ClusterFirst",
                    **pod_placement(spec.placement, selector, nodes, domain),
                    "securityContext": security.pod_security_context(non_root=False),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def headless_service(cr: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's DNS name for MASTER_ADDR: <job>-0.<service>.<namespace>.svc."""
    name = cr["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": child_name(name),
            "namespace": cr["metadata"]["namespace"],
            "labels": base_labels(name),
            "ownerReferences": [owner_reference(cr)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # ranks rendezvous before anything is Ready
            "selector": {L.TRAINING_JOB: label_value(name), L.COMPONENT: COMPONENT},
            "ports": [
                {"name": "rendezvous", "port": MASTER_PORT},
                {"name": "status", "port": STATUS_PORT},
            ],
        },
    }
