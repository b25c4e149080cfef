"""A unit's revision: what recreates its pods when it changes, and what must not."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from fireflyer.api.inference import InferenceDeployment
from fireflyer.operator.inference import children

SAMPLE = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "manifests/samples/small/inference.yaml").read_text()
)
NODES = ("h100-000", "h100-001")


def _revision(**decode: Any) -> str:
    doc = copy.deepcopy(SAMPLE)
    doc["spec"]["decode"].update(decode)
    return children.revision(InferenceDeployment.model_validate(doc).spec, "decode", NODES)


def test_scaling_a_role_keeps_the_revision_of_its_units() -> None:
    base = _revision()
    assert _revision(units=3) == base
    assert _revision(units=0) == base
    assert _revision(maxUnavailableUnits=2) == base


def test_what_a_unit_runs_changes_its_revision() -> None:
    base = _revision()
    assert _revision(dispatchMode="normal") != base
    assert _revision(resources={"requests": {"memory": "1Ti"}}) != base
    assert children.revision(InferenceDeployment.model_validate(SAMPLE).spec, "decode", NODES[:1]) != base
