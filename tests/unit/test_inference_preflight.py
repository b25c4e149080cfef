"""A unit whose RDMA preflight failed: recognised from its pods' termination messages, recreated
on other nodes, its old nodes avoided for a while (remembered in status across passes)."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest

from fireflyer.api.inference import InferenceDeployment
from fireflyer.operator.inference import children, preflight
from fireflyer.operator.inference.engines import UnitContext, shell_line
from fireflyer.operator.inference.plan import Desired, Observed, plan
from fireflyer.placement.reservations import planned_nodes
from tests.unit.test_inference_plan import NOW, _cr, _nodes, _pods
from tests.unit.test_inference_revision import SAMPLE

NAME = SAMPLE["metadata"]["name"]
MESSAGE = "preflight failed: rank 3 → rank 9 over mlx5_2: 12.1 GB/s < 40.0 GB/s"


def _container(state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": "engine", "state": state, **({"lastState": last} if last else {})}


def _pod_with(*containers: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": {"containerStatuses": list(containers)}}


@pytest.mark.parametrize(
    ("pod", "found"),
    [
        (_pod_with(_container({"terminated": {"exitCode": 1, "message": MESSAGE + "\n"}})), MESSAGE),
        (
            _pod_with(
                _container(
                    {"waiting": {"reason": "CrashLoopBackOff"}},
                    {"terminated": {"exitCode": 1, "message": MESSAGE}},
                )
            ),
            MESSAGE,
        ),
        # Running again: it passed (or is retrying) its preflight; the last failure is history.
        (_pod_with(_container({"running": {}}, {"terminated": {"exitCode": 1, "message": MESSAGE}})), ""),
        (_pod_with(_container({"terminated": {"exitCode": 1, "message": "CUDA out of memory"}})), ""),
        (_pod_with(_container({"terminated": {"exitCode": 137}})), ""),
        ({"metadata": {"name": "p"}, "status": {}}, ""),
    ],
)
def test_failure_is_read_from_the_termination_message(pod: dict[str, Any], found: str) -> None:
    assert preflight.failure(pod) == found


def test_the_serve_command_asks_for_the_preflight_when_the_spec_does() -> None:
    def line(engine: str, enabled: bool) -> str:
        doc = copy.deepcopy(SAMPLE)
        doc["spec"]["engine"] = {"kind": engine, "image": "example.com/e:1"}
        doc["spec"]["network"] = {"preflight": enabled}
        spec = InferenceDeployment.model_validate(doc).spec
        unit = UnitContext(NAME, "decode", 0, children.leader_host(NAME, "decode", 0, "ns"), "mlx5_0")
        return shell_line(spec, spec.decode, unit)

    assert line("fireflyer", True).endswith(" --preflight")
    assert "--preflight" not in line("fireflyer", False)
    assert "--preflight" not in line("sglang", True)


def _placed(cr: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    first = plan(cr, Observed(nodes=_nodes(), pods=[], statefulsets={}, router=None, now=NOW))
    sets = {c["metadata"]["name"]: c for c in first.children if c["kind"] == "StatefulSet"}
    pods = [pod for sts in sets.values() for pod in _pods(sts, NOW - timedelta(minutes=5))]
    return sets, pods


def _fail(pods: list[dict[str, Any]], unit: str, rank: int) -> None:
    pod = next(p for p in pods if p["metadata"]["name"] == f"{unit}-{rank}")
    pod["status"]["containerStatuses"] = [
        _container(
            {"waiting": {"reason": "CrashLoopBackOff"}}, {"terminated": {"exitCode": 1, "message": MESSAGE}}
        )
    ]


def _again(cr: dict[str, Any], desired: Desired, sets: dict[str, dict[str, Any]], pods: list[Any]) -> Desired:
    """The next pass, with the status the previous one wrote."""
    cr = copy.deepcopy(cr)
    cr["status"] = desired.status
    return plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))


def test_a_failed_preflight_recreates_the_unit_on_other_nodes() -> None:
    cr = _cr()
    sets, pods = _placed(cr)
    unit = children.unit_name(NAME, "prefill", 0)
    old_nodes = planned_nodes(sets[unit])
    _fail(pods, unit, 1)

    desired = plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))
    assert desired.recreate == {unit: MESSAGE}
    event = next(e for e in desired.events if e.reason == "PreflightFailed")
    assert event.type == "Warning" and event.message.startswith(f"{unit}: {MESSAGE}")
    assert all(node in event.message for node in old_nodes)
    moved = next(c for c in desired.children if c["metadata"]["name"] == unit)
    assert not set(planned_nodes(moved)) & set(old_nodes)
    # The decode unit, healthy, keeps its nodes.
    decode = children.unit_name(NAME, "decode", 0)
    assert planned_nodes(
        next(c for c in desired.children if c["metadata"]["name"] == decode)
    ) == planned_nodes(sets[decode])
    entry = next(u for u in desired.status["units"] if u["role"] == "prefill")
    until = (NOW + timedelta(seconds=preflight.AVOID_SECONDS)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert entry["avoidNodes"] == sorted(old_nodes) and entry["avoidUntil"] == until
    placed = next(c for c in desired.status["conditions"] if c["type"] == "Placed")
    assert "after a failed RDMA preflight" in placed["message"]


def test_avoided_nodes_are_remembered_in_status_until_they_expire() -> None:
    cr = _cr()
    sets, pods = _placed(cr)
    unit = children.unit_name(NAME, "prefill", 0)
    old_nodes = planned_nodes(sets[unit])
    _fail(pods, unit, 0)
    first = plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))

    # The unit is now planned elsewhere but nothing runs yet (a fresh StatefulSet-less pass, as
    # after an operator restart): the old nodes are still avoided.
    cr2 = copy.deepcopy(cr)
    cr2["status"] = first.status
    again = plan(
        cr2, Observed(nodes=_nodes(), pods=[], statefulsets={}, router=None, now=NOW + timedelta(minutes=5))
    )
    replanned = next(c for c in again.children if c["metadata"]["name"] == unit)
    assert not set(planned_nodes(replanned)) & set(old_nodes)
    assert next(u for u in again.status["units"] if u["role"] == "prefill")["avoidNodes"] == sorted(old_nodes)

    later = plan(
        cr2,
        Observed(
            nodes=_nodes(),
            pods=[],
            statefulsets={},
            router=None,
            now=NOW + timedelta(seconds=preflight.AVOID_SECONDS + 1),
        ),
    )
    assert "avoidNodes" not in next(u for u in later.status["units"] if u["role"] == "prefill")


def test_a_unit_that_fits_only_on_avoided_nodes_waits() -> None:
    """The decode unit needs 4 nodes of one leaf; with its own 4 avoided, none is left."""
    cr = _cr()
    sets, pods = _placed(cr)
    unit = children.unit_name(NAME, "decode", 0)
    for rank in range(4):
        _fail(pods, unit, rank)
    desired = plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))
    assert unit in desired.recreate
    assert unit not in {c["metadata"]["name"] for c in desired.children if c["kind"] == "StatefulSet"}
    placed = next(c for c in desired.status["conditions"] if c["type"] == "Placed")
    assert placed["status"] == "False" and "after a failed RDMA preflight" in placed["message"]
    # Once the old pods are gone, the unit still waits rather than returning to those nodes.
    rest = [p for p in pods if not p["metadata"]["name"].startswith(unit)]
    later = _again(cr, desired, {k: v for k, v in sets.items() if k != unit}, rest)
    assert unit not in {c["metadata"]["name"] for c in later.children if c["kind"] == "StatefulSet"}


def test_terminating_pods_of_the_recreation_do_not_fail_the_new_unit() -> None:
    cr = _cr()
    sets, pods = _placed(cr)
    unit = children.unit_name(NAME, "prefill", 0)
    _fail(pods, unit, 1)
    for pod in pods:
        if pod["metadata"]["name"].startswith(unit):
            pod["metadata"]["deletionTimestamp"] = NOW.isoformat()
    desired = plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))
    assert not [e for e in desired.events if e.reason == "PreflightFailed"]


def test_a_failure_seen_in_a_pod_event_counts_for_that_pod_only() -> None:
    """The reconcile's cached pods carry no container statuses: failures come by pod uid."""
    cr = _cr()
    sets, pods = _placed(cr)
    unit = children.unit_name(NAME, "prefill", 0)
    for pod in pods:
        pod["metadata"]["uid"] = f"uid-{pod['metadata']['name']}"

    def observed(seen: dict[str, str]) -> Observed:
        return Observed(
            nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW, preflight_failures=seen
        )

    desired = plan(cr, observed({f"uid-{unit}-1": MESSAGE}))
    assert desired.recreate == {unit: MESSAGE}
    # A replaced pod's late event (its uid is no current pod's) does nothing.
    assert plan(cr, observed({"uid-of-a-pod-long-gone": MESSAGE})).recreate == {}
