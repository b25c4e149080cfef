"""Gauges read from the status of InferenceDeployments, TrainingJobs and ThreeFSClusters.

Each reconcile hands its object's status to one of `inference`, `training` or `threefs`, which
replace that object's samples whole. Samples not refreshed for STALE_SECONDS are dropped at the
next scrape: every object is reconciled at least every 20 s while it exists, so a deleted object,
or one a peer replica now leads, disappears without a deletion hook. The `*_samples` functions are
pure; label values are bounded (kinds, roles, fixed state sets), never free text.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STALE_SECONDS = 120.0

# name → (help, label names, type); every family is exported, empty ones too, so that the names
# are known before the first object exists (the dashboards' test reads them).
FAMILIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "fireflyer_ready": (
        "1 while the resource's Ready condition is True",
        ("kind", "namespace", "name"),
        "gauge",
    ),
    "fireflyer_degraded": (
        "1 while the resource's Degraded condition is True",
        ("kind", "namespace", "name"),
        "gauge",
    ),
    "fireflyer_inference_units": (
        "Units of an InferenceDeployment role by state: ready, placed_not_ready, recreating, unplaced",
        ("namespace", "deployment", "role", "state"),
        "gauge",
    ),
    "fireflyer_inference_units_desired": (
        "Units the InferenceDeployment's spec asks for, by role",
        ("namespace", "deployment", "role"),
        "gauge",
    ),
    "fireflyer_trainingjob_phase": (
        "1 for the TrainingJob's current phase",
        ("namespace", "job", "phase"),
        "gauge",
    ),
    "fireflyer_trainingjob_restarts": (
        "Whole-job restarts of the TrainingJob so far (status.restarts)",
        ("namespace", "job"),
        "counter",
    ),
    "fireflyer_trainingjob_step": ("The trainer's current step", ("namespace", "job"), "gauge"),
    "fireflyer_trainingjob_loss": ("The trainer's latest training loss", ("namespace", "job"), "gauge"),
    "fireflyer_trainingjob_last_checkpoint_step": (
        "The step of the latest complete checkpoint",
        ("namespace", "job"),
        "gauge",
    ),
    "fireflyer_trainingjob_tokens_per_second": (
        "Training throughput of the whole job",
        ("namespace", "job"),
        "gauge",
    ),
    "fireflyer_trainingjob_nodes_running": (
        "Nodes of the job's current attempt whose pod runs",
        ("namespace", "job"),
        "gauge",
    ),
    "fireflyer_trainingjob_nodes_desired": ("Nodes the job runs on", ("namespace", "job"), "gauge"),
    "fireflyer_threefs_phase": (
        "1 for the ThreeFSCluster's current phase",
        ("namespace", "cluster", "phase"),
        "gauge",
    ),
    "fireflyer_threefs_chains": (
        "Chains by state (serving, degraded), from the last health check",
        ("namespace", "cluster", "state"),
        "gauge",
    ),
    "fireflyer_threefs_targets": (
        "Storage targets by state, from the last health check",
        ("namespace", "cluster", "state"),
        "gauge",
    ),
    "fireflyer_threefs_used_bytes": (
        "Bytes used on all storage targets, from the last health check",
        ("namespace", "cluster"),
        "gauge",
    ),
    "fireflyer_threefs_storage_nodes_ready": ("Storage nodes ready", ("namespace", "cluster"), "gauge"),
    "fireflyer_threefs_storage_nodes_desired": (
        "Storage nodes the spec asks for",
        ("namespace", "cluster"),
        "gauge",
    ),
    "fireflyer_threefs_replacements_completed": (
        "Storage node replacements completed",
        ("namespace", "cluster"),
        "counter",
    ),
}

UNIT_STATES = ("ready", "placed_not_ready", "recreating", "unplaced")
TRAINING_PHASES = ("Pending", "Running", "Restarting", "Succeeded", "Failed")
THREEFS_PHASES = ("Bootstrapping", "Ready", "Degraded", "Replacing", "Deleting")
# 3FS's public target states (admin_cli list-targets), lower case as the status has them.
TARGET_STATES = ("serving", "syncing", "waiting", "lastsrv", "offline", "invalid")
ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[str, ...]
    """Values in the order of FAMILIES[name]'s label names."""
    value: float


def _condition(status: Mapping[str, Any], type_: str) -> float:
    conds = status.get("conditions") or []
    return float(any(c.get("type") == type_ and c.get("status") == "True" for c in conds))


