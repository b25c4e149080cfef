"""Chaos on the local control plane: while small InferenceDeployments are scaled and rolled out
beside a TrainingJob and a ThreeFSCluster (the small samples), the operator is SIGKILLed at random
moments and restarted, random nodes go NotReady and come back, random pods of all of them are
deleted. After each round the namespace must converge with every invariant holding
(tests/chaos/invariants.py) and no unit (a training job, a 3FS component) left alone by the round
restarted.

CI runs FIREFLYER_CHAOS_ROUNDS=10 (the default); longer runs by hand, e.g.
FIREFLYER_CHAOS_ROUNDS=100 pytest -s tests/chaos (FIREFLYER_CHAOS_SEED repeats a run)."""

from __future__ import annotations

import copy
import os
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.dev import faults
from fireflyer.dev.runtime.threefs_admin import AdminRunner
from tests.chaos import invariants as I
from tests.conftest import TEST_PORT_BASE, Operator, install_crds, running_operator
from tests.kube import Kube, fresh_namespace, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = REPO_ROOT / "manifests/samples/small"
SMALL = yaml.safe_load((SAMPLES / "inference.yaml").read_text())
TRAINING = yaml.safe_load((SAMPLES / "training.yaml").read_text())
THREEFS = yaml.safe_load((SAMPLES / "threefs.yaml").read_text())
STORAGE_LABEL = "fireflyer.dev/3fs-storage"
ROUNDS = int(os.environ.get("FIREFLYER_CHAOS_ROUNDS", "10"))
SEED = int(os.environ.get("FIREFLYER_CHAOS_SEED", str(random.randrange(1 << 30))))
CONVERGE_SECONDS = 60.0  # a failure, well past the 30 s target
FIRST_CONVERGE_SECONDS = 180.0  # the 3FS bootstrap runs its admin Jobs one by one
# A round takes seconds to tens of seconds: the run's limit grows with the rounds asked for.
pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(300 + 40 * ROUNDS)]
KINDS = (
    "inferencedeployments,trainingjobs,threefsclusters,statefulsets,services,deployments,"
    "replicasets,daemonsets,jobs,configmaps,poddisruptionbudgets,pods"
)


@pytest.fixture(scope="module")
def chaos_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """A cluster of its own (the `small` topology), so that no other operator acts on it."""
    from fireflyer.dev import cluster as dev_cluster

    state_dir = tmp_path_factory.mktemp("chaos-cluster")
    state = dev_cluster.up(state_dir, "small", TEST_PORT_BASE + 500)
    try:
        yield install_crds(Kube(state.kubeconfig))
    finally:
        dev_cluster.down(state_dir, quiet=True)


@pytest.fixture(scope="module")
def chaos_storage(chaos_cluster: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminRunner]:
    """Three nodes labelled for 3FS storage, and the runtime that plays 3FS's admin Jobs."""
    nodes = sorted(n["metadata"]["name"] for n in chaos_cluster.get("nodes", namespaced=False)["items"])
    for node in nodes[-3:]:
        chaos_cluster.run("label", "node", node, f"{STORAGE_LABEL}=true", namespaced=False)
    runner = AdminRunner(chaos_cluster.kubeconfig, tmp_path_factory.mktemp("chaos-3fs"))
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


