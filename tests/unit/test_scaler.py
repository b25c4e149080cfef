"""The InferenceRoleScalers' sync plan: live units, creation, reset to the spec, status."""

from __future__ import annotations

import copy
import threading
from datetime import timedelta
from typing import Any

import pytest

from fireflyer.api.inference import Autoscaling, InferenceDeployment
from fireflyer.operator import events, kube, parallel_writes
from fireflyer.operator import labels as L
from fireflyer.operator.inference import reasons as R
from fireflyer.operator.inference import scaler, scaling
from fireflyer.operator.inference.plan import Observed, plan
from tests.unit.test_inference_plan import NOW, _cr, _nodes


def _scaler(cr: dict[str, Any], role: str, replicas: int, deployment_units: int | None) -> dict[str, Any]:
    obj = scaler.scaler_object(cr, role, replicas)
    if deployment_units is not None:
        obj["status"] = {"deploymentUnits": deployment_units}
    return obj


def _spec(cr: dict[str, Any]) -> Any:
    return InferenceDeployment.model_validate(cr).spec


def test_missing_scalers_are_created_with_the_spec_units() -> None:
    cr = _cr()
    scales = scaler.live_units(cr, _spec(cr), [])
    assert {r: s.units for r, s in scales.items()} == {"prefill": 1, "decode": 1}
    created = scales["prefill"].create
    assert created is not None
    assert created["metadata"]["name"] == "deepseek-v3-small-prefill"
    assert created["spec"] == {"deployment": "deepseek-v3-small", "role": "prefill", "replicas": 1}
    owner = created["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "uid-1"
    assert owner["controller"] is True


def test_the_scaler_sets_the_live_units() -> None:
    cr = _cr()
    scales = scaler.live_units(cr, _spec(cr), [_scaler(cr, "prefill", 3, 1), _scaler(cr, "decode", 1, 1)])
    assert scales["prefill"].units == 3
    assert scales["prefill"].reset_to is None
    assert scales["prefill"].create is None
    live = scaler.with_live_units(_spec(cr), scales)
    assert live.prefill.units == 3
    assert live.decode.units == 1
    assert _spec(cr).prefill.units == 1  # the user's spec is not touched


def test_a_changed_spec_wins_over_the_live_value() -> None:
    cr = _cr()
    cr["spec"]["prefill"]["units"] = 2  # Git said 2; the scaler was set from 1 and scaled to 3
    scales = scaler.live_units(cr, _spec(cr), [_scaler(cr, "prefill", 3, 1)])
    assert scales["prefill"].units == 2
    assert scales["prefill"].reset_to == 2


def test_a_scaler_set_before_its_status_was_written_keeps_its_value() -> None:
    cr = _cr()
    scales = scaler.live_units(cr, _spec(cr), [_scaler(cr, "prefill", 2, None)])
    assert scales["prefill"].units == 2
    assert scales["prefill"].reset_to is None


def test_a_scaler_of_another_deployment_of_that_name_is_ignored() -> None:
    cr = _cr()
    stranger = _scaler(cr, "prefill", 5, 1)
    stranger["metadata"]["ownerReferences"][0]["uid"] = "uid-old"
    scales = scaler.live_units(cr, _spec(cr), [stranger])
    assert scales["prefill"].units == 1


def test_status_selector_and_events() -> None:
    cr = _cr()
    cr["status"] = {"prefill": {"units": 1}, "decode": {"units": 1}}
    scalers = [_scaler(cr, "prefill", 2, 1), _scaler(cr, "decode", 1, 1)]
    scales = scaler.live_units(cr, _spec(cr), scalers)
    children = [
        {"kind": "StatefulSet", "metadata": {"labels": {L.ROLE: "prefill"}}},
        {"kind": "StatefulSet", "metadata": {"labels": {L.ROLE: "prefill"}}},
        {"kind": "Service", "metadata": {"labels": {L.ROLE: "prefill"}}},
    ]
    events = scaler.finish(cr, scales, scalers, children, {"prefill": 1, "decode": 0})
    assert scales["prefill"].status == {
        "replicas": 2,
        "readyReplicas": 1,
        "selector": "fireflyer.dev/component=unit,fireflyer.dev/deployment=deepseek-v3-small,"
        "fireflyer.dev/role=prefill",
        "deploymentUnits": 1,
    }
    assert [(e.reason, e.message) for e in events] == [
        (R.UNITS_SCALED, "prefill: 1 → 2 units (deepseek-v3-small-prefill)")
    ]


def test_an_unchanged_status_is_not_written_again() -> None:
    cr = _cr()
    scalers = [_scaler(cr, "decode", 1, 1)]
    scalers[0]["status"] |= {
        "replicas": 0,
        "readyReplicas": 0,
        "selector": scaler.selector(cr["metadata"]["name"], "decode"),
    }
    scales = scaler.live_units(cr, _spec(cr), scalers)
    scaler.finish(cr, scales, scalers, [], {})
    assert scales["decode"].status is None


def test_a_reset_says_so() -> None:
    cr = _cr()
    cr["spec"]["prefill"]["units"] = 2
    scalers = [_scaler(cr, "prefill", 3, 1)]
    scales = scaler.live_units(cr, _spec(cr), scalers)
    events = scaler.finish(cr, scales, scalers, [], {})
    assert [e.reason for e in events] == [R.SCALER_RESET]
    assert scales["prefill"].status is not None
    assert scales["prefill"].status["deploymentUnits"] == 2


def _units(desired: Any, role: str) -> list[str]:
    return sorted(
        c["metadata"]["name"]
        for c in desired.children
        if c["kind"] == "StatefulSet" and c["metadata"]["labels"][L.ROLE] == role
    )


def test_the_plan_runs_whole_units_from_the_scaler() -> None:
    cr = _cr()
    grown = [_scaler(cr, "prefill", 2, 1), _scaler(cr, "decode", 1, 1)]
    desired = plan(
        cr, Observed(nodes=_nodes(), pods=[], statefulsets={}, router=None, now=NOW, scalers=grown)
    )
    assert _units(desired, "prefill") == ["deepseek-v3-small-prefill-0", "deepseek-v3-small-prefill-1"]
    assert desired.status["prefill"]["units"] == 2
    assert desired.status["prefillReady"] == "0/2"
    assert desired.scales["prefill"].status is not None
    assert desired.scales["prefill"].status["replicas"] == 2
    shrunk = copy.deepcopy(grown)
    shrunk[0]["spec"]["replicas"] = 0
    desired = plan(
        cr, Observed(nodes=_nodes(), pods=[], statefulsets={}, router=None, now=NOW, scalers=shrunk)
    )
    assert _units(desired, "prefill") == []
    assert _units(desired, "decode") == ["deepseek-v3-small-decode-0"]


def test_without_observed_scalers_the_plan_follows_the_spec() -> None:
    cr = _cr()
    desired = plan(cr, Observed(nodes=_nodes(), pods=[], statefulsets={}, router=None, now=NOW))
    assert desired.scales == {}
    assert _units(desired, "prefill") == ["deepseek-v3-small-prefill-0"]


def test_an_autoscaler_pass_sets_the_scaler_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    cr = _cr()
    live = _scaler(cr, "decode", 2, 1)
    patches: list[tuple[str, dict[str, Any]]] = []
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(kube, "get", lambda kind, name, namespace=None: live)
    monkeypatch.setattr(kube, "patch", lambda kind, name, namespace, body: patches.append((name, body)))
    monkeypatch.setattr(events, "post", lambda cr, type_, reason, message: posted.append((reason, message)))
    readings = iter([3.0, None])
    monkeypatch.setattr(scaling, "read_metric", lambda cr, role, metric, units: next(readings))
    spec = Autoscaling.model_validate({"metric": "kvBlockUsage", "target": 1.0, "maxUnits": 5})
    monkeypatch.setattr(scaling, "_history", {})
    monkeypatch.setattr(scaling, "_last_sample", {})

    fields = scaling.autoscale_role(cr, "decode", spec, NOW)
    assert patches == [("deepseek-v3-small-decode", {"spec": {"replicas": 5}})]
    assert fields is not None
    assert fields["desiredUnits"] == 5
    assert fields["lastScaleTime"] == "2026-12-01T12:00:00Z"
    assert "maxUnits 5" in fields["reason"]
    assert posted[0][0] == R.AUTOSCALED

    # The next reading is missing: the last sample is still fresh and the scaler already says 5.
    live["spec"]["replicas"] = 5
    fields = scaling.autoscale_role(cr, "decode", spec, NOW + timedelta(seconds=30))
    assert fields is not None
    assert fields["desiredUnits"] == 5
    assert len(patches) == 1


def test_every_roles_scaler_is_written_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new deployment's pass creates each role's scaler and writes its status; one role after
    another, on a busy API server, those round trips added up."""
    cr = _cr()
    together = threading.Barrier(2, timeout=5)  # broken if the roles were written in turn
    written: list[tuple[str, str]] = []
    lock = threading.Lock()

    def create(obj: dict[str, Any]) -> dict[str, Any]:
        together.wait()
        with lock:
            written.append(("create", obj["metadata"]["name"]))
        return obj

    def patch_status(kind: str, name: str, namespace: str, body: dict[str, Any]) -> None:
        with lock:
            written.append(("status", name))

    monkeypatch.setattr(kube, "create", create)
    monkeypatch.setattr(kube, "patch_status", patch_status)
    scales = {
        role: scaler.RoleScale(
            role, 1, 1, create=scaler.scaler_object(cr, role, 1), status={"deploymentUnits": 1}
        )
        for role in ("prefill", "decode")
    }
    parallel_writes.each(scaling.scaler_writes(cr, scales), lambda write: write())  # as a pass does
    names = {f"deepseek-v3-small-{role}" for role in ("prefill", "decode")}
    assert {name for verb, name in written if verb == "create"} == names
    assert {name for verb, name in written if verb == "status"} == names
    for name in names:  # within a role, the status follows its scaler's creation
        assert written.index(("create", name)) < written.index(("status", name))
