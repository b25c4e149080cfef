"""spec.dataPreparation in the TrainingJob plan (pure): the preparation Job comes first, the
training pods only after it succeeded, DataPrepared says how it went, a failure fails the job."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from fireflyer.api.training import TrainingJob
from fireflyer.cli import build_parser
from fireflyer.operator import labels as L
from fireflyer.operator.training import children, dataprep
from fireflyer.operator.training.plan import Desired, finished, plan
from tests.unit.training_plan_harness import NS, observed_with, small_nodes

REPO = Path(__file__).resolve().parents[2]
SAMPLE = yaml.safe_load((REPO / "manifests/samples/training-dataprep.yaml").read_text())
NAME = SAMPLE["metadata"]["name"]


def _cr(status: dict[str, Any] | None = None, **prep: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    doc["metadata"].update(namespace=NS, uid="cr-uid", generation=1)
    doc["spec"]["dataPreparation"].update(prep)
    if status is not None:
        doc["status"] = status
    return doc


def _kinds(desired: Desired) -> list[str]:
    return sorted(f"{c['kind']}/{c['metadata']['name']}" for c in desired.children)


def _cond(desired: Desired, type_: str) -> dict[str, Any]:
    return next(c for c in desired.status["conditions"] if c["type"] == type_)


def _prep_job(cr: dict[str, Any], **status: Any) -> dict[str, Any]:
    [job] = [c for c in plan(cr, observed_with()).children if c["kind"] == "Job"]
    job = copy.deepcopy(job)
    job["metadata"]["uid"] = "prep-uid"
    job["status"] = status
    return job


def _prep_pod(
    phase: str, message: str | None = None, created: str = "2025-01-01T11:59:00Z"
) -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": 0 if phase == "Succeeded" else 2}
    if message is not None:
        terminated["message"] = message
    return {
        "metadata": {"name": f"{NAME}-prepare-x", "creationTimestamp": created, "labels": {}},
        "spec": {},
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": "prepare", "state": {"terminated": terminated}}],
        },
    }


COMPLETE = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
FAILED = {"failed": 2, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}


def test_the_preparation_job_comes_first_and_no_training_job_yet() -> None:
    desired = plan(_cr(), observed_with())
    assert _kinds(desired) == [f"Job/{NAME}-prepare", f"Service/{NAME}"]
    assert desired.status["phase"] == "Pending"
    prepared = _cond(desired, dataprep.DATA_PREPARED)
    assert (prepared["status"], prepared["reason"]) == ("False", "Running")
    assert _cond(desired, "Ready")["reason"] == dataprep.PREPARING_DATA
    assert [e.reason for e in desired.events] == ["DataPreparationStarted"]

    job = next(c for c in desired.children if c["kind"] == "Job")
    assert job["metadata"]["ownerReferences"][0]["uid"] == "cr-uid"
    assert job["metadata"]["labels"][L.COMPONENT] == dataprep.COMPONENT
    assert job["spec"]["backoffLimit"] == 1
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["fireflyer"]
    assert container["args"] == [
        "prepare",
        "--input",
        "/3fs/stage/raw/moe-tiny",
        "--tokenizer",
        "/3fs/stage/models/moe-tiny",  # default: model.source
        "--out",
        "/3fs/stage/datasets/moe-tiny",  # default: dataset.path
        "--min-tokens",
        "16",
        "--max-tokens",
        "4096",
    ]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}}
    mounts = {m["mountPath"]: m["readOnly"] for m in container["volumeMounts"] if m["name"] != "tmp"}
    assert mounts == {
        "/3fs/stage/raw/moe-tiny": True,
        "/3fs/stage/models/moe-tiny": True,
        "/3fs/stage/datasets/moe-tiny": False,
    }
    assert pod["restartPolicy"] == "Never"


def test_options_placement_and_explicit_paths() -> None:
    cr = _cr(
        output="/3fs/other/out",
        tokenizer="/3fs/other/tok",
        dedup=False,
        maxTokens=None,
        args=["--shard-tokens", "1000"],
        nodeSelector={"pool": "cpu"},
        tolerations=[{"key": "cpu-only", "operator": "Exists", "effect": "NoSchedule"}],
        image="example/prepare:1",
        backoffLimit=0,
    )
    job = next(c for c in plan(cr, observed_with()).children if c["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--out") + 1] == "/3fs/other/out"
    assert args[args.index("--tokenizer") + 1] == "/3fs/other/tok"
    assert "--no-dedup" in args and "--max-tokens" not in args and args[-2:] == ["--shard-tokens", "1000"]
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["tolerations"][0]["key"] == "cpu-only"
    assert pod["containers"][0]["image"] == "example/prepare:1"
    assert job["spec"]["backoffLimit"] == 0


def test_training_waits_while_the_preparation_runs() -> None:
    cr = _cr()
    desired = plan(cr, observed_with(preparation=_prep_job(cr, active=1)))
    assert _kinds(desired) == [f"Service/{NAME}"]  # no training Job, and the running one is not re-applied
    assert _cond(desired, dataprep.DATA_PREPARED)["reason"] == "Running"
    assert desired.events == []


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ('{"result": "already-prepared", "out": "/3fs/stage/datasets/moe-tiny"}', "AlreadyPrepared"),
        ('{"result": "prepared", "documents": 7, "tokens": 900, "duplicates": 2}', "Succeeded"),
        (None, "Succeeded"),
    ],
)
def test_a_succeeded_preparation_starts_the_training_pods(message: str | None, reason: str) -> None:
    cr = _cr()
    observed = observed_with(
        preparation=_prep_job(cr, **COMPLETE), preparation_pods=[_prep_pod("Succeeded", message)]
    )
    desired = plan(cr, observed)
    assert _kinds(desired) == [f"Job/{children.child_name(NAME)}", f"Service/{NAME}"]
    prepared = _cond(desired, dataprep.DATA_PREPARED)
    assert (prepared["status"], prepared["reason"]) == ("True", reason)
    if reason == "Succeeded" and message:
        assert "7 documents, 900 tokens" in prepared["message"]
    assert "DataPrepared" in [e.reason for e in desired.events]
    assert _cond(desired, "Placed")["status"] == "True"


def test_a_failed_preparation_fails_the_job_with_its_message() -> None:
    cr = _cr()
    pods = [
        _prep_pod("Failed", '{"result": "failed", "message": "old"}', created="2025-01-01T11:58:00Z"),
        _prep_pod("Failed", '{"result": "failed", "message": "/raw/a.jsonl: line 2 has no `text` field"}'),
    ]
    desired = plan(cr, observed_with(preparation=_prep_job(cr, **FAILED), preparation_pods=pods))
    assert desired.status["phase"] == "Failed"
    assert _kinds(desired) == [f"Service/{NAME}"]
    prepared = _cond(desired, dataprep.DATA_PREPARED)
    assert (prepared["status"], prepared["reason"]) == ("False", "Failed")
    assert prepared["message"] == "/raw/a.jsonl: line 2 has no `text` field"
    assert _cond(desired, "Ready")["reason"] == dataprep.DATA_PREPARATION_FAILED
    assert "line 2" in desired.status["lastFailure"]
    assert [e.reason for e in desired.events] == [dataprep.DATA_PREPARATION_FAILED]
    # Failed stays observed (a fixed spec replaces the Job) and the event is not repeated.
    again = _cr(status=desired.status | {"conditions": desired.status["conditions"]})
    assert not finished(again)
    assert plan(again, observed_with(preparation=_prep_job(cr, **FAILED), preparation_pods=pods)).events == []


def test_crash_logs_explain_a_preparation_without_a_result_line() -> None:
    cr = _cr()
    pods = [_prep_pod("Failed", "Traceback ...\nMemoryError")]
    desired = plan(cr, observed_with(preparation=_prep_job(cr, **FAILED), preparation_pods=pods))
    assert "MemoryError" in _cond(desired, dataprep.DATA_PREPARED)["message"]


def test_a_changed_preparation_replaces_the_job() -> None:
    old = _prep_job(_cr(), **FAILED)
    desired = plan(_cr(input="/3fs/stage/raw/fixed"), observed_with(preparation=old))
    assert desired.delete_preparation
    assert desired.status["phase"] == "Pending"
    assert _kinds(desired) == [f"Service/{NAME}"]


def test_a_running_attempt_is_not_held_back_by_the_preparation() -> None:
    """The gate is only asked before an attempt starts: a current attempt runs on."""
    cr = _cr()
    started = plan(
        cr, observed_with(preparation=_prep_job(cr, **COMPLETE), preparation_pods=[_prep_pod("Succeeded")])
    )
    job = next(c for c in started.children if c["metadata"]["name"] == children.child_name(NAME))
    job = copy.deepcopy(job) | {"status": {}}
    job["metadata"]["uid"] = "job-uid"
    desired = plan(cr, observed_with(job=job, nodes=small_nodes()))
    assert desired.status["phase"] == "Pending"  # pods starting
    assert not any(c["metadata"]["name"].endswith("-prepare") for c in desired.children)


def test_defaults_and_field_bounds() -> None:
    spec = TrainingJob.model_validate(_cr()).spec
    assert spec.preparation_output == "/3fs/stage/datasets/moe-tiny"
    assert spec.preparation_tokenizer == "/3fs/stage/models/moe-tiny"
    for bad in ({"input": ""}, {"minTokens": -1}, {"backoffLimit": 11}):
        with pytest.raises(ValidationError):
            TrainingJob.model_validate(_cr(**bad))


def test_rendered_arguments_are_ones_prepare_accepts() -> None:
    parser = build_parser()
    commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    assert "prepare" in commands
    for cr in (_cr(), _cr(dedup=False, maxTokens=None, args=["--shard-tokens", "64"])):
        job = next(c for c in plan(cr, observed_with()).children if c["kind"] == "Job")
        parser.parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"])
