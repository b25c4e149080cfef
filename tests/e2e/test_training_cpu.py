"""The CPU training sample on the local nodes: two real trainer processes (gloo over the pod
network) checkpoint, one is killed, the operator restarts the whole job, and the new attempt
resumes from the checkpoint and finishes."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.dev import demo
from fireflyer.operator import labels as L
from tests.conftest import Operator
from tests.e2e.conftest import needs_root
from tests.kube import Kube, fresh_namespace, wait_for

pytestmark = [pytest.mark.integration, needs_root]
REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = yaml.safe_load((REPO_ROOT / "manifests/samples/small/training-cpu.yaml").read_text())
NAME = SAMPLE["metadata"]["name"]


def _job(kube: Kube) -> dict[str, Any]:
    return kube.get("trainingjob", NAME)  # type: ignore[no-any-return]


def _pods(kube: Kube) -> list[dict[str, Any]]:
    return kube.get("pods")["items"]  # type: ignore[no-any-return]


def _checkpoints(directory: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1]) for p in directory.glob("step-*") if (p / "manifest.json").exists()
    )


def _kill_pod_processes(uid: str) -> int:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    space = next(n for n in names if n.endswith(uid[:12]))
    pids = subprocess.run(["ip", "netns", "pids", space], capture_output=True, text=True).stdout.split()
    killed = 0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # a short-lived child (a sleep) ended on its own
            os.kill(int(pid), signal.SIGKILL)
            killed += 1
    return killed


@pytest.fixture
def ns(local_cluster: Kube, local_operator: Operator, tiny_model: str) -> Iterator[Kube]:
    demo.ensure_docs_dataset(Path(tiny_model))
    yield from fresh_namespace(local_cluster, "train-cpu", "--timeout=120s")


def _diagnosis(kube: Kube, operator: Operator) -> str:
    """What a stuck restart looks like: the job's status, every pod, their logs' ends, the operator."""
    lines = [f"status: {_job(kube).get('status')}"]
    for pod in _pods(kube):
        meta, status = pod["metadata"], pod.get("status") or {}
        lines.append(
            f"pod {meta['name']} attempt {meta['labels'].get(L.ATTEMPT)} "
            f"index {meta['labels'].get('batch.kubernetes.io/job-completion-index')} "
            f"phase {status.get('phase')} ip {status.get('podIP')} node {pod['spec'].get('nodeName')} "
            f"deleting {bool(meta.get('deletionTimestamp'))}"
        )
        logs = kube.run("logs", meta["name"], "--tail=15", check=False)
        lines += [f"  | {line}" for line in (logs.stdout + logs.stderr).splitlines()]
    for node in kube.get("nodes", namespaced=False)["items"]:
        ready = [c for c in node["status"].get("conditions") or [] if c["type"] == "Ready"]
        lines.append(f"node {node['metadata']['name']}: {ready} taints {node['spec'].get('taints')}")
    runtime_log = kube.kubeconfig.parent / "logs" / "pod-runtime.log"
    if runtime_log.exists():
        lines += ["pod runtime log:", *runtime_log.read_text(errors="replace").splitlines()[-40:]]
    return "\n".join(lines) + f"\noperator log:\n{operator.tail()}"


def test_a_killed_rank_restarts_the_job_which_resumes_from_its_checkpoint(
    ns: Kube, tmp_path: Path, local_operator: Operator
) -> None:
    doc = copy.deepcopy(SAMPLE)
    checkpoints = tmp_path / "checkpoints"
    doc["spec"]["steps"] = 60
    doc["spec"]["checkpoint"] = {"path": str(checkpoints), "intervalSteps": 10, "keep": 2}
    ns.apply(doc)
    wait_for("the first checkpoint", lambda: _checkpoints(checkpoints), timeout=180)
    first = _pods(ns)
    victim = next(
        p for p in first if p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "1"
    )
    assert _kill_pod_processes(victim["metadata"]["uid"]) > 0
    restarted = wait_for(
        "restarts = 1", lambda: (_job(ns).get("status") or {}).get("restarts") == 1, timeout=90
    )
    assert restarted
    events = ns.run("get", "events", "--field-selector", f"involvedObject.name={NAME}", "-o", "name").stdout
    assert events.strip(), "the restart is announced in an Event"

    def leader_log() -> str:
        pods = [p for p in _pods(ns) if p["metadata"]["uid"] not in {q["metadata"]["uid"] for q in first}]
        leader = [
            p for p in pods if p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "0"
        ]
        if not leader:
            return ""
        result = ns.run("logs", leader[0]["metadata"]["name"], check=False)
        resumed_and_stepping = "resumed from the checkpoint of step" in result.stdout and any(
            line.startswith("step ") for line in result.stdout.splitlines()
        )
        return result.stdout if resumed_and_stepping else ""

    try:
        log = wait_for("the new attempt to resume", leader_log, timeout=120)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{_diagnosis(ns, local_operator)}") from None
    resumed = int(log.split("resumed from the checkpoint of step ")[1].split()[0])
    assert resumed >= 10 and resumed % 10 == 0
    first_step = next(line for line in log.splitlines() if line.startswith("step "))
    assert int(first_step.split()[1]) == resumed + 1, "training continues after the checkpoint, not from 0"
    done = wait_for(
        "Succeeded",
        lambda: (s := _job(ns).get("status") or {}).get("phase") == "Succeeded" and s,
        timeout=240,
    )
    assert done["restarts"] == 1
    assert done.get("step") == 60, "the final step comes from rank 0's termination message"
    assert _checkpoints(checkpoints)[-1] == 60


def test_a_survivor_that_ignores_sigterm_does_not_hold_the_restart_back(
    ns: Kube, local_operator: Operator
) -> None:
    """A rank stuck in a collective with a dead peer never checkpoints and may never honour SIGTERM.
    After one rank fails, the other's pod ends within seconds, not after the pods' own grace,
    and the next attempt starts."""
    doc = copy.deepcopy(SAMPLE)
    doc["spec"]["command"] = ["/bin/sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"]
    doc["spec"]["args"] = []
    # Longer than the wait below, so that only the failed attempt's short grace can pass the test.
    doc["spec"]["terminationGracePeriodSeconds"] = 100
    ns.apply(doc)
    try:
        _restart_past_a_stuck_survivor(ns, local_operator)
    finally:
        # The pods ignore SIGTERM: end them with a short grace once no Job can recreate them.
        ns.run("delete", "trainingjob", NAME, "--timeout=60s", check=False)
        ns.run("delete", "jobs", "--all", "--cascade=orphan", "--timeout=60s", check=False)
        ns.run("delete", "pods", "--all", "--grace-period=1", "--timeout=60s", check=False)


def _restart_past_a_stuck_survivor(ns: Kube, local_operator: Operator) -> None:
    def running() -> list[dict[str, Any]]:
        pods = [p for p in _pods(ns) if (p.get("status") or {}).get("phase") == "Running"]
        return pods if len(pods) == 2 else []

    first = wait_for("both ranks running", running, timeout=120)
    victim = next(
        p for p in first if p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "1"
    )
    assert _kill_pod_processes(victim["metadata"]["uid"]) > 0
    started = time.monotonic()

    def next_attempt() -> bool:
        pods = _pods(ns)
        old = [p for p in pods if p["metadata"]["labels"].get(L.ATTEMPT) == "0"]
        new = [p for p in pods if p["metadata"]["labels"].get(L.ATTEMPT) == "1"]
        return not old and len(new) == 2

    try:
        wait_for("the next attempt's pods, the old ones gone", next_attempt, timeout=90)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{_diagnosis(ns, local_operator)}") from None
    elapsed = time.monotonic() - started
    assert elapsed < 60, f"the restart took {elapsed:.0f} s"
    assert (_job(ns).get("status") or {}).get("restarts") == 1
