"""Kernel benchmarks beside their peers, measured in the same run on one GPU.

MLA: b=128, h_q=128, s_q ∈ {1, 2}, s_k ∈ {4096, 8192, 16384, 32768} — ours (Triton) vs a torch
pipeline (gather pages → SDPA-free einsum attention in BF16). GEMM: FP8 block-scaled (ours) vs
cuBLAS block-wise (`torch._scaled_mm` with DeepSeek's scales), `auto` (the measured table's choice),
torch._scaled_mm row-wise FP8 and BF16 cuBLAS on DeepSeek-V3 shapes; grouped contiguous.

Usage: python bench/kernels/bench_kernels.py [--out results.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial

import torch
import triton.testing

from fireflyer.kernels import fp8, mla
from fireflyer.kernels.mla_triton import mla_decode_triton

SCALE = 192**-0.5


def bench(fn, reps: int = 50) -> float:  # type: ignore[no-untyped-def]
    return float(triton.testing.do_bench(fn, warmup=10, rep=reps)) * 1e-3  # seconds


def torch_mla(q, kv, table, lens, s_k):  # type: ignore[no-untyped-def]
    """The peer: gather every sequence's pages (all the same length here) and attend in BF16."""
    b, s_q, _, _ = q.shape
    pages = s_k // mla.PAGE
    k = kv.view(-1, mla.PAGE, mla.D_QK)[table[:, :pages].long()].view(b, s_k, mla.D_QK)
    scores = torch.einsum("bshd,bnd->bshn", q, k).float() * SCALE
    if s_q > 1:
        pos = torch.arange(s_k, device=q.device)
        limit = s_k - s_q + torch.arange(s_q, device=q.device)
        mask = pos[None, :] > limit[:, None]  # [s_q, s_k]
        scores = scores.masked_fill(mask[None, :, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.einsum("bshn,bnd->bshd", p, k[..., : mla.D_V])


def mla_cases(quick: bool) -> list[dict]:
    rows = []
    seqs = [4096, 8192] if quick else [4096, 8192, 16384, 32768]
    for s_q in (1, 2):
        for s_k in seqs:
            b, h_q = 128, 128
            pages = s_k // mla.PAGE
            q = torch.randn(b, s_q, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(b * pages, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16)
            table = torch.randperm(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
            lens = torch.full((b,), s_k, dtype=torch.int32, device="cuda")
            t_ours = bench(partial(mla_decode_triton, q, kv, table, lens, SCALE))
            t_peer = bench(partial(torch_mla, q, kv, table, lens, s_k))
            bytes_ = b * s_k * mla.D_QK * 2 + q.numel() * 2 + b * s_q * h_q * mla.D_V * 2
            flops = 2 * b * s_q * h_q * s_k * (mla.D_QK + mla.D_V)
            rows.append(
                {
                    "kernel": "mla",
                    "s_q": s_q,
                    "s_k": s_k,
                    "ours_us": t_ours * 1e6,
                    "ours_TBps": bytes_ / t_ours / 1e12,
                    "ours_TFLOPS": flops / t_ours / 1e12,
                    "torch_us": t_peer * 1e6,
                    "torch_TBps": bytes_ / t_peer / 1e12,
                    "speedup": t_peer / t_ours,
                }
            )
            print(
                f"MLA s_q={s_q} s_k={s_k:5d}: ours {t_ours * 1e6:8.1f} us "
                f"{bytes_ / t_ours / 1e12:5.2f} TB/s {flops / t_ours / 1e12:6.1f} TFLOPS | torch "
                f"{t_peer * 1e6:8.1f} us {bytes_ / t_peer / 1e12:5.2f} TB/s | ×{t_peer / t_ours:.2f}",
                flush=True,
            )
            del q, kv
    return rows


SHAPES = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def gemm_cases(quick: bool) -> list[dict]:
    rows = []
    for m in (64, 128, 4096):
        for n, k in SHAPES:
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            a_q, a_s = fp8.quantize_per_token_group(a)
            b_q, b_s = fp8.quantize_per_block(b)
            t_ours = bench(partial(fp8.gemm_fp8, a_q, a_s, b_q, b_s, backend="triton"))
            t_block = bench(partial(fp8.gemm_fp8, a_q, a_s, b_q, b_s, backend="cublas"))
            t_auto = bench(partial(fp8.gemm_fp8, a_q, a_s, b_q, b_s, backend="auto"))
            # row-wise FP8 peer: per-row activation scale, per-column weight scale
            a_rw = (a.float().abs().amax(1, keepdim=True) / 448).clamp(min=1e-4)
            b_rw = (b.float().abs().amax(1, keepdim=True) / 448).clamp(min=1e-4)
            a8 = (a.float() / a_rw).to(fp8.FP8)
            b8 = (b.float() / b_rw).to(fp8.FP8)
            t_rw = bench(
                partial(torch._scaled_mm, a8, b8.T, scale_a=a_rw, scale_b=b_rw.T, out_dtype=torch.bfloat16)
            )
            t_bf16 = bench(partial(torch.matmul, a, b.T))
            flops = 2 * m * n * k
            diff = fp8.calc_diff(fp8.gemm_fp8(a_q, a_s, b_q, b_s, backend="triton"), a.float() @ b.float().T)
            diff_block = fp8.calc_diff(
                fp8.gemm_fp8(a_q, a_s, b_q, b_s, backend="cublas"), fp8.gemm_fp8_reference(a_q, a_s, b_q, b_s)
            )
            rows.append(
                {
                    "kernel": "gemm",
                    "m": m,
                    "n": n,
                    "k": k,
                    "ours_TFLOPS": flops / t_ours / 1e12,
                    "cublas_blockwise_TFLOPS": flops / t_block / 1e12,
                    "auto_TFLOPS": flops / t_auto / 1e12,
                    "auto_vs_best": min(t_ours, t_block) / t_auto,
                    "rowwise_fp8_TFLOPS": flops / t_rw / 1e12,
                    "bf16_TFLOPS": flops / t_bf16 / 1e12,
                    "vs_rowwise": t_rw / t_ours,
                    "diff": diff,
                    "diff_cublas_vs_reference": diff_block,
                }
            )
            print(
                f"GEMM m={m:5d} n={n:5d} k={k:5d}: ours {flops / t_ours / 1e12:7.1f} | cuBLAS block-wise "
                f"{flops / t_block / 1e12:7.1f} | auto {flops / t_auto / 1e12:7.1f} | row-wise FP8 "
                f"{flops / t_rw / 1e12:7.1f} | BF16 {flops / t_bf16 / 1e12:7.1f} TFLOPS | "
                f"×{t_rw / t_ours:.2f} vs row-wise | diff {diff:.1e}",
                flush=True,
            )
    for groups, m_per in ((4, 8192), (8, 4096)):
        for n, k in ((4096, 7168), (7168, 2048)):
            m = groups * m_per
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16)
            idx = torch.arange(groups, device="cuda", dtype=torch.int32).repeat_interleave(m_per)
            a_q, a_s = fp8.quantize_per_token_group(a)
            w_q, w_s = fp8.quantize_per_block(w)
            t = bench(partial(fp8.grouped_gemm_fp8_contiguous, a_q, a_s, w_q, w_s, idx, backend="triton"))
            flops = 2 * m * n * k
            rows.append(
                {
                    "kernel": "grouped_contiguous",
                    "groups": groups,
                    "m_per_group": m_per,
                    "n": n,
                    "k": k,
                    "ours_TFLOPS": flops / t / 1e12,
                }
            )
            print(
                f"grouped contiguous {groups}×{m_per} n={n} k={k}: {flops / t / 1e12:7.1f} TFLOPS", flush=True
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["mla", "gemm"])
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"date {time.strftime('%Y-%m-%d')}",
        flush=True,
    )
    rows = []
    if args.only in (None, "mla"):
        rows += mla_cases(args.quick)
    if args.only in (None, "gemm"):
        rows += gemm_cases(args.quick)
    for m in (64, 128, 4096):
        for column in ("ours_TFLOPS", "cublas_blockwise_TFLOPS", "auto_TFLOPS"):
            gm = [r[column] for r in rows if r["kernel"] == "gemm" and r["m"] == m]
            if gm:
                mean = math.exp(sum(map(math.log, gm)) / len(gm))
                print(f"FP8 GEMM M={m} geometric mean {column}: {mean:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
