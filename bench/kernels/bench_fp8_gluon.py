"""The Gluon FP8 GEMMs beside their peers in one run on one Hopper GPU: every Gluon tile config, our
Triton kernel, cuBLAS block-wise (`torch._scaled_mm` with DeepSeek's scales) and BF16 cuBLAS, on
DeepSeek-V3's shapes at M ∈ {64, 128, 4096}; then grouped contiguous and grouped masked (Gluon vs
Triton). Each kernel is checked against the torch reference before it is timed; a failing config
prints its error and is left out.

Two times per kernel: "eager" (`triton.testing.do_bench`, L2 cleared between calls; includes the
host's launch cost whenever that exceeds the GPU time, as it does for small M on the benchmark host's
CPU) and "graph" (the kernel alone: one CUDA graph calls it on enough copies of the operands to
exceed L2 twice over, so no call finds its weight in L2).

Usage: python bench/kernels/bench_fp8_gluon.py [--out results.json] [--only gemm,grouped] [--m 64,128,4096]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from functools import partial

import torch
import triton.testing

from fireflyer.kernels import fp8
from fireflyer.kernels import fp8_gluon as fg
from fireflyer.kernels.fp8_triton import gemm_fp8_triton, grouped_contiguous_triton, grouped_masked_triton

SHAPES = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def seconds(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=40)) * 1e-3


L2_BYTES = 60 * 2**20


def graph_seconds(calls: list[Callable[[], object]], reps: int = 5) -> float:
    """Seconds per call when the calls (each on its own operands) replay from one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / (reps * len(calls))


