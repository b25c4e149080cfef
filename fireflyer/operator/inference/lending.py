"""Lending: nodes inference released may run preemptible TrainingJobs, and inference takes them
back when a unit cannot be placed otherwise. Pure.

When a plan leaves units unplaced, the nodes held only by the pods of spec.preemptible
TrainingJobs count as reclaimable: the units are planned again as if those pods were gone, with
the same placement rules (a unit still lands whole inside one leaf or spine as it requires). If
more units fit that way, the fewest jobs that make them fit are asked to give their nodes back;
among as many jobs, the ones holding the fewest nodes (the least training capacity taken away),
then by name. Progress lost is not a criterion: a trainer that gets the deletion's SIGTERM
checkpoints the step it is in, so every job loses the same (nothing).

The units are not placed on those nodes in this pass: the jobs' pods still hold them. A job
already asked whose pods of that time are still there counts as leaving: it is not asked again,
and nobody else is asked for what its nodes will provide.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fireflyer.operator import labels as L
from fireflyer.operator.planning import Event, parse_time
from fireflyer.operator.training.children import COMPONENT as TRAINER
from fireflyer.operator.training.children import label_value
from fireflyer.operator.training.preemption import read_request
from fireflyer.placement.planner import PlacementPlan
from fireflyer.placement.topology import GPU_RESOURCE, ClusterTopology, parse_quantity, pod_node

PREEMPTION_REQUESTED = "PreemptionRequested"  # event reason, on both objects
FIELD_MANAGER = "fireflyer-lending"  # the inference controller's writes of the request annotation


@dataclass(frozen=True)
class Lender:
    """A preemptible TrainingJob with pods bound to nodes."""

    namespace: str
    name: str
    pods: tuple[Mapping[str, Any], ...]
    pending: bool
    """Asked already, and its pods of that time are still there (they are leaving)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(sorted({pod_node(p) for p in self.pods}))


@dataclass(frozen=True)
class Preemption:
    """Ask TrainingJob namespace/name to give `nodes` back for `unit`."""

    namespace: str
    name: str
    unit: str
    nodes: tuple[str, ...]

    def annotation(self, deployment: str, at: str) -> str:
        """The value of the job's PREEMPTION_REQUESTED annotation (read by training's plan)."""
        return json.dumps({"at": at, "by": deployment, "unit": self.unit, "nodes": list(self.nodes)})


def is_trainer(pod: Mapping[str, Any]) -> bool:
    """A bound, active pod of a TrainingJob."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    active = (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    return labels.get(L.COMPONENT) == TRAINER and L.TRAINING_JOB in labels and active and bool(pod_node(pod))


def lenders(training_jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> list[Lender]:
    """The preemptible TrainingJobs that hold nodes now."""
    by_job: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for pod in pods:
        if is_trainer(pod):
            meta = pod["metadata"]
            by_job.setdefault((str(meta.get("namespace")), meta["labels"][L.TRAINING_JOB]), []).append(pod)
    result = []
    for job in training_jobs:
        if not (job.get("spec") or {}).get("preemptible"):
            continue
        meta = job["metadata"]
        held = by_job.get((meta.get("namespace"), label_value(meta["name"])), [])
        if not held:
            continue
        request = read_request(dict(job))
        created = [parse_time((p.get("metadata") or {}).get("creationTimestamp")) for p in held]
        pending = request is not None and all(t is not None and t <= request.at for t in created)
        result.append(Lender(str(meta.get("namespace")), str(meta["name"]), tuple(held), pending))
    return sorted(result, key=lambda lender: (len(lender.nodes), lender.key))


def _amount(pod: Mapping[str, Any], resource: str) -> int:
    total = 0.0
    for container in (pod.get("spec") or {}).get("containers") or []:
        res = container.get("resources") or {}
        total += parse_quantity(
            (res.get("requests") or {}).get(resource, (res.get("limits") or {}).get(resource))
        )
    return int(total)


def freed(topology: ClusterTopology, gone: Iterable[Lender], rdma_resource: str) -> ClusterTopology:
    """The topology as if these jobs' pods were gone: their GPUs and RDMA devices free again."""
    back: dict[str, tuple[int, int]] = {}
    for lender in gone:
        for pod in lender.pods:
            gpus, rdma = back.get(pod_node(pod), (0, 0))
            back[pod_node(pod)] = (gpus + _amount(pod, GPU_RESOURCE), rdma + _amount(pod, rdma_resource))
    if not back:
        return topology
    infos = {
        name: dataclasses.replace(
            info,
            free_gpus=min(info.gpus, info.free_gpus + back[name][0]),
            free_rdma=min(info.rdma, info.free_rdma + back[name][1]),
        )
        if name in back
        else info
        for name, info in topology.nodes.items()
    }
    return ClusterTopology(infos, topology.levels, topology.level_keys)


def _placed(plan: PlacementPlan) -> int:
    return len(plan.placed)


def choose(
    candidates: Sequence[Lender],
    baseline: PlacementPlan,
    topology: ClusterTopology,
    place: Callable[[ClusterTopology], PlacementPlan],
    rdma_resource: str,
) -> list[Preemption]:
    """Which preemptible jobs must give nodes back so that more units fit (none when they would
    not, or when jobs already asked free enough). `place` plans the deployment's units on a
    topology; `baseline` is its plan on the cluster as it is."""
    leaving = [c for c in candidates if c.pending]
    free = [c for c in candidates if not c.pending]
    if not free:
        return []

    def fits(chosen: Sequence[Lender]) -> PlacementPlan:
        return place(freed(topology, [*leaving, *chosen], rdma_resource))

    already = _placed(fits([])) if leaving else _placed(baseline)
    target = _placed(fits(free))
    if target <= already:
        return []
    chosen = next(([c] for c in free if _placed(fits([c])) >= target), None)
    if chosen is None:
        chosen = []
        for lender in free:  # smallest first, until enough
            chosen.append(lender)
            if _placed(fits(chosen)) >= target:
                break
        for lender in list(chosen):  # then drop any the others make unnecessary
            rest = [c for c in chosen if c is not lender]
            if _placed(fits(rest)) >= target:
                chosen = rest
    final = fits(chosen)
    before = {p.unit.name for p in baseline.placed}
    new_units = [p for p in final.placed if p.unit.name not in before]
    result = []
    for lender in chosen:
        mine = set(lender.nodes)
        needing = [u for u in new_units if mine & set(u.nodes)]
        nodes = sorted({n for u in needing for n in u.nodes if n in mine})
        if nodes:  # one request per job, for every unit that needs its nodes
            units = ", ".join(u.unit.name for u in needing)
            result.append(Preemption(lender.namespace, lender.name, units, tuple(nodes)))
    return result


def events(preemptions: Sequence[Preemption]) -> list[Event]:
    """The deployment's Events for the requests it makes."""
    return [
        Event(
            "Normal",
            PREEMPTION_REQUESTED,
            f"{p.unit} fits on {', '.join(p.nodes)} held by preemptible TrainingJob "
            f"{p.namespace}/{p.name}: asked it to give them back (it checkpoints first)",
        )
        for p in preemptions
    ]


def reclaim(
    training_jobs: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    baseline: PlacementPlan,
    topology: ClusterTopology,
    place: Callable[[ClusterTopology], PlacementPlan],
    rdma_resource: str,
) -> list[Preemption]:
    """The requests a deployment's plan makes: none while every unit is placed."""
    if baseline.complete:
        return []
    candidates = lenders(training_jobs, pods)
    return choose(candidates, baseline, topology, place, rdma_resource) if candidates else []
