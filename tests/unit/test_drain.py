"""Scale-in drains units through the router first (fireflyer/operator/inference/drain.py): the
pure decision, and the plan that carries it out (draining StatefulSets kept and marked, the
router's backends file, status, the reading of the routers' answers)."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest

from fireflyer.operator import labels as L
from fireflyer.operator.inference import children, drain, scaler
from fireflyer.operator.inference.drain import DRAINING_SINCE, Surplus, UnitLoad, plan_drain
from fireflyer.operator.inference.plan import Observed, plan
from fireflyer.operator.planning import format_time
from tests.unit.test_inference_plan import NOW, _cr, _nodes

TIMEOUT = 300
A = Surplus("decode", 1, "d-decode-1", "http://a:30000", None)
B = Surplus("decode", 2, "d-decode-2", "http://b:30000", None)


def _started(unit: Surplus, seconds_ago: float) -> Surplus:
    return Surplus(unit.role, unit.index, unit.name, unit.url, NOW - timedelta(seconds=seconds_ago))


def _decide(units: list[Surplus], load: dict[str, UnitLoad] | None, **options: Any) -> drain.DrainPlan:
    options.setdefault("has_router", True)
    options.setdefault("timeout_seconds", TIMEOUT)
    return plan_drain(units, load, now=NOW, **options)


# -- the decision --------------------------------------------------------------------------------


def test_a_surplus_unit_starts_draining_and_is_kept() -> None:
    result = _decide([A], {A.url: UnitLoad(2, False)})
    assert result.draining == {A.name: NOW} and not result.removed
    assert result.waiting[A.name] == "decode unit 1 draining: the router has not read its drain yet"
    assert [(e.reason, e.message) for e in result.events] == [
        (drain.UNIT_DRAINING, "decode unit 1 draining: scale-in; the router sends it no new requests")
    ]


def test_a_draining_unit_waits_while_requests_are_in_flight() -> None:
    unit = _started(A, 30)
    result = _decide([unit], {A.url: UnitLoad(3, True)})
    assert result.draining == {A.name: unit.since} and not result.removed
    assert result.waiting[A.name] == "decode unit 1 draining: 3 requests in flight"
    assert [e.message for e in result.events] == [
        "decode unit 1 draining: waiting for the requests in flight to finish"
    ]
    # The same wait as the status already shows: no new Event.
    again = _decide([unit], {A.url: UnitLoad(3, True)}, previous_waiting=result.waiting)
    assert again.events == [] and again.waiting == result.waiting


def test_a_changing_in_flight_count_shows_in_status_but_posts_no_event() -> None:
    unit = _started(A, 30)
    shown = {A.name: "decode unit 1 draining: 3 requests in flight"}
    for count in (2, 1):
        result = _decide([unit], {A.url: UnitLoad(count, True)}, previous_waiting=shown)
        assert result.events == []
        shown = result.waiting
    assert shown[A.name] == "decode unit 1 draining: 1 request in flight"


def test_an_event_when_the_kind_of_wait_changes() -> None:
    unit = _started(A, 30)
    unread = {A.name: "decode unit 1 draining: the router has not read its drain yet"}
    read = _decide([unit], {A.url: UnitLoad(2, True)}, previous_waiting=unread)
    assert [e.message for e in read.events] == [
        "decode unit 1 draining: waiting for the requests in flight to finish"
    ]
    lost = _decide([unit], None, previous_waiting=read.waiting)
    assert [e.message for e in lost.events] == [
        "decode unit 1 draining: the router's in-flight counts are unknown"
    ]
    assert _decide([unit], None, previous_waiting=lost.waiting).events == []


def test_a_drained_unit_is_removed() -> None:
    result = _decide([_started(A, 30)], {A.url: UnitLoad(0, True)})
    assert result.removed == {A.name: "drained: no request in flight"} and not result.draining
    assert [e.reason for e in result.events] == [drain.UNIT_DRAINED]
    # A unit no router lists gets nothing from them: drained as well.
    assert A.name in _decide([_started(A, 30)], {}).removed


def test_an_unknown_answer_waits_until_the_timeout() -> None:
    waiting = _decide([_started(A, TIMEOUT - 1)], None)
    assert waiting.waiting[A.name] == "decode unit 1 draining: the router's in-flight counts are unknown"
    assert not waiting.removed
    timed_out = _decide([_started(A, TIMEOUT)], None)
    assert timed_out.removed[A.name] == (
        "drain timed out after 300s (the router's in-flight counts are unknown)"
    )
    assert [e.type for e in timed_out.events] == ["Warning"]


def test_the_timeout_removes_a_unit_with_requests_still_in_flight() -> None:
    result = _decide([_started(A, TIMEOUT + 5)], {A.url: UnitLoad(4, True)})
    assert result.removed == {A.name: "drain timed out after 300s (4 requests in flight)"}
    assert [e.reason for e in result.events] == [drain.DRAIN_TIMED_OUT]


def test_without_a_router_or_with_no_timeout_units_go_at_once() -> None:
    assert set(_decide([A, B], None, has_router=False).removed) == {A.name, B.name}
    assert set(_decide([A], {A.url: UnitLoad(5, True)}, timeout_seconds=0).removed) == {A.name}


def test_several_units_drain_at_once_each_by_its_own_count() -> None:
    load = {A.url: UnitLoad(0, True), B.url: UnitLoad(1, True)}
    result = _decide([_started(A, 10), _started(B, 10)], load)
    assert set(result.removed) == {A.name} and set(result.draining) == {B.name}
    assert result.waiting[B.name] == "decode unit 2 draining: 1 request in flight"


def test_router_replicas_are_summed_and_one_silent_replica_makes_the_answer_unknown() -> None:
    one = {"units": [{"url": A.url, "in_flight": 2, "draining": True}, {"url": B.url, "in_flight": 0}]}
    two = {"units": [{"url": A.url, "in_flight": 1, "draining": True}]}
    merged = drain.merge_router_answers([one, two])
    assert merged == {A.url: UnitLoad(3, True), B.url: UnitLoad(0, False)}
    assert drain.merge_router_answers([one, None]) is None
    assert drain.merge_router_answers([]) is None
    assert drain.merge_router_answers([{"error": {"message": "nope"}}]) is None


# -- the plan ------------------------------------------------------------------------------------


def _scalers(cr: dict[str, Any], decode: int) -> list[dict[str, Any]]:
    made = []
    for role, replicas in (("prefill", 1), ("decode", decode)):
        obj = scaler.scaler_object(cr, role, replicas)
        obj["status"] = {"deploymentUnits": 1}
        made.append(obj)
    return made


def _statefulsets(desired: Any) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: copy.deepcopy(c) for c in desired.children if c["kind"] == "StatefulSet"}


def _backends(desired: Any) -> dict[str, list[dict[str, Any]]]:
    data = next(c for c in desired.children if c["kind"] == "ConfigMap" and "router" in c["metadata"]["name"])
    parsed: dict[str, list[dict[str, Any]]] = json.loads(data["data"][children.ROUTER_BACKENDS_FILE])
    return parsed


def _observe(cr: dict[str, Any], sts: dict[str, Any], decode: int, **more: Any) -> Observed:
    return Observed(
        nodes=_nodes(), pods=[], statefulsets=sts, router=None, scalers=_scalers(cr, decode), **more
    )


@pytest.fixture
def two_decode_units() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    cr = _cr()
    grown = plan(cr, _observe(cr, {}, 2, now=NOW))
    sts = _statefulsets(grown)
    assert f"{cr['metadata']['name']}-decode-1" in sts
    return cr, sts


def test_scale_in_keeps_the_unit_draining_until_the_router_says_it_is_empty(
    two_decode_units: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    cr, sts = two_decode_units
    name = cr["metadata"]["name"]
    unit = f"{name}-decode-1"
    url = children.backend_url(children.leader_host(name, "decode", 1, "ns"))

    shrunk = plan(cr, _observe(cr, sts, 1, now=NOW, router_load=None))
    kept = _statefulsets(shrunk)[unit]
    assert kept["metadata"]["annotations"][DRAINING_SINCE] == format_time(NOW)
    assert kept["spec"] == sts[unit]["spec"]  # nothing about the unit changes: no restart
    assert any(c["kind"] == "Service" and c["metadata"]["name"] == unit for c in shrunk.children)
    assert _backends(shrunk)["decode"][-1] == {
        "url": url,
        "revision": _backends(shrunk)["decode"][0]["revision"],
        "draining": True,
    }
    assert len(_backends(shrunk)["decode"]) == 2
    entry = next(u for u in shrunk.status["units"] if u.get("draining"))
    assert entry["drainMessage"] == "decode unit 1 draining: the router's in-flight counts are unknown"
    assert shrunk.status["decode"]["units"] == 1
    assert shrunk.scales["decode"].status is not None and shrunk.scales["decode"].status["replicas"] == 1
    assert shrunk.draining == {unit: entry["drainMessage"]}

    # The operator restarts: the drain's start comes back from the StatefulSet's annotation.
    sts[unit] = kept
    later = NOW + timedelta(seconds=40)
    busy = {url: UnitLoad(3, True)}
    waiting = plan(cr, _observe(cr, sts, 1, now=later, router_load=busy))
    assert _statefulsets(waiting)[unit]["metadata"]["annotations"][DRAINING_SINCE] == format_time(NOW)
    assert [e.message for e in waiting.events if e.reason == drain.UNIT_DRAINING] == [
        "decode unit 1 draining: waiting for the requests in flight to finish"
    ]

    done = plan(cr, _observe(cr, sts, 1, now=later, router_load={url: UnitLoad(0, True)}))
    assert unit not in _statefulsets(done)
    assert not any(c["metadata"]["name"] == unit for c in done.children)
    assert [u["url"] for u in _backends(done)["decode"]] != [] and len(_backends(done)["decode"]) == 1
    assert done.draining == {}

    expired = plan(cr, _observe(cr, sts, 1, now=NOW + timedelta(seconds=301), router_load=busy))
    assert unit not in _statefulsets(expired)
    assert drain.DRAIN_TIMED_OUT in {e.reason for e in expired.events}


def test_scaling_back_up_cancels_the_drain_and_keeps_the_unit(
    two_decode_units: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    cr, sts = two_decode_units
    unit = f"{cr['metadata']['name']}-decode-1"
    original = copy.deepcopy(sts[unit])
    sts[unit] = _statefulsets(plan(cr, _observe(cr, sts, 1, now=NOW)))[unit]
    back = plan(cr, _observe(cr, sts, 2, now=NOW + timedelta(seconds=5)))
    restored = _statefulsets(back)[unit]
    assert DRAINING_SINCE not in restored["metadata"]["annotations"]
    assert restored["spec"] == original["spec"]  # same nodes, same revision: not restarted
    assert not back.recreate
    assert all("draining" not in u for u in _backends(back)["decode"])
    assert [e.reason for e in back.events if e.reason.startswith("Drain")] == [drain.DRAIN_CANCELLED]


def test_scale_in_without_a_router_removes_units_at_once(
    two_decode_units: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    cr, sts = two_decode_units
    cr["spec"]["router"] = {**cr["spec"].get("router", {}), "replicas": 0}
    shrunk = plan(cr, _observe(cr, sts, 1, now=NOW))
    assert f"{cr['metadata']['name']}-decode-1" not in _statefulsets(shrunk)
    assert shrunk.draining == {}


def test_surplus_and_cancelled_units_by_index() -> None:
    def sts(role: str, index: int, draining: bool = False) -> dict[str, Any]:
        annotations = {DRAINING_SINCE: format_time(NOW)} if draining else {}
        labels = {L.ROLE: role, L.UNIT: str(index)}
        return {"metadata": {"name": f"d-{role}-{index}", "labels": labels, "annotations": annotations}}

    found = {
        "d-decode-0": sts("decode", 0, draining=True),
        "d-decode-1": sts("decode", 1),
        "d-decode-2": sts("decode", 2, draining=True),
        "d-prefill-0": sts("prefill", 0),
    }
    surplus = drain.surplus_units(found, {"prefill": 1, "decode": 1}, lambda role, i: f"{role}{i}")
    assert [(s.name, s.url, s.since) for s in surplus] == [
        ("d-decode-1", "decode1", None),
        ("d-decode-2", "decode2", NOW),
    ]
    assert drain.cancelled(found, {"prefill": 1, "decode": 1}) == ["d-decode-0"]


def test_a_statefulset_being_deleted_takes_no_part_in_a_drain() -> None:
    labels = {L.ROLE: "decode", L.UNIT: "1"}
    gone = {
        "metadata": {
            "name": "d-decode-1",
            "labels": labels,
            "annotations": {DRAINING_SINCE: format_time(NOW)},
            "deletionTimestamp": format_time(NOW),
        }
    }
    found = {"d-decode-1": gone}
    assert drain.surplus_units(found, {"decode": 1}, lambda role, i: f"{role}{i}") == []
    assert drain.cancelled(found, {"decode": 2}) == []
    assert not drain.drain_due(found.values(), {"decode": 1})


def test_a_unit_deleted_by_an_earlier_pass_is_not_applied_again(
    two_decode_units: tuple[dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    cr, sts = two_decode_units
    unit = f"{cr['metadata']['name']}-decode-1"
    sts[unit] = _statefulsets(plan(cr, _observe(cr, sts, 1, now=NOW)))[unit]
    sts[unit]["metadata"]["uid"] = "uid-decode-1"
    # The drain ended and the unit was deleted; the watch still lists it, the router's answer is
    # unknown: without the deletion known, the plan would keep it draining and apply it again.
    stale = plan(cr, _observe(cr, sts, 1, now=NOW + timedelta(seconds=10)))
    assert unit in _statefulsets(stale)
    listed = drain.without_deleted(sts, {"uid-decode-1"})
    after = plan(cr, _observe(cr, listed, 1, now=NOW + timedelta(seconds=10)))
    assert not any(c["metadata"]["name"] == unit for c in after.children)
    assert after.draining == {}


def test_drain_due_only_for_a_drain_or_a_unit_at_or_above_the_live_count() -> None:
    def sts(index: int, draining: bool = False) -> dict[str, Any]:
        annotations = {DRAINING_SINCE: format_time(NOW)} if draining else {}
        return {"metadata": {"labels": {L.ROLE: "decode", L.UNIT: str(index)}, "annotations": annotations}}

    three = [sts(0), sts(1), sts(2)]
    assert not drain.drain_due(three, {"decode": 3})
    assert drain.drain_due(three, {"decode": 2})
    assert drain.drain_due([sts(0, draining=True)], {"decode": 3})
