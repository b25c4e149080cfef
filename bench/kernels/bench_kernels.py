"""Kernel benchmarks beside their peers, measured in the same run on one GPU.

HBM: a 4 GiB device-to-device copy (bytes read + written), the ceiling of the memory-bound rows.
MLA: b=128, h_q=128, s_q ∈ {1, 2}, s_k ∈ {4096, 8192, 16384, 32768} — ours (Triton) vs a torch
pipeline (gather pages → SDPA-free einsum attention in BF16). GEMM: FP8 block-scaled (ours) vs
cuBLAS block-wise (`torch._scaled_mm` with DeepSeek's scales), `auto` (the measured table's
choice), torch._scaled_mm row-wise FP8 and BF16 cuBLAS on DeepSeek-V3 shapes;
grouped contiguous and grouped masked (ours). The official libraries get a column once they run
here: the run prints why DeepGEMM and FlashMLA do not (docs/kernels.md).

Usage: python bench/kernels/bench_kernels.py [--out results.json] [--quick] [--only mla,gemm,grouped]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial

import torch
import triton.testing

from fireflyer.kernels import fp8, mla, official
from fireflyer.kernels.mla_triton import mla_decode_triton

SCALE = 192**-0.5


def bench(fn, reps: int = 50) -> float:  # type: ignore[no-untyped-def]
    return float(triton.testing.do_bench(fn, warmup=10, rep=reps)) * 1e-3  # seconds


def copy_rate() -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy."""
    src = torch.empty(2**31, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    seconds = bench(partial(dst.copy_, src))
    del src, dst
    return 2 * 2**32 / seconds


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


def mla_cases(quick: bool, hbm: float) -> list[dict]:
    """hbm: the copy rate in bytes/s; memory-bound figures are also given as its fraction."""
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
                    "ours_of_copy": bytes_ / t_ours / hbm,
                    "ours_TFLOPS": flops / t_ours / 1e12,
                    "torch_us": t_peer * 1e6,
                    "torch_TBps": bytes_ / t_peer / 1e12,
                    "speedup": t_peer / t_ours,
                }
            )
            print(
                f"MLA s_q={s_q} s_k={s_k:5d}: ours {t_ours * 1e6:8.1f} us "
                f"{bytes_ / t_ours / 1e12:5.2f} TB/s ({bytes_ / t_ours / hbm:.0%} of copy) "
                f"{flops / t_ours / 1e12:6.1f} TFLOPS | torch "
                f"{t_peer * 1e6:8.1f} us {bytes_ / t_peer / 1e12:5.2f} TB/s | ×{t_peer / t_ours:.2f}",
                flush=True,
            )
            del q, kv
    return rows