@pytest.fixture(scope="module")
def chaos_operator(chaos_cluster: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    with running_operator(chaos_cluster.kubeconfig, tmp_path_factory.mktemp("chaos") / "operator.log") as op:
        yield op


def _deployment(name: str, prefill_units: int, args: list[str]) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc["metadata"]["name"] = name
    doc["spec"]["prefill"]["units"] = prefill_units
    doc["spec"]["decode"]["units"] = 0
    doc["spec"]["engine"] = {"kind": "fireflyer", "args": args}
    # kwok's router pods answer nothing: a scale-in's drain would wait its whole timeout.
    doc["spec"]["router"] = {**doc["spec"].get("router", {}), "drainTimeoutSeconds": 0}
    return doc


def _training() -> dict[str, Any]:
    """The small training sample on one node, kept running (kwok ends a Job's pods otherwise), with
    restarts enough for every node loss and pod deletion a long run gives it."""
    doc = copy.deepcopy(TRAINING)
    # One node, not the sample's two: the deployments hold six of the eight nodes, and a job that
    # restarts while a unit is recreated after a node loss must still find room (a two-node job
    # can lose both of its freed nodes to the unit and wait for good: no invariant could hold).
    doc["spec"]["nodes"] = 1
    doc["spec"]["parallelism"] = {"data": 8, "tensor": 1, "expert": 8, "pipeline": 1, "schedule": "none"}
    doc["spec"]["podLabels"] = {"fireflyer.dev/keep-running": "true"}
    doc["spec"]["restart"] = {"maxRestarts": 1000}
    return doc


def _threefs() -> dict[str, Any]:
    doc = copy.deepcopy(THREEFS)
    doc["spec"]["storage"]["nodeSelector"] = {STORAGE_LABEL: "true"}
    return doc


@dataclass
class Figures:
    kills: int = 0
    node_losses: int = 0
    pod_deletions: int = 0
    scales: int = 0
    rollouts: int = 0
    converge_seconds: list[float] = field(default_factory=list)

    def line(self) -> str:
        s = sorted(self.converge_seconds)
        return (
            f"chaos: seed {SEED}, {len(s)} rounds, {self.kills} operator kills (SIGKILL), "
            f"{self.node_losses} nodes NotReady, {self.pod_deletions} pods deleted, {self.scales} "
            f"scalings, {self.rollouts} rollouts; convergence after restart p50 "
            f"{statistics.median(s):.1f} s, max {s[-1]:.1f} s"
        )


class Chaos:
    def __init__(self, kube: Kube, cluster: Kube, operator: Operator, rng: random.Random) -> None:
        self.kube, self.cluster, self.operator, self.rng = kube, cluster, operator, rng
        self.specs = {"scaled": _deployment("scaled", 2, []), "rolled": _deployment("rolled", 1, [])}
        self.others = [_training(), _threefs()]
        self.figures = Figures()

    def listing(self) -> I.Listing:
        return I.Listing(self.kube.get(KINDS)["items"])

    def converge(self, since: float, timeout: float = CONVERGE_SECONDS) -> float:
        def done() -> bool:
            why = I.converged(self.listing())
            if why:
                raise AssertionError(why)  # wait_for reports the last one on a timeout
            return True

        wait_for(f"convergence\n{self.operator.tail(30)}", done, timeout=timeout, interval=0.25)
        return time.monotonic() - since

    # -- what a round does; each returns the units it may restart --------------------------------

    def delete_pod(self) -> set[I.UnitKey]:
        units = I.workload_pods(self.listing())  # an earlier action may have removed some
        key = self.rng.choice(sorted(units))
        pod = self.rng.choice(units[key])["metadata"]["name"]
        self.kube.run("delete", "pod", pod, "--wait=false", "--ignore-not-found")
        self.figures.pod_deletions += 1
        return {key}

    def lose_node(self) -> tuple[str, set[I.UnitKey]]:
        units = I.workload_pods(self.listing())
        bound = {p["spec"].get("nodeName") for pods in units.values() for p in pods} - {None}
        node = self.rng.choice(sorted(bound))  # a scaled-up unit's pods may not be bound yet
        faults.make_node_not_ready(self.cluster.kubeconfig, node)
        self.figures.node_losses += 1
        return node, {k for k, pods in units.items() if any(p["spec"].get("nodeName") == node for p in pods)}

    def scale(self) -> set[I.UnitKey]:
        spec = self.specs["scaled"]["spec"]["prefill"]
        old = spec["units"]
        spec["units"] = 1 if old == 2 else 2
        self.kube.apply(self.specs["scaled"])
        self.figures.scales += 1
        return {("scaled", "prefill", i) for i in range(min(old, spec["units"]), max(old, spec["units"]))}

    def roll(self) -> set[I.UnitKey]:
        engine = self.specs["rolled"]["spec"]["engine"]
        engine["args"] = [] if engine["args"] else ["--max-running-requests", "256"]
        self.kube.apply(self.specs["rolled"])
        self.figures.rollouts += 1
        return {("rolled", "prefill", 0)}

    def round(self) -> None:
        before = I.unit_pod_uids(self.listing())
        touched: set[I.UnitKey] = set()
        lost: str | None = None
        actions = self.rng.sample(["delete_pod", "lose_node", "scale", "roll"], self.rng.randint(1, 3))
        for action in actions:
            if action == "delete_pod":
                touched |= self.delete_pod()
            elif action == "lose_node":
                lost, units = self.lose_node()
                touched |= units
            elif action == "scale":
                touched |= self.scale()
            else:
                touched |= self.roll()
            time.sleep(self.rng.uniform(0, 0.5))
        time.sleep(self.rng.uniform(0, 1.5))  # somewhere in the reconciles that follow
        self.operator.stop(kill=True)
        self.figures.kills += 1
        time.sleep(self.rng.uniform(0, 1.0))
        self.operator.start()
        restarted = time.monotonic()
        if lost is not None:
            time.sleep(self.rng.uniform(1.0, 3.0))
            faults.heal_node(self.cluster.kubeconfig, lost)
        self.figures.converge_seconds.append(self.converge(restarted))
        touched = I.with_dependents(touched, before)
        after = I.unit_pod_uids(self.listing())
        restarted_units = sorted(k for k in before.keys() - touched if k in after and after[k] != before[k])
        assert not restarted_units, f"healthy units restarted ({actions}, touched {sorted(touched)})"


@pytest.fixture
def chaos_kube(chaos_cluster: Kube) -> Iterator[Kube]:
    yield from fresh_namespace(chaos_cluster, "chaos")


def test_operator_kills_node_losses_and_pod_deletions_never_hurt_a_healthy_unit(
    chaos_cluster: Kube, chaos_kube: Kube, chaos_storage: AdminRunner, chaos_operator: Operator
) -> None:
    chaos = Chaos(chaos_kube, chaos_cluster, chaos_operator, random.Random(SEED))
    for doc in [*chaos.specs.values(), *chaos.others]:
        chaos_kube.apply(doc)
    chaos.converge(time.monotonic(), FIRST_CONVERGE_SECONDS)
    try:
        for _ in range(ROUNDS):
            chaos.round()
    finally:
        if chaos.figures.converge_seconds:
            print("\n" + chaos.figures.line())
