"""The generation units report (GET /v1/eplb/load's `generation`), what the EPLB controller writes
from it, and which ExpertPlacement a role runs."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fireflyer.api.inference import InferenceDeployment
from fireflyer.operator.eplb import applied
from fireflyer.operator.eplb.placements import (
    current_placement,
    mismatch,
    placement_document,
    static_condition,
)
from tests.unit.test_inference_mounts import NAME, _xp
from tests.unit.test_inference_revision import SAMPLE

SPEC = InferenceDeployment.model_validate(SAMPLE).spec


@pytest.mark.parametrize(
    ("payload", "generation"),
    [
        ({"layers": 58, "tokens": [], "generation": 4}, 4),
        ({"tokens": [], "generation": None}, 0),  # the default even split
        ({"tokens": []}, None),  # an engine without the field: unknown
        ({"generation": "4"}, None),
        ({"generation": True}, None),
        ({"generation": -1}, None),
        ([1, 2], None),
    ],
)
def test_reported_generation(payload: Any, generation: int | None) -> None:
    assert applied.reported_generation(payload) == generation


def test_the_role_applies_the_lowest_generation_any_unit_reports() -> None:
    assert applied.lowest([3, None, 2, 3]) == 2
    assert applied.lowest([3, 0]) == 0
    assert applied.lowest([None, None]) is None
    assert applied.lowest([]) is None


def test_applied_units_are_written_only_where_they_change() -> None:
    one, two, three = _xp("decode", 1), _xp("decode", 2), _xp("decode", 3)
    two["status"] = {"appliedUnits": 1, "balancedness": 0.9}
    three["status"] = {"appliedUnits": 2}
    changes = applied.applied_units([one, two, three], [2, 2, None, 3, 0])
    assert changes == {f"{NAME}-decode-2": 2, f"{NAME}-decode-3": 1}
    assert applied.applied_units([two], [2]) == {}


def test_a_placement_that_does_not_fit_the_role_says_why() -> None:
    assert mismatch(_xp("decode", 1), SPEC, "decode") == ""
    assert mismatch(_xp("decode", 1, gpus=16), SPEC, "decode") == "gpus is 16, the role needs 32"
    short = _xp("decode", 1)
    short["spec"]["phy2log"] = short["spec"]["phy2log"][:-1]
    assert mismatch(short, SPEC, "decode") == "phy2log is not 58 × 288"


def test_current_placement_skips_newer_ones_that_do_not_fit() -> None:
    chosen, skipped = current_placement([_xp("decode", 1), _xp("decode", 2, gpus=16)], NAME, "decode", SPEC)
    assert chosen is not None and chosen["spec"]["generation"] == 1
    assert skipped == [f"{NAME}-decode-2: gpus is 16, the role needs 32"]
    off = copy.deepcopy(SAMPLE)
    off["spec"]["eplb"] = {"mode": "off", "redundantExperts": 0}
    spec = InferenceDeployment.model_validate(off).spec
    assert current_placement([_xp("decode", 1)], NAME, "decode", spec) == (None, [])


def test_placement_document() -> None:
    xp = _xp("decode", 2)
    assert placement_document(None) == {}
    assert placement_document(xp) == {k: xp["spec"][k] for k in xp["spec"] if k not in ("deployment", "role")}


def test_static_health_per_role() -> None:
    found = static_condition("decode", _xp("decode", 2), [])
    assert (found["status"], found["reason"]) == ("True", "PlacementFound") and "generation 2" in found[
        "message"
    ]
    none = static_condition("prefill", None, [])
    assert (none["status"], none["reason"]) == ("True", "NoPlacement")
    unfit = static_condition("decode", None, ["x: gpus is 16, the role needs 32"])
    assert (unfit["status"], unfit["reason"]) == ("False", "NoPlacement") and "gpus is 16" in unfit["message"]


def test_the_roles_health_combines() -> None:
    found = static_condition("decode", _xp("decode", 2), [])
    none = static_condition("prefill", None, [])
    unfit = static_condition("decode", None, ["x: gpus"])
    assert applied.combine_health([]) is None
    both = applied.combine_health([none, found])
    assert both is not None and (both["status"], both["reason"]) == ("True", "PlacementFound")
    assert none["message"] in both["message"] and found["message"] in both["message"]
    bad = applied.combine_health([found, unfit])
    assert bad is not None and (bad["status"], bad["reason"], bad["message"]) == (
        "False",
        "NoPlacement",
        unfit["message"],
    )
    collected = [
        {"type": "EplbHealthy", "status": "True", "reason": "LoadCollected", "message": "load collected"}
    ] * 2
    assert applied.combine_health(collected)["message"] == "load collected"  # type: ignore[index]
