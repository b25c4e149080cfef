"""plan(spec, observed) → desired children, pods to recreate, events and status. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fireflyer.api import conditions as C
from fireflyer.api.inference import InferenceDeployment, InferenceDeploymentSpec
from fireflyer.operator import labels as L
from fireflyer.operator.eplb.placements import current_placement, placement_document
from fireflyer.operator.inference import children, drain, lending, mounts, preflight, recreation, scaler
from fireflyer.operator.inference import reasons as R
from fireflyer.operator.inference.status import deployment_status, kv_events
from fireflyer.operator.inference.status import router_url as router_url  # re-exported
from fireflyer.operator.planning import Event, format_time, parse_time
from fireflyer.placement import UnitRequest, build_topology, plan_units, pod_node
from fireflyer.placement.planner import CLUSTER
from fireflyer.placement.reservations import planned_nodes, reservations
from fireflyer.placement.topology import level_keys

ROLES = ("prefill", "decode")
REPLACED_ALONE_SECONDS = 10.0
# The node lifecycle controller lifts these a few seconds after a node reports Ready again; on a
# Ready node they are what is left of a brief loss, no reason to move a unit off it (a node that
# is not Ready is unusable anyway).


@dataclass
class Observed:
    nodes: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    """Every pod in the cluster (free capacity), this deployment's included."""
    statefulsets: dict[str, dict[str, Any]]
    """This deployment's unit StatefulSets by name."""
    router: dict[str, Any] | None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    other_units: list[dict[str, Any]] = field(default_factory=list)
    """Unit StatefulSets of other deployments (their planned nodes are reserved)."""
    failed_units: dict[str, str] = field(default_factory=dict)
    """Unit name → a failure seen in a pod event (the pod itself may already be replaced)."""
    failed_pod_created: dict[str, datetime] = field(default_factory=dict)
    """Unit name → when the pod of its failed_units entry was created: a pod no younger than the
    unit's recorded recreation went in it (recreation.py), whichever process deleted it."""
    router_service: dict[str, Any] | None = None
    placements: list[dict[str, Any]] = field(default_factory=list)
    """ExpertPlacements in the deployment's namespace."""
    threefs: dict[str, Any] | None = None
    """The ThreeFSCluster that kvCache names (None: it does not exist, or no kvCache)."""
    preflight_failures: dict[str, str] = field(default_factory=dict)
    """Unit pod uid → its failed preflight's message, from pod events (the cached pods carry no
    container statuses)."""
    scalers: list[dict[str, Any]] | None = None
    """The deployment's InferenceRoleScalers; None: not observed, the roles run the spec's units."""
    router_load: drain.RouterLoad | None = None
    """In-flight requests per unit as the router replicas report them (None: unknown)."""
    training_jobs: list[dict[str, Any]] = field(default_factory=list)
    """TrainingJobs: the preemptible ones' nodes may be taken back (lending.py)."""


@dataclass
class Desired:
    children: list[dict[str, Any]]
    recreate: dict[str, str]
    """Unit name → why its pods are deleted now (whole-unit recreation)."""
    events: list[Event]
    status: dict[str, Any]
    requeue_after: float | None = None
    force_delete: set[str] = field(default_factory=set)
    """Pods on nodes that are gone or not Ready: no kubelet will confirm their end, so deleting
    them with a grace period would leave them Terminating and their StatefulSet stuck."""
    replace_now: set[str] = field(default_factory=set)
    """Router pods on such nodes: deleted at once so their ReplicaSet starts a replacement on a
    live node, instead of serving through a dead one until the not-ready eviction (5 minutes)."""
    scales: dict[str, scaler.RoleScale] = field(default_factory=dict)
    """Per role: the units it runs now and what its InferenceRoleScaler needs written."""
    draining: dict[str, str] = field(default_factory=dict)
    """Units drained before a scale-in that are still there → why they wait."""
    preemptions: list[lending.Preemption] = field(default_factory=list)
    """Preemptible TrainingJobs asked now to give nodes back for units that do not fit."""


@dataclass
class _Unit:
    role: str
    index: int
    name: str
    pods: list[dict[str, Any]]
    sts: dict[str, Any] | None


def _ready(pod: dict[str, Any]) -> bool:
    if pod.get("status", {}).get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in pod.get("status", {}).get("conditions", []) or []
    )


