"""The EPLB timer. Per role with eplb.mode dynamic: collect → rebalance → publish, every
intervalSeconds. Per role with eplb.mode dynamic or static: which placement generation the units
report running (appliedUnits, appliedPlacementGeneration), every APPLIED_POLL_SECONDS."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import kopf
import numpy as np
from prometheus_client import Counter, Gauge

from fireflyer.api import conditions as C
from fireflyer.api.base import GROUP, VERSION
from fireflyer.api.inference import EPLB_LOAD_URL_ANNOTATION, InferenceDeployment
from fireflyer.operator import events, kube, metrics
from fireflyer.operator import labels as L
from fireflyer.operator.eplb import applied
from fireflyer.operator.eplb.placements import current_placement, role_placements, static_condition
from fireflyer.operator.eplb.plan import LoadError, current_table, decide, parse_window
from fireflyer.operator.inference import children, writes
from fireflyer.operator.inference.engines import SERVE_PORT
from fireflyer.operator.resync import Resync

BALANCEDNESS = Gauge(
    "fireflyer_eplb_balancedness",
    "Balancedness of the current placement",
    ["namespace", "deployment", "role"],
)
REBALANCES = Counter(
    "fireflyer_eplb_rebalances_total",
    "ExpertPlacement generations published",
    ["namespace", "deployment", "role"],
)
COLLECT_ERRORS = Counter(
    "fireflyer_eplb_collect_errors_total",
    "Load windows that could not be used",
    ["namespace", "deployment", "role"],
)
CHECK_SECONDS = 5.0
APPLIED_POLL_SECONDS = 30.0
KEEP_GENERATIONS = 3
TIME = "%Y-%m-%dT%H:%M:%SZ"
log = logging.getLogger(__name__)
# When each role's leaders were last asked (monotonic), by (namespace, deployment, role).
_polled: dict[tuple[str, str, str], float] = {}


def _sources(cr: dict[str, Any], role: str, units: int) -> list[str]:
    override = (cr["metadata"].get("annotations") or {}).get(EPLB_LOAD_URL_ANNOTATION)
    if override:
        return [override]
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    sources = []
    for i in range(units):
        # The leader's pod address when it has one: reachable wherever the pod network is,
        # including from an operator outside the cluster's DNS (the dev cluster's).
        leader = kube.get("Pod", f"{children.unit_name(name, role, i)}-0", namespace)
        host = ((leader or {}).get("status") or {}).get("podIP") or children.leader_host(
            name, role, i, namespace
        )
        sources.append(f"http://{host}:{SERVE_PORT}/v1/eplb/load")
    return sources


def fetch(sources: list[str]) -> list[tuple[str, Any]]:
    """(url, payload or the LoadError that stood in its way) for every source."""
    results: list[tuple[str, Any]] = []
    for url in sources:
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                results.append((url, json.loads(resp.read())))
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            results.append((url, LoadError(f"{url}: {exc}")))
    return results


def collect(windows: list[tuple[str, Any]], layers: int, experts: int) -> np.ndarray:
    """The role's load: every unit's window, summed; any unusable window fails it."""
    total = np.zeros((layers, experts))
    for url, payload in windows:
        if isinstance(payload, LoadError):
            raise payload
        total += parse_window(payload, layers, experts, url)
    return total


def generations(windows: list[tuple[str, Any]]) -> list[int | None]:
    return [None if isinstance(p, LoadError) else applied.reported_generation(p) for _, p in windows]


def _placement(
    cr: dict[str, Any],
    role: str,
    generation: int,
    table: np.ndarray,
    gpus: int,
    slots_per_gpu: int,
    experts: int,
    status: dict[str, Any],
) -> dict[str, Any]:
    name = cr["metadata"]["name"]
    return {
        "apiVersion": "fireflyer.dev/v1alpha1",
        "kind": "ExpertPlacement",
        "metadata": {
            "name": f"{name}-{role}-{generation}",
            "namespace": cr["metadata"]["namespace"],
            "labels": {L.DEPLOYMENT: name, L.ROLE: role, L.MANAGED_BY: L.MANAGER},
            "ownerReferences": [children.owner_reference(cr)],
        },
        "spec": {
            "deployment": name,
            "role": role,
            "generation": generation,
            "layers": int(table.shape[0]),
            "logicalExperts": experts,
            "gpus": gpus,
            "slotsPerGpu": slots_per_gpu,
            "phy2log": table.tolist(),
        },
        "status": status,
    }


def rebalance_role(
    cr: dict[str, Any], role: str, now: datetime, windows: list[tuple[str, Any]]
) -> dict[str, Any]:
    """One rebalance → publish pass over the collected windows; returns the role's status fields."""
    spec = InferenceDeployment.model_validate(cr).spec
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    arch = spec.model.architecture
    role_spec = getattr(spec, role)
    gpus = role_spec.parallelism.expert
    slots = arch.routed_experts + spec.eplb.redundant_experts
    existing = kube.list_("ExpertPlacement", namespace, f"{L.DEPLOYMENT}={name},{L.ROLE}={role}")
    generation, table = current_table(existing, arch.moe_layers, arch.routed_experts, slots)
    stamp = now.strftime(TIME)
    load = collect(windows, arch.moe_layers, arch.routed_experts)
    decision = decide(spec, role, load, table)
    result: dict[str, Any] = {
        "lastRebalanceCheck": stamp,
        "placementGeneration": generation or None,
        "balancedness": round(decision.before, 4),
    }
    if decision.publish and decision.phy2log is not None:
        generation += 1
        obj = _placement(cr, role, generation, decision.phy2log, gpus, slots // gpus, arch.routed_experts, {})
        kube.apply({k: v for k, v in obj.items() if k != "status"})
        kube.patch_status(
            "ExpertPlacement",
            obj["metadata"]["name"],
            namespace,
            {"balancedness": round(decision.after, 4), "previousBalancedness": round(decision.before, 4)},
        )
        REBALANCES.labels(namespace, name, role).inc()
        events.post(cr, "Normal", C.REBALANCE_APPLIED, f"{role}: generation {generation}: {decision.reason}")
        result.update(placementGeneration=generation, balancedness=round(decision.after, 4))
        gens = sorted(existing, key=lambda p: int(p["spec"].get("generation", 0)))
        for old in gens[: max(0, len(gens) + 1 - KEEP_GENERATIONS)]:
            kube.delete("ExpertPlacement", old["metadata"]["name"], namespace)
    metrics.eplb_decision(namespace, name, role, decision.before, decision.after, generation)
    BALANCEDNESS.labels(namespace, name, role).set(result["balancedness"])
    result["reason"] = decision.reason
    return result


def record_applied(
    cr: dict[str, Any], role: str, reported: list[int | None]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Write appliedUnits on the role's placements; → (the role's status fields about them, in
    static mode the role's EplbHealthy condition)."""
    spec = InferenceDeployment.model_validate(cr).spec
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    items = kube.list_("ExpertPlacement", namespace)
    for placement, count in applied.applied_units(
        role_placements(items, name, role, spec.eplb.mode), reported
    ).items():
        # Only this field: balancedness and conditions belong to whoever wrote them.
        kube.patch_status("ExpertPlacement", placement, namespace, {"appliedUnits": count})
    fields: dict[str, Any] = {"appliedPlacementGeneration": applied.lowest(reported)}
    if spec.eplb.mode != "static":
        return fields, None
    chosen, skipped = current_placement(items, name, role, spec)
    fields["placementGeneration"] = int(chosen["spec"]["generation"]) if chosen else None
    return fields, static_condition(role, chosen, skipped)


def _due(cr: dict[str, Any], role: str, interval: float, now: datetime) -> bool:
    last = ((cr.get("status") or {}).get(role) or {}).get("lastRebalanceCheck")
    if not last:
        return True
    then = datetime.strptime(last, TIME).replace(tzinfo=UTC)
    return (now - then).total_seconds() >= interval


def _poll_due(key: tuple[str, str, str], interval: float) -> bool:
    last = _polled.get(key)
    return last is None or time.monotonic() - last >= min(APPLIED_POLL_SECONDS, interval)


def _role_pass(
    cr: dict[str, Any], role: str, now: datetime, rebalance: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """→ (the role's status fields, an EplbHealthy condition or None)."""
    spec = InferenceDeployment.model_validate(cr).spec
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    windows = fetch(_sources(cr, role, getattr(spec, role).units))
    fields: dict[str, Any] = {}
    cond = None
    if rebalance:
        try:
            result = rebalance_role(cr, role, now, windows)
        except LoadError as exc:
            COLLECT_ERRORS.labels(namespace, name, role).inc()
            events.post(cr, "Warning", C.LOAD_UNAVAILABLE, f"{role}: {exc}")
            fields["lastRebalanceCheck"] = now.strftime(TIME)
            cond = C.condition(C.EPLB_HEALTHY, False, C.LOAD_UNAVAILABLE, f"{role}: {exc}")
        else:
            result.pop("reason")
            fields.update({k: v for k, v in result.items() if v is not None})
            cond = C.condition(C.EPLB_HEALTHY, True, C.LOAD_COLLECTED, "load collected")
    more, static = record_applied(cr, role, generations(windows))
    fields.update(more)
    return fields, static or cond


_check = Resync("EPLB check", CHECK_SECONDS)


@kopf.on.resume(GROUP, VERSION, "inferencedeployments")
@kopf.on.create(GROUP, VERSION, "inferencedeployments")
def arm_eplb(namespace: str | None, name: str, **_: Any) -> None:
    """Every CHECK_SECONDS for as long as the deployment exists (no kopf timer: it would put a
    finalizer on the deployment, see fireflyer.operator.resync)."""
    if namespace is not None:
        key = (namespace, name)
        _check.arm(key, lambda: eplb_timer(*key))


def eplb_timer(namespace: str, name: str) -> bool:
    """One EPLB pass over a deployment's roles; False once the deployment is gone."""
    # No placement lock here: collecting load waits on the network, and must never hold up the
    # reconciles of other deployments.
    cr = kube.get("InferenceDeployment", name, namespace)
    gone = cr is None or bool(cr["metadata"].get("deletionTimestamp"))
    spec = None if cr is None else InferenceDeployment.model_validate(cr).spec
    if cr is None or gone or spec is None or spec.eplb.mode == "off":
        for role in ("prefill", "decode"):
            _polled.pop((namespace, name, role), None)
        return not gone  # eplb.mode may be turned on later: keep checking while it exists
    now = datetime.now(UTC)
    if spec.eplb.mode == "dynamic" and any(
        getattr(spec, role).units and _due(cr, role, spec.eplb.interval_seconds, now)
        for role in ("prefill", "decode")
    ):
        # The informer's copy may lag the last check's status write: a rebalance is decided on
        # the status as stored, never run twice in one interval.
        cr = kube.get("InferenceDeployment", name, namespace, fresh=True)
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            return False
        spec = InferenceDeployment.model_validate(cr).spec
    status = cr.get("status") or {}
    patch: dict[str, Any] = {}
    conds: list[dict[str, Any]] = []
    for role in ("prefill", "decode"):
        if getattr(spec, role).units == 0:
            continue
        rebalance = spec.eplb.mode == "dynamic" and _due(cr, role, spec.eplb.interval_seconds, now)
        key = (namespace, name, role)
        if not rebalance and not _poll_due(key, spec.eplb.interval_seconds):
            continue
        _polled[key] = time.monotonic()
        fields, cond = _role_pass(cr, role, now, rebalance)
        if cond is not None:
            conds.append(cond)
        current = status.get(role) or {}
        # A merge patch with null removes a figure that no longer holds (nobody reports).
        changes = {k: v for k, v in fields.items() if current.get(k) != v and (v is not None or k in current)}
        if changes:
            patch[role] = changes
    cond = applied.combine_health(conds)
    changed: list[dict[str, Any]] = []
    if cond is not None:
        before = next((c for c in status.get("conditions") or [] if c.get("type") == C.EPLB_HEALTHY), None)
        if before is None or any(before.get(k) != cond[k] for k in ("status", "reason", "message")):
            changed.append(cond)
    decode_b = (patch.get("decode") or {}).get("balancedness")
    if decode_b is not None:
        patch["balancedness"] = f"{decode_b:.2f}"
    if patch or changed:
        # The reconcile writes this status too: its conditions are kept (writes.py).
        writes.patch_status(name, namespace, patch, changed, cr["metadata"].get("generation", 0))
    return True
