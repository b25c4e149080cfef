"""The InferenceDeployment's status and the Events about its KV-cache gate, from what the plan
decided. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fireflyer.api import conditions as C
from fireflyer.api.inference import InferenceDeploymentSpec
from fireflyer.operator.inference import children, mounts
from fireflyer.operator.inference import reasons as R
from fireflyer.operator.planning import Event


def kv_events(cr: dict[str, Any], kv: mounts.KvCacheState | None) -> list[Event]:
    """An Event when the KV-cache gate changes (the condition says it on every pass)."""
    if kv is None:
        return []
    previous = (cr.get("status") or {}).get("conditions") or []
    before = next((c for c in previous if c.get("type") == R.KV_CACHE_READY), None)
    if before is not None and before.get("reason") == kv.reason:
        return []
    if kv.ready:
        return [Event("Normal", kv.reason, kv.message)] if before is not None else []
    return [Event("Warning", kv.reason, f"{kv.message}; units are not created until it is")]


def deployment_status(
    cr: dict[str, Any],
    spec: InferenceDeploymentSpec,
    placement: Any,
    unit_status: list[dict[str, Any]],
    ready_count: dict[str, int],
    router: dict[str, Any] | None,
    rolling: bool,
    recreate: dict[str, str],
    router_service: dict[str, Any] | None = None,
    *,
    kv: mounts.KvCacheState | None = None,
    avoided: list[str] | None = None,
) -> dict[str, Any]:
    conds = []
    avoiding = [f"avoiding {', '.join(avoided)} after a failed RDMA preflight"] if avoided else []
    if placement.complete:
        reason = C.PLACED_ABOVE_PREFERRED_LEVEL if placement.notes else C.UNITS_PLACED
        placed = "; ".join(placement.notes) or f"{len(placement.placed)} units placed whole"
        conds.append(C.condition(C.PLACED, True, reason, "; ".join([placed, *avoiding])))
    else:
        why = "; ".join([*(f"{u.name}: {w}" for u, w in placement.unplaced), *avoiding])
        conds.append(C.condition(C.PLACED, False, C.INSUFFICIENT_CAPACITY, why))
    kv_blocked = kv is not None and not kv.ready
    if kv is not None:
        conds.append(C.condition(R.KV_CACHE_READY, kv.ready, kv.reason, kv.message))
    role_ready = {}
    for role_name, cond_type in (("prefill", C.PREFILL_READY), ("decode", C.DECODE_READY)):
        want = getattr(spec, role_name).units
        have = ready_count[role_name]
        role_ready[role_name] = have >= want
        reason = C.NO_UNITS if want == 0 else (C.ALL_UNITS_READY if have >= want else C.UNITS_NOT_READY)
        message = f"{have}/{want} units ready"
        if kv is not None and kv_blocked and have < want:
            reason, message = kv.reason, f"{message}; {kv.message}"
        conds.append(C.condition(cond_type, have >= want, reason, message))
    available = int((router or {}).get("status", {}).get("availableReplicas") or 0)
    router_ok = available >= spec.router.replicas
    conds.append(
        C.condition(
            C.ROUTER_READY,
            router_ok,
            C.ROUTER_AVAILABLE if router_ok else C.ROUTER_UNAVAILABLE,
            f"{available}/{spec.router.replicas} router replicas available",
        )
    )
    ready = placement.complete and all(role_ready.values()) and router_ok
    if ready:
        conds.append(C.condition(C.READY, True, C.ALL_UNITS_READY, "every unit and the router are ready"))
    elif kv is not None and kv_blocked:
        conds.append(C.condition(C.READY, False, kv.reason, kv.message))
    else:
        counts = {
            role: f"{role} ({ready_count[role]}/{getattr(spec, role).units} units ready)"
            for role in ("prefill", "decode")
        }
        missing = [
            t
            for t, ok in (
                ("placement (not every unit fits the cluster: see Placed)", placement.complete),
                (counts["prefill"], role_ready["prefill"]),
                (counts["decode"], role_ready["decode"]),
                (f"router ({available}/{spec.router.replicas} replicas available)", router_ok),
            )
            if not ok
        ]
        conds.append(C.condition(C.READY, False, C.UNITS_NOT_READY, "waiting for " + ", ".join(missing)))
    progressing = not ready and placement.complete
    conds.append(
        C.condition(
            C.PROGRESSING,
            progressing,
            C.ROLLING_OUT if rolling else (C.PLACING if progressing else C.RECONCILED),
            "units are being placed or rolled out" if progressing else "",
        )
    )
    degraded_why = [f"{u}: {w}" for u, w in sorted(recreate.items()) if "rolling" not in w]
    if not placement.complete:
        degraded_why.append("not every unit fits the cluster")
    if kv is not None and kv.reason == C.INVALID_SPEC:  # the spec disagrees with its 3FS cluster
        conds.append(C.condition(C.DEGRADED, True, C.INVALID_SPEC, "; ".join([kv.message, *degraded_why])))
    else:
        conds.append(
            C.condition(
                C.DEGRADED,
                bool(degraded_why),
                C.UNIT_RECREATED
                if degraded_why and placement.complete
                else (C.INSUFFICIENT_CAPACITY if degraded_why else C.HEALTHY),
                "; ".join(degraded_why),
            )
        )
    name = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    return {
        "conditions": conds,
        "prefill": {"units": spec.prefill.units, "readyUnits": ready_count["prefill"]},
        "decode": {"units": spec.decode.units, "readyUnits": ready_count["decode"]},
        "prefillReady": f"{ready_count['prefill']}/{spec.prefill.units}",
        "decodeReady": f"{ready_count['decode']}/{spec.decode.units}",
        "units": unit_status,
        "endpoints": {"router": router_url(name, namespace, router_service)},
    }


def status_changed(current: Mapping[str, Any], sent: Mapping[str, Any]) -> bool:
    """Whether merge-patching `sent` into the status `current` changes it. Only the keys sent
    count, and of a dict value only its sub-keys: others are other writers' (the autoscaler's
    `prefill.autoscaler`, scaling.py), and counting them would write the status on every pass."""
    for key, value in sent.items():
        have = current.get(key)
        if isinstance(value, Mapping) and isinstance(have, Mapping):
            if status_changed(have, value):
                return True
        elif have != value:
            return True
    return False


def router_url(name: str, namespace: str, service: dict[str, Any] | None) -> str:
    """The load balancer's address when the router Service has one, else its cluster DNS name."""
    ingress = ((service or {}).get("status", {}).get("loadBalancer") or {}).get("ingress") or []
    host = next((i.get("ip") or i.get("hostname") for i in ingress if i.get("ip") or i.get("hostname")), None)
    return f"http://{host or f'{name}-router.{namespace}.svc'}:{children.ROUTER_PORT}"
