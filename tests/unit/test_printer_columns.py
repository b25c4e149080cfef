"""Every printer column of every fireflyer CRD reads a field the API models define, with a
matching type, and every kind is in the `fireflyer` category (`kubectl get fireflyer`)."""

from __future__ import annotations

import re
import types
import typing
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from fireflyer.api import conditions as C
from fireflyer.api.base import GROUP
from fireflyer.api.kinds import BY_KIND, CATEGORY, KINDS
from fireflyer.dev.build import REPO_ROOT

CRD_FILES = sorted((REPO_ROOT / "crds").glob(f"{GROUP}_*.yaml"))
CONDITION_FILTER = re.compile(r'^conditions\[\?\(@\.type=="(?P<type>[A-Za-z]+)"\)\]$')
# The printer column type kubectl formats a value with → the Python types a field may hold.
COLUMN_TYPES: dict[str, tuple[type, ...]] = {"integer": (int,), "number": (float, int), "string": (str,)}
KNOWN_CONDITION_TYPES = {C.READY, C.PROGRESSING, C.DEGRADED, C.PLACED}


def _unwrap(annotation: Any) -> Any:
    """X | None → X; list[X] → X (a filtered list element); Literal["a", "b"] → str."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        (value_type,) = {type(value) for value in typing.get_args(annotation)}
        return value_type
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(inner)
    if origin is list:
        return _unwrap(typing.get_args(annotation)[0])
    return annotation


def _field_by_wire_name(model: type[BaseModel], wire: str) -> Any:
    for name, field in model.model_fields.items():
        if (field.alias or name) == wire:
            return field.annotation
    raise LookupError(f"{model.__name__} has no field {wire!r}")


def resolve(model: type[BaseModel], json_path: str) -> Any:
    """The Python type a printer column's jsonPath reads from an object of `model`; LookupError
    when a step names no field (a renamed or removed field)."""
    if json_path == ".metadata.creationTimestamp":
        return "date"
    if not json_path.startswith((".spec.", ".status.")):
        raise LookupError(f"{json_path}: only .spec, .status and the age are printed")
    current: Any = model
    for step in re.split(r"\.(?![^\[]*\])", json_path[1:]):  # dots outside [...] filters
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            raise LookupError(f"{json_path}: {step!r} is below a scalar")
        wire = step
        match = CONDITION_FILTER.match(step)
        if match:
            assert match["type"] in KNOWN_CONDITION_TYPES, f"{json_path}: unknown condition type"
            wire = "conditions"
        elif "[" in step:
            raise LookupError(f"{json_path}: unsupported filter {step!r}")
        current = _unwrap(_field_by_wire_name(current, wire))
    return current


def _crds() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in CRD_FILES]


def test_every_kind_has_a_generated_crd() -> None:
    assert {doc["spec"]["names"]["kind"] for doc in _crds()} == {k.kind for k in KINDS}


@pytest.mark.parametrize("doc", _crds(), ids=lambda d: d["spec"]["names"]["kind"])
def test_printer_columns_read_model_fields_of_their_type(doc: dict[str, Any]) -> None:
    kind = BY_KIND[doc["spec"]["names"]["kind"]]
    (version,) = doc["spec"]["versions"]
    columns = version["additionalPrinterColumns"]
    assert columns, "no printer columns"
    names = [c["name"] for c in columns]
    assert len(set(names)) == len(names), names
    for column in columns:
        python_type = resolve(kind.model, column["jsonPath"])
        if column["type"] == "date":
            assert python_type == "date", column
        else:
            assert python_type in COLUMN_TYPES[column["type"]], (column, python_type)
        assert column.get("priority", 0) in (0, 1), column
    assert columns[-1] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    assert any(c.get("priority") == 1 for c in columns), "nothing extra for -o wide"


@pytest.mark.parametrize("doc", _crds(), ids=lambda d: d["spec"]["names"]["kind"])
def test_every_kind_is_in_the_fireflyer_category(doc: dict[str, Any]) -> None:
    names = doc["spec"]["names"]
    assert CATEGORY == "fireflyer"
    assert names["categories"] == ["fireflyer"]
    assert names["shortNames"] == [BY_KIND[names["kind"]].short_name]


AT_A_GLANCE = {
    "InferenceDeployment": {"Ready", "Prefill", "Decode", "Balancedness"},
    "TrainingJob": {"Phase", "Step", "Loss", "Restarts", "Ready"},
    "ThreeFSCluster": {"Ready", "Phase", "Storage", "Chains", "Serving"},
    "ExpertPlacement": {"Deployment", "Role", "Generation", "Balancedness", "Applied"},
    "InferenceRoleScaler": {"Deployment", "Role", "Desired", "Current", "Ready"},
}


@pytest.mark.parametrize("doc", _crds(), ids=lambda d: d["spec"]["names"]["kind"])
def test_the_default_view_shows_the_essential_figures(doc: dict[str, Any]) -> None:
    (version,) = doc["spec"]["versions"]
    default = {c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")}
    assert AT_A_GLANCE[doc["spec"]["names"]["kind"]] <= default


@pytest.mark.parametrize(
    "json_path",
    [
        ".status.prefilReady",
        ".status.chains.totl",
        ".spec.engine.kind.name",
        ".metadata.name",
        ".status.nodes[0]",
    ],
)
def test_a_path_to_no_field_is_caught(json_path: str) -> None:
    kinds = [BY_KIND["InferenceDeployment"], BY_KIND["ThreeFSCluster"]]
    for kind in kinds:
        with pytest.raises(LookupError):
            resolve(kind.model, json_path)


def test_a_condition_column_reads_the_condition_model() -> None:
    model = BY_KIND["TrainingJob"].model
    assert resolve(model, '.status.conditions[?(@.type=="Ready")].status') is not None
    with pytest.raises(LookupError):
        resolve(model, '.status.conditions[?(@.type=="Ready")].state')
