"""Which ExpertPlacement a role runs, and the document its pods read. Pure.

dynamic: the highest generation the EPLB controller wrote (labelled managed-by fireflyer).
static: the highest generation of the placements a person wrote (no such label), so that ones the
controller wrote before a switch to static are not used. Either way a placement whose shape does
not match the role (layers, experts, GPUs, slots) is skipped: its units could not apply it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fireflyer.api import conditions as C
from fireflyer.api.inference import InferenceDeploymentSpec
from fireflyer.operator import labels as L
from fireflyer.operator.inference import reasons as R

PLACEMENT_FILE = "placement.json"
DOCUMENT_KEYS = ("generation", "layers", "logicalExperts", "gpus", "slotsPerGpu", "phy2log")


def role_placements(
    items: Iterable[dict[str, Any]], deployment: str, role: str, mode: str
) -> list[dict[str, Any]]:
    """The placements of one role that the mode takes from, oldest generation first."""
    if mode == "off":
        return []
    chosen = []
    for item in items:
        spec = item.get("spec") or {}
        if spec.get("deployment") != deployment or spec.get("role") != role:
            continue
        if item.get("metadata", {}).get("deletionTimestamp"):
            continue
        ours = (item.get("metadata", {}).get("labels") or {}).get(L.MANAGED_BY) == L.MANAGER
        if ours == (mode == "dynamic"):
            chosen.append(item)
    return sorted(
        chosen, key=lambda p: (int(p["spec"].get("generation") or 0), p["metadata"].get("name", ""))
    )


def mismatch(placement: dict[str, Any], spec: InferenceDeploymentSpec, role: str) -> str:
    """Why a placement cannot run on the role's units ("" when it can)."""
    arch = spec.model.architecture
    gpus = getattr(spec, role).parallelism.expert
    slots = arch.routed_experts + spec.eplb.redundant_experts
    p = placement.get("spec") or {}
    want = {
        "layers": arch.moe_layers,
        "logicalExperts": arch.routed_experts,
        "gpus": gpus,
        "slotsPerGpu": slots // gpus,
    }
    for key, value in want.items():
        if p.get(key) != value:
            return f"{key} is {p.get(key)}, the role needs {value}"
    rows = p.get("phy2log") or []
    if len(rows) != arch.moe_layers or any(len(row) != slots for row in rows):
        return f"phy2log is not {arch.moe_layers} × {slots}"
    return ""


def current_placement(
    items: Iterable[dict[str, Any]], deployment: str, role: str, spec: InferenceDeploymentSpec
) -> tuple[dict[str, Any] | None, list[str]]:
    """(the placement the role runs, why newer ones were skipped)."""
    skipped: list[str] = []
    for item in reversed(role_placements(items, deployment, role, spec.eplb.mode)):
        why = mismatch(item, spec, role)
        if not why:
            return item, skipped
        skipped.append(f"{item['metadata'].get('name')}: {why}")
    return None, skipped


def placement_document(placement: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON the units read from placement.json; {} means no placement yet (the default even
    split)."""
    if placement is None:
        return {}
    spec = placement["spec"]
    return {key: spec[key] for key in DOCUMENT_KEYS}


def static_condition(role: str, chosen: dict[str, Any] | None, skipped: list[str]) -> dict[str, Any]:
    """eplb.mode static: the role's part of EplbHealthy. No placement at all is healthy (its units
    run the default even split); placements that all fail to fit are not."""
    if chosen is not None:
        where = f"generation {chosen['spec']['generation']} ({chosen['metadata'].get('name')})"
        return C.condition(C.EPLB_HEALTHY, True, R.PLACEMENT_FOUND, f"{role}: {where}")
    if skipped:
        why = "; ".join(skipped)
        return C.condition(C.EPLB_HEALTHY, False, R.NO_PLACEMENT, f"{role}: no ExpertPlacement fits ({why})")
    return C.condition(
        C.EPLB_HEALTHY, True, R.NO_PLACEMENT, f"{role}: no ExpertPlacement; the default even split"
    )
