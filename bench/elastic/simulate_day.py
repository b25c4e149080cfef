"""A simulated day of elastic inference on the 256-node `deepseek` topology: synthetic traffic with
a peak and a trough, one decode role scaled by the built-in autoscaler's pure `decide`, and one
preemptible training job that runs on the nodes inference leaves free and gives them back through
the lending decision (fireflyer/operator/inference/lending.py) when a unit needs them.

The model is deliberately simple, and the numbers are only as good as it is:
- traffic: requests/s following a cosine between TROUGH_RPS (03:00) and PEAK_RPS (15:00);
- a unit (4 nodes, one leaf at most) serves UNIT_RPS requests/s within its latency target once
  Ready, UNIT_START_SECONDS after placement; arrivals above the Ready units' capacity in a tick
  count as requests that missed their latency target (no queue carried over);
- the autoscaler reads the Ready units' utilisation (arrivals / capacity) every 30 s, target
  TARGET_UTILISATION; scale-in removes units at once (draining through the router is left out);
- the training job needs JOB_NODES nodes inside one spine; asked for its nodes it checkpoints and
  stops STOP_SECONDS later (a step plus the save), and restarts RESUME_SECONDS after placement
  (pods start, checkpoint loads) before it trains again; it also checkpoints every
  CHECKPOINT_MINUTES while training.

Usage: python bench/elastic/simulate_day.py [--job-nodes 32] [--tick 30] [--no-lending]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fireflyer.api.inference import Autoscaling
from fireflyer.api.training import PREEMPTION_REQUESTED
from fireflyer.dev import topology as dev_topology
from fireflyer.operator import labels as L
from fireflyer.operator.inference import autoscale, lending
from fireflyer.operator.planning import format_time
from fireflyer.placement import UnitRequest, build_topology, plan_units
from fireflyer.placement.planner import PlacementPlan
from fireflyer.placement.topology import ClusterTopology

PEAK_RPS = 2400.0
TROUGH_RPS = 250.0
UNIT_NODES = 4
UNIT_RPS = 40.0
UNIT_START_SECONDS = 240
TARGET_UTILISATION = 0.8
STOP_SECONDS = 60
RESUME_SECONDS = 180
CHECKPOINT_MINUTES = 30
RDMA = "rdma/ib"
DAY = datetime(2026, 12, 1, tzinfo=UTC)
JOB = "pretrain"


def traffic(at: datetime) -> float:
    """Requests/s: the trough at 03:00, the peak at 15:00."""
    hours = (at - DAY).total_seconds() / 3600
    phase = math.cos((hours - 15) / 24 * 2 * math.pi)  # 1 at 15:00, -1 at 03:00
    return TROUGH_RPS + (PEAK_RPS - TROUGH_RPS) * (phase + 1) / 2


def _pod(name: str, node: str, labels: dict[str, str], created: datetime) -> dict[str, Any]:
    amounts = {"nvidia.com/gpu": "8", RDMA: "8"}
    return {
        "metadata": {
            "name": name,
            "namespace": "ml" if L.TRAINING_JOB in labels else "serving",
            "labels": labels,
            "creationTimestamp": format_time(created),
        },
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": amounts}}]},
        "status": {"phase": "Running"},
    }


@dataclass
class Unit:
    nodes: tuple[str, ...]
    placed: datetime

    def ready(self, now: datetime) -> bool:
        return (now - self.placed).total_seconds() >= UNIT_START_SECONDS


@dataclass
class Training:
    nodes: int
    preemptible: bool = True
    placed_on: tuple[str, ...] = ()
    placed: datetime | None = None
    stop_at: datetime | None = None
    """Asked for its nodes: they are free from then on."""
    asked: datetime | None = None
    last_checkpoint: datetime | None = None
    gpu_hours: float = 0.0
    training_gpu_hours: float = 0.0
    checkpoints: int = 0
    forced_checkpoints: int = 0
    preemptions: int = 0

    def pods(self) -> list[dict[str, Any]]:
        labels = {L.TRAINING_JOB: JOB, L.COMPONENT: "trainer", L.MANAGED_BY: L.MANAGER}
        assert self.placed is not None or not self.placed_on
        return [_pod(f"{JOB}-{i}", n, labels, self.placed or DAY) for i, n in enumerate(self.placed_on)]

    def resource(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": JOB, "namespace": "ml"}
        if self.asked is not None:
            request = {"at": format_time(self.asked), "by": "serving/decode", "unit": "", "nodes": []}
            meta["annotations"] = {PREEMPTION_REQUESTED: json.dumps(request)}
        return {"metadata": meta, "spec": {"preemptible": self.preemptible}}


@dataclass
class Day:
    nodes: list[dict[str, Any]]
    spec: Autoscaling
    job: Training
    tick: int
    units: dict[int, Unit] = field(default_factory=dict)
    history: list[autoscale.Recommendation] = field(default_factory=list)
    desired: int = 0
    requests: float = 0.0
    missed: float = 0.0
    unit_hours: float = 0.0
    max_units: int = 0

    def pods(self) -> list[dict[str, Any]]:
        pods = [
            _pod(f"decode-{i}-{r}", n, {L.DEPLOYMENT: "decode"}, u.placed)
            for i, u in self.units.items()
            for r, n in enumerate(u.nodes)
        ]
        return pods + self.job.pods()

    def topology(self) -> ClusterTopology:
        return build_topology(self.nodes, self.pods(), rdma_resource=RDMA)

    def place_units(self, now: datetime) -> None:
        """Plan the desired units (the placed ones keep their nodes); ask the training job for
        its nodes when that is what stops a unit from fitting."""
        requests = [UnitRequest("decode", i, UNIT_NODES, 8, 8) for i in range(self.desired)]
        keep = {f"decode-{i}": list(u.nodes) for i, u in self.units.items()}
        topology = build_topology(
            self.nodes, self.pods(), rdma_resource=RDMA, ignore_pods={L.DEPLOYMENT: "decode"}
        )

        def place(topo: ClusterTopology) -> PlacementPlan:
            return plan_units(requests, topo, "leaf", None, False, keep)

        plan = place(topology)
        for placed in plan.placed:
            if placed.unit.index not in self.units:
                self.units[placed.unit.index] = Unit(placed.nodes, now)
        asked = lending.reclaim([self.job.resource()], self.pods(), plan, topology, place, RDMA)
        if asked and self.job.stop_at is None:
            self.job.asked = now
            self.job.stop_at = now + timedelta(seconds=STOP_SECONDS)
            self.job.preemptions += 1

    def step_training(self, now: datetime, seconds: float) -> None:
        job = self.job
        if job.stop_at is not None and now >= job.stop_at:
            if job.placed is not None and (now - job.placed).total_seconds() >= RESUME_SECONDS:
                job.checkpoints += 1
                job.forced_checkpoints += 1
            job.placed_on, job.placed, job.stop_at = (), None, None
        if job.placed_on:
            gpus = len(job.placed_on) * 8
            job.gpu_hours += gpus * seconds / 3600
            assert job.placed is not None
            if (now - job.placed).total_seconds() >= RESUME_SECONDS and job.stop_at is None:
                job.training_gpu_hours += gpus * seconds / 3600
                last = job.last_checkpoint or job.placed
                if (now - last).total_seconds() >= CHECKPOINT_MINUTES * 60:
                    job.checkpoints += 1
                    job.last_checkpoint = now
            return
        if len(self.units) < self.desired:
            return  # inference is still taking nodes: the job keeps off them
        plan = plan_units([UnitRequest("train", 0, job.nodes, 8, 8)], self.topology(), "spine")
        if plan.placed:
            job.placed_on, job.placed, job.last_checkpoint = plan.placed[0].nodes, now, now

    def run(self) -> None:
        now = DAY
        samples: list[autoscale.MetricSample] = []
        # Warm at midnight: the units the night's traffic needs, Ready.
        self.desired = math.ceil(traffic(now) / (UNIT_RPS * TARGET_UTILISATION))
        self.place_units(now - timedelta(hours=1))
        while now < DAY + timedelta(days=1):
            arrivals = traffic(now)
            ready = sum(1 for u in self.units.values() if u.ready(now))
            capacity = ready * UNIT_RPS
            self.requests += arrivals * self.tick
            self.missed += max(0.0, arrivals - capacity) * self.tick
            samples = [autoscale.MetricSample(now, arrivals / capacity if capacity else 10.0)]
            decision = autoscale.decide(now, self.desired, samples, self.spec, self.history)
            self.history = autoscale.prune(
                [*self.history, autoscale.Recommendation(now, decision.recommendation)], now, self.spec
            )
            self.desired = decision.units
            for index in [i for i in self.units if i >= self.desired]:
                del self.units[index]  # scale-in: the highest indices
            self.place_units(now)
            self.step_training(now, self.tick)
            self.unit_hours += len(self.units) * UNIT_NODES * 8 * self.tick / 3600
            self.max_units = max(self.max_units, len(self.units))
            now += timedelta(seconds=self.tick)

    def report(self) -> dict[str, Any]:
        return {
            "requests": round(self.requests),
            "missedLatencyTarget": round(self.missed),
            "missedFraction": round(self.missed / self.requests, 5),
            "inferenceGpuHours": round(self.unit_hours),
            "peakUnits": self.max_units,
            "trainingGpuHoursHeld": round(self.job.gpu_hours),
            "trainingGpuHoursTraining": round(self.job.training_gpu_hours),
            "checkpoints": self.job.checkpoints,
            "forcedCheckpoints": self.job.forced_checkpoints,
            "preemptions": self.job.preemptions,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--job-nodes", type=int, default=32, help="the training job's nodes (one spine at most)"
    )
    parser.add_argument(
        "--tick", type=int, default=30, help="simulated seconds per step (the autoscaler's interval)"
    )
    parser.add_argument(
        "--no-lending", action="store_true", help="the job is not preemptible: it keeps the nodes it got"
    )
    args = parser.parse_args()
    nodes = dev_topology.nodes(dev_topology.load("deepseek"))
    for node in nodes:
        node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    spec = Autoscaling.model_validate(
        {
            "metric": "kvBlockUsage",
            "target": TARGET_UTILISATION,
            "minUnits": 6,
            "maxUnits": len(nodes) // UNIT_NODES,
            "intervalSeconds": args.tick,
            "scaleDownStabilizationSeconds": 600,
        }
    )
    day = Day(nodes, spec, Training(args.job_nodes, preemptible=not args.no_lending), args.tick)
    day.run()
    print(json.dumps({"jobNodes": args.job_nodes, "lending": not args.no_lending, **day.report()}, indent=2))


if __name__ == "__main__":
    main()
