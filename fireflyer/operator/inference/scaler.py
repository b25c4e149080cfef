"""The InferenceRoleScalers of a deployment: which units each role runs now, and what to write
to its scaler. Pure.

The role's `units` in the InferenceDeployment is the intent kept in Git; the scaler's
spec.replicas is the live value that `kubectl scale`, an HPA or the built-in autoscaler move.
The scaler remembers (status.deploymentUnits) the deployment's units it was last set from: when
they change, the deployment wins again and the scaler is reset to them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fireflyer.api.inference import InferenceDeploymentSpec
from fireflyer.operator import labels as L
from fireflyer.operator.inference import reasons as R
from fireflyer.operator.inference.drain import DRAINING_SINCE
from fireflyer.operator.planning import Event

KIND = "InferenceRoleScaler"
ROLES = ("prefill", "decode")


def scaler_name(deployment: str, role: str) -> str:
    return f"{deployment}-{role}"


def selector(deployment: str, role: str) -> str:
    """The role's unit pods, as a label selector string (what an HPA reads pod metrics by)."""
    return f"{L.COMPONENT}=unit,{L.DEPLOYMENT}={deployment},{L.ROLE}={role}"


@dataclass
class RoleScale:
    role: str
    units: int
    """The units the role runs now."""
    deployment_units: int
    """The role's units in the InferenceDeployment's spec."""
    create: dict[str, Any] | None = None
    """A scaler to create (there is none yet)."""
    reset_to: int | None = None
    """spec.replicas to write: the deployment's units changed and win over the live value."""
    status: dict[str, Any] | None = None
    """The scaler's status when it differs from what it shows."""


def scaler_object(cr: dict[str, Any], role: str, replicas: int) -> dict[str, Any]:
    meta = cr["metadata"]
    return {
        "apiVersion": "fireflyer.dev/v1alpha1",
        "kind": KIND,
        "metadata": {
            "name": scaler_name(meta["name"], role),
            "namespace": meta["namespace"],
            "labels": {L.DEPLOYMENT: meta["name"], L.ROLE: role, L.MANAGED_BY: L.MANAGER},
            "ownerReferences": [
                {
                    "apiVersion": cr.get("apiVersion", "fireflyer.dev/v1alpha1"),
                    "kind": cr.get("kind", "InferenceDeployment"),
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {"deployment": meta["name"], "role": role, "replicas": replicas},
    }


def _owned(cr: dict[str, Any], scaler: dict[str, Any]) -> bool:
    uid = cr["metadata"].get("uid")
    return any(o.get("uid") == uid for o in scaler["metadata"].get("ownerReferences") or [])


def live_units(
    cr: dict[str, Any], spec: InferenceDeploymentSpec, scalers: list[dict[str, Any]]
) -> dict[str, RoleScale]:
    """Per role: the units it runs now and what its scaler needs written."""
    name = cr["metadata"]["name"]
    by_name = {s["metadata"]["name"]: s for s in scalers if _owned(cr, s)}
    scales = {}
    for role in ROLES:
        intent = getattr(spec, role).units
        scaler = by_name.get(scaler_name(name, role))
        if scaler is None:
            scales[role] = RoleScale(role, intent, intent, create=scaler_object(cr, role, intent))
            continue
        live = int((scaler.get("spec") or {}).get("replicas", intent))
        remembered = (scaler.get("status") or {}).get("deploymentUnits")
        if remembered is not None and remembered != intent:
            reset = intent if live != intent else None
            scales[role] = RoleScale(role, intent, intent, reset_to=reset)
        else:
            scales[role] = RoleScale(role, live, intent)
    return scales


def with_live_units(spec: InferenceDeploymentSpec, scales: dict[str, RoleScale]) -> InferenceDeploymentSpec:
    """The spec the plan follows: each role with the units it runs now."""
    update = {
        role: getattr(spec, role).model_copy(update={"units": scales[role].units})
        for role in ROLES
        if role in scales and scales[role].units != getattr(spec, role).units
    }
    return spec.model_copy(update=update) if update else spec


def finish(
    cr: dict[str, Any],
    scales: dict[str, RoleScale],
    scalers: list[dict[str, Any]],
    children: list[dict[str, Any]],
    ready_units: dict[str, int],
) -> list[Event]:
    """Fill in each scaler's status from the planned children (units draining before a scale-in
    are not counted); → Events for roles whose live units changed."""
    name = cr["metadata"]["name"]
    placed_units = dict.fromkeys(ROLES, 0)
    for child in children:
        role = (child["metadata"].get("labels") or {}).get(L.ROLE)
        draining = DRAINING_SINCE in (child["metadata"].get("annotations") or {})
        if child["kind"] == "StatefulSet" and role in placed_units and not draining:
            placed_units[role] += 1
    by_name = {s["metadata"]["name"]: s for s in scalers}
    previous = cr.get("status") or {}
    events = []
    for role, scale in scales.items():
        status = {
            "replicas": placed_units.get(role, 0),
            "readyReplicas": ready_units.get(role, 0),
            "selector": selector(name, role),
            "deploymentUnits": scale.deployment_units,
        }
        current = (by_name.get(scaler_name(name, role)) or {}).get("status") or {}
        if any(current.get(k) != v for k, v in status.items()):
            scale.status = status
        before = (previous.get(role) or {}).get("units")
        if scale.reset_to is not None:
            events.append(
                Event(
                    "Normal",
                    R.SCALER_RESET,
                    f"{role}: units in the spec changed to {scale.deployment_units}; "
                    f"{scaler_name(name, role)} reset to them",
                )
            )
        elif before is not None and before != scale.units:
            events.append(
                Event(
                    "Normal",
                    R.UNITS_SCALED,
                    f"{role}: {before} → {scale.units} units ({scaler_name(name, role)})",
                )
            )
    return events
