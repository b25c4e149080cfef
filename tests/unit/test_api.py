"""The API models: samples parse, generated CRDs are structural and up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.api import crd
from fireflyer.api.kinds import BY_KIND, KINDS

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO_ROOT / "manifests" / "samples").rglob("*.yaml"))


def test_there_is_a_sample_of_every_kind_at_both_sizes() -> None:
    kinds = {(p.parent.name == "small", yaml.safe_load(p.read_text())["kind"]) for p in SAMPLES}
    created_by_the_operator = {"InferenceRoleScaler"}  # one per role of every deployment
    for kind in BY_KIND.keys() - created_by_the_operator:
        assert (False, kind) in kinds and (True, kind) in kinds


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_sample_parses_into_its_model(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    model = BY_KIND[doc["kind"]].model.model_validate(doc)
    # Round trip: what the model writes back is what the sample said (plus defaults).
    wire = model.to_wire()
    assert _subset(doc["spec"], wire["spec"]), path


def _subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _subset(v, big[k]) for k, v in small.items())
    return bool(small == big)


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found += _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _walk(value, f"{path}[{i}]")
    return found


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind: Any) -> None:
    schema = crd.openapi_schema(kind)
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        if "properties" in node and not path.endswith(".properties"):
            assert node.get("type") == "object", path
            for name, prop in node["properties"].items():
                assert "type" in prop or prop.get("x-kubernetes-preserve-unknown-fields"), (
                    f"{path}.{name} has no type"
                )


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_every_spec_field_is_documented(kind: Any) -> None:
    spec = crd.openapi_schema(kind)["properties"]["spec"]
    for path, node in _walk(spec):
        if path.endswith(".properties"):
            for name, prop in node.items():
                assert prop.get("description"), f"{kind.kind} spec{path}.{name} has no description"


def test_generated_crds_are_up_to_date() -> None:
    assert crd.stale(list(crd.DEFAULT_OUT_DIRS)) == []


def test_there_are_many_cross_field_rules() -> None:
    rules = []
    for kind in KINDS:
        for _, node in _walk(crd.openapi_schema(kind)):
            rules += node.get("x-kubernetes-validations", [])
    assert len(rules) >= 25
    assert all(rule["message"] for rule in rules)


def test_defaulted_objects_fill_their_fields() -> None:
    doc = yaml.safe_load((REPO_ROOT / "manifests/samples/small/inference.yaml").read_text())
    model = BY_KIND["InferenceDeployment"].model.model_validate(doc)
    assert model.spec.model.architecture.routed_experts == 256
    assert model.spec.placement.required_level == "spine"
    assert model.spec.network.rdma_resource == "rdma/ib"


def test_an_unreadable_spec_reports_not_ready_and_degraded_for_its_generation() -> None:
    from fireflyer.api import conditions as C

    placed = {"type": "Placed", "status": "True", "reason": "UnitsPlaced", "lastTransitionTime": "t0"}
    ready = {"type": "Ready", "status": "False", "reason": "Placing", "lastTransitionTime": "t1"}
    cr = {"metadata": {"generation": 7}, "status": {"conditions": [placed, ready]}}
    status = C.invalid_spec_status(cr, "x" * 5000, "t2")
    by_type = {c["type"]: c for c in status["conditions"]}
    assert status["observedGeneration"] == 7
    assert by_type["Ready"]["reason"] == C.INVALID_SPEC and by_type["Ready"]["status"] == "False"
    assert by_type["Ready"]["lastTransitionTime"] == "t1"  # it did not flip
    assert by_type["Degraded"]["status"] == "True" and by_type["Degraded"]["lastTransitionTime"] == "t2"
    assert by_type["Placed"] == placed  # another part's condition is kept
    assert len(by_type["Ready"]["message"]) == 1000
