"""What an InferenceDeployment's reconcile writes and reads beside the plan: its status only when
what it owns changes, the routers asked only while a drain is possible, and a unit StatefulSet it
deleted never planned again from a lagging watch."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fireflyer.api import conditions as C
from fireflyer.api.crd import part_schema
from fireflyer.api.defaulting import with_defaults
from fireflyer.operator import events, kube, status_writes
from fireflyer.operator import labels as L
from fireflyer.operator.inference import controller, drain_reader, lending_writes, scaler, scaling
from fireflyer.operator.inference.plan import Observed, plan
from fireflyer.operator.inference.status import status_changed
from tests.unit.test_inference_plan import NOW, _cr, _nodes

# -- status_changed ------------------------------------------------------------------------------


def test_other_writers_sub_keys_are_no_change() -> None:
    live = {
        "prefill": {"units": 2, "readyUnits": 2, "autoscaler": {"metricValue": 0.4}},
        "observedGeneration": 3,
        "eplb": {"lastRebalance": "then"},
    }
    assert not status_changed(live, {"prefill": {"units": 2, "readyUnits": 2}, "observedGeneration": 3})


def test_a_changed_owned_key_or_sub_key_is_a_change() -> None:
    live = {"prefill": {"units": 2, "readyUnits": 2, "autoscaler": {}}, "units": [{"index": 0}]}
    assert status_changed(live, {"prefill": {"units": 2, "readyUnits": 1}})
    assert status_changed(live, {"units": [{"index": 0}, {"index": 1}]})  # lists are replaced whole
    assert status_changed(live, {"decode": {"units": 1}})
    assert status_changed({"prefill": "2/2"}, {"prefill": {"units": 2}})


# -- apply: the status PATCH ---------------------------------------------------------------------


def _scalers(cr: dict[str, Any]) -> list[dict[str, Any]]:
    made = []
    for role in ("prefill", "decode"):
        obj = scaler.scaler_object(cr, role, 1)
        obj["status"] = {"deploymentUnits": 1}
        made.append(obj)
    return made


def test_an_autoscaled_deployments_unchanged_status_is_not_written(monkeypatch: pytest.MonkeyPatch) -> None:
    patches: list[dict[str, Any]] = []

    def patch_status(
        kind: str, name: str, namespace: str, fields: dict[str, Any], conditions: Any, *a: Any, **k: Any
    ) -> None:
        patches.append({**fields, "conditions": C.merge([], conditions, "2026-12-01T12:00:00Z", 1)})

    monkeypatch.setattr(status_writes, "patch_status", patch_status)
    monkeypatch.setattr(kube, "apply", lambda obj: obj)
    monkeypatch.setattr(kube, "list_", lambda *a, **k: [])
    monkeypatch.setattr(scaling, "scaler_writes", lambda cr, scales: [])
    monkeypatch.setattr(lending_writes, "request", lambda *a: None)
    monkeypatch.setattr(events, "post", lambda *a: None)
    cr = _cr()
    desired = plan(
        cr, Observed(nodes=_nodes(), pods=[], statefulsets={}, router=None, now=NOW, scalers=_scalers(cr))
    )
    controller.apply(cr, desired)
    assert len(patches) == 1
    written = copy.deepcopy(patches[0])
    written["prefill"]["autoscaler"] = {"desiredUnits": 1, "metricValue": 0.2}  # scaling.py's
    written = with_defaults(written, part_schema("InferenceDeployment", "status"))  # the API server's
    cr["status"] = written
    controller.apply(cr, desired)
    assert len(patches) == 1
    written["prefill"]["readyUnits"] = 5
    controller.apply(cr, desired)
    assert len(patches) == 2


# -- drain_possible: when the routers are asked ----------------------------------------------------


def _unit_sts(role: str, index: int, uid: str = "") -> dict[str, Any]:
    labels = {L.ROLE: role, L.UNIT: str(index), L.DEPLOYMENT: "d", L.COMPONENT: "unit"}
    return {"metadata": {"name": f"d-{role}-{index}", "uid": uid or f"u-{role}-{index}", "labels": labels}}


def _cluster(
    monkeypatch: pytest.MonkeyPatch, cr: dict[str, Any], decode_replicas: int, decode_units: int
) -> None:
    scalers = _scalers(cr)
    scalers[1]["spec"]["replicas"] = decode_replicas
    units = [_unit_sts("prefill", 0)] + [_unit_sts("decode", i) for i in range(decode_units)]
    by_kind = {"StatefulSet": units, scaler.KIND: scalers}
    monkeypatch.setattr(kube, "list_", lambda kind, *a, **k: by_kind.get(kind, []))
    by_name = {s["metadata"]["name"]: s for s in scalers}
    monkeypatch.setattr(kube, "get", lambda kind, name, *a, **k: by_name.get(name))


def test_the_routers_are_not_asked_while_the_autoscaler_runs_above_the_spec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cr = _cr()
    assert cr["spec"]["decode"].get("units", 1) == 1
    _cluster(monkeypatch, cr, decode_replicas=3, decode_units=3)
    assert not drain_reader.drain_possible(cr)


def test_the_routers_are_asked_on_a_scale_in(monkeypatch: pytest.MonkeyPatch) -> None:
    cr = _cr()
    _cluster(monkeypatch, cr, decode_replicas=2, decode_units=3)
    assert drain_reader.drain_possible(cr)
    # ... but not once the surplus unit is deleted, even while a lagging watch lists it.
    assert not drain_reader.drain_possible(cr, {"u-decode-2"})


# -- observe: a unit deleted by an earlier pass ----------------------------------------------------


def test_a_deleted_unit_is_left_out_until_the_watch_drops_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cr = _cr()
    cr["metadata"]["name"] = "d"
    units = [_unit_sts("decode", 0), _unit_sts("decode", 1)]
    for sts in units:
        sts["metadata"]["namespace"] = "ns"
    monkeypatch.setattr(kube, "list_", lambda kind, *a, **k: units if kind == "StatefulSet" else [])
    monkeypatch.setattr(kube, "get", lambda *a, **k: None)
    deleted = controller.DeletedUnits()
    monkeypatch.setattr(controller, "_deleted_units", deleted)
    deleted.note("u-decode-1")
    assert set(controller.observe(cr, [], []).statefulsets) == {"d-decode-0"}
    assert drain_reader.drain_possible(cr, deleted.uids()) is False
    units.pop()  # the watch saw the deletion: the uid is forgotten
    controller.observe(cr, [], [])
    assert deleted.uids() == set()
