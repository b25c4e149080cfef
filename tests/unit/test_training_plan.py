"""The TrainingJob plan (pure): whole-job placement, the rendered pods, and restart decisions."""

from __future__ import annotations

from datetime import timedelta

from fireflyer.operator import labels as L
from fireflyer.operator.training import children
from fireflyer.operator.training.plan import plan
from fireflyer.operator.training.teardown import FAILED_ATTEMPT_GRACE_SECONDS as FAILED_GRACE
from fireflyer.placement.reservations import planned_nodes, reservations
from tests.unit.training_plan_harness import (
    LEAF,
    NAME,
    NOW,
    NS,
    condition_of,
    container_env,
    fail_pod,
    job_child,
    observed_with,
    pods_of,
    small_nodes,
    started_job,
    training_job,
)

# -- placement and the rendered pods -----------------------------------------------------------


def test_the_job_is_placed_whole_inside_one_leaf_as_an_indexed_job() -> None:
    nodes = small_nodes()
    desired = plan(training_job(), observed_with(nodes=nodes))
    job = job_child(desired)
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
    assert condition_of(desired, "Placed")["status"] == "True"
    assert [e.reason for e in desired.events] == ["UnitsPlaced"]
    assert job["metadata"]["annotations"][children.ATTEMPT_ANNOTATION] == "0"


def test_rendezvous_and_network_environment() -> None:
    job = job_child(plan(training_job(), observed_with()))
    env = container_env(job)
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
    job = job_child(plan(training_job(args=["--seed", "7"]), observed_with()))
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
    cr = training_job(command=["python", "-m", "mytrainer"], microBatches=8, steps=50, gpusPerNode=4)
    cr["spec"]["parallelism"] = {"data": 8, "tensor": 1, "expert": 8, "pipeline": 1, "schedule": "none"}
    del cr["spec"]["model"], cr["spec"]["dataset"]
    container = job_child(plan(cr, observed_with()))["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "mytrainer"]
    assert "--model" not in container["args"] and "--data" not in container["args"]
    args = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    assert args["--micro-batches"] == "8" and args["--steps"] == "50" and args["--schedule"] == "none"
    cr["spec"].pop("microBatches")
    container = job_child(plan(cr, observed_with()))["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--micro-batches") + 1] == "1"


