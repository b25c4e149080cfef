"""A few Gluon FP8 GEMM configs against cuBLAS block-wise on DeepSeek-V3's six dense shapes, timed
in interleaved rounds (each round times every kernel once, in CUDA graphs over operand copies
larger than L2) and reported as medians: single graph timings on the benchmark host moved by up to
10 % between runs, more than the differences between configs.

Usage: python -m bench.kernels.bench_fp8_interleaved [--m 4096] [--rounds 7] [--configs 128x128k2pl,128x128k2]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from bench.kernels.bench_fp8_gluon import SHAPES, geomean, graph_seconds, operand_sets
from fireflyer.kernels import fp8
from fireflyer.kernels import fp8_gluon as fg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--configs", default="128x128k2pl,128x128k2p,128x128k2,128x128k3")
    args = parser.parse_args()
    names, m = args.configs.split(","), args.m
    rates: dict[str, list[float]] = {name: [] for name in [*names, "cublas"]}
    for n, k in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        sets = operand_sets(a, torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        reference = fp8.gemm_fp8_reference(*sets[0])
        kernels = {name: partial(fg.gemm_fp8_gluon, config=fg.CONFIGS[name]) for name in names}
        kernels["cublas"] = fp8.gemm_fp8_cublas
        for label, kernel in kernels.items():
            diff = fp8.calc_diff(kernel(*sets[0]), reference)
            if not diff < 1e-3:
                raise SystemExit(f"{label} is wrong on n={n} k={k}: diff {diff:.2e}")
        times: dict[str, list[float]] = {label: [] for label in kernels}
        for _ in range(args.rounds):
            for label, kernel in kernels.items():
                times[label].append(graph_seconds([partial(kernel, *ops) for ops in sets], reps=10))
        tflops = 2 * m * n * k / 1e12
        row = {label: tflops / statistics.median(t) for label, t in times.items()}
        for label, rate in row.items():
            rates[label].append(rate)
        best = max(rate for label, rate in row.items() if label != "cublas")
        cells = " ".join(f"{label}={rate:.0f}" for label, rate in row.items())
        print(f"m={m} n={n} k={k}: {cells} TFLOPS | best/cublas {best / row['cublas']:.3f}", flush=True)
        del sets
    print("GEOMEAN " + " ".join(f"{label}={geomean(r):.0f}" for label, r in rates.items()))
    best_per_shape = [max(rates[name][i] for name in names) for i in range(len(SHAPES))]
    print(f"per-shape best {geomean(best_per_shape):.0f} against cublas {geomean(rates['cublas']):.0f}")


if __name__ == "__main__":
    main()