def _health(kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> list[Sample]:
    return [
        Sample("fireflyer_ready", (kind, namespace, name), _condition(status, "Ready")),
        Sample("fireflyer_degraded", (kind, namespace, name), _condition(status, "Degraded")),
    ]


def _fraction(text: Any) -> tuple[int, int] | None:
    """Ready/desired as the printer columns write it ("3/4") → (3, 4)."""
    try:
        have, want = str(text).split("/")
        return int(have), int(want)
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def inference_samples(
    cr: Mapping[str, Any], status: Mapping[str, Any], recreate: Iterable[str]
) -> list[Sample]:
    """An InferenceDeployment's samples from the status its reconcile wrote and the units it is
    recreating (by unit name, `<deployment>-<role>-<index>`)."""
    namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
    recreating = set(recreate)
    counts = {(role, state): 0 for role in ROLES for state in UNIT_STATES}
    for unit in status.get("units") or []:
        role = unit.get("role")
        if role not in ROLES:
            continue
        if f"{name}-{role}-{unit.get('index')}" in recreating:
            state = "recreating"
        elif unit.get("ready"):
            state = "ready"
        elif unit.get("domain"):  # placed: the plan names its domain
            state = "placed_not_ready"
        else:
            state = "unplaced"
        counts[(role, state)] += 1
    samples = _health("InferenceDeployment", namespace, name, status)
    for (role, state), count in counts.items():
        samples.append(Sample("fireflyer_inference_units", (namespace, name, role, state), count))
    for role in ROLES:
        want = _number((status.get(role) or {}).get("units"))
        if want is not None:
            samples.append(Sample("fireflyer_inference_units_desired", (namespace, name, role), want))
    return samples


def training_samples(cr: Mapping[str, Any], status: Mapping[str, Any]) -> list[Sample]:
    namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
    samples = _health("TrainingJob", namespace, name, status)
    phase = status.get("phase") or ""
    for known in TRAINING_PHASES:
        samples.append(Sample("fireflyer_trainingjob_phase", (namespace, name, known), float(phase == known)))
    restarts = _number(status.get("restarts")) or 0
    samples.append(Sample("fireflyer_trainingjob_restarts", (namespace, name), restarts))
    for field, metric in (
        ("step", "fireflyer_trainingjob_step"),
        ("loss", "fireflyer_trainingjob_loss"),
        ("lastCheckpointStep", "fireflyer_trainingjob_last_checkpoint_step"),
        ("tokensPerSecond", "fireflyer_trainingjob_tokens_per_second"),
    ):
        value = _number(status.get(field))
        if value is not None:  # not reported yet: no sample rather than a false 0
            samples.append(Sample(metric, (namespace, name), value))
    ready = _fraction(status.get("ready"))
    if ready is not None:
        samples.append(Sample("fireflyer_trainingjob_nodes_running", (namespace, name), ready[0]))
        samples.append(Sample("fireflyer_trainingjob_nodes_desired", (namespace, name), ready[1]))
    return samples


def threefs_samples(cr: Mapping[str, Any], status: Mapping[str, Any]) -> list[Sample]:
    namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
    samples = _health("ThreeFSCluster", namespace, name, status)
    phase = status.get("phase") or ""
    for known in THREEFS_PHASES:
        samples.append(Sample("fireflyer_threefs_phase", (namespace, name, known), float(phase == known)))
    chains = status.get("chains") or {}
    if chains:  # none before the first health check
        for state in ("serving", "degraded"):
            value = _number(chains.get(state)) or 0
            samples.append(Sample("fireflyer_threefs_chains", (namespace, name, state), value))
        targets = status.get("targets") or {}
        other = sum(_number(v) or 0 for k, v in targets.items() if k not in TARGET_STATES)
        for state in TARGET_STATES:
            value = _number(targets.get(state)) or 0
            samples.append(Sample("fireflyer_threefs_targets", (namespace, name, state), value))
        if other:
            samples.append(Sample("fireflyer_threefs_targets", (namespace, name, "other"), other))
        used = _number(status.get("usedBytes"))
        if used is not None:
            samples.append(Sample("fireflyer_threefs_used_bytes", (namespace, name), used))
    storage = _fraction(status.get("storageReady"))
    if storage is not None:
        samples.append(Sample("fireflyer_threefs_storage_nodes_ready", (namespace, name), storage[0]))
        samples.append(Sample("fireflyer_threefs_storage_nodes_desired", (namespace, name), storage[1]))
    completed = _number(status.get("replacementsCompleted")) or 0
    samples.append(Sample("fireflyer_threefs_replacements_completed", (namespace, name), completed))
    return samples


class ObjectGauges(Collector):
    """The latest samples of every object, by (kind, namespace, name)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, stale_seconds: float = STALE_SECONDS):
        self._clock = clock
        self._stale = stale_seconds
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str, str], tuple[float, list[Sample]]] = {}

    def put(self, kind: str, cr: Mapping[str, Any], samples: list[Sample]) -> None:
        key = (kind, cr["metadata"]["namespace"], cr["metadata"]["name"])
        with self._lock:
            self._objects[key] = (self._clock(), samples)

    def collect(self) -> Iterator[Metric]:
        horizon = self._clock() - self._stale
        with self._lock:
            for key in [k for k, (at, _) in self._objects.items() if at < horizon]:
                del self._objects[key]
            samples = [s for _, group in self._objects.values() for s in group]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, (doc, labels, type_) in FAMILIES.items():
            family = CounterMetricFamily if type_ == "counter" else GaugeMetricFamily
            families[name] = family(name, doc, labels=list(labels))
        for sample in samples:
            families[sample.name].add_metric(list(sample.labels), sample.value)
        yield from families.values()

    def describe(self) -> Iterator[Metric]:
        return self.collect()


OBJECTS = ObjectGauges()
REGISTRY.register(OBJECTS)


def _status(cr: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """The status as it stands after this pass: the plan's fields over those other writers keep
    (training progress, 3FS health figures)."""
    return {**(cr.get("status") or {}), **status}


def inference(cr: Mapping[str, Any], desired: Any) -> None:
    """After an InferenceDeployment's reconcile (desired: its plan.Desired)."""
    samples = inference_samples(cr, _status(cr, desired.status), desired.recreate)
    OBJECTS.put("InferenceDeployment", cr, samples)


def training(cr: Mapping[str, Any], desired: Any) -> None:
    """After a TrainingJob's reconcile (desired: its plan.Desired)."""
    OBJECTS.put("TrainingJob", cr, training_samples(cr, _status(cr, desired.status)))


def threefs(cr: Mapping[str, Any], desired: Any) -> None:
    """After a ThreeFSCluster's reconcile (desired: its plan.Desired)."""
    OBJECTS.put("ThreeFSCluster", cr, threefs_samples(cr, _status(cr, desired.status)))