def test_expert_parallelism_reaches_the_trainer() -> None:
    cr = training_job(gpusPerNode=4)
    cr["spec"]["parallelism"] = {"data": 8, "tensor": 1, "expert": 4, "pipeline": 1, "schedule": "none"}
    args = job_child(plan(cr, observed_with()))["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--expert-parallel") + 1] == "4"
    for parallelism in ({"expert": 1}, {"expert": 4, "pipeline": 2, "data": 4, "schedule": "1f1b"}):
        cr["spec"]["parallelism"].update(parallelism)
        args = job_child(plan(cr, observed_with()))["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--expert-parallel" not in args  # one expert group, or a pipeline (not combined yet)


def test_node_selector_filters_candidates_and_tolerations_are_added() -> None:
    cr = training_job(
        placement={
            "nodeSelector": {LEAF: "leaf-01"},
            "tolerations": [{"key": "training", "operator": "Exists", "effect": "NoSchedule"}],
        }
    )
    nodes = small_nodes()
    job = job_child(plan(cr, observed_with(nodes=nodes)))
    leaves = {n["metadata"]["name"]: n["metadata"]["labels"][LEAF] for n in nodes}
    assert {leaves[n] for n in planned_nodes(job)} == {"leaf-01"}
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {LEAF: "leaf-01"}
    assert {"key": "training", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_pod_labels_reach_the_pods_but_never_replace_ours() -> None:
    job = job_child(plan(training_job(podLabels={"team": "moe", L.TRAINING_JOB: "other"}), observed_with()))
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "moe" and labels[L.TRAINING_JOB] == NAME and labels[L.ATTEMPT] == "0"


def test_a_job_that_does_not_fit_waits_without_children() -> None:
    desired = plan(
        training_job(nodes=5, parallelism={"data": 20, "expert": 20, "pipeline": 2, "schedule": "dualpipe"}),
        observed_with(nodes=small_nodes()[:4]),
    )
    assert not [c for c in desired.children if c["kind"] == "Job"]
    assert desired.status["phase"] == "Pending"
    placed = condition_of(desired, "Placed")
    assert placed["status"] == "False" and placed["reason"] == "InsufficientCapacity"
    assert condition_of(desired, "Degraded")["status"] == "True"


def test_planned_but_unbound_gangs_reserve_their_nodes() -> None:
    other = started_job(training_job())
    other["metadata"].update(namespace="other", name="other")
    other["spec"]["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": "job-uid"}}
    taken = planned_nodes(other)
    assert set(reservations([{**other, "kind": "Job"}], [], "rdma/ib")) == set(taken)
    desired = plan(training_job(), observed_with(others=[{**other, "kind": "Job"}]))
    assert not set(planned_nodes(job_child(desired))) & set(taken)


# -- running, success ----------------------------------------------------------------------------


def test_running_when_every_pod_runs() -> None:
    job = started_job(training_job())
    desired = plan(training_job({"phase": "Pending", "restarts": 0}), observed_with(job, pods_of(job)))
    assert desired.status["phase"] == "Running" and desired.status["ready"] == "2/2"
    assert condition_of(desired, "Ready")["status"] == "True"
    assert condition_of(desired, "Degraded")["status"] == "False"
    assert not desired.delete_job and [c["kind"] for c in desired.children] == ["Service"]


def test_pods_still_starting_are_pending() -> None:
    job = started_job(training_job())
    pods = pods_of(job)
    pods[1]["status"]["phase"] = "Pending"
    desired = plan(training_job({"phase": "Pending"}), observed_with(job, pods))
    assert desired.status["phase"] == "Pending" and desired.status["ready"] == "1/2"
    assert condition_of(desired, "Progressing")["status"] == "True"


def test_every_pod_succeeded_is_succeeded_and_stays() -> None:
    job = started_job(training_job())
    desired = plan(training_job({"phase": "Running"}), observed_with(job, pods_of(job, "Succeeded")))
    assert desired.status["phase"] == "Succeeded" and desired.status["ready"] == "2/2"
    assert [e.reason for e in desired.events] == ["JobSucceeded"]
    assert condition_of(desired, "Ready")["reason"] == "JobSucceeded"
    # later passes change nothing, whatever happens to the Job or the spec
    after = plan(training_job({**desired.status, "step": 1000}, steps=2000), observed_with(None, []))
    assert after.status["phase"] == "Succeeded" and not after.children and not after.delete_job


# -- restarts ------------------------------------------------------------------------------------


def test_a_failed_pod_restarts_the_whole_job() -> None:
    job = started_job(training_job())
    pods = pods_of(job)
    fail_pod(pods[1])
    desired = plan(training_job({"phase": "Running", "restarts": 0}), observed_with(job, pods))
    assert desired.delete_job and desired.persist_first
    assert desired.status["phase"] == "Restarting" and desired.status["restarts"] == 1
    assert desired.status["lastFailure"] == f"pod {pods[1]['metadata']['name']} exited 1"
    (event,) = desired.events
    assert event.type == "Warning" and event.reason == "JobRestarted"
    assert event.message == f"restart 1/3: pod {pods[1]['metadata']['name']} exited 1"
    assert condition_of(desired, "Degraded")["status"] == "True"
    # The surviving rank waits on a collective with the failed one: it cannot checkpoint, so its
    # pod ends within seconds instead of the pods' own grace (sized for a checkpoint).
    survivor = pods[0]["metadata"]["name"]
    assert desired.delete_pods[survivor] == FAILED_GRACE < 300
    # Once its deletion has the short grace, later passes leave it alone.
    pods[0]["metadata"] |= {"deletionTimestamp": "2025-01-01T12:00:00Z", "deletionGracePeriodSeconds": 10}
    job["metadata"]["deletionTimestamp"] = "2025-01-01T12:00:00Z"
    later = plan(training_job(desired.status), observed_with(job, pods))
    assert survivor not in later.delete_pods


def test_the_earliest_failure_is_named() -> None:
    job = started_job(training_job())
    pods = pods_of(job)
    fail_pod(pods[0], 137)
    fail_pod(pods[1], 1)
    pods[1]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2025-01-01T11:59:10Z"
    desired = plan(training_job({"phase": "Running"}), observed_with(job, pods))
    assert desired.status["lastFailure"] == f"pod {pods[1]['metadata']['name']} exited 1 (and 1 more)"


def test_after_max_restarts_the_job_fails() -> None:
    job = started_job(training_job(status={"restarts": 3}))
    pods = pods_of(job)
    fail_pod(pods[0])
    desired = plan(training_job({"phase": "Restarting", "restarts": 3}), observed_with(job, pods))
    assert desired.status["phase"] == "Failed" and desired.status["restarts"] == 3
    assert not desired.delete_job and desired.suspend_job
    ready = condition_of(desired, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "MaxRestartsExceeded"
    assert "exited 1" in ready["message"] and "maxRestarts (3)" in ready["message"]
    assert [e.reason for e in desired.events] == ["JobFailed"]
    # Failed is kept …
    failed = plan(training_job(desired.status), observed_with(job, pods))
    assert failed.status["phase"] == "Failed" and not failed.events and not failed.children
    # … until maxRestarts is raised above the restarts so far
    raised = plan(training_job(desired.status, restart={"maxRestarts": 4}), observed_with(job, pods))
    assert raised.delete_job and raised.status["restarts"] == 4


def test_a_lost_node_restarts_the_job_and_the_next_attempt_avoids_it() -> None:
    job = started_job(training_job())
    victim = planned_nodes(job)[1]
    nodes = small_nodes(not_ready=(victim,))
    pods = pods_of(job)
    desired = plan(training_job({"phase": "Running"}), observed_with(job, pods, nodes))
    assert desired.delete_job and desired.status["restarts"] == 1
    assert desired.status["lastFailure"] == f"node {victim} NotReady"
    assert desired.events[0].message == f"restart 1/3: node {victim} NotReady"
    # No kubelet will confirm the lost pod's end; the survivor cannot checkpoint without its peer.
    assert desired.delete_pods == {pods[1]["metadata"]["name"]: 0, pods[0]["metadata"]["name"]: FAILED_GRACE}
    # The old attempt is gone: the next one is planned around the node.
    after = plan(training_job(desired.status), observed_with(None, [], nodes))
    new = job_child(after)
    assert victim not in planned_nodes(new) and len(planned_nodes(new)) == 2
    assert new["metadata"]["annotations"][children.ATTEMPT_ANNOTATION] == "1"
    assert new["spec"]["template"]["metadata"]["labels"][L.ATTEMPT] == "1"
    assert after.status["phase"] == "Restarting"


def test_a_deleted_node_restarts_the_job() -> None:
    job = started_job(training_job())
    victim = planned_nodes(job)[0]
    desired = plan(
        training_job({"phase": "Running"}), observed_with(job, pods_of(job), small_nodes(gone=(victim,)))
    )
    assert desired.status["lastFailure"] == f"node {victim} is gone"


def test_an_evicted_or_deleted_pod_restarts_the_job() -> None:
    job = started_job(training_job())
    pods = pods_of(job)
    pods[0]["status"] = {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}
    desired = plan(training_job({"phase": "Running"}), observed_with(job, pods))
    assert desired.status["lastFailure"] == f"pod {pods[0]['metadata']['name']} was evicted: low on memory"
    pods = pods_of(job)
    pods[1]["metadata"]["deletionTimestamp"] = "2025-01-01T11:59:50Z"
    desired = plan(training_job({"phase": "Running"}), observed_with(job, pods))
    assert desired.status["lastFailure"] == f"pod {pods[1]['metadata']['name']} was deleted"
    # after a failure the Job controller deletes the other ranks: that is no second cause
    fail_pod(pods[0])
    desired = plan(training_job({"phase": "Running"}), observed_with(job, pods))
    assert desired.status["lastFailure"] == f"pod {pods[0]['metadata']['name']} exited 1"
    noted = {"job-uid": "pod x-1 was deleted"}
    desired = plan(training_job({"phase": "Running"}), observed_with(job, pods_of(job)[:1], noted=noted))
    assert desired.status["lastFailure"] == "pod x-1 was deleted"
    # a failure noted for another attempt's Job does not count
    desired = plan(
        training_job({"phase": "Running"}),
        observed_with(job, pods_of(job), noted={"old-uid": "pod y was deleted"}),
    )
    assert desired.status["phase"] == "Running"


def test_pods_not_scheduled_in_time_restart_the_job() -> None:
    job = started_job(training_job())
    pods = pods_of(job)
    pods[1]["spec"]["nodeName"] = None
    pods[1]["status"] = {"phase": "Pending"}
    early = plan(
        training_job({"phase": "Pending"}), observed_with(job, pods, now=NOW + timedelta(seconds=60))
    )
    assert early.status["phase"] == "Pending" and not early.delete_job
    late = plan(
        training_job({"phase": "Pending"}), observed_with(job, pods, now=NOW + timedelta(seconds=301))
    )
    assert late.delete_job and "only 1/2 pods were scheduled within 300s" in late.status["lastFailure"]


def test_a_restart_is_counted_once_across_operator_restarts() -> None:
    """The count was persisted, then the operator died before deleting the failed attempt."""
    job = started_job(training_job())
    pods = pods_of(job)
    fail_pod(pods[0])
    desired = plan(
        training_job({"phase": "Restarting", "restarts": 1, "lastFailure": "x"}), observed_with(job, pods)
    )
    assert desired.delete_job and not desired.persist_first
    assert desired.status["restarts"] == 1 and not [e for e in desired.events if e.reason == "JobRestarted"]
    # while the Job is being deleted, nothing is deleted twice
    job["metadata"]["deletionTimestamp"] = "2025-01-01T12:00:00Z"
    again = plan(training_job({"phase": "Restarting", "restarts": 1}), observed_with(job, pods))
    assert not again.delete_job and again.status["restarts"] == 1


def test_the_next_attempt_waits_until_the_old_pods_are_gone() -> None:
    job = started_job(training_job())
    pods = pods_of(job)
    pods[0]["metadata"]["deletionTimestamp"] = "2025-01-01T12:00:00Z"
    desired = plan(training_job({"phase": "Restarting", "restarts": 1}), observed_with(None, pods))
    assert not [c for c in desired.children if c["kind"] == "Job"]
    # A failed attempt's pods: the orphan still running and the one deleted with its full grace
    # both end within seconds.
    assert desired.delete_pods == {p["metadata"]["name"]: FAILED_GRACE for p in pods}
    assert desired.status["phase"] == "Restarting"


def test_a_spec_change_recreates_the_pods_without_counting_a_restart() -> None:
    job = started_job(training_job())
    desired = plan(training_job({"phase": "Running"}, steps=5000), observed_with(job, pods_of(job)))
    assert desired.delete_job and not desired.persist_first and desired.status["restarts"] == 0
    assert [e.reason for e in desired.events] == ["JobRecreated"]
    assert not desired.delete_pods  # healthy ranks keep their grace: they checkpoint, then stop
    # the API server's defaulting (fields spelled out at their defaults) changes nothing
    defaulted = training_job(
        {"phase": "Running"}, gpusPerNode=8, podLabels={}, network={"rdmaResource": "rdma/ib"}
    )
    assert not plan(defaulted, observed_with(job, pods_of(job))).delete_job
    # restart and placement changes apply at the next start: the running attempt stays
    same = plan(
        training_job({"phase": "Running"}, restart={"maxRestarts": 9}), observed_with(job, pods_of(job))
    )
    assert not same.delete_job and same.status["phase"] == "Running"
