"""ThreeFSCluster: (spec, observed) → desired children, the next admin step, status. No I/O.

Bootstrap order (3FS's deployment guide): FoundationDB → configure it (managed) → init-cluster →
mgmtd → set-config for meta, storage, FUSE → meta and storage → root user and token → create
targets, upload chains and the chain table → FUSE clients. One admin step runs at a time; each
finished step is recorded in status.bootstrapSteps, so a restarted operator resumes after it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fireflyer.api.threefs import ThreeFSCluster, ThreeFSClusterSpec
from fireflyer.operator.planning import Event
from fireflyer.operator.threefs import children as K
from fireflyer.operator.threefs.admin_jobs import (
    STEP,
    StepResult,
    job,
    job_name,
    rbac,
    result_config_map,
    result_name,
    step_config_map,
)
from fireflyer.operator.threefs.node_loss import stranded_pods
from fireflyer.operator.threefs.replacement_plan import plan_replacement, record_replacement_step
from fireflyer.operator.threefs.status import all_ready, write_status
from fireflyer.threefs import admin
from fireflyer.threefs.admin import AdminOutputError, AdminStep, Health
from fireflyer.threefs.chaintable import ChainTable, plan_chain_table
from fireflyer.threefs.config import (
    PORTS,
    STORAGE_NODE_ID_BASE,
    ClickHouse,
    RenderInputs,
    default_storage_node_ids,
    render_service,
)

HEALTH_SECONDS = float(os.environ.get("FIREFLYER_THREEFS_HEALTH_SECONDS", "60"))
RETRY_SECONDS = 15.0


@dataclass
class Observed:
    now: datetime
    nodes: dict[str, dict[str, Any]]
    pods: list[dict[str, Any]]  # this cluster's pods
    workloads: dict[str, dict[str, Any]]  # component → StatefulSet / Deployment / DaemonSet
    jobs: dict[str, dict[str, Any]]  # step → admin Job
    results: dict[str, StepResult | str]  # step → result, or why it could not be read
    fdb_operator: bool = False
    fdb_connection_string: str | None = None
    monitor_ip: str | None = None
    health: Health | None = None  # the last health check this process read
    health_taken_at: datetime | None = None
    stale: list[tuple[str, str]] = field(default_factory=list)
    """(kind, name) of step objects of a predecessor under the same name (ownership.py)."""


@dataclass
class Desired:
    children: list[dict[str, Any]]
    launch: list[dict[str, Any]] = field(default_factory=list)  # an admin step's ConfigMaps and Job
    cleanup: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) to delete
    delete_pods: list[str] = field(default_factory=list)
    create_once: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    health: Health | None = None
    health_taken_at: datetime | None = None
    claim_token: bool = False
    """Create the token Secret empty, or empty one that exists (a predecessor's), before a step."""


def bootstrap_order(fdb_mode: str) -> list[str]:
    configure = ["configure-fdb"] if fdb_mode == "statefulset" else []
    return [
        *configure,
        "init-cluster",
        "set-config-meta",
        "set-config-storage",
        "set-config-fuse",
        "user-add",
        "create-targets",
        "upload-chains",
        "upload-chain-table",
    ]


def fdb_mode(spec: ThreeFSClusterSpec, observed: Observed) -> str:
    if spec.foundationdb.external is not None:
        return "external"
    return "operator" if observed.fdb_operator else "statefulset"


def _recorded_mgmtd_ips(previous: dict[str, Any]) -> list[str]:
    """The mgmtd IPs the last pass rendered (status.mgmtdAddresses, `ip:port`)."""
    return [address.rpartition(":")[0] for address in previous.get("mgmtdAddresses") or []]


def _ordinal(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["name"].rsplit("-", 1)[1])


def _component_pods(observed: Observed, component: str) -> list[dict[str, Any]]:
    pods = [
        p
        for p in observed.pods
        if (p["metadata"].get("labels") or {}).get("fireflyer.dev/component") == component
        and not p["metadata"].get("deletionTimestamp")
    ]
    return sorted(pods, key=_ordinal)


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def step_for(name: str, spec: ThreeFSClusterSpec, storage_ids: dict[int, int]) -> tuple[AdminStep, str]:
    """The admin step called `name` and the program that runs it (admin_cli or fdbcli)."""
    if name == "configure-fdb":
        managed = spec.foundationdb.managed
        mode = "double" if managed is not None and managed.replicas >= 3 else "single"
        return AdminStep(name, (f"configure new {mode} ssd",)), "fdbcli"
    if name == "init-cluster":
        return admin.init_cluster(spec), "admin_cli"
    if name.startswith("set-config-"):
        return admin.set_config(name.removeprefix("set-config-")), "admin_cli"
    if name == "user-add":
        return admin.user_add(), "admin_cli"
    table = chain_table(spec, storage_ids)
    builders = {
        "create-targets": admin.create_targets,
        "upload-chains": admin.upload_chains,
        "upload-chain-table": admin.upload_chain_table,
    }
    return builders[name](table), "admin_cli"


def chain_table(spec: ThreeFSClusterSpec, storage_ids: dict[int, int]) -> ChainTable:
    storage = spec.storage
    return plan_chain_table(
        list(storage_ids.values()),
        storage.disks_per_node,
        storage.targets_per_disk,
        storage.chain_width,
        storage.chain_table_type,
    )


def _monitor_inputs(
    cr: dict[str, Any], spec: ThreeFSClusterSpec, observed: Observed
) -> tuple[str, ClickHouse]:
    cluster, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    if spec.monitor.clickhouse == "disabled":
        return "", ClickHouse()
    monitor = f"{observed.monitor_ip}:{PORTS['monitor'][0]}" if observed.monitor_ip else ""
    if spec.monitor.clickhouse == "external" and spec.monitor.external_address:
        host, _, port = spec.monitor.external_address.rpartition(":")
        return monitor, ClickHouse(host=host or spec.monitor.external_address, port=port)
    host = f"{K.name_of(cluster, 'clickhouse')}.{namespace}.svc.cluster.local"
    return monitor, ClickHouse(host=host, port=str(K.CLICKHOUSE_PORT))


def plan(cr: dict[str, Any], observed: Observed) -> Desired:
    model = ThreeFSCluster.model_validate(cr)
    spec = model.spec
    cluster = cr["metadata"]["name"]
    previous = cr.get("status") or {}
    done: list[str] = list(previous.get("bootstrapSteps") or [])
    storage_ids = {
        int(k): v for k, v in (previous.get("storageNodeIds") or {}).items()
    } or default_storage_node_ids(spec)
    replacing = copy.deepcopy(previous.get("replacement"))
    # Whether the previous pass already rendered the replaced ordinal's new node id (decided
    # before this pass's results move the replacement on).
    new_id_rendered = replacing is not None and replacing.get("step") == "reschedule"
    if replacing and replacing.get("step") in ("reschedule", "add", "sync", "unregister"):
        # The replacement pod must start with its new node id: render it before the pod goes.
        storage_ids[int(replacing["ordinal"])] = int(replacing["newNodeId"])
    desired = Desired(children=[])
    status: dict[str, Any] = {
        "bootstrapSteps": done,
        "storageNodeIds": {str(k): v for k, v in sorted(storage_ids.items())},
        "healthSequence": int(previous.get("healthSequence", 0)),
        "replacement": replacing,
        "replacementsCompleted": int(previous.get("replacementsCompleted", 0)),
        "lastAdminError": previous.get("lastAdminError", ""),
        "lastAdminErrorAt": previous.get("lastAdminErrorAt", ""),
    }
    for key in ("chains", "targets", "usedBytes", "healthCheckedAt"):
        if key in previous:
            status[key] = previous[key]
    desired.health, desired.health_taken_at = observed.health, observed.health_taken_at
    mode = fdb_mode(spec, observed)
    order = bootstrap_order(mode)

    _consume_results(cr, observed, desired, status, done)

    # -- children that exist from the start ----------------------------------------------------
    children = desired.children
    fdb_file = _fdb_cluster_file(cr, spec, mode, observed)
    if fdb_file:
        children.append(K.config_map(cr, "fdb", {"fdb.cluster": fdb_file}))
    if mode == "statefulset":
        children += [
            K.fdb_statefulset(cr, spec),
            K.headless_service(cr, "fdb", (K.FDB_PORT,)),
            K.pdb(cr, "fdb"),
        ]
    elif mode == "operator":
        children.append(K.foundationdb_cluster(cr, spec))
    monitor_address, clickhouse = _monitor_inputs(cr, spec, observed)
    if spec.monitor.clickhouse != "disabled":
        monitor_files = render_service(spec, RenderInputs(cluster, [], clickhouse=clickhouse), "monitor")
        children += [
            K.config_map(cr, "monitor", monitor_files),
            K.monitor_deployment(cr, spec, K.digest(monitor_files)),
            K.service(cr, "monitor", PORTS["monitor"][0]),
        ]
        if spec.monitor.clickhouse == "managed":
            children += [
                K.clickhouse_statefulset(cr),
                K.headless_service(cr, "clickhouse", (K.CLICKHOUSE_PORT,)),
            ]

    mgmtd_pods = _component_pods(observed, "mgmtd")
    live_mgmtd_ips = [p["status"]["podIP"] for p in mgmtd_pods if (p.get("status") or {}).get("podIP")]
    # While no mgmtd pod has an address (one moving off a lost node), the services keep the
    # last known one: rendering without it would drop (and prune) meta, storage and fuse.
    mgmtd_ips = live_mgmtd_ips or _recorded_mgmtd_ips(previous)
    inputs = RenderInputs(cluster, mgmtd_ips, monitor_address, clickhouse, storage_ids)
    mgmtd_files = render_service(spec, inputs, "mgmtd")
    children.append(K.config_map(cr, "mgmtd", mgmtd_files))
    children.append(K.config_map(cr, "admin", render_service(spec, inputs, "admin")))

    fdb_ready = bool(fdb_file) and (mode != "statefulset" or all_ready(observed.workloads.get("fdb")))
    # mgmtd and meta keep their state in FoundationDB: their pods (and the monitor's) leave a lost
    # node after failoverSeconds, and stranded_pods ends the evicted pod so it starts on a live node.
    failover = K.node_loss_tolerations(spec.failover_seconds)
    if "init-cluster" in done:
        children += [
            K.service_statefulset(
                cr,
                spec,
                "mgmtd",
                "mgmtd_main",
                spec.mgmtd.replicas,
                K.digest(mgmtd_files),
                tolerations=failover,
            ),
            K.headless_service(cr, "mgmtd", PORTS["mgmtd"]),
            K.pdb(cr, "mgmtd"),
        ]
    mgmtd_ready = all_ready(observed.workloads.get("mgmtd")) and len(live_mgmtd_ips) >= spec.mgmtd.replicas
    service_files: dict[str, dict[str, str]] = {}
    if mgmtd_ips:
        for service in ("meta", "storage", "fuse"):
            service_files[service] = render_service(spec, inputs, service)
            children.append(K.config_map(cr, service, service_files[service]))
        status["mgmtdAddresses"] = [f"{ip}:{PORTS['mgmtd'][0]}" for ip in mgmtd_ips]
    if "set-config-meta" in done and "meta" in service_files:
        children += [
            K.service_statefulset(
                cr,
                spec,
                "meta",
                "meta_main",
                spec.meta.replicas,
                K.digest(service_files["meta"]),
                tolerations=failover,
            ),
            K.headless_service(cr, "meta", PORTS["meta"]),
            K.pdb(cr, "meta"),
        ]
    if "set-config-storage" in done and "storage" in service_files:
        # Node ids (app TOMLs) stay out of the digest: a replaced node's new id must not roll
        # every storage pod, only the replaced one is restarted.
        shared = {k: v for k, v in service_files["storage"].items() if not k.startswith("app-")}
        storage = K.storage_statefulset(cr, spec, K.digest(shared))
        children += [storage, K.headless_service(cr, "storage", PORTS["storage"]), K.pdb(cr, "storage")]
    storage_ready = all_ready(observed.workloads.get("storage"))
    bootstrapped = all(step in done for step in order)
    # user-add has stored the root token in its Secret by the time it is recorded as done.
    if bootstrapped and admin.USER_ADD in done and "fuse" in service_files:
        children.append(K.fuse_daemonset(cr, spec, K.digest(service_files["fuse"])))

    # -- the next admin step ---------------------------------------------------------------------
    in_flight = [s for s in observed.jobs if s not in observed.results]
    if observed.stale:  # a predecessor's step objects go first: no step may read them
        desired.cleanup += observed.stale
        desired.events.append(
            Event("Normal", "StaleStepObjects", f"removing {len(observed.stale)} admin step object(s) of an "
                  "earlier cluster of this name")
        )  # fmt: skip
    elif not in_flight and not _backing_off(observed, status):
        next_step = _next_bootstrap_step(order, done, fdb_ready, mgmtd_ready, storage_ready)
        if next_step is not None:
            _launch(cr, spec, desired, *step_for(next_step, spec, storage_ids))
        elif bootstrapped:
            plan_replacement(
                cr, spec, observed, desired, status, storage_ids, new_id_rendered=new_id_rendered
            )
            if not desired.launch and _health_due(observed, status):
                status["healthSequence"] += 1
                _launch(cr, spec, desired, admin.health(status["healthSequence"]), "admin_cli")
    # The admin Jobs' Role names the results of the steps in flight, this pass's launch included;
    # it is applied with the children, before the launch.
    launched = [o["metadata"]["labels"][STEP] for o in desired.launch if o["kind"] == "Job"]
    # Until user-add has stored this cluster's root token, its Secret is kept empty and ours.
    desired.claim_token = bool(launched) and admin.USER_ADD not in done
    children += rbac(cr, [*in_flight, *launched])

    desired.delete_pods += stranded_pods(observed)  # never storage pods: replacement moves those
    write_status(
        spec, observed.workloads, status, done, order, fdb_ready, mgmtd_ready, storage_ready, bootstrapped
    )
    desired.status = status
    return desired


def _fdb_cluster_file(cr: dict[str, Any], spec: ThreeFSClusterSpec, mode: str, observed: Observed) -> str:
    if mode == "external" and spec.foundationdb.external is not None:
        text = spec.foundationdb.external.cluster_file.strip()
        return text + "\n"
    if mode == "operator":
        return (observed.fdb_connection_string or "").strip() + (
            "\n" if observed.fdb_connection_string else ""
        )
    managed = spec.foundationdb.managed
    return K.fdb_cluster_file(cr, managed.replicas if managed else 1)


def _next_bootstrap_step(
    order: list[str], done: list[str], fdb_ready: bool, mgmtd_ready: bool, storage_ready: bool
) -> str | None:
    for step in order:
        if step in done:
            continue
        if step in ("configure-fdb", "init-cluster"):
            return step if fdb_ready else None
        if step in ("create-targets", "upload-chains", "upload-chain-table"):
            return step if mgmtd_ready and storage_ready else None
        return step if mgmtd_ready else None
    return None


def _launch(
    cr: dict[str, Any], spec: ThreeFSClusterSpec, desired: Desired, step: AdminStep, runner: str
) -> None:
    desired.launch = [
        step_config_map(cr, step),
        result_config_map(cr, step.name),
        job(cr, spec, step, runner),
    ]
    desired.events.append(
        Event("Normal", "AdminStepStarted", f"admin step {step.name}: {len(step.commands)} command(s)")
    )


def _backing_off(observed: Observed, status: dict[str, Any]) -> bool:
    """A step failed a moment ago: wait before the next one (or its retry)."""
    failed_at = status.get("lastAdminErrorAt")
    if not failed_at:
        return False
    when = datetime.fromisoformat(failed_at.replace("Z", "+00:00"))
    return observed.now - when < timedelta(seconds=RETRY_SECONDS)


def _health_due(observed: Observed, status: dict[str, Any]) -> bool:
    if observed.health_taken_at is None:
        return True
    wait = HEALTH_SECONDS / 4 if status.get("replacement") else HEALTH_SECONDS
    return observed.now - observed.health_taken_at >= timedelta(seconds=wait)


def _consume_results(
    cr: dict[str, Any], observed: Observed, desired: Desired, status: dict[str, Any], done: list[str]
) -> None:
    cluster = cr["metadata"]["name"]
    for step, result in sorted(observed.results.items()):
        desired.cleanup += [
            ("Job", job_name(cluster, step)),
            ("ConfigMap", result_name(cluster, step)),
            ("ConfigMap", job_name(cluster, step)),
        ]
        if isinstance(result, str) or not result.ok:
            # The Job blanks tokens out already; redacting again keeps status and Events clean
            # even if a result was written some other way.
            output = admin.redact(result if isinstance(result, str) else result.output)
            status["lastAdminError"] = f"{step}: {output[-1500:]}"
            status["lastAdminErrorAt"] = observed.now.strftime("%Y-%m-%dT%H:%M:%SZ")
            desired.events.append(
                Event("Warning", "AdminStepFailed", f"admin step {step} failed: {output[-300:]}")
            )
            continue
        try:
            _record_success(cr, step, result, observed, desired, status, done)
        except AdminOutputError as error:
            status["lastAdminError"] = f"{step}: {error}"
            desired.events.append(Event("Warning", "AdminOutputUnreadable", f"{step}: {error}"))


def _record_success(
    cr: dict[str, Any],
    step: str,
    result: StepResult,
    observed: Observed,
    desired: Desired,
    status: dict[str, Any],
    done: list[str],
) -> None:
    if step.startswith("health-"):
        health = admin.parse_health(result.output)
        desired.health, desired.health_taken_at = health, observed.now
        status["chains"] = health.chain_counts()
        status["targets"] = health.target_counts()
        status["usedBytes"] = health.used_bytes()
        status["healthCheckedAt"] = observed.now.strftime("%Y-%m-%dT%H:%M:%SZ")
        return
    if step.startswith("replace-"):
        record_replacement_step(step, status, desired, observed.now)
        return
    if step not in done:
        done.append(step)
        desired.events.append(Event("Normal", "BootstrapStepDone", f"bootstrap step {step} finished"))


def next_storage_node_id(status: dict[str, Any], used: set[int]) -> int:
    known = {int(v) for v in (status.get("storageNodeIds") or {}).values()} | used
    return max(known | {STORAGE_NODE_ID_BASE - 1}) + 1
