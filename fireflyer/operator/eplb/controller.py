"""The EPLB timer: per role with eplb.mode dynamic, collect → rebalance → publish."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any, cast

import kopf
import numpy as np
from prometheus_client import Counter, Gauge

from fireflyer.api import conditions as C
from fireflyer.api.base import GROUP, VERSION
from fireflyer.api.inference import EPLB_LOAD_URL_ANNOTATION, InferenceDeployment
from fireflyer.operator import kube
from fireflyer.operator import labels as L
from fireflyer.operator.eplb.plan import LoadError, current_table, decide, parse_window
from fireflyer.operator.inference import children
from fireflyer.operator.inference.engines import SERVE_PORT

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
KEEP_GENERATIONS = 3
log = logging.getLogger(__name__)


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


def collect(sources: list[str], layers: int, experts: int) -> np.ndarray:
    total = np.zeros((layers, experts))
    for url in sources:
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                payload = json.loads(resp.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise LoadError(f"{url}: {exc}") from exc
        total += parse_window(payload, layers, experts, url)
    return total


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


def rebalance_role(cr: dict[str, Any], role: str, now: datetime) -> dict[str, Any]:
    """One collect → rebalance → publish pass; returns the role's status fields."""
    spec = InferenceDeployment.model_validate(cr).spec
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    arch = spec.model.architecture
    role_spec = getattr(spec, role)
    gpus = role_spec.parallelism.expert
    slots = arch.routed_experts + spec.eplb.redundant_experts
    existing = kube.list_("ExpertPlacement", namespace, f"{L.DEPLOYMENT}={name},{L.ROLE}={role}")
    generation, table = current_table(existing, arch.moe_layers, arch.routed_experts, slots)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    load = collect(_sources(cr, role, role_spec.units), arch.moe_layers, arch.routed_experts)
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
        kopf.event(
            cast(Any, cr),
            type="Normal",
            reason=C.REBALANCE_APPLIED,
            message=f"{role}: generation {generation}: {decision.reason}",
        )
        result.update(placementGeneration=generation, balancedness=round(decision.after, 4))
        gens = sorted(existing, key=lambda p: int(p["spec"].get("generation", 0)))
        for old in gens[: max(0, len(gens) + 1 - KEEP_GENERATIONS)]:
            kube.delete("ExpertPlacement", old["metadata"]["name"], namespace)
    BALANCEDNESS.labels(namespace, name, role).set(result["balancedness"])
    result["reason"] = decision.reason
    return result


def _due(cr: dict[str, Any], role: str, interval: float, now: datetime) -> bool:
    last = ((cr.get("status") or {}).get(role) or {}).get("lastRebalanceCheck")
    if not last:
        return True
    then = datetime.strptime(last, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (now - then).total_seconds() >= interval


@kopf.timer(GROUP, VERSION, "inferencedeployments", interval=CHECK_SECONDS, sharp=False)
def eplb_timer(namespace: str | None, name: str, **_: Any) -> None:
    if namespace is None:
        return
    # No placement lock here: collecting load waits on the network, and must never hold up the
    # reconciles of other deployments.
    cr = kube.get("InferenceDeployment", name, namespace)
    if cr is None or cr["metadata"].get("deletionTimestamp"):
        return
    spec = InferenceDeployment.model_validate(cr).spec
    if spec.eplb.mode != "dynamic":
        return
    now = datetime.now(UTC)
    patch: dict[str, Any] = {}
    problems: list[str] = []
    for role in ("prefill", "decode"):
        if getattr(spec, role).units == 0 or not _due(cr, role, spec.eplb.interval_seconds, now):
            continue
        try:
            result = rebalance_role(cr, role, now)
        except LoadError as exc:
            COLLECT_ERRORS.labels(namespace, name, role).inc()
            problems.append(f"{role}: {exc}")
            kopf.event(cast(Any, cr), type="Warning", reason=C.LOAD_UNAVAILABLE, message=f"{role}: {exc}")
            patch[role] = {"lastRebalanceCheck": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
            continue
        result.pop("reason")
        patch[role] = {k: v for k, v in result.items() if v is not None}
    if not patch:
        return
    cond = (
        C.condition(C.EPLB_HEALTHY, False, C.LOAD_UNAVAILABLE, "; ".join(problems)[:2000])
        if problems
        else C.condition(C.EPLB_HEALTHY, True, C.LOAD_COLLECTED, "load collected")
    )
    generation = cr["metadata"].get("generation", 0)
    patch["conditions"] = C.merge(
        (cr.get("status") or {}).get("conditions", []),
        [cond],
        now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        generation,
    )
    decode_b = (patch.get("decode") or {}).get("balancedness")
    if decode_b is not None:
        patch["balancedness"] = f"{decode_b:.2f}"
    kube.patch_status("InferenceDeployment", name, namespace, patch)
