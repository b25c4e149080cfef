"""The TrainingJob plan (pure): whole-job placement, the rendered pods, restart decisions and the
status read from rank 0."""

from __future__ import annotations

import argparse
import copy
import http.server
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.cli import build_parser
from fireflyer.dev import topology as dev_topology
from fireflyer.operator import labels as L
from fireflyer.operator.training import children
from fireflyer.operator.training.controller import fetch_progress
from fireflyer.operator.training.plan import Desired, Observed, plan
from fireflyer.operator.training.progress import progress_changes, progress_status, rank0_address
from fireflyer.placement.reservations import planned_nodes, reservations

REPO = Path(__file__).resolve().parents[2]
SMALL = yaml.safe_load((REPO / "manifests/samples/small/training.yaml").read_text())
NAME = SMALL["metadata"]["name"]
NS = "ml"
LEAF = "network.topology.nvidia.com/leaf"
NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def _nodes(not_ready: tuple[str, ...] = (), gone: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    nodes = [n for n in dev_topology.nodes(dev_topology.load("small")) if n["metadata"]["name"] not in gone]
    for node in nodes:
        ready = "False" if node["metadata"]["name"] in not_ready else "True"
        node["status"]["conditions"] = [{"type": "Ready", "status": ready}]
    return nodes


def _cr(
    status: dict[str, Any] | None = None, labels: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc["metadata"].update(namespace=NS, uid="cr-uid", generation=1, labels=labels or {})
    doc["spec"].update(spec)
    if status is not None:
        doc["status"] = status
    return doc


def _observed(
    job: dict[str, Any] | None = None,
    pods: list[dict[str, Any]] | None = None,
    nodes: list[dict[str, Any]] | None = None,
    now: datetime = NOW,
    **extra: Any,
) -> Observed:
    pods = pods or []
    return Observed(
        nodes=nodes if nodes is not None else _nodes(),
        pods=list(pods),
        job_pods=list(pods),
        job=job,
        now=now,
        **extra,
    )


def _job_child(desired: Desired) -> dict[str, Any]:
    jobs = [c for c in desired.children if c["kind"] == "Job"]
    assert len(jobs) == 1, [c["kind"] for c in desired.children]
    return jobs[0]


def _server_job(child: dict[str, Any], uid: str = "job-uid", **status: Any) -> dict[str, Any]:
    job = copy.deepcopy(child)
    job["metadata"]["uid"] = uid
    job["status"] = status
    return job


def _pods(
    job: dict[str, Any], phase: str = "Running", nodes: list[str] | None = None
) -> list[dict[str, Any]]:
    template = job["spec"]["template"]
    result = []
    for index, node in enumerate(nodes or planned_nodes(job)):
        result.append(
            {
                "metadata": {
                    "name": f"{job['metadata']['name']}-{index}-abcde",
                    "namespace": NS,
                    "labels": {**template["metadata"]["labels"], L.COMPLETION_INDEX: str(index)},
                    "annotations": {L.COMPLETION_INDEX: str(index)},
                    "ownerReferences": [{"kind": "Job", "uid": job["metadata"]["uid"], "controller": True}],
                    "creationTimestamp": "2025-01-01T11:59:00Z",
                },
                "spec": {"nodeName": node, "containers": template["spec"]["containers"]},
                "status": {"phase": phase, "podIP": f"10.1.0.{index}"},
            }
        )
    return result


def _fail(pod: dict[str, Any], code: int = 1) -> None:
    pod["status"] = {
        "phase": "Failed",
        "containerStatuses": [
            {
                "name": "trainer",
                "state": {"terminated": {"exitCode": code, "finishedAt": "2025-01-01T11:59:30Z"}},
            }
        ],
    }


def _started(cr: dict[str, Any], nodes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The Job the first pass creates, as the API server holds it."""
    return _server_job(_job_child(plan(cr, _observed(nodes=nodes))))


def _cond(desired: Desired, type_: str) -> dict[str, Any]:
    return next(c for c in desired.status["conditions"] if c["type"] == type_)


def _env(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# -- placement and the rendered pods -----------------------------------------------------------


def test_the_job_is_placed_whole_inside_one_leaf_as_an_indexed_job() -> None:
    nodes = _nodes()
    desired = plan(_cr(), _observed(nodes=nodes))
    job = _job_child(desired)
    service = next(c for c in desired.children if c["kind"] == "Service")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == service["metadata"]["name"] == NAME
    planned = planned_nodes(job)
    leaves = {n["metadata"]["name"]: n["metadata"]["labels"][LEAF] for n in nodes}
    assert len(planned) == 2 and len({leaves[n] for n in planned}) == 1
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"  # one pod per node
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "8", "rdma/ib": "8"}
    assert "IPC_LOCK" in pod["containers"][0]["securityContext"]["capabilities"]["add"]
    for child in desired.children:
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["uid"] == "cr-uid" and owner["kind"] == "TrainingJob" and owner["controller"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert desired.status["phase"] == "Pending" and desired.status["nodes"] == planned
    assert desired.status["domain"].startswith("leaf/")
    assert _cond(desired, "Placed")["status"] == "True"
    assert [e.reason for e in desired.events] == ["UnitsPlaced"]
    assert job["metadata"]["annotations"][children.ATTEMPT_ANNOTATION] == "0"


def test_rendezvous_and_network_environment() -> None:
    job = _job_child(plan(_cr(), _observed()))
    env = _env(job)
    assert env["MASTER_ADDR"] == f"{NAME}-0.{NAME}.{NS}.svc.cluster.local"
    assert env["MASTER_PORT"] == "29500"
    assert env["NNODES"] == "2" and env["NPROC_PER_NODE"] == "8"
    assert env["NODE_RANK"] == {"fieldRef": {"fieldPath": f"metadata.annotations['{L.COMPLETION_INDEX}']"}}
    # the network environment the inference units get, and the planned nodes' HCAs
    assert env["NVSHMEM_IB_ENABLE_IBGDA"] == "1" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["NCCL_IB_HCA"].split(",")[:2] == ["mlx5_0", "mlx5_1"]
    assert env["FIREFLYER_GPU_HCA"].startswith("0:mlx5_0,1:mlx5_1")
    assert "RANK" not in env  # a launcher's per-process rank, not ours to set


def test_command_and_arguments_are_rendered_from_the_spec() -> None:
    job = _job_child(plan(_cr(args=["--seed", "7"]), _observed()))
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["fireflyer", "train"]
    assert container["args"] == [
        "--model",
        "/3fs/stage/models/moe-tiny",
        "--data",
        "/3fs/stage/datasets/moe-tiny",
        "--checkpoint-dir",
        "/3fs/stage/checkpoints/moe-train-small",
        "--checkpoint-every",
        "100",
        "--keep",
        "2",
        "--pipeline",
        "2",
        "--schedule",
        "dualpipe",
        "--micro-batches",
        "4",  # default: 2 × pipeline
        "--steps",
        "1000",
        "--status-port",
        "29600",
        "--seed",
        "7",
    ]
    mounts = {m["mountPath"]: m.get("readOnly") for m in container["volumeMounts"]}
    assert mounts["/3fs/stage/checkpoints/moe-train-small"] is False
    assert mounts["/3fs/stage/models/moe-tiny"] is True


def test_command_override_micro_batches_and_optional_inputs() -> None:
    cr = _cr(command=["python", "-m", "mytrainer"], microBatches=8, steps=50, gpusPerNode=4)
    cr["spec"]["parallelism"] = {"data": 8, "tensor": 1, "expert": 8, "pipeline": 1, "schedule": "none"}
    del cr["spec"]["model"], cr["spec"]["dataset"]
    container = _job_child(plan(cr, _observed()))["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "mytrainer"]
    assert "--model" not in container["args"] and "--data" not in container["args"]
    args = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    assert args["--micro-batches"] == "8" and args["--steps"] == "50" and args["--schedule"] == "none"
    cr["spec"].pop("microBatches")
    container = _job_child(plan(cr, _observed()))["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--micro-batches") + 1] == "1"


def test_expert_parallelism_reaches_the_trainer() -> None:
    cr = _cr(gpusPerNode=4)
    cr["spec"]["parallelism"] = {"data": 8, "tensor": 1, "expert": 4, "pipeline": 1, "schedule": "none"}
    args = _job_child(plan(cr, _observed()))["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--expert-parallel") + 1] == "4"
    for parallelism in ({"expert": 1}, {"expert": 4, "pipeline": 2, "data": 4, "schedule": "1f1b"}):
        cr["spec"]["parallelism"].update(parallelism)
        args = _job_child(plan(cr, _observed()))["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--expert-parallel" not in args  # one expert group, or a pipeline (not combined yet)


def test_node_selector_filters_candidates_and_tolerations_are_added() -> None:
    cr = _cr(
        placement={
            "nodeSelector": {LEAF: "leaf-01"},
            "tolerations": [{"key": "training", "operator": "Exists", "effect": "NoSchedule"}],
        }
    )
    nodes = _nodes()
    job = _job_child(plan(cr, _observed(nodes=nodes)))
    leaves = {n["metadata"]["name"]: n["metadata"]["labels"][LEAF] for n in nodes}
    assert {leaves[n] for n in planned_nodes(job)} == {"leaf-01"}
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {LEAF: "leaf-01"}
    assert {"key": "training", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_pod_labels_reach_the_pods_but_never_replace_ours() -> None:
    job = _job_child(plan(_cr(podLabels={"team": "moe", L.TRAINING_JOB: "other"}), _observed()))
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "moe" and labels[L.TRAINING_JOB] == NAME and labels[L.ATTEMPT] == "0"


def test_a_job_that_does_not_fit_waits_without_children() -> None:
    desired = plan(
        _cr(nodes=5, parallelism={"data": 20, "expert": 20, "pipeline": 2, "schedule": "dualpipe"}),
        _observed(nodes=_nodes()[:4]),
    )
    assert not [c for c in desired.children if c["kind"] == "Job"]
    assert desired.status["phase"] == "Pending"
    placed = _cond(desired, "Placed")
    assert placed["status"] == "False" and placed["reason"] == "InsufficientCapacity"
    assert _cond(desired, "Degraded")["status"] == "True"


def test_planned_but_unbound_gangs_reserve_their_nodes() -> None:
    other = _started(_cr())
    other["metadata"].update(namespace="other", name="other")
    other["spec"]["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": "job-uid"}}
    taken = planned_nodes(other)
    assert set(reservations([{**other, "kind": "Job"}], [], "rdma/ib")) == set(taken)
    desired = plan(_cr(), _observed(others=[{**other, "kind": "Job"}]))
    assert not set(planned_nodes(_job_child(desired))) & set(taken)


# -- running, success ----------------------------------------------------------------------------


def test_running_when_every_pod_runs() -> None:
    job = _started(_cr())
    desired = plan(_cr({"phase": "Pending", "restarts": 0}), _observed(job, _pods(job)))
    assert desired.status["phase"] == "Running" and desired.status["ready"] == "2/2"
    assert _cond(desired, "Ready")["status"] == "True"
    assert _cond(desired, "Degraded")["status"] == "False"
    assert not desired.delete_job and [c["kind"] for c in desired.children] == ["Service"]


def test_pods_still_starting_are_pending() -> None:
    job = _started(_cr())
    pods = _pods(job)
    pods[1]["status"]["phase"] = "Pending"
    desired = plan(_cr({"phase": "Pending"}), _observed(job, pods))
    assert desired.status["phase"] == "Pending" and desired.status["ready"] == "1/2"
    assert _cond(desired, "Progressing")["status"] == "True"


def test_every_pod_succeeded_is_succeeded_and_stays() -> None:
    job = _started(_cr())
    desired = plan(_cr({"phase": "Running"}), _observed(job, _pods(job, "Succeeded")))
    assert desired.status["phase"] == "Succeeded" and desired.status["ready"] == "2/2"
    assert [e.reason for e in desired.events] == ["JobSucceeded"]
    assert _cond(desired, "Ready")["reason"] == "JobSucceeded"
    # later passes change nothing, whatever happens to the Job or the spec
    after = plan(_cr({**desired.status, "step": 1000}, steps=2000), _observed(None, []))
    assert after.status["phase"] == "Succeeded" and not after.children and not after.delete_job


# -- restarts ------------------------------------------------------------------------------------


def test_a_failed_pod_restarts_the_whole_job() -> None:
    job = _started(_cr())
    pods = _pods(job)
    _fail(pods[1])
    desired = plan(_cr({"phase": "Running", "restarts": 0}), _observed(job, pods))
    assert desired.delete_job and desired.persist_first
    assert desired.status["phase"] == "Restarting" and desired.status["restarts"] == 1
    assert desired.status["lastFailure"] == f"pod {pods[1]['metadata']['name']} exited 1"
    (event,) = desired.events
    assert event.type == "Warning" and event.reason == "JobRestarted"
    assert event.message == f"restart 1/3: pod {pods[1]['metadata']['name']} exited 1"
    assert _cond(desired, "Degraded")["status"] == "True"


def test_the_earliest_failure_is_named() -> None:
    job = _started(_cr())
    pods = _pods(job)
    _fail(pods[0], 137)
    _fail(pods[1], 1)
    pods[1]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2025-01-01T11:59:10Z"
    desired = plan(_cr({"phase": "Running"}), _observed(job, pods))
    assert desired.status["lastFailure"] == f"pod {pods[1]['metadata']['name']} exited 1 (and 1 more)"


def test_after_max_restarts_the_job_fails() -> None:
    job = _started(_cr(status={"restarts": 3}))
    pods = _pods(job)
    _fail(pods[0])
    desired = plan(_cr({"phase": "Restarting", "restarts": 3}), _observed(job, pods))
    assert desired.status["phase"] == "Failed" and desired.status["restarts"] == 3
    assert not desired.delete_job and desired.suspend_job
    ready = _cond(desired, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "MaxRestartsExceeded"
    assert "exited 1" in ready["message"] and "maxRestarts (3)" in ready["message"]
    assert [e.reason for e in desired.events] == ["JobFailed"]
    # Failed is kept …
    failed = plan(_cr(desired.status), _observed(job, pods))
    assert failed.status["phase"] == "Failed" and not failed.events and not failed.children
    # … until maxRestarts is raised above the restarts so far
    raised = plan(_cr(desired.status, restart={"maxRestarts": 4}), _observed(job, pods))
    assert raised.delete_job and raised.status["restarts"] == 4


def test_a_lost_node_restarts_the_job_and_the_next_attempt_avoids_it() -> None:
    job = _started(_cr())
    victim = planned_nodes(job)[1]
    nodes = _nodes(not_ready=(victim,))
    pods = _pods(job)
    desired = plan(_cr({"phase": "Running"}), _observed(job, pods, nodes))
    assert desired.delete_job and desired.status["restarts"] == 1
    assert desired.status["lastFailure"] == f"node {victim} NotReady"
    assert desired.events[0].message == f"restart 1/3: node {victim} NotReady"
    assert desired.delete_pods == {pods[1]["metadata"]["name"]: True}  # no kubelet will confirm
    # The old attempt is gone: the next one is planned around the node.
    after = plan(_cr(desired.status), _observed(None, [], nodes))
    new = _job_child(after)
    assert victim not in planned_nodes(new) and len(planned_nodes(new)) == 2
    assert new["metadata"]["annotations"][children.ATTEMPT_ANNOTATION] == "1"
    assert new["spec"]["template"]["metadata"]["labels"][L.ATTEMPT] == "1"
    assert after.status["phase"] == "Restarting"


def test_a_deleted_node_restarts_the_job() -> None:
    job = _started(_cr())
    victim = planned_nodes(job)[0]
    desired = plan(_cr({"phase": "Running"}), _observed(job, _pods(job), _nodes(gone=(victim,))))
    assert desired.status["lastFailure"] == f"node {victim} is gone"


def test_an_evicted_or_deleted_pod_restarts_the_job() -> None:
    job = _started(_cr())
    pods = _pods(job)
    pods[0]["status"] = {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}
    desired = plan(_cr({"phase": "Running"}), _observed(job, pods))
    assert desired.status["lastFailure"] == f"pod {pods[0]['metadata']['name']} was evicted: low on memory"
    pods = _pods(job)
    pods[1]["metadata"]["deletionTimestamp"] = "2025-01-01T11:59:50Z"
    desired = plan(_cr({"phase": "Running"}), _observed(job, pods))
    assert desired.status["lastFailure"] == f"pod {pods[1]['metadata']['name']} was deleted"
    # after a failure the Job controller deletes the other ranks: that is no second cause
    _fail(pods[0])
    desired = plan(_cr({"phase": "Running"}), _observed(job, pods))
    assert desired.status["lastFailure"] == f"pod {pods[0]['metadata']['name']} exited 1"
    noted = {"job-uid": "pod x-1 was deleted"}
    desired = plan(_cr({"phase": "Running"}), _observed(job, _pods(job)[:1], noted=noted))
    assert desired.status["lastFailure"] == "pod x-1 was deleted"
    # a failure noted for another attempt's Job does not count
    desired = plan(
        _cr({"phase": "Running"}), _observed(job, _pods(job), noted={"old-uid": "pod y was deleted"})
    )
    assert desired.status["phase"] == "Running"


def test_pods_not_scheduled_in_time_restart_the_job() -> None:
    job = _started(_cr())
    pods = _pods(job)
    pods[1]["spec"]["nodeName"] = None
    pods[1]["status"] = {"phase": "Pending"}
    early = plan(_cr({"phase": "Pending"}), _observed(job, pods, now=NOW + timedelta(seconds=60)))
    assert early.status["phase"] == "Pending" and not early.delete_job
    late = plan(_cr({"phase": "Pending"}), _observed(job, pods, now=NOW + timedelta(seconds=301)))
    assert late.delete_job and "only 1/2 pods were scheduled within 300s" in late.status["lastFailure"]


def test_a_restart_is_counted_once_across_operator_restarts() -> None:
    """The count was persisted, then the operator died before deleting the failed attempt."""
    job = _started(_cr())
    pods = _pods(job)
    _fail(pods[0])
    desired = plan(_cr({"phase": "Restarting", "restarts": 1, "lastFailure": "x"}), _observed(job, pods))
    assert desired.delete_job and not desired.persist_first
    assert desired.status["restarts"] == 1 and not [e for e in desired.events if e.reason == "JobRestarted"]
    # while the Job is being deleted, nothing is deleted twice
    job["metadata"]["deletionTimestamp"] = "2025-01-01T12:00:00Z"
    again = plan(_cr({"phase": "Restarting", "restarts": 1}), _observed(job, pods))
    assert not again.delete_job and again.status["restarts"] == 1


def test_the_next_attempt_waits_until_the_old_pods_are_gone() -> None:
    job = _started(_cr())
    pods = _pods(job)
    pods[0]["metadata"]["deletionTimestamp"] = "2025-01-01T12:00:00Z"
    desired = plan(_cr({"phase": "Restarting", "restarts": 1}), _observed(None, pods))
    assert not [c for c in desired.children if c["kind"] == "Job"]
    assert desired.delete_pods == {pods[1]["metadata"]["name"]: False}  # the orphan still running
    assert desired.status["phase"] == "Restarting"


def test_a_spec_change_recreates_the_pods_without_counting_a_restart() -> None:
    job = _started(_cr())
    desired = plan(_cr({"phase": "Running"}, steps=5000), _observed(job, _pods(job)))
    assert desired.delete_job and not desired.persist_first and desired.status["restarts"] == 0
    assert [e.reason for e in desired.events] == ["JobRecreated"]
    # the API server's defaulting (fields spelled out at their defaults) changes nothing
    defaulted = _cr({"phase": "Running"}, gpusPerNode=8, podLabels={}, network={"rdmaResource": "rdma/ib"})
    assert not plan(defaulted, _observed(job, _pods(job))).delete_job
    # restart and placement changes apply at the next start: the running attempt stays
    same = plan(_cr({"phase": "Running"}, restart={"maxRestarts": 9}), _observed(job, _pods(job)))
    assert not same.delete_job and same.status["phase"] == "Running"


# -- progress from rank 0 -----------------------------------------------------------------------


def test_status_from_rank_zero() -> None:
    polled = {"step": 120, "loss": 2.5, "lastCheckpointStep": 100, "tokensPerSecond": 5e5, "phase": "train"}
    assert progress_status(polled) == {
        "step": 120,
        "loss": 2.5,
        "lastCheckpointStep": 100,
        "tokensPerSecond": 500000.0,
    }
    # values of the wrong type or not finite are left out, never written
    assert progress_status({"step": "7", "loss": float("nan"), "lastCheckpointStep": None}) == {}
    assert progress_status({"step": True, "loss": float("inf")}) == {}
    # only what changed is patched
    assert progress_changes({"step": 120, "loss": 2.5}, polled) == {
        "lastCheckpointStep": 100,
        "tokensPerSecond": 5e5,
    }
    assert progress_changes(progress_status(polled), polled) == {}


def test_rank_zero_is_found_by_completion_index_and_pod_ip() -> None:
    job = _started(_cr())
    pods = _pods(job)
    assert rank0_address(pods) == "10.1.0.0"
    pods[0]["status"]["phase"] = "Pending"
    assert rank0_address(pods) is None


@pytest.mark.parametrize("name", ["a.b.c", "9lives", "x" * 80])
def test_child_names_are_dns_labels_short_enough_for_host_names(name: str) -> None:
    child = children.child_name(name)
    assert child[0].isalpha() and "." not in child and len(f"{child}-8191") <= 63
    assert len(children.label_value(name)) <= 63


def test_rendered_arguments_are_ones_the_trainer_accepts() -> None:
    """`fireflyer train` is written beside this controller; once it is there, every flag the
    operator renders must parse (argparse exits on an unknown flag or a bad value)."""
    parser = build_parser()
    commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    if "train" not in commands:
        pytest.skip("fireflyer train is not in the CLI yet")
    for cr in (_cr(), _cr(steps=5, microBatches=8)):
        container = _job_child(plan(cr, _observed()))["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["fireflyer", "train"]
        parser.parse_args(["train", *container["args"]])


def test_progress_is_fetched_and_a_silent_trainer_is_tolerated() -> None:
    body = json.dumps({"step": 3, "loss": 1.5, "lastCheckpointStep": None, "phase": "train"}).encode()

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/status" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        polled = fetch_progress("127.0.0.1", server.server_address[1], timeout=2)
        assert polled is not None and progress_status(polled) == {"step": 3, "loss": 1.5}
    finally:
        server.shutdown()
        server.server_close()
    assert fetch_progress("127.0.0.1", server.server_address[1], timeout=0.5) is None


def test_a_succeeded_job_reports_rank0s_final_step_from_its_termination_message() -> None:
    """The poller cannot reach rank 0 once it has exited; its last /status is its termination
    message, and the job's final status carries it."""
    job = _started(_cr())
    pods = _pods(job, "Succeeded")
    final = {"step": 1000, "loss": 1.25, "lastCheckpointStep": 1000, "tokensPerSecond": 9.0, "phase": "done"}
    for pod, message in zip(pods, [json.dumps(final), "not json"], strict=True):
        pod["status"]["containerStatuses"] = [
            {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": message}}}
        ]
    desired = plan(_cr({"phase": "Running", "step": 990}), _observed(job, pods))
    assert desired.status["phase"] == "Succeeded"
    assert (desired.status["step"], desired.status["loss"], desired.status["lastCheckpointStep"]) == (
        1000,
        1.25,
        1000,
    )
    # Rank 1's message is not rank 0's: without one from rank 0 nothing is claimed.
    pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = ""
    assert "step" not in plan(_cr({"phase": "Running"}), _observed(job, pods)).status
