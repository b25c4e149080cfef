"""spec.dataPreparation: the `fireflyer prepare` Job that turns raw documents into the shards the
trainer reads, run before the training pods start. Pure builders and the gate the plan asks.

The Job is one pod (backoffLimit retries), on a CPU node picked by the preparation's own
nodeSelector and tolerations. `fireflyer prepare` exits at once when its output already holds
this preparation (its manifest matches), and says so in the termination message; the
DataPrepared condition reads it: Running, Succeeded, AlreadyPrepared or Failed. A finished
preparation Job is kept (with its logs); a later attempt of the job finds it complete and starts
at once. A change of the preparation's spec replaces it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fireflyer.api import conditions as C
from fireflyer.api.training import TrainingJobSpec
from fireflyer.operator import labels as L
from fireflyer.operator import pod_security as security
from fireflyer.operator.objects import owner_reference
from fireflyer.operator.planning import Event
from fireflyer.operator.training import children
from fireflyer.operator.training.failures import job_condition

COMPONENT = "data-preparation"
DATA_PREPARED = "DataPrepared"
# Reasons of DataPrepared (and of Ready while the data is not there yet).
RUNNING = "Running"
SUCCEEDED = "Succeeded"
ALREADY_PREPARED = "AlreadyPrepared"
FAILED = "Failed"
PREPARING_DATA = "PreparingData"
DATA_PREPARATION_FAILED = "DataPreparationFailed"
DEFAULT_RESOURCES = {"requests": {"cpu": "2", "memory": "8Gi"}}


def job_name(job: str) -> str:
    return f"{children.child_name(job)}-prepare"


def labels(job: str) -> dict[str, str]:
    return {L.TRAINING_JOB: children.label_value(job), L.COMPONENT: COMPONENT, L.MANAGED_BY: L.MANAGER}


def revision(spec: TrainingJobSpec) -> str:
    """What the preparation Job runs: a change replaces the Job."""
    assert spec.data_preparation is not None
    material = {
        "prep": spec.data_preparation.model_dump(by_alias=True, exclude_defaults=True, mode="json"),
        "output": spec.preparation_output,
        "tokenizer": spec.preparation_tokenizer,
        "image": spec.data_preparation.image or spec.image,
        "podLabels": spec.pod_labels,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]


def prepare_args(spec: TrainingJobSpec) -> list[str]:
    prep = spec.data_preparation
    assert prep is not None
    args = ["prepare", "--input", prep.input, "--tokenizer", spec.preparation_tokenizer]
    args += ["--out", spec.preparation_output, "--min-tokens", str(prep.min_tokens)]
    if prep.max_tokens is not None:
        args += ["--max-tokens", str(prep.max_tokens)]
    if not prep.dedup:
        args.append("--no-dedup")
    return args + list(prep.args)


def _host_paths(spec: TrainingJobSpec) -> list[tuple[str, str, bool]]:
    """(volume, path, read-only) of the absolute paths: read the input and tokenizer, write the
    output, at the same paths as on the node (3FS FUSE mounts)."""
    prep = spec.data_preparation
    assert prep is not None
    paths: dict[str, tuple[str, bool]] = {}
    for name, path in (("input", prep.input), ("tokenizer", spec.preparation_tokenizer)):
        if path.startswith("/"):
            paths.setdefault(path, (name, True))
    if spec.preparation_output.startswith("/"):
        paths[spec.preparation_output] = ("output", False)
    return [(name, path, ro) for path, (name, ro) in paths.items()]


def preparation_job(cr: dict[str, Any], spec: TrainingJobSpec) -> dict[str, Any]:
    prep = spec.data_preparation
    assert prep is not None
    name = cr["metadata"]["name"]
    mounts: list[dict[str, Any]] = [security.tmp_mount()]
    volumes: list[dict[str, Any]] = [security.tmp_volume()]
    children.add_host_paths(_host_paths(spec), volumes, mounts)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": security.pod_security_context(non_root=False),
        "containers": [
            {
                "name": "prepare",
                "image": prep.image or spec.image,
                "command": ["fireflyer"],
                "args": prepare_args(spec),
                "env": security.read_only_root_env(),
                "resources": prep.resources or DEFAULT_RESOURCES,
                # A crash before the result line still explains itself through its last logs.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": security.container_security_context(read_only_root=True),
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    if prep.node_selector:
        pod_spec["nodeSelector"] = dict(prep.node_selector)
    if prep.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in prep.tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "namespace": cr["metadata"]["namespace"],
            "labels": {**labels(name), L.REVISION: revision(spec)},
            "ownerReferences": [owner_reference(cr)],
        },
        "spec": {
            "backoffLimit": prep.backoff_limit,
            "template": {"metadata": {"labels": {**spec.pod_labels, **labels(name)}}, "spec": pod_spec},
        },
    }


def _messages(pods: list[dict[str, Any]], phase: str) -> list[str]:
    """Termination messages of the pods in a phase, the latest pod first."""
    found = []
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True):
        if pod.get("status", {}).get("phase") != phase:
            continue
        for container in pod.get("status", {}).get("containerStatuses") or []:
            message = ((container.get("state") or {}).get("terminated") or {}).get("message")
            if message:
                found.append(str(message).strip())
    return found


def _report(message: str) -> dict[str, Any]:
    """The JSON line `fireflyer prepare` ends with, or the raw text (logs of a crash)."""
    try:
        report = json.loads(message.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"message": message}
    return report if isinstance(report, dict) else {"message": message}


def outcome(spec: TrainingJobSpec, job: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[str, str]:
    """(DataPrepared reason, message) of a preparation Job."""
    prep = spec.data_preparation
    assert prep is not None
    where = f"{prep.input} → {spec.preparation_output}"
    if job_condition(job, "Complete") or int(job.get("status", {}).get("succeeded") or 0) > 0:
        report = next((_report(m) for m in _messages(pods, "Succeeded")), {})
        if report.get("result") == "already-prepared":
            return ALREADY_PREPARED, f"{spec.preparation_output} is already prepared from {prep.input}"
        if "documents" in report:
            return SUCCEEDED, (
                f"{where}: {report['documents']} documents, {report.get('tokens', 0)} tokens"
                f" ({report.get('duplicates', 0)} duplicates, {report.get('too_short', 0)} too short,"
                f" {report.get('too_long', 0)} too long dropped)"
            )
        return SUCCEEDED, where
    failed = job_condition(job, "Failed")
    if failed:
        report = next((_report(m) for m in _messages(pods, "Failed")), {})
        why = report.get("message") or f"{failed.get('reason', '')}: {failed.get('message', '')}"
        return FAILED, str(why)[:1000]
    return RUNNING, f"preparing {where}"


def gate(
    cr: dict[str, Any],
    spec: TrainingJobSpec,
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    previous: dict[str, Any],
) -> tuple[dict[str, Any], list[Event], list[dict[str, Any]], bool]:
    """Before an attempt starts: (the DataPrepared condition, events, children to apply, delete
    the preparation Job). The attempt may start when the condition is True."""
    prep = spec.data_preparation
    assert prep is not None
    before: dict[str, Any] = next(
        (c for c in previous.get("conditions") or [] if c.get("type") == DATA_PREPARED), {}
    )
    if job is None:
        message = f"preparing {prep.input} → {spec.preparation_output}"
        event = Event("Normal", "DataPreparationStarted", message)
        return (
            C.condition(DATA_PREPARED, False, RUNNING, message),
            [event],
            [preparation_job(cr, spec)],
            False,
        )
    if job["metadata"].get("deletionTimestamp"):
        return (
            C.condition(DATA_PREPARED, False, RUNNING, "the previous preparation Job is going away"),
            [],
            [],
            False,
        )
    if (job["metadata"].get("labels") or {}).get(L.REVISION) != revision(spec):
        message = "dataPreparation changed; replacing the preparation Job"
        return C.condition(DATA_PREPARED, False, RUNNING, message), [], [], True
    reason, message = outcome(spec, job, pods)
    events = []
    if reason != before.get("reason"):
        if reason == FAILED:
            events.append(Event("Warning", DATA_PREPARATION_FAILED, message))
        elif reason in (SUCCEEDED, ALREADY_PREPARED):
            events.append(Event("Normal", "DataPrepared", message))
    return (
        C.condition(DATA_PREPARED, reason in (SUCCEEDED, ALREADY_PREPARED), reason, message),
        events,
        [],
        False,
    )
