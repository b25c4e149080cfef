"""A deployment whose units all stand is planned without the placement lock (every resync pass of
every deployment did wait for it); a plan that places, moves or recreates a unit, or asks a job
for nodes, is made again under the lock, with the pod failures the first observation took."""

from __future__ import annotations

import copy
from datetime import timedelta

from fireflyer.operator.inference.controller import carried_over, places_nothing
from fireflyer.operator.inference.plan import Observed, plan
from fireflyer.placement.pinning import HOSTNAME
from tests.unit.test_inference_plan import NOW, _nodes, _placed, _pods


def _steady() -> tuple[dict, dict, Observed]:
    cr, sets = _placed()
    pods = [p for sts in sets.values() for p in _pods(sts, NOW - timedelta(minutes=5))]
    return cr, sets, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW)


def test_a_steady_deployment_places_nothing() -> None:
    cr, sets, observed = _steady()
    assert places_nothing(plan(cr, observed), sets)


def test_a_missing_unit_places_one() -> None:
    cr, sets, observed = _steady()
    decode = next(name for name in sets if "decode" in name)
    fewer = {name: sts for name, sts in sets.items() if name != decode}
    observed.statefulsets = fewer
    observed.pods = [p for p in observed.pods if not p["metadata"]["name"].startswith(decode)]
    assert not places_nothing(plan(cr, observed), fewer)


def test_a_unit_on_other_nodes_than_planned_is_a_move() -> None:
    cr, sets, observed = _steady()
    desired = plan(cr, observed)
    moved = copy.deepcopy(sets)
    sts = next(iter(moved.values()))
    terms = sts["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    expression = terms["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    expression["matchExpressions"][0] = {"key": HOSTNAME, "operator": "In", "values": ["elsewhere"]}
    assert not places_nothing(desired, moved)


def test_a_recreation_needs_the_lock() -> None:
    cr, sets, observed = _steady()
    desired = plan(cr, observed)
    desired.recreate = {next(iter(sets)): "pods lost"}
    assert not places_nothing(desired, sets)


def test_failures_taken_by_the_first_observation_reach_the_plan_under_the_lock() -> None:
    _, _, first = _steady()
    first.failed_units = {"unit-a": "OOMKilled"}
    first.failed_pod_created = {"unit-a": NOW}
    again = copy.copy(first)
    again.failed_units, again.failed_pod_created = {"unit-b": "Evicted"}, {}
    merged = carried_over(first, again)
    assert merged.failed_units == {"unit-a": "OOMKilled", "unit-b": "Evicted"}
    assert merged.failed_pod_created == {"unit-a": NOW}
