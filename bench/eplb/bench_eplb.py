"""EPLB: our rebalance against the published greedy (our own plain-Python implementation of its
description), on DeepSeek-V3 shapes and synthetic skewed loads, in the same run.

Usage: python bench/eplb/bench_eplb.py [--seed 0]
Cases: 58 MoE layers × 256 experts, 8 groups; prefill EP32 on 4 nodes and decode EP144 on 18
nodes, each with 32 redundant experts (288 slots); Zipf exponents 0.3–1.2; drifting loads
(placement computed on one window, scored on the next).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from fireflyer.eplb import balancedness, rebalance
from fireflyer.eplb.reference import rebalance_reference
from fireflyer.eplb.synthetic import drifting_loads, zipf_load

SHAPES = {"prefill EP32/4 nodes": (288, 8, 4, 32), "decode EP144/18 nodes": (288, 8, 18, 144)}
EXPONENTS = (0.3, 0.6, 0.9, 1.2)


def upper_bound(load: np.ndarray, slots: int, groups: int, nodes: int, gpus: int) -> float:
    """Balancedness no placement can beat, per layer: the peak GPU is at least the mean, at least
    the largest load per replica (minimised by giving each extra slot to the expert with the most
    load per replica), and, hierarchically, at least the heaviest node's load over its GPUs with
    the groups paired onto nodes as evenly as possible (exact for two groups per node)."""
    from fireflyer.eplb.algorithm import balanced_packing, choose_policy, replicate

    layers = load.shape[0]
    mean = load.sum(1) / gpus
    policy = choose_policy("auto", groups, nodes, slots)
    bound = np.maximum(mean, 0)
    if policy == "hierarchical":
        group_load = load.reshape(layers, groups, -1).sum(2)
        packs = balanced_packing(group_load, nodes)
        node_load = np.zeros((layers, nodes))
        np.add.at(node_load, (np.arange(layers)[:, None], packs), group_load)
        bound = np.maximum(bound, node_load.max(1) / (gpus // nodes))
    else:
        slots_of = replicate(load, slots)
        counts = np.zeros_like(load, dtype=np.int64)
        np.add.at(counts, (np.arange(layers)[:, None], slots_of), 1)
        bound = np.maximum(bound, (load / counts).max(1))
    return float(np.mean(np.divide(mean, bound, out=np.ones_like(mean), where=bound > 0)))


def timed(fn, repeat: int):  # type: ignore[no-untyped-def]
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    print(
        f"{'shape':22} {'load':12} {'bound':>8} {'greedy':>8} {'ours':>8} {'gain':>7} "
        f"{'greedy ms':>10} {'ours ms':>8} {'speedup':>8}"
    )
    for shape, (slots, groups, nodes, gpus) in SHAPES.items():
        cases = [(f"zipf {s}", zipf_load(58, 256, s, rng), None) for s in EXPONENTS]
        windows = drifting_loads(58, 256, 0.9, 4, 0.3, rng)
        cases += [(f"drift {i}", windows[i], windows[i + 1]) for i in range(3)]
        for name, load, next_load in cases:
            shape_args = (slots, groups, nodes, gpus)
            ref, ref_s = timed(
                lambda load=load, a=shape_args: np.array(rebalance_reference(load.tolist(), *a)), 1
            )
            ours, ours_s = timed(lambda load=load, a=shape_args: rebalance(load, *a), args.repeat)
            score = next_load if next_load is not None else load
            b_ref = balancedness(score, ref, gpus)
            b_ours = balancedness(score, ours.phy2log, gpus)
            bound = upper_bound(score, slots, groups, nodes, gpus)
            row = {
                "shape": shape,
                "load": name,
                "bound": bound,
                "greedy": b_ref,
                "ours": b_ours,
                "gain_pct": 100 * (b_ours / b_ref - 1),
                "greedy_ms": ref_s * 1e3,
                "ours_ms": ours_s * 1e3,
            }
            rows.append(row)
            print(
                f"{shape:22} {name:12} {bound:8.4f} {b_ref:8.4f} {b_ours:8.4f} {row['gain_pct']:+6.2f}% "
                f"{ref_s * 1e3:10.1f} {ours_s * 1e3:8.1f} {ref_s / ours_s:7.1f}×"
            )
    skewed = [r for r in rows if r["load"].startswith("zipf")]
    print(
        f"mean gain over skewed cases: {statistics.mean(r['gain_pct'] for r in skewed):+.2f}%; "
        f"worst case: {min(r['gain_pct'] for r in rows):+.2f}%; "
        f"slowest rebalance: {max(r['ours_ms'] for r in rows):.1f} ms"
    )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
