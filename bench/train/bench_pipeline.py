"""Pipeline bubbles of DualPipe against 1F1B, measured from the trainer's executed timelines.

Usage: python bench/train/bench_pipeline.py [--stages 4 8] [--steps 5] [--seq-len 128]
           [--micro-batch-size 2] [--layers-per-stage 1] [--json FILE]

For each P in --stages and each schedule, `fireflyer train --pipeline P --micro-batches 2P` runs on
P local CPU ranks (one intra-op thread each; give it at least P cores, or the ranks share cores and
the idle time stops meaning waiting) over a tiny DeepSeek-V3 of P × --layers-per-stage MoE layers,
with --timeline-jsonl. Every step after the first (warm-up), per rank: busy = the time inside its
operations, idle = the step's span (first start to last end over all ranks) − busy. The bubble is
the largest idle time of a rank, as in the DualPipe table; the table also gives the mean operation
costs measured in the same run (F, B, F&B: DualPipe's overlapped pair, which runs its two passes
one after the other here), the formulas with those costs — 1F1B (P−1)(F+B), our unsplit DualPipe
max(0, (P/2−1)(F&B+B) − F) — and the simulator replaying the measured durations with free communication.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fireflyer.workloads.model.init import init_checkpoint
from fireflyer.workloads.train import schedules
from fireflyer.workloads.train.data import write_shards

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(model: Path, data: Path, out: Path, stages: int, schedule: str, args: argparse.Namespace) -> Path:
    timeline = out / f"timeline-{stages}-{schedule}.jsonl"
    argv = [sys.executable, "-m", "fireflyer.workloads.train", "--model", str(model), "--data", str(data)]
    argv += ["--steps", str(args.steps), "--micro-batches", str(2 * stages)]
    argv += ["--micro-batch-size", str(args.micro_batch_size), "--seq-len", str(args.seq_len)]
    argv += ["--pipeline", str(stages), "--schedule", schedule, "--device", "cpu", "--dtype", "fp32"]
    argv += ["--timeline-jsonl", str(timeline), "--lr", "1e-4"]
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK")}
    env |= {"NPROC_PER_NODE": str(stages), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    return timeline


def analyse(line: dict[str, Any]) -> dict[str, Any]:
    """One step's timeline → its span, per-rank idle, mean costs and the replayed bubble."""
    schedule = schedules.build(line["schedule"], line["stages"], line["microBatches"])
    ranks = line["ranks"]
    start = min(r[0][1] for r in ranks)
    span = max(r[-1][2] for r in ranks) - start
    busy = [sum(op[2] - op[1] for op in r) for r in ranks]
    idle = [span - b for b in busy]
    costs: dict[str, list[float]] = {"F": [], "B": [], "F&B": []}
    for records in ranks:
        for op, start_, end, _ in records:
            kind = "F&B" if "&" in op else op[0]
            costs[kind].append(end - start_)
    durations = [[op[2] - op[1] for op in r] for r in ranks]
    replay = schedules.simulate(schedule, durations=durations)
    return {
        "span": span,
        "bubble": max(idle),
        "meanIdle": statistics.mean(idle),
        "busy": busy,
        "costs": {k: statistics.mean(v) for k, v in costs.items() if v},
        "replayBubble": replay.bubble,
    }


def formula(schedule: str, stages: int, costs: dict[str, float]) -> float:
    f, b = costs["F"], costs["B"]
    if schedule == "1f1b":
        return (stages - 1) * (f + b)
    return max(0.0, (stages / 2 - 1) * (costs.get("F&B", f + b) + b) - f)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--layers-per-stage", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        docs = [rng.integers(2, 1000, size=4 * args.seq_len) for _ in range(64)]
        data = write_shards(docs, root / "data", eos_id=1)
        for stages in args.stages:
            layers = stages * args.layers_per_stage
            # Every layer MoE, so that the stages cost about the same (the tiny preset's layer 0 is
            # a dense MLP); the first stage adds the embedding, the last the LM head and loss.
            overrides = {"num_hidden_layers": layers, "first_k_dense_replace": 0}
            model = init_checkpoint(root / f"tiny{layers}", preset="tiny", seed=0, overrides=overrides)
            for schedule in ("1f1b", "dualpipe"):
                timeline = run(model, data, root, stages, schedule, args)
                steps = [analyse(json.loads(raw)) for raw in timeline.read_text().splitlines()[1:]]
                costs = {k: statistics.median(s["costs"][k] for s in steps) for k in steps[0]["costs"]}
                rows.append(
                    {
                        "stages": stages,
                        "schedule": schedule,
                        "microBatches": 2 * stages,
                        "layers": layers,
                        "stepsMeasured": len(steps),
                        "span": statistics.median(s["span"] for s in steps),
                        "bubble": statistics.median(s["bubble"] for s in steps),
                        "meanIdle": statistics.median(s["meanIdle"] for s in steps),
                        "costs": costs,
                        "formulaBubble": formula(schedule, stages, costs),
                        "replayBubble": statistics.median(s["replayBubble"] for s in steps),
                        "busyPerRank": [
                            statistics.median(s["busy"][r] for s in steps) for r in range(stages)
                        ],
                    }
                )
    header = "| P | schedule | M | step span ms | bubble ms (max idle) | bubble / span | mean idle ms"
    header += " | busiest / idlest rank | F ms | B ms | F&B ms | formula ms | replay ms |"
    print(header)
    print("|" + "---|" * 13)
    for r in rows:
        c = r["costs"]
        print(
            f"| {r['stages']} | {r['schedule']} | {r['microBatches']} | {1e3 * r['span']:.1f}"
            f" | {1e3 * r['bubble']:.1f} | {r['bubble'] / r['span']:.2f} | {1e3 * r['meanIdle']:.1f}"
            f" | {max(r['busyPerRank']) / min(r['busyPerRank']):.2f}"
            f" | {1e3 * c['F']:.1f} | {1e3 * c['B']:.1f} | {1e3 * c.get('F&B', float('nan')):.1f}"
            f" | {1e3 * r['formulaBubble']:.1f} | {1e3 * r['replayBubble']:.1f} |"
        )
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": vars(args),
        "results": rows,
    }
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