def plan(cr: dict[str, Any], observed: Observed) -> Desired:
    model = InferenceDeployment.model_validate(cr)
    spec: InferenceDeploymentSpec = model.spec
    # The roles run their scalers' live units (kubectl scale, an HPA, the autoscaler).
    scales = scaler.live_units(cr, spec, observed.scalers) if observed.scalers is not None else {}
    spec = scaler.with_live_units(spec, scales)
    name = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    now = observed.now
    events: list[Event] = []
    recreate: dict[str, str] = {}
    # Units above the live count drain through the router before they are removed (drain.py).
    leaving = drain.scale_in(
        cr,
        {r: getattr(spec, r).units for r in ROLES},
        observed.statefulsets,
        observed.router_load,
        has_router=spec.router.replicas > 0,
        timeout_seconds=spec.router.drain_timeout_seconds,
        now=now,
    )
    events.extend(leaving.plan.events)

    topology = build_topology(
        observed.nodes,
        observed.pods,
        spec.placement.topology_profile,
        spec.network.rdma_resource,
        spec.placement.custom_level_keys,
        ignore_pods={L.DEPLOYMENT: name},
        ignore_namespace=namespace,
        reserved=leaving.reserved(
            reservations(observed.other_units, observed.pods, spec.network.rdma_resource),
            spec.network.rdma_resource,
        ),
        node_selector=spec.placement.node_selector,
        tolerates=lambda taint: (
            taint.get("key") in L.NODE_LOSS_TAINTS
            or any(t.tolerates(taint) for t in spec.placement.tolerations)
        ),
    )
    own_pods = [
        p
        for p in observed.pods
        if (p["metadata"].get("labels") or {}).get(L.DEPLOYMENT) == name
        and p["metadata"].get("namespace") == namespace
    ]

    units: list[_Unit] = []
    for role_name in ROLES:
        role = getattr(spec, role_name)
        for index in range(role.units):
            unit_id = children.unit_name(name, role_name, index)
            pods = [
                p
                for p in own_pods
                if (p["metadata"].get("labels") or {}).get(L.ROLE) == role_name
                and (p["metadata"].get("labels") or {}).get(L.UNIT) == str(index)
            ]
            units.append(_Unit(role_name, index, unit_id, pods, observed.statefulsets.get(unit_id)))

    # Units that are broken lose their placement and are planned again from scratch; one whose
    # RDMA preflight failed is planned away from its nodes for a while.
    status_units = (cr.get("status") or {}).get("units") or []
    avoid = preflight.remembered(status_units, now)
    keep: dict[str, list[str]] = {}
    for unit in units:
        nodes = planned_nodes(unit.sts or {})
        if not nodes:
            continue
        failed = preflight.unit_failure(unit.pods, observed.preflight_failures)
        if failed:
            key = f"{unit.role}-{unit.index}"
            bound = [pod_node(pod) for pod in unit.pods]
            avoid[key] = preflight.extend(avoid.get(key), [*nodes, *bound], now)
            recreate[unit.name] = failed
            events.append(
                Event(
                    "Warning",
                    R.PREFLIGHT_FAILED,
                    f"{unit.name}: {failed}; recreating it on other nodes (avoiding "
                    f"{', '.join(avoid[key].nodes)} until {format_time(avoid[key].until)})",
                )
            )
            continue
        lost = observed.failed_units.get(unit.name)
        if lost and recreation.is_own_deletion(unit.sts, observed.failed_pod_created.get(unit.name)):
            lost = None
        broken = lost or _broken(unit, topology, spec, now)
        if broken:
            recreate[unit.name] = broken
            events.append(
                Event(
                    "Warning",
                    C.UNIT_BIND_TIMEOUT if "running within" in broken else C.UNIT_RECREATED,
                    f"{unit.name}: {broken}; planning it again",
                )
            )
            continue
        keep[f"{unit.role}-{unit.index}"] = nodes

    # With kvCache, units are created only once their 3FS cluster is Ready (existing ones stay).
    kv = mounts.kv_cache_state(spec, observed.threefs)
    kv_blocked = kv is not None and not kv.ready
    requests = [
        UnitRequest(
            u.role,
            u.index,
            getattr(spec, u.role).nodes_per_unit,
            getattr(spec, u.role).gpus_per_node,
            spec.network.rdma_per_pod,
        )
        for u in units
        if not (kv_blocked and u.sts is None)
    ]
    # Nodes held by kept units stay usable for them; the rest of the avoided ones are not.
    kept = {n for nodes in keep.values() for n in nodes}
    avoided = sorted({n for a in avoid.values() for n in a.nodes} - kept)
    placement = plan_units(
        requests,
        preflight.without(topology, avoided),
        spec.placement.required_level,
        spec.placement.preferred_level,
        spec.placement.spread_units,
        keep,
    )
    preemptions = lending.reclaim(
        observed.training_jobs,
        observed.pods,
        placement,
        preflight.without(topology, avoided),
        lambda lent: plan_units(
            requests,
            lent,
            spec.placement.required_level,
            spec.placement.preferred_level,
            spec.placement.spread_units,
            keep,
        ),
        spec.network.rdma_resource,
    )
    events.extend(lending.events(preemptions))
    placed = {f"{p.unit.role}-{p.unit.index}": p for p in placement.placed}
    keys = level_keys(spec.placement.topology_profile, spec.placement.custom_level_keys)

    desired_children: list[dict[str, Any]] = []
    if mounts.mounts_placement(spec):
        # Before the units: their pods mount it (not optionally).
        for role_name in ROLES:
            if getattr(spec, role_name).units:
                chosen, _ = current_placement(observed.placements, name, role_name, spec)
                desired_children.append(
                    mounts.placement_config_map(cr, role_name, placement_document(chosen))
                )
    node_objs = {n["metadata"]["name"]: n for n in observed.nodes}
    hcas: dict[str, tuple[str, str]] = {}
    unit_status: list[dict[str, Any]] = []
    hosts: dict[str, list[str]] = {r: [] for r in ROLES}
    unit_pairing: dict[str, str] = {}  # leader host → the pairing revision its pods run
    ready_count = dict.fromkeys(ROLES, 0)
    outdated: list[_Unit] = []
    unavailable = dict.fromkeys(ROLES, 0)
    for unit in units:
        role = getattr(spec, unit.role)
        p = placed.get(f"{unit.role}-{unit.index}")
        leader = children.leader_host(name, unit.role, unit.index, namespace)
        if p is None:
            # Unplaceable: keep nothing running half-way (all or nothing).
            if unit.pods and unit.name not in recreate:
                recreate[unit.name] = "no longer fits the cluster"
            unit_status.append({"role": unit.role, "index": unit.index, "ready": False, "leader": leader})
            unavailable[unit.role] += 1
            continue
        old_nodes = planned_nodes(unit.sts or {})
        same = unit.sts is not None and list(p.nodes) == old_nodes
        annotations = (unit.sts or {}).get("metadata", {}).get("annotations", {})
        # A unit recreated now (even on its old nodes) gets a fresh bind deadline: its pods are
        # about to be short while they come back, which is not a failure to bind.
        placed_at = annotations.get(L.PLACED_AT) if same and unit.name not in recreate else None
        if not same:
            events.append(Event("Normal", C.UNITS_PLACED, f"placed {p.describe()}"))
        label_key = keys.get(p.level, "") if p.level != CLUSTER else ""
        kv_mount = kv.mount_point if kv is not None and kv.mount_point else mounts.kv_mount_of(unit.sts)
        desired_children.append(
            children.statefulset(
                cr,
                spec,
                unit.role,
                unit.index,
                p.nodes,
                (p.level, label_key, p.domain),
                placed_at or format_time(now),
                kv_mount,
            )
        )
        desired_children.append(children.headless_service(cr, unit.role, unit.index))
        for node in p.nodes:
            if node in node_objs:
                hcas[node] = children.node_hca(node_objs[node], role.gpus_per_node)
        hosts[unit.role].append(leader)
        pairing = {(pod["metadata"].get("labels") or {}).get(L.PAIRING_REVISION) for pod in unit.pods} - {
            None
        }
        if len(pairing) == 1:  # the unit's pods run that spec: the router pairs it by what it runs
            unit_pairing[leader] = str(pairing.pop())
        rev = children.revision(spec, unit.role, p.nodes, kv_mount)
        # Pods on their way out (a recreation's) are no longer the unit's: their old revision
        # beside a fresh pod is not two revisions in one unit.
        staying = [pod for pod in unit.pods if not pod["metadata"].get("deletionTimestamp")]
        revisions = {(pod["metadata"].get("labels") or {}).get(L.REVISION) for pod in staying}
        current = revisions <= {rev}  # no pod staying: nothing of another revision to roll
        all_ready = len(unit.pods) == role.nodes_per_unit and all(_ready(pod) for pod in unit.pods)
        if not same and unit.pods and unit.name not in recreate:
            recreate[unit.name] = f"placement moved to {p.level} {p.domain}"
        elif len(revisions) > 1 and unit.name not in recreate:
            recreate[unit.name] = "pods of two revisions in one unit"
        elif not current and unit.pods and unit.name not in recreate:
            outdated.append(unit)
        ready = all_ready and current and unit.name not in recreate
        if ready:
            ready_count[unit.role] += 1
        if not all_ready or unit.name in recreate:  # down now (an outdated unit still serves)
            unavailable[unit.role] += 1
        unit_status.append(
            {
                "role": unit.role,
                "index": unit.index,
                "domain": f"{p.level}/{p.domain}",
                "nodes": sorted({pod_node(pod) for pod in unit.pods} - {""}) or list(p.nodes),
                "ready": ready,
                "leader": leader,
            }
        )

    # Rolling update: outdated but healthy units are recreated a few at a time per role.
    rolling = False
    for role_name in ROLES:
        budget = getattr(spec, role_name).max_unavailable_units - unavailable[role_name]
        if kv_blocked:  # new pods could not start: the outdated units keep serving meanwhile
            budget = 0
        for unit in (u for u in outdated if u.role == role_name):
            rolling = True
            if budget <= 0:
                break
            recreate[unit.name] = "rolling out a new revision"
            budget -= 1

    for entry in unit_status:
        remembered = avoid.get(f"{entry['role']}-{entry['index']}")
        if remembered:
            entry.update(remembered.status())
    events.extend(kv_events(cr, kv))

    for child in desired_children:
        if child["kind"] == "StatefulSet":
            unit_id = child["metadata"]["name"]
            recreation.record(child, observed.statefulsets.get(unit_id), recreate.get(unit_id), now)
    desired_children.extend(leaving.children(cr))
    unit_status.extend(leaving.unit_status(namespace, name))
    desired_children.append(children.config_map(cr, spec, hcas))
    desired_children.extend(
        children.router(
            cr, spec, hosts, unit_revisions=unit_pairing, draining=leaving.leaders(namespace, name)
        )
    )

    status = deployment_status(
        cr,
        spec,
        placement,
        unit_status,
        ready_count,
        observed.router,
        rolling,
        recreate,
        observed.router_service,
        kv=kv,
        avoided=avoided,
    )
    if scales:
        events.extend(scaler.finish(cr, scales, observed.scalers or [], desired_children, ready_count))
    requeue = (
        5.0
        if recreate or rolling or not placement.complete or any(not u["ready"] for u in unit_status)
        else None
    )
    dead = dead_node_pods(own_pods, topology)
    routers = {
        p["metadata"]["name"]
        for p in own_pods
        if (p["metadata"].get("labels") or {}).get(L.COMPONENT) == "router"
    }
    return Desired(
        desired_children,
        recreate,
        events,
        status,
        requeue,
        force_delete=dead,
        replace_now={name for name in dead if name in routers},
        scales=scales,
        draining=leaving.plan.waiting,
        preemptions=preemptions,
    )


