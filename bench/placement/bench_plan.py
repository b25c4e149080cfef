"""Planning time of the gang planner on the 256-node `deepseek` topology, or on a generated
fabric of --nodes nodes (spines × leaves × 8 nodes, e.g. 2048 = 16 × 16 × 8).

Usage: python bench/placement/bench_plan.py [--repeat N] [--nodes 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fireflyer.dev import topology as dev_topology
from fireflyer.placement import UnitRequest, build_topology, plan_units


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=0, help="a generated fabric of this size")
    args = parser.parse_args()
    shape = (
        dev_topology.Topology.model_validate(dev_topology.fabric_topology(args.nodes))
        if args.nodes
        else dev_topology.load("deepseek")
    )
    nodes = dev_topology.nodes(shape)
    for node in nodes:
        node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    # Half the cluster busy with scattered 8-GPU pods, so that the planner has to search.
    pods = [
        {
            "spec": {
                "nodeName": n["metadata"]["name"],
                "containers": [{"resources": {"requests": {"nvidia.com/gpu": "8"}}}],
            },
            "status": {"phase": "Running"},
        }
        for i, n in enumerate(nodes)
        if i % 3 == 0
    ]
    cases = {
        "one 18-node decode unit": [UnitRequest("decode", 0, 18, 8, 8)],
        "DeepSeek sample (4×4 + 2×18)": [UnitRequest("prefill", i, 4, 8, 8) for i in range(4)]
        + [UnitRequest("decode", i, 18, 8, 8) for i in range(2)],
    }
    results = {}
    print(f"{'case':34} {'build topology ms':>18} {'plan ms (median)':>17} {'p95 ms':>8}")
    for name, units in cases.items():
        build, plan = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            topo = build_topology(nodes, pods)
            t1 = time.perf_counter()
            result = plan_units(units, topo)
            t2 = time.perf_counter()
            assert result.complete, result.explain()
            build.append((t1 - t0) * 1e3)
            plan.append((t2 - t1) * 1e3)
        p95 = sorted(plan)[int(0.95 * (len(plan) - 1))]
        results[name] = {
            "build_ms": statistics.median(build),
            "plan_ms": statistics.median(plan),
            "plan_p95_ms": p95,
        }
        print(f"{name:34} {statistics.median(build):18.2f} {statistics.median(plan):17.2f} {p95:8.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