def operand_sets(a: torch.Tensor, b: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """a [M, K] and b [N, K] quantised, then copied until the copies exceed L2 twice over, so that
    a graph calling the GEMM once per copy finds no operand in L2."""
    a_q, a_s = fp8.quantize_per_token_group(a)
    b_q, b_s = fp8.quantize_per_block(b)
    (m, k), n = a.shape, b.shape[0]
    copies = max(1, min(32, -(-2 * L2_BYTES // (m * k + n * k + 2 * m * n))))
    return [(a_q, a_s, b_q, b_s)] + [
        (a_q.clone(), a_s.clone(), b_q.clone(), b_s.clone()) for _ in range(copies - 1)
    ]


def checked(fn: Callable[[], torch.Tensor], ref: torch.Tensor, label: str) -> float | None:
    """Time fn if its output matches ref (calc_diff < 1e-3); None (and the reason printed) if not."""
    try:
        diff = fp8.calc_diff(fn(), ref)
        if not diff < 1e-3:
            print(f"  {label}: WRONG diff {diff:.2e}", flush=True)
            return None
        return seconds(fn)
    except Exception as e:  # one failing config must not hide the others
        print(f"  {label}: ERROR {type(e).__name__}: {str(e)[:400]}", flush=True)
        return None


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def gemm_rows(ms: list[int]) -> list[dict]:
    rows = []
    for m in ms:
        for n, k in SHAPES:
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            sets = operand_sets(a, b)
            ref = fp8.gemm_fp8_reference(*sets[0])
            tflops = 2 * m * n * k / 1e12
            row: dict = {"kernel": "gemm", "m": m, "n": n, "k": k}
            kernels: dict[str, Callable[..., torch.Tensor]] = {
                f"gluon_{name}": partial(fg.gemm_fp8_gluon, config=cfg) for name, cfg in fg.CONFIGS.items()
            }
            kernels |= {
                "gluon_default": fg.gemm_fp8_gluon,
                "triton": gemm_fp8_triton,
                "cublas_blockwise": fp8.gemm_fp8_cublas,
            }
            for label, kernel in kernels.items():
                t = checked(partial(kernel, *sets[0]), ref, label)
                row[label] = tflops / t if t else None
                try:
                    row[f"{label}_graph"] = (
                        tflops / graph_seconds([partial(kernel, *ops) for ops in sets]) if t else None
                    )
                except Exception as e:
                    print(f"  {label} graph: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
                    row[f"{label}_graph"] = None
            row["bf16"] = tflops / seconds(partial(torch.matmul, a, b.T))
            for suffix in ("", "_graph"):
                ok = [c for c in fg.CONFIGS if row[f"gluon_{c}{suffix}"]]
                best = max(ok, key=lambda c: row[f"gluon_{c}{suffix}"], default=None)
                row[f"gluon_best{suffix}"] = row[f"gluon_{best}{suffix}"] if best else None
                row[f"gluon_best_config{suffix}"] = best
            rows.append(row)
            for suffix in ("", "_graph"):
                v = {
                    key: row[key + suffix] or 0
                    for key in ("gluon_default", "gluon_best", "triton", "cublas_blockwise")
                }
                cols = " ".join(f"{c}={row[f'gluon_{c}{suffix}'] or 0:.0f}" for c in fg.CONFIGS)
                print(
                    f"GEMM{suffix or '_eager'} m={m} n={n} k={k}: gluon default {v['gluon_default']:.0f} "
                    f"best {v['gluon_best']:.0f} ({row[f'gluon_best_config{suffix}']}) [{cols}] | "
                    f"triton {v['triton']:.0f} | cublas-bw {v['cublas_blockwise']:.0f}"
                    + (f" | bf16 {row['bf16']:.0f}" if not suffix else "")
                    + " TFLOPS",
                    flush=True,
                )
            del sets
    for suffix in ("", "_graph"):
        for m in ms:
            sel = [r for r in rows if r["m"] == m]
            parts = []
            labels = [
                "gluon_default",
                "gluon_best",
                *(f"gluon_{c}" for c in fg.CONFIGS),
                "triton",
                "cublas_blockwise",
            ]
            for col in labels:
                vals = [r[col + suffix] for r in sel]
                parts.append(f"{col}={geomean(vals):.0f}" if all(vals) else f"{col}=n/a")
            print(f"GEOMEAN{suffix or '_eager'} M={m}: " + " ".join(parts), flush=True)
    return rows


def grouped_rows(contiguous_configs: list[str], masked_configs: list[str]) -> list[dict]:
    rows = []
    contiguous_rate: dict[tuple[int, int], float] = {}
    for groups, m_per in ((4, 8192), (8, 4096), (32, 256)):
        for n, k in ((4096, 7168), (7168, 2048)):
            m = groups * m_per
            a_q, a_s = fp8.quantize_per_token_group(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            w_q, w_s = fp8.quantize_per_block(torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16))
            idx = torch.arange(groups, device="cuda", dtype=torch.int32).repeat_interleave(m_per)
            ref = grouped_contiguous_triton(a_q, a_s, w_q, w_s, idx)
            tflops = 2 * m * n * k / 1e12
            row: dict = {
                "kernel": "grouped_contiguous",
                "groups": groups,
                "m_per_group": m_per,
                "n": n,
                "k": k,
            }
            for name in contiguous_configs:
                t = checked(
                    partial(fg.grouped_contiguous_gluon, a_q, a_s, w_q, w_s, idx, config=fg.CONFIGS[name]),
                    ref,
                    f"gluon {name}",
                )
                row[f"gluon_{name}"] = tflops / t if t else None
            t = seconds(partial(grouped_contiguous_triton, a_q, a_s, w_q, w_s, idx))
            row["triton"] = tflops / t
            best = max((v for key, v in row.items() if key.startswith("gluon_") and v), default=0.0)
            contiguous_rate[(n, k)] = best if groups == 32 else contiguous_rate.get((n, k), 0.0)
            rows.append(row)
            print(
                f"grouped contiguous {groups}x{m_per} n={n} k={k}: gluon "
                + " ".join(f"{key[6:]}={v or 0:.0f}" for key, v in row.items() if key.startswith("gluon_"))
                + f" | triton {row['triton']:.0f} TFLOPS",
                flush=True,
            )
            del a_q, w_q
    for groups, m_max, lo, hi in (
        (32, 256, 256, 256),
        (32, 256, 64, 256),
        (32, 128, 128, 128),
        (32, 64, 32, 64),
    ):
        for n, k in ((4096, 7168), (7168, 2048)):
            x = torch.randn(groups * m_max, k, device="cuda", dtype=torch.bfloat16)
            a_q, a_s = fp8.quantize_per_token_group(x)
            a_q, a_s = a_q.view(groups, m_max, k), a_s.view(groups, m_max, -1)
            w_q, w_s = fp8.quantize_per_block(torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16))
            masked = torch.randint(lo, hi + 1, (groups,), device="cuda", dtype=torch.int32)
            out = torch.zeros(groups, m_max, n, device="cuda", dtype=torch.bfloat16)
            ref = grouped_masked_triton(a_q, a_s, w_q, w_s, masked).clone()
            tflops = 2 * int(masked.sum()) * n * k / 1e12
            row = {
                "kernel": "grouped_masked",
                "groups": groups,
                "m_max": m_max,
                "rows": [lo, hi],
                "n": n,
                "k": k,
            }
            for name in masked_configs:
                t = checked(
                    partial(
                        fg.grouped_masked_gluon, a_q, a_s, w_q, w_s, masked, out=out, config=fg.CONFIGS[name]
                    ),
                    ref,
                    f"gluon {name}",
                )
                row[f"gluon_{name}"] = tflops / t if t else None
            row["triton"] = tflops / seconds(
                partial(grouped_masked_triton, a_q, a_s, w_q, w_s, masked, out=out)
            )
            best = max((v for key, v in row.items() if key.startswith("gluon_") and v), default=0.0)
            row["vs_contiguous_32x256"] = (
                best / contiguous_rate[(n, k)] if contiguous_rate.get((n, k)) else None
            )
            rows.append(row)
            print(
                f"grouped masked {groups}x{lo}-{hi} (of {m_max}) n={n} k={k}: gluon "
                + " ".join(f"{key[6:]}={v or 0:.0f}" for key, v in row.items() if key.startswith("gluon_"))
                + f" | triton {row['triton']:.0f} TFLOPS"
                + f" | best / contiguous 32x256 {row['vs_contiguous_32x256'] or 0:.2f}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--only", default="gemm,grouped")
    parser.add_argument("--m", default="64,128,4096")
    parser.add_argument("--contiguous-configs", default="128x128,128x128s5,128x128k2,64x128")
    parser.add_argument("--masked-configs", default="128x128,128x128k2,64x256,64x128,64x128k2")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs, "
        f"torch {torch.__version__}, triton {triton.__version__}"
    )
    rows: list[dict] = []
    if "gemm" in args.only:
        rows += gemm_rows([int(x) for x in args.m.split(",")])
    if "grouped" in args.only:
        rows += grouped_rows(args.contiguous_configs.split(","), args.masked_configs.split(","))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": props.name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