def dead_node_pods(pods: list[dict[str, Any]], topology: Any) -> set[str]:
    """Names of the pods bound to a node that is gone or not Ready (cordoned or tainted nodes
    still have a kubelet that ends their pods)."""
    dead = set()
    for pod in pods:
        node = pod_node(pod)
        if not node:
            continue
        info = topology.nodes.get(node)
        if info is None or info.why_unusable == "not Ready":
            dead.add(pod["metadata"]["name"])
    return dead


def _broken(unit: _Unit, topology: Any, spec: InferenceDeploymentSpec, now: datetime) -> str:
    """Why a placed unit must be torn down and planned again ("" when it is fine)."""
    nodes = planned_nodes(unit.sts or {})
    for node in nodes:
        info = topology.nodes.get(node)
        if info is None:
            return f"node {node} is gone"
        if not info.usable:
            return f"node {node} is {info.why_unusable}"
    # Pods already on their way out (the previous recreation's) are no longer members: counting
    # them would judge the fresh pods "replaced on their own" and delete them again.
    members = [p for p in unit.pods if not p["metadata"].get("deletionTimestamp")]
    for pod in members:
        if pod.get("status", {}).get("phase") == "Failed":
            return f"pod {pod['metadata']['name']} failed"
    # The StatefulSet controller replaces a failed pod on its own, sometimes before we see it
    # fail. A unit's pods are created together, so one much younger than the rest was replaced
    # alone: its peers hold state from a rank that is gone.
    created = sorted(
        (t, pod["metadata"]["name"])
        for pod in members
        if (t := parse_time(pod["metadata"].get("creationTimestamp"))) is not None
    )
    if len(created) > 1 and (created[-1][0] - created[0][0]).total_seconds() > REPLACED_ALONE_SECONDS:
        return f"pod {created[-1][1]} was replaced on its own (its rank restarted)"
    role = getattr(spec, unit.role)
    running = sum(1 for p in members if p.get("status", {}).get("phase") == "Running")
    if running < role.nodes_per_unit:
        # Waiting since the oldest pod that is not running was created (or since placement,
        # for pods the StatefulSet has not created yet).
        waiting = [
            parse_time(p["metadata"].get("creationTimestamp"))
            for p in members
            if p.get("status", {}).get("phase") != "Running"
        ]
        if len(members) < role.nodes_per_unit:
            waiting.append(
                parse_time((unit.sts or {}).get("metadata", {}).get("annotations", {}).get(L.PLACED_AT))
            )
        since = min((t for t in waiting if t is not None), default=None)
        if since and (now - since).total_seconds() > spec.placement.bind_timeout_seconds:
            return (
                f"only {running}/{role.nodes_per_unit} pods running within "
                f"{spec.placement.bind_timeout_seconds}s of placement"
            )
    return ""