def mla_fp8_cases(quick: bool, hbm: float) -> list[dict]:
    """The FP8 latent cache (656 bytes per token) against the BF16 cache (1152), both our Triton
    kernel, on the same shapes: s_q = 1, b = 128. Bandwidth counts the bytes each actually reads."""
    from fireflyer.kernels.mla_fp8 import TOKEN_BYTES, quantize_latent
    from fireflyer.kernels.mla_fp8_triton import mla_decode_fp8_triton

    rows = []
    for h_q in (16, 64, 128):
        for s_k in [4096, 16384] if quick else [4096, 8192, 16384]:
            b, s_q, pages = 128, 1, s_k // mla.PAGE
            q = torch.randn(b, s_q, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(b * pages, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16)
            kv_fp8 = quantize_latent(kv)
            table = torch.randperm(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
            lens = torch.full((b,), s_k, dtype=torch.int32, device="cuda")
            t_bf16 = bench(partial(mla_decode_triton, q, kv, table, lens, SCALE))
            t_fp8 = bench(partial(mla_decode_fp8_triton, q, kv_fp8, table, lens, SCALE))
            rest = q.numel() * 2 + b * s_q * h_q * mla.D_V * 2  # the queries and outputs
            bytes_bf16 = b * s_k * mla.D_QK * 2 + rest
            bytes_fp8 = b * s_k * TOKEN_BYTES + rest
            rows.append(
                {
                    "kernel": "mla_fp8_cache",
                    "h_q": h_q,
                    "s_k": s_k,
                    "bf16_us": t_bf16 * 1e6,
                    "bf16_TBps": bytes_bf16 / t_bf16 / 1e12,
                    "fp8_us": t_fp8 * 1e6,
                    "fp8_TBps": bytes_fp8 / t_fp8 / 1e12,
                    "fp8_of_copy": bytes_fp8 / t_fp8 / hbm,
                    "speedup": t_bf16 / t_fp8,
                }
            )
            print(
                f"MLA FP8 cache h_q={h_q:3d} s_k={s_k:5d}: fp8 {t_fp8 * 1e6:8.1f} us "
                f"{bytes_fp8 / t_fp8 / 1e12:5.2f} TB/s ({bytes_fp8 / t_fp8 / hbm:.0%} of copy) | bf16 "
                f"{t_bf16 * 1e6:8.1f} us {bytes_bf16 / t_bf16 / 1e12:5.2f} TB/s | ×{t_bf16 / t_fp8:.2f}",
                flush=True,
            )
            del q, kv, kv_fp8
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
    return rows


def grouped_cases() -> list[dict]:
    """Grouped contiguous (prefill: experts' rows aligned to 128) and grouped masked (decode:
    64–256 valid rows per expert), ours; TFLOPS count only the valid rows."""
    rows = []
    for groups, m_per in ((4, 8192), (8, 4096)):
        for n, k in ((4096, 7168), (7168, 2048)):
            m = groups * m_per
            a_q, a_s = fp8.quantize_per_token_group(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            w_q, w_s = fp8.quantize_per_block(torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16))
            idx = torch.arange(groups, device="cuda", dtype=torch.int32).repeat_interleave(m_per)
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
                f"grouped contiguous {groups}×{m_per} n={n} k={k}: ours {flops / t / 1e12:7.1f} TFLOPS",
                flush=True,
            )
    for groups, m_max, valid in ((32, 256, (64, 256)), (32, 128, (128, 128))):
        for n, k in ((4096, 7168), (7168, 2048)):
            x = torch.randn(groups * m_max, k, device="cuda", dtype=torch.bfloat16)
            a_q, a_s = fp8.quantize_per_token_group(x)
            a_q, a_s = a_q.view(groups, m_max, k), a_s.view(groups, m_max, -1)
            w_q, w_s = fp8.quantize_per_block(torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16))
            masked = torch.randint(valid[0], valid[1] + 1, (groups,), device="cuda", dtype=torch.int32)
            out = torch.empty(groups, m_max, n, device="cuda", dtype=torch.bfloat16)
            t = bench(
                partial(fp8.grouped_gemm_fp8_masked, a_q, a_s, w_q, w_s, masked, backend="triton", out=out)
            )
            flops = 2 * int(masked.sum()) * n * k
            rows.append(
                {
                    "kernel": "grouped_masked",
                    "groups": groups,
                    "m_max": m_max,
                    "valid_rows": list(valid),
                    "n": n,
                    "k": k,
                    "ours_TFLOPS": flops / t / 1e12,
                }
            )
            print(
                f"grouped masked {groups}×{valid[0]}–{valid[1]} rows (of {m_max}) n={n} k={k}: ours "
                f"{flops / t / 1e12:7.1f} TFLOPS",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="mla,gemm,grouped", help="comma-separated: mla, gemm, grouped")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"date {time.strftime('%Y-%m-%d')}",
        flush=True,
    )
    for module in official.MODULES:
        why_not = official.unavailable(module, torch.device("cuda"))
        print(f"{module}: {why_not or 'runs here (not yet a column of this benchmark)'}", flush=True)
    hbm = copy_rate()
    print(f"HBM copy (4 GiB, read + write): {hbm / 1e12:.2f} TB/s", flush=True)
    rows: list[dict] = [{"kernel": "copy", "TBps": hbm / 1e12}]
    only = set(args.only.split(","))
    if "mla" in only:
        rows += mla_cases(args.quick, hbm)
        rows += mla_fp8_cases(args.quick, hbm)
    if "gemm" in only:
        rows += gemm_cases(args.quick)
    if "grouped" in only:
        rows += grouped_cases()
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
