"""A status read back from the API server carries the CRD's defaults (a unit's `draining: false`,
`drainMessage: ""`, …). Compared with the plan's status as computed, an unchanged status looked
changed, and every resync pass of every deployment sent a status write that changed nothing."""

from __future__ import annotations

from datetime import timedelta

from fireflyer.api.crd import part_schema
from fireflyer.api.defaulting import status_as_stored, with_defaults
from fireflyer.operator.inference.plan import Observed, plan
from fireflyer.operator.inference.status import status_changed
from tests.unit.test_inference_plan import NOW, _nodes, _placed, _pods

KIND = "InferenceDeployment"


def _steady_status() -> dict:
    cr, sets = _placed()
    pods = [p for sts in sets.values() for p in _pods(sts, NOW - timedelta(minutes=5))]
    desired = plan(cr, Observed(nodes=_nodes(), pods=pods, statefulsets=sets, router=None, now=NOW))
    status = dict(desired.status)
    status.pop("conditions")
    return status


def test_an_unchanged_status_read_back_is_not_written_again() -> None:
    sent = _steady_status()
    stored = with_defaults(sent, part_schema(KIND, "status"))  # what the API server keeps
    assert stored["units"][0]["draining"] is False and stored["units"][0]["drainMessage"] == ""
    assert status_changed(stored, sent)  # the comparison that wrote on every pass
    assert not status_changed(stored, status_as_stored(KIND, sent))


def test_a_real_change_is_still_written() -> None:
    sent = _steady_status()
    stored = with_defaults(sent, part_schema(KIND, "status"))
    sent["units"][0] = {**sent["units"][0], "ready": False}
    assert status_changed(stored, status_as_stored(KIND, sent))


def test_defaults_fill_nested_objects_and_array_items_but_keep_what_is_set() -> None:
    schema = {
        "type": "object",
        "properties": {
            "mode": {"type": "string", "default": "auto"},
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"on": {"type": "boolean", "default": True}}},
            },
        },
    }
    assert with_defaults({"items": [{}, {"on": False}]}, schema) == {
        "mode": "auto",
        "items": [{"on": True}, {"on": False}],
    }
    assert with_defaults({"mode": "fixed"}, schema) == {"mode": "fixed"}
