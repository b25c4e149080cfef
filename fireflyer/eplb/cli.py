"""`fireflyer eplb rebalance|simulate`: the rebalance algorithm offline."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fireflyer.eplb.algorithm import PlacementError, rebalance, validate
from fireflyer.eplb.metrics import balancedness, imbalance
from fireflyer.eplb.synthetic import zipf_load


def round_robin(layers: int, experts: int, slots: int) -> np.ndarray:
    """The placement before any balancing: slot s holds expert s mod E."""
    return np.tile(np.arange(slots) % experts, (layers, 1))


def _load(path: str) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise PlacementError(f"{path}: no such file")
    data = np.load(file) if file.suffix == ".npy" else np.asarray(json.loads(file.read_text())["tokens"])
    if data.ndim != 2:
        raise PlacementError(f"{path}: load must be [layers, experts], got shape {data.shape}")
    return np.asarray(data, dtype=np.float64)


def cmd_rebalance(args: argparse.Namespace) -> int:
    load = _load(args.load)
    layers, experts = load.shape
    started = time.perf_counter()
    placement = rebalance(load, args.slots, args.groups, args.nodes, args.gpus, args.policy)
    elapsed = time.perf_counter() - started
    problems = validate(placement, experts, args.gpus)
    if problems:  # never write an invalid placement
        raise PlacementError("; ".join(problems))
    before = round_robin(layers, experts, args.slots)
    result: dict[str, Any] = {
        "layers": layers,
        "logicalExperts": experts,
        "gpus": args.gpus,
        "slotsPerGpu": args.slots // args.gpus,
        "policy": args.policy,
        "balancednessBefore": balancedness(load, before, args.gpus),
        "balancednessAfter": balancedness(load, placement.phy2log, args.gpus),
        "imbalanceAfter": imbalance(load, placement.phy2log, args.gpus),
        "seconds": elapsed,
        "phy2log": placement.phy2log.tolist(),
    }
    if args.expert_placement:
        deployment, role = args.expert_placement.split("/")
        text = json.dumps(
            {
                "apiVersion": "fireflyer.dev/v1alpha1",
                "kind": "ExpertPlacement",
                "metadata": {"name": f"{deployment}-{role}-static"},
                "spec": {
                    "deployment": deployment,
                    "role": role,
                    "generation": 1,
                    "layers": layers,
                    "logicalExperts": experts,
                    "gpus": args.gpus,
                    "slotsPerGpu": args.slots // args.gpus,
                    "phy2log": result["phy2log"],
                },
            }
        )
    else:
        text = json.dumps(result)
    Path(args.out).write_text(text)
    print(
        f"balancedness {result['balancednessBefore']:.4f} → {result['balancednessAfter']:.4f} "
        f"({layers} layers, {experts} experts, {args.slots} slots on {args.gpus} GPUs, "
        f"{elapsed * 1e3:.1f} ms); wrote {args.out}",
        file=sys.stderr,
    )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Balancedness as a function of redundant experts, on synthetic skewed load."""
    rng = np.random.default_rng(args.seed)
    load = zipf_load(args.layers, args.experts, args.zipf, rng)
    print(f"{'redundant':>9} {'slots':>6} {'balancedness':>13} {'max/mean':>9}")
    rows = []
    for redundant in args.redundant:
        slots = args.experts + redundant
        if slots % args.gpus:
            print(f"{redundant:>9} {slots:>6}   (not divisible by {args.gpus} GPUs)")
            continue
        placement = rebalance(load, slots, args.groups, args.nodes, args.gpus, args.policy)
        b = balancedness(load, placement.phy2log, args.gpus)
        m = imbalance(load, placement.phy2log, args.gpus)
        rows.append({"redundant": redundant, "balancedness": b, "imbalance": m})
        print(f"{redundant:>9} {slots:>6} {b:13.4f} {m:9.3f}")
    if args.json:
        print(json.dumps(rows))
    return 0


def add_parser(sub: Any) -> None:
    eplb = sub.add_parser("eplb", help="expert-parallel load balancing offline")
    eplb_sub = eplb.add_subparsers(dest="eplb_command", required=True)
    reb = eplb_sub.add_parser("rebalance", help="compute a placement from a load file")
    reb.add_argument(
        "--load", required=True, help="[layers, experts] token counts: .npy, or the JSON of GET /v1/eplb/load"
    )
    reb.add_argument("--slots", type=int, required=True, help="physical expert slots per layer")
    reb.add_argument("--groups", type=int, required=True, help="expert groups")
    reb.add_argument("--nodes", type=int, required=True)
    reb.add_argument("--gpus", type=int, required=True)
    reb.add_argument("--policy", choices=["auto", "hierarchical", "global"], default="auto")
    reb.add_argument("--out", required=True, help="output JSON")
    reb.add_argument(
        "--expert-placement",
        metavar="DEPLOYMENT/ROLE",
        help="write an ExpertPlacement resource instead (for eplb.mode: static)",
    )
    reb.set_defaults(handler=cmd_rebalance)
    sim = eplb_sub.add_parser("simulate", help="balancedness vs redundant experts on synthetic load")
    sim.add_argument("--layers", type=int, default=58)
    sim.add_argument("--experts", type=int, default=256)
    sim.add_argument("--groups", type=int, default=8)
    sim.add_argument("--nodes", type=int, default=4)
    sim.add_argument("--gpus", type=int, default=32)
    sim.add_argument("--zipf", type=float, default=0.8, help="skew of expert popularity")
    sim.add_argument("--redundant", type=int, nargs="+", default=[0, 32, 64, 96, 128])
    sim.add_argument("--policy", choices=["auto", "hierarchical", "global"], default="auto")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(handler=cmd_simulate)
