"""What must hold once the operator has converged, checked on one listing of a namespace. Pure:
each check returns the violations it found (empty when it holds)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DEPLOYMENT = "fireflyer.dev/deployment"
ROLE = "fireflyer.dev/role"
UNIT = "fireflyer.dev/unit"
COMPONENT = "fireflyer.dev/component"
REVISION = "fireflyer.dev/revision"
MANAGED_BY = "app.kubernetes.io/managed-by"
ROLES = ("prefill", "decode")
TRAINING_JOB = "fireflyer.dev/training-job"
ATTEMPT = "fireflyer.dev/attempt"
THREEFS = "fireflyer.dev/threefs"
ADMIN_STEP = "fireflyer.dev/admin-step"
WIPE = "fireflyer.dev/wipe"

UnitKey = tuple[str, str, int]  # deployment, role, index


@dataclass
class Listing:
    """Everything in the namespace, by kind."""

    items: list[dict[str, Any]]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [i for i in self.items if i.get("kind") == kind]

    def deployments(self) -> list[dict[str, Any]]:
        return self.of("InferenceDeployment")


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"].get("labels") or {}


def _live(pod: dict[str, Any]) -> bool:
    return not pod["metadata"].get("deletionTimestamp")


def _pod_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return (
        _live(pod)
        and status.get("phase") == "Running"
        and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
    )


def unit_pods(listing: Listing) -> dict[UnitKey, list[dict[str, Any]]]:
    units: dict[UnitKey, list[dict[str, Any]]] = defaultdict(list)
    for pod in listing.of("Pod"):
        labels = _labels(pod)
        if labels.get(COMPONENT) == "unit" and _live(pod):
            units[(labels[DEPLOYMENT], labels[ROLE], int(labels[UNIT]))].append(pod)
    return units


def workload_pods(listing: Listing) -> dict[UnitKey, list[dict[str, Any]]]:
    """unit_pods, plus a TrainingJob's pods as one unit (it restarts whole) and a ThreeFSCluster's
    long-running pods by component (its admin and wipe Jobs come and go by design)."""
    units = unit_pods(listing)
    for pod in listing.of("Pod"):
        labels = _labels(pod)
        if not _live(pod) or ADMIN_STEP in labels or WIPE in labels:
            continue
        if TRAINING_JOB in labels:
            units[(labels[TRAINING_JOB], "training", 0)].append(pod)
        elif THREEFS in labels and COMPONENT in labels:
            units[(labels[THREEFS], labels[COMPONENT], 0)].append(pod)
    return units


def with_dependents(touched: set[UnitKey], units: Iterable[UnitKey]) -> set[UnitKey]:
    """`touched` and what restarts with it by design: 3FS services reach mgmtd by IP address (3FS
    does not resolve host names there), so a new mgmtd pod, with a new IP, gives every component of
    its cluster a new configuration."""
    clusters = {name for name, component, _ in touched if component == "mgmtd"}
    return touched | {key for key in units if key[0] in clusters}


def unit_pod_uids(listing: Listing) -> dict[UnitKey, frozenset[str]]:
    return {
        key: frozenset(p["metadata"]["uid"] for p in pods) for key, pods in workload_pods(listing).items()
    }


ROOT_KINDS = ("InferenceDeployment", "TrainingJob", "ThreeFSCluster")


def orphans(listing: Listing) -> list[str]:
    """Our children (and their pods and ReplicaSets) whose owner does not exist."""
    uids = {i["metadata"]["uid"] for i in listing.items}
    found = []
    for item in listing.items:
        ours = _labels(item).get(MANAGED_BY) == "fireflyer" or DEPLOYMENT in _labels(item)
        if not ours or item["kind"] in ROOT_KINDS:
            continue
        owners = item["metadata"].get("ownerReferences") or []
        if not owners or not all(o["uid"] in uids for o in owners):
            found.append(f"{item['kind']}/{item['metadata']['name']} has no living owner")
    return found


def duplicates(listing: Listing) -> list[str]:
    """Exactly one StatefulSet and one headless Service per unit of the spec, nothing for units
    beyond it, one router Deployment per deployment."""
    found = []
    for cr in listing.deployments():
        name = cr["metadata"]["name"]
        wanted = {(r, i) for r in ROLES for i in range((cr["spec"].get(r) or {}).get("units", 0))}
        for kind in ("StatefulSet", "Service"):
            seen: dict[tuple[str, int], int] = defaultdict(int)
            for obj in listing.of(kind):
                labels = _labels(obj)
                if labels.get(DEPLOYMENT) == name and labels.get(COMPONENT) == "unit":
                    seen[(labels[ROLE], int(labels[UNIT]))] += 1
            extra = sorted(k for k, n in seen.items() if n > 1 or k not in wanted)
            missing = sorted(wanted - set(seen))
            if extra or missing:
                found.append(f"{name}: {kind}s beyond the spec {extra}, missing {missing}")
        routers = [d for d in listing.of("Deployment") if _labels(d).get(DEPLOYMENT) == name]
        if len(routers) != 1:
            found.append(f"{name}: {len(routers)} router Deployments")
    return found


def mixed_revisions(listing: Listing) -> list[str]:
    found = []
    for key, pods in sorted(unit_pods(listing).items()):
        revisions = {_labels(p).get(REVISION) for p in pods}
        if len(revisions) > 1:
            found.append(f"unit {key} runs pods of revisions {sorted(map(str, revisions))}")
    return found


def ready_mismatch(listing: Listing) -> list[str]:
    """Ready=True exactly when every unit of the spec has all its pods Ready (and the router is
    available); status.units says the same per unit."""
    found = []
    units = unit_pods(listing)
    for cr in listing.deployments():
        name = cr["metadata"]["name"]
        all_units = True
        for role in ROLES:
            spec = cr["spec"].get(role) or {}
            for index in range(spec.get("units", 0)):
                pods = units.get((name, role, index), [])
                ready = len(pods) == spec["nodesPerUnit"] and all(_pod_ready(p) for p in pods)
                all_units &= ready
                reported = [
                    u for u in (cr.get("status") or {}).get("units") or []
                    if u["role"] == role and u["index"] == index
                ]  # fmt: skip
                if not reported or reported[0].get("ready") != ready:
                    found.append(
                        f"{name}: status of unit {role}-{index} says {reported}, pods ready: {ready}"
                    )
        routers = [d for d in listing.of("Deployment") if _labels(d).get(DEPLOYMENT) == name]
        router_up = bool(routers) and (routers[0].get("status") or {}).get("availableReplicas", 0) >= 1
        conditions = (cr.get("status") or {}).get("conditions") or []
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        if ready != (all_units and router_up):
            found.append(f"{name}: Ready={ready} but units ready={all_units}, router available={router_up}")
    return found


def _condition(obj: dict[str, Any], kind: str) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def training_mismatch(listing: Listing) -> list[str]:
    """A TrainingJob runs one attempt: one live Job, spec.nodes Running pods all of the attempt
    its status counts, and phase Running."""
    found = []
    for job in listing.of("TrainingJob"):
        name, status = job["metadata"]["name"], job.get("status") or {}
        attempts_jobs = [j for j in listing.of("Job") if _labels(j).get(TRAINING_JOB) == name and _live(j)]
        jobs = [j for j in attempts_jobs if not j["metadata"]["name"].endswith("-prepare")]
        pods = [p for p in listing.of("Pod") if _labels(p).get(TRAINING_JOB) == name and _live(p)]
        attempts = sorted({_labels(p).get(ATTEMPT, "?") for p in pods})
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        if status.get("phase") != "Running":
            found.append(f"{name}: phase {status.get('phase')}")
        if len(jobs) != 1:
            found.append(f"{name}: {len(jobs)} live Jobs")
        if len(running) != job["spec"]["nodes"] or attempts != [str(status.get("restarts", 0))]:
            found.append(
                f"{name}: {len(running)}/{job['spec']['nodes']} pods Running, attempts {attempts}, "
                f"status restarts {status.get('restarts')}"
            )
    return found


def threefs_mismatch(listing: Listing) -> list[str]:
    """A ThreeFSCluster is Ready, with one storage StatefulSet and every storage pod Running."""
    found = []
    for fs in listing.of("ThreeFSCluster"):
        name = fs["metadata"]["name"]
        if not _condition(fs, "Ready"):
            found.append(f"{name}: not Ready")
        storage = [s for s in listing.of("StatefulSet") if s["metadata"]["name"] == f"{name}-storage"]
        pods = [
            p for p in listing.of("Pod")
            if _labels(p).get(THREEFS) == name and _labels(p).get(COMPONENT) == "storage" and _live(p)
        ]  # fmt: skip
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        if len(storage) != 1 or len(running) != fs["spec"]["storage"]["nodes"]:
            found.append(f"{name}: {len(storage)} storage StatefulSets, {len(running)} storage pods Running")
    return found


def converged(listing: Listing) -> list[str]:
    """Why the namespace has not converged yet ([] once it has): every deployment Ready for its
    generation, nothing terminating, and every invariant holding."""
    waiting = []
    for cr in [*listing.deployments(), *listing.of("TrainingJob"), *listing.of("ThreeFSCluster")]:
        status = cr.get("status") or {}
        if status.get("observedGeneration") != cr["metadata"].get("generation"):
            waiting.append(f"{cr['metadata']['name']}: generation not observed yet")
    terminating = [p["metadata"]["name"] for p in listing.of("Pod") if not _live(p)]
    if terminating:
        waiting.append(f"pods terminating: {terminating}")
    return [
        *waiting,
        *duplicates(listing),
        *orphans(listing),
        *mixed_revisions(listing),
        *ready_mismatch(listing),
        *training_mismatch(listing),
        *threefs_mismatch(listing),
    ]
